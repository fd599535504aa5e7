//! The dashboard in a real browser: headless Chromium (Debian's) driven over WebDriver
//! against a `capstan serve` with the example plugins installed and the test daemon as
//! device `local`. Login, the live runs list, a run's host calls and its denials, logout,
//! CSRF refusal, a viewer's limits and session expiry, as a person meets them. Each step
//! that matters leaves a screenshot in `target/test-artifacts/browser/`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::browser::Browser;
use crate::util::plugin::{example_dir, wasm};
use crate::util::*;

/// The example plugins `scripts/run` installs on first start.
const EXAMPLES: [&str; 5] = ["autoheal", "crashloop", "inventory", "redeploy", "updates"];

/// A container name no test creates: the examples that act on containers are kept to it,
/// so the dashboard's cron and event runs never touch other tests' containers.
const NO_CONTAINER: &str = "capstan-browser-test-none";

/// The test plugin `probe`, allowed to list containers and nothing else: asking it for
/// the host's information is denied by its policy (INFO is off).
const PROBE_MANIFEST: &str = "name = \"probe\"\nversion = \"0.0.1\"\ndescription = \"Lists containers; may not read host information\"\n[policy]\nCONTAINERS = 1\ndevices = [\"local\"]\n[policy.containers]\nnames = [\"capstan-browser-test-none\"]\n";

/// Probe input: one allowed call, one the policy denies.
const PROBE_INPUT: &str =
    r#"[{"op": "list-containers", "device": "local"}, {"op": "system-info", "device": "local"}]"#;

/// How long one browser test may take, start to end.
const BUDGET: Duration = Duration::from_secs(150);

/// `capstan serve` on a fresh data directory: first start installs the example plugins
/// and `probe`, registers the test daemon as `local` and prints the admin token.
struct Dashboard {
    data: DataDir,
    server: Option<Server>,
    defaults: std::path::PathBuf,
    admin: String,
}

impl Dashboard {
    fn start() -> Dashboard {
        Self::start_with(|_| {})
    }

    fn start_with(configure: impl Fn(&mut Command)) -> Dashboard {
        let data = DataDir::empty();
        let defaults = data.path().join("defaults");
        for name in EXAMPLES {
            let manifest = std::fs::read_to_string(example_dir(name).join("plugin.toml")).unwrap();
            let manifest = manifest.replacen(
                "[policy.containers]\n",
                &format!("[policy.containers]\nnames = [\"{NO_CONTAINER}\"]\n"),
                1,
            );
            stage(&defaults, name, name, &manifest);
        }
        stage(&defaults, "probe", "probe", PROBE_MANIFEST);
        let mut d = Dashboard {
            data,
            server: None,
            defaults,
            admin: String::new(),
        };
        d.restart(&configure);
        d.admin = d.server().admin_token();
        d
    }

    /// Starts serve (again) on the same data directory.
    fn restart(&mut self, configure: &dyn Fn(&mut Command)) {
        if let Some(s) = self.server.take() {
            assert!(s.stop().success(), "serve stopped cleanly");
        }
        let socket = Infra::get().var("DOCKER_SOCKET");
        let server = Server::start_with(&self.data, |c| {
            c.env("CAPSTAN_DEFAULT_PLUGINS", &self.defaults)
                .env("DOCKER_HOST", format!("unix://{socket}"));
            configure(c);
        });
        self.server = Some(server);
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("serve is running")
    }

    /// The dashboard's origin.
    fn url(&self) -> String {
        format!("http://{}", self.server().addr)
    }

    /// A browser for test `name` on this dashboard.
    fn browser(&self, name: &str) -> Browser {
        Browser::start(name, &self.url(), BUDGET)
    }

    /// Creates a token with the CLI (serve holds the data directory, so it is stopped and
    /// started again around the command).
    fn create_token(&mut self, args: &[&str]) -> String {
        if let Some(s) = self.server.take() {
            assert!(s.stop().success(), "serve stopped cleanly");
        }
        let out = self.data.capstan(args);
        assert_success(&out, &args.join(" "));
        let token = stdout(&out)
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("cap_"))
            .unwrap_or_else(|| panic!("no token printed:\n{}", stdout(&out)))
            .to_string();
        self.restart(&|_| {});
        token
    }
}

/// Stages plugin `crate_name` as `<dir>/<name>/{plugin.toml, <name>.wasm}`.
fn stage(dir: &std::path::Path, name: &str, crate_name: &str, manifest: &str) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(wasm(crate_name), d.join(format!("{name}.wasm"))).unwrap();
    std::fs::write(d.join("plugin.toml"), manifest).unwrap();
}

