//! Outbound HTTP from plugins (`wasi:http` through the host's checks) and the secrets
//! plugins use without seeing, against real HTTP servers on loopback started here: the
//! `fetcher` test plugin sends what its input lists and reports what came back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan::plugin::{Exit, RunReport};
use serde_json::{Value, json};

use crate::util::plugin::{Harness, manifest};

/// A loopback HTTP/1.1 server that records every request it gets (head and body) and
/// answers by path: `/hello` 200 `hello`; `/redirect` 302 to `/hello` on `redirect_to`;
/// `/big` 64 KiB with a Content-Length, `/big-chunked` 64 KiB chunked; `/hang` reads the
/// request and never answers. Stops accepting when dropped.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    fn start(redirect_to: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let seen = seen2.clone();
                std::thread::spawn(move || serve(conn, &seen, redirect_to));
            }
        });
        Receiver { port, seen, stop }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(mut conn: TcpStream, seen: &Mutex<Vec<String>>, redirect_to: u16) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    seen.lock().unwrap().push(format!("{head}{body}"));
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let answer = |status: &str, headers: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    let out = match path.split('?').next().unwrap_or("") {
        "/hello" => answer("200 OK", "Content-Type: text/plain\r\n", b"hello"),
        "/redirect" => answer(
            "302 Found",
            &format!("Location: http://localhost:{redirect_to}/hello\r\n"),
            b"",
        ),
        "/big" => answer("200 OK", "", &vec![b'x'; 64 * 1024]),
        "/big-chunked" => {
            let mut out =
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
            for _ in 0..16 {
                out.extend_from_slice(b"1000\r\n");
                out.extend_from_slice(&[b'y'; 4096]);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        "/hang" => {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        _ => answer("404 Not Found", "", b"no such path"),
    };
    let _ = conn.write_all(&out);
}

/// Installs `fetcher` as `name` with `rest` (policy, limits, secrets) in its manifest.
fn fetcher(h: &Harness, name: &str, rest: &str) {
    h.install("fetcher", &manifest(name, rest));
}

/// Runs plugin `name` with the requests listed; the report and each request's result.
fn fetch(h: &Harness, name: &str, requests: Value) -> (RunReport, Vec<Value>) {
    let r = h.run(name, &requests.to_string());
    assert_eq!(r.status, Exit::Succeeded, "{}", r.render());
    let details: Vec<Value> = serde_json::from_str(&r.outcome.as_ref().unwrap().details).unwrap();
    (r, details)
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}

fn http_calls(r: &RunReport) -> Vec<&capstan::plugin::HostCall> {
    r.host_calls
        .iter()
        .filter(|c| c.op == "http.request")
        .collect()
}

#[test]
fn an_allowed_request_is_sent_and_recorded_as_allowed() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-ok",
        &format!("[policy]\noutbound = [\"{}\"]\n", server.origin()),
    );
    let url = format!("{}/hello?x=1", server.origin());
    let (r, out) = fetch(
        &h,
        "fetch-ok",
        json!([{"url": url, "headers": [["x-test", "yes"]]}]),
    );
    assert_eq!(out[0]["status"], 200, "{out:?}");
    assert_eq!(out[0]["body"], "hello");
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with("GET /hello?x=1 HTTP/1.1\r\n"),
        "{seen:?}"
    );
    assert!(
        seen[0].to_ascii_lowercase().contains("x-test: yes"),
        "{seen:?}"
    );
    assert!(
        seen[0].contains(&format!("host: 127.0.0.1:{}", server.port))
            || seen[0].contains(&format!("Host: 127.0.0.1:{}", server.port)),
        "{seen:?}"
    );
    let calls = http_calls(&r);
    assert_eq!(calls.len(), 1, "{}", r.render());
    assert_eq!(calls[0].decision, "allow");
    assert_eq!(calls[0].result, "200");
    assert_eq!(calls[0].request, format!("GET {url}"));
    let audit = h.runtime.audit().tail(1).unwrap();
    assert_eq!(audit[0].call.op, "http.request");
    assert_eq!(
        audit[0].call.reason,
        format!(
            "allowed by `{}` in [policy] outbound; sent to 127.0.0.1:{}, answered 200",
            server.origin(),
            server.port
        )
    );
}

