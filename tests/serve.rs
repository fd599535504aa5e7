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

/// `curl` over https to the engine at `addr` trusting the test CA; status and body.
fn curl_https(addr: &str, path: &str, auth: Option<&str>) -> Result<(u16, String), String> {
    let infra = Infra::get();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert", infra.var("TLS_CA")])
        .args(["-w", "\n%{http_code}"]);
    if let Some(a) = auth {
        cmd.args(["-H", &format!("Authorization: {a}")]);
    }
    let out = cmd
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("run curl (Debian's curl package)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Ok((code.parse().unwrap(), body.to_string()))
}

#[test]
fn serve_with_a_certificate_answers_https_only_and_the_cli_still_reaches_it() {
    let infra = Infra::get();
    let data = DataDir::empty();
    let server = Server::start_with(&data, |c| {
        c.args(["--tls-cert", infra.var("TLS_SERVER_CERT")])
            .args(["--tls-key", infra.var("TLS_SERVER_KEY")]);
    });
    assert!(
        server
            .banner
            .contains(&format!("capstan API listening on https://{}", server.addr)),
        "{}",
        server.banner
    );
    let auth = format!("Bearer {}", token_from(&server.banner));

    let (status, body) = curl_https(&server.addr, "/healthz", None).unwrap();
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    let (status, body) = curl_https(&server.addr, "/api/devices", Some(&auth)).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"local\""), "{body}");
    let (status, _) = curl_https(&server.addr, "/api/devices", None).unwrap();
    assert_eq!(status, 401);

    // Plain HTTP gets no HTTP answer.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !buf.starts_with(b"HTTP/"),
            "plain HTTP was answered: {}",
            String::from_utf8_lossy(&buf)
        );
    }

    // The CLI on this host reaches the engine over TLS (pinning its certificate).
    let out = data.capstan(&["device", "list"]);
    assert_success(&out, "device list against the TLS engine");
    assert!(stdout(&out).contains("local"), "{}", stdout(&out));
}

#[test]
fn a_certificate_without_its_key_is_refused_before_anything_listens() {
    let infra = Infra::get();
    let data = DataDir::empty();
    let out = data
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", infra.var("TLS_SERVER_CERT")])
        .output()
        .unwrap();
    assert_failure_says(&out, "--tls-key");
    let out = data
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", infra.var("TLS_SERVER_CERT")])
        .args(["--tls-key", infra.var("TLS_CA")])
        .output()
        .unwrap();
    assert_failure_says(&out, "is not a PEM private key");
}

#[test]
fn serving_beyond_loopback_without_tls_warns_what_is_exposed_and_how_to_fix_it() {
    use std::io::BufRead;
    let data = DataDir::empty();
    let mut child = data
        .cmd()
        .args(["serve", "--listen", "0.0.0.0:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        assert_ne!(
            out.read_line(&mut line).unwrap(),
            0,
            "serve exited:\n{banner}"
        );
        banner.push_str(&line);
        if line.contains("capstan API listening on") {
            break;
        }
    }
    assert!(banner.contains("listening on http://0.0.0.0:"), "{banner}");
    unsafe_kill(child.id() as i32, 15);
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    child.wait().unwrap();
    assert!(
        err.contains("warning: the API listens on 0.0.0.0:")
            && err.contains("without TLS")
            && err.contains("--tls-cert and --tls-key")
            && err.contains("reverse proxy"),
        "{err}"
    );

    // On loopback, no warning.
    let server = Server::start(&data);
    let err = server.stop_and_collect_stderr();
    assert!(!err.contains("without TLS"), "{err}");
}
