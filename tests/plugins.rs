//! The plugin runtime against the real daemon: runs, the compile cache, containment of
//! hostile plugins, scopes and policy denials, the audit log.

use std::time::{Duration, Instant};

use capstan::plugin::{Exit, PluginRuntime, RuntimeConfig, TriggerEvent};

use crate::util::Infra;
use crate::util::plugin::{Container, Harness, manifest};

const ANY_DEVICE: &str = "[policy]\nCONTAINERS = 1\ndevices = [\"local\"]\n";

#[test]
fn runs_a_plugin_on_a_fresh_instance_per_run_and_reports_its_outcome() {
    let h = Harness::new();
    h.install("trivial", &manifest("trivial", ""));
    for _ in 0..3 {
        let r = h.run("trivial", "");
        assert_eq!(r.status, Exit::Succeeded, "{}", r.render());
        assert_eq!(r.outcome.as_ref().unwrap().summary, "ok");
        assert_eq!(r.trigger, "manual");
    }
    let r = h.run("trivial", "calls:50");
    assert_eq!(r.host_calls_total, 50, "{}", r.render());
}

#[test]
fn loads_installed_plugins_from_the_compile_cache() {
    let h = Harness::new();
    h.install("trivial", &manifest("trivial", ""));
    let cache = h.engine.settings.data_dir.join("plugin-cache");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one cache entry"
    );
    let again = {
        let _g = h.rt.enter();
        PluginRuntime::new(h.engine.clone(), RuntimeConfig::default()).unwrap()
    };
    let summary = again.load_installed().unwrap();
    assert_eq!(
        (summary.loaded, summary.from_cache, summary.compiled),
        (1, 1, 0)
    );
    let r =
        h.rt.block_on(again.run("trivial", TriggerEvent::manual("")))
            .unwrap();
    assert!(r.succeeded(), "{}", r.render());
}

#[test]
fn stops_an_endless_loop_at_its_deadline_while_a_well_behaved_plugin_completes() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("spinner", "[limits]\ntimeout_secs = 2\n"),
    );
    h.install("trivial", &manifest("trivial", ""));
    let started = Instant::now();
    let (spin, quick) = h.rt.block_on(async {
        let spin = h.runtime.run("spinner", TriggerEvent::manual("spin"));
        let quick = async {
            // Start once the spinner is spinning.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            let r = h
                .runtime
                .run("trivial", TriggerEvent::manual(""))
                .await
                .unwrap();
            (r, t.elapsed())
        };
        tokio::join!(spin, quick)
    });
    let spin = spin.unwrap();
    assert_eq!(spin.status, Exit::TimedOut, "{}", spin.render());
    assert!(
        spin.error.as_deref().unwrap().contains("timeout_secs"),
        "{:?}",
        spin.error
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "stopped after {elapsed:?}"
    );
    let (quick, took) = quick;
    assert!(quick.succeeded(), "{}", quick.render());
    assert!(
        took < Duration::from_secs(1),
        "the well-behaved run took {took:?} beside a spinning one"
    );
    // The engine keeps serving.
    assert!(h.run("trivial", "").succeeded());
}

#[test]
fn stops_a_memory_hog_at_its_memory_limit() {
    let h = Harness::new();
    h.install("hostile", &manifest("hog", "[limits]\nmemory_mib = 16\n"));
    let r = h.run("hog", "hog");
    assert_eq!(r.status, Exit::MemoryExceeded, "{}", r.render());
    assert!(
        r.error.as_deref().unwrap().contains("16 MiB"),
        "{:?}",
        r.error
    );
    assert!(h.run("hog", "ok").succeeded());
}

#[test]
fn stops_deep_recursion_with_a_stack_overflow_trap() {
    let h = Harness::new();
    h.install("hostile", &manifest("recurse", ""));
    let r = h.run("recurse", "recurse");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(
        r.error.as_deref().unwrap().contains("stack overflow"),
        "{:?}",
        r.error
    );
    let r = h.run("recurse", "recurse-shadow");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(
        r.error.as_deref().unwrap().contains("recursion"),
        "{:?}",
        r.error
    );
    assert!(h.run("recurse", "ok").succeeded());
}

