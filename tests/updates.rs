//! Update checks without pulling, against the test registry (`REGISTRY`): the
//! `check-image-update` host function (through the `probe` test plugin), the `updates`
//! example plugin (report, notify once, redeploy after `min_age`), and compose stacks
//! re-created in dependency order by `updates` and `redeploy`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::notify::{Engine as Serve, QUICK, Receiver};
use crate::registry::docker_quiet;
use crate::util::Infra;
use crate::util::plugin::{Container, Harness, details, docker, example_dir, manifest};

/// A repository of the test's own in the test registry: `tag` (`…:1`) pushed from the
/// test image, then a changed image pushed as the same tag while the local tag stays on
/// the first one (as on a host that has not pulled yet). Removes its names when dropped.
struct Pushed {
    repo: String,
    tag: String,
    /// The first image's ID (the test image) and the digest it was pushed by.
    v1: String,
    d1: String,
    /// The changed image, once pushed.
    v2: Option<(String, String)>,
}

impl Pushed {
    fn new(name: &str) -> Pushed {
        let infra = Infra::get();
        let repo = format!(
            "{}/capstan-test/{name}-{}",
            infra.var("REGISTRY"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let tag = format!("{repo}:1");
        docker(&["tag", infra.var("TEST_IMAGE"), &tag]);
        docker(&["push", "-q", &tag]);
        // Pulled back from the registry, as a host that runs it has it.
        docker(&["image", "rm", &tag]);
        docker(&["pull", "-q", &tag]);
        let v1 = docker(&["image", "inspect", "-f", "{{.Id}}", &tag]);
        let d1 = digest_in(&v1, &repo).expect("the pulled image has a digest in its repository");
        Pushed {
            repo,
            tag,
            v1,
            d1,
            v2: None,
        }
    }

    /// Commits `container` with a new label as the tag and pushes it; the local tag goes
    /// back to the first image. Returns the new image's ID and digest. `before_push` runs
    /// while the tag names the new, never pushed image.
    fn push_changed(
        &mut self,
        container: &str,
        before_push: impl FnOnce(&str),
    ) -> (String, String) {
        docker(&[
            "commit",
            "--change",
            "LABEL capstan.test.version=2",
            container,
            &self.tag,
        ]);
        let v2 = docker(&["image", "inspect", "-f", "{{.Id}}", &self.tag]);
        assert_ne!(v2, self.v1);
        before_push(&v2);
        docker(&["push", "-q", &self.tag]);
        let d2 = digest_in(&v2, &self.repo).expect("the pushed image has a digest");
        assert_ne!(d2, self.d1);
        docker(&["tag", &self.v1, &self.tag]);
        self.v2 = Some((v2.clone(), d2.clone()));
        (v2, d2)
    }

    /// The image ID the tag names on the device now.
    fn local_id(&self) -> String {
        docker(&["image", "inspect", "-f", "{{.Id}}", &self.tag])
    }
}

impl Drop for Pushed {
    fn drop(&mut self) {
        // Every name of the repository (removing a tag may take its digest with it, so
        // a name already gone is no failure), then the changed image; the first image
        // is the test image, which its own name keeps.
        let quiet = |args: &[&str]| {
            docker_quiet(args)
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let format =
            "{{range .RepoTags}}{{println .}}{{end}}{{range .RepoDigests}}{{println .}}{{end}}";
        let mut ids = vec![self.v1.clone()];
        ids.extend(self.v2.as_ref().map(|(id, _)| id.clone()));
        for id in &ids {
            for r in quiet(&["image", "inspect", "-f", format, id]).lines() {
                if r.strip_prefix(&self.repo)
                    .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
                {
                    quiet(&["image", "rm", r]);
                }
            }
        }
        if let Some((v2, _)) = &self.v2 {
            quiet(&["image", "rm", "-f", v2]);
        }
    }
}

/// The digest image `id` has in repository `repo` (`RepoDigests`), if any.
fn digest_in(id: &str, repo: &str) -> Option<String> {
    docker(&[
        "image",
        "inspect",
        "-f",
        "{{range .RepoDigests}}{{println .}}{{end}}",
        id,
    ])
    .lines()
    .find_map(|l| l.strip_prefix(&format!("{repo}@")).map(str::to_string))
}

const PROBE: &str = "[policy]\nCONTAINERS = 1\nIMAGES = 1\nDISTRIBUTION = 1\ndevices = [\"local\"]\n[policy.containers]\nlabels = [\"capstan.test.probe=yes\"]\n";

fn probe(h: &Harness, plugin: &str, calls: Value) -> (Vec<Value>, capstan::plugin::RunReport) {
    let r = h.run(plugin, &calls.to_string());
    assert!(r.succeeded(), "{}", r.render());
    (details(&r).as_array().unwrap().clone(), r)
}

fn ok(results: &[Value], i: usize) -> Value {
    results[i]
        .get("ok")
        .unwrap_or_else(|| panic!("call {i} failed: {}", results[i]))
        .clone()
}

#[test]
fn check_image_update_compares_digests_without_pulling() {
    let h = Harness::new();
    h.install("probe", &manifest("probe", PROBE));
    let mut app = Pushed::new("upd");
    let c = Container::run("cap-upd", &["--label", "capstan.test.probe=yes"], &app.tag);
    let check = json!({"op": "check-update", "device": "local", "container": c.name});

    // Nothing pushed since the pull: up to date.
    let (r, report) = probe(
        &h,
        "probe",
        json!([check, {"op": "check-update", "device": "local", "image": app.tag}]),
    );
    for i in [0, 1] {
        let u = ok(&r, i);
        assert_eq!(u["status"], "up-to-date", "{u}");
        assert_eq!(u["image"], app.tag.as_str());
        assert_eq!(u["image_id"], app.v1.as_str());
        assert_eq!(u["local_digests"], json!([app.d1]));
        assert_eq!(u["remote_digest"], app.d1.as_str());
    }
    let calls: Vec<_> = report
        .host_calls
        .iter()
        .filter(|c| c.op == "check-image-update")
        .collect();
    assert_eq!(calls.len(), 2, "{}", report.render());
    assert!(
        calls[0].request.contains("GET /distribution/"),
        "the call names the distribution request: {}",
        calls[0].request
    );

    // A changed image is pushed as the tag: an update, with the new digest, and the
    // image is not pulled. Before its push, the new image (built here, never pulled or
    // pushed) has no digest to compare: unknown.
    let tag = app.tag.clone();
    let (v2, d2) = app.push_changed(&c.name, |_| {
        let (r, _) = probe(
            &h,
            "probe",
            json!([{"op": "check-update", "device": "local", "image": tag}]),
        );
        let u = ok(&r, 0);
        assert_eq!(u["status"], "unknown", "{u}");
        assert_eq!(u["local_digests"], json!([]));
        assert!(
            u["reason"]
                .as_str()
                .unwrap()
                .contains("built or tagged locally"),
            "{u}"
        );
    });
    let (r, _) = probe(&h, "probe", json!([check]));
    let u = ok(&r, 0);
    assert_eq!(u["status"], "available", "{u}");
    assert_eq!(u["local_digests"], json!([app.d1]));
    assert_eq!(u["remote_digest"], d2.as_str());
    assert_eq!(u["image_id"], app.v1.as_str());
    assert_eq!(
        app.local_id(),
        app.v1,
        "the tag still names the local image: nothing pulled"
    );
    assert_eq!(c.inspect("{{.Image}}"), app.v1);
    assert_ne!(v2, app.v1);
}

#[test]
fn check_image_update_says_why_it_cannot_tell() {
    let h = Harness::new();
    h.install("probe", &manifest("probe", PROBE));
    let app = Pushed::new("upd-unknown");
    // A tag the registry does not have, and a registry nobody listens on.
    let missing = format!("{}:no-such-tag", app.repo);
    let nowhere = format!(
        "127.0.0.1:{}/capstan-test/nowhere:1",
        crate::util::free_port()
    );
    docker(&["tag", &app.v1, &missing]);
    docker(&["tag", &app.v1, &nowhere]);
    let (r, _) = probe(
        &h,
        "probe",
        json!([
            {"op": "check-update", "device": "local", "image": missing},
            {"op": "check-update", "device": "local", "image": nowhere},
            {"op": "check-update", "device": "local", "image": format!("{}@{}", app.repo, app.d1)},
            {"op": "check-update", "device": "local", "image": format!("{}:not-here-either", app.repo)},
            {"op": "check-update", "device": "local", "container": "no-such-container-here"},
        ]),
    );
    docker(&["image", "rm", &missing]);
    docker(&["image", "rm", &nowhere]);
    let unknown = |i: usize, says: &str| {
        let u = ok(&r, i);
        assert_eq!(u["status"], "unknown", "{u}");
        assert!(u["remote_digest"].is_null(), "{u}");
        assert!(u["reason"].as_str().unwrap().contains(says), "{says}: {u}");
    };
    unknown(0, "the registry has no tag");
    unknown(1, "could not be asked");
    unknown(2, "pinned to a digest");
    assert!(
        r[3]["error"].as_str().unwrap().starts_with("not-found"),
        "an image the device does not have: {}",
        r[3]
    );
    assert!(
        r[4]["error"].as_str().unwrap().starts_with("not-found"),
        "{}",
        r[4]
    );
}

#[test]
fn check_image_update_is_denied_without_distribution() {
    let h = Harness::new();
    let policy = PROBE.replace("DISTRIBUTION = 1\n", "");
    h.install("probe", &manifest("probe", &policy));
    let app = Pushed::new("upd-denied");
    let c = Container::run(
        "cap-upd-denied",
        &["--label", "capstan.test.probe=yes"],
        &app.tag,
    );
    let (r, report) = probe(
        &h,
        "probe",
        json!([{"op": "check-update", "device": "local", "container": c.name}]),
    );
    let e = r[0]["error"].as_str().unwrap();
    assert!(e.starts_with("denied"), "{e}");
    assert!(
        e.contains("DISTRIBUTION=1"),
        "the denial names the setting: {e}"
    );
    assert_eq!(report.denials.len(), 1, "{}", report.render());
    assert_eq!(report.denials[0].op, "check-image-update");
    assert!(report.denials[0].request.starts_with("GET /distribution/"));
}

/// Out of bounds: a container outside the label scope, a device outside the device
/// scope, a reference that climbs out of `/images/` and one that is not a reference. Each
/// is refused with its reason, and none is answered with a digest.
#[test]
fn check_image_update_refuses_what_is_outside_the_scope_and_malformed_references() {
    let h = Harness::new();
    h.install("probe", &manifest("probe", PROBE));
    let app = Pushed::new("upd-scope");
    let outside = Container::run("cap-upd-outside", &[], &app.tag);
    let (r, report) = probe(
        &h,
        "probe",
        json!([
            {"op": "check-update", "device": "local", "container": outside.name},
            {"op": "check-update", "device": "elsewhere", "image": app.tag},
            {"op": "check-update", "device": "local", "image": "x/../../containers/json"},
            {"op": "check-update", "device": "local", "image": "busybox?all=1"},
        ]),
    );
    let errors: Vec<&str> = (0..4)
        .map(|i| {
            r[i]["error"]
                .as_str()
                .unwrap_or_else(|| panic!("call {i} was answered: {}", r[i]))
        })
        .collect();
    assert!(
        errors[0].contains("outside the plugin's container scope"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("outside the plugin's device scope"),
        "{}",
        errors[1]
    );
    assert!(errors[2].starts_with("denied"), "{}", errors[2]);
    assert!(
        errors[3].contains("is not an image reference"),
        "{}",
        errors[3]
    );
    assert!(
        report
            .host_calls
            .iter()
            .all(|c| c.op != "check-image-update" || c.result != "ok"),
        "{}",
        report.render()
    );
}

/// The `updates` example's manifest, watching the containers that carry `label` (in
/// scope and in its config), with `config` lines replaced (`key = value`).
fn updates_manifest(label: &str, config: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(example_dir("updates").join("plugin.toml"))
        .unwrap()
        .replace("capstan.updates.enable=true", label);
    for (key, value) in config {
        let start = text
            .find(&format!("\n{key} = "))
            .unwrap_or_else(|| panic!("the manifest has no {key}"))
            + 1;
        let end = start + text[start..].find('\n').unwrap();
        text.replace_range(start..end, &format!("{key} = {value}"));
    }
    text
}

/// Three containers of one compose project from `image`, `web` depending on `api` and
/// `api` on `db`, as Compose v2 labels them (their names in another order than the
/// dependencies).
fn stack(image: &str, label: &str) -> [Container; 3] {
    let project = format!(
        "capstan-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let service = |name: &str, depends: &str, extra: &[&str]| {
        let p = format!("com.docker.compose.project={project}");
        let s = format!("com.docker.compose.service={name}");
        let d = format!("com.docker.compose.depends_on={depends}");
        let mut args = vec!["--label", label, "--label", &p, "--label", &s];
        if !depends.is_empty() {
            args.extend(["--label", &d]);
        }
        args.extend_from_slice(extra);
        Container::run(&format!("cap-stack-{name}"), &args, image)
    };
    [
        service("web", "api:service_started:false", &[]),
        service("db", "", &["-e", "GREETING=db"]),
        service(
            "api",
            "db:service_healthy:false,cache:service_started:true",
            &[],
        ),
    ]
}

/// A label `label_key=<unique>`, a pushed repository, a [`stack`] of it carrying the
/// label, and the changed image (ID, digest) pushed as its tag afterwards.
fn pushed_stack(repo: &str, label_key: &str) -> (String, Pushed, [Container; 3], (String, String)) {
    let label = format!(
        "{label_key}={}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut app = Pushed::new(repo);
    let stack = stack(&app.tag, &label);
    let v2 = app.push_changed(&stack[0].name, |_| {});
    (label, app, stack, v2)
}

/// When each container of `stack` was created: web, db, api.
fn created(stack: &[Container; 3]) -> Vec<chrono::DateTime<chrono::Utc>> {
    stack
        .iter()
        .map(|c| c.inspect("{{.Created}}").parse().unwrap())
        .collect()
}

/// Every container of `stack` runs `image` now and was re-created after `before`, db
/// first, then api, then web.
fn assert_recreated_db_api_web(
    stack: &[Container; 3],
    before: &[chrono::DateTime<chrono::Utc>],
    image: &str,
) {
    for c in stack {
        assert_eq!(
            c.inspect("{{.Image}}"),
            image,
            "{} runs the pushed image",
            c.name
        );
        assert_eq!(c.inspect("{{.State.Running}}"), "true", "{} runs", c.name);
    }
    let after = created(stack);
    for i in 0..3 {
        assert!(after[i] > before[i], "{} was re-created", stack[i].name);
    }
    let [web, db, api] = [after[0], after[1], after[2]];
    assert!(
        db < api && api < web,
        "re-created db, api, web in that order: db {db}, api {api}, web {web}"
    );
}

/// Runs `updates` by hand; its outcome's details and the report (it must succeed).
fn run_updates(h: &Harness) -> (Value, capstan::plugin::RunReport) {
    let r = h.run("updates", "");
    assert!(r.succeeded(), "{}", r.render());
    (details(&r), r)
}

/// How many entries the details' list `key` has.
fn count(d: &Value, key: &str) -> usize {
    d[key]
        .as_array()
        .unwrap_or_else(|| panic!("no list {key} in {d}"))
        .len()
}

#[test]
fn updates_reports_waits_for_min_age_then_redeploys_a_stack_in_dependency_order() {
    let (label, app, stack, (v2, d2)) = pushed_stack("upd-plugin", "capstan.test.updates");
    let names: Vec<&str> = stack.iter().map(|c| c.name.as_str()).collect();

    // Report only: all three have the update; nothing pulled or re-created.
    let h = Harness::new();
    h.install_text_for("updates", &updates_manifest(&label, &[]), &names);
    let (d, r) = run_updates(&h);
    assert_eq!(count(&d, "available"), 3, "{}", r.render());
    for a in d["available"].as_array().unwrap() {
        assert_eq!(a["image"], app.tag.as_str());
        assert_eq!(a["remote_digest"], d2.as_str());
        assert_eq!(a["local_digests"], json!([app.d1]));
    }
    let summary = &r.outcome.as_ref().unwrap().summary;
    assert!(summary.starts_with("3 update(s) available"), "{summary}");
    assert!(count(&d, "redeployed") == 0);
    assert_eq!(app.local_id(), app.v1, "report mode pulls nothing");
    assert!(
        r.host_calls
            .iter()
            .all(|c| c.op != "recreate-container" && c.op != "pull-image")
    );

    // Redeploy mode with a minimum age not reached: it waits.
    let redeploy = |min_age: &str| {
        let h = Harness::new();
        let text = updates_manifest(&label, &[("mode", "\"redeploy\""), ("min_age", min_age)])
            .replace("DISTRIBUTION = 1\n", "DISTRIBUTION = 1\nPOST = 1\n");
        h.install_text_for("updates", &text, &names);
        h
    };
    let h = redeploy("\"1h\"");
    let (d, r) = run_updates(&h);
    assert!(count(&d, "redeployed") == 0, "{}", r.render());
    assert_eq!(count(&d, "waiting"), 1, "{}", r.render());
    for c in &stack {
        assert_eq!(
            c.inspect("{{.Image}}"),
            app.v1,
            "{} not redeployed yet",
            c.name
        );
    }

    // With min_age 0: pulled and re-created, dependencies first, configuration kept.
    let before = created(&stack);
    let h = redeploy("\"0\"");
    let (d, r) = run_updates(&h);
    assert_eq!(count(&d, "redeployed"), 3, "{}", r.render());
    assert!(count(&d, "failed") == 0, "{}", r.render());
    assert!(stack[1].inspect("{{.Config.Env}}").contains("GREETING=db"));
    assert_recreated_db_api_web(&stack, &before, &v2);
    // The run's host calls say the same.
    let recreated: Vec<&str> = r
        .host_calls
        .iter()
        .filter(|c| c.op == "recreate-container")
        .map(|c| c.request.as_str())
        .collect();
    assert_eq!(recreated.len(), 3, "{}", r.render());

    // Now up to date, and the state of the update is gone.
    let (d, r) = run_updates(&h);
    assert_eq!(count(&d, "up_to_date"), 3, "{}", r.render());
    assert!(count(&d, "available") == 0);
}

#[test]
fn redeploy_recreates_a_compose_stack_in_dependency_order() {
    let (label, app, stack, (v2, _)) = pushed_stack("redeploy-stack", "capstan.test.redeploy");
    let names: Vec<&str> = stack.iter().map(|c| c.name.as_str()).collect();
    let h = Harness::new();
    let text = std::fs::read_to_string(example_dir("redeploy").join("plugin.toml"))
        .unwrap()
        .replace("capstan.redeploy=true", &label);
    h.install_text_for("redeploy", &text, &names);
    let before = created(&stack);
    let r = h.run("redeploy", &json!({"image": app.tag}).to_string());
    assert!(r.succeeded(), "{}", r.render());
    assert!(
        r.outcome.as_ref().unwrap().summary.contains("recreated 3"),
        "{}",
        r.render()
    );
    assert_recreated_db_api_web(&stack, &before, &v2);
}

#[test]
fn updates_notifies_each_new_update_once() {
    let label = format!(
        "capstan.test.updates={}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut app = Pushed::new("upd-notify");
    let c = Container::run("cap-upd-notify", &["--label", &label], &app.tag);
    app.push_changed(&c.name, |_| {});

    let rx = Receiver::start(0);
    let engine = Serve::start(QUICK);
    engine.add_channel("updates", &format!("generic+http://{}/updates", rx.addr));
    let text = updates_manifest(&label, &[("channel", "\"updates\"")]).replacen(
        "[policy.containers]\n",
        &format!("[policy.containers]\nnames = [\"{}\"]\n", c.name),
        1,
    );
    let rest: String = text
        .lines()
        .filter(|l| !l.starts_with("name = ") && !l.starts_with("version = "))
        .map(|l| format!("{l}\n"))
        .collect();
    engine.install_crate("updates", "updates", &rest);

    let notified = |record: &Value| {
        record["host_calls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["op"] == "host.notify")
            .count()
    };
    let first = engine.run("updates", json!(""));
    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(notified(&first), 1, "{first}");
    let second = engine.run("updates", json!(""));
    assert_eq!(second["status"], "ok", "{second}");
    assert_eq!(
        notified(&second),
        0,
        "told once, not on every run: {second}"
    );
    assert!(
        second["outcome"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 update(s) available"),
        "still reported: {second}"
    );
    engine.wait_for_deliveries(1, 30);
    std::thread::sleep(Duration::from_millis(300));
    let got = rx.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let body = got[0].json();
    assert!(body["title"].as_str().unwrap().contains(&app.tag), "{body}");
}
