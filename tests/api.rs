//! The HTTP API over real HTTP against a real `capstan serve`: devices (secrets write-only),
//! the token check on every route, the OpenAPI document, metrics.

use serde_json::{Value, json};

use crate::util::*;

/// A running engine and its admin token.
struct Api {
    server: Server,
    auth: String,
}

impl Api {
    fn start(data: &DataDir) -> Api {
        // The engine's own log at debug, to check that it holds no secret either.
        let server = Server::start_with(data, |c| {
            c.env("CAPSTAN_LOG", "capstan=debug");
        });
        let auth = format!("Bearer {}", server.admin_token());
        Api { server, auth }
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> (u16, String) {
        http_json(&self.server.addr, &self.auth, method, path, body)
    }

    /// Calls and parses the JSON answer, asserting its status.
    #[track_caller]
    fn json(&self, method: &str, path: &str, body: &Value, want: u16) -> Value {
        let (status, text) = self.call(method, path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        if text.is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Asserts that no response text holds any of the secrets (or a recognisable piece).
#[track_caller]
fn assert_no_secret(seen: &[String], secrets: &[&str]) {
    for text in seen {
        for s in secrets {
            let probe: String = s.trim().chars().take(40).collect();
            assert!(
                !text.contains(&probe),
                "a response contains a secret:\n{text}"
            );
        }
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains("BEGIN CERTIFICATE"),
            "a response contains key material:\n{text}"
        );
    }
}

fn device_names(api: &Api) -> Vec<String> {
    api.json("GET", "/api/devices", &Value::Null, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn devices_round_trip_over_http_and_no_response_holds_a_secret() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let infra = Infra::get();
    let key = read(infra.var("SSH_KEY_ED25519"));
    let password = read(infra.var("SSH_PASSWORD_FILE"));
    let (ca, cert, tls_key) = (
        read(infra.var("TLS_CA")),
        read(infra.var("TLS_CERT")),
        read(infra.var("TLS_KEY")),
    );
    let port: u16 = infra.var("SSH_PORT").parse().unwrap();
    let mut seen = Vec::new();

    // Create an SSH device with a private key: 201, where it lives, secrets by name only.
    let (status, body) = api.call(
        "POST",
        "/api/devices",
        &json!({
            "name": "web1",
            "kind": "ssh",
            "host": infra.var("SSH_HOST4"),
            "port": port,
            "user": infra.var("SSH_USER_KEY"),
            "private_key": key,
            "host_key": read(infra.var("SSH_HOST_KEY_PUB")),
        }),
    );
    assert_eq!(status, 201, "{body}");
    seen.push(body.clone());
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["name"], "web1");
    assert_eq!(created["auth"], "key", "inferred from the key");
    assert_eq!(created["secrets"], json!(["private-key"]));

    // The stored key works: the check logs in over the real sshd.
    let report = api.json("GET", "/api/docker/check/web1", &Value::Null, 200);
    assert_eq!(report["connected"], true, "{report}");
    seen.push(report.to_string());

    // List and show.
    let (status, body) = api.call("GET", "/api/devices", &Value::Null);
    assert_eq!(status, 200);
    seen.push(body.clone());
    assert!(body.contains("web1") && body.contains("local"), "{body}");
    let (status, body) = api.call("GET", "/api/devices/web1", &Value::Null);
    assert_eq!(status, 200);
    seen.push(body);

    // Switch to password auth as another user: the key goes, the password replaces it.
    let (status, body) = api.call(
        "PATCH",
        "/api/devices/web1",
        &json!({ "user": infra.var("SSH_USER_PASSWORD"), "password": password }),
    );
    assert_eq!(status, 200, "{body}");
    seen.push(body.clone());
    let updated: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(updated["auth"], "password");
    assert_eq!(updated["secrets"], json!(["password"]));
    assert_eq!(updated["id"], created["id"], "same device");
    let report = api.json("GET", "/api/docker/check/web1", &Value::Null, 200);
    assert_eq!(
        report["connected"], true,
        "the new password is used: {report}"
    );
    seen.push(report.to_string());

    // The device's own tunnel: set, checked through it, refused with sudo, cleared.
    let updated = api.json(
        "PATCH",
        "/api/devices/web1",
        &json!({ "ssh_tunnel": "dial-stdio" }),
        200,
    );
    assert_eq!(updated["ssh_tunnel"], "dial-stdio");
    let report = api.json("GET", "/api/docker/check/web1", &Value::Null, 200);
    assert_eq!(report["connected"], true, "{report}");
    api.json(
        "PATCH",
        "/api/devices/web1",
        &json!({ "ssh_tunnel": "streamlocal", "sudo": true }),
        422,
    );
    let updated = api.json(
        "PATCH",
        "/api/devices/web1",
        &json!({ "ssh_tunnel": null }),
        200,
    );
    assert_eq!(updated["ssh_tunnel"], Value::Null);
    assert_eq!(updated["sudo"], false);

    // Rename; the old name is gone.
    let renamed = api.json(
        "PATCH",
        "/api/devices/web1",
        &json!({ "name": "web2" }),
        200,
    );
    assert_eq!(renamed["name"], "web2");
    api.json("GET", "/api/devices/web1", &Value::Null, 404);

    // A TLS device: three PEM secrets, none of them returned.
    let (status, body) = api.call(
        "POST",
        "/api/devices",
        &json!({
            "name": "edge",
            "kind": "tls",
            "host": infra.var("TLS_HOST"),
            "port": infra.var("TLS_PORT").parse::<u16>().unwrap(),
            "tls_server_name": infra.var("TLS_SERVER_NAME"),
            "tls_ca": ca, "tls_cert": cert, "tls_key": tls_key,
        }),
    );
    assert_eq!(status, 201, "{body}");
    seen.push(body.clone());
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["secrets"],
        json!(["tls-ca", "tls-cert", "tls-key"])
    );
    let report = api.json("GET", "/api/docker/check/edge", &Value::Null, 200);
    assert_eq!(report["connected"], true, "{report}");
    seen.push(report.to_string());
    let (_, body) = api.call("GET", "/api/devices", &Value::Null);
    seen.push(body);

    // Delete: 204, then gone, and a second delete is 404.
    let (status, body) = api.call("DELETE", "/api/devices/web2", &Value::Null);
    assert_eq!((status, body.as_str()), (204, ""));
    api.json("GET", "/api/devices/web2", &Value::Null, 404);
    api.json("DELETE", "/api/devices/web2", &Value::Null, 404);
    assert_eq!(device_names(&api), ["edge", "local"]);

    assert_no_secret(&seen, &[&key, &password, &ca, &cert, &tls_key]);

    // The engine's own output never shows them either.
    let log = api.server.stop_and_collect_stderr();
    assert_no_secret(&[log], &[&key, &password, &ca, &cert, &tls_key]);
}

#[test]
fn an_invalid_device_setting_is_named_in_the_error_body() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let cases = [
        (
            json!({ "name": "nohost", "kind": "ssh", "user": "u", "auth": "agent" }),
            Some("host"),
        ),
        (
            json!({ "name": "x", "kind": "ssh", "host": "h", "user": "u", "auth": "key" }),
            Some("private_key"),
        ),
        // About no one setting: no `setting`.
        (json!({ "name": "bad name!", "kind": "local" }), None),
        (json!({ "name": "k" }), None),
    ];
    for (body, setting) in cases {
        let err = api.json("POST", "/api/devices", &body, 422);
        assert_eq!(err["error"]["kind"], "invalid", "{err}");
        assert!(err["error"]["message"].is_string(), "{err}");
        match setting {
            Some(s) => assert_eq!(err["error"]["setting"], s, "{body}: {err}"),
            None => assert!(err["error"].get("setting").is_none(), "{body}: {err}"),
        }
    }
}

#[test]
fn an_invalid_device_is_refused_with_422_saying_why_and_nothing_is_stored() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let secret = "s3cret-value-never-echoed";
    let cases = [
        (
            json!({ "name": "nohost", "kind": "ssh", "user": "u", "password": secret }),
            "need a host: give `host`",
        ),
        (
            json!({ "name": "x", "kind": "ssh", "host": "h", "user": "u", "auth": "key" }),
            "key auth needs `private_key`",
        ),
        (
            json!({ "name": "bad name!", "kind": "local" }),
            "must be 1-64 characters",
        ),
        (json!({ "kind": "local" }), "needs a name"),
        (json!({ "name": "k" }), "needs a kind"),
        (
            json!({ "name": "t", "kind": "tls", "host": "h", "tls_ca": secret, "tls_cert": secret, "tls_key": secret }),
            "PEM",
        ),
        (
            json!({ "name": "typo", "kind": "local", "pasword": secret }),
            "unknown field `pasword`",
        ),
        // A secret typed into the wrong field is not quoted back.
        (
            json!({ "name": "p", "kind": "ssh", "host": "h", "user": "u", "port": secret }),
            "expected u16",
        ),
    ];
    for (body, says) in cases {
        let (status, text) = api.call("POST", "/api/devices", &body);
        assert_eq!(status, 422, "{body}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(err["error"]["kind"], "invalid", "{text}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{body}: expected {says:?} in {msg:?}");
        assert!(
            !msg.contains("--"),
            "API errors name body fields, not CLI flags: {msg}"
        );
        assert!(!text.contains(secret), "{text}");
    }
    let (status, text) = api.call("POST", "/api/devices", &Value::Null);
    assert_eq!(status, 422, "an empty body: {text}");
    assert_eq!(device_names(&api), ["local"], "nothing was stored");

    // An update that would make the device invalid changes nothing.
    let before = api.json("GET", "/api/devices/local", &Value::Null, 200);
    let err = api.json(
        "PATCH",
        "/api/devices/local",
        &json!({ "docker_host": "http://nope" }),
        422,
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unix:///"),
        "{err}"
    );
    let err = api.json(
        "PATCH",
        "/api/devices/local",
        &json!({ "kind": "ssh" }),
        422,
    );
    assert!(err.to_string().contains("kind cannot change"), "{err}");
    assert_eq!(
        api.json("GET", "/api/devices/local", &Value::Null, 200),
        before
    );
    let err = api.json("PATCH", "/api/devices/nope", &json!({}), 404);
    assert_eq!(err["error"]["message"], "no device named \"nope\"", "{err}");
}

#[test]
fn a_stored_device_without_a_host_key_is_pinned_only_when_the_check_asks_to_trust_it() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let infra = Infra::get();
    let presented = read(infra.var("SSH_HOST_KEY_PUB"));
    api.json(
        "POST",
        "/api/devices",
        &json!({
            "name": "fresh",
            "kind": "ssh",
            "host": infra.var("SSH_HOST4"),
            "port": infra.var("SSH_PORT").parse::<u16>().unwrap(),
            "user": infra.var("SSH_USER_KEY"),
            "private_key": read(infra.var("SSH_KEY_ED25519")),
        }),
        201,
    );