/// The HTTP status the current page was served with.
fn page_status(b: &Browser) -> u64 {
    b.execute(
        "return performance.getEntriesByType('navigation')[0].responseStatus",
        vec![],
    )
    .as_u64()
    .expect("the browser reports the page's status")
}

/// Submits `form#run-now` on plugin `name`'s page with `input`; returns the new run's id
/// from the page it lands on (`/runs/{id}`).
fn run_now(b: &Browser, name: &str, input: &str) -> String {
    b.goto(&format!("/plugins/{name}"));
    b.wait_for("form#run-now");
    b.fill("form#run-now textarea[name=input]", input);
    b.click("form#run-now button[type=submit]");
    b.wait_for_path("/runs/");
    b.path()
        .strip_prefix("/runs/")
        .expect("a run's page")
        .to_string()
}

/// Waits until run `id`'s page shows a final outcome; returns its status.
fn wait_for_outcome(b: &Browser, id: &str) -> String {
    let mut status = String::new();
    b.wait_until(
        &format!("run {id} to finish"),
        Duration::from_secs(60),
        |b| {
            b.goto(&format!("/runs/{id}"));
            b.wait_for("#outcome[data-status]");
            status = b.attr("#outcome", "data-status").unwrap_or_default();
            !matches!(status.as_str(), "queued" | "running" | "")
        },
    );
    status
}

#[test]
fn chromium_loads_healthz_and_the_login_page() {
    let d = Dashboard::start();
    let b = d.browser("smoke");
    b.goto("/healthz");
    assert!(b.text("body").contains("ok"), "{}", b.source());
    b.goto("/login");
    b.wait_for("form#login");
    assert_eq!(page_status(&b), 200);
    assert_eq!(
        b.attr("form#login input[name=token]", "type").as_deref(),
        Some("password")
    );
    assert!(b.exists("form#login input[type=hidden][name=csrf]"));
    assert!(b.exists("form#login button[type=submit]"));
    // The page obeys its own CSP: no inline script or style for the browser to refuse.
    let inline = b.execute(
        "return document.querySelectorAll('script:not([src]), style, [style]').length",
        vec![],
    );
    assert_eq!(inline, json!(0), "{}", b.source());
    b.screenshot("login");
}

#[test]
fn an_admin_logs_in_runs_a_plugin_sees_it_arrive_live_opens_it_and_logs_out() {
    let d = Dashboard::start();
    let b = d.browser("admin-flow");

    // A wrong token is refused on the login page itself.
    assert_eq!(b.login("cap_not-a-token"), "/login");
    assert!(b.exists(".error"), "{}", b.source());
    assert_eq!(page_status(&b), 401);

    assert_eq!(b.login(&d.admin), "/");
    assert_eq!(b.attr("body", "data-role").as_deref(), Some("admin"));
    b.wait_for("table#devices tr[data-device=\"local\"]");
    for name in EXAMPLES {
        assert!(
            b.exists(&format!(
                "table#plugins tr[data-plugin=\"{name}\"] a[href=\"/plugins/{name}\"]"
            )),
            "plugin {name} on the overview:\n{}",
            b.source()
        );
    }
    for href in ["/", "/runs", "/hooks", "/notifiers"] {
        assert!(
            b.exists(&format!("nav a[href=\"{href}\"]")),
            "nav links {href}"
        );
    }
    b.screenshot("overview");

    // Window one: the runs list, connected to the live stream, with a marker a reload
    // would wipe.
    let runs = b.window();
    b.goto("/runs");
    b.wait_for("table#runs");
    b.wait_for("#live[data-state=\"open\"]");
    b.execute("window.__marker = 1", vec![]);

    // Window two: run inventory from its page.
    b.new_window();
    let id = run_now(&b, "inventory", "{}");
    b.screenshot("run-page");

    // Back in window one: the run's row arrived without a reload, and its status follows
    // the run to the end.
    b.switch_to(&runs);
    let row = format!("table#runs tbody tr[data-run=\"{id}\"]");
    b.wait_until(
        &format!("run {id} in the runs list"),
        Duration::from_secs(30),
        |b| b.exists(&row),
    );
    assert_eq!(
        b.attr(&row, "data-plugin").as_deref(),
        Some("inventory"),
        "{}",
        b.source()
    );
    b.wait_until(
        &format!("run {id} to show as ok"),
        Duration::from_secs(60),
        |b| b.attr(&row, "data-status").as_deref() == Some("ok"),
    );
    assert_eq!(
        b.execute("return window.__marker", vec![]),
        json!(1),
        "the runs list was reloaded"
    );
    assert_eq!(b.path(), "/runs");
    b.screenshot("runs-live");

    // Open the run from the list: its outcome and every host call.
    b.click(&format!("{row} a[href=\"/runs/{id}\"]"));
    b.wait_for_path(&format!("/runs/{id}"));
    b.wait_for("#outcome[data-status]");
    assert_eq!(b.attr("#outcome", "data-status").as_deref(), Some("ok"));
    assert!(b.exists("pre#logs"));
    let calls = b.count("table#host-calls tr.call");
    assert!(
        calls >= 3,
        "inventory's host calls listed: {calls}\n{}",
        b.source()
    );
    assert_eq!(
        b.count("table#host-calls tr.call[data-decision=\"allow\"]"),
        calls,
        "inventory's policy allows what it does"
    );
    b.screenshot("run");

    // Log out: every page sends the browser back to the login page.
    b.click("form#logout button");
    b.wait_for_path("/login");
    b.screenshot("logged-out");
    for page in ["/", "/runs", &format!("/runs/{id}"), "/plugins/inventory"] {
        b.goto(page);
        b.wait_for("form#login");
        assert!(
            b.path().starts_with("/login"),
            "{page} after logout: {}",
            b.path()
        );
    }
}

