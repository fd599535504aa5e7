//! `capstan serve`: the embedded default on first start, the API's auth, restarts.

use crate::util::*;

fn token_from(banner: &str) -> String {
    banner
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cap_"))
        .unwrap_or_else(|| panic!("no admin token in the banner:\n{banner}"))
        .to_string()
}

#[test]
fn first_start_creates_vault_key_file_local_device_and_prints_a_token_once() {
    use std::os::unix::fs::PermissionsExt;
    let data = DataDir::empty();
    let server = Server::start(&data);
    let key = data.data().join("vault.key");
    assert!(
        server.banner.contains(&key.display().to_string()),
        "key file path printed:\n{}",
        server.banner
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        server.banner.contains("device `local`"),
        "{}",
        server.banner
    );
    let token = token_from(&server.banner);

    let (status, body) = http(&server.addr, "GET", "/healthz", &[], b"");
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");

    let auth = format!("Bearer {token}");
    let (status, body) = http(
        &server.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(devices[0]["name"], "local");
    assert_eq!(devices[0]["kind"], "local");
    assert!(server.stop().success());

    // Second start: same vault, no new token, still one `local`.
    let server = Server::start(&data);
    assert!(
        !server.banner.contains("cap_"),
        "token printed again:\n{}",
        server.banner
    );
    let (status, body) = http(
        &server.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_revoked_token_is_refused() {
    let data = DataDir::empty();
    let server = Server::start(&data);
    let admin = format!("Bearer {}", token_from(&server.banner));
    assert!(server.stop().success());
    let out = data.capstan(&["token", "create", "ci"]);
    assert_success(&out, "token create");
    let ci = format!("Bearer {}", stdout(&out).trim());
    let server = Server::start(&data);
    assert_eq!(
        http(
            &server.addr,
            "GET",
            "/api/devices",
            &[("Authorization", &ci)],
            b""
        )
        .0,
        200
    );
    drop(server);
    assert_success(&data.capstan(&["token", "revoke", "ci"]), "token revoke");
    let list = stdout(&data.capstan(&["token", "list"]));
    assert!(list.contains("admin") && !list.contains("ci"), "{list}");
    let server = Server::start(&data);
    assert_eq!(
        http(
            &server.addr,
            "GET",
            "/api/devices",
            &[("Authorization", &ci)],
            b""
        )
        .0,
        401
    );
    assert_eq!(
        http(
            &server.addr,
            "GET",
            "/api/devices",
            &[("Authorization", &admin)],
            b""
        )
        .0,
        200
    );
}

#[test]
fn a_second_engine_on_the_same_data_directory_is_refused_clearly() {
    let data = DataDir::empty();
    let _server = Server::start(&data);
    // Commands without an API route (vault, tokens) need the data directory itself.
    let out = data.capstan(&["token", "list"]);
    assert_failure_says(&out, "in use by another capstan process");
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_with_its_name() {
    let data = DataDir::empty();
    let cfg = data.path().join("capstan.toml");
    std::fs::write(&cfg, "[api]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let out = data
        .cmd()
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_failure_says(&out, "lisen");
}