#[test]
fn reports_a_panic_as_a_trap_with_the_panic_message_on_stderr() {
    let h = Harness::new();
    h.install("hostile", &manifest("panicky", ""));
    let r = h.run("panicky", "trap");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(
        r.stderr.contains("panics on purpose"),
        "stderr: {}",
        r.stderr
    );
}

#[test]
fn caps_output_and_logs_and_counts_what_was_dropped() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("flood", "[limits]\nmax_output_bytes = 4096\nmax_log_bytes = 2000\ntimeout_secs = 60\nmax_host_calls = 200000\n"),
    );
    let r = h.run("flood", "flood");
    assert!(r.succeeded(), "{}", r.render());
    assert_eq!(r.stdout.len(), 4096);
    assert_eq!(r.stderr.len(), 4096);
    assert_eq!(r.stdout_dropped, 4096 * 1024 - 4096);
    assert!(
        r.logs.len() < 200 && r.logs_dropped > 99_000,
        "{} kept, {} dropped",
        r.logs.len(),
        r.logs_dropped
    );
    assert_eq!(r.logs.len() as u64 + r.logs_dropped, 100_000);
}

#[test]
fn gives_a_plugin_no_files_no_network_and_no_environment() {
    let h = Harness::new();
    h.install("hostile", &manifest("prober", ""));
    for mode in ["fs", "net"] {
        let r = h.run("prober", mode);
        let summary = &r
            .outcome
            .as_ref()
            .unwrap_or_else(|| panic!("{}", r.render()))
            .summary;
        assert!(!summary.contains("SUCCEEDED"), "{mode}: {summary}");
        assert_eq!(
            summary.matches(": refused (").count(),
            4,
            "{mode}: {summary}"
        );
    }
    let r = h.run("prober", "env");
    let summary = &r.outcome.as_ref().unwrap().summary;
    // wasi-libc answers `/` for the working directory on its own; no directory is open.
    assert!(summary.starts_with("vars=0 args=0 "), "{summary}");
    assert!(summary.contains("home=refused"), "{summary}");
    assert!(!std::path::Path::new("/tmp/capstan-hostile").exists());
}

#[test]
fn stops_a_plugin_that_exceeds_its_host_call_budget() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("chatty", "[limits]\nmax_host_calls = 100\n"),
    );
    let r = h.run("chatty", "calls");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(
        r.error.as_deref().unwrap().contains("max_host_calls"),
        "{:?}",
        r.error
    );
}

#[test]
fn denies_a_device_outside_the_scope_with_a_value_and_audits_it() {
    let h = Harness::new();
    h.install("hostile", &manifest("roamer", ANY_DEVICE));
    let r = h.run("roamer", "device:elsewhere");
    assert_eq!(
        r.status,
        Exit::Failed,
        "a denial is a value, not a trap: {}",
        r.render()
    );
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .starts_with("denied: device `elsewhere`"),
        "{:?}",
        r.error
    );
    assert_eq!(r.denials.len(), 1);
    let audit = h.runtime.audit().tail(10).unwrap();
    let last = audit.last().unwrap();
    assert_eq!(
        (
            last.plugin.as_str(),
            last.call.device.as_str(),
            last.call.decision.as_str()
        ),
        ("roamer", "elsewhere", "deny")
    );
    assert_eq!(last.call.op, "list-containers");
    // The same plugin on its own device is allowed.
    let r = h.run("roamer", "device:local");
    assert!(r.succeeded(), "{}", r.render());
    assert_eq!(h.runtime.audit().tail(1).unwrap()[0].call.decision, "allow");
}