    // A plain check refuses the unknown key and shows it; nothing is pinned.
    let report = api.json("GET", "/api/docker/check/fresh", &Value::Null, 502);
    assert_eq!(report["error"]["kind"], "host-key-unknown", "{report}");
    assert_eq!(report["host_key"]["trusted_now"], false, "{report}");
    let shown = report["host_key"]["key"].as_str().unwrap().to_string();
    assert_eq!(
        shown.split_whitespace().take(2).collect::<Vec<_>>(),
        presented.split_whitespace().take(2).collect::<Vec<_>>()
    );
    let dev = api.json("GET", "/api/devices/fresh", &Value::Null, 200);
    assert_eq!(dev["host_key"], Value::Null);
    // So does a POST without the option (an empty body means no options).
    let (status, body) = api.call("POST", "/api/docker/check/fresh", &Value::Null);
    assert_eq!(status, 502, "{body}");
    let (status, body) = http(
        &api.server.addr,
        "POST",
        "/api/docker/check/fresh",
        &[("Authorization", &api.auth)],
        b"null",
    );
    assert_eq!(status, 502, "`null` is no options too: {body}");

    // Bad options are refused before anything happens.
    let err = api.json(
        "POST",
        "/api/docker/check/fresh",
        &json!({ "trust": true }),
        422,
    );
    assert!(err.to_string().contains("trust"), "{err}");
    api.json(
        "POST",
        "/api/docker/check/fresh",
        &json!({ "timeout_secs": 0 }),
        422,
    );
    let err = api.json(
        "POST",
        "/api/docker/check/local",
        &json!({ "trust_host_key": true }),
        422,
    );
    assert!(err.to_string().contains("ssh devices"), "{err}");
    api.json(
        "POST",
        "/api/docker/check/nope",
        &json!({ "trust_host_key": true }),
        404,
    );