#[test]
fn a_url_not_on_the_list_is_denied_naming_the_setting_that_would_allow_it() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(&h, "fetch-none", "");
    fetcher(
        &h,
        "fetch-other",
        "[policy]\noutbound = [\"https://ntfy.sh\"]\n",
    );
    let url = format!("{}/hello", server.origin());
    for name in ["fetch-none", "fetch-other"] {
        let (r, out) = fetch(&h, name, json!([{"url": url}]));
        let e = error_of(&out[0]);
        assert!(e.starts_with("denied: "), "{e}");
        assert!(
            e.contains(&format!("add `{}` to `[policy] outbound`", server.origin())),
            "{e}"
        );
        let calls = http_calls(&r);
        assert_eq!(calls[0].decision, "deny", "{}", r.render());
        assert_eq!(r.denials.len(), 1);
        assert!(r.denials[0].reason.contains("[policy] outbound"));
    }
    assert!(server.requests().is_empty(), "nothing was sent");
}

#[test]
fn a_wildcard_never_reaches_loopback_link_local_or_metadata_addresses() {
    let server = Receiver::start(0);
    let port = server.port;
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-wild",
        &format!("[policy]\noutbound = [\"http://*:{port}\", \"http://*\"]\n"),
    );
    let (_, out) = fetch(
        &h,
        "fetch-wild",
        json!([
            {"url": format!("http://localhost:{port}/hello")},
            {"url": format!("http://127.0.0.1:{port}/hello")},
            {"url": "http://169.254.169.254/latest/meta-data/"},
            {"url": format!("http://[::ffff:127.0.0.1]:{port}/hello")},
            {"url": format!("http://0.0.0.0:{port}/hello")},
        ]),
    );
    let e = error_of(&out[0]);
    assert!(
        e.contains("`localhost` resolves to") && e.contains("loopback"),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "add `http://localhost:{port}` to `[policy] outbound`"
        )),
        "{e}"
    );
    assert!(error_of(&out[1]).contains("loopback"), "{out:?}");
    assert!(error_of(&out[2]).contains("cloud metadata"), "{out:?}");
    assert!(error_of(&out[3]).contains("IPv4-mapped"), "{out:?}");
    assert!(error_of(&out[4]).contains("unspecified"), "{out:?}");
    for o in &out {
        assert!(error_of(o).starts_with("denied: "), "{o}");
    }
    assert!(server.requests().is_empty(), "nothing was sent");

    // Named literally, the same host is reached.
    fetcher(
        &h,
        "fetch-named",
        &format!("[policy]\noutbound = [\"http://localhost:{port}\"]\n"),
    );
    let (_, out) = fetch(
        &h,
        "fetch-named",
        json!([{"url": format!("http://localhost:{port}/hello")}]),
    );
    assert_eq!(out[0]["status"], 200, "{out:?}");
}

#[test]
fn a_redirect_to_another_origin_is_handed_to_the_plugin_not_followed() {
    let target = Receiver::start(0);
    let server = Receiver::start(target.port);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-redirect",
        &format!(
            "[policy]\noutbound = [\"{}\", \"http://localhost:{}\"]\n",
            server.origin(),
            target.port
        ),
    );
    let (r, out) = fetch(
        &h,
        "fetch-redirect",
        json!([{"url": format!("{}/redirect", server.origin())}]),
    );
    assert_eq!(out[0]["status"], 302, "{out:?}");
    assert_eq!(http_calls(&r).len(), 1, "{}", r.render());
    assert!(
        target.requests().is_empty(),
        "the redirect was not followed"
    );
}

#[test]
fn a_response_over_the_size_cap_fails_with_the_limit_named() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-big",
        &format!(
            "[policy]\noutbound = [\"{}\"]\n[limits]\nmax_http_response_bytes = 1024\n",
            server.origin()
        ),
    );
    let (r, out) = fetch(
        &h,
        "fetch-big",
        json!([
            {"url": format!("{}/big", server.origin())},
            {"url": format!("{}/big-chunked", server.origin())},
            {"url": format!("{}/hello", server.origin())},
        ]),
    );
    for o in &out[..2] {
        let e = error_of(o);
        assert!(
            e.contains("larger than 1024") && e.contains("limits.max_http_response_bytes"),
            "{e}"
        );
    }
    assert_eq!(out[2]["status"], 200, "a small answer still fits: {out:?}");
    assert_eq!(http_calls(&r)[0].result, "too-large", "{}", r.render());
}

