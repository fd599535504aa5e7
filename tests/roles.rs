//! Token roles and device scopes against a real `capstan serve`: every route of
//! `capstan::api::ROUTES` with every role (driven by the table, so a new route cannot be
//! left out), and what a device-scoped viewer or operator sees, checks and runs.

use serde_json::{Value, json};

use crate::util::*;
use capstan::token::Role;

/// `capstan token create NAME --role ROLE [--devices GLOBS]` on the stopped engine's data
/// directory; the token printed.
fn create_token(data: &DataDir, name: &str, role: &str, devices: Option<&str>) -> String {
    let mut args = vec!["token", "create", name, "--role", role];
    if let Some(d) = devices {
        args.extend(["--devices", d]);
    }
    let out = data.capstan(&args);
    assert_success(&out, "token create");
    let token = stdout(&out).trim().to_string();
    assert!(token.starts_with("cap_"), "{token}");
    format!("Bearer {token}")
}

/// The status line of an answer only (a stream such as `/api/runs/events` never ends).
fn status_of(addr: &str, method: &str, path: &str, auth: &str) -> u16 {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let body = b"{}";
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {line:?}"))
}

/// Opens a streaming GET and reads its head: once it is read, the handler has subscribed.
fn open_stream(addr: &str, auth: &str, path: &str) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\r\n"
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    r
}

/// The next JSON line of a chunked NDJSON stream (chunk sizes skipped).
fn next_json_line(r: &mut std::io::BufReader<std::net::TcpStream>) -> Value {
    use std::io::BufRead;
    loop {
        let mut line = String::new();
        assert_ne!(r.read_line(&mut line).unwrap(), 0, "the stream ended");
        if line.starts_with('{') {
            return serde_json::from_str(line.trim()).unwrap();
        }
    }
}

#[test]
fn every_route_refuses_exactly_the_roles_below_the_one_it_declares() {
    let data = DataDir::empty();
    let tokens: Vec<(Role, String)> = Role::ALL
        .iter()
        .map(|r| (*r, create_token(&data, r.as_str(), r.as_str(), None)))
        .collect();
    let server = Server::start(&data);
    let addr = &server.addr;
    // Viewer first, admin last: what admin changes (the device `local` removed) comes
    // after the lower roles were refused or answered.
    for (role, auth) in &tokens {
        for route in capstan::api::ROUTES {
            let need = capstan::api::route_role(route.method, route.path);
            assert_eq!(need, Some(route.role), "{} {}", route.method, route.path);
            let what = format!("{} {} as {role}", route.method, route.example);
            if *role < route.role {
                let (status, body) = http_json(addr, auth, route.method, route.example, &json!({}));
                assert_eq!(status, 403, "{what}: {body}");
                let err: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(err["error"]["kind"], "forbidden", "{what}");
                let message = err["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains(&format!("has role {role}"))
                        && message.contains(&format!("{} {}", route.method, route.path))
                        && message.ends_with(&format!("needs {}", route.role)),
                    "{what}: {message}"
                );
            } else {
                let status = status_of(addr, route.method, route.example, auth);
                assert!(status != 403 && status != 401, "{what}: {status}");
            }
        }
    }
}

const NEAR: &str = r#"
name = "near"
version = "0.0.1"
description = "reaches the local device only"

[policy]
CONTAINERS = 1
devices = ["local"]
"#;

const FAR: &str = r#"
name = "far"
version = "0.0.1"
description = "reaches every device"

[[triggers.webhook]]
name = "far-hook"
auth = "bearer"

[policy]
CONTAINERS = 1
devices = ["*"]
"#;

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect()
}