    // Asked to trust: the check connects and the key is pinned.
    let report = api.json(
        "POST",
        "/api/docker/check/fresh",
        &json!({ "trust_host_key": true, "timeout_secs": 20 }),
        200,
    );
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(report["host_key"]["trusted_now"], true, "{report}");
    let dev = api.json("GET", "/api/devices/fresh", &Value::Null, 200);
    assert_eq!(dev["host_key"].as_str(), Some(shown.as_str()));

    // From now on the plain check passes against the pinned key.
    let report = api.json("GET", "/api/docker/check/fresh", &Value::Null, 200);
    assert_eq!(report["host_key"]["pinned"], true, "{report}");

    // A pinned key is never replaced: pin another one and trust refuses to connect.
    api.json(
        "PATCH",
        "/api/devices/fresh",
        &json!({ "host_key": read(infra.var("SSH_OTHER_HOST_KEY_PUB")) }),
        200,
    );
    let report = api.json(
        "POST",
        "/api/docker/check/fresh",
        &json!({ "trust_host_key": true }),
        502,
    );
    assert_eq!(report["error"]["kind"], "host-key-mismatch", "{report}");
    let dev = api.json("GET", "/api/devices/fresh", &Value::Null, 200);
    assert_ne!(dev["host_key"].as_str(), Some(shown.as_str()));
}

