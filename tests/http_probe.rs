//! The http-probe example plugin against a real container serving HTTP (busybox `httpd`
//! in the test image) on its own Docker network, reached by the engine at its bridge
//! address through the outbound allow-list: the test breaks the service and mends it,
//! and checks the probes, the restarts, the give-up and the recovery.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use capstan::plugin::RunReport;
use serde_json::Value;

use crate::util::Infra;
use crate::util::plugin::{Container, Harness, TEST_LABEL, docker, example_dir};

/// A Docker network with a subnet of its own (a fixed `--ip` needs one), removed when
/// dropped.
struct Net {
    name: String,
    /// `10.x.y.` — addresses are this and a last number.
    prefix: String,
}

impl Net {
    /// A network on a free /24 under 10.200.0.0/13: tries random ones until dockerd
    /// accepts one that overlaps no other network.
    fn create() -> Net {
        let name = format!(
            "cap-probe-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let socket = Infra::get().var("DOCKER_SOCKET");
        let mut last = String::new();
        for _ in 0..20 {
            let r = uuid::Uuid::new_v4().as_u128();
            let prefix = format!("10.{}.{}.", 200 + (r % 8) as u8, (r >> 8) as u8);
            let out = Command::new("docker")
                .env("DOCKER_HOST", format!("unix://{socket}"))
                .args(["network", "create", "--label", TEST_LABEL, "--subnet"])
                .arg(format!("{prefix}0/24"))
                .arg(&name)
                .output()
                .expect("run docker");
            if out.status.success() {
                return Net { name, prefix };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        panic!("no free subnet for a test network after 20 tries: {last}");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let socket = Infra::get().var("DOCKER_SOCKET");
        let _ = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{socket}"))
            .args(["network", "rm", &self.name])
            .output();
    }
}

/// What the container runs: httpd serving /www, whose `health` file says `healthy`
/// unless `/broken` exists — so a restart mends a removed file, and not a broken one.
const SERVE: &str = "mkdir -p /www; [ -e /broken ] || echo healthy > /www/health; \
                     trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait";

/// A container serving HTTP at `<net>.10:8080`, labelled for the probe with `labels`.
fn web(net: &Net, labels: &[(&str, &str)]) -> (Container, String) {
    let ip = format!("{}10", net.prefix);
    let name = format!(
        "cap-web-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("capstan.probe.url=http://{ip}:8080/health");
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        TEST_LABEL,
        "--network",
        &net.name,
        "--ip",
        &ip,
        "--label",
        &url,
    ];
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for l in &labels {
        args.extend(["--label", l.as_str()]);
    }
    let image = Infra::get().var("TEST_IMAGE");
    args.extend([image, "sh", "-c", SERVE]);
    docker(&args);
    (Container { name }, ip)
}

/// The status `GET /health` answers on `ip:8080` now, or `None` when nothing answers.
fn status_of(ip: &str) -> Option<u16> {
    let addr = format!("{ip}:8080").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

/// Waits (at most 10 s) until the container answers `want`.
fn until_answers(ip: &str, want: u16) {
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < until {
        last = status_of(ip);
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{ip}:8080 answers {last:?}, not {want}, after 10 s");
}

/// The example's manifest, reaching `ip:8080`, with `config` lines replaced
/// (`("threshold", "1")`, …).
fn manifest(outbound: &str, config: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(example_dir("http-probe").join("plugin.toml")).unwrap();
    let shipped = "\noutbound = []\n";
    assert!(
        text.contains(shipped),
        "the example allows nothing by default"
    );
    text = text.replacen(shipped, &format!("\noutbound = [{outbound}]\n"), 1);
    for (key, value) in config {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in the example's [config]"))
            .to_string();
        text = text.replacen(&format!("\n{line}\n"), &format!("\n{key} = {value}\n"), 1);
    }
    text
}

fn run(h: &Harness) -> (RunReport, Value) {
    let r = h.run("http-probe", "");
    assert!(r.succeeded(), "{}", r.render());
    let o = r.outcome.as_ref().unwrap();
    let details = serde_json::from_str(&o.details).unwrap();
    (r, details)
}

fn summary(r: &RunReport) -> &str {
    &r.outcome.as_ref().unwrap().summary
}

/// Log messages with their fields, one line each.
fn log_lines(r: &RunReport) -> Vec<String> {
    r.logs
        .iter()
        .map(|l| {
            let fields: String = l.fields.iter().map(|(k, v)| format!(" {k}={v}")).collect();
            format!("{}{fields}", l.message)
        })
        .collect()
}

fn started_at(c: &Container) -> String {
    c.inspect("{{.State.StartedAt}}")
}

#[test]
fn http_probe_restarts_a_container_after_repeated_failures_and_tells_when_it_recovers() {
    let net = Net::create();
    let (c, ip) = web(
        &net,
        &[
            ("capstan.probe.body", "healthy"),
            ("capstan.probe.threshold", "2"),
        ],
    );
    let h = Harness::new();
    let text = manifest(&format!("\"http://{ip}:8080\""), &[("backoff_secs", "0")]);
    h.install_text_for("http_probe", &text, &[&c.name]);
    until_answers(&ip, 200);

    // Healthy: probed, latency recorded, nothing done.
    let (r, d) = run(&h);
    assert_eq!(summary(&r), "probed 1, 1 healthy", "{}", r.render());
    let p = &d["probes"][0];
    assert_eq!(p["container"], c.name.as_str(), "{d}");
    assert_eq!(
        (p["healthy"].clone(), p["status"].clone()),
        (true.into(), 200.into())
    );
    assert!(p["latency_ms"].as_f64().unwrap() > 0.0, "{d}");
    let probed = log_lines(&r);
    assert!(
        probed.iter().any(|l| l.starts_with("probed")
            && l.contains("latency_ms=")
            && l.contains("status=200")),
        "{probed:?}"
    );
    let call = r
        .host_calls
        .iter()
        .find(|c| c.op == "http.request")
        .expect("the request is a host call");
    assert!(call.request.contains(&ip), "{call:?}");

    // Broken (the file is gone: 404): one failure is below the threshold ...
    let started = started_at(&c);
    docker(&["exec", &c.name, "rm", "/www/health"]);
    until_answers(&ip, 404);
    let (r, d) = run(&h);
    assert!(summary(&r).contains("failing 1"), "{}", r.render());
    assert!(!summary(&r).contains("restarted"), "{}", r.render());
    assert_eq!(d["probes"][0]["failures"], 1, "{d}");
    assert!(
        d["probes"][0]["error"].as_str().unwrap().contains("404"),
        "{d}"
    );
    assert_eq!(started_at(&c), started, "not restarted yet");

    // ... the second restarts it.
    let (r, d) = run(&h);
    assert!(summary(&r).contains("restarted 1"), "{}", r.render());
    assert_eq!(
        d["restarted"][0],
        format!("local/{} (attempt 1)", c.name),
        "{d}"
    );
    assert_ne!(started_at(&c), started, "restarted");

    // The restart wrote the file again: the next probe sees it recover and tells.
    until_answers(&ip, 200);
    let (r, d) = run(&h);
    assert!(summary(&r).contains("recovered 1"), "{}", r.render());
    assert!(
        d["recovered"][0]
            .as_str()
            .unwrap()
            .contains("after 1 restart"),
        "{d}"
    );
    let told = log_lines(&r);
    assert!(
        told.iter()
            .any(|l| l.contains("could not notify ops") && l.contains("recovered")),
        "a notification the engine refuses is logged: {told:?}"
    );
    // Recovered is said once: the container is forgotten.
    let (r, _) = run(&h);
    assert_eq!(summary(&r), "probed 1, 1 healthy", "{}", r.render());
    drop(c);
}

#[test]
fn http_probe_gives_up_after_its_restart_limit_and_tells_once_and_again_on_recovery() {
    let net = Net::create();
    let (c, ip) = web(&net, &[("capstan.probe.threshold", "1")]);
    let h = Harness::new();
    let text = manifest(
        &format!("\"http://{ip}:8080\""),
        &[("backoff_secs", "0"), ("max_restarts", "1")],
    );
    h.install_text_for("http_probe", &text, &[&c.name]);
    until_answers(&ip, 200);

    // Broken in a way a restart does not mend.
    docker(&[
        "exec",
        &c.name,
        "sh",
        "-c",
        "touch /broken && rm /www/health",
    ]);
    until_answers(&ip, 404);
    let started = started_at(&c);
    let (r, _) = run(&h);
    assert!(summary(&r).contains("restarted 1"), "{}", r.render());
    let restarted = started_at(&c);
    assert_ne!(restarted, started);
    until_answers(&ip, 404);

    // Still failing after the one restart allowed: given up, and told.
    let (r, d) = run(&h);
    assert!(summary(&r).contains("gave up on 1"), "{}", r.render());
    assert!(
        summary(&r).contains(&format!("gave up on local/{} (after 1 restarts)", c.name)),
        "the summary names it, for a run-outcome trigger's `outcome` match: {}",
        summary(&r)
    );
    assert_eq!(d["gave_up"].as_array().unwrap().len(), 1, "{d}");
    let lines = log_lines(&r);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("gave up on a container")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("could not notify ops (http-probe gave up")),
        "{lines:?}"
    );
    assert_eq!(started_at(&c), restarted, "no restart past the limit");

    // Given up: probed, not restarted, not told again.
    let (r, _) = run(&h);
    assert!(summary(&r).contains("gave up on 1"), "{}", r.render());
    assert!(
        !log_lines(&r).iter().any(|l| l.contains("notify")),
        "told once"
    );
    assert_eq!(started_at(&c), restarted, "no restart past the limit");

    // Mended by hand: it recovers, and that is told.
    docker(&[
        "exec",
        &c.name,
        "sh",
        "-c",
        "rm /broken && echo healthy > /www/health",
    ]);
    until_answers(&ip, 200);
    let (r, d) = run(&h);
    assert!(summary(&r).contains("recovered 1"), "{}", r.render());
    assert!(
        d["recovered"][0].as_str().unwrap().contains("given up on"),
        "{d}"
    );
    drop(c);
}

#[test]
fn a_probe_the_allow_list_refuses_is_reported_and_never_restarts_the_container() {
    let net = Net::create();
    let (c, ip) = web(&net, &[("capstan.probe.threshold", "1")]);
    let h = Harness::new();
    // As shipped (nothing allowed), and with a wildcard, which never reaches a private
    // address: the probe is refused before anything is sent.
    for outbound in ["", "\"http://*:*\""] {
        let text = manifest(outbound, &[("backoff_secs", "0")]);
        h.install_text_for("http_probe", &text, &[&c.name]);
        until_answers(&ip, 200);
        docker(&["exec", &c.name, "rm", "-f", "/www/health"]);
        let started = started_at(&c);
        for _ in 0..2 {
            let (r, d) = run(&h);
            assert!(summary(&r).contains("problems 1"), "{}", r.render());
            let problem = d["problems"][0].as_str().unwrap();
            assert!(
                problem.contains("not probed") && problem.contains("denied"),
                "{d}"
            );
            assert!(
                problem.contains(&format!("http://{ip}:8080")),
                "names the entry to add: {d}"
            );
            assert!(d["probes"].as_array().unwrap().is_empty(), "{d}");
        }
        assert_eq!(
            started_at(&c),
            started,
            "a refused probe never restarts anything"
        );
        docker(&["exec", &c.name, "sh", "-c", "echo healthy > /www/health"]);
    }
}
