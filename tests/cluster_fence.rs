//! Fencing of the streams a `[[proxy]]` opened while its node owned the device: when the
//! node stops holding the device's lease, a streamed answer (`GET /events`) is cut with
//! an error and an upgraded connection (a websocket attach) is closed, so the node stops
//! acting on a device another node owns now.
//!
//! The lease moves the way it does in production when a node joins: node `fa` runs
//! alone and owns `local`; a second node whose name ranks first for `local` (the
//! cluster's rendezvous ranking, [`capstan::cluster::leases::rank`]) starts, and once it
//! has been alive a lease time `fa` gives the device back to it.
//!
//! The tests take turns with the other cluster tests (`turn()`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cluster::{Node, cluster_name, turn};
use crate::cluster_devices::owners;
use crate::cluster_owner::proxy_config;
use crate::proxy::{
    remove_container, start_shell_container, websocket_attach_with, websocket_send,
};
use crate::triggers::eventually;
use crate::util::*;

/// The lease time (renewed every 2 s).
const LEASE: &str = "6s";
const TOKEN: &str = "proxy-token-for-the-fence-test";

/// What the fenced proxy may do: read events and attach (`CONTAINERS=1 POST=1`).
const POLICY: &str = "CONTAINERS=1\nPOST=1\nEVENTS=1\nINFO=1\n";

/// How a streamed answer ended, as its reader saw it.
#[derive(Debug)]
enum Ended {
    /// The last chunk (`0\r\n\r\n`) came: the server ended the answer cleanly.
    Clean,
    /// The connection closed or failed before the last chunk.
    Cut(String),
}

/// Opens `GET /events` on the proxy at `addr` and reads it on a thread: the bytes read
/// so far go to `seen`, and how the stream ended to the returned receiver.
fn events_stream(
    addr: &str,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> mpsc::Receiver<(Ended, Instant)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let request = format!(
        "GET /v1.41/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ended::Cut("the connection closed".into()),
                Ok(n) => {
                    let mut all = seen.lock().unwrap();
                    all.extend_from_slice(&buf[..n]);
                    if all.ends_with(b"\r\n0\r\n\r\n") {
                        break Ended::Clean;
                    }
                }
                Err(e) => break Ended::Cut(e.to_string()),
            }
        };
        let _ = tx.send((ended, Instant::now()));
    });
    rx
}

/// Removes the container when the test ends, however it ends.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        remove_container(&self.0);
    }
}

/// A name that ranks before `first` for device `local` in a cluster of the two.
fn outranking(first: &str) -> String {
    (1..1000)
        .map(|i| format!("fb{i}"))
        .find(|c| {
            let nodes = [first.to_string(), c.clone()];
            capstan::cluster::leases::rank(&nodes, "local").first() == Some(&c.as_str())
        })
        .expect("some name outranks the first node")
}

#[test]
fn proxy_streams_and_attaches_opened_on_the_owner_are_cut_when_its_lease_goes_to_another_node() {
    let _turn = turn();
    let cluster = cluster_name();
    let port = free_port();
    let mut first = Node::bare("fa");
    let cfg = proxy_config(&first, port, TOKEN, POLICY);
    first.start(
        &cluster,
        &[
            ("CAPSTAN_CLUSTER_LEASE", LEASE),
            ("CAPSTAN_CONFIG", cfg.to_str().unwrap()),
        ],
    );
    eventually(30, "fa owns local", || {
        owners(&first).get("local").map(String::as_str) == Some("fa")
    });
    let addr = format!("127.0.0.1:{port}");

    // A container with an open stdin to attach to, and the two long-lived connections.
    let name = format!("capstan-fence-{}", std::process::id());
    start_shell_container(&name, "capstan-fence-ready");
    let _removed = Removed(name.clone());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let events = events_stream(&addr, seen.clone());
    let (status, head, mut ws) = websocket_attach_with(
        &addr,
        &format!("/v1.41/containers/{name}/attach/ws?stream=1&stdin=1&stdout=1"),
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    assert_eq!(status, 101, "{head}");
    // Both work while fa owns the device: the attach runs a command, and the event
    // stream carries the container's pause and unpause.
    websocket_send(&mut ws, "touch /tmp/fence-before\n");
    eventually(20, "the attach reached the shell", || {
        std::process::Command::new("docker")
            .args(["exec", &name, "test", "-e", "/tmp/fence-before"])
            .status()
            .unwrap()
            .success()
    });
    for action in ["pause", "unpause"] {
        let out = std::process::Command::new("docker")
            .args([action, &name])
            .output()
            .unwrap();
        assert_success(&out, &format!("docker {action}"));
    }
    eventually(20, "the event stream carried the unpause", || {
        String::from_utf8_lossy(&seen.lock().unwrap()).contains("\"unpause\"")
    });
    let (ws_tx, ws_rx) = mpsc::channel();
    let mut ws_read = ws.try_clone().unwrap();
    ws_read
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let ended = loop {
            match ws_read.read(&mut buf) {
                Ok(0) => break "closed".to_string(),
                Ok(_) => continue,
                Err(e) => break e.to_string(),
            }
        };
        let _ = ws_tx.send((ended, Instant::now()));
    });

    // A node that ranks first for local joins; after a lease time fa gives it back.
    let second_name = outranking("fa");
    let mut second = Node::bare(&second_name);
    second.start(&cluster, &[("CAPSTAN_CLUSTER_LEASE", LEASE)]);
    let joined = Instant::now();
    let bound = Duration::from_secs(40);
    let (ended, at) = events.recv_timeout(bound).unwrap_or_else(|_| {
        panic!("fa's event stream still runs {bound:?} after {second_name} joined")
    });
    let Ended::Cut(why) = ended else {
        panic!("the event stream must end with an error, not a clean end");
    };
    let (ws_ended, ws_at) = ws_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("fa's attach still open after its event stream was cut"));
    // Cut because the lease moved: the other node owns local now, and fa's proxy
    // answers 421 to a new request.
    eventually(20, "the second node owns local", || {
        owners(&first).get("local") == Some(&second_name)
    });
    let (status, body) = http(
        &addr,
        "GET",
        "/_ping",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(status, 421, "{body}");
    // Nothing written on the closed attach reaches the container.
    let _ = ws.write_all(b"touch /tmp/fence-after\n");
    std::thread::sleep(Duration::from_millis(500));
    let after = std::process::Command::new("docker")
        .args(["exec", &name, "test", "-e", "/tmp/fence-after"])
        .status()
        .unwrap();
    assert!(
        !after.success(),
        "a write on the cut attach reached the container"
    );
    eprintln!(
        "lease moved to {second_name}; events cut ({why}) {:.1}s and attach closed ({ws_ended}) {:.1}s after it joined (lease {LEASE})",
        at.duration_since(joined).as_secs_f64(),
        ws_at.duration_since(joined).as_secs_f64(),
    );
    let logs = first.log.lock().unwrap().clone();
    assert!(
        logs.contains("an upgraded proxy connection (attach, exec) is closed"),
        "fa's log says why the attach was closed:\n{logs}"
    );
    assert!(second.stop().success());
    assert!(first.stop().success());
}