#[test]
fn denies_what_the_policy_does_not_allow_before_sending_anything() {
    let h = Harness::new();
    let c = Container::run("cap-plugin-deny", &[], Infra::get().var("TEST_IMAGE"));
    h.install("hostile", &manifest("readonly", ANY_DEVICE));
    let started = c.inspect("{{.State.StartedAt}}");
    let r = h.run("readonly", &format!("container:local/{}", c.name));
    assert_eq!(r.status, Exit::Failed, "{}", r.render());
    let error = r.error.as_deref().unwrap();
    assert!(
        error.contains("ALLOW_RESTARTS=1"),
        "names the variable: {error}"
    );
    assert_eq!(
        c.inspect("{{.State.StartedAt}}"),
        started,
        "the container was not restarted"
    );
    assert_eq!(r.host_calls[0].decision, "deny");
}

#[test]
fn denies_a_container_outside_the_container_scope_and_acts_on_one_inside() {
    let h = Harness::new();
    let image = Infra::get().var("TEST_IMAGE");
    let outside = Container::run("cap-plugin-out", &[], image);
    let inside = Container::run(
        "cap-plugin-in",
        &["--label", "capstan.test.scope=yes"],
        image,
    );
    h.install(
        "hostile",
        &manifest(
            "scoped",
            "[policy]\nCONTAINERS = 1\nALLOW_RESTARTS = 1\ndevices = [\"local\"]\n[policy.containers]\nlabels = [\"capstan.test.scope=yes\"]\n",
        ),
    );
    let r = h.run("scoped", &format!("container:local/{}", outside.name));
    assert_eq!(r.status, Exit::Failed, "{}", r.render());
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("outside the plugin's container scope"),
        "{:?}",
        r.error
    );
    let before = inside.inspect("{{.State.StartedAt}}");
    let r = h.run("scoped", &format!("container:local/{}", inside.name));
    assert!(r.succeeded(), "{}", r.render());
    assert_ne!(inside.inspect("{{.State.StartedAt}}"), before, "restarted");
}

