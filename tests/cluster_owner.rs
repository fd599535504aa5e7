//! What only a device's owner node does, seen from outside with three (or two)
//! `capstan serve --cluster …` processes on the real NATS cluster and the machine's
//! dockerd: every node has the default `local` device (the same daemon under the same
//! name), so exactly one node owns it.
//!
//! - Docker event triggers: each container event becomes one run in the whole cluster;
//!   after the owner is killed, the events from before anyone took its place are run
//!   by the new owner (resuming from the cursor the old one kept in NATS), and the new
//!   owner's events run once again.
//! - The `[[proxy]]` listener and `device check` on a node that does not own the
//!   device: the proxy answers 421 naming the owner and its API, the check goes through
//!   the owner.
//!
//! The tests take turns with the other cluster tests (`turn()`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::cluster::{Node, cluster_name, status_json, turn};
use crate::cluster_devices::owners;
use crate::triggers::{eventually, install_plugin, runs};
use crate::util::plugin::{Container, TEST_LABEL, docker};
use crate::util::*;

/// The lease time these tests run with (renewed every 2 s).
const LEASE: &str = "6s";

/// The node that owns `local` now, as `node`'s cluster status lists it.
fn local_owner(node: &Node) -> Option<String> {
    owners(node).get("local").cloned()
}

fn index_of(nodes: &[Node], name: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// `capstan_docker_event_stream_up{device="local"}` on `node`: 1 while its event stream
/// for `local` is open.
fn local_stream_up(node: &Node) -> bool {
    let auth = format!("Bearer {}", node.admin_token());
    let (status, body) = http(
        node.addr(),
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    body.lines()
        .any(|l| l == "capstan_docker_event_stream_up{device=\"local\"} 1")
}

/// The runs of `plugin` as `node` lists them (every node lists the cluster's runs), by
/// run id.
fn listed(node: &Node, plugin: &str) -> BTreeMap<String, Value> {
    runs(&node.data, plugin)
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r))
        .collect()
}

/// The container ids the runs were started for, each with how many runs it got.
fn per_container(records: &BTreeMap<String, Value>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in records.values() {
        let actor = r["trigger"]["actor"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *m.entry(actor).or_default() += 1;
    }
    m
}

/// Starts `n` containers carrying `label` (and the test label, for clean-up).
fn start_containers(prefix: &str, label: &str, n: usize) -> Vec<Container> {
    let image = Infra::get().var("TEST_IMAGE");
    (0..n)
        .map(|_| Container::run(prefix, &["--label", label], image))
        .collect()
}

/// Creates `n` containers like [`start_containers`] does, without starting them.
fn create_containers(prefix: &str, label: &str, n: usize) -> Vec<Container> {
    let image = Infra::get().var("TEST_IMAGE");
    (0..n)
        .map(|_| {
            let name = format!(
                "{prefix}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            docker(&[
                "create", "--name", &name, "--label", TEST_LABEL, "--label", label, image,
            ]);
            Container { name }
        })
        .collect()
}

