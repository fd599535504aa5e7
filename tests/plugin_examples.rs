//! The example plugins and every `docker` host function, against the real daemon.

use std::time::Duration;

use capstan::plugin::{Exit, TriggerEvent};
use serde_json::{Value, json};

use crate::util::Infra;
use crate::util::plugin::{Container, Harness, details, docker, forget_repo, manifest};

/// Runs the probe plugin with `calls` and returns the results.
fn probe(h: &Harness, calls: Value) -> Vec<Value> {
    let r = h.run("probe", &calls.to_string());
    assert!(r.succeeded(), "{}", r.render());
    details(&r).as_array().unwrap().clone()
}

const PROBE_ALL: &str = "[policy]\nCONTAINERS = 1\nIMAGES = 1\nNETWORKS = 1\nVOLUMES = 1\nINFO = 1\nEXEC = 1\nPOST = 1\nALLOW_LOGS = 1\ndevices = [\"local\"]\n[policy.containers]\nlabels = [\"capstan.test.probe=yes\"]\n";

#[test]
fn every_docker_function_works_on_a_container_in_scope() {
    let h = Harness::new();
    let image = Infra::get().var("TEST_IMAGE");
    let c = Container::run("cap-probe", &["--label", "capstan.test.probe=yes"], image);
    let _other = Container::run("cap-probe-other", &[], image);
    h.install_text_for("probe", &manifest("probe", PROBE_ALL), &[&c.name]);
    let n = c.name.as_str();
    let r = probe(
        &h,
        json!([
            {"op": "list-devices"},
            {"op": "connect", "device": "local"},
            {"op": "check", "device": "local"},
            {"op": "list-containers", "device": "local"},
            {"op": "inspect", "device": "local", "container": n},
            {"op": "exec", "device": "local", "container": n, "cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]},
            {"op": "logs", "device": "local", "container": n},
            {"op": "stats", "device": "local", "container": n},
            {"op": "pause", "device": "local", "container": n},
            {"op": "inspect", "device": "local", "container": n},
            {"op": "unpause", "device": "local", "container": n},
            {"op": "stop", "device": "local", "container": n},
            {"op": "start", "device": "local", "container": n},
            {"op": "restart", "device": "local", "container": n},
            {"op": "kill", "device": "local", "container": n, "signal": "SIGKILL"},
            {"op": "list-images", "device": "local"},
            {"op": "list-networks", "device": "local"},
            {"op": "list-volumes", "device": "local"},
            {"op": "system-info", "device": "local"},
            {"op": "inspect", "device": "local", "container": "no-such-container-here"},
            {"op": "exec", "device": "local", "container": "bad/name", "cmd": ["true"]},
        ]),
    );
    let ok = |i: usize| {
        r[i].get("ok")
            .unwrap_or_else(|| panic!("call {i} failed: {}", r[i]))
            .clone()
    };
    assert_eq!(ok(0), json!([{"name": "local", "kind": "local"}]));
    assert!(!ok(2)["server_version"].as_str().unwrap().is_empty());
    let listed: Vec<String> = ok(3)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        vec![c.name.clone()],
        "the list is filtered to the container scope"
    );
    assert_eq!(ok(4)["running"], true);
    assert_eq!(
        ok(5),
        json!({"exit_code": 3, "stdout": "out\n", "stderr": "err\n"})
    );
    assert!(ok(7)["memory_limit"].as_u64().unwrap() > 0);
    assert_eq!(ok(9)["paused"], true);
    assert!(
        ok(15)
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["tags"].to_string().contains(image))
    );
    assert!(ok(16).to_string().contains("bridge"));
    assert!(ok(18)["cpus"].as_u64().unwrap() >= 1);
    assert!(
        r[19]["error"].as_str().unwrap().starts_with("not-found"),
        "{}",
        r[19]
    );
    assert!(
        r[20]["error"].as_str().unwrap().starts_with("invalid"),
        "{}",
        r[20]
    );
    assert_eq!(c.inspect("{{.State.Running}}"), "false", "killed");
}

