//! Docker events as a trigger, end to end: a real `capstan serve` watching the real
//! dockerd (on the local socket, and over a private sshd that the test cuts and
//! restores), containers killed with the docker CLI, runs read back from the history.
//! Every test scopes its plugin to its own containers, so tests sharing the daemon do
//! not see each other's events.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::docker::PrivateSshd;
use crate::triggers::{eventually, install_plugin, runs, token_of};
use crate::util::plugin::{Container, docker, example_dir};
use crate::util::*;

/// `trivial` with a Docker trigger on `events`, scoped to the containers `names` on
/// `device`, folding events for `debounce`.
fn watching(name: &str, device: &str, names: &[&str], events: &str, debounce: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "name = \"{name}\"\nversion = \"0.0.1\"\n\
         [[triggers.docker]]\nevents = [{events}]\ndebounce = \"{debounce}\"\n\
         [policy]\nEVENTS = 1\ndevices = [\"{device}\"]\n\
         [policy.containers]\nnames = [{}]\n",
        names.join(", ")
    )
}

/// The runs of `plugin` a Docker event started, oldest first.
fn docker_runs(data: &DataDir, plugin: &str) -> Vec<Value> {
    let mut v: Vec<Value> = runs(data, plugin)
        .into_iter()
        .filter(|r| r["trigger"]["kind"] == "docker")
        .collect();
    v.sort_by_key(|r| r["queued_at"].as_str().unwrap_or_default().to_string());
    v
}

/// Waits for `n` Docker-event runs of `plugin` that have ended, and returns them all.
fn wait_runs(data: &DataDir, plugin: &str, n: usize, secs: u64) -> Vec<Value> {
    let mut got = Vec::new();
    eventually(secs, &format!("{n} ended docker runs of {plugin}"), || {
        got = docker_runs(data, plugin);
        got.len() >= n && got.iter().all(|r| r["finished_at"].is_string())
    });
    got
}