#[test]
fn a_denied_host_call_is_highlighted_with_the_setting_that_would_allow_it() {
    let d = Dashboard::start();
    let b = d.browser("denial");
    assert_eq!(b.login(&d.admin), "/");
    let id = run_now(&b, "probe", PROBE_INPUT);
    wait_for_outcome(&b, &id);
    let allowed = "table#host-calls tr.call[data-decision=\"allow\"]";
    let denied = "table#host-calls tr.call.denied[data-decision=\"deny\"]";
    assert_eq!(
        b.count(allowed),
        1,
        "list-containers allowed:\n{}",
        b.source()
    );
    assert_eq!(b.count(denied), 1, "system-info denied:\n{}", b.source());
    assert!(
        b.text(denied).contains("system-info") || b.text(denied).contains("/info"),
        "the denied row names the call: {}",
        b.text(denied)
    );
    let would_allow = b.text(&format!("{denied} .would-allow"));
    assert!(
        would_allow.contains("INFO=1"),
        "the setting that would allow it: {would_allow:?}"
    );
    b.screenshot("denied-call");
}

#[test]
fn a_form_posted_with_a_wrong_or_missing_csrf_token_is_refused() {
    let d = Dashboard::start();
    let b = d.browser("csrf");
    assert_eq!(b.login(&d.admin), "/");
    for (how, script) in [
        (
            "altered",
            "document.querySelector('form#run-now input[name=csrf]').value = 'forged'",
        ),
        (
            "removed",
            "document.querySelector('form#run-now input[name=csrf]').remove()",
        ),
    ] {
        b.goto("/plugins/inventory");
        b.wait_for("form#run-now input[type=hidden][name=csrf]");
        b.execute(script, vec![]);
        b.click("form#run-now button[type=submit]");
        b.wait_until(
            &format!("the answer to a form with its csrf token {how}"),
            Duration::from_secs(20),
            |b| !b.path().starts_with("/plugins/inventory") || b.exists(".error"),
        );
        b.wait_for(".error");
        assert_eq!(page_status(&b), 403, "csrf {how}: {}", b.source());
        assert!(
            !b.path().starts_with("/runs/"),
            "csrf {how}: no run page: {}",
            b.path()
        );
        b.screenshot(&format!("csrf-{how}"));
    }
    // Nothing ran.
    b.goto("/runs?plugin=inventory");
    b.wait_for("table#runs");
    assert_eq!(
        b.count("table#runs tbody tr[data-run]"),
        0,
        "{}",
        b.source()
    );
}