#[test]
fn the_request_count_cap_refuses_requests_past_it() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-count",
        &format!(
            "[policy]\noutbound = [\"{}\"]\n[limits]\nmax_http_requests = 2\n",
            server.origin()
        ),
    );
    let url = format!("{}/hello", server.origin());
    let (r, out) = fetch(
        &h,
        "fetch-count",
        json!([{"url": url}, {"url": url}, {"url": url}]),
    );
    assert_eq!(out[0]["status"], 200);
    assert_eq!(out[1]["status"], 200);
    let e = error_of(&out[2]);
    assert!(
        e.starts_with("denied: ") && e.contains("limits.max_http_requests"),
        "{e}"
    );
    assert_eq!(server.requests().len(), 2);
    assert_eq!(http_calls(&r).len(), 3);
}

#[test]
fn requests_past_the_count_cap_are_refused_and_only_the_first_refusal_is_recorded() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-flood",
        &format!(
            "[policy]\noutbound = [\"{}\"]\n[limits]\nmax_http_requests = 1\n",
            server.origin()
        ),
    );
    let url = format!("{}/hello", server.origin());
    let requests: Vec<Value> = (0..50).map(|_| json!({ "url": url })).collect();
    let (r, out) = fetch(&h, "fetch-flood", Value::Array(requests));
    assert_eq!(out[0]["status"], 200);
    for o in &out[1..] {
        let e = error_of(o);
        assert!(
            e.starts_with("denied: ") && e.contains("limits.max_http_requests"),
            "{e}"
        );
    }
    assert_eq!(server.requests().len(), 1);
    // The allowed request and the first refusal; the other 48 write nothing.
    assert_eq!(http_calls(&r).len(), 2);
}

#[test]
fn a_server_that_never_answers_times_out_per_request() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-hang",
        &format!(
            "[policy]\noutbound = [\"{}\"]\n[limits]\nhttp_timeout_ms = 300\n",
            server.origin()
        ),
    );
    let started = Instant::now();
    let (r, out) = fetch(
        &h,
        "fetch-hang",
        json!([{"url": format!("{}/hang", server.origin())}]),
    );
    let took = started.elapsed();
    let e = error_of(&out[0]);
    assert!(e.starts_with("timeout: "), "{e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(http_calls(&r)[0].result, "timeout", "{}", r.render());
}

#[test]
fn the_host_header_cannot_be_set_apart_from_the_url() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-host",
        &format!("[policy]\noutbound = [\"{}\"]\n", server.origin()),
    );
    let (_, out) = fetch(
        &h,
        "fetch-host",
        json!([{"url": format!("{}/hello", server.origin()), "headers": [["Host", "internal.example"]]}]),
    );
    let e = error_of(&out[0]);
    assert!(e.starts_with("denied: ") && e.contains("Host"), "{e}");
    assert!(server.requests().is_empty(), "nothing was sent");
}

#[test]
fn a_secret_is_substituted_for_its_bound_origin_only_and_never_recorded() {
    const VALUE: &str = "s3cr3t-Value-4f9a";
    let bound = Receiver::start(0);
    let other = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-secret",
        &format!(
            "[policy]\noutbound = [\"{}\", \"{}\"]\n[secrets.tok]\norigins = [\"{}\"]\n",
            bound.origin(),
            other.origin(),
            bound.origin()
        ),
    );
    let url = format!("{}/hello?key={{{{secret.tok}}}}", bound.origin());
    // Unset: denied, saying how to set it.
    let (_, out) = fetch(&h, "fetch-secret", json!([{"url": url}]));
    assert!(
        error_of(&out[0]).contains("capstan plugin secret set fetch-secret tok"),
        "{out:?}"
    );
    capstan::plugin::secrets::set(
        &h.engine.vault,
        &h.runtime,
        "fetch-secret",
        "tok",
        &capstan::secret::Secret::from_str_owned(VALUE.into()),
    )
    .unwrap();
    let (r, out) = fetch(
        &h,
        "fetch-secret",
        json!([
            {"url": url, "headers": [["authorization", "Bearer {{secret.tok}}"]]},
            {"url": format!("{}/hello?key={{{{secret.tok}}}}", other.origin())},
            {"url": format!("{}/hello", other.origin()), "headers": [["authorization", "{{secret.tok}}"]]},
            {"url": format!("{}/hello?key={{{{secret.nope}}}}", bound.origin())},
        ]),
    );
    assert_eq!(out[0]["status"], 200, "{out:?}");
    let seen = bound.requests();
    assert!(
        seen[0].starts_with(&format!("GET /hello?key={VALUE} ")),
        "{seen:?}"
    );
    assert!(seen[0].contains(&format!("Bearer {VALUE}")), "{seen:?}");
    for o in &out[1..3] {
        let e = error_of(o);
        assert!(
            e.contains(&format!(
                "add `{}` to `[secrets.tok] origins`",
                other.origin()
            )),
            "{e}"
        );
    }
    assert!(error_of(&out[3]).contains("no secret `nope`"), "{out:?}");
    assert!(
        other.requests().is_empty(),
        "nothing went to the other origin"
    );
    // The value is nowhere in what the engine keeps or shows.
    let report = serde_json::to_string(&r).unwrap() + &r.render();
    assert!(!report.contains(VALUE), "{report}");
    assert!(
        report.contains("{{secret.tok}}"),
        "the placeholder is recorded"
    );
    let audit = serde_json::to_string(&h.runtime.audit().tail(50).unwrap()).unwrap();
    assert!(!audit.contains(VALUE), "{audit}");
    let listed =
        capstan::plugin::secrets::list(&h.engine.vault, &h.runtime, "fetch-secret").unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].set);
    assert!(!serde_json::to_string(&listed).unwrap().contains(VALUE));
}

