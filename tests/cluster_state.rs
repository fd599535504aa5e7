//! Shared configuration in cluster mode (`CAPSTAN_CLUSTER_SHARED_STATE=true`) against the
//! real three-server NATS JetStream cluster of `scripts/testinfra`: three engines, the
//! first with a vault, the others started on empty data directories with its key file. A
//! plugin installed on one node runs on the others with the hook secret generated on the
//! first; a token created on one node authenticates on another and a revocation reaches
//! all; a removed plugin is gone everywhere; a manual run on one node is listed on all;
//! a plugin's key-value state set by a run on one node is read by its run on the next.
//! Attacks: the bucket and the component store read raw hold no secret and no plugin
//! state value in clear; a value that does not parse is ignored and the watch goes on; a
//! node whose key does not open the cluster's vault is refused and changes nothing.

use std::io::Read;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use crate::cluster::{cluster_name, deliver_to, turn};
use crate::triggers::{eventually, generated_secret, install};
use crate::util::*;

const MANIFEST: &str = crate::cluster::MANIFEST;

/// A running shared-state node and the log it writes.
struct Node {
    data: DataDir,
    server: Server,
    log: Arc<Mutex<String>>,
}

fn start(data: DataDir, name: &str, cluster: &str) -> Node {
    let urls = nats_urls();
    let mut server = Server::start_with(&data, |c| {
        c.args(["--cluster", urls])
            .env("CAPSTAN_CLUSTER_NODE_NAME", name)
            .env("CAPSTAN_CLUSTER_NAME", cluster)
            .env("CAPSTAN_CLUSTER_SHARED_STATE", "true")
            .env("CAPSTAN_LOG", "warn");
    });
    let mut err = server.child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Node { data, server, log }
}

/// Stops `node`, does `offline` on its data directory, and starts it again.
fn restart<T>(
    node: Node,
    name: &str,
    cluster: &str,
    offline: impl FnOnce(&DataDir) -> T,
) -> (Node, T) {
    let Node { data, server, .. } = node;
    assert!(server.stop().success(), "{name} stopped cleanly");
    let out = offline(&data);
    (start(data, name, cluster), out)
}

/// An empty data directory holding `key_file` as its vault key file.
fn with_key_file(key_file: &std::path::Path) -> DataDir {
    let d = DataDir::empty();
    std::fs::create_dir_all(d.data()).unwrap();
    let dest = d.data().join("vault.key");
    std::fs::copy(key_file, &dest).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
    d
}

fn status_with(addr: &str, token: &str, path: &str) -> u16 {
    http(
        addr,
        "GET",
        path,
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .0
}

fn plugin_listed(node: &Node, name: &str) -> bool {
    let out = node.data.capstan(&["plugin", "list"]);
    out.status.success() && stdout(&out).contains(name)
}

/// Runs `f` with a JetStream context on the test NATS cluster, to its end.
pub(crate) fn on_nats<T, F: std::future::Future<Output = T>>(
    f: impl FnOnce(async_nats::jetstream::Context) -> F,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let urls: Vec<String> = nats_urls().split(',').map(String::from).collect();
        let client = async_nats::connect(urls.as_slice()).await.expect("NATS");
        f(async_nats::jetstream::new(client)).await
    })
}

/// Every value of the state bucket and every object of the component store, raw.
fn read_everything(cluster: &str) -> Vec<(String, Vec<u8>)> {
    on_nats(|js| async move {
        let kv = js
            .get_key_value(format!("capstan_state_{cluster}"))
            .await
            .expect("the state bucket exists");
        let mut out = Vec::new();
        let mut keys = kv.keys().await.unwrap();
        while let Some(k) = keys.next().await {
            let k = k.unwrap();
            // Every revision kept, not only the last.
            let mut history = kv.history(&k).await.unwrap();
            while let Some(e) = history.next().await {
                out.push((k.clone(), e.unwrap().value.to_vec()));
            }
        }
        let store = js
            .get_object_store(format!("capstan_wasm_{cluster}"))
            .await
            .expect("the component store exists");
        let mut list = store.list().await.unwrap();
        while let Some(info) = list.next().await {
            let info = info.unwrap();
            let mut obj = store.get(&info.name).await.unwrap();
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut bytes)
                .await
                .unwrap();
            out.push((format!("object {}", info.name), bytes));
        }
        out
    })
}

