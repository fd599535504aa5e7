//! What a cluster node keeps of the shared run history across its own restarts, with
//! `capstan serve --cluster …` processes on the real NATS cluster: manual runs are
//! published to the history stream like triggered ones, and a node started again reads
//! the stream on from the position it stored at its stop (`cluster-history.json`), from
//! the start only when the stream is another one.
//!
//! The tests take turns with the other cluster tests (`turn()`).

use serde_json::Value;

use crate::cluster::{Node, cluster_name, status_json, turn};
use crate::triggers::{eventually, install_plugin};
use crate::util::plugin::manifest;
use crate::util::*;

/// The history stream as `cluster status` on `node` shows it.
fn history(node: &Node) -> Value {
    status_json(node)["history"].clone()
}

#[test]
fn a_restarted_node_reads_the_history_on_from_its_stored_position() {
    let _turn = turn();
    let cluster = cluster_name();
    let mut node = Node::bare("h1");
    install_plugin(&node.data, "probe", &manifest("probe", ""));
    node.start(&cluster, &[("CAPSTAN_LOG", "info")]);

    // Manual runs: each one's end goes to the history stream.
    for _ in 0..5 {
        let out = node
            .data
            .capstan(&["plugin", "run", "probe", "--input", "[]", "--json"]);
        assert_success(&out, "plugin run probe");
    }
    let mut last = 0;
    eventually(
        30,
        "the five manual runs in the history stream, all applied",
        || {
            let h = history(&node);
            last = h["last_sequence"].as_u64().unwrap_or(0);
            h["messages"] == 5 && h["lag"] == 0 && h["applied_sequence"] == last
        },
    );
    assert!(node.stop().success(), "h1 stopped cleanly");
    let file = node.data.data().join("cluster-history.json");
    let stored: Value = serde_json::from_slice(
        &std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
    )
    .unwrap();
    assert_eq!(stored["applied"], last, "{stored}");
    assert!(
        stored["stream"]
            .as_str()
            .is_some_and(|s| s.starts_with("CAPSTAN_HISTORY_")),
        "{stored}"
    );

    // Started again: it reads on after the stored sequence, and has the runs.
    node.start(&cluster, &[("CAPSTAN_LOG", "info")]);
    let said = format!("after={last}");
    eventually(20, "h1 says it reads on from its stored position", || {
        let log = node.log.lock().unwrap().clone();
        log.lines().any(|l| {
            l.contains("reading the history stream on from the position stored")
                && l.contains(&said)
        })
    });
    let h = history(&node);
    assert!(h["applied_sequence"].as_u64().unwrap() >= last, "{h}");
    assert_eq!(crate::triggers::runs(&node.data, "probe").len(), 5);
    assert!(node.stop().success());

    // In another cluster (another history stream), the stored position is not used.
    let other = cluster_name();
    node.start(&other, &[("CAPSTAN_LOG", "info")]);
    eventually(
        20,
        "h1 says the stored position is of another stream",
        || {
            node.log
                .lock()
                .unwrap()
                .contains("the stored history position is of another stream")
        },
    );
    assert!(node.stop().success());
}