/// When `local`'s owner took it, as `node`'s cluster status lists its lease.
fn local_lease_since(node: &Node) -> DateTime<Utc> {
    let v = status_json(node);
    let lease = v["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["device"] == "local"))
        .unwrap_or_else(|| panic!("cluster status lists no lease of local: {v}"));
    lease["since"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the lease of local has no since: {lease}"))
}

fn ids(cs: &[Container]) -> BTreeSet<String> {
    cs.iter().map(|c| c.inspect("{{.Id}}")).collect()
}

/// Waits until `node` lists `n` runs of `plugin`, all ended, then for a quiet second and
/// a half in which no more come: the runs.
fn settle(node: &Node, plugin: &str, n: usize, secs: u64) -> BTreeMap<String, Value> {
    eventually(secs, &format!("{n} ended runs of {plugin}"), || {
        let records = listed(node, plugin);
        records.len() >= n && records.values().all(|r| r["finished_at"].is_string())
    });
    // A run handed over twice would show up within this quiet window (a run starts within
    // a second of its event on this machine).
    let quiet = Instant::now();
    while quiet.elapsed().as_millis() < 1500 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    listed(node, plugin)
}

#[test]
fn each_docker_event_runs_once_in_the_cluster_even_while_a_killed_owner_is_not_yet_replaced() {
    let _turn = turn();
    let cluster = cluster_name();
    // Only this test's containers: a label of its own.
    let label = format!("org.capstan.test.cluster-events={cluster}");
    let manifest = format!(
        "name = \"watcher\"\nversion = \"0.0.1\"\n\
         [[triggers.docker]]\nevents = [\"container:start\"]\ndebounce = \"0s\"\n\
         [policy]\nEVENTS = 1\ndevices = [\"local\"]\n\
         [policy.containers]\nlabels = [\"{label}\"]\n"
    );
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::bare(&format!("n{i}"))).collect();
    // The default `local` device is made by the first start; the plugin that names it
    // is installed after.
    for n in &mut nodes {
        // The event streams' info lines say where a stream resumed.
        let log = "warn,capstan::trigger::docker::watch=info";
        n.start(
            &cluster,
            &[("CAPSTAN_CLUSTER_LEASE", LEASE), ("CAPSTAN_LOG", log)],
        );
        install_plugin(&n.data, "trivial", &manifest);
    }
    let mut owner = String::new();
    eventually(30, "one node owns local", || {
        owner = local_owner(&nodes[0]).unwrap_or_default();
        !owner.is_empty()
    });
    let first = index_of(&nodes, &owner);
    eventually(20, "the owner's event stream for local is open", || {
        local_stream_up(&nodes[first])
    });
    // Only the owner watches: the others have no stream open for local.
    for (i, n) in nodes.iter().enumerate() {
        if i != first {
            assert!(!local_stream_up(n), "{} watches local too", n.name);
        }
    }

    const N: usize = 5;
    let before = start_containers("capstan-cev", &label, N);
    let want = ids(&before);
    let records = settle(&nodes[0], "watcher", N, 45);
    let got = per_container(&records);
    assert!(
        records.values().all(|r| r["trigger"]["kind"] == "docker"
            && r["trigger"]["event"] == "container:start"
            && r["status"] == "ok"),
        "{records:#?}"
    );
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "one run per started container, none for others: {got:?}"
    );
    assert!(got.values().all(|n| *n == 1), "an event ran twice: {got:?}");
    eprintln!("{N} events from {owner}, one run each");

    // The owner dies, and at once (its lease lasts until 6 s after its last renewal, so
    // no other node can own local yet) more containers start: their events happen while
    // nobody watches local. (Created before, so that one `docker start` starts them.)
    const G: usize = 4;
    let gap = create_containers("capstan-cevgap", &label, G);
    let want_gap = ids(&gap);
    nodes[first].kill();
    let killed = Instant::now();
    let mut start = vec!["start"];
    start.extend(gap.iter().map(|c| c.name.as_str()));
    docker(&start);
    eprintln!(
        "{G} containers started {:.1}s after {owner} was killed",
        killed.elapsed().as_secs_f64()
    );
    // Another node takes local over and opens the stream.
    let live: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let mut next = String::new();
    eventually(40, "another node owns local", || {
        next = local_owner(&nodes[live[0]]).unwrap_or_default();
        !next.is_empty() && next != owner
    });
    let second = index_of(&nodes, &next);
    let taken = local_lease_since(&nodes[second]);
    eventually(20, "the new owner's event stream for local is open", || {
        local_stream_up(&nodes[second])
    });
    eprintln!(
        "local taken over by {next} and watched {:.1}s after {owner} was killed",
        killed.elapsed().as_secs_f64()
    );
    // Starting the stream at the daemon's present time would have missed them: they
    // all started before the new owner took local, and so before its stream started.
    for c in &gap {
        let started = c.inspect("{{.State.StartedAt}}");
        let at: DateTime<Utc> = started
            .parse()
            .unwrap_or_else(|e| panic!("StartedAt {started:?} of {}: {e}", c.name));
        assert!(
            at < taken,
            "container {} started at {at}, after {next} took local over at {taken}: the test \
             did not start it while local had no owner (a slow docker run?)",
            c.name
        );
    }
    // Each of those events runs once: the new owner resumed from the old one's cursor,
    // and the events it read again that had run already were dropped as duplicates.
    let deadline = Instant::now() + std::time::Duration::from_secs(45);
    loop {
        let got = per_container(&listed(&nodes[second], "watcher"));
        let missing: Vec<&String> = want_gap.iter().filter(|c| !got.contains_key(*c)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no run within 45 s for {} of the {G} containers started while local had no owner \
             (the new owner did not replay the gap): {missing:?}; runs: {got:?}",
            missing.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let records = settle(&nodes[second], "watcher", N + G, 45);
    let got = per_container(&records);
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        want.union(&want_gap).cloned().collect::<BTreeSet<_>>(),
        "{got:?}"
    );
    assert!(
        got.values().all(|n| *n == 1),
        "an event ran twice across the takeover: {got:?}"
    );
    let log = nodes[second].log.lock().unwrap().clone();
    assert!(
        log.contains("resumes where the device's previous owner stopped"),
        "{next} did not say it resumed local's events from the cursor:\n{log}"
    );
    eprintln!("{G} events of the ownerless gap run once each by {next}");

    // The new owner's own events run once again.
    const M: usize = 3;
    let after = start_containers("capstan-cev2", &label, M);
    let want_after = ids(&after);
    let records = settle(&nodes[second], "watcher", N + G + M, 45);
    let got = per_container(&records);
    let mut want_all = want.union(&want_gap).cloned().collect::<BTreeSet<_>>();
    want_all.extend(want_after.iter().cloned());
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        want_all,
        "{got:?}"
    );
    assert!(
        got.values().all(|n| *n == 1),
        "an event ran twice across the takeover: {got:?}"
    );
    assert!(
        records.values().all(|r| r["status"] == "ok"),
        "{records:#?}"
    );
    for i in live {
        assert!(
            nodes[i].stop().success(),
            "{} stopped cleanly",
            nodes[i].name
        );
    }
    drop(before);
    drop(gap);
    drop(after);
    // Nothing is left with the test's label.
    let left = docker(&["ps", "-aq", "--filter", &format!("label={label}")]);
    assert!(left.trim().is_empty(), "containers left: {left}");
}