fn put_raw(cluster: &str, key: &str, value: &[u8]) {
    on_nats(|js| async move {
        let kv = js
            .get_key_value(format!("capstan_state_{cluster}"))
            .await
            .unwrap();
        kv.put(key, value.to_vec().into()).await.unwrap();
    });
}

fn created_token(out: &std::process::Output) -> String {
    assert_success(out, "token create");
    let text = stdout(out);
    text.split_whitespace()
        .find(|w| w.starts_with("cap_"))
        .unwrap_or_else(|| panic!("no token printed: {text}"))
        .to_string()
}

/// A manual run of the `sshprobe` plugin (the probe) on `node` with `calls`, waited
/// for: each call's result. The run must end ok.
fn probe_on(node: &Node, auth: &str, calls: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let input = serde_json::Value::Array(calls.to_vec()).to_string();
    let (status, body) = http_json(
        &node.server.addr,
        auth,
        "POST",
        "/api/plugins/sshprobe/run?wait=true",
        &serde_json::json!({ "input": input }),
    );
    assert_eq!(status, 200, "{body}");
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(record["status"], "ok", "{record}");
    match &record["outcome"]["details"] {
        serde_json::Value::Array(v) => v.clone(),
        _ => panic!("the probe's details are not a list: {record}"),
    }
}

