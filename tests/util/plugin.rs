//! Helpers for the plugin tests: the built test and example plugins, a runtime on a
//! scratch data directory with the local daemon as device `local`, containers that
//! remove themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use capstan::config::{ConfigFile, Settings};
use capstan::device::{DeviceKind, DeviceSpec};
use capstan::engine::{Engine, PassphraseInput};
use capstan::plugin::{PluginRuntime, RunReport, RuntimeConfig, TriggerEvent};

use super::Infra;

/// The `.wasm` of a plugin crate in `plugins/`, built by `scripts/test`. Panics with what
/// to do when it is missing: a test must not skip because a build step was left out.
pub fn wasm(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first (`scripts/test` does it: cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release)",
        path.display()
    );
    path
}

/// An example plugin's directory (`plugins/examples/<name>`).
pub fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/examples")
        .join(name)
}

/// A plugin runtime on a scratch data directory, with device `local` (the test daemon).
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub engine: Arc<Engine>,
    pub runtime: PluginRuntime,
    pub rt: tokio::runtime::Runtime,
}

impl Harness {
    pub fn new() -> Harness {
        Self::with_config(RuntimeConfig::default())
    }

    pub fn with_config(config: RuntimeConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::resolve(
            &ConfigFile::default(),
            Some(dir.path().join("data")),
            None,
            None,
        )
        .unwrap();
        let (engine, _) = Engine::open_or_init(settings, &PassphraseInput::default()).unwrap();
        let socket = Infra::get().var("DOCKER_SOCKET").to_string();
        engine
            .devices()
            .unwrap()
            .add(DeviceSpec {
                kind: Some(DeviceKind::Local),
                name: Some("local".into()),
                docker_host: Some(Some(format!("unix://{socket}"))),
                ..Default::default()
            })
            .unwrap();
        let engine = Arc::new(engine);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let runtime = {
            let _g = rt.enter();
            PluginRuntime::new(engine.clone(), config).unwrap()
        };
        Harness {
            dir,
            engine,
            runtime,
            rt,
        }
    }

    /// Installs the built plugin `crate_name` under the manifest `manifest` (TOML text).
    pub fn install(&self, crate_name: &str, manifest: &str) {
        let src = self
            .dir
            .path()
            .join(format!("src-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::copy(wasm(crate_name), src.join("plugin.wasm")).unwrap();
        std::fs::write(src.join("plugin.toml"), manifest).unwrap();
        self.runtime
            .install(&src.join("plugin.wasm"), None)
            .unwrap_or_else(|e| panic!("install {crate_name}: {e}"));
    }

    /// Installs an example plugin with its own manifest.
    pub fn install_example(&self, name: &str) {
        self.runtime
            .install(&wasm(name), Some(&example_dir(name).join("plugin.toml")))
            .unwrap_or_else(|e| panic!("install {name}: {e}"));
    }

    /// Installs an example plugin with its own manifest, its container scope narrowed to
    /// the containers named (so test runs sharing the daemon do not act on each other's
    /// containers).
    pub fn install_example_for(&self, name: &str, containers: &[&str]) {
        let text = std::fs::read_to_string(example_dir(name).join("plugin.toml")).unwrap();
        self.install_text_for(name, &text, containers);
    }

    /// Installs plugin `crate_name` with manifest `text`, its container scope narrowed to
    /// the containers named.
    pub fn install_text_for(&self, crate_name: &str, text: &str, containers: &[&str]) {
        let names: Vec<String> = containers.iter().map(|c| format!("{c:?}")).collect();
        let scoped = text.replacen(
            "[policy.containers]\n",
            &format!("[policy.containers]\nnames = [{}]\n", names.join(", ")),
            1,
        );
        assert_ne!(scoped, text, "the manifest has a [policy.containers] table");
        let dir = self
            .dir
            .path()
            .join(format!("src-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(wasm(crate_name), dir.join("plugin.wasm")).unwrap();
        std::fs::write(dir.join("plugin.toml"), scoped).unwrap();
        self.runtime
            .install(&dir.join("plugin.wasm"), None)
            .unwrap_or_else(|e| panic!("install {crate_name}: {e}"));
    }

    pub fn run(&self, name: &str, input: &str) -> RunReport {
        self.rt
            .block_on(self.runtime.run(name, TriggerEvent::manual(input)))
            .unwrap()
    }

    pub fn run_event(&self, name: &str, event: TriggerEvent) -> RunReport {
        self.rt.block_on(self.runtime.run(name, event)).unwrap()
    }
}

/// A run's outcome details as JSON (`null` when they are not JSON); panics with the
/// report when the run has no outcome.
pub fn details(r: &RunReport) -> serde_json::Value {
    let o = r
        .outcome
        .as_ref()
        .unwrap_or_else(|| panic!("no outcome: {}", r.render()));
    serde_json::from_str(&o.details).unwrap_or(serde_json::Value::Null)
}

/// A minimal manifest: `name`, then whatever `rest` adds (policy, limits …).
pub fn manifest(name: &str, rest: &str) -> String {
    format!("name = \"{name}\"\nversion = \"0.0.1\"\n{rest}\n")
}

/// `docker` against the test daemon.
pub fn docker(args: &[&str]) -> String {
    let socket = Infra::get().var("DOCKER_SOCKET");
    let out = Command::new("docker")
        .env("DOCKER_HOST", format!("unix://{socket}"))
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container removed (with `-f`) when dropped.
pub struct Container {
    pub name: String,
}

/// Label every container a plugin test creates carries.
pub const TEST_LABEL: &str = "org.capstan.test=plugins";

impl Container {
    /// `docker run -d --name <prefix>-<random> <args…> <image>`.
    pub fn run(prefix: &str, args: &[&str], image: &str) -> Container {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut all = vec!["run", "-d", "--name", &name, "--label", TEST_LABEL];
        all.extend_from_slice(args);
        all.push(image);
        docker(&all);
        Container { name }
    }

    pub fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "-f", format, &self.name])
    }

    /// Waits until the container's health is `want` (at most `secs`).
    pub fn wait_health(&self, want: &str, secs: u64) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let h = self.inspect("{{.State.Health.Status}}");
            if h == want {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "container {} is {h}, not {want}, after {secs} s",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let socket = Infra::get().var("DOCKER_SOCKET");
        let _ = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{socket}"))
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// Removes every name of repository `repo` (tags and the digests a push or pull left)
/// from image `id`, without removing the image, which other names keep.
pub fn forget_repo(id: &str, repo: &str) {
    let refs = docker(&[
        "image",
        "inspect",
        "-f",
        "{{range .RepoTags}}{{println .}}{{end}}{{range .RepoDigests}}{{println .}}{{end}}",
        id,
    ]);
    for r in refs.lines().filter(|r| {
        r.strip_prefix(repo)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
    }) {
        docker(&["image", "rm", r]);
    }
}
