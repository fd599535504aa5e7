//! Device ownership in cluster mode against the real three-node NATS cluster and the
//! private sshd `scripts/testinfra` starts: three `capstan serve --cluster …` processes
//! with the same SSH devices (same names, same sshd) and the `probe` plugin on each
//! (devices and plugins are each node's own until shared state lands). Each device gets
//! one owner in the lease bucket, a run on another node reaches the device through its
//! owner, and a killed owner's devices are taken over within the lease time. The attack
//! test speaks raw NATS to an owner's device subject.
//!
//! The tests take turns with tests/cluster.rs (`turn()`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::cluster::{Node, cluster_name, status_json, turn};
use crate::triggers::{eventually, install_plugin};
use crate::util::plugin::manifest;
use crate::util::*;

/// The lease time the tests run with (renewed every 2 s).
const LEASE_SECS: u64 = 6;

/// The probe plugin may check and list containers on every device.
const PROBE_POLICY: &str = "[policy]\nCONTAINERS = 1\nINFO = 1\ndevices = [\"*\"]\n";

/// Adds SSH device `name` on the test sshd (pinned host key) to `node`.
fn add_ssh_device(node: &Node, name: &str) {
    let infra = Infra::get();
    let out = node.data.capstan(&[
        "device",
        "add",
        name,
        "--kind",
        "ssh",
        "--host",
        infra.var("SSH_HOST4"),
        "--port",
        infra.var("SSH_PORT"),
        "--user",
        infra.var("SSH_USER_KEY"),
        "--ssh-key-file",
        infra.var("SSH_KEY_ED25519"),
        "--host-key-file",
        infra.var("SSH_HOST_KEY_PUB"),
    ]);
    assert_success(&out, &format!("device add {name} on {}", node.name));
}

/// Three nodes with `devices` (SSH) and the probe plugin, started in `cluster`.
fn three_with_devices(cluster: &str, devices: &[&str]) -> Vec<Node> {
    let lease = format!("{LEASE_SECS}s");
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::bare(&format!("n{i}"))).collect();
    for n in &mut nodes {
        for d in devices {
            add_ssh_device(n, d);
        }
        install_plugin(&n.data, "probe", &manifest("probe", PROBE_POLICY));
        n.start(cluster, &[("CAPSTAN_CLUSTER_LEASE", &lease)]);
    }
    nodes
}

