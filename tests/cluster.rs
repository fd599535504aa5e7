//! Cluster mode against the real three-node NATS JetStream cluster `scripts/testinfra`
//! starts (`NATS_URLS`): three `capstan serve --cluster …` processes, each with its own
//! data directory and the same trivial plugin installed, show that every accepted webhook
//! delivery runs once in the cluster under the run id its 202 answered, that every node
//! lists every run with the same record (the history stream), that a node refuses
//! unsigned and oversized deliveries before anything reaches NATS, that a node killed
//! mid-run leaves its runs to the others (one record, the retry's), and what
//! `capstan cluster status` tells. Cron firing once per second across the nodes is
//! shown by tests/cluster_faults.rs, with the engines in containers.
//!
//! Each test uses a cluster name of its own (`CAPSTAN_CLUSTER_NAME`), so its runs stream
//! and node bucket are its own; the tests take turns (three engines each on two cores)
//! with each other and with the other cluster tests (`turn()`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::triggers::{eventually, generated_secret, install, runs, sign};
use crate::util::*;

/// One cluster test at a time.
static TURN: Mutex<()> = Mutex::new(());

pub(crate) fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A GitHub-style hook. Its deliveries are told apart by their delivery id only (the
/// kill test sends the same body many times), so the cluster's duplicate check is the
/// one that counts.
pub(crate) const MANIFEST: &str = r#"
name = "clustered"
version = "1"

[[triggers.webhook]]
name = "gh"
auth = "hmac-sha256"
delivery_header = "X-GitHub-Delivery"
replay = "allow"
"#;

/// A cron trigger firing every second (tests/cluster_faults.rs runs it on three engines).
pub(crate) const CRON_MANIFEST: &str = r#"
name = "ticker"
version = "1"

[[triggers.cron]]
schedule = "* * * * * *"
"#;

/// One engine of a test cluster: its data directory (kept across a kill and restart),
/// the hook secret its install generated, and the running process.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) data: DataDir,
    secret: Option<String>,
    server: Option<Server>,
    pub(crate) log: Arc<Mutex<String>>,
}