#[test]
fn refuses_invalid_manifests_and_non_plugins_at_install() {
    let h = Harness::new();
    let dir = h.dir.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        crate::util::plugin::wasm("trivial"),
        dir.join("plugin.wasm"),
    )
    .unwrap();
    for (text, needle) in [
        (
            "name = \"x\"\nversion = \"1\"\n[policy]\ndevices = [\"nowhere\"]\n",
            "policy.devices",
        ),
        (
            "name = \"x\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"every minute\"\n",
            "triggers.cron[0].schedule",
        ),
        (
            "name = \"x\"\nversion = \"1\"\n[limits]\nmemory = 5\n",
            "memory",
        ),
        (
            "name = \"x\"\nversion = \"1\"\n[policy]\nPOST = true\n",
            "POST",
        ),
    ] {
        std::fs::write(dir.join("plugin.toml"), text).unwrap();
        let err = h
            .runtime
            .install(&dir.join("plugin.wasm"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
    std::fs::write(dir.join("plugin.toml"), manifest("x", "")).unwrap();
    std::fs::write(dir.join("plugin.wasm"), b"\0asm not really").unwrap();
    let err = h
        .runtime
        .install(&dir.join("plugin.wasm"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a usable plugin component"), "{err}");
    assert!(h.runtime.installed().unwrap().is_empty());
}

#[test]
fn keeps_serving_after_every_kind_of_hostile_run() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("hostile", "[limits]\ntimeout_secs = 1\nmemory_mib = 16\n"),
    );
    h.install("trivial", &manifest("trivial", ""));
    for mode in [
        "spin",
        "hog",
        "recurse",
        "recurse-shadow",
        "trap",
        "fs",
        "net",
        "env",
        "device:x",
        "nonsense",
    ] {
        let r = h.run("hostile", mode);
        assert!(!r.render().is_empty());
        let ok = h.run("trivial", "");
        assert!(ok.succeeded(), "after {mode}: {}", ok.render());
    }
}

/// Runs the probe plugin with `calls`; each result is `{"ok": …}` or `{"error": "…"}`.
fn probe_calls(h: &Harness, calls: serde_json::Value) -> Vec<serde_json::Value> {
    let r = h.run("probe", &calls.to_string());
    assert!(r.succeeded(), "{}", r.render());
    let details = &r.outcome.as_ref().expect("an outcome").details;
    serde_json::from_str::<serde_json::Value>(details)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

const PROBE_SCOPED: &str =
    "[policy]\nCONTAINERS = 1\nIMAGES = 1\nPOST = 1\ndevices = [\"local\"]\n[policy.containers]\n";

#[test]
fn a_legacy_link_alias_does_not_list_an_out_of_scope_container() {
    let h = Harness::new();
    let image = Infra::get().var("TEST_IMAGE");
    let out = Container::run("cap-alias-out", &[], image);
    // `--link` gives `out` a second name, `/<in>/<alias>`, that the glob below matches.
    let inside_name = format!(
        "cap-alias-in-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    crate::util::plugin::docker(&[
        "run",
        "-d",
        "--name",
        &inside_name,
        "--label",
        crate::util::plugin::TEST_LABEL,
        "--link",
        &format!("{}:db", out.name),
        image,
    ]);
    let inside = Container { name: inside_name };
    let names = crate::util::plugin::docker(&[
        "ps",
        "--no-trunc",
        "--filter",
        &format!("name={}", out.name),
        "--format",
        "{{.Names}}",
    ]);
    assert!(
        names.contains(&format!("{}/db", inside.name)),
        "the link alias is listed as a name of {}: {names}",
        out.name
    );
    h.install_text_for(
        "probe",
        &manifest("probe", PROBE_SCOPED),
        &[&format!("{}*", inside.name)],
    );
    let r = probe_calls(
        &h,
        serde_json::json!([{"op": "list-containers", "device": "local"}]),
    );
    let listed: Vec<&str> = r[0]["ok"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r[0]))
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(listed.contains(&inside.name.as_str()), "{listed:?}");
    assert!(
        !listed.contains(&out.name.as_str()),
        "the out-of-scope container is not listed through its alias: {listed:?}"
    );
    assert!(
        listed.iter().all(|n| !n.contains('/')),
        "summaries carry own names, never an alias: {listed:?}"
    );
    drop(inside);
}

#[test]
fn recreate_may_change_the_tag_but_not_the_repository_nor_ask_for_capabilities() {
    let h = Harness::new();
    let image = Infra::get().var("TEST_IMAGE");
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let repo = format!("capstan-test/retag-{tag}");
    let other = format!("capstan-test/other-{tag}:a");
    for t in [format!("{repo}:a"), format!("{repo}:b"), other.clone()] {
        crate::util::plugin::docker(&["tag", image, &t]);
    }
    let c = Container::run("cap-retag", &[], &format!("{repo}:a"));
    let capped = Container::run("cap-retag-cap", &["--cap-add", "NET_ADMIN"], image);
    h.install_text_for(
        "probe",
        &manifest("probe", PROBE_SCOPED),
        &[&c.name, &capped.name],
    );
    let old_id = c.inspect("{{.Id}}");
    let r = probe_calls(
        &h,
        serde_json::json!([
            {"op": "recreate", "device": "local", "container": c.name, "image": other},
            {"op": "recreate", "device": "local", "container": capped.name},
            {"op": "recreate", "device": "local", "container": c.name, "image": format!("{repo}:b")},
        ]),
    );
    let e = r[0]["error"].as_str().unwrap_or_else(|| panic!("{}", r[0]));
    assert!(
        e.starts_with("denied") && e.contains("only change the tag or digest"),
        "{e}"
    );
    let e = r[1]["error"].as_str().unwrap_or_else(|| panic!("{}", r[1]));
    assert!(e.starts_with("denied") && e.contains("cap_add"), "{e}");
    assert!(r[2].get("ok").is_some(), "another tag is allowed: {}", r[2]);
    assert_ne!(c.inspect("{{.Id}}"), old_id);
    assert_eq!(c.inspect("{{.Config.Image}}"), format!("{repo}:b"));
    assert_eq!(capped.inspect("{{.State.Running}}"), "true", "left alone");
    drop((c, capped));
    let _ = std::process::Command::new("docker")
        .args([
            "image",
            "rm",
            &format!("{repo}:a"),
            &format!("{repo}:b"),
            &other,
        ])
        .output();
}

/// The engine's resident set and its peak, bytes, from `/proc/<pid>/status`.
fn resident(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

#[test]
fn log_records_with_half_a_million_empty_fields_fail_the_run_and_leave_the_engine_bounded() {
    use crate::util::{DataDir, Server, http};
    use base64::Engine as _;
    // The attack as reported: 20 records of 500,000 empty fields under memory_mib = 64,
    // against a real `capstan serve`, its resident memory read before and after.
    let data = DataDir::empty();
    let server = Server::start(&data);
    let auth = format!("Bearer {}", server.admin_token());
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let wasm = std::fs::read(crate::util::plugin::wasm("hostile")).unwrap();
    let install = serde_json::json!({
        "manifest": manifest("fields", "[limits]\nmemory_mib = 64\n"),
        "wasm_base64": base64::engine::general_purpose::STANDARD.encode(&wasm),
    });
    let (status, body) = http(
        &server.addr,
        "POST",
        "/api/plugins",
        &headers,
        install.to_string().as_bytes(),
    );
    assert!(status < 300, "install: {status} {body}");
    let (before, _) = resident(server.child.id());
    let (status, body) = http(
        &server.addr,
        "POST",
        "/api/plugins/fields/run?wait=true",
        &headers,
        br#"{"input": "fields:20:500000"}"#,
    );
    let (after, peak) = resident(server.child.id());
    assert_eq!(status, 200, "{body}");
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(record["status"], "failed", "{body}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("limits.max_log_fields") && error.contains("500000 fields"),
        "the limit is named: {error}"
    );
    const MB: u64 = 1_000_000;
    println!(
        "engine resident: {} MB before, {} MB after, peak {} MB",
        before / MB,
        after / MB,
        peak / MB
    );
    assert!(
        peak < before + 100 * MB,
        "the engine grew from {} MB to a peak of {} MB",
        before / MB,
        peak / MB
    );
}

#[test]
fn refuses_a_log_record_with_more_fields_than_max_log_fields_on_the_first_call() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("fields", "[limits]\nmax_log_fields = 8\n"),
    );
    let r = h.run("fields", "fields:20:9");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("limits.max_log_fields"),
        "{:?}",
        r.error
    );
    assert_eq!(r.host_calls_total, 1, "the first such record ends the run");
    assert!(r.logs.is_empty());
    // In the run history the run is `failed`, with the limit named.
    let end = capstan::scheduler::end_of(r, 64 * 1024);
    assert_eq!(end.status, capstan::runs::RunStatus::Failed);
    assert!(end.error.unwrap().contains("max_log_fields"));
    // Records within the cap are kept, fields and all.
    let r = h.run("fields", "fields:3:8");
    assert!(r.succeeded(), "{}", r.render());
    assert_eq!(r.logs.len(), 3);
    assert_eq!(r.logs[0].fields.len(), 8);
}

