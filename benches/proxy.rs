//! What proxy mode costs: the same Docker API call sent straight to the local daemon's
//! socket and sent through a Capstan proxy (policy decision + forwarding), each over a
//! kept-alive HTTP/1.1 connection, measured in the same run.
//!
//! Run with `cargo bench --bench proxy` (needs dockerd on /var/run/docker.sock or
//! DOCKER_HOST=unix://…). Prints medians, p99 and the median ratio proxy/direct.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use capstan::device::{Device, DeviceKind, DeviceSecrets};
use capstan::docker::{ConnectOptions, DockerClient, HostKeyPolicy};
use capstan::policy::Policy;
use capstan::proxy::{Listen, Proxy, ProxyListener};

const ROUNDS: usize = 2_000;
const CALLS: &[&str] = &["/v1.41/containers/json?all=1", "/v1.41/version", "/_ping"];

async fn connect<S>(stream: S) -> SendRequest<Empty<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn call(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> Duration {
    let t = Instant::now();
    sender.ready().await.expect("connection ready");
    let req = Request::get(path)
        .header("host", "docker")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("request");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.into_body().collect().await.expect("body");
    t.elapsed()
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = match std::env::var("DOCKER_HOST") {
            Ok(h) if !h.is_empty() => h
                .strip_prefix("unix://")
                .map(std::path::PathBuf::from)
                .expect("this benchmark compares against a unix socket; unset DOCKER_HOST or point it at unix://"),
            _ => std::path::PathBuf::from("/var/run/docker.sock"),
        };
        let mut device = Device::blank(DeviceKind::Local, "local");
        device.docker_host = Some(format!("unix://{}", socket.display()));
        let upstream = DockerClient::new(
            &device,
            &DeviceSecrets::default(),
            &ConnectOptions::default(),
            HostKeyPolicy::PinnedOnly,
        )
        .expect("local client");
        let policy = Policy::from_env_block("CONTAINERS=1\n").unwrap().compile();
        let listen: Listen = "tcp://127.0.0.1:0".parse().unwrap();
        let proxy = Arc::new(Proxy::new("local", policy, upstream, &listen, None, None).unwrap());
        let listener = ProxyListener::bind(&listen).await.unwrap();
        let Listen::Tcp(addr) = listener.local_listen() else { unreachable!() };
        let port = addr.port();
        tokio::spawn(proxy.clone().serve(listener, std::future::pending()));

        let mut direct = connect(tokio::net::UnixStream::connect(&socket).await.expect("daemon socket")).await;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("proxy");
        tcp.set_nodelay(true).unwrap();
        let mut proxied = connect(tcp).await;

        println!("proxy overhead, {ROUNDS} rounds per call, interleaved, kept-alive connections");
        println!("{:<32} {:>12} {:>12} {:>12} {:>12} {:>8}", "call", "direct p50", "direct p99", "proxy p50", "proxy p99", "ratio");
        for path in CALLS {
            // Warm up both paths.
            for _ in 0..50 {
                call(&mut direct, path).await;
                call(&mut proxied, path).await;
            }
            let mut d = Vec::with_capacity(ROUNDS);
            let mut p = Vec::with_capacity(ROUNDS);
            for i in 0..ROUNDS {
                if i % 2 == 0 {
                    d.push(call(&mut direct, path).await);
                    p.push(call(&mut proxied, path).await);
                } else {
                    p.push(call(&mut proxied, path).await);
                    d.push(call(&mut direct, path).await);
                }
            }
            let (d50, d99) = summary(d);
            let (p50, p99) = summary(p);
            println!(
                "{:<32} {:>12.1?} {:>12.1?} {:>12.1?} {:>12.1?} {:>7.2}x",
                path,
                d50,
                d99,
                p50,
                p99,
                p50.as_secs_f64() / d50.as_secs_f64()
            );
        }
        println!(
            "decisions counted by the proxy: {} allowed, {} denied",
            proxy.stats.allowed.load(std::sync::atomic::Ordering::Relaxed),
            proxy.stats.denied.load(std::sync::atomic::Ordering::Relaxed)
        );
    });
}