#[test]
fn recreate_keeps_the_configuration_and_reports_a_failed_pull() {
    let h = Harness::new();
    h.install("probe", &manifest("probe", PROBE_ALL));
    let image = Infra::get().var("TEST_IMAGE");
    let mut c = Container::run(
        "cap-recreate",
        &[
            "--label",
            "capstan.test.probe=yes",
            "-e",
            "GREETING=hello",
            "--restart",
            "unless-stopped",
            "--memory",
            "64m",
        ],
        image,
    );
    let old_id = c.inspect("{{.Id}}");
    let r = probe(
        &h,
        json!([{"op": "recreate", "device": "local", "container": c.name, "pull": true}]),
    );
    let ok = r[0].get("ok").unwrap_or_else(|| panic!("{}", r[0])).clone();
    assert_eq!(ok["name"], c.name.as_str());
    assert_eq!(ok["pulled"], false, "no registry is reachable here");
    assert!(
        ok["pull_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{ok}"
    );
    assert_ne!(ok["new_id"], old_id.as_str());
    assert_eq!(c.inspect("{{.Id}}"), ok["new_id"].as_str().unwrap());
    assert_eq!(c.inspect("{{.State.Running}}"), "true");
    assert!(c.inspect("{{.Config.Env}}").contains("GREETING=hello"));
    assert_eq!(
        c.inspect("{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );
    assert_eq!(
        c.inspect("{{.HostConfig.Memory}}"),
        (64 * 1024 * 1024).to_string()
    );
    assert_eq!(
        c.inspect("{{index .Config.Labels \"capstan.test.probe\"}}"),
        "yes"
    );
    let names = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("id={old_id}"),
        "--format",
        "{{.Names}}",
    ]);
    assert!(names.is_empty(), "the old container is removed: {names}");
    c.name = ok["name"].as_str().unwrap().to_string();
}

#[test]
fn recreate_pulls_the_image_its_tag_names_now_from_the_registry() {
    let h = Harness::new();
    h.install("probe", &manifest("probe", PROBE_ALL));
    let infra = Infra::get();
    let registry = infra.var("REGISTRY");
    let tag = format!(
        "{registry}/capstan-test/app-{}:1",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // `app:1` is the test image, pushed; a container runs from it.
    docker(&["tag", infra.var("TEST_IMAGE"), &tag]);
    docker(&["push", "-q", &tag]);
    let v1 = docker(&["image", "inspect", "-f", "{{.Id}}", &tag]);
    let mut c = Container::run("cap-pull", &["--label", "capstan.test.probe=yes"], &tag);
    // A changed image is pushed as the same tag; the local tag goes back to the first
    // image, so only a pull can bring the new one.
    docker(&[
        "commit",
        "--change",
        "LABEL capstan.test.version=2",
        &c.name,
        &tag,
    ]);
    let v2 = docker(&["image", "inspect", "-f", "{{.Id}}", &tag]);
    assert_ne!(v1, v2);
    docker(&["push", "-q", &tag]);
    docker(&["tag", &v1, &tag]);

    let r = probe(
        &h,
        json!([{"op": "recreate", "device": "local", "container": c.name, "pull": true}]),
    );
    let ok = r[0].get("ok").unwrap_or_else(|| panic!("{}", r[0])).clone();
    c.name = ok["name"].as_str().unwrap().to_string();
    assert_eq!(ok["pulled"], true, "{ok}");
    assert!(ok["pull_error"].is_null(), "{ok}");
    assert_eq!(
        c.inspect("{{.Image}}"),
        v2,
        "the new container runs the pushed image"
    );
    assert_eq!(
        c.inspect("{{index .Config.Labels \"capstan.test.version\"}}"),
        "2"
    );
    assert_eq!(c.inspect("{{.State.Running}}"), "true");
    assert_eq!(docker(&["image", "inspect", "-f", "{{.Id}}", &tag]), v2);
    drop(c);
    docker(&["image", "rm", &tag]);
    forget_repo(&v1, tag.trim_end_matches(":1"));
}

#[test]
fn autoheal_restarts_an_unhealthy_labelled_container_backs_off_and_gives_up() {
    let h = Harness::new();
    let health = Infra::get().var("HEALTH_IMAGE");
    let sick = Container::run("cap-heal", &["--label", "capstan.autoheal=true"], health);
    let ignored = Container::run("cap-heal-optout", &[], health);
    let text =
        std::fs::read_to_string(crate::util::plugin::example_dir("autoheal").join("plugin.toml"))
            .unwrap()
            .replace("max_attempts = 5", "max_attempts = 2")
            .replace("backoff_secs = 60", "backoff_secs = 0");
    h.install_text_for("autoheal", &text, &[&sick.name, &ignored.name]);

    sick.wait_health("healthy", 20);
    ignored.wait_health("healthy", 20);
    let make_unhealthy = |c: &Container| {
        docker(&["exec", &c.name, "rm", "-f", "/tmp/healthy"]);
        c.wait_health("unhealthy", 20);
    };
    make_unhealthy(&sick);
    make_unhealthy(&ignored);

    let ignored_started = ignored.inspect("{{.State.StartedAt}}");
    for attempt in 1..=2 {
        let before = sick.inspect("{{.State.StartedAt}}");
        let r = h.run_event(
            "autoheal",
            TriggerEvent::Cron {
                schedule: "* * * * *".into(),
                scheduled_at: chrono::Utc::now(),
            },
        );
        assert!(r.succeeded(), "{}", r.render());
        let d = details(&r);
        assert_eq!(
            d["restarted"].as_array().unwrap().len(),
            1,
            "{}",
            r.render()
        );
        assert!(
            d["restarted"][0]
                .as_str()
                .unwrap()
                .contains(&format!("attempt {attempt}"))
        );
        assert_ne!(sick.inspect("{{.State.StartedAt}}"), before, "restarted");
        sick.wait_health("healthy", 20);
        make_unhealthy(&sick);
    }
    let r = h.run("autoheal", "");
    let d = details(&r);
    assert_eq!(
        d["restarted"].as_array().unwrap().len(),
        0,
        "{}",
        r.render()
    );
    assert!(
        d["gave_up"][0].as_str().unwrap().contains(&sick.name),
        "{}",
        r.render()
    );
    assert!(r.outcome.unwrap().summary.contains("gave up on"));
    assert_eq!(
        ignored.inspect("{{.State.StartedAt}}"),
        ignored_started,
        "no label, no restart"
    );
    assert_eq!(
        h.runtime
            .state()
            .keys("autoheal", "heal/local/")
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn redeploy_recreates_the_containers_of_an_image_from_the_local_image_when_the_pull_fails() {
    let h = Harness::new();
    let image = Infra::get().var("TEST_IMAGE");
    let app = Container::run("cap-redeploy", &["--label", "capstan.redeploy=true"], image);
    let bystander = Container::run("cap-redeploy-no", &[], image);
    h.install_example_for("redeploy", &[&app.name, &bystander.name]);
    let old = app.inspect("{{.Id}}");
    let bystander_id = bystander.inspect("{{.Id}}");
    let body = json!({"repository": {"repo_name": image.split(':').next().unwrap()}, "push_data": {"tag": "latest"}});
    let r = h.run_event(
        "redeploy",
        TriggerEvent::Webhook {
            delivery: None,
            hook: "redeploy".into(),
            headers: vec![],
            body: body.to_string().into_bytes(),
        },
    );
    assert!(r.succeeded(), "{}", r.render());
    let summary = &r.outcome.as_ref().unwrap().summary;
    assert!(summary.contains("recreated 1"), "{summary}");
    assert!(summary.contains("pull failed"), "{summary}");
    let new_id = app.inspect("{{.Id}}");
    assert_ne!(new_id, old);
    assert_eq!(app.inspect("{{.State.Running}}"), "true");
    assert_eq!(
        bystander.inspect("{{.Id}}"),
        bystander_id,
        "outside the label scope"
    );

    // The simple payload and a manual run work too.
    let r = h.run("redeploy", &json!({"image": image}).to_string());
    assert!(r.succeeded(), "{}", r.render());
    assert_ne!(app.inspect("{{.Id}}"), new_id);
}

#[test]
fn redeploy_rolls_back_when_the_new_container_fails_to_start() {
    let h = Harness::new();
    h.install_example("redeploy");
    let base = Infra::get().var("TEST_IMAGE");
    let tag = format!(
        "capstan-test/rollback-{}:latest",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ctx = tempfile::tempdir().unwrap();
    let build = |cmd: &str| {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {base}\nCMD {cmd}\n"),
        )
        .unwrap();
        docker(&["build", "-q", "-t", &tag, ctx.path().to_str().unwrap()]);
    };
    build(r#"["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]"#);
    let app = Container::run("cap-rollback", &["--label", "capstan.redeploy=true"], &tag);
    let old = app.inspect("{{.Id}}");
    // The "new version" exits at once with an error.
    build(r#"["/bin/sh", "-c", "exit 7"]"#);
    let r = h.run("redeploy", &tag);
    assert_eq!(r.status, Exit::Failed, "{}", r.render());
    let error = r.error.clone().unwrap();
    assert!(error.contains("rolled back"), "{error}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        app.inspect("{{.Id}}"),
        old,
        "the old container is back under its name"
    );
    assert_eq!(app.inspect("{{.State.Running}}"), "true");
    // No new container and no renamed-aside copy left behind.
    let leftovers = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("name={}", app.name),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(leftovers, app.name, "only the original container remains");
    let new_image = docker(&["images", "-q", &tag]);
    let from_new = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("ancestor={new_image}"),
        "--format",
        "{{.Names}}",
    ]);
    assert!(
        from_new.is_empty(),
        "no container of the broken image remains: {from_new}"
    );
    drop(app);
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &tag])
        .output();
}

#[test]
fn inventory_reports_the_devices_in_scope() {
    let h = Harness::new();
    h.install_example("inventory");
    let _c = Container::run("cap-inventory", &[], Infra::get().var("TEST_IMAGE"));
    let r = h.run("inventory", "");
    assert!(r.succeeded(), "{}", r.render());
    let d = details(&r);
    assert_eq!(d[0]["device"], "local");
    assert_eq!(d[0]["reachable"], true, "{d}");
    assert!(d[0]["running"].as_u64().unwrap() >= 1);
    assert!(d[0]["images"].as_u64().unwrap() >= 2);
    assert!(
        r.outcome
            .unwrap()
            .summary
            .starts_with("1 device(s): local: Docker ")
    );
    assert!(r.denials.is_empty());
}