#[test]
fn configuration_changed_on_one_node_takes_effect_on_all_and_never_crosses_nats_in_clear() {
    let _turn = turn();
    let cluster = cluster_name();
    let first = DataDir::with_vault();
    let key_file = first.data().join("vault.key");
    let others: Vec<DataDir> = (0..2).map(|_| with_key_file(&key_file)).collect();
    let n1 = start(first, "n1", &cluster);
    let mut rest = others
        .into_iter()
        .enumerate()
        .map(|(i, d)| start(d, &format!("n{}", i + 2), &cluster));
    let n2 = rest.next().unwrap();
    let n3 = rest.next().unwrap();
    let admin = n1.server.admin_token();

    // A plugin installed on n1 only: listed on n3, and its hook takes deliveries signed
    // with the secret n1 generated.
    let out = install(&n1.data, MANIFEST);
    let hook_secret = generated_secret(&out, "gh");
    eventually(30, "the plugin listed on n2 and n3", || {
        plugin_listed(&n2, "clustered") && plugin_listed(&n3, "clustered")
    });
    eventually(30, "n3 takes a delivery signed with n1's secret", || {
        deliver_to(&n3.server.addr, &hook_secret, "s-1", b"{}") == 202
    });
    eventually(60, "the delivery ran on some node", || {
        [&n1, &n2, &n3].iter().any(|n| {
            crate::triggers::runs(&n.data, "clustered")
                .iter()
                .any(|r| r["status"] == "ok")
        })
    });

    // A token created on n1 (tokens are made with the in-process CLI, on a stopped
    // node) authenticates on n3 once n1 is back; revoked on n2 while it is stopped, it is
    // refused on every node once n2 is back: a node's changes made while it was away
    // are published at its join.
    let n1 = restart(n1, "n1", &cluster, |d| {
        created_token(&d.capstan(&["token", "create", "ci", "--role", "viewer"]))
    });
    let (n1, token) = n1;
    eventually(30, "n1's token accepted by n3", || {
        status_with(&n3.server.addr, &token, "/api/plugins") == 200
    });
    let (n2, ()) = restart(n2, "n2", &cluster, |d| {
        assert_success(&d.capstan(&["token", "revoke", "ci"]), "token revoke");
    });
    eventually(30, "the revoked token refused on every node", || {
        [&n1, &n2, &n3]
            .iter()
            .all(|n| status_with(&n.server.addr, &token, "/api/plugins") == 401)
    });
    assert_eq!(status_with(&n3.server.addr, &admin, "/api/plugins"), 200);

    // A device with SSH credentials added on n2 is listed on n3, and a plugin run on n3
    // reaches the real sshd with them (decrypted on n3).
    let infra = Infra::get();
    let password = std::fs::read_to_string(infra.var("SSH_PASSWORD_FILE"))
        .unwrap()
        .trim()
        .to_string();
    let auth = format!("Bearer {admin}");
    let (status, body) = http_json(
        &n2.server.addr,
        &auth,
        "POST",
        "/api/devices",
        &serde_json::json!({
            "name": "sshbox",
            "kind": "ssh",
            "host": infra.var("SSH_HOST4"),
            "port": infra.var("SSH_PORT").parse::<u16>().unwrap(),
            "user": infra.var("SSH_USER_PASSWORD"),
            "password": password,
            "host_key": std::fs::read_to_string(infra.var("SSH_HOST_KEY_PUB")).unwrap(),
        }),
    );
    assert_eq!(status, 201, "{body}");
    eventually(30, "the device listed on n1 and n3", || {
        [&n1, &n3].iter().all(|n| {
            http_json(
                &n.server.addr,
                &auth,
                "GET",
                "/api/devices/sshbox",
                &serde_json::Value::Null,
            )
            .0 == 200
        })
    });
    let manifest = "name = \"sshprobe\"\nversion = \"0.0.1\"\n[policy]\nCONTAINERS = 1\ndevices = [\"sshbox\"]\n";
    crate::triggers::install_plugin(&n1.data, "probe", manifest);
    eventually(30, "the probe listed on n3", || {
        plugin_listed(&n3, "sshprobe")
    });
    let calls = serde_json::json!([{ "op": "list-containers", "device": "sshbox" }]).to_string();
    let (status, body) = http_json(
        &n3.server.addr,
        &auth,
        "POST",
        "/api/plugins/sshprobe/run?wait=true",
        &serde_json::json!({ "input": calls }),
    );
    assert_eq!(status, 200, "{body}");
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        record["status"], "ok",
        "the run on n3 reached sshd: {record}"
    );

    // That manual run's end is in every node's history, naming the node that ran it.
    let run_id = record["id"].as_str().unwrap().to_string();
    eventually(30, "n1 and n2 list n3's manual run", || {
        [&n1, &n2].iter().all(|n| {
            crate::triggers::runs(&n.data, "sshprobe")
                .iter()
                .any(|r| r["id"] == run_id.as_str() && r["node"] == "n3" && r["status"] == "ok")
        })
    });

    // The plugin's own state follows it from node to node: a count kept with
    // `state-set` goes 1 on n1, 2 on n2, 3 on n3, each run seeing the last one's value.
    for (i, n) in [&n1, &n2, &n3].into_iter().enumerate() {
        let before = i.to_string();
        if i > 0 {
            eventually(30, "the count replicated to the next node", || {
                let got = probe_on(
                    n,
                    &auth,
                    &[serde_json::json!({"op": "state-get", "device": "", "key": "count"})],
                );
                got[0]["ok"] == before.as_str()
            });
        }
        let got = probe_on(
            n,
            &auth,
            &[serde_json::json!({"op": "count", "device": "", "key": "count"})],
        );
        assert_eq!(
            got[0]["ok"],
            i as u64 + 1,
            "the count on node {}: {got:?}",
            i + 1
        );
    }
    let marker = format!("state-marker-{}", uuid::Uuid::new_v4().simple());
    probe_on(
        &n2,
        &auth,
        &[serde_json::json!({"op": "state-set", "device": "", "key": "m", "value": marker})],
    );
    eventually(30, "n1 reads the value set on n2", || {
        let got = probe_on(
            &n1,
            &auth,
            &[serde_json::json!({"op": "state-get", "device": "", "key": "m"})],
        );
        got[0]["ok"] == marker.as_str()
    });

    // Attack: everything the cluster stores, read raw, holds no secret in clear.
    let everything = read_everything(&cluster);
    assert!(
        everything.iter().any(|(k, _)| k == "pstate.sshprobe.m"),
        "the plugin's state is replicated (sealed): {:?}",
        everything.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(
        everything
            .iter()
            .any(|(k, _)| k.starts_with("secret.hook/gh/")),
        "the hook secret is replicated (sealed): {:?}",
        everything.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (k, v) in &everything {
        for (what, clear) in [
            ("hook secret", hook_secret.as_bytes()),
            ("token", token.as_bytes()),
            ("admin token", admin.as_bytes()),
            ("device password", password.as_bytes()),
            ("plugin state value", marker.as_bytes()),
        ] {
            assert!(
                !v.windows(clear.len()).any(|w| w == clear),
                "{k} holds the {what} in clear"
            );
        }
    }

    // Attack: a value that does not parse is ignored with a warning; the watch goes on.
    put_raw(
        &cluster,
        &format!("token.{}", "ab".repeat(32)),
        b"not a record",
    );
    put_raw(&cluster, "device.not-a-uuid", b"{}");
    // A plugin state value written in clear (not sealed under the vault's data key) by
    // someone with NATS access does not reach any plugin.
    put_raw(&cluster, "pstate.sshprobe.m", b"forged by a NATS user");
    let (n2, token2) = restart(n2, "n2", &cluster, |d| {
        created_token(&d.capstan(&["token", "create", "ci2", "--role", "viewer"]))
    });
    eventually(
        30,
        "a token created after the garbage is accepted on n3",
        || status_with(&n3.server.addr, &token2, "/api/plugins") == 200,
    );
    assert!(
        n3.log.lock().unwrap().contains("does not parse"),
        "n3 warned about the garbage: {}",
        n3.log.lock().unwrap()
    );
    assert!(
        n3.log
            .lock()
            .unwrap()
            .contains("plugin state value that does not open"),
        "n3 warned about the forged state value: {}",
        n3.log.lock().unwrap()
    );
    let got = probe_on(
        &n3,
        &auth,
        &[serde_json::json!({"op": "state-get", "device": "", "key": "m"})],
    );
    assert_eq!(
        got[0]["ok"],
        marker.as_str(),
        "the forged value reached the plugin"
    );

    // Status: the records and whether the node is in step.
    let out = n3.data.capstan(&["cluster", "status", "--json"]);
    assert_success(&out, "cluster status");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["state"]["records"].as_u64().unwrap() >= 4, "{v}");
    eventually(10, "n3 up to date", || {
        let out = n3.data.capstan(&["cluster", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        v["state"]["up_to_date"] == true
    });

    // Removed on n2: gone from every node, and its hook no longer takes deliveries.
    assert_success(
        &n2.data.capstan(&["plugin", "remove", "clustered"]),
        "plugin remove",
    );
    eventually(30, "the plugin gone from every node", || {
        [&n1, &n2, &n3]
            .iter()
            .all(|n| !plugin_listed(n, "clustered"))
    });
    assert_eq!(
        deliver_to(&n1.server.addr, &hook_secret, "s-2", b"{}"),
        404,
        "the removed plugin's hook is gone on n1"
    );
    let data = n3.data;
    for server in [n1.server, n2.server, n3.server] {
        assert!(server.stop().success());
    }
    // A stopped node's vault key is the cluster's: changing it there alone is refused,
    // and the vault file is left as it was.
    let vault_file = data.data().join("vault.json");
    let before = std::fs::read(&vault_file).unwrap();
    for args in [
        &["vault", "rotate-key"][..],
        &["vault", "change-passphrase"][..],
    ] {
        let out = data.capstan(args);
        assert_failure_says(&out, "node of a shared-state cluster");
        assert_failure_says(&out, "nothing was changed");
    }
    assert_eq!(std::fs::read(&vault_file).unwrap(), before);
}

#[test]
fn a_node_whose_key_does_not_open_the_clusters_vault_is_refused_and_changes_nothing() {
    let _turn = turn();
    let cluster = cluster_name();
    let n1 = start(DataDir::with_vault(), "n1", &cluster);
    // Its own key file: the cluster's header does not open with it.
    let stranger = DataDir::with_vault();
    let vault_before = std::fs::read(stranger.data().join("vault.json")).unwrap();
    let out = stranger
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--cluster", nats_urls()])
        .env("CAPSTAN_CLUSTER_NODE_NAME", "n9")
        .env("CAPSTAN_CLUSTER_NAME", &cluster)
        .env("CAPSTAN_CLUSTER_SHARED_STATE", "true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the stranger started");
    assert_failure_says(&out, "does not open the cluster's vault");
    assert_eq!(
        std::fs::read(stranger.data().join("vault.json")).unwrap(),
        vault_before,
        "the stranger's vault was changed"
    );
    // A node whose vault holds secrets of its own under another data key is refused,
    // even with the cluster's key file.
    let holder = DataDir::with_vault();
    install(&holder, MANIFEST);
    std::fs::copy(
        n1.data.data().join("vault.key"),
        holder.data().join("vault.key"),
    )
    .unwrap();
    let out = holder
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--cluster", nats_urls()])
        .env("CAPSTAN_CLUSTER_NODE_NAME", "n8")
        .env("CAPSTAN_CLUSTER_NAME", &cluster)
        .env("CAPSTAN_CLUSTER_SHARED_STATE", "true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the holder started");
    assert_failure_says(&out, "under another data key");
    assert!(n1.server.stop().success());
}
