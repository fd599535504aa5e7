//! `capstan device …`: real key files from the test infrastructure, clear errors for bad
//! input, and no secret ever printed.

use crate::cli_vault::{files_holding, open_store};
use crate::util::*;

fn add(data: &DataDir, args: &[&str]) -> std::process::Output {
    let mut full = vec!["device", "add"];
    full.extend_from_slice(args);
    data.capstan(&full)
}

#[test]
fn adds_ssh_devices_with_every_key_format_and_never_prints_key_material() {
    let data = DataDir::with_vault();
    let infra = Infra::get();
    let host = infra.var("SSH_HOST4");
    let port = infra.var("SSH_PORT");
    let user = infra.var("SSH_USER_KEY");
    for (name, key) in [
        ("ed", "SSH_KEY_ED25519"),
        ("ec", "SSH_KEY_ECDSA"),
        ("rsa", "SSH_KEY_RSA_PEM"),
    ] {
        let out = add(
            &data,
            &[
                name,
                "--kind",
                "ssh",
                "--host",
                host,
                "--port",
                port,
                "--user",
                user,
                "--ssh-key-file",
                infra.var(key),
            ],
        );
        assert_success(&out, name);
    }
    let out = add(
        &data,
        &[
            "pp",
            "--kind",
            "ssh",
            "--host",
            host,
            "--port",
            port,
            "--user",
            infra.var("SSH_USER_KEYPASS"),
            "--ssh-key-file",
            infra.var("SSH_KEY_PASSPHRASE_PROTECTED"),
            "--key-passphrase-file",
            infra.var("SSH_KEY_PASSPHRASE_FILE"),
        ],
    );
    assert_success(&out, "passphrase-protected key");

    let list = data.capstan(&["device", "list"]);
    assert_success(&list, "list");
    let show = data.capstan(&["device", "show", "pp", "--json"]);
    assert_success(&show, "show");
    let v: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(
        v["secrets"],
        serde_json::json!(["private-key", "key-passphrase"])
    );
    assert_eq!(v["key_has_passphrase"], true);

    let passphrase = std::fs::read_to_string(infra.path("SSH_KEY_PASSPHRASE_FILE")).unwrap();
    let key_body = std::fs::read_to_string(infra.path("SSH_KEY_ED25519")).unwrap();
    let key_line = key_body.lines().nth(2).unwrap();
    for out in [
        &list,
        &show,
        &data.capstan(&["device", "show", "ed"]),
        &data.capstan(&["device", "list", "--json"]),
    ] {
        let all = format!("{}{}", stdout(out), stderr(out));
        assert!(
            !all.contains(passphrase.trim()),
            "passphrase printed:\n{all}"
        );
        assert!(!all.contains(key_line), "key material printed:\n{all}");
        assert!(!all.contains("PRIVATE KEY"), "key material printed:\n{all}");
    }
    assert!(
        stdout(&list).contains(&format!("{user}@{host}:{port}")),
        "{}",
        stdout(&list)
    );
}