#[test]
fn a_device_scoped_token_sees_checks_and_runs_only_what_its_devices_cover() {
    let data = DataDir::empty();
    let admin = create_token(&data, "admin", "admin", None);
    let local_viewer = create_token(&data, "local-viewer", "viewer", Some("local"));
    let local_ops = create_token(&data, "local-ops", "operator", Some("local,lab-*"));
    let prod_ops = create_token(&data, "prod-ops", "operator", Some("prod-*"));
    let server = Server::start(&data);
    let addr = &server.addr;
    let call = |auth: &str, method: &str, path: &str, body: Value, want: u16| -> Value {
        let (status, text) = http_json(addr, auth, method, path, &body);
        assert_eq!(status, want, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };

    // A second device, on the same local daemon, named into the prod scope.
    call(
        &admin,
        "POST",
        "/api/devices",
        json!({"name": "prod-1", "kind": "local"}),
        201,
    );
    let wasm = base64(&std::fs::read(crate::util::plugin::wasm("trivial")).unwrap());
    let mut hook_secret = String::new();
    for manifest in [NEAR, FAR] {
        let installed = call(
            &admin,
            "POST",
            "/api/plugins",
            json!({"manifest": manifest, "wasm_base64": wasm}),
            201,
        );
        if let Some(s) = installed["generated_secrets"][0]["secret"].as_str() {
            hook_secret = s.to_string();
        }
    }

    // Devices: each scoped token lists and reads only its own; another answers 404 as a
    // device that does not exist does.
    assert_eq!(
        names(&call(&admin, "GET", "/api/devices", Value::Null, 200)),
        ["local", "prod-1"]
    );
    assert_eq!(
        names(&call(
            &local_viewer,
            "GET",
            "/api/devices",
            Value::Null,
            200
        )),
        ["local"]
    );
    assert_eq!(
        names(&call(&prod_ops, "GET", "/api/devices", Value::Null, 200)),
        ["prod-1"]
    );
    let hidden = call(&prod_ops, "GET", "/api/devices/local", Value::Null, 404);
    let missing = call(&prod_ops, "GET", "/api/devices/nope", Value::Null, 404);
    assert_eq!(hidden["error"]["kind"], missing["error"]["kind"]);
    assert_eq!(hidden["error"]["message"], "no device named \"local\"");

    // Checks: an operator checks its devices, not the others.
    let report = call(
        &prod_ops,
        "POST",
        "/api/docker/check/prod-1",
        json!({}),
        200,
    );
    assert_eq!(report["connected"], true, "{report}");
    call(&prod_ops, "POST", "/api/docker/check/local", json!({}), 404);
    call(
        &prod_ops,
        "GET",
        "/api/docker/check/local",
        Value::Null,
        404,
    );
    // Pinning a host key changes the device: admin only.
    let pin = call(
        &local_ops,
        "POST",
        "/api/docker/check/local",
        json!({"trust_host_key": true}),
        403,
    );
    assert!(
        pin["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs admin"),
        "{pin}"
    );

    // Plugins: a scoped token sees and runs only the plugins whose every device it sees.
    assert_eq!(
        names(&call(&admin, "GET", "/api/plugins", Value::Null, 200)),
        ["far", "near"]
    );
    assert_eq!(
        names(&call(&local_ops, "GET", "/api/plugins", Value::Null, 200)),
        ["near"]
    );
    assert!(
        names(&call(&prod_ops, "GET", "/api/plugins", Value::Null, 200)).is_empty(),
        "near reaches local, far every device"
    );
    call(&local_ops, "GET", "/api/plugins/far", Value::Null, 404);
    call(
        &local_ops,
        "GET",
        "/api/plugins/far/secrets",
        Value::Null,
        404,
    );
    let near_run = call(
        &local_ops,
        "POST",
        "/api/plugins/near/run?wait=true",
        json!({}),
        200,
    );
    assert_eq!(near_run["status"], "ok", "{near_run}");
    call(&local_ops, "POST", "/api/plugins/far/run", json!({}), 404);
    call(&prod_ops, "POST", "/api/plugins/near/run", json!({}), 404);
    // A viewer runs nothing, whatever it covers.
    let refused = call(
        &local_viewer,
        "POST",
        "/api/plugins/near/run",
        json!({}),
        403,
    );
    assert_eq!(
        refused["error"]["message"],
        "this token (local-viewer) has role viewer; POST /api/plugins/{name}/run needs operator"
    );

    // Runs: only those of covered plugins, in pages, one by one and as they happen.
    let mut stream = open_stream(addr, &local_viewer, "/api/runs/events");
    let far_run = call(
        &admin,
        "POST",
        "/api/plugins/far/run?wait=true",
        json!({}),
        200,
    );
    let second_near = call(
        &local_ops,
        "POST",
        "/api/plugins/near/run?wait=true",
        json!({}),
        200,
    );
    let first_seen = next_json_line(&mut stream);
    assert_eq!(
        first_seen["plugin"], "near",
        "far's updates are left out: {first_seen}"
    );
    assert_eq!(first_seen["id"], second_near["id"]);
    let far_id = far_run["id"].as_str().unwrap();
    let near_id = near_run["id"].as_str().unwrap();
    let all = call(&admin, "GET", "/api/runs", Value::Null, 200);
    assert_eq!(all["runs"].as_array().unwrap().len(), 3, "{all}");
    let mine = call(&local_viewer, "GET", "/api/runs", Value::Null, 200);
    let ids: Vec<&str> = mine["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [second_near["id"].as_str().unwrap(), near_id],
        "{mine}"
    );
    let far_only = call(
        &local_viewer,
        "GET",
        "/api/runs?plugin=far",
        Value::Null,
        200,
    );
    assert_eq!(far_only["runs"], json!([]), "{far_only}");
    call(
        &local_viewer,
        "GET",
        &format!("/api/runs/{near_id}"),
        Value::Null,
        200,
    );
    call(
        &local_viewer,
        "GET",
        &format!("/api/runs/{far_id}"),
        Value::Null,
        404,
    );
    call(
        &admin,
        "GET",
        &format!("/api/runs/{far_id}"),
        Value::Null,
        200,
    );

    // What spans every device needs an unscoped token; changing anything needs admin.
    for path in ["/api/audit", "/metrics"] {
        let err = call(&local_viewer, "GET", path, Value::Null, 403);
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("needs a token without a device scope"),
            "{err}"
        );
        let (status, _) = http_json(addr, &admin, "GET", path, &Value::Null);
        assert_eq!(status, 200, "{path} as admin");
    }
    call(&local_ops, "DELETE", "/api/devices/local", Value::Null, 403);

    // Hooks: listed only with a covered plugin; a scoped token beside a delivery gets the
    // full run record only for a plugin it covers.
    let hooks = call(&admin, "GET", "/api/hooks", Value::Null, 200);
    assert_eq!(names(&hooks), ["far-hook"]);
    assert!(names(&call(&local_ops, "GET", "/api/hooks", Value::Null, 200)).is_empty());
    let bearer = format!("Bearer {hook_secret}");
    let deliver = |api_token: &str| {
        let api_token = api_token.trim_start_matches("Bearer ");
        let (status, text) = http(
            addr,
            "POST",
            "/hooks/far-hook?wait=true",
            &[
                ("Authorization", bearer.as_str()),
                ("X-Capstan-Token", api_token),
                ("Content-Type", "application/json"),
            ],
            b"{}",
        );
        (status, serde_json::from_str::<Value>(&text).unwrap())
    };
    let (status, answer) = deliver(&local_ops);
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = deliver(&admin);
    assert_eq!(
        (status, &answer["detail"]),
        (200, &json!("full")),
        "{answer}"
    );
}