#[test]
fn counts_empty_log_records_with_their_overhead_and_caps_records_per_run() {
    use capstan::plugin::budget::LOG_RECORD_OVERHEAD;
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("records", "[limits]\nmax_log_bytes = 65536\n"),
    );
    let r = h.run("records", "records:9990");
    assert!(r.succeeded(), "{}", r.render());
    let kept = r.logs.len();
    assert!(
        kept * (LOG_RECORD_OVERHEAD + "info".len()) <= 65536,
        "{kept} empty records kept against a 64 KiB cap"
    );
    assert!(kept > 0);
    assert_eq!(kept as u64 + r.logs_dropped, 9990);
    // The record count has its own cap.
    h.install(
        "hostile",
        &manifest(
            "records",
            "[limits]\nmax_log_records = 100\nmax_log_bytes = 16777216\n",
        ),
    );
    let r = h.run("records", "records:500");
    assert!(r.succeeded(), "{}", r.render());
    assert_eq!((r.logs.len(), r.logs_dropped), (100, 400));
}

#[test]
fn fails_a_run_whose_outcome_does_not_fit_its_host_memory() {
    let h = Harness::new();
    h.install(
        "hostile",
        &manifest("outcome", "[limits]\nmemory_mib = 128\n"),
    );
    let r = h.run("outcome", "outcome:40");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    assert!(r.outcome.is_none());
    let error = r.error.as_deref().unwrap();
    assert!(
        error.contains("the outcome") && error.contains("limits.max_host_bytes"),
        "{error}"
    );
    assert!(h.run("outcome", "outcome:1").succeeded());
}

