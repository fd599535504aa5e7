//! `capstan policy decide`: test a policy offline.

use crate::util::*;

/// The `allow`/`deny` of each line `policy decide --reasons` printed.
fn verdicts(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .collect()
}

#[test]
fn decide_prints_one_answer_per_request_with_reasons() {
    let data = DataDir::empty();
    let env = data.path().join("proxy.env");
    std::fs::write(
        &env,
        "environment:\n  - CONTAINERS=1\n  - ALLOW_RESTARTS=1 # restarts only\n  - POST=0\n",
    )
    .unwrap();
    let input = b"GET /containers/json\nPOST /containers/web/restart\nPOST /containers/web/start\nGET /v1.41/containers/web/logs\nGET /version/../containers/json\n";
    let out = data.capstan_stdin(
        &[
            "policy",
            "decide",
            "--env-file",
            env.to_str().unwrap(),
            "--reasons",
        ],
        input,
    );
    assert_success(&out, "policy decide");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    let verdicts = verdicts(&lines);
    assert_eq!(
        verdicts,
        ["allow", "allow", "deny", "deny", "deny"],
        "{lines:#?}"
    );
    assert!(lines[2].contains("ALLOW_START=1"), "{}", lines[2]);
    assert!(lines[3].contains("ALLOW_LOGS=1"), "{}", lines[3]);

    let plain = data.capstan_stdin(
        &["policy", "decide", "--env-file", env.to_str().unwrap()],
        b"GET /_ping\n",
    );
    assert_eq!(stdout(&plain), "allow\n");
}

#[test]
fn an_invalid_policy_exits_non_zero_naming_the_variable() {
    let data = DataDir::empty();
    let env = data.path().join("bad.env");
    std::fs::write(&env, "CONTAINER=1\n").unwrap();
    let out = data.capstan_stdin(
        &["policy", "decide", "--env-file", env.to_str().unwrap()],
        b"GET /_ping\n",
    );
    assert_failure_says(&out, "CONTAINERS");
    let toml = data.path().join("bad.toml");
    std::fs::write(&toml, "POST = \"yes\"\n").unwrap();
    let out = data.capstan_stdin(
        &["policy", "decide", "--policy", toml.to_str().unwrap()],
        b"GET /_ping\n",
    );
    assert_failure_says(&out, "POST");
}

#[test]
fn show_prints_the_scopes_and_the_create_guard() {
    let data = DataDir::empty();
    let toml = data.path().join("proxy.toml");
    std::fs::write(
        &toml,
        "CONTAINERS = 1\n[containers]\nnames = [\"rt-in-*\"]\n[create]\nbind_roots = [\"/srv/app\"]\n",
    )
    .unwrap();
    let out = data.capstan(&["policy", "show", "--policy", toml.to_str().unwrap()]);
    assert_success(&out, "policy show");
    let text = stdout(&out);
    for line in [
        "containers: name rt-in-*",
        "  privileged = false",
        "  bind_roots = /srv/app",
        "  images = every image",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    let env = data.path().join("proxy.env");
    std::fs::write(&env, "CONTAINERS=1\nCREATE_PRIVILEGED=1\n").unwrap();
    let out = data.capstan(&["policy", "show", "--env-file", env.to_str().unwrap()]);
    assert_success(&out, "policy show --env-file");
    assert!(
        stdout(&out).contains("  privileged = true"),
        "{}",
        stdout(&out)
    );
    std::fs::write(&env, "CREATE_PRIVILEGD=1\n").unwrap();
    let out = data.capstan(&["policy", "show", "--env-file", env.to_str().unwrap()]);
    assert_failure_says(&out, "not a create-guard setting");
}

#[test]
fn linuxservers_whole_default_block_pastes_unchanged_and_libpod_stays_denied() {
    let data = DataDir::empty();
    let env = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/policies/linuxserver-defaults.env");
    let env = env.to_str().unwrap();
    let input = b"GET /_ping\nGET /version\nGET /events\nGET /containers/json\nGET /libpod/_ping\nGET /v1.41/libpod/version\nPOST /libpod/containers/web/pause\n";
    let out = data.capstan_stdin(&["policy", "decide", "--env-file", env, "--reasons"], input);
    assert_success(&out, "policy decide on linuxserver's defaults");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    let verdicts = verdicts(&lines);
    assert_eq!(
        verdicts,
        ["allow", "allow", "allow", "deny", "deny", "deny", "deny"],
        "{lines:#?}"
    );
    for line in &lines[4..] {
        assert!(line.contains("Podman's libpod API"), "{line}");
    }
    let note = stderr(&out);
    assert!(
        note.contains("LIBPOD_PING=1") && note.contains("accepted without effect"),
        "{note}"
    );
    assert!(note.contains("LOG_LEVEL=info"), "{note}");

    let out = data.capstan(&["policy", "show", "--env-file", env]);
    assert_success(&out, "policy show on linuxserver's defaults");
    let text = stdout(&out);
    assert!(
        text.contains("variables on: PING, VERSION, EVENTS"),
        "{text}"
    );
    assert!(text.contains("LIBPOD_VERSION=1"), "{text}");

    // A bad value of an accepted variable is still an error, naming it.
    let bad = data.path().join("bad.env");
    std::fs::write(&bad, "CONTAINERS=1\nLIBPOD_ALLOW_PAUSE=yes\n").unwrap();
    let out = data.capstan_stdin(
        &["policy", "decide", "--env-file", bad.to_str().unwrap()],
        b"GET /_ping\n",
    );
    assert_failure_says(&out, "LIBPOD_ALLOW_PAUSE has value `yes`");
}
