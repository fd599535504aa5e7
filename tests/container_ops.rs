//! Creating, removing and pruning containers and images from plugins, against the real
//! daemon: each call under the policy, the create guard and the container scope, and the
//! `cleanup` example built on them.

use std::process::Command;

use serde_json::{Value, json};

use crate::util::Infra;
use crate::util::plugin::{Container, Harness, TEST_LABEL, details, docker, example_dir, manifest};

/// Runs the probe plugin with `calls` and returns the report and the results.
fn probe(h: &Harness, calls: Value) -> (capstan::plugin::RunReport, Vec<Value>) {
    let r = h.run("probe", &calls.to_string());
    assert!(r.succeeded(), "{}", r.render());
    let results = details(&r).as_array().unwrap().clone();
    (r, results)
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// The probe's policy: write access, containers labelled `capstan.test.ops=<id>`.
fn probe_policy(id: &str, post: bool) -> String {
    format!(
        "[policy]\nCONTAINERS = 1\nIMAGES = 1\n{}devices = [\"local\"]\n[policy.containers]\nlabels = [\"capstan.test.ops={id}\"]\n",
        if post { "POST = 1\n" } else { "" }
    )
}

/// `docker create` (not started): a stopped container, removed when dropped.
fn stopped(prefix: &str, labels: &[&str]) -> Container {
    let name = format!("{prefix}-{}", unique());
    let mut args = vec!["create", "--name", &name, "--label", TEST_LABEL];
    for l in labels {
        args.extend(["--label", l]);
    }
    args.push(Infra::get().var("TEST_IMAGE"));
    docker(&args);
    Container { name }
}

fn running(prefix: &str, labels: &[&str]) -> Container {
    let mut args = Vec::new();
    for l in labels {
        args.extend(["--label", *l]);
    }
    Container::run(prefix, &args, Infra::get().var("TEST_IMAGE"))
}

fn exists(name: &str) -> bool {
    !docker(&["ps", "-aq", "--filter", &format!("name=^/{name}$")]).is_empty()
}

fn image_exists(reference: &str) -> bool {
    Command::new("docker")
        .env(
            "DOCKER_HOST",
            format!("unix://{}", Infra::get().var("DOCKER_SOCKET")),
        )
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

/// Images a test made, all carrying `label`: removed (with their containers) when
/// dropped.
struct Images {
    label: String,
}

impl Images {
    /// Commits a throwaway container into `reference` with the label; returns the ID.
    fn commit(&self, reference: &str) -> String {
        let c = stopped("cap-ops-commit", &[]);
        docker(&[
            "commit",
            "-c",
            &format!("LABEL {}", self.label),
            &c.name,
            reference,
        ]);
        docker(&["image", "inspect", "-f", "{{.Id}}", reference])
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let socket = Infra::get().var("DOCKER_SOCKET");
        let ids = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{socket}"))
            .args([
                "images",
                "-aq",
                "--filter",
                &format!("label={}", self.label),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker")
                .env("DOCKER_HOST", format!("unix://{socket}"))
                .args(["image", "rm", "-f", id])
                .output();
        }
    }
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error: {v}"))
}

#[test]
fn creates_a_container_in_scope_with_its_spec_and_removes_it() {
    let h = Harness::new();
    let id = unique();
    h.install("probe", &manifest("probe", &probe_policy(&id, true)));
    let name = format!("cap-ops-new-{id}");
    let _guard = Container { name: name.clone() };
    let (report, r) = probe(
        &h,
        json!([
            {"op": "create", "device": "local", "name": name, "spec": {
                "image": Infra::get().var("TEST_IMAGE"),
                "env": ["GREETING=hi"],
                "labels": {"capstan.test.ops": id, "org.capstan.test": "plugins"},
                "ports": [{"container": 8080, "ip": "127.0.0.1"}],
                "mounts": [{"kind": "tmpfs", "source": "", "target": "/scratch"}],
                "restart": "on-failure:2",
                "memory": 67108864,
            }},
            {"op": "start", "device": "local", "container": name},
        ]),
    );
    let created = r[0]["ok"].clone();
    assert_eq!(created["name"], name.as_str(), "{}", r[0]);
    assert!(r[1].get("ok").is_some(), "{}", r[1]);
    let c = Container { name: name.clone() };
    assert_eq!(c.inspect("{{.Id}}"), created["id"].as_str().unwrap());
    assert_eq!(c.inspect("{{.State.Running}}"), "true");
    assert!(c.inspect("{{json .Config.Env}}").contains("GREETING=hi"));
    assert_eq!(
        c.inspect("{{index .Config.Labels \"capstan.test.ops\"}}"),
        id
    );
    assert_eq!(
        c.inspect(
            "{{.HostConfig.RestartPolicy.Name}}:{{.HostConfig.RestartPolicy.MaximumRetryCount}}"
        ),
        "on-failure:2"
    );
    assert_eq!(c.inspect("{{.HostConfig.Memory}}"), "67108864");
    assert!(
        c.inspect("{{json .HostConfig.PortBindings}}")
            .contains("\"8080/tcp\":[{\"HostIp\":\"127.0.0.1\""),
        "{}",
        c.inspect("{{json .HostConfig.PortBindings}}")
    );
    assert!(
        c.inspect("{{json .HostConfig.Mounts}}")
            .contains("/scratch")
    );
    let call = report
        .host_calls
        .iter()
        .find(|c| c.op == "create-container")
        .expect("the create is recorded");
    assert_eq!(call.decision, "allow");
    assert!(
        call.request.starts_with("POST /containers/create?name="),
        "{}",
        call.request
    );

    // A running container is removed only with force.
    let (_, r) = probe(
        &h,
        json!([
            {"op": "remove", "device": "local", "container": name},
            {"op": "remove", "device": "local", "container": name, "force": true, "volumes": true},
        ]),
    );
    assert!(error_of(&r[0]).starts_with("docker"), "{}", r[0]);
    assert!(r[1].get("ok").is_some(), "{}", r[1]);
    assert!(!exists(&name), "removed");
    drop(c);
}

#[test]
fn create_is_denied_by_the_create_guard_and_by_the_container_scope_and_nothing_is_created() {
    let h = Harness::new();
    let id = unique();
    h.install("probe", &manifest("probe", &probe_policy(&id, true)));
    let image = Infra::get().var("TEST_IMAGE");
    let name = format!("cap-ops-denied-{id}");
    let _guard = Container { name: name.clone() };
    let labels = json!({"capstan.test.ops": id, "org.capstan.test": "plugins"});
    let (report, r) = probe(
        &h,
        json!([
            {"op": "create", "device": "local", "name": name, "spec": {"image": image, "labels": labels, "privileged": true}},
            {"op": "create", "device": "local", "name": name, "spec": {"image": image, "labels": labels,
                "mounts": [{"kind": "bind", "source": "/etc", "target": "/host-etc"}]}},
            {"op": "create", "device": "local", "name": name, "spec": {"image": image, "labels": labels, "network": "host"}},
            {"op": "create", "device": "local", "name": name, "spec": {"image": image, "labels": {"org.capstan.test": "plugins"}}},
            {"op": "create", "device": "local", "spec": {"image": image, "labels": {"capstan.test.ops": "someone-else"}}},
        ]),
    );
    for (i, needle) in [
        (0, "privileged"),
        (1, "bind_roots"),
        (2, "host_namespaces"),
        (3, "outside the plugin's container scope"),
        (4, "outside the plugin's container scope"),
    ] {
        let e = error_of(&r[i]);
        assert!(
            e.starts_with("denied") && e.contains(needle),
            "call {i}: {e}"
        );
    }
    assert!(!exists(&name), "nothing was created");
    assert_eq!(
        docker(&[
            "ps",
            "-aq",
            "--filter",
            "label=capstan.test.ops=someone-else"
        ]),
        ""
    );
    let denials: Vec<_> = report
        .host_calls
        .iter()
        .filter(|c| c.op == "create-container")
        .map(|c| c.decision.as_str())
        .collect();
    assert_eq!(
        denials, ["deny"; 5],
        "every refusal is recorded as a denial"
    );
    assert_eq!(report.denials.len(), 5);
}

#[test]
fn prune_containers_removes_only_stopped_containers_in_scope_that_match_the_filter() {
    let h = Harness::new();
    let id = unique();
    h.install("probe", &manifest("probe", &probe_policy(&id, true)));
    let scope = format!("capstan.test.ops={id}");
    let prune = "capstan.test.prune=yes";
    let matching = stopped("cap-prune-match", &[&scope, prune]);
    let up = running("cap-prune-running", &[&scope, prune]);
    let outside = stopped("cap-prune-outside", &[prune]);
    let unlabelled = stopped("cap-prune-nolabel", &[&scope]);
    let kept = stopped("cap-prune-keep", &[&scope, prune, "capstan.test.keep=1"]);
    let (report, r) = probe(
        &h,
        json!([
            {"op": "prune-containers", "device": "local", "labels": [prune], "not_labels": ["capstan.test.keep"], "until": "1h"},
            {"op": "prune-containers", "device": "local", "labels": [prune], "not_labels": ["capstan.test.keep"]},
            {"op": "prune-containers", "device": "local", "until": "yesterday"},
        ]),
    );
    assert_eq!(
        r[0]["ok"]["removed"],
        json!([]),
        "nothing is older than an hour: {}",
        r[0]
    );
    assert_eq!(r[1]["ok"]["removed"], json!([matching.name]), "{}", r[1]);
    assert_eq!(r[1]["ok"]["failed"], json!([]));
    assert!(error_of(&r[2]).starts_with("invalid"), "{}", r[2]);
    assert!(!exists(&matching.name));
    for survivor in [&up, &outside, &unlabelled, &kept] {
        assert!(exists(&survivor.name), "{} survives", survivor.name);
    }
    let call = report
        .host_calls
        .iter()
        .find(|c| c.op == "prune-containers")
        .unwrap();
    assert!(
        call.request.contains("GET /containers/json")
            && call.request.contains("DELETE /containers/"),
        "decided on what it sends, not POST /containers/prune: {}",
        call.request
    );
}

#[test]
fn prunes_and_removes_throwaway_images() {
    let h = Harness::new();
    let id = unique();
    h.install("probe", &manifest("probe", &probe_policy(&id, true)));
    let images = Images {
        label: format!("capstan.test.ops.image={id}"),
    };
    let repo = format!("capstan-test/ops-{id}");
    let first = images.commit(&format!("{repo}:a"));
    let current = images.commit(&format!("{repo}:a"));
    assert_ne!(first, current, "the first commit is now dangling");
    let b = images.commit(&format!("{repo}:b"));
    let label = images.label.clone();
    let (_, r) = probe(
        &h,
        json!([
            {"op": "remove-image", "device": "local", "image": format!("{repo}:b")},
            {"op": "prune-images", "device": "local", "labels": [label], "dangling": true},
            {"op": "prune-images", "device": "local", "labels": [label], "dangling": false},
            {"op": "remove-image", "device": "local", "image": "capstan-test/no-such-image-here:x"},
        ]),
    );
    let removed = &r[0]["ok"];
    assert_eq!(
        removed["untagged"],
        json!([format!("{repo}:b")]),
        "{}",
        r[0]
    );
    assert_eq!(removed["deleted"], json!([b]));
    assert!(!image_exists(&b));
    assert_eq!(
        r[1]["ok"]["deleted"],
        json!([first]),
        "only the dangling one: {}",
        r[1]
    );
    assert_eq!(
        r[2]["ok"]["deleted"],
        json!([current]),
        "the tagged image stayed, then went as an unused one: {}",
        r[2]
    );
    assert_eq!(r[2]["ok"]["untagged"], json!([format!("{repo}:a")]));
    assert!(!image_exists(&format!("{repo}:a")));
    assert!(error_of(&r[3]).starts_with("not-found"), "{}", r[3]);
}

#[test]
fn a_policy_without_post_denies_every_write_and_sends_nothing() {
    let h = Harness::new();
    let id = unique();
    h.install("probe", &manifest("probe", &probe_policy(&id, false)));
    let scope = format!("capstan.test.ops={id}");
    let c = stopped("cap-ops-readonly", &[&scope]);
    let images = Images {
        label: format!("capstan.test.ops.image={id}"),
    };
    let reference = format!("capstan-test/ops-{id}:ro");
    images.commit(&reference);
    let (report, r) = probe(
        &h,
        json!([
            {"op": "create", "device": "local", "name": format!("cap-ops-ro-{id}"), "spec": {"image": Infra::get().var("TEST_IMAGE"), "labels": {"capstan.test.ops": id}}},
            {"op": "remove", "device": "local", "container": c.name},
            {"op": "prune-containers", "device": "local"},
            {"op": "prune-images", "device": "local", "labels": [images.label], "dangling": false},
            {"op": "remove-image", "device": "local", "image": reference},
        ]),
    );
    for (i, v) in r.iter().enumerate() {
        let e = error_of(v);
        assert!(
            e.starts_with("denied") && e.contains("POST=1"),
            "call {i}: {e}"
        );
    }
    assert!(exists(&c.name));
    assert!(!exists(&format!("cap-ops-ro-{id}")));
    assert!(image_exists(&reference));
    assert!(report.host_calls.iter().all(|c| c.decision == "deny"));
    assert_eq!(report.host_calls.len(), 5);
}

#[test]
fn cleanup_in_a_dry_run_removes_nothing_then_removes_exactly_what_it_listed() {
    let h = Harness::new();
    let id = unique();
    let label = format!("capstan.cleanup={id}");
    let text = std::fs::read_to_string(example_dir("cleanup").join("plugin.toml"))
        .unwrap()
        .replace("capstan.cleanup=true", &label)
        .replace("image_label = \"\"", &format!("image_label = {label:?}"));
    assert!(
        text.contains("dry_run = true"),
        "the example defaults to a dry run"
    );
    h.install("cleanup", &text);
    let old_a = stopped("cap-cleanup-a", &[&label]);
    let old_b = stopped("cap-cleanup-b", &[&label]);
    let up = running("cap-cleanup-up", &[&label]);
    let other = stopped("cap-cleanup-other", &["capstan.cleanup=someone-else"]);
    let images = Images {
        label: label.clone(),
    };
    let reference = format!("capstan-test/cleanup-{id}:latest");
    let dangling = images.commit(&reference);
    let tagged = images.commit(&reference);

    let run = |input: Value| {
        let r = h.run("cleanup", &input.to_string());
        assert!(r.succeeded(), "{}", r.render());
        let d = details(&r);
        assert_eq!(d.as_array().unwrap().len(), 1, "one device: {d}");
        (r, d[0].clone())
    };
    let sorted = |v: &Value| {
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };

    let (_, young) = run(json!({"older_than_secs": 3600}));
    assert_eq!(
        young["containers"],
        json!([]),
        "nothing is an hour old: {young}"
    );
    assert_eq!(young["images"], json!([]));

    let (r, dry) = run(json!({"older_than_secs": 0}));
    let mut want = vec![old_a.name.clone(), old_b.name.clone()];
    want.sort();
    assert_eq!(sorted(&dry["containers"]), want, "{dry}");
    assert_eq!(dry["images"], json!([dangling]));
    assert_eq!(dry["dry_run"], true);
    assert!(
        r.outcome
            .as_ref()
            .unwrap()
            .summary
            .starts_with("dry run: would remove 2 container(s) and 1 image(s)"),
        "{}",
        r.render()
    );
    assert!(exists(&old_a.name) && exists(&old_b.name) && image_exists(&dangling));
    assert!(
        r.host_calls.iter().all(|c| !c.op.starts_with("prune")),
        "a dry run only lists"
    );

    let (_, real) = run(json!({"dry_run": false, "older_than_secs": 0}));
    assert_eq!(sorted(&real["containers"]), want, "{real}");
    assert_eq!(real["images"], dry["images"]);
    assert!(!exists(&old_a.name) && !exists(&old_b.name));
    assert!(!image_exists(&dangling));
    assert!(exists(&up.name), "a running container stays");
    assert!(exists(&other.name), "a container outside the scope stays");
    assert!(image_exists(&tagged), "a tagged image stays");
}
