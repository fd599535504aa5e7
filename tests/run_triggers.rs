//! Run-outcome triggers in a real `capstan serve`: a plugin's run that ends the way
//! another plugin's `[[triggers.run]]` watches for starts that plugin with the ended
//! run in its event, chains of them stop at the engine's limit with the refusal
//! recorded, and a bad trigger fails the install naming the field. Every run is the
//! real `relay` test plugin on wasmtime.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::triggers::{eventually, install_plugin, runs};
use crate::util::*;

/// `capstan plugin run NAME --input INPUT` through the running engine; the run has ended
/// (and every run-outcome trigger it fired has been recorded) when it returns.
fn run_by_hand(data: &DataDir, plugin: &str, input: &str) -> std::process::Output {
    data.capstan(&["plugin", "run", plugin, "--input", input])
}

/// The id of `plugin`'s latest run started by hand.
fn last_manual_run(data: &DataDir, plugin: &str) -> Value {
    runs(data, plugin)
        .into_iter()
        .find(|r| r["trigger"]["kind"] == "manual")
        .unwrap_or_else(|| panic!("no manual run of {plugin}"))
}

#[test]
fn a_failed_run_starts_its_watcher_with_the_ended_run_and_an_ok_run_does_not() {
    let data = DataDir::with_vault();
    install_plugin(&data, "relay", "name = \"flaky\"\nversion = \"1\"\n");
    let out = install_plugin(
        &data,
        "relay",
        "name = \"watcher\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"flaky\"]\nstatus = [\"failed\"]\n",
    );
    assert!(out.contains("run after flaky failed"), "{out}");
    // Fires only when the outcome says so, whatever the case.
    install_plugin(
        &data,
        "relay",
        "name = \"gaveup\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"fla*\"]\noutcome = \"GAVE UP\"\n",
    );
    let server = Server::start(&data);
    let list = stdout(&data.capstan(&["plugin", "list"]));
    assert!(
        list.contains("run after fla* failed|denied|timed-out \"GAVE UP\""),
        "{list}"
    );

    assert_success(&run_by_hand(&data, "flaky", "fine"), "an ok run");
    assert!(
        runs(&data, "watcher").is_empty() && runs(&data, "gaveup").is_empty(),
        "an ok run starts no watcher"
    );
    let out = run_by_hand(&data, "flaky", "fail:disk full");
    assert!(!out.status.success(), "the run fails: {}", stdout(&out));
    let first = last_manual_run(&data, "flaky");
    assert_eq!(first["status"], "failed", "{first}");
    eventually(10, "the watcher runs once", || {
        runs(&data, "watcher").iter().any(|r| {
            r["status"]
                .as_str()
                .is_some_and(|s| s != "queued" && s != "running")
        })
    });
    assert!(
        runs(&data, "gaveup").is_empty(),
        "an outcome that does not match starts nothing"
    );

    let watched = runs(&data, "watcher");
    assert_eq!(watched.len(), 1, "{watched:?}");
    let w = &watched[0];
    assert_eq!(w["status"], "ok", "{w}");
    // The record says which run started it ...
    assert_eq!(w["trigger"]["kind"], "run", "{w}");
    assert_eq!(w["trigger"]["run_id"], first["id"], "{w}");
    assert_eq!(w["trigger"]["plugin"], "flaky", "{w}");
    assert_eq!(w["trigger"]["status"], "failed", "{w}");
    assert_eq!(w["trigger"]["depth"], 1, "{w}");
    // ... and the plugin got that run in its event, with the run's error as outcome.
    let seen = &w["outcome"]["details"];
    assert_eq!(seen["run_id"], first["id"], "{w}");
    assert_eq!(seen["plugin"], "flaky", "{w}");
    assert_eq!(seen["status"], "failed", "{w}");
    assert_eq!(seen["depth"], 1, "{w}");
    let outcome = seen["outcome"].as_str().unwrap();
    assert!(outcome.contains("disk full"), "{w}");
    assert_eq!(Some(outcome), first["error"].as_str(), "{w}");

    assert!(
        !run_by_hand(&data, "flaky", "fail:gave up on web")
            .status
            .success()
    );
    let second = last_manual_run(&data, "flaky");
    eventually(10, "the outcome watcher runs", || {
        runs(&data, "gaveup")
            .iter()
            .any(|r| r["status"] == "ok" && r["trigger"]["run_id"] == second["id"])
    });
    eventually(10, "the status watcher runs again", || {
        runs(&data, "watcher").len() == 2
    });
    drop(server);
}