#[test]
fn a_second_device_with_a_taken_name_is_refused_with_409() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let err = api.json(
        "POST",
        "/api/devices",
        &json!({ "name": "local", "kind": "local" }),
        409,
    );
    assert_eq!(err["error"]["kind"], "conflict");
    api.json(
        "POST",
        "/api/devices",
        &json!({ "name": "other", "kind": "local", "docker_host": "unix:///var/run/docker.sock" }),
        201,
    );
    api.json(
        "PATCH",
        "/api/devices/other",
        &json!({ "name": "local" }),
        409,
    );
    assert_eq!(device_names(&api), ["local", "other"]);
}

#[test]
fn every_route_answers_401_without_a_valid_token_and_only_healthz_is_open() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let addr = &api.server.addr;
    for route in capstan::api::ROUTES {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer cap_00000000_nope")],
            vec![("Authorization", "Basic YWRtaW46YWRtaW4=")],
            vec![("Authorization", api.auth.trim_start_matches("Bearer "))],
        ] {
            let (status, body) = http(addr, route.method, route.example, &headers, b"{}");
            assert_eq!(
                status, 401,
                "{} {} with {headers:?}: {body}",
                route.method, route.example
            );
            assert!(!body.contains("local"), "a 401 leaks nothing: {body}");
            let err: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(err["error"]["kind"], "unauthorized");
        }
    }
    // Unknown routes are behind the token too, and answer JSON errors with it.
    assert_eq!(http(addr, "GET", "/api/nope", &[], b"").0, 401);
    assert_eq!(http(addr, "GET", "/nope", &[], b"").0, 401);
    let err = api.json("GET", "/api/nope", &Value::Null, 404);
    assert_eq!(err["error"]["kind"], "not-found");
    let err = api.json("PUT", "/api/devices", &Value::Null, 405);
    assert_eq!(err["error"]["kind"], "method-not-allowed");

    let (status, body) = http(addr, "GET", capstan::api::HEALTH_PATH, &[], b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );

    // With the token, every route that only reads answers (a stream is not read to its end).
    for route in capstan::api::ROUTES
        .iter()
        .filter(|r| r.method == "GET" && r.path != "/api/runs/events")
    {
        let (status, body) = api.call("GET", route.example, &Value::Null);
        assert!(
            status < 400 || status == 404,
            "GET {} with the token: {status} {body}",
            route.example
        );
        if status == 404 {
            let err: Value = serde_json::from_str(&body).unwrap();
            assert_ne!(
                err["error"]["message"], "no such API route",
                "{}",
                route.path
            );
        }
    }
}

