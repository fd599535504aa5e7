//! Webhook replays across the nodes of a cluster, against the real NATS cluster: a
//! delivery of a hook that rejects replays (the default for HMAC hooks), captured and
//! sent again to another node under a delivery id of the attacker's choosing, is a
//! duplicate there too, answered with the first run's id, and runs nothing. The
//! sender's own redelivery (same id, same signature) to another node is answered with
//! the first run as well.
//!
//! The tests take turns with the other cluster tests (`turn()`).

use serde_json::Value;

use crate::cluster::{Node, cluster_name, delivered, turn};
use crate::triggers::{eventually, install, runs};
use crate::util::*;

/// A GitHub-style hook that rejects replays (no `replay = "allow"`).
const MANIFEST: &str = r#"
name = "guarded"
version = "1"

[[triggers.webhook]]
name = "gh"
auth = "hmac-sha256"
delivery_header = "X-GitHub-Delivery"
"#;

/// A delivery to hook `gh` at `addr` signed with `secret`: the status and the answer.
fn deliver(addr: &str, secret: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let (status, text) = delivered(addr, secret, delivery, body);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

/// The keys of the cluster's replay bucket.
fn replay_keys(cluster: &str) -> Vec<String> {
    use futures_util::StreamExt;
    crate::cluster_state::on_nats(|js| async move {
        let kv = js
            .get_key_value(format!("capstan_replays_{cluster}"))
            .await
            .expect("the replay bucket exists");
        let mut keys = kv.keys().await.unwrap();
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            out.push(k.unwrap());
        }
        out
    })
}

#[test]
fn a_delivery_replayed_to_another_node_under_a_new_delivery_id_runs_nothing() {
    let _turn = turn();
    let cluster = cluster_name();
    // Two nodes, each with the plugin, its hook given the same secret (as an operator
    // does on every node without shared configuration).
    let secret = "the-shared-hook-secret-of-the-replay-test";
    let mut nodes: Vec<Node> = (1..=2).map(|i| Node::bare(&format!("r{i}"))).collect();
    for n in &mut nodes {
        install(&n.data, MANIFEST);
        let file = n.data.path().join("hook.secret");
        std::fs::write(&file, secret).unwrap();
        assert_success(
            &n.data.capstan(&[
                "hook",
                "rotate",
                "gh",
                "--secret-file",
                file.to_str().unwrap(),
            ]),
            "hook rotate",
        );
        n.start(&cluster, &[]);
    }
    let body = br#"{"ref":"refs/heads/main","after":"c0ffee"}"#;

    let (status, first) = deliver(nodes[0].addr(), secret, "d-1", body);
    assert_eq!(status, 202, "{first}");
    let run = first["run_id"].as_str().unwrap().to_string();

    // The attack: the captured request, a fresh delivery id, the other node. Until the
    // first node has marked its claim published (just after its 202) the answer is 503;
    // never a run.
    let mut replay = Value::Null;
    let mut status = 0;
    eventually(10, "the replay answered other than 503", || {
        (status, replay) = deliver(nodes[1].addr(), secret, "attacker-2", body);
        assert_ne!(status, 202, "a replay on another node ran: {replay}");
        status != 503
    });
    assert_eq!(
        status, 200,
        "a replay on another node must not run: {replay}"
    );
    assert_eq!(replay["status"], "duplicate", "{replay}");
    assert_eq!(replay["matched"], "signature", "{replay}");
    assert_eq!(replay["run_id"], run.as_str(), "{replay}");
    // Answered from n2's own memory now, and still a duplicate on n1.
    let (status, again) = deliver(nodes[1].addr(), secret, "attacker-3", body);
    assert_eq!(
        (status, &again["run_id"]),
        (200, &Value::from(run.clone())),
        "{again}"
    );
    let (status, on_first) = deliver(nodes[0].addr(), secret, "attacker-4", body);
    assert_eq!(status, 200, "{on_first}");

    // The sender's redelivery (same id and signature) to the other node: the first run.
    let (status, redelivered) = deliver(nodes[1].addr(), secret, "d-1", body);
    assert!(status == 200 || status == 202, "{status}: {redelivered}");
    assert_eq!(redelivered["run_id"], run.as_str(), "{redelivered}");

    // A new delivery still runs, on either node.
    let (status, other) = deliver(nodes[1].addr(), secret, "d-5", br#"{"after":"beef"}"#);
    assert_eq!(status, 202, "{other}");

    // Attack: the body with a signature under another secret, or none, is refused before
    // anything is claimed: the replay bucket holds the two accepted signatures only.
    let (status, _) = deliver(nodes[1].addr(), "not-the-secret", "attacker-6", body);
    assert_eq!(status, 401);
    let (status, _) = http(
        nodes[1].addr(),
        "POST",
        "/hooks/gh",
        &[("X-GitHub-Delivery", "attacker-7")],
        body,
    );
    assert_eq!(status, 401);
    let claims = replay_keys(&cluster);
    assert_eq!(claims.len(), 2, "{claims:?}");

    // Exactly two runs in the cluster, listed the same on both nodes.
    for n in &nodes {
        eventually(30, "both runs ended and listed", || {
            let listed = runs(&n.data, "guarded");
            listed.len() == 2 && listed.iter().all(|r| r["status"] == "ok")
        });
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    for n in &nodes {
        assert_eq!(
            runs(&n.data, "guarded").len(),
            2,
            "no run more on {}",
            n.name
        );
    }
    for n in &mut nodes {
        assert!(n.stop().success());
    }
}
