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
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        http(
            &self.server.addr,
            method,
            path,
            &[
                ("Authorization", &self.auth),
                ("Content-Type", "application/json"),
            ],
            &body,
        )
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
fn an_invalid_device_is_refused_with_422_saying_why_and_nothing_is_stored() {
    let data = DataDir::empty();
    let api = Api::start(&data);
    let secret = "s3cret-value-never-echoed";
    let cases = [
        (
            json!({ "name": "nohost", "kind": "ssh", "user": "u", "password": secret }),
            "need a host",
        ),
        (
            json!({ "name": "x", "kind": "ssh", "host": "h", "user": "u", "auth": "key" }),
            "key auth needs",
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
    api.json("PATCH", "/api/devices/nope", &json!({}), 404);
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

    // With the token, every route that only reads answers.
    for route in capstan::api::ROUTES.iter().filter(|r| r.method == "GET") {
        let (status, body) = api.call("GET", route.example, &Value::Null);
        assert!(
            status < 400,
            "GET {} with the token: {status} {body}",
            route.example
        );
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
        .chain([("GET".into(), capstan::api::HEALTH_PATH.into())])
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