#[test]
fn a_chain_of_run_outcome_triggers_stops_at_the_limit_and_the_refusal_is_recorded() {
    let data = DataDir::with_vault();
    install_plugin(&data, "relay", "name = \"first\"\nversion = \"1\"\n");
    // `chain` fails on every run event and watches `first` and, by its own name, itself:
    // without the limit this would never stop.
    install_plugin(
        &data,
        "relay",
        "name = \"chain\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"first\", \"chain\"]\nstatus = [\"failed\"]\n[config]\nfail_on_run = true\n",
    );
    // The default limit is 3.
    let server = Server::start(&data);
    let token = server.admin_token();

    assert!(!run_by_hand(&data, "first", "fail:broken").status.success());
    let first = last_manual_run(&data, "first");
    eventually(20, "the chain ends in a refusal", || {
        runs(&data, "chain").iter().any(|r| r["status"] == "denied")
    });

    // Newest first: the refusal, then links 3, 2, 1, each started by the one before.
    let mut chain = runs(&data, "chain");
    chain.reverse();
    assert_eq!(chain.len(), 4, "{chain:#?}");
    let mut before = first["id"].clone();
    for (i, r) in chain.iter().enumerate() {
        let depth = i as u64 + 1;
        assert_eq!(r["trigger"]["kind"], "run", "{r}");
        assert_eq!(r["trigger"]["depth"], depth, "{r}");
        assert_eq!(r["trigger"]["run_id"], before, "{r}");
        assert_eq!(r["trigger"]["status"], "failed", "{r}");
        before = r["id"].clone();
        if depth <= 3 {
            assert_eq!(r["status"], "failed", "{r}");
            let error = r["error"].as_str().unwrap();
            assert!(error.contains(&format!("at depth {depth}")), "{r}");
        } else {
            assert_eq!(r["status"], "denied", "{r}");
            assert!(r["started_at"].is_null(), "a refused run never starts: {r}");
            let error = r["error"].as_str().unwrap();
            assert!(
                error.contains("runs.max_chain_depth"),
                "says what to change: {r}"
            );
            assert!(error.contains("of 3"), "names the limit: {r}");
        }
    }
    // The refusal is counted with the denied runs.
    let mut metrics = String::new();
    let counted = r#"capstan_runs_total{plugin="chain",status="denied"} 1"#;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && !metrics.contains(counted) {
        let (status, text) = http(
            &server.addr,
            "GET",
            "/metrics",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        );
        assert_eq!(status, 200, "{text}");
        metrics = text;
    }
    assert!(metrics.contains(counted), "{metrics}");
    // A refused run starts nothing itself.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs(&data, "chain").len(), 4, "the chain stays stopped");
    drop(server);
}

#[test]
fn the_chain_limit_is_an_engine_setting() {
    let data = DataDir::with_vault();
    install_plugin(
        &data,
        "relay",
        "name = \"loop\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"loop\"]\n[config]\nfail_on_run = true\n",
    );
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_RUNS_MAX_CHAIN_DEPTH", "1");
    });
    assert!(!run_by_hand(&data, "loop", "fail:once").status.success());
    eventually(10, "the second link is refused", || {
        runs(&data, "loop").iter().any(|r| r["status"] == "denied")
    });
    // The refusal is a `denied` end `loop` watches for, of its own: it starts nothing.
    std::thread::sleep(Duration::from_millis(500));
    let depths: Vec<(String, u64)> = runs(&data, "loop")
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_string(),
                r["trigger"]["depth"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        depths,
        [
            ("denied".to_string(), 2),
            ("failed".to_string(), 1),
            ("failed".to_string(), 0)
        ],
        "newest first"
    );
    drop(server);
}

#[test]
fn an_install_naming_an_unknown_status_fails_naming_the_field() {
    let data = DataDir::with_vault();
    let dir = data.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(crate::util::plugin::wasm("relay"), dir.join("plugin.wasm")).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        "name = \"bad\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"autoheal\"]\nstatus = [\"failed\", \"crashed\"]\n",
    )
    .unwrap();
    let out = data.capstan(&[
        "plugin",
        "install",
        dir.join("plugin.wasm").to_str().unwrap(),
    ]);
    assert_failure_says(&out, "triggers.run[0].status");
    assert_failure_says(&out, "`crashed` is not a run status");
    assert_failure_says(&out, "timed-out");
    let out = data.capstan(&["plugin", "list"]);
    assert!(
        !stdout(&out).contains("bad"),
        "nothing was installed: {}",
        stdout(&out)
    );
}