#[test]
fn a_password_read_from_stdin_is_stored_but_never_shown() {
    let data = DataDir::with_vault();
    let out = data.capstan_stdin(
        &[
            "device",
            "add",
            "p",
            "--kind",
            "ssh",
            "--host",
            "h.example",
            "--user",
            "ops",
            "--password-stdin",
            "--keyboard-interactive",
        ],
        b"Very-Secret-Pw-42\n",
    );
    assert_success(&out, "add");
    let show = data.capstan(&["device", "show", "p"]);
    let s = stdout(&show);
    assert!(
        s.contains("password (stored in the vault)") && s.contains("keyboard-interactive: true"),
        "{s}"
    );
    assert!(!s.contains("Very-Secret-Pw-42"));
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let data = DataDir::with_vault();
    let infra = Infra::get();
    let key = infra.var("SSH_KEY_ED25519");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["x", "--kind", "ftp"], "invalid value 'ftp'"),
        (
            vec!["x", "--kind", "ssh", "--user", "u", "--ssh-key-file", key],
            "need a host",
        ),
        (
            vec!["x", "--kind", "ssh", "--host", "h", "--ssh-key-file", key],
            "need a login user",
        ),
        (
            vec!["x", "--kind", "ssh", "--host", "h", "--user", "u"],
            "need an auth method",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                infra.var("SSH_HOST_KEY_PUB"),
            ],
            "not a private key",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                infra.var("SSH_KEY_PASSPHRASE_PROTECTED"),
            ],
            "is encrypted",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                infra.var("SSH_KEY_PASSPHRASE_PROTECTED"),
                "--key-passphrase-file",
                infra.var("SSH_PASSWORD_FILE"),
            ],
            "does not open with the given passphrase",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                "/nonexistent/key",
            ],
            "cannot read SSH key file",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                key,
                "--host-key",
                "not a key",
            ],
            "not an OpenSSH public key",
        ),
        (
            vec![
                "x",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                key,
                "--socket",
                "/x;reboot",
            ],
            "shell characters",
        ),
        (
            vec![
                "x",
                "--kind",
                "tls",
                "--host",
                "h",
                "--tls-ca",
                infra.var("TLS_CA"),
            ],
            "need --tls-cert",
        ),
        (
            vec![
                "x",
                "--kind",
                "tls",
                "--host",
                "h",
                "--tls-ca",
                infra.var("TLS_KEY"),
                "--tls-cert",
                infra.var("TLS_CERT"),
                "--tls-key",
                infra.var("TLS_KEY"),
            ],
            "--tls-ca must be a PEM certificate",
        ),
        (
            vec![
                "x",
                "--kind",
                "local",
                "--docker-host",
                "/var/run/docker.sock",
            ],
            "unix:///absolute/path",
        ),
        (
            vec!["x", "--kind", "local", "--host", "h"],
            "local devices take only --docker-host",
        ),
        (
            vec!["bad name", "--kind", "local"],
            "must be 1-64 characters",
        ),
    ];
    for (args, needle) in cases {
        let out = add(&data, &args);
        assert_failure_says(&out, needle);
    }
    assert_success(&add(&data, &["dup", "--kind", "local"]), "first add");
    assert_failure_says(&add(&data, &["dup", "--kind", "local"]), "already exists");
    let list = stdout(&data.capstan(&["device", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "failed adds stored nothing: {list}"
    );
}

#[test]
fn edit_renames_changes_options_and_rm_removes_the_secrets() {
    let data = DataDir::with_vault();
    let infra = Infra::get();
    let pinned = std::fs::read_to_string(infra.path("SSH_HOST_KEY_PUB")).unwrap();
    assert_success(
        &add(
            &data,
            &[
                "a",
                "--kind",
                "ssh",
                "--host",
                "h",
                "--user",
                "u",
                "--ssh-key-file",
                infra.var("SSH_KEY_ED25519"),
                "--host-key",
                pinned.trim(),
            ],
        ),
        "add",
    );
    assert_success(
        &data.capstan(&[
            "device",
            "edit",
            "a",
            "--rename",
            "b",
            "--port",
            "2222",
            "--sudo",
            "--socket",
            "/run/alt.sock",
        ]),
        "edit",
    );
    assert_failure_says(
        &data.capstan(&["device", "show", "a"]),
        "no device named \"a\"",
    );
    let s = stdout(&data.capstan(&["device", "show", "b"]));
    assert!(
        s.contains("u@h:2222") && s.contains("sudo:        true") && s.contains("/run/alt.sock"),
        "{s}"
    );
    assert!(s.contains("host key:    ssh-ed25519 SHA256:"), "{s}");
    assert_success(
        &data.capstan(&["device", "edit", "b", "--sudo=false", "--clear-host-key"]),
        "edit back",
    );
    let s = stdout(&data.capstan(&["device", "show", "b"]));
    assert!(
        s.contains("sudo:        false") && s.contains("not pinned"),
        "{s}"
    );
    assert!(s.contains("ssh tunnel:  engine default"), "{s}");
    // The tunnel: set, refused with sudo (and left as it was), and back to the default.
    assert_success(
        &data.capstan(&["device", "edit", "b", "--ssh-tunnel", "streamlocal"]),
        "set the tunnel",
    );
    let s = stdout(&data.capstan(&["device", "show", "b"]));
    assert!(s.contains("ssh tunnel:  streamlocal"), "{s}");
    assert_failure_says(
        &data.capstan(&["device", "edit", "b", "--sudo"]),
        "streamlocal cannot go through sudo",
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&data.capstan(&["device", "show", "b", "--json"]))).unwrap();
    assert_eq!(v["ssh_tunnel"], "streamlocal");
    assert_eq!(v["sudo"], false);
    assert_success(
        &data.capstan(&[
            "device",
            "edit",
            "b",
            "--sudo",
            "--ssh-tunnel",
            "dial-stdio",
        ]),
        "sudo with dial-stdio",
    );
    assert_success(
        &data.capstan(&["device", "edit", "b", "--ssh-tunnel", "default"]),
        "back to the engine default",
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&data.capstan(&["device", "show", "b", "--json"]))).unwrap();
    assert_eq!(v["ssh_tunnel"], serde_json::Value::Null);
    assert_eq!(v["sudo"], true);
    assert_success(
        &data.capstan(&["device", "edit", "b", "--sudo=false"]),
        "sudo off",
    );
    // Switching to password auth drops the stored key.
    let out = data.capstan_stdin(&["device", "edit", "b", "--password-stdin"], b"pw");
    assert_success(&out, "switch to password");
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&data.capstan(&["device", "show", "b", "--json"]))).unwrap();
    assert_eq!(v["secrets"], serde_json::json!(["password"]));
    assert_eq!(v["auth"], "password");

    let status = stdout(&data.capstan(&["vault", "status"]));
    assert!(status.contains("secrets:        1"), "{status}");
    assert_success(&data.capstan(&["device", "rm", "b"]), "rm");
    let status = stdout(&data.capstan(&["vault", "status"]));
    assert!(status.contains("secrets:        0"), "{status}");
    assert_failure_says(&data.capstan(&["device", "rm", "b"]), "no device named");
}