#[test]
fn the_openapi_document_describes_every_route_and_the_token() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let doc = api.json("GET", "/api/openapi.json", &Value::Null, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let mut described: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| !matches!(m.as_str(), "parameters" | "summary" | "description"))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    described.sort();
    let mut routed: Vec<(String, String)> = capstan::api::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .chain([
            ("GET".into(), capstan::api::HEALTH_PATH.into()),
            ("POST".into(), capstan::api::HOOK_PATH.into()),
        ])
        .collect();
    routed.sort();
    assert_eq!(described, routed);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    // Secrets are write-only in the schema.
    assert_eq!(
        doc["components"]["schemas"]["DeviceBody"]["properties"]["private_key"]["writeOnly"], true,
        "{}",
        doc["components"]["schemas"]["DeviceBody"]
    );
}

/// A request body over the route's limit is refused with the JSON error, not a bare 413.
#[test]
fn a_body_over_the_limit_is_refused_with_a_json_413() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let big = json!({ "name": "big", "kind": "local", "host": "x".repeat(3 << 20) });
    let (status, text) = api.call("POST", "/api/devices", &big);
    assert_eq!(status, 413, "{}", &text[..text.len().min(200)]);
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["kind"], "too-large");
}

/// Follows `GET /api/runs/events` on its own thread: each NDJSON line as a value.
fn follow(addr: &str, auth: &str, path: &str) -> std::sync::mpsc::Receiver<Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        // Status line and headers.
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        // Chunked body: size line, data, CRLF; the data holds whole NDJSON lines.
        let mut pending = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Ok(n) = usize::from_str_radix(line.trim(), 16) else {
                return;
            };
            if n == 0 {
                return;
            }
            let mut chunk = vec![0; n + 2];
            if std::io::Read::read_exact(&mut r, &mut chunk).is_err() {
                return;
            }
            pending.extend_from_slice(&chunk[..n]);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = pending.drain(..=nl).collect();
                if tx.send(serde_json::from_slice(&l).unwrap()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The Prometheus sample value of the first line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const PROBE_MANIFEST: &str = r#"
name = "apiprobe"
version = "0.0.1"
description = "the probe test plugin, installed over the API"

[[triggers.webhook]]
name = "api-hook"
auth = "bearer"

[policy]
CONTAINERS = 1
devices = ["local"]
"#;

#[test]
fn plugins_install_run_and_remove_over_http_with_runs_hooks_and_metrics() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let wasm = std::fs::read(crate::util::plugin::wasm("probe")).unwrap();
    assert_eq!(
        api.json("GET", "/api/plugins", &Value::Null, 200),
        json!([])
    );

    // Install: 201, the record, and the hook's generated secret this once.
    let (status, body) = api.call(
        "POST",
        "/api/plugins",
        &json!({ "manifest": PROBE_MANIFEST, "wasm_base64": base64(&wasm) }),
    );
    assert_eq!(status, 201, "{body}");
    let installed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(installed["plugin"]["name"], "apiprobe");
    assert_eq!(installed["plugin"]["size"], wasm.len());
    assert_eq!(installed["plugin"]["loaded"], true);
    let secrets = installed["generated_secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 1, "{installed}");
    assert_eq!(secrets[0]["hook"], "api-hook");
    let hook_secret = secrets[0]["secret"].as_str().unwrap().to_string();
    assert!(hook_secret.len() >= 32, "{hook_secret}");

    let list = api.json("GET", "/api/plugins", &Value::Null, 200);
    assert_eq!(list[0]["name"], "apiprobe");
    let one = api.json("GET", "/api/plugins/apiprobe", &Value::Null, 200);
    assert_eq!(one["sha256"], installed["plugin"]["sha256"]);
    api.json("GET", "/api/plugins/nope", &Value::Null, 404);

    // Hooks: name, plugin, auth kind; never the secret.
    let (status, hooks) = api.call("GET", "/api/hooks", &Value::Null);
    assert_eq!(status, 200);
    assert!(!hooks.contains(&hook_secret), "{hooks}");
    let hooks: Value = serde_json::from_str(&hooks).unwrap();
    assert_eq!(
        hooks,
        json!([{ "name": "api-hook", "plugin": "apiprobe", "auth": "bearer", "url_path": "/hooks/api-hook", "rejects_replays": false, "wait_response": "summary" }])
    );

    // With ?secrets=true, which secrets a hook accepts: its state, never the secret.
    let (status, with_state) = api.call("GET", "/api/hooks?secrets=true", &Value::Null);
    assert_eq!(status, 200);
    assert!(!with_state.contains(&hook_secret), "{with_state}");
    let with_state: Value = serde_json::from_str(&with_state).unwrap();
    assert_eq!(with_state[0]["secrets"], "current", "{with_state}");

    // The audit log: the last records, never more than a bounded number per answer.
    assert!(api.json("GET", "/api/audit", &Value::Null, 200).is_array());
    let too_many = api.json("GET", "/api/audit?tail=10001", &Value::Null, 422);
    assert!(
        too_many["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tail is at most 10000"),
        "{too_many}"
    );

    // Follow the plugin's runs while they happen.
    let events = follow(
        &api.server.addr,
        &api.auth,
        "/api/runs/events?plugin=apiprobe",
    );
    // The subscription is taken when the request is handled; give it that moment.
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Run and wait: the record, ended, made by this token.
    let calls = json!([{ "op": "list-containers", "device": "local" }]).to_string();
    let record = api.json(
        "POST",
        "/api/plugins/apiprobe/run?wait=true&timeout=60",
        &json!({ "input": calls }),
        200,
    );
    assert_eq!(record["status"], "ok", "{record}");
    assert_eq!(record["plugin"], "apiprobe");
    assert_eq!(
        record["trigger"],
        json!({ "kind": "manual", "by": "api:admin" })
    );
    assert!(
        !record["host_calls"].as_array().unwrap().is_empty(),
        "{record}"
    );

    // Run without waiting: 202 and the id; the record ends soon.
    let started = api.json(
        "POST",
        "/api/plugins/apiprobe/run",
        &json!({ "input": "[]" }),
        202,
    );
    let id = started["run_id"].as_str().unwrap().to_string();
    let mut second = Value::Null;
    for _ in 0..100 {
        second = api.json("GET", &format!("/api/runs/{id}"), &Value::Null, 200);
        if second["status"] != "queued" && second["status"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(second["status"], "ok", "{second}");

    // The follower saw both runs go from queued to ok, and nothing of other plugins.
    let mut seen: Vec<(String, String)> = Vec::new();
    while !(seen.contains(&(id.clone(), "ok".into()))
        && seen.contains(&(record["id"].as_str().unwrap().into(), "ok".into())))
    {
        let v = events
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no update in time; seen {seen:?}"));
        assert_eq!(v["plugin"], "apiprobe");
        seen.push((
            v["id"].as_str().unwrap().to_string(),
            v["status"].as_str().unwrap().to_string(),
        ));
    }
    assert!(seen.contains(&(id.clone(), "queued".into())), "{seen:?}");

    // Pages: newest first, `next` leads to the older one.
    let page = api.json(
        "GET",
        "/api/runs?plugin=apiprobe&limit=1",
        &Value::Null,
        200,
    );
    assert_eq!(page["runs"][0]["id"], id.as_str(), "newest first");
    let next = page["next"].as_str().expect("a next page").to_string();
    let page = api.json(
        "GET",
        &format!("/api/runs?plugin=apiprobe&limit=1&before={next}"),
        &Value::Null,
        200,
    );
    assert_eq!(page["runs"][0]["id"], record["id"]);
    assert!(page["next"].is_null(), "{page}");
    api.json("GET", "/api/runs?before=nope", &Value::Null, 422);
    api.json("GET", "/api/runs/not-a-run", &Value::Null, 422);
    api.json(
        "GET",
        &format!("/api/runs/{}", uuid::Uuid::now_v7()),
        &Value::Null,
        404,
    );

    // Metrics: this plugin's runs, durations and host calls; the SSH gauges. (A run's
    // record ends a moment before it is counted: look again briefly.)
    let mut metrics = String::new();
    for _ in 0..50 {
        let (status, text) = api.call("GET", "/metrics", &Value::Null);
        assert_eq!(status, 200, "{text}");
        metrics = text;
        if sample(
            &metrics,
            r#"capstan_runs_total{plugin="apiprobe",status="ok"}"#,
        ) == Some(2.0)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        sample(
            &metrics,
            r#"capstan_runs_total{plugin="apiprobe",status="ok"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"capstan_run_duration_seconds_count{plugin="apiprobe"}"#
        ),
        Some(2.0)
    );
    assert!(
        metrics.contains("capstan_host_calls_total{op="),
        "{metrics}"
    );
    for gauge in ["capstan_ssh_sessions ", "capstan_ssh_channels "] {
        assert!(sample(&metrics, gauge).is_some(), "{gauge}: {metrics}");
    }

    // A delivery to the hook, and one to a hook that does not exist.
    let (status, body) = http(
        &api.server.addr,
        "POST",
        "/hooks/api-hook",
        &[("Authorization", &format!("Bearer {hook_secret}"))],
        b"{}",
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        http(&api.server.addr, "POST", "/hooks/no-such-hook", &[], b"{}").0,
        404
    );

    // Deliveries by hook and result; the unknown hook's name is not kept.
    let (_, metrics) = api.call("GET", "/metrics", &Value::Null);
    assert!(!metrics.contains("no-such-hook"), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            r#"capstan_webhook_deliveries_total{hook="api-hook",result="accepted"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"capstan_webhook_deliveries_total{hook="",result="unknown-hook"}"#
        ),
        Some(1.0)
    );
    assert!(!metrics.contains(&hook_secret));

    // Remove: 204; gone with its hook; runs stay in the history.
    let (status, _) = api.call("DELETE", "/api/plugins/apiprobe", &Value::Null);
    assert_eq!(status, 204);
    api.json("GET", "/api/plugins/apiprobe", &Value::Null, 404);
    api.json("DELETE", "/api/plugins/apiprobe", &Value::Null, 404);
    assert_eq!(api.json("GET", "/api/hooks", &Value::Null, 200), json!([]));
    api.json("POST", "/api/plugins/apiprobe/run", &json!({}), 404);
    api.json("GET", &format!("/api/runs/{id}"), &Value::Null, 200);

    let log = api.server.stop_and_collect_stderr();
    assert!(!log.contains(&hook_secret), "the log holds the hook secret");
}

#[test]
fn an_install_that_is_not_a_plugin_is_refused_with_422_and_nothing_is_installed() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let wasm = base64(&std::fs::read(crate::util::plugin::wasm("trivial")).unwrap());
    let cases = [
        (
            json!({ "manifest": "name = \"t\"\nversion = \"0.0.1\"\n", "wasm_base64": "not base64!" }),
            "not base64",
        ),
        (
            json!({ "manifest": "name = \"t\"\nversion = \"0.0.1\"\n", "wasm_base64": base64(b"\0asm but not really") }),
            "component",
        ),
        (
            json!({ "manifest": "name = \"t\"\nversion = \"0.0.1\"\nbogus = 1\n", "wasm_base64": wasm }),
            "bogus",
        ),
        (
            json!({ "manifest": "name = \"t\"\nversion = \"0.0.1\"\n[policy]\ndevices = [\"nowhere\"]\n", "wasm_base64": wasm }),
            "nowhere",
        ),
        (json!({ "manifest": "name = \"t\"" }), "wasm_base64"),
    ];
    for (body, says) in cases {
        let (status, text) = api.call("POST", "/api/plugins", &body);
        assert_eq!(status, 422, "{text}");
        assert!(text.contains(says), "expected {says:?} in {text}");
    }
    assert_eq!(
        api.json("GET", "/api/plugins", &Value::Null, 200),
        json!([])
    );

    // A run of a plugin that is not installed, and bad run requests.
    api.json("POST", "/api/plugins/t/run", &json!({}), 404);
    let ok = json!({ "manifest": "name = \"t\"\nversion = \"0.0.1\"\n", "wasm_base64": wasm });
    api.json("POST", "/api/plugins", &ok, 201);
    api.json(
        "POST",
        "/api/plugins/t/run?wait=true&timeout=0",
        &json!({}),
        422,
    );
    api.json("POST", "/api/plugins/t/run", &json!({ "inptu": "x" }), 422);
    let record = api.json(
        "POST",
        "/api/plugins/t/run?wait=true",
        &json!({ "input": "hello" }),
        200,
    );
    assert_eq!(record["status"], "ok", "{record}");
}

#[test]
fn metrics_count_the_pooled_ssh_session_and_its_channels() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let infra = Infra::get();
    api.json(
        "POST",
        "/api/devices",
        &json!({
            "name": "sshbox",
            "kind": "ssh",
            "host": infra.var("SSH_HOST4"),
            "port": infra.var("SSH_PORT").parse::<u16>().unwrap(),
            "user": infra.var("SSH_USER_KEY"),
            "private_key": read(infra.var("SSH_KEY_ED25519")),
            "host_key": read(infra.var("SSH_HOST_KEY_PUB")),
        }),
        201,
    );
    let manifest = "name = \"sshprobe\"\nversion = \"0.0.1\"\n[policy]\nCONTAINERS = 1\ndevices = [\"sshbox\"]\n";
    let wasm = std::fs::read(crate::util::plugin::wasm("probe")).unwrap();
    api.json(
        "POST",
        "/api/plugins",
        &json!({ "manifest": manifest, "wasm_base64": base64(&wasm) }),
        201,
    );
    let gauges = |api: &Api| {
        let (_, m) = api.call("GET", "/metrics", &Value::Null);
        (
            sample(&m, "capstan_ssh_sessions ").unwrap(),
            sample(&m, "capstan_ssh_channels ").unwrap(),
        )
    };
    assert_eq!(gauges(&api), (0.0, 0.0), "nothing connected yet");

    let calls = json!([{ "op": "list-containers", "device": "sshbox" }]).to_string();
    let record = api.json(
        "POST",
        "/api/plugins/sshprobe/run?wait=true",
        &json!({ "input": calls }),
        200,
    );
    assert_eq!(record["status"], "ok", "{record}");
    let (sessions, channels) = gauges(&api);
    assert_eq!(sessions, 1.0, "one session to sshbox, kept");
    assert!(
        channels >= 1.0,
        "its dial-stdio channel is kept: {channels}"
    );

    // Deleting the device drops its pooled connections.
    api.json("DELETE", "/api/plugins/sshprobe", &Value::Null, 204);
    api.json("DELETE", "/api/devices/sshbox", &Value::Null, 204);
    assert_eq!(gauges(&api), (0.0, 0.0));
}
