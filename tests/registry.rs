//! Redeploy for real: a registry (the distribution project's, as Debian packages it)
//! sends its own push notifications to a real `capstan serve`, whose `redeploy` plugin
//! pulls the pushed image and re-creates the containers that run its tag, keeping their
//! configuration; an image that fails to start is rolled back.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::triggers::{eventually, generated_secret, install_plugin, runs};
use crate::util::plugin::{Container, docker, example_dir, forget_repo};
use crate::util::*;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A registry of the test's own on a free loopback port, notifying `endpoint` with
/// `Authorization: Bearer <token>` on every event; stopped when dropped.
struct NotifyingRegistry {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifyingRegistry {
    fn start(endpoint: &str, token: &str) -> NotifyingRegistry {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: `scripts/testinfra up` installs Debian's docker-registry"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\nnotifications:\n  endpoints:\n    - name: capstan\n      \
                 url: {endpoint}\n      headers:\n        Authorization: [\"Bearer {token}\"]\n      \
                 timeout: 5s\n      threshold: 10\n      backoff: 1s\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new(REGISTRY_BIN)
            .args(["serve", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start docker-registry");
        let registry = NotifyingRegistry {
            child,
            addr,
            log,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let up = std::net::TcpStream::connect(&registry.addr).is_ok()
                && http(&registry.addr, "GET", "/v2/", &[], b"").0 == 200;
            if up {
                return registry;
            }
            assert!(
                Instant::now() < until,
                "the test registry on {} did not answer /v2/: {}",
                registry.addr,
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NotifyingRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The runs of `redeploy` that re-created something or failed (not the ones a blob
/// upload, a pull or a push before any container ran caused).
fn acting_runs(data: &DataDir) -> Vec<serde_json::Value> {
    runs(data, "redeploy")
        .into_iter()
        .filter(|r| {
            let text = r.to_string();
            let idle = text.contains("nothing to redeploy")
                || (r["status"] == "ok" && text.contains("recreated 0"));
            !idle
        })
        .collect()
}

#[test]
fn a_push_to_the_registry_redeploys_the_containers_of_its_tag_and_a_broken_image_is_rolled_back() {
    let uniq = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let label = format!("capstan.test.redeploy={uniq}");
    // The example's manifest, with a bearer token (a registry sends static headers; it
    // cannot sign) and a label of this test's own.
    let manifest = std::fs::read_to_string(example_dir("redeploy").join("plugin.toml"))
        .unwrap()
        .replace("auth = \"hmac-sha256\"", "auth = \"bearer\"")
        .replace("capstan.redeploy=true", &label);
    assert!(manifest.contains("auth = \"bearer\"") && manifest.contains(&label));
    let data = DataDir::with_vault();
    let out = install_plugin(&data, "redeploy", &manifest);
    let token = generated_secret(&out, "redeploy");
    let server = Server::start(&data);
    let registry =
        NotifyingRegistry::start(&format!("http://{}/hooks/redeploy", server.addr), &token);

    // app:1 is pushed; two containers run it, each with configuration of its own.
    let tag = format!("{}/capstan-test/app-{uniq}:1", registry.addr);
    docker(&["tag", Infra::get().var("TEST_IMAGE"), &tag]);
    docker(&["push", "-q", &tag]);
    let v1 = docker(&["image", "inspect", "-f", "{{.Id}}", &tag]);
    // Its notification runs redeploy once with nothing to re-create yet; wait for that, so
    // it cannot re-create the containers started next.
    eventually(60, "the first push's redeploy ends", || {
        runs(&data, "redeploy")
            .iter()
            .any(|r| r.to_string().contains(&format!("{tag}: recreated 0")))
    });
    let a = Container::run("cap-reg-a", &["--label", &label, "-e", "GREETING=a"], &tag);
    let b = Container::run(
        "cap-reg-b",
        &["--label", &label, "--restart", "unless-stopped"],
        &tag,
    );

    // A changed image is pushed as the same tag. (The pull itself is tested on its own in
    // plugin_examples: here the daemon that pushes is the one that pulls, so the tag is
    // already on the new image when the notification arrives.)
    docker(&[
        "commit",
        "--change",
        "LABEL capstan.test.version=2",
        &a.name,
        &tag,
    ]);
    let v2 = docker(&["image", "inspect", "-f", "{{.Id}}", &tag]);
    docker(&["push", "-q", &tag]);
    assert_ne!(v1, v2);

    let until = Instant::now() + Duration::from_secs(60);
    while ![&a, &b]
        .iter()
        .all(|c| docker_inspect(&c.name, "{{.Image}}").as_deref() == Some(v2.as_str()))
    {
        assert!(
            Instant::now() < until,
            "not within 60 s: both containers run the pushed image; redeploy's runs: {:#}",
            serde_json::Value::Array(runs(&data, "redeploy"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(a.inspect("{{.State.Running}}"), "true");
    assert_eq!(b.inspect("{{.State.Running}}"), "true");
    assert!(a.inspect("{{.Config.Env}}").contains("GREETING=a"));
    assert_eq!(
        b.inspect("{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );
    eventually(60, "the redeploy run that recreated both ends ok", || {
        acting_runs(&data)
            .iter()
            .any(|r| r["status"] == "ok" && r.to_string().contains("recreated 2"))
    });
    let acted = acting_runs(&data);

    // An image that cannot start is pushed as the tag: the re-creates are rolled back and
    // the containers keep running the image before it.
    let before = acted.len();
    docker(&[
        "commit",
        "--change",
        "ENTRYPOINT [\"/no/such/program\"]",
        &a.name,
        &tag,
    ]);
    docker(&["push", "-q", &tag]);
    eventually(60, "a redeploy of the broken image ends", || {
        let acted = acting_runs(&data);
        acted.len() > before && acted.iter().any(|r| r["status"] == "failed")
    });
    let failed = acting_runs(&data)
        .into_iter()
        .find(|r| r["status"] == "failed")
        .unwrap();
    assert!(
        failed.to_string().contains("rolled back"),
        "the failure says the re-create was rolled back: {failed:#}"
    );
    for c in [&a, &b] {
        assert_eq!(c.inspect("{{.Image}}"), v2, "{} kept its image", c.name);
        assert_eq!(c.inspect("{{.State.Running}}"), "true", "{} runs", c.name);
    }

    drop(registry);
    drop(server);
    drop(a);
    drop(b);
    // Every image of the test's repository but the test image it started from (untagged
    // only: other names keep it).
    let repo = tag.trim_end_matches(":1");
    for id in docker(&["images", "-q", "--no-trunc", repo]).lines() {
        if id != v1 {
            let _ = docker_quiet(&["image", "rm", "-f", id]);
        }
    }
    forget_repo(&v1, repo);
}

/// A docker command whose failure does not matter (clean-up).
pub(crate) fn docker_quiet(args: &[&str]) -> Option<std::process::Output> {
    Command::new("docker")
        .env(
            "DOCKER_HOST",
            format!("unix://{}", Infra::get().var("DOCKER_SOCKET")),
        )
        .args(args)
        .output()
        .ok()
}

/// `docker inspect -f FORMAT NAME`, or `None` while the container does not exist (a
/// re-create renames and replaces it).
fn docker_inspect(name: &str, format: &str) -> Option<String> {
    let out = docker_quiet(&["inspect", "-f", format, name])?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