#[test]
fn a_plugin_that_does_not_use_http_still_loads_and_runs() {
    let h = Harness::new();
    h.install("trivial", &manifest("plain", ""));
    assert!(h.run("plain", "").succeeded());
}

#[test]
fn a_secret_set_through_the_cli_and_api_is_used_and_absent_from_records_api_metrics_and_log() {
    use crate::util::{DataDir, Server, assert_success, http, stdout};
    const FIRST: &str = "cli-Secret-9c1d7e";
    const SECOND: &str = "api-Secret-41b0aa";
    let receiver = Receiver::start(0);
    let d = DataDir::with_vault();
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        crate::util::plugin::wasm("fetcher"),
        src.join("plugin.wasm"),
    )
    .unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        manifest(
            "fetch-e2e",
            &format!(
                "[policy]\noutbound = [\"{0}\"]\n[secrets.tok]\norigins = [\"{0}\"]\n",
                receiver.origin()
            ),
        ),
    )
    .unwrap();
    assert_success(
        &d.capstan(&["plugin", "install", src.to_str().unwrap()]),
        "plugin install",
    );
    // Without an engine running: the value from stdin, never from the command line.
    let out = d.capstan_stdin(
        &["plugin", "secret", "set", "fetch-e2e", "tok"],
        format!("{FIRST}\n").as_bytes(),
    );
    assert_success(&out, "plugin secret set");
    let out = d.capstan_stdin(&["plugin", "secret", "set", "fetch-e2e", "nope"], b"x");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("declares no secret `nope`"),
        "{out:?}"
    );

    let server = Server::start_with(&d, |c| {
        c.env("CAPSTAN_LOG", "capstan=debug");
    });
    let auth = format!("Bearer {}", server.admin_token());
    let call = |method: &str, path: &str, body: &str| {
        http(
            &server.addr,
            method,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    let input = json!([{"url": format!("{}/hello?k={{{{secret.tok}}}}", receiver.origin())}]);
    let run = |seen: &mut Vec<String>| {
        let (status, body) = call(
            "POST",
            "/api/plugins/fetch-e2e/run?wait=true&report=true",
            &json!({"input": input.to_string()}).to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ok", "{body}");
        seen.push(body);
        let (_, record) = call(
            "GET",
            &format!("/api/runs/{}", v["id"].as_str().unwrap()),
            "",
        );
        seen.push(record);
    };
    let mut seen = Vec::new();
    run(&mut seen);
    assert!(
        receiver.requests()[0].starts_with(&format!("GET /hello?k={FIRST} ")),
        "{:?}",
        receiver.requests()
    );
    // Replaced over the API; the answer is empty.
    let (status, body) = call(
        "PUT",
        "/api/plugins/fetch-e2e/secrets/tok",
        &json!({"value": SECOND}).to_string(),
    );
    assert_eq!(status, 204, "{body}");
    seen.push(body);
    run(&mut seen);
    assert!(
        receiver.requests()[1].starts_with(&format!("GET /hello?k={SECOND} ")),
        "{:?}",
        receiver.requests()
    );
    let (status, body) = call("GET", "/api/plugins/fetch-e2e/secrets", "");
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["name"], "tok");
    assert_eq!(listed[0]["set"], true);
    seen.push(body);
    for path in [
        "/metrics",
        "/api/audit?tail=100",
        "/api/runs",
        "/api/plugins/fetch-e2e",
    ] {
        let (status, body) = call("GET", path, "");
        assert_eq!(status, 200, "{path}: {body}");
        seen.push(body);
    }
    let metrics = &seen[seen.len() - 4];
    assert!(
        metrics.contains(
            r#"capstan_outbound_requests_total{plugin="fetch-e2e",decision="allow",result="2xx"} 2"#
        ),
        "{metrics}"
    );
    // The CLI against the running engine lists names, never values; rm removes one.
    let out = d.capstan(&["plugin", "secret", "list", "fetch-e2e"]);
    assert_success(&out, "plugin secret list");
    assert!(stdout(&out).contains("tok"), "{}", stdout(&out));
    seen.push(stdout(&out));
    let (status, body) = call(
        "PUT",
        "/api/plugins/fetch-e2e/secrets/tok",
        "{\"value\": \"a\nb\"}",
    );
    assert_eq!(status, 422, "a line break is refused: {body}");
    seen.push(body);
    let huge = json!({"value": "x".repeat(64 * 1024)}).to_string();
    let (status, body) = call("PUT", "/api/plugins/fetch-e2e/secrets/tok", &huge);
    assert_eq!(status, 413, "a body over the route's limit: {body}");
    assert_success(
        &d.capstan(&["plugin", "secret", "rm", "fetch-e2e", "tok"]),
        "plugin secret rm",
    );
    let (_, body) = call("GET", "/api/plugins/fetch-e2e/secrets", "");
    assert!(body.contains("\"set\":false"), "{body}");
    seen.push(server.stop_and_collect_stderr());
    for text in &seen {
        for value in [FIRST, SECOND] {
            assert!(!text.contains(value), "the secret leaked: {text}");
        }
    }
}

#[test]
fn https_verifies_the_server_certificate_against_the_web_roots() {
    // The test TLS endpoint's certificate comes from a private CA: not one of the web's.
    let infra = crate::util::Infra::get();
    let origin = format!(
        "https://{}:{}",
        infra.var("TLS_SERVER_NAME"),
        infra.var("TLS_PORT")
    );
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-tls",
        &format!("[policy]\noutbound = [\"{origin}\"]\n"),
    );
    let (r, out) = fetch(&h, "fetch-tls", json!([{"url": format!("{origin}/_ping")}]));
    let e = error_of(&out[0]);
    assert!(
        e.starts_with("unreachable: ") && e.contains("certificate"),
        "{e}"
    );
    assert_eq!(http_calls(&r)[0].decision, "allow", "{}", r.render());
    assert_eq!(http_calls(&r)[0].result, "unreachable");
}