impl Node {
    /// A data directory with a vault and nothing else.
    pub(crate) fn bare(name: &str) -> Node {
        Node {
            name: name.to_string(),
            data: DataDir::with_vault(),
            secret: None,
            server: None,
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    /// A data directory with a vault and `manifest` installed (with the trivial plugin).
    fn new(name: &str, manifest: &str) -> Node {
        let data = DataDir::with_vault();
        let out = install(&data, manifest);
        let secret = manifest
            .contains("[[triggers.webhook]]")
            .then(|| generated_secret(&out, "gh"));
        Node {
            name: name.to_string(),
            data,
            secret,
            server: None,
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    /// Starts `serve --cluster NATS_URLS` as node `name` of cluster `cluster`.
    pub(crate) fn start(&mut self, cluster: &str, env: &[(&str, &str)]) {
        let urls = nats_urls();
        let mut server = Server::start_with(&self.data, |c| {
            c.args(["--cluster", urls])
                .env("CAPSTAN_CLUSTER_NODE_NAME", &self.name)
                .env("CAPSTAN_CLUSTER_NAME", cluster)
                // These nodes are each set up on their own (a vault and key of their own,
                // the plugin installed on each): runs, leases and history are under test
                // here, shared configuration in tests/cluster_state.rs.
                .env("CAPSTAN_CLUSTER_SHARED_STATE", "false");
            for (k, v) in env {
                c.env(k, v);
            }
        });
        assert!(
            server
                .banner
                .contains(&format!("cluster node {} on NATS", self.name)),
            "serve --cluster did not say it joined:\n{}",
            server.banner
        );
        // The log is read as it comes (a full pipe would stall the engine).
        let mut err = server.child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        self.server = Some(server);
    }

    pub(crate) fn addr(&self) -> &str {
        &self.server.as_ref().expect("the node runs").addr
    }

    /// The admin token its first start printed.
    pub(crate) fn admin_token(&self) -> String {
        self.server.as_ref().expect("the node runs").admin_token()
    }

    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
        let mut s = self.server.take().expect("the node runs");
        unsafe_kill(s.child.id() as i32, 9);
        s.child.wait().unwrap();
        std::mem::forget(s);
    }

    /// SIGTERM, and the exit status.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        self.server.take().expect("the node runs").stop()
    }

    /// A signed delivery with `delivery` id and `body` to this node: the status.
    fn deliver(&self, delivery: &str, body: &[u8]) -> u16 {
        let secret = self.secret.as_deref().expect("the node has hook gh");
        deliver_to(self.addr(), secret, delivery, body)
    }
}

/// A delivery to hook `gh` of [`MANIFEST`] at `addr`, signed with `secret`, with
/// `delivery` id and `body`: the status.
pub(crate) fn deliver_to(addr: &str, secret: &str, delivery: &str, body: &[u8]) -> u16 {
    delivered(addr, secret, delivery, body).0
}

/// [`deliver_to`]: the status and the answer's body.
pub(crate) fn delivered(addr: &str, secret: &str, delivery: &str, body: &[u8]) -> (u16, String) {
    let sig = format!("sha256={}", sign(secret, body));
    http(
        addr,
        "POST",
        "/hooks/gh",
        &[
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", delivery),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

/// A cluster name no other test (or run) uses.
pub(crate) fn cluster_name() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Three nodes `n1`..`n3` with `manifest` installed, started in cluster `cluster`.
fn three(manifest: &str, cluster: &str, env: &[(&str, &str)]) -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::new(&format!("n{i}"), manifest))
        .collect();
    for n in &mut nodes {
        n.start(cluster, env);
    }
    nodes
}

/// The plugin's runs as `nodes` list them, by run id, once every node lists the same
/// records (the same JSON), all final, and `done` holds for them (up to `secs`).
fn agreed_runs(
    nodes: &[&Node],
    plugin: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    agreed(&names, |i| runs(&nodes[i].data, plugin), secs, what, done)
}

/// The runs the nodes `names` list (`list(i)`: node `i`'s), by run id, once every node
/// lists the same records (the same JSON), all final, and `done` holds for them (up
/// to `secs`).
pub(crate) fn agreed(
    names: &[String],
    list: impl Fn(usize) -> Vec<Value>,
    secs: u64,
    what: &str,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut lists: Vec<BTreeMap<String, Value>> = (0..names.len())
            .map(|i| {
                list(i)
                    .into_iter()
                    .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r))
                    .collect()
            })
            .collect();
        let differ: Vec<String> = lists
            .iter()
            .zip(names)
            .filter(|(l, _)| **l != lists[0])
            .map(|(l, n)| format!("{n} lists {} runs", l.len()))
            .collect();
        let first = &lists[0];
        if differ.is_empty() && first.values().all(is_final) && done(first) {
            return lists.swap_remove(0);
        }
        assert!(
            Instant::now() < until,
            "not within {secs} s: {what}: {} runs on {}, not final {}; differing: {differ:?}",
            first.len(),
            names[0],
            first.values().filter(|r| !is_final(r)).count()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs node `node`'s own metrics count as taken from the runs stream.
fn taken(node: &Node) -> u64 {
    let server = node.server.as_ref().expect("the node runs");
    let (status, text) = http(
        &server.addr,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {}", server.admin_token()))],
        b"",
    );
    assert_eq!(status, 200, "{text}");
    metric(
        &text,
        &format!("capstan_cluster_runs_taken_total{{node=\"{}\"}}", node.name),
    )
}

/// A sample's value in a metrics text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

pub(crate) fn is_final(r: &Value) -> bool {
    !matches!(r["status"].as_str(), Some("queued" | "running"))
}

fn logs_of(r: &Value) -> String {
    r["logs"]["lines"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|x| x["message"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn every_webhook_delivery_answered_202_is_run_once_across_three_nodes() {
    let _turn = turn();
    let cluster = cluster_name();
    // Each node keeps every run of the cluster: more than the default 500 per plugin.
    let nodes = three(
        MANIFEST,
        &cluster,
        &[("CAPSTAN_RUNS_KEEP_PER_PLUGIN", "10000")],
    );
    const N: usize = 600;
    // Delivery id → the run id its 202 answered.
    let mut accepted = BTreeMap::new();
    let started = Instant::now();
    for i in 0..N {
        let node = &nodes[i % 3];
        let id = format!("d-{i}");
        let (status, run) = deliver_for_id(node, &id, format!("{{\"n\":{i}}}").as_bytes());
        assert_eq!(status, 202, "delivery {id} to {}", node.name);
        accepted.insert(id, run);
    }
    let took = started.elapsed();
    // The same delivery again, to another node: the cluster already has it, and answers
    // with the first acceptance's run id.
    for (d, node) in [("d-0", 1), ("d-3", 2), ("d-599", 0)] {
        let (status, run) = deliver_for_id(&nodes[node], d, b"{}");
        assert_eq!(status, 202, "{d} again");
        assert_eq!(run, accepted[d], "{d} again answers its first run id");
    }
    // `?wait=true` on a node answers once the run's end is in its history, whichever
    // node ran it.
    for node in &nodes {
        let d = format!("w-{}", node.name);
        let (status, body) = deliver_waiting(node, &d);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ok", "{body}");
        accepted.insert(d, body["run_id"].as_str().unwrap().to_string());
    }

    let all: Vec<&Node> = nodes.iter().collect();
    let records = agreed_runs(&all, "clustered", 90, "every node lists every run", |m| {
        m.len() >= accepted.len()
    });
    // One record per run id, under the id the 202 answered, ok.
    let answered: BTreeMap<String, String> = accepted
        .iter()
        .map(|(d, run)| (run.clone(), d.clone()))
        .collect();
    assert_eq!(
        answered.len(),
        accepted.len(),
        "each delivery has its own run id"
    );
    let recorded: BTreeMap<String, String> = records
        .iter()
        .map(|(id, r)| {
            (
                id.clone(),
                r["trigger"]["delivery"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        recorded, answered,
        "the recorded runs are the accepted deliveries under their answered ids"
    );
    assert!(
        records.values().all(|r| r["status"] == "ok"),
        "every run ended ok"
    );
    let per_node = nodes.iter().map(taken).collect::<Vec<_>>();
    assert_eq!(
        per_node.iter().sum::<u64>(),
        accepted.len() as u64,
        "each run was taken once: {per_node:?}"
    );
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "the runs are spread over the nodes: {per_node:?}"
    );
    let ran_on: BTreeSet<&str> = records
        .values()
        .filter_map(|r| r["node"].as_str())
        .collect();
    assert!(
        ran_on.len() >= 2,
        "the records name the nodes that ran them: {ran_on:?}"
    );
    eprintln!(
        "{N} deliveries answered in {:.2}s; runs per node: {per_node:?}",
        took.as_secs_f64(),
    );
}

/// A delivery to `node` as [`Node::deliver`]: the status and the run id answered.
fn deliver_for_id(node: &Node, delivery: &str, body: &[u8]) -> (u16, String) {
    let secret = node.secret.as_deref().expect("the node has hook gh");
    let sig = format!("sha256={}", sign(secret, body));
    let (status, text) = http(
        node.addr(),
        "POST",
        "/hooks/gh",
        &[
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", delivery),
            ("Content-Type", "application/json"),
        ],
        body,
    );
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let run = v["run_id"].as_str().unwrap_or_default().to_string();
    if status == 202 {
        assert!(
            run.parse::<uuid::Uuid>().is_ok(),
            "202 without a run id: {text}"
        );
    }
    (status, run)
}

/// A delivery to `node` with `?wait=true`: the status and the answer.
fn deliver_waiting(node: &Node, delivery: &str) -> (u16, Value) {
    let secret = node.secret.as_deref().expect("the node has hook gh");
    let body = b"{}";
    let sig = format!("sha256={}", sign(secret, body));
    let (status, text) = http(
        node.addr(),
        "POST",
        "/hooks/gh?wait=true",
        &[
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", delivery),
            ("Content-Type", "application/json"),
        ],
        body,
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The attack on a cluster node's webhook: no signature, a wrong one, another node's
/// secret, a signed body over the hook's limit. Each is refused before anything reaches
/// NATS: the runs stream stays empty, nothing runs, and the refused delivery ids stay
/// free (the stream's duplicate window would swallow a later genuine delivery under an
/// id a refused one had published).
#[test]
fn a_cluster_node_refuses_unsigned_wrongly_signed_and_oversized_deliveries_and_publishes_none() {
    let _turn = turn();
    let cluster = cluster_name();
    let mut nodes = three(MANIFEST, &cluster, &[]);
    let body = br#"{"n":1}"#;
    let other = nodes[1].secret.clone().unwrap();
    let big = vec![b'x'; (1 << 20) + 1];
    let big_sig = format!("sha256={}", sign(nodes[0].secret.as_deref().unwrap(), &big));
    let other_sig = format!("sha256={}", sign(&other, body));
    let cases: [(&str, Option<&str>, &[u8], u16); 4] = [
        ("a-1", None, body, 401),
        ("a-2", Some("sha256=00"), body, 401),
        ("a-3", Some(&other_sig), body, 401),
        ("a-4", Some(&big_sig), &big, 413),
    ];
    for (id, sig, body, want) in cases {
        let mut headers = vec![
            ("X-GitHub-Delivery", id),
            ("Content-Type", "application/json"),
        ];
        if let Some(sig) = sig {
            headers.push(("X-Hub-Signature-256", sig));
        }
        let (status, resp) = http(nodes[0].addr(), "POST", "/hooks/gh", &headers, body);
        assert_eq!(status, want, "delivery {id}: {resp}");
    }
    let v = status_json(&nodes[0]);
    assert_eq!(v["runs"]["messages"], 0, "nothing was published: {v}");
    // The same ids, genuinely signed now, each run once: none was taken by a refusal.
    for id in ["a-1", "a-2", "a-3", "a-4"] {
        assert_eq!(nodes[0].deliver(id, body), 202, "delivery {id}");
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let records = agreed_runs(&all, "clustered", 60, "the four genuine deliveries", |m| {
        m.len() >= 4
    });
    let ran: BTreeSet<&str> = records
        .values()
        .map(|r| r["trigger"]["delivery"].as_str().unwrap())
        .collect();
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(ran, BTreeSet::from(["a-1", "a-2", "a-3", "a-4"]));
    assert!(records.values().all(|r| r["status"] == "ok"), "{records:?}");
    for n in &mut nodes {
        assert!(n.stop().success(), "node {} stopped cleanly", n.name);
    }
}

#[test]
fn a_node_killed_mid_run_leaves_its_runs_to_the_others() {
    let _turn = turn();
    let cluster = cluster_name();
    // Runs that take half a second, two at once per node, and a short ack deadline
    // (kept alive while a node holds a run). n3 is killed a fraction of a second into
    // the deliveries: it has taken runs and finished none (a run it finished but had
    // not acked yet would run again: at-least-once).
    let env = [
        ("CAPSTAN_CLUSTER_ACK_WAIT", "3s"),
        ("CAPSTAN_RUNS_MAX_PER_PLUGIN", "2"),
    ];
    let mut nodes = three(MANIFEST, &cluster, &env);
    const N: usize = 120;
    const KILL_AT: usize = 24;
    let mut accepted = BTreeSet::new();
    let started = Instant::now();
    let mut killed_after = None;
    for i in 0..N {
        if i == KILL_AT {
            nodes[2].kill();
            killed_after = Some(started.elapsed());
        }
        let node = &nodes[i % 3];
        if node.server.is_none() {
            continue;
        }
        let id = format!("k-{i}");
        let status = node.deliver(&id, b"sleep:500");
        assert_eq!(status, 202, "delivery {id} to {}", node.name);
        accepted.insert(id);
    }
    let killed_after = killed_after.unwrap();
    assert!(
        killed_after < Duration::from_millis(400),
        "n3 was killed {killed_after:?} into the deliveries, after its first runs could end"
    );
    // The others carry on: what n3 held is delivered again after ack_wait.
    let alive: Vec<&Node> = nodes[..2].iter().collect();
    agreed_runs(
        &alive,
        "clustered",
        90,
        "the live nodes ran every delivery n3 did not finish",
        |m| m.len() == accepted.len(),
    );
    // n3 comes back on its data directory: the runs it was killed in, `interrupted`
    // there at its start, give way to their retries' records from the history stream.
    nodes[2].start(&cluster, &env);
    let all: Vec<&Node> = nodes.iter().collect();
    let records = agreed_runs(
        &all,
        "clustered",
        90,
        "every node lists every run ok",
        |m| m.values().all(|r| r["status"] == "ok"),
    );
    let mut by_delivery: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    let mut retried = 0;
    for (id, r) in &records {
        let d = r["trigger"]["delivery"].as_str().unwrap().to_string();
        by_delivery.entry(d).or_default().push(id);
        let logs = logs_of(r);
        if logs.contains("cluster: attempt 2 of this run") {
            assert!(
                logs.contains("the previous attempt was interrupted"),
                "the retry says the previous attempt was interrupted: {logs}"
            );
            assert_ne!(r["node"], "n3", "n3 was dead: {r}");
            retried += 1;
        }
    }
    let twice: Vec<_> = by_delivery
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "deliveries recorded more than once: {twice:?}"
    );
    assert_eq!(
        by_delivery.keys().cloned().collect::<BTreeSet<_>>(),
        accepted,
        "one record per accepted delivery"
    );
    // What n3 held is run again by a live node: one record, the retry's, naming attempt 2.
    assert!(
        retried >= 1,
        "the kill caught runs n3 had taken, and they were run again elsewhere ({retried} retried)"
    );
    eprintln!("{N} deliveries, n3 killed {killed_after:?} in: {retried} run again");
}

pub(crate) fn status_json(node: &Node) -> Value {
    let out = node.data.capstan(&["cluster", "status", "--json"]);
    assert_success(&out, "capstan cluster status --json");
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn cluster_status_lists_the_nodes_and_a_killed_one_stops_being_alive() {
    let _turn = turn();
    let cluster = cluster_name();
    let mut nodes = three(MANIFEST, &cluster, &[]);
    let v = status_json(&nodes[0]);
    assert_eq!(v["in_cluster"], true, "{v}");
    assert_eq!(v["node"], "n1");
    let listed: Vec<(String, bool)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_string(), n["alive"] == true))
        .collect();
    assert_eq!(
        listed,
        [
            ("n1".into(), true),
            ("n2".into(), true),
            ("n3".into(), true)
        ],
        "{v}"
    );
    assert_eq!(v["nodes"][1]["api"], nodes[1].addr(), "{v}");
    assert_eq!(v["runs"]["replicas"], 3, "{v}");
    assert_eq!(
        v["history"]["stream"],
        format!("CAPSTAN_HISTORY_{}", cluster.to_uppercase()),
        "{v}"
    );
    assert_eq!(v["history"]["replicas"], 3, "{v}");
    assert_eq!(v["history"]["lag"], 0, "{v}");
    let text = stdout(&nodes[1].data.capstan(&["cluster", "status"]));
    assert!(
        text.contains("3 node(s), 3 alive; this is node n2"),
        "{text}"
    );
    assert!(text.contains("history stream CAPSTAN_HISTORY_"), "{text}");

    nodes[2].kill();
    let killed = Instant::now();
    let mut text = String::new();
    eventually(20, "n3 shown not alive", || {
        let v = status_json(&nodes[0]);
        text = stdout(&nodes[0].data.capstan(&["cluster", "status"]));
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "n3" && n["alive"] == false)
    });
    assert!(
        killed.elapsed() <= Duration::from_secs(15),
        "n3 not alive within the node TTL: {:?}",
        killed.elapsed()
    );
    assert!(text.contains("n3") && text.contains("not alive"), "{text}");
    assert!(text.contains("2 alive"), "{text}");
    // A node that stops cleanly leaves the list.
    assert!(nodes[1].stop().success());
    let v = status_json(&nodes[0]);
    assert!(
        !v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "n2"),
        "{v}"
    );
}

#[test]
fn cluster_status_of_an_engine_alone_says_it_is_not_in_a_cluster() {
    let data = DataDir::with_vault();
    let out = data.capstan(&["cluster", "status"]);
    assert_success(&out, "cluster status without an engine");
    assert!(
        stdout(&out).contains("not in a cluster"),
        "{}",
        stdout(&out)
    );
    let server = Server::start(&data);
    let out = data.capstan(&["cluster", "status"]);
    assert_success(&out, "cluster status of a single engine");
    assert!(
        stdout(&out).contains("the engine runs alone: not in a cluster"),
        "{}",
        stdout(&out)
    );
    let (status, body) = http_json(
        &server.addr,
        &format!("Bearer {}", server.admin_token()),
        "GET",
        "/api/cluster",
        &Value::Null,
    );
    assert_eq!((status, body.as_str()), (200, r#"{"in_cluster":false}"#));
}

#[test]
fn serve_with_no_nats_listening_fails_fast_and_starts_nothing() {
    let data = DataDir::empty();
    let started = Instant::now();
    let out = data.capstan(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cluster",
        "nats://127.0.0.1:1",
    ]);
    assert!(!out.status.success(), "serve exited {:?}", out.status);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_failure_says(&out, "cannot reach NATS at nats://127.0.0.1:1");
    // Nothing half-started: no vault, no token file.
    assert!(
        !data.data().join("vault.key").exists(),
        "the vault was created before NATS answered"
    );

    let out = data.capstan(&["serve", "--cluster", "localhost:4222"]);
    assert!(!out.status.success());
    assert_failure_says(&out, "cluster.urls");
    assert_failure_says(&out, "nats://");
}