#[test]
fn a_viewer_sees_no_run_now_and_is_refused_when_posting_it() {
    let mut d = Dashboard::start();
    let viewer = d.create_token(&["token", "create", "v", "--role", "viewer"]);
    let b = d.browser("viewer");

    // Where run-now posts to, as an admin's page says.
    assert_eq!(b.login(&d.admin), "/");
    b.goto("/plugins/inventory");
    b.wait_for("form#run-now");
    let action = b
        .attr("form#run-now", "action")
        .expect("form#run-now has an action");
    b.click("form#logout button");
    b.wait_for_path("/login");

    assert_eq!(b.login(&viewer), "/");
    assert_eq!(b.attr("body", "data-role").as_deref(), Some("viewer"));
    b.goto("/plugins/inventory");
    b.wait_for("#manifest");
    assert!(!b.exists("form#run-now"), "{}", b.source());
    b.screenshot("viewer-plugin");

    // The same POST a run-now form makes, with the viewer's valid csrf token.
    let answer = b.execute_async(
        "const done = arguments[arguments.length - 1];
         const csrf = document.querySelector('form#logout input[name=csrf]').value;
         fetch(arguments[0], {
             method: 'POST',
             body: new URLSearchParams({csrf: csrf, input: '{}'}),
             credentials: 'same-origin',
             redirect: 'manual',
         })
         .then(async r => done({status: r.status, text: await r.text()}))
         .catch(e => done({status: -1, text: String(e)}));",
        vec![Value::String(action)],
    );
    assert_eq!(answer["status"], 403, "{answer}");
    let text = answer["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("class=\"error\"") && text.contains("operator"),
        "the refusal names the role it needs: {text}"
    );
    b.goto("/runs?plugin=inventory");
    b.wait_for("table#runs");
    assert_eq!(b.count("table#runs tbody tr[data-run]"), 0, "nothing ran");
}

#[test]
fn an_expired_session_sends_the_browser_back_to_the_login_page() {
    let d = Dashboard::start_with(|c| {
        c.env("CAPSTAN_DASHBOARD_SESSION_TTL", "2");
    });
    let b = d.browser("expiry");
    assert_eq!(b.login(&d.admin), "/");
    let logged_in = Instant::now();
    b.wait_for("table#devices");
    b.screenshot("before-expiry");
    // Look every 250 ms, as a person reloading would, until the session is gone.
    let mut path = String::new();
    let every = Duration::from_millis(250);
    b.poll(
        "the session to expire",
        Duration::from_secs(15),
        every,
        |b| {
            b.goto("/runs");
            path = b.path();
            path.starts_with("/login")
        },
    );
    let after = logged_in.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "the session lasted its 2 s: expired after {after:?}"
    );
    assert!(
        path.contains("next="),
        "the login page knows where to return: {path}"
    );
    b.wait_for("form#login");
    b.screenshot("expired");
}

/// The README's picture: the overview of a dashboard with the example plugins, some runs
/// behind it (inventory's, and probe's with a denial and a failure) and `local` checked,
/// photographed in Chromium, and the plugin page with its runs chart, both beside the
/// other screenshots. With `CAPSTAN_WRITE_DOCS_SCREENSHOT=1` the overview also replaces
/// `docs/dashboard.png` (a test run never changes the repository otherwise).
#[test]
fn docs_screenshot() {
    let d = Dashboard::start();
    let auth = format!("Bearer {}", d.admin);
    let mut runs = vec![("inventory", "{}"); 8];
    runs.extend([("probe", PROBE_INPUT), ("probe", "not a list of calls")]);
    runs.extend(vec![("inventory", "{}"); 4]);
    for (plugin, input) in runs {
        let (status, body) = http_json(
            &d.server().addr,
            &auth,
            "POST",
            &format!("/api/plugins/{plugin}/run?wait=true"),
            &json!({ "input": input }),
        );
        assert_eq!(status, 200, "{plugin}: {body}");
    }
    // Checks of `local`, for its latency, Docker version and containers.
    for _ in 0..3 {
        let (status, body) = http_json(
            &d.server().addr,
            &auth,
            "GET",
            "/api/docker/check/local",
            &Value::Null,
        );
        assert_eq!(status, 200, "check local: {body}");
    }
    let b = d.browser("docs");
    assert_eq!(b.login(&d.admin), "/");
    b.wait_for("table#devices tr[data-device=\"local\"]");
    b.fit_page(1280, 1400);
    let shot = b.screenshot("overview");
    b.goto("/plugins/inventory");
    b.wait_for("svg#runs-chart");
    b.fit_page(1280, 1400);
    b.screenshot("plugin");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.len() < 300 * 1024,
        "{} is {} bytes",
        shot.display(),
        png.len()
    );
    if std::env::var_os("CAPSTAN_WRITE_DOCS_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
        std::fs::write(&docs, png).unwrap();
        eprintln!("wrote {}", docs.display());
    }
}