#[test]
fn a_secret_cannot_stand_in_the_host_or_the_user_part_of_a_url() {
    let server = Receiver::start(0);
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-sneaky",
        &format!(
            "[policy]\noutbound = [\"http://*:{0}\"]\n[secrets.tok]\norigins = [\"http://*:{0}\"]\n",
            server.port
        ),
    );
    capstan::plugin::secrets::set(
        &h.engine.vault,
        &h.runtime,
        "fetch-sneaky",
        "tok",
        &capstan::secret::Secret::from_str_owned("v4lue-x".into()),
    )
    .unwrap();
    let (_, out) = fetch(
        &h,
        "fetch-sneaky",
        json!([
            {"url": format!("http://{{{{secret.tok}}}}.example:{}/hello", server.port)},
            {"url": format!("http://u:{{{{secret.tok}}}}@127.0.0.1:{}/hello", server.port)},
        ]),
    );
    for o in &out {
        let e = error_of(o);
        assert!(
            e.starts_with("denied: ") || e.starts_with("invalid: "),
            "{e}"
        );
        assert!(!e.contains("v4lue-x"), "{e}");
    }
    assert!(server.requests().is_empty(), "nothing was sent");
}

#[test]
fn a_port_nobody_listens_on_is_unreachable_and_recorded_as_such() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = Harness::new();
    fetcher(
        &h,
        "fetch-closed",
        &format!("[policy]\noutbound = [\"http://127.0.0.1:{port}\"]\n"),
    );
    let (r, out) = fetch(
        &h,
        "fetch-closed",
        json!([{"url": format!("http://127.0.0.1:{port}/")}]),
    );
    let e = error_of(&out[0]);
    assert!(
        e.starts_with("unreachable: ")
            && e.contains(&format!("cannot connect to http://127.0.0.1:{port}")),
        "{e}"
    );
    assert_eq!(http_calls(&r)[0].result, "unreachable", "{}", r.render());
}
