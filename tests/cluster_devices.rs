//! Device ownership in cluster mode against the real three-node NATS cluster and the
//! private sshd `scripts/testinfra` starts: an engine (`capstan serve --cluster …` as a
//! process) with an SSH device owns it in the lease bucket, and the attack test speaks
//! raw NATS to that owner's device subject: requests for devices it does not own,
//! oversized ones and methods outside the set are refused. [`owners`] reads the leases
//! for tests/cluster_owner.rs too. The devices of three engines (one owner each, runs
//! elsewhere reaching a device through its owner, a killed owner taken over) are shown by
//! tests/cluster_faults.rs, with the engines in containers.
//!
//! The tests take turns with the other cluster tests (`turn()`).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::cluster::{Node, cluster_name, status_json, turn};
use crate::triggers::eventually;
use crate::util::*;

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