#[test]
fn the_api_document_names_the_role_each_operation_needs() {
    let data = DataDir::empty();
    let admin = create_token(&data, "admin", "admin", None);
    let server = Server::start(&data);
    let (status, text) = http_json(
        &server.addr,
        &admin,
        "GET",
        "/api/openapi.json",
        &Value::Null,
    );
    assert_eq!(status, 200, "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    for route in capstan::api::ROUTES {
        let forbidden = &doc["paths"][route.path][route.method.to_lowercase()]["responses"]["403"];
        let description = forbidden["description"].as_str().unwrap_or_default();
        assert!(
            description.contains(route.role.as_str()) || description.contains("limited to devices"),
            "{} {}: {forbidden}",
            route.method,
            route.path
        );
    }
}

#[test]
fn token_create_takes_a_role_and_device_globs_and_list_shows_them() {
    let data = DataDir::empty();
    create_token(&data, "ci", "operator", Some("prod-*,lab-1"));
    create_token(&data, "root", "admin", None);
    let out = data.capstan(&["token", "create", "bad", "--role", "root"]);
    assert_failure_says(&out, "admin, operator or viewer");
    let out = data.capstan(&[
        "token",
        "create",
        "x",
        "--role",
        "admin",
        "--devices",
        "prod-*",
    ]);
    assert_failure_says(&out, "an admin token cannot be limited to devices");
    let out = data.capstan(&[
        "token",
        "create",
        "x",
        "--role",
        "viewer",
        "--devices",
        "a,,b",
    ]);
    assert_failure_says(&out, "an empty glob");
    let out = data.capstan(&["token", "create", "plain"]);
    assert_success(&out, "token create without a role");

    let out = data.capstan(&["token", "list"]);
    assert_success(&out, "token list");
    let text = stdout(&out);
    let row = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert!(text.lines().next().unwrap().contains("ROLE"), "{text}");
    assert_eq!(row("ci")[2..4], ["operator", "prod-*,lab-1"]);
    assert_eq!(row("root")[2..4], ["admin", "*"]);
    assert_eq!(
        row("plain")[2],
        "admin",
        "the default role, as before roles"
    );

    let help = stdout(&data.capstan(&["token", "create", "--help"]));
    assert!(
        help.contains("operator  what viewer may, and run plugins and check devices"),
        "{help}"
    );
}