#[test]
fn device_commands_go_through_a_running_engines_api_and_take_effect_at_once() {
    let data = DataDir::with_vault();
    let server = Server::start(&data);
    let infra = Infra::get();
    let key_file = infra.var("SSH_KEY_ED25519");
    let key_text = std::fs::read_to_string(key_file).unwrap();
    let key_body = key_text.lines().nth(1).unwrap().to_string();

    // Added through the engine, the host key pinned on first use.
    let out = add(
        &data,
        &[
            "web1",
            "--kind",
            "ssh",
            "--host",
            infra.var("SSH_HOST4"),
            "--port",
            infra.var("SSH_PORT"),
            "--user",
            infra.var("SSH_USER_KEY"),
            "--ssh-key-file",
            key_file,
            "--trust-host-key",
        ],
    );
    assert_success(&out, "add through the engine");
    assert!(
        stdout(&out).contains("pinned host key ssh-ed25519 SHA256:"),
        "{}",
        stdout(&out)
    );
    // The engine has it now, pinned, with its key in the vault.
    let (status, body) = http(
        &server.addr,
        "GET",
        "/api/devices/web1",
        &[("Authorization", &format!("Bearer {}", server.admin_token()))],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["host_key"].as_str().unwrap().starts_with("ssh-ed25519 "));
    assert_eq!(v["secrets"], serde_json::json!(["private-key"]));

    // list, show and check print as they do without an engine, and no key material.
    let list = data.capstan(&["device", "list"]);
    assert_success(&list, "list");
    assert!(
        stdout(&list).contains("web1") && stdout(&list).contains("local"),
        "{}",
        stdout(&list)
    );
    let show = data.capstan(&["device", "show", "web1"]);
    assert_success(&show, "show");
    assert!(
        stdout(&show).contains("private-key (stored in the vault)"),
        "{}",
        stdout(&show)
    );
    let check = data.capstan(&["device", "check", "--all"]);
    assert_success(&check, "check --all through the engine");
    assert_eq!(
        stdout(&check).matches(" ok ").count(),
        2,
        "{}",
        stdout(&check)
    );

    // Edit: a secret from stdin and a rename; a bad change is refused and changes nothing.
    let out = data.capstan_stdin(
        &[
            "device",
            "edit",
            "web1",
            "--rename",
            "web2",
            "--user",
            infra.var("SSH_USER_PASSWORD"),
            "--password-stdin",
        ],
        std::fs::read(infra.var("SSH_PASSWORD_FILE"))
            .unwrap()
            .as_slice(),
    );
    assert_success(&out, "edit through the engine");
    let check = data.capstan(&["device", "check", "web2", "--json"]);
    assert_success(&check, "the new password works");
    let out = data.capstan(&["device", "edit", "web2", "--port", "0"]);
    assert_failure_says(&out, "port 0 is not a port");
    let out = data.capstan(&["device", "show", "web2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["port"], infra.var("SSH_PORT").parse::<u16>().unwrap());
    assert_eq!(v["secrets"], serde_json::json!(["password"]));
    assert_failure_says(
        &data.capstan(&["device", "show", "web1"]),
        "no device named",
    );

    // A bad new device is refused in the command's own words, and nothing is added.
    let out = add(
        &data,
        &["nohost", "--kind", "ssh", "--user", "u", "--auth", "agent"],
    );
    assert_failure_says(&out, "ssh devices need a host: give --host");
    assert_failure_says(
        &data.capstan(&["device", "show", "nohost"]),
        "no device named",
    );

    // Removed through the engine.
    assert_success(&data.capstan(&["device", "rm", "web2"]), "rm");
    assert_failure_says(
        &data.capstan(&["device", "show", "web2"]),
        "no device named",
    );

    for out in [list, show] {
        assert!(!stdout(&out).contains(&key_body));
    }
    let log = server.stop_and_collect_stderr();
    assert!(
        !log.contains(&key_body),
        "the engine's log holds key material"
    );
}

/// The sealed bytes of a device's password as the vault file holds them, read without
/// opening the store (a running engine holds its lock): the hex of each secret whose
/// name is `device/<id>/password`.
fn stored_password_ciphertext(data: &DataDir, device: &str) -> Vec<u8> {
    let show = data.capstan(&["device", "show", device, "--json"]);
    assert_success(&show, "device show");
    let v: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    let name = format!("device/{}/password", v["id"].as_str().unwrap());
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.data().join("vault.json")).unwrap()).unwrap();
    let hex_value = file["secrets"][&name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in the vault file"));
    hex::decode(hex_value).unwrap()
}

/// Replaces a device's password, then removes the device, and checks after each step
/// that the superseded ciphertext is in no file of the data directory and that the
/// vault holds only what is live.
fn replaced_and_removed_passwords_leave_no_copy(data: &DataDir) {
    let out = data.capstan_stdin(
        &[
            "device",
            "add",
            "pw",
            "--kind",
            "ssh",
            "--host",
            "h.example",
            "--user",
            "u",
            "--password-stdin",
        ],
        b"first password",
    );
    assert_success(&out, "add");
    let first = stored_password_ciphertext(data, "pw");
    let edit = data.capstan_stdin(&["device", "edit", "pw", "--password-stdin"], b"second one");
    assert_success(&edit, "edit the password");
    let second = stored_password_ciphertext(data, "pw");
    assert_ne!(first, second);
    let hits = files_holding(&data.data(), std::slice::from_ref(&first));
    assert!(
        hits.is_empty(),
        "the replaced password's ciphertext is left:\n{}",
        hits.join("\n")
    );
    assert_success(&data.capstan(&["device", "rm", "pw"]), "rm");
    let hits = files_holding(&data.data(), std::slice::from_ref(&second));
    assert!(
        hits.is_empty(),
        "the removed password's ciphertext is left:\n{}",
        hits.join("\n")
    );
}

#[test]
fn editing_or_removing_a_device_leaves_no_copy_of_its_old_password_in_the_data_directory() {
    let data = DataDir::with_vault();
    replaced_and_removed_passwords_leave_no_copy(&data);
    let store = open_store(&data);
    let v = capstan::vault::Vault::open(
        &store,
        &capstan::vault::KeySource::KeyFile(data.data().join("vault.key")),
    )
    .unwrap();
    assert!(v.is_empty(), "{:?}", v.names().unwrap());
}

#[test]
fn through_a_running_engine_an_edited_or_removed_password_leaves_no_copy_in_the_data_directory() {
    let data = DataDir::with_vault();
    let server = Server::start(&data);
    replaced_and_removed_passwords_leave_no_copy(&data);
    let status = server.stop();
    assert!(status.success(), "serve stopped with {status}");
    let store = open_store(&data);
    let v = capstan::vault::Vault::open(
        &store,
        &capstan::vault::KeySource::KeyFile(data.data().join("vault.key")),
    )
    .unwrap();
    assert!(
        !v.names().unwrap().iter().any(|n| n.ends_with("/password")),
        "{:?}",
        v.names().unwrap()
    );
}

/// A TCP server that accepts SSH connections and never answers (no banner), so a check
/// of a device pointing at it is stuck in its handshake until its timeout; it counts the
/// connections open at once. A check that times out closes its socket before reporting,
/// so a connection still open when the next one arrives is a check still running.
struct SilentSshd {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl SilentSshd {
    fn start() -> SilentSshd {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut open: Vec<std::net::TcpStream> = Vec::new();
            let (mut accepted, mut most) = (0, 0);
            for s in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let s = s.unwrap();
                s.set_nonblocking(true).unwrap();
                accepted += 1;
                // Still open: nothing to read yet, or the client's SSH id line; closed: EOF.
                open.retain_mut(|c| {
                    let mut buf = [0u8; 256];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => return false,
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                            Err(_) => return false,
                        }
                    }
                });
                open.push(s);
                most = most.max(open.len());
            }
            (accepted, most)
        });
        SilentSshd {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted, and the most open at once.
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Adds `count` SSH devices `{prefix}1..` with the test key and pinned host key, at
/// `port` on the test host.
fn add_ssh_devices(data: &DataDir, prefix: &str, count: usize, port: &str) {
    let infra = Infra::get();
    for i in 1..=count {
        let name = format!("{prefix}{i}");
        let out = add(
            data,
            &[
                &name,
                "--kind",
                "ssh",
                "--host",
                infra.var("SSH_HOST4"),
                "--port",
                port,
                "--user",
                infra.var("SSH_USER_KEY"),
                "--ssh-key-file",
                infra.var("SSH_KEY_ED25519"),
                "--host-key-file",
                infra.var("SSH_HOST_KEY_PUB"),
            ],
        );
        assert_success(&out, &name);
    }
}

/// The reports of `device check --all --json`, by device name.
fn reports_by_device(
    out: &std::process::Output,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("check --all --json: {e}\n{}\n{}", stdout(out), stderr(out)));
    v.as_array()
        .expect("an array of reports")
        .iter()
        .map(|r| (r["device"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

#[test]
fn check_all_checks_at_most_concurrency_devices_at_once_and_reports_every_one() {
    let data = DataDir::with_vault();
    let silent = SilentSshd::start();
    add_ssh_devices(&data, "web", 3, Infra::get().var("SSH_PORT"));
    add_ssh_devices(&data, "mute", 6, &silent.port.to_string());

    let out = data.capstan(&[
        "device",
        "check",
        "--all",
        "--concurrency",
        "2",
        "--timeout",
        "1",
        "--json",
    ]);
    let (accepted, most) = silent.finish();
    assert_failure_says(&out, "6 of 9 devices failed the check");
    let reports = reports_by_device(&out);
    assert_eq!(reports.len(), 9, "{reports:?}");
    for i in 1..=3 {
        let r = &reports[&format!("web{i}")];
        assert_eq!(r["connected"], true, "{r}");
    }
    for i in 1..=6 {
        let r = &reports[&format!("mute{i}")];
        assert_eq!(r["error"]["kind"], "timeout", "{r}");
        assert_eq!(r["failed_step"], "ssh-handshake", "{r}");
    }
    assert_eq!(accepted, 6, "every silent device was tried once");
    assert!(
        most <= 2,
        "{most} checks of silent devices ran at once with --concurrency 2"
    );

    // Without --json the table is as it always was: one row per device.
    let out = data.capstan(&["device", "check", "--all", "--concurrency", "3"]);
    let text = stdout(&out);
    assert_eq!(text.matches(" ok ").count(), 3, "{text}");
    assert_eq!(text.matches("FAILED (unreachable)").count(), 6, "{text}");
}

#[test]
fn the_engine_runs_at_most_check_concurrency_checks_whatever_the_client_asks() {
    let data = DataDir::with_vault();
    let silent = SilentSshd::start();
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_DOCKER_CHECK_CONCURRENCY", "2");
    });
    add_ssh_devices(&data, "mute", 6, &silent.port.to_string());
    let out = data.capstan(&[
        "device",
        "check",
        "--all",
        "--concurrency",
        "16",
        "--timeout",
        "1",
        "--json",
    ]);
    let (accepted, most) = silent.finish();
    let reports = reports_by_device(&out);
    assert_eq!(reports.len(), 7, "{reports:?}");
    for i in 1..=6 {
        let r = &reports[&format!("mute{i}")];
        assert_eq!(r["error"]["kind"], "timeout", "{r}");
    }
    assert_eq!(accepted, 6);
    assert!(
        most <= 2,
        "{most} checks ran at once in an engine with check_concurrency 2"
    );
    drop(server);
}

#[test]
fn a_pooled_check_keeps_the_engines_session_open_for_the_next_operation() {
    let data = DataDir::with_vault();
    let server = Server::start(&data);
    add_ssh_devices(&data, "web", 3, Infra::get().var("SSH_PORT"));
    let out = data.capstan(&["device", "check", "--all", "--pooled", "--json"]);
    assert_success(&out, "check --all --pooled");
    let reports = reports_by_device(&out);
    for i in 1..=3 {
        let r = &reports[&format!("web{i}")];
        assert_eq!(r["connected"], true, "{r}");
        assert_eq!(r["pooled"], true, "{r}");
    }
    let metrics = |name: &str| -> f64 {
        let (status, body) = http(
            &server.addr,
            "GET",
            "/metrics",
            &[("Authorization", &format!("Bearer {}", server.admin_token()))],
            b"",
        );
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(metrics("capstan_ssh_sessions"), 3.0);
    let steps_of = |r: &serde_json::Value| -> Vec<String> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        steps_of(&reports["web2"]).contains(&"ssh-handshake".to_string()),
        "{}",
        reports["web2"]
    );
    // A second pooled check reuses the session and its kept connection: no login.
    let out = data.capstan(&["device", "check", "web2", "--pooled", "--json"]);
    assert_success(&out, "check web2 --pooled");
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(steps_of(&r), ["ping", "version", "info"], "{r}");
    assert_eq!(metrics("capstan_ssh_sessions"), 3.0);
    // A fresh check is the default, and prints as it always did.
    let out = data.capstan(&["device", "check", "web2", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r.get("pooled"), None, "{r}");
}

#[test]
fn a_bad_check_concurrency_is_refused_with_a_clear_error() {
    let data = DataDir::with_vault();
    for (args, says) in [
        (&["--all", "--concurrency", "0"][..], "0 is not in 1..=1024"),
        (
            &["--all", "--concurrency", "5000"][..],
            "5000 is not in 1..=1024",
        ),
        (
            &["--all", "--concurrency", "many"][..],
            "invalid value 'many' for '--concurrency <N>'",
        ),
        (&["web1", "--concurrency", "4"][..], "--all"),
        (
            &["--all", "--pooled", "--trust-host-key"][..],
            "cannot be used with",
        ),
    ] {
        let mut full = vec!["device", "check"];
        full.extend_from_slice(args);
        assert_failure_says(&data.capstan(&full), says);
    }
    for bad in ["0", "2000", "lots"] {
        let out = data
            .cmd()
            .args(["device", "check", "--all"])
            .env("CAPSTAN_DOCKER_CHECK_CONCURRENCY", bad)
            .output()
            .unwrap();
        assert_failure_says(&out, "docker.check_concurrency");
    }
}