/// Device → owner, as `cluster status` on `node` lists the leases.
pub(crate) fn owners(node: &Node) -> BTreeMap<String, String> {
    let v = status_json(node);
    v["leases"]
        .as_array()
        .unwrap_or_else(|| panic!("cluster status lists no leases: {v}"))
        .iter()
        .map(|l| {
            (
                l["device"].as_str().unwrap().to_string(),
                l["owner"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A manual run of the probe on `node` with `calls`: each call's result.
fn probe(node: &Node, calls: Value) -> Vec<Value> {
    let out = node.data.capstan(&[
        "plugin",
        "run",
        "probe",
        "--input",
        &calls.to_string(),
        "--json",
    ]);
    assert_success(&out, &format!("plugin run probe on {}", node.name));
    let report: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    let details = report["outcome"]["details"]
        .as_str()
        .unwrap_or_else(|| panic!("the run has no outcome: {report}"));
    match serde_json::from_str(details) {
        Ok(Value::Array(v)) => v,
        _ => panic!("the probe's details are not a list: {report}"),
    }
}

/// The calls that reach a device: a check (ping and version) and a container list.
fn reach(device: &str) -> Value {
    json!([
        {"op": "check", "device": device},
        {"op": "list-containers", "device": device},
    ])
}

fn all_ok(results: &[Value]) -> bool {
    results.len() == 2 && results.iter().all(|r| r.get("ok").is_some())
}

fn node_index(nodes: &[Node], name: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

#[test]
fn each_device_has_one_owner_runs_elsewhere_reach_it_through_the_owner_and_a_killed_owner_is_taken_over()
 {
    let _turn = turn();
    let cluster = cluster_name();
    let devices = ["ssh-a", "ssh-b", "ssh-c", "ssh-d", "ssh-e", "ssh-f"];
    let mut nodes = three_with_devices(&cluster, &devices);

    // Every device gets an owner, and (once the three have been alive a lease time)
    // they spread over the nodes; every node sees the same owners.
    // Each data directory also has the default `local` device (the machine's daemon).
    let want: BTreeSet<String> = devices
        .iter()
        .chain(&["local"])
        .map(|d| d.to_string())
        .collect();
    let mut seen = BTreeMap::new();
    let mut last = BTreeMap::new();
    eventually(45, "every device owned, spread over the nodes", || {
        seen = owners(&nodes[0]);
        if seen != last {
            eprintln!("owners: {seen:?}");
            last = seen.clone();
        }
        let spread: BTreeSet<&String> = seen.values().collect();
        seen.keys().cloned().collect::<BTreeSet<_>>() == want && spread.len() >= 2
    });
    for n in &nodes[1..] {
        assert_eq!(owners(n), seen, "node {} sees other owners", n.name);
    }
    let text = stdout(&nodes[1].data.capstan(&["cluster", "status"]));
    assert!(
        text.contains("device leases (6s):") && text.contains("ssh-a"),
        "{text}"
    );

    // A run on a node that does not own the device reaches it through the owner.
    let device = "ssh-a";
    let owner = node_index(&nodes, &seen[device]);
    let other = (owner + 1) % 3;
    let results = probe(&nodes[other], reach(device));
    assert!(
        all_ok(&results),
        "run on {} for {device} owned by {}: {results:?}",
        nodes[other].name,
        nodes[owner].name
    );
    assert!(
        results[0]["ok"]["server_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{results:?}"
    );

    // The owner is killed: another node owns the device within the lease time (plus
    // the renewal periods a claim waits), and a run through the third node reaches it.
    nodes[owner].kill();
    let killed = Instant::now();
    let live: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut taken_by = String::new();
    eventually(60, "the killed owner's device taken over", || {
        let o = owners(&nodes[live[0]]);
        match o.get(device) {
            Some(n) if *n != nodes[owner].name => {
                taken_by = n.clone();
                true
            }
            _ => false,
        }
    });
    let took = killed.elapsed();
    let bound = Duration::from_secs(LEASE_SECS * 3 + 5);
    assert!(
        took <= bound,
        "takeover took {took:?}, more than the lease ({LEASE_SECS}s) and its renewals ({bound:?})"
    );
    let new_owner = node_index(&nodes, &taken_by);
    let third = *live.iter().find(|i| **i != new_owner).unwrap();
    let mut results = Vec::new();
    eventually(
        20,
        "a run through the third node reaches the device",
        || {
            results = probe(&nodes[third], reach(device));
            all_ok(&results)
        },
    );
    // Every device of the killed node has a live owner.
    eventually(30, "every device owned by a live node", || {
        let o = owners(&nodes[live[0]]);
        o.len() == want.len() && o.values().all(|n| *n != nodes[owner].name)
    });
    eprintln!(
        "{device} taken over by {taken_by} {:.1}s after {} was killed (lease {LEASE_SECS}s)",
        took.as_secs_f64(),
        nodes[owner].name
    );
    for i in live {
        assert!(
            nodes[i].stop().success(),
            "{} stopped cleanly",
            nodes[i].name
        );
    }
}

/// The lease bucket's entry for `device` in `cluster`: the owner's process id.
async fn owner_instance(client: &async_nats::Client, cluster: &str, device: &str) -> String {
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(format!("capstan_leases_{cluster}"))
        .await
        .expect("the lease bucket exists");
    let v = kv
        .get(device)
        .await
        .expect("read the lease")
        .unwrap_or_else(|| panic!("{device} has no lease"));
    let lease: Value = serde_json::from_slice(&v).unwrap();
    lease["instance"].as_str().unwrap().to_string()
}

/// A raw request on `subject`: the first frame's headers and payload.
async fn raw(client: &async_nats::Client, subject: &str, payload: Vec<u8>) -> (String, String) {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_string(), inbox, payload.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the owner answers within 10 s")
        .expect("an answer");
    let h = msg.headers.clone().unwrap_or_default();
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
    let head = if get("Capstan-Error").is_empty() {
        format!("status {}", get("Capstan-Status"))
    } else {
        format!("error {}", get("Capstan-Error"))
    };
    (head, String::from_utf8_lossy(&msg.payload).into_owned())
}

/// The attack: anyone who can publish on NATS sends requests to an owner's device
/// subject. A request for a device the node does not own, an oversized request and a
/// method outside the set are refused; a well-formed one for its device is served (so
/// the refusals are the owner's checks, not a dead subject).
#[test]
fn an_owner_refuses_raw_nats_requests_for_devices_it_does_not_own_and_oversized_ones() {
    let _turn = turn();
    let cluster = cluster_name();
    let mut node = Node::bare("n1");
    add_ssh_device(&node, "ssh-a");
    node.start(&cluster, &[("CAPSTAN_CLUSTER_LEASE", "6s")]);
    eventually(30, "n1 owns ssh-a", || {
        owners(&node).get("ssh-a").map(String::as_str) == Some("n1")
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let urls: Vec<String> = nats_urls().split(',').map(str::to_string).collect();
        let client = async_nats::connect(urls.as_slice())
            .await
            .expect("connect to NATS");
        let instance = owner_instance(&client, &cluster, "ssh-a").await;
        let subject = format!("capstan.{cluster}.docker.{instance}");
        let req = |device: &str, method: &str, path: &str| {
            serde_json::to_vec(&json!({
                "device": device, "method": method, "path": path,
                "timeout_ms": 5000, "max_body": 65536,
            }))
            .unwrap()
        };
        // Served: its own device.
        let (head, body) = raw(&client, &subject, req("ssh-a", "GET", "/_ping")).await;
        assert_eq!((head.as_str(), body.as_str()), ("status 200", "OK"));
        // A device it does not own (nobody does), and one it has not even heard of.
        for device in ["ssh-zz", "../../etc"] {
            let (head, body) = raw(&client, &subject, req(device, "GET", "/_ping")).await;
            assert_eq!(head, "error not-owner", "{device}: {body}");
            assert!(body.contains("does not own"), "{body}");
        }
        // Oversized: a body past the request limit, for its own device.
        let mut big = json!({
            "device": "ssh-a", "method": "POST", "path": "/containers/create",
            "timeout_ms": 5000, "max_body": 65536,
        });
        big["body"] = json!({"Env": ["X=".to_string() + &"x".repeat(300 * 1024)]});
        let (head, body) = raw(&client, &subject, serde_json::to_vec(&big).unwrap()).await;
        assert_eq!(head, "error refused", "{body}");
        assert!(body.contains("over the"), "{body}");
        // A method outside the set, and something that is not a request.
        let (head, _) = raw(&client, &subject, req("ssh-a", "CONNECT", "/_ping")).await;
        assert_eq!(head, "error refused");
        let (head, _) = raw(&client, &subject, b"not json".to_vec()).await;
        assert_eq!(head, "error refused");
    });
    assert!(node.stop().success());
}