#[test]
fn fails_a_run_whose_denial_records_do_not_fit_its_host_memory() {
    let h = Harness::new();
    h.install("hostile", &manifest("denials", ANY_DEVICE));
    // Each denial names a device of 1 MiB: its records would keep megabytes per call.
    let r = h.run("denials", "denials:200:1048576");
    assert_eq!(r.status, Exit::Trapped, "{}", r.render());
    let error = r.error.as_deref().unwrap();
    assert!(error.contains("limits.max_host_bytes"), "{error}");
    assert!(
        r.host_calls_total < 40,
        "stopped after {} calls",
        r.host_calls_total
    );
    let kept: usize = r
        .denials
        .iter()
        .map(|d| d.device.len() + d.reason.len() + d.request.len())
        .chain(
            r.host_calls
                .iter()
                .map(|c| c.device.len() + c.request.len()),
        )
        .sum();
    assert!(kept <= 32 * 1024 * 1024, "{kept} bytes of records kept");
    // Host-call (and audit) records keep a bounded part of what the guest passed.
    assert!(
        r.host_calls.iter().all(|c| c.device.len() < 1100),
        "a host-call record kept a whole 1 MiB device name"
    );
}

#[test]
fn eight_thousand_state_sets_complete_and_the_state_quota_holds_exactly() {
    let h = Harness::new();
    // "key-000000" (10 bytes) + an 8-byte value: 18 bytes a key, 8,000 keys exactly.
    h.install(
        "hostile",
        &manifest("stateful", "[limits]\nmax_state_bytes = 144000\n"),
    );
    let started = Instant::now();
    let r = h.run("stateful", "state:8000:8");
    println!("8000 state sets: {:?}", started.elapsed());
    assert_eq!(
        r.outcome.as_ref().map(|o| o.summary.as_str()),
        Some("stored 8000 of 8000"),
        "{}",
        r.render()
    );
    assert_eq!(h.runtime.state().size("stateful").unwrap(), 144_000);
    // Setting the same keys again replaces them (no growth); one more key is over.
    let r = h.run("stateful", "state:8001:8");
    let summary = &r.outcome.as_ref().unwrap().summary;
    assert!(
        summary.starts_with("stored 8000 of 8001; then: invalid:")
            && summary.contains("limits.max_state_bytes"),
        "{summary}"
    );
    let r = h.run("stateful", "state:1:8:8000");
    let summary = &r.outcome.as_ref().unwrap().summary;
    assert!(
        summary.starts_with("stored 0 of 1; then: invalid:"),
        "{summary}"
    );
    // Deleting a key frees its bytes for another.
    h.runtime.state().delete("stateful", "key-000000").unwrap();
    assert_eq!(h.runtime.state().size("stateful").unwrap(), 144_000 - 18);
    let r = h.run("stateful", "state:1:8:8000");
    assert_eq!(r.outcome.as_ref().unwrap().summary, "stored 1 of 1");
    assert_eq!(h.runtime.state().size("stateful").unwrap(), 144_000);
}