/// `/metrics` of the running engine.
fn metrics(server: &Server, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let (status, body) = http(
        &server.addr,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the metric line starting with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the engine's event stream for `device` is open (or, `up = false`, is
/// being retried).
fn wait_stream(server: &Server, token: &str, device: &str, up: bool) {
    let line = format!("capstan_docker_event_stream_up{{device=\"{device}\"}}");
    let want = if up { 1.0 } else { 0.0 };
    eventually(30, &format!("{line} = {want}"), || {
        sample(&metrics(server, token), &line) == Some(want)
    });
}

fn id_of(c: &Container) -> String {
    c.inspect("{{.Id}}")
}

fn kill(c: &Container) {
    docker(&["kill", &c.name]);
}

/// Starts a killed container again and waits until it runs.
fn restart(c: &Container) {
    docker(&["start", &c.name]);
    let until = Instant::now() + Duration::from_secs(20);
    while c.inspect("{{.State.Running}}") != "true" {
        assert!(Instant::now() < until, "{} did not start again", c.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn test_image() -> &'static str {
    Infra::get().var("TEST_IMAGE")
}

#[test]
fn a_killed_container_is_one_run_and_a_burst_of_deaths_folds_into_one_run_with_its_count() {
    let data = DataDir::with_vault();
    let server = Server::start(&data);
    let token = token_of(&server);
    let inside = Container::run("capstan-events-in", &[], test_image());
    let outside = Container::run("capstan-events-out", &[], test_image());
    let out = install_plugin(
        &data,
        "trivial",
        &watching(
            "watcher",
            "local",
            &[&inside.name],
            "\"container:die\"",
            "8s",
        ),
    );
    assert!(out.contains("  docker container:die"), "{out}");
    wait_stream(&server, &token, "local", true);

    // The container outside the plugin's scope dies first: it never becomes a run.
    kill(&outside);
    kill(&inside);
    let first = wait_runs(&data, "watcher", 1, 30);
    assert_eq!(first.len(), 1, "{first:#?}");
    let t = &first[0]["trigger"];
    assert_eq!(t["device"], "local");
    assert_eq!(t["event"], "container:die");
    assert_eq!(t["actor"], id_of(&inside).as_str());
    assert_eq!(t["count"], 1);
    assert_eq!(first[0]["status"], "ok", "{:#}", first[0]);

    // Three deaths within the window (8 s: room for two restarts on a loaded machine):
    // one run that counts them.
    for _ in 0..3 {
        restart(&inside);
        kill(&inside);
    }
    let all = wait_runs(&data, "watcher", 2, 30);
    assert_eq!(all.len(), 2, "one run for the burst: {all:#?}");
    assert_eq!(all[1]["trigger"]["count"], 3, "{:#}", all[1]);
    assert!(
        docker_runs(&data, "watcher")
            .iter()
            .all(|r| r["trigger"]["actor"] == id_of(&inside).as_str()),
        "no run for the container outside the scope"
    );

    let m = metrics(&server, &token);
    assert!(
        sample(&m, "capstan_docker_events_total{device=\"local\"}").unwrap_or(0.0) >= 5.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "capstan_docker_event_runs_total{plugin=\"watcher\"}"),
        Some(2.0),
        "{m}"
    );
    server.stop();
}

#[test]
fn installs_are_refused_for_an_unknown_event_or_a_policy_without_events_naming_the_setting() {
    let data = DataDir::with_vault();
    let dir = data.path().join("src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        crate::util::plugin::wasm("trivial"),
        dir.join("plugin.wasm"),
    )
    .unwrap();
    let install = |manifest: &str| {
        std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
        data.capstan(&[
            "plugin",
            "install",
            dir.join("plugin.wasm").to_str().unwrap(),
        ])
    };

    let out = install(&watching(
        "typo",
        "local",
        &["x"],
        "\"container:die\", \"container:dye\"",
        "1s",
    ));
    assert_failure_says(&out, "triggers.docker[0].events[1]");
    assert_failure_says(&out, "`dye` is not an action");

    let out = install(
        "name = \"deaf\"\nversion = \"1\"\n[[triggers.docker]]\nevents = [\"container:die\"]\n\
         [policy]\nEVENTS = 0\ndevices = [\"local\"]\n",
    );
    assert_failure_says(&out, "policy.EVENTS");
    assert_failure_says(&out, "EVENTS=1");

    let out = install(
        "name = \"elsewhere\"\nversion = \"1\"\n[[triggers.docker]]\nevents = [\"container:die\"]\n\
         devices = [\"local\"]\n[policy]\ndevices = [\"prod-*\"]\n",
    );
    assert_failure_says(&out, "triggers.docker[0].devices[0]");

    let list = data.capstan(&["plugin", "list"]);
    assert_success(&list, "plugin list");
    for name in ["typo", "deaf", "elsewhere"] {
        assert!(!stdout(&list).contains(name), "{name} was installed");
    }
}

#[test]
fn an_engine_restart_does_not_replay_old_events_as_new_runs() {
    let data = DataDir::with_vault();
    let c = Container::run("capstan-events-restart", &[], test_image());
    let server = Server::start(&data);
    let token = token_of(&server);
    install_plugin(
        &data,
        "trivial",
        &watching("restarts", "local", &[&c.name], "\"container:die\"", "0s"),
    );
    wait_stream(&server, &token, "local", true);
    kill(&c);
    let before = wait_runs(&data, "restarts", 1, 30);
    assert_eq!(before.len(), 1);
    server.stop();

    restart(&c);
    let server = Server::start(&data);
    // The admin token of the first start stays valid.
    wait_stream(&server, &token, "local", true);
    // A new event after the restart is a run; the old one is not run again.
    kill(&c);
    let after = wait_runs(&data, "restarts", 2, 30);
    assert_eq!(after.len(), 2, "the old event ran again: {after:#?}");
    assert!(
        after[1]["queued_at"].as_str() > before[0]["finished_at"].as_str(),
        "{after:#?}"
    );
    server.stop();
}

#[test]
fn events_on_an_ssh_device_while_the_tunnel_is_cut_arrive_after_the_reconnect() {
    let infra = Infra::get();
    let mut sshd = PrivateSshd::start();
    let data = DataDir::with_vault();
    let port = sshd.port.to_string();
    assert_success(
        &data.capstan(&[
            "device",
            "add",
            "edge",
            "--kind",
            "ssh",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--user",
            infra.var("SSH_USER_KEY"),
            "--ssh-key-file",
            infra.var("SSH_KEY_ED25519"),
            "--host-key-file",
            infra.var("SSH_HOST_KEY_PUB"),
        ]),
        "device add edge",
    );
    let c = Container::run("capstan-events-ssh", &[], test_image());
    let server = Server::start(&data);
    let token = token_of(&server);
    install_plugin(
        &data,
        "trivial",
        &watching("remote", "edge", &[&c.name], "\"container:die\"", "0s"),
    );
    wait_stream(&server, &token, "edge", true);
    kill(&c);
    let first = wait_runs(&data, "remote", 1, 30);
    assert_eq!(first[0]["trigger"]["device"], "edge");

    // Cut the tunnel: sshd and its sessions go; the engine notices and retries.
    sshd.stop();
    wait_stream(&server, &token, "edge", false);
    restart(&c);
    kill(&c);
    let died_at = chrono::Utc::now();
    sshd.spawn();

    let all = wait_runs(&data, "remote", 2, 90);
    assert_eq!(all.len(), 2, "the event during the cut, once: {all:#?}");
    assert_eq!(all[1]["trigger"]["device"], "edge");
    assert_eq!(all[1]["trigger"]["actor"], id_of(&c).as_str());
    let queued: chrono::DateTime<chrono::Utc> =
        all[1]["queued_at"].as_str().unwrap().parse().unwrap();
    assert!(queued >= died_at - chrono::Duration::seconds(1), "{all:#?}");
    let m = metrics(&server, &token);
    assert!(
        sample(
            &m,
            "capstan_docker_event_stream_failures_total{device=\"edge\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "capstan_docker_event_stream_up{device=\"edge\"}"),
        Some(1.0),
        "{m}"
    );
    server.stop();
}

/// `capstan device add NAME --kind tls` at `host:port` with the test client certificate.
fn add_tls_device(data: &DataDir, name: &str, host: &str, port: &str) {
    let infra = Infra::get();
    let out = data.capstan(&[
        "device",
        "add",
        name,
        "--kind",
        "tls",
        "--host",
        host,
        "--port",
        port,
        "--tls-ca",
        infra.var("TLS_CA"),
        "--tls-cert",
        infra.var("TLS_CERT"),
        "--tls-key",
        infra.var("TLS_KEY"),
    ]);
    assert_success(&out, &format!("device add {name}"));
}

#[test]
fn plugins_share_one_stream_per_device_a_tls_device_delivers_and_an_unreachable_one_is_retried() {
    let infra = Infra::get();
    let data = DataDir::with_vault();
    add_tls_device(
        &data,
        "secure",
        infra.var("TLS_HOST"),
        infra.var("TLS_PORT"),
    );
    // A device nobody answers on: its stream is retried and shown as down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    add_tls_device(&data, "gone", "127.0.0.1", &closed);
    let c = Container::run("capstan-events-tls", &[], test_image());
    let server = Server::start(&data);
    let token = token_of(&server);
    // Two plugins on the TLS device (the same daemon behind a TLS endpoint), one of them
    // also on the local socket and the unreachable device: three streams in all.
    install_plugin(
        &data,
        "trivial",
        &watching("tls-only", "secure", &[&c.name], "\"container:die\"", "0s"),
    );
    install_plugin(
        &data,
        "trivial",
        &watching("both", "*", &[&c.name], "\"container:die\"", "0s"),
    );
    wait_stream(&server, &token, "secure", true);
    wait_stream(&server, &token, "local", true);
    wait_stream(&server, &token, "gone", false);
    kill(&c);
    let tls = wait_runs(&data, "tls-only", 1, 30);
    assert_eq!(tls[0]["trigger"]["device"], "secure", "{tls:#?}");
    let both = wait_runs(&data, "both", 2, 30);
    let mut devices: Vec<&str> = both
        .iter()
        .map(|r| r["trigger"]["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["local", "secure"], "{both:#?}");
    let m = metrics(&server, &token);
    let streams = m
        .lines()
        .filter(|l| l.starts_with("capstan_docker_event_stream_up{"))
        .count();
    assert_eq!(streams, 3, "one stream per device: {m}");
    assert!(
        sample(
            &m,
            "capstan_docker_event_stream_failures_total{device=\"gone\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    server.stop();
}

/// An example plugin's manifest with its container scope narrowed to `names` and
/// `edits` applied (`(from, to)` text replacements that must each apply).
fn example_for(name: &str, names: &[&str], edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(example_dir(name).join("plugin.toml")).unwrap();
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let mut all = vec![(
        "[policy.containers]\n".to_string(),
        format!("[policy.containers]\nnames = [{}]\n", names.join(", ")),
    )];
    all.extend(edits.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    for (from, to) in all {
        let next = text.replacen(&from, &to, 1);
        assert_ne!(next, text, "{name}'s manifest has {from:?}");
        text = next;
    }
    text
}

#[test]
fn autoheal_restarts_a_container_as_soon_as_docker_reports_it_unhealthy() {
    let data = DataDir::with_vault();
    let c = Container::run(
        "capstan-events-heal",
        &["--label", "capstan.autoheal=true"],
        Infra::get().var("HEALTH_IMAGE"),
    );
    c.wait_health("healthy", 30);
    let started = c.inspect("{{.State.StartedAt}}");
    let server = Server::start(&data);
    let token = token_of(&server);
    // The cron pass stays in the manifest but cannot fire during the test.
    let manifest = example_for(
        "autoheal",
        &[&c.name],
        &[("schedule = \"* * * * *\"", "schedule = \"0 0 1 1 *\"")],
    );
    install_plugin(&data, "autoheal", &manifest);
    wait_stream(&server, &token, "local", true);

    docker(&["exec", &c.name, "rm", "/tmp/healthy"]);
    let runs = wait_runs(&data, "autoheal", 1, 60);
    let r = &runs[0];
    assert_eq!(
        r["trigger"]["event"], "container:health_status: unhealthy",
        "{r:#}"
    );
    let summary = r["outcome"]["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("restarted 1"), "{r:#}");
    assert_ne!(c.inspect("{{.State.StartedAt}}"), started, "restarted");
    server.stop();
}

#[test]
fn crashloop_reports_a_container_that_keeps_dying() {
    let data = DataDir::with_vault();
    let c = Container::run(
        "capstan-events-loop",
        &["--label", "capstan.crashloop=true"],
        test_image(),
    );
    let server = Server::start(&data);
    let token = token_of(&server);
    let manifest = example_for(
        "crashloop",
        &[&c.name],
        &[("debounce = \"10s\"", "debounce = \"2s\"")],
    );
    install_plugin(&data, "crashloop", &manifest);
    wait_stream(&server, &token, "local", true);

    kill(&c);
    for _ in 0..2 {
        restart(&c);
        kill(&c);
    }
    let mut looping = None;
    eventually(60, "a crashloop run that reports the crash loop", || {
        looping = docker_runs(&data, "crashloop").into_iter().find(|r| {
            r["outcome"]["summary"]
                .as_str()
                .is_some_and(|s| s.contains("is crash-looping"))
        });
        looping.is_some()
    });
    let r = looping.unwrap();
    let summary = r["outcome"]["summary"].as_str().unwrap();
    assert!(summary.contains(&c.name), "{r:#}");
    assert!(summary.contains("3 deaths"), "{r:#}");
    // No channel named `ops` is configured here: the crash loop is still reported, with
    // why nobody was told.
    assert!(summary.contains("not notified (ops:"), "{r:#}");
    assert_eq!(r["status"], "ok", "{r:#}");
    server.stop();
}