/// A `[[proxy]]` for `local` on 127.0.0.1:`port` behind a token with the policy
/// `env` (socket-proxy variables), as a config file in `node`'s directory: its path.
pub(crate) fn proxy_config(node: &Node, port: u16, token: &str, env: &str) -> std::path::PathBuf {
    let dir = node.data.path();
    let policy = dir.join("proxy.env");
    std::fs::write(&policy, env).unwrap();
    let token_file = dir.join("proxy.token");
    std::fs::write(&token_file, token).unwrap();
    let cfg = dir.join("capstan.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[proxy]]\ndevice = \"local\"\npolicy = \"{}\"\nlisten = \"tcp://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            policy.display(),
            token_file.display()
        ),
    )
    .unwrap();
    cfg
}

/// `GET /_ping` on the proxy at `addr`, with `token` if given: status and body.
fn ping(addr: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(addr, "GET", "/_ping", &headers, b"")
}

/// `capstan device check local --json` on `node`: the report.
fn check_local(node: &Node) -> Value {
    let out = node.data.capstan(&["device", "check", "local", "--json"]);
    let text = stdout(&out);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", stderr(&out)));
    match v {
        Value::Array(mut a) if a.len() == 1 => a.remove(0),
        other => other,
    }
}

#[test]
fn a_proxy_on_a_node_that_does_not_own_its_device_names_the_owner_and_device_check_goes_through_it()
{
    let _turn = turn();
    let cluster = cluster_name();
    let token = "proxy-token-for-the-cluster-test";
    let ports = [free_port(), free_port()];
    let mut nodes: Vec<Node> = (1..=2).map(|i| Node::bare(&format!("n{i}"))).collect();
    // An operator token for other devices only, on each node.
    let scoped: Vec<String> = nodes
        .iter()
        .map(|n| {
            let out = n.data.capstan(&[
                "token",
                "create",
                "elsewhere",
                "--role",
                "operator",
                "--devices",
                "web-*",
            ]);
            assert_success(&out, "token create");
            stdout(&out).trim().to_string()
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        let cfg = proxy_config(n, ports[i], token, "CONTAINERS=1\nINFO=1\n");
        let cfg = cfg.to_str().unwrap().to_string();
        n.start(
            &cluster,
            &[("CAPSTAN_CLUSTER_LEASE", LEASE), ("CAPSTAN_CONFIG", &cfg)],
        );
    }
    let proxy = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut owner_name = String::new();
    eventually(30, "one node owns local", || {
        owner_name = local_owner(&nodes[0]).unwrap_or_default();
        !owner_name.is_empty()
    });
    let owner = index_of(&nodes, &owner_name);
    let other = 1 - owner;

    // The owner's proxy serves; the other's names the owner and where its API is.
    assert_eq!(ping(&proxy(owner), Some(token)), (200, "OK".to_string()));
    let (status, body) = ping(&proxy(other), Some(token));
    assert_eq!(status, 421, "{body}");
    let message = serde_json::from_str::<Value>(&body).unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains(&format!(
            "node {owner_name} (its API at {})",
            nodes[owner].addr()
        )) && message.contains(&format!(
            "node {} does not own device local",
            nodes[other].name
        )),
        "{message}"
    );
    // The attack: a client without the token learns nothing about the cluster.
    let (status, body) = ping(&proxy(other), None);
    assert_eq!(status, 401, "{body}");
    assert!(
        !body.contains(&owner_name) && !body.contains("own"),
        "{body}"
    );
    let (status, body) = ping(&proxy(other), Some("wrong"));
    assert_eq!(status, 401, "{body}");

    // A device check on the node that does not own local goes through the owner; on
    // the owner it is its own.
    let r = check_local(&nodes[other]);
    assert_eq!(r["connected"], true, "{r:#}");
    assert_eq!(r["owner"], owner_name.as_str(), "{r:#}");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert_eq!(steps, ["owner", "ping", "version", "info"], "{r:#}");
    assert!(
        r["docker"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{r:#}"
    );
    let text = stdout(&nodes[other].data.capstan(&["device", "check", "local"]));
    assert!(text.contains(&format!("owner node {owner_name}")), "{text}");
    // The attack on the check: a token that does not see local gets 404 on the node
    // that does not own it, before anything is sent to the owner.
    let (status, body) = http(
        nodes[other].addr(),
        "GET",
        "/api/docker/check/local",
        &[("Authorization", &format!("Bearer {}", scoped[other]))],
        b"",
    );
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains(&owner_name), "{body}");
    let r = check_local(&nodes[owner]);
    assert_eq!(r["connected"], true, "{r:#}");
    assert!(r.get("owner").is_none(), "{r:#}");

    // The owner dies: the other node takes local over, and its proxy serves now.
    nodes[owner].kill();
    eventually(40, "the other node owns local and its proxy serves", || {
        local_owner(&nodes[other]).as_deref() == Some(nodes[other].name.as_str())
            && ping(&proxy(other), Some(token)).0 == 200
    });
    let r = check_local(&nodes[other]);
    assert!(r.get("owner").is_none() && r["connected"] == true, "{r:#}");
    assert!(nodes[other].stop().success());
}
