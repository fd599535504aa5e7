//! `capstan plugin …` through the binary: install, list, show, run, audit, remove; a
//! scaffolded plugin that builds and installs as it is; default plugins on first start.

use std::path::Path;
use std::process::Command;

use crate::util::plugin::{example_dir, wasm};
use crate::util::*;

fn with_local_device(d: &DataDir) {
    let socket = Infra::get().var("DOCKER_SOCKET");
    let out = d.capstan(&[
        "device",
        "add",
        "local",
        "--kind",
        "local",
        "--docker-host",
        &format!("unix://{socket}"),
    ]);
    assert_success(&out, "device add local");
}

fn stage(dir: &Path, crate_name: &str, manifest: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(wasm(crate_name), dir.join(format!("{crate_name}.wasm"))).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
}

#[test]
fn installs_lists_shows_runs_audits_and_removes_a_plugin() {
    let d = DataDir::with_vault();
    with_local_device(&d);
    let src = d.path().join("src");
    stage(
        &src,
        "hostile",
        "name = \"hostile\"\nversion = \"1.2.3\"\ndescription = \"misbehaves\"\n[[triggers.cron]]\nschedule = \"*/5 * * * *\"\n[policy]\nCONTAINERS = 1\ndevices = [\"local\"]\n",
    );
    let out = d.capstan(&["plugin", "install", src.to_str().unwrap()]);
    assert_success(&out, "plugin install");
    assert!(
        stdout(&out).contains("installed plugin hostile 1.2.3"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("cron */5 * * * *"));

    let out = d.capstan(&["plugin", "list"]);
    assert_success(&out, "plugin list");
    assert!(
        stdout(&out).contains("hostile") && stdout(&out).contains("cron */5"),
        "{}",
        stdout(&out)
    );

    let out = d.capstan(&["plugin", "show", "hostile"]);
    assert_success(&out, "plugin show");
    assert!(stdout(&out).contains("memory 64 MiB"), "{}", stdout(&out));

    let out = d.capstan(&["plugin", "run", "hostile", "--input", "device:local"]);
    assert_success(&out, "plugin run");
    let text = stdout(&out);
    assert!(
        text.contains("succeeded") && text.contains("list-containers"),
        "{text}"
    );

    // A denial: the run fails, the report says why, the audit log has it.
    let out = d.capstan(&[
        "plugin",
        "run",
        "hostile",
        "--input",
        "device:prod",
        "--json",
    ]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["denials"][0]["device"], "prod");
    let out = d.capstan(&["plugin", "audit"]);
    assert!(stdout(&out).contains("deny"), "{}", stdout(&out));

    let out = d.capstan(&["plugin", "remove", "hostile"]);
    assert_success(&out, "plugin remove");
    assert_failure_says(
        &d.capstan(&["plugin", "show", "hostile"]),
        "no plugin named `hostile`",
    );
}

#[test]
fn install_errors_point_at_the_manifest_field() {
    let d = DataDir::with_vault();
    let src = d.path().join("src");
    stage(
        &src,
        "trivial",
        "name = \"t\"\nversion = \"1\"\n[policy]\ndevices = [\"web1\"]\n",
    );
    assert_failure_says(
        &d.capstan(&["plugin", "install", src.to_str().unwrap()]),
        "policy.devices: no device is named `web1`",
    );
    stage(
        &src,
        "trivial",
        "name = \"t\"\nversion = \"1\"\n[limits]\ntimeout = 5\n",
    );
    assert_failure_says(
        &d.capstan(&["plugin", "install", src.to_str().unwrap()]),
        "unknown field `timeout`",
    );
}

#[test]
fn scaffolds_a_plugin_crate_that_builds_and_installs_as_it_is() {
    let d = DataDir::with_vault();
    with_local_device(&d);
    let out = d.capstan(&[
        "plugin",
        "new",
        "hello-docker",
        "--dir",
        d.path().to_str().unwrap(),
    ]);
    assert_success(&out, "plugin new");
    let krate = d.path().join("hello-docker");
    let build = Command::new("cargo")
        .args(["build", "--target", "wasm32-wasip2", "--release", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", krate.join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        build.status.success(),
        "the scaffold builds ({}):\n{}{}",
        build.status,
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    let out = d.capstan(&["plugin", "install", krate.to_str().unwrap()]);
    assert_success(&out, "plugin install (scaffold)");
    let out = d.capstan(&["plugin", "run", "hello-docker"]);
    assert_success(&out, "plugin run (scaffold)");
    assert!(stdout(&out).contains("local: "), "{}", stdout(&out));
}

#[test]
fn serve_installs_the_default_plugins_on_first_start_only() {
    let d = DataDir::empty();
    let defaults = d.path().join("defaults");
    for name in ["autoheal", "crashloop", "inventory", "redeploy", "updates"] {
        let dir = defaults.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(wasm(name), dir.join(format!("{name}.wasm"))).unwrap();
        std::fs::copy(
            example_dir(name).join("plugin.toml"),
            dir.join("plugin.toml"),
        )
        .unwrap();
    }
    let server = Server::start_with(&d, |c| {
        c.env("CAPSTAN_DEFAULT_PLUGINS", &defaults);
    });
    for name in ["autoheal", "crashloop", "inventory", "redeploy", "updates"] {
        assert!(
            server.banner.contains(&format!("installed plugin {name}")),
            "{}",
            server.banner
        );
    }
    assert!(
        server.banner.contains("plugins: 5 loaded"),
        "{}",
        server.banner
    );
    assert!(server.stop().success());
    let server = Server::start_with(&d, |c| {
        c.env("CAPSTAN_DEFAULT_PLUGINS", &defaults);
    });
    assert!(
        !server.banner.contains("installed plugin"),
        "{}",
        server.banner
    );
    assert!(
        server
            .banner
            .contains("plugins: 5 loaded (5 from the compile cache"),
        "{}",
        server.banner
    );
    assert!(server.stop().success());
    let out = d.capstan(&["plugin", "list"]);
    assert!(
        stdout(&out).contains("webhook redeploy"),
        "{}",
        stdout(&out)
    );
}
