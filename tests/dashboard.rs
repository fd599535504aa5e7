//! The web dashboard over HTTP, as a browser speaks to it: the app `capstan serve` runs
//! (API, webhooks and dashboard on one listener) on a loopback port, with the example
//! plugins `inventory` and `redeploy` installed and tokens of every role.
//!
//! The walk test goes through `capstan::web::PAGES`: without a session every page
//! redirects to the login page and every action too; with viewer, operator and admin
//! sessions exactly the pages and actions of their role answer; a `POST` without the
//! session's CSRF token is refused. The others: login and logout, login CSRF, session
//! expiry, security headers, a revoked token, device-scoped tokens, run now → run page
//! with host calls, a denial naming what would allow it, the live runs stream, and no
//! secret on any page.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan::scheduler::Scheduler;
use capstan::token::Role;

use crate::util::plugin::{example_dir, wasm};

/// A response: status, headers (lower-case names; repeated ones joined by `\n`), body.
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    fn location(&self) -> &str {
        self.header("location")
    }

    /// The value of `name=` in the response's `Set-Cookie` headers.
    fn cookie(&self, name: &str) -> Option<String> {
        self.header("set-cookie").lines().find_map(|c| {
            c.split(';')
                .next()
                .and_then(|kv| kv.trim().strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        })
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    parse(&crate::util::http_raw(
        &addr.to_string(),
        method,
        path,
        headers,
        body,
    ))
}

fn parse(text: &str) -> Resp {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let mut headers: HashMap<String, String> = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let e = headers.entry(k.trim().to_ascii_lowercase()).or_default();
            if !e.is_empty() {
                e.push('\n');
            }
            e.push_str(v.trim());
        }
    }
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        crate::util::dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

/// The value of the first `name="…" value="…"` input in `html`.
fn input_value(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\""))?;
    let tag_start = html[..at].rfind('<')?;
    let tag_end = at + html[at..].find('>')?;
    let tag = &html[tag_start..tag_end];
    let v = tag.split("value=\"").nth(1)?;
    Some(v[..v.find('"')?].to_string())
}

/// The engine with the dashboard, on a loopback port.
struct Dash {
    addr: SocketAddr,
    scheduler: Arc<Scheduler>,
    /// Tokens by role name, plus `scoped` (viewer of `prod-*`) and `local-viewer`
    /// (viewer of `local`).
    tokens: HashMap<&'static str, String>,
    /// Secrets generated for the plugins' hooks at install.
    hook_secrets: Vec<String>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Dash {
    fn start() -> Dash {
        Self::start_with_ttl(None)
    }

    fn start_with_ttl(ttl: Option<Duration>) -> Dash {
        let dir = tempfile::tempdir().unwrap();
        let defaults = dir.path().join("defaults");
        for name in ["inventory", "redeploy"] {
            let d = defaults.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(wasm(name), d.join(format!("{name}.wasm"))).unwrap();
            std::fs::copy(example_dir(name).join("plugin.toml"), d.join("plugin.toml")).unwrap();
        }
        let mut settings = capstan::config::Settings::resolve(
            &capstan::config::ConfigFile::default(),
            Some(dir.path().join("data")),
            Some("127.0.0.1:0".into()),
            None,
        )
        .unwrap();
        if let Some(ttl) = ttl {
            settings.dashboard.session_ttl = ttl;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut hook_secrets = Vec::new();
        let (addr, scheduler, tokens) = rt.block_on(async {
            let app = capstan::app::App::build(
                settings,
                &capstan::engine::PassphraseInput::default(),
                &capstan::app::AppOptions {
                    default_plugins: Some(defaults.clone()),
                },
                &mut |n| {
                    if let capstan::app::Notice::PluginInstalled(i) = n {
                        for (_, s) in &i.generated_secrets {
                            hook_secrets.push(s.expose_str().unwrap().to_string());
                        }
                    }
                },
            )
            .unwrap();
            let engine = app.engine().clone();
            let mut tokens = HashMap::new();
            for (key, role, devices) in [
                ("viewer", Role::Viewer, vec![]),
                ("operator", Role::Operator, vec![]),
                ("admin", Role::Admin, vec![]),
                ("scoped", Role::Operator, vec!["prod-*".to_string()]),
                ("local-viewer", Role::Viewer, vec!["local".to_string()]),
            ] {
                let (t, _) = engine.tokens.create_with(key, role, devices).unwrap();
                tokens.insert(key, t.expose_str().unwrap().to_string());
            }
            let scheduler = app.scheduler().clone();
            let listening = app.listen(&mut |_| {}).await.unwrap();
            let addr = listening.api_addr();
            tokio::spawn(async move { listening.serve(std::future::pending(), &mut |_| {}).await });
            (addr, scheduler, tokens)
        });
        assert!(
            !hook_secrets.is_empty(),
            "redeploy's hook got no generated secret"
        );
        Dash {
            addr,
            scheduler,
            tokens,
            hook_secrets,
            rt,
            _dir: dir,
        }
    }

    fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        let c = cookie.map(|c| format!("capstan_session={c}"));
        let headers: Vec<(&str, &str)> = c.iter().map(|c| ("Cookie", c.as_str())).collect();
        request(self.addr, "GET", path, &headers, b"")
    }

    fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Resp {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let c = cookie.map(|c| format!("capstan_session={c}"));
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(c) = &c {
            headers.push(("Cookie", c.as_str()));
        }
        request(self.addr, "POST", path, &headers, body.as_bytes())
    }

    /// Logs in with `token`; the session cookie and the session's CSRF token.
    fn login(&self, token: &str) -> (String, String) {
        let page = self.get("/login", None);
        assert_eq!(page.status, 200, "{}", page.body);
        let nonce = page.cookie("capstan_login").expect("a login cookie");
        assert_eq!(
            input_value(&page.body, "csrf").as_deref(),
            Some(nonce.as_str())
        );
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([("token", token), ("csrf", &nonce), ("next", "/")])
            .finish();
        let cookie = format!("capstan_login={nonce}");
        let r = request(
            self.addr,
            "POST",
            "/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", &cookie),
            ],
            body.as_bytes(),
        );
        assert_eq!(r.status, 303, "login: {}", r.body);
        let session = r.cookie("capstan_session").expect("a session cookie");
        let overview = self.get("/", Some(&session));
        assert_eq!(overview.status, 200, "{}", overview.body);
        let csrf = input_value(&overview.body, "csrf").expect("the logout form's csrf");
        (session, csrf)
    }

    fn login_as(&self, who: &str) -> (String, String) {
        self.login(&self.tokens[who].clone())
    }

    /// Runs `plugin` by hand through the scheduler; its run id.
    fn submit(&self, plugin: &str) -> String {
        let _g = self.rt.enter();
        self.scheduler
            .submit(plugin, capstan::trigger::manual::event("tests", ""))
            .unwrap()
            .to_string()
    }

    /// Waits (bounded) until run `id`'s page shows a final status; the page.
    fn wait_final(&self, id: &str, session: &str) -> Resp {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(&format!("/runs/{id}"), Some(session));
            assert_eq!(r.status, 200, "{}", r.body);
            if r.body.contains("data-final=\"yes\"") {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} did not end: {}",
                r.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A page path from the walk list, with a real run id.
fn example(p: &capstan::web::Page, run: &str) -> String {
    if p.path == "/runs/{id}" {
        format!("/runs/{run}")
    } else {
        p.example.to_string()
    }
}

#[test]
fn every_page_needs_a_session_and_exactly_the_role_it_names() {
    let d = Dash::start();
    let run = d.submit("inventory");
    for p in capstan::web::PAGES {
        let path = example(p, &run);
        let r = if p.method == "GET" {
            d.get(&path, None)
        } else {
            d.post(&path, None, &[("csrf", "x")])
        };
        assert_eq!(r.status, 303, "{} {path} without a session", p.method);
        assert!(
            r.location().starts_with("/login"),
            "{} {path}: {}",
            p.method,
            r.location()
        );
        if p.method == "GET" && path != "/" {
            assert!(r.location().contains("next="), "{path}: {}", r.location());
        }
        // A cookie that names no session is no session.
        let r = d.get(&path, Some("0000"));
        if p.method == "GET" {
            assert_eq!(r.status, 303, "{path} with a made-up session");
        }
    }
    for who in ["viewer", "operator", "admin"] {
        let role: Role = who.parse().unwrap();
        for p in capstan::web::PAGES {
            // Each check gets a session of its own: logout ends one.
            let (session, csrf) = d.login_as(who);
            let path = example(p, &run);
            if p.method == "GET" {
                if p.path == "/events/runs" {
                    let (head, _) = open_stream(&d, &session);
                    assert!(head.contains("text/event-stream"), "{who}: {head}");
                    continue;
                }
                let r = d.get(&path, Some(&session));
                assert_eq!(r.status, 200, "{who} GET {path}: {}", r.body);
                assert!(
                    r.body.contains(&format!("data-role=\"{who}\"")),
                    "{who} {path}"
                );
                continue;
            }
            let r = d.post(&path, Some(&session), &[("input", "")]);
            assert_eq!(r.status, 403, "{who} POST {path} without csrf");
            assert!(r.body.contains("class=\"error\""), "{}", r.body);
            let r = d.post(&path, Some(&session), &[("csrf", "wrong"), ("input", "")]);
            assert_eq!(r.status, 403, "{who} POST {path} with a wrong csrf");
            let r = d.post(&path, Some(&session), &[("csrf", &csrf), ("input", "")]);
            if role >= p.role {
                assert_eq!(r.status, 303, "{who} POST {path}: {}", r.body);
            } else {
                assert_eq!(r.status, 403, "{who} POST {path}");
                assert!(
                    r.body.contains("class=\"error\"") && r.body.contains(p.role.as_str()),
                    "{who} POST {path}: {}",
                    r.body
                );
            }
        }
    }
}

/// Opens the runs stream with `session`: its response head (lower case), and the
/// stream after it.
fn open_stream(d: &Dash, session: &str) -> (String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /events/runs HTTP/1.1\r\nHost: x\r\nCookie: capstan_session={session}\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            return (head, r);
        }
        head.push_str(&line.to_ascii_lowercase());
    }
}

#[test]
fn login_sets_a_strict_http_only_session_cookie_and_logout_ends_it() {
    let d = Dash::start();
    let page = d.get("/login", None);
    assert!(page.body.contains("id=\"login\"") && page.body.contains("type=\"password\""));
    let (session, csrf) = d.login_as("viewer");
    let login_page = d.get("/login", None);
    let nonce = login_page.cookie("capstan_login").unwrap();
    let r = request(
        d.addr,
        "POST",
        "/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &format!("capstan_login={nonce}")),
        ],
        format!("token={}&csrf={nonce}&next=%2Fruns", d.tokens["viewer"]).as_bytes(),
    );
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), "/runs");
    let set = r.header("set-cookie");
    let c = set
        .lines()
        .find(|c| c.starts_with("capstan_session="))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(c.contains(attr), "{c}");
    }
    assert!(!c.contains("Secure"), "plain HTTP: {c}");

    let r = d.post("/logout", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), "/login");
    assert!(
        r.header("set-cookie").contains("capstan_session=;"),
        "{:?}",
        r.headers
    );
    let r = d.get("/", Some(&session));
    assert_eq!(r.status, 303, "a logged-out session is refused");
    assert!(r.location().starts_with("/login"));
}

#[test]
fn a_wrong_token_or_a_login_without_its_cookie_is_refused() {
    let d = Dash::start();
    let page = d.get("/login?next=%2Fruns", None);
    let nonce = page.cookie("capstan_login").unwrap();
    let login = |token: &str, cookie: Option<&str>, csrf: &str| {
        let c = cookie.map(|c| format!("capstan_login={c}"));
        let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(c) = &c {
            h.push(("Cookie", c.as_str()));
        }
        let body = format!("token={token}&csrf={csrf}");
        request(d.addr, "POST", "/login", &h, body.as_bytes())
    };
    let r = login("cap_00000000_00", Some(&nonce), &nonce);
    assert_eq!(r.status, 401);
    assert!(r.body.contains("class=\"error\""), "{}", r.body);
    assert!(r.cookie("capstan_session").is_none());
    // Cross-site: the form's nonce without the cookie, or a different one.
    let r = login(&d.tokens["admin"], None, &nonce);
    assert_eq!(r.status, 403);
    assert!(r.body.contains("class=\"error\""));
    let r = login(&d.tokens["admin"], Some("other"), &nonce);
    assert_eq!(r.status, 403);
    // A login form body past 16 KiB is not read.
    let big = "a".repeat(20 * 1024);
    let r = login(&big, Some(&nonce), &nonce);
    assert_eq!(r.status, 413);
}

#[test]
fn every_dashboard_response_carries_the_security_headers() {
    let d = Dash::start();
    let (session, _) = d.login_as("admin");
    let run = d.submit("inventory");
    let mut responses = vec![
        ("/login", d.get("/login", None)),
        ("/ (no session)", d.get("/", None)),
        ("/static/app.css", d.get("/static/app.css", None)),
        ("/static/app.js", d.get("/static/app.js", None)),
        ("/plugins/nope", d.get("/plugins/nope", Some(&session))),
    ];
    for p in capstan::web::PAGES
        .iter()
        .filter(|p| p.method == "GET" && p.path != "/events/runs")
    {
        let path = example(p, &run);
        responses.push((p.path, d.get(&path, Some(&session))));
    }
    for (what, r) in &responses {
        assert_eq!(
            r.header("content-security-policy"),
            capstan::web::CSP,
            "{what}"
        );
        assert_eq!(r.header("x-frame-options"), "DENY", "{what}");
        assert_eq!(r.header("referrer-policy"), "same-origin", "{what}");
        assert_eq!(r.header("x-content-type-options"), "nosniff", "{what}");
        assert!(!r.body.contains("<script>"), "{what}: inline script");
        assert!(!r.body.contains("style="), "{what}: inline style");
        assert!(!r.body.contains("onclick"), "{what}: inline handler");
        if what.starts_with("/static") {
            assert!(
                r.header("cache-control").contains("max-age=31536000"),
                "{what}"
            );
        } else {
            assert_eq!(r.header("cache-control"), "no-store", "{what}");
        }
    }
    assert!(
        responses[2]
            .1
            .header("content-type")
            .starts_with("text/css")
    );
    assert!(
        responses[3]
            .1
            .header("content-type")
            .starts_with("text/javascript")
    );
}

#[test]
fn an_expired_session_is_sent_to_the_login_page() {
    let d = Dash::start_with_ttl(Some(Duration::from_secs(1)));
    let (session, _) = d.login_as("viewer");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = d.get("/runs?plugin=inventory", Some(&session));
        if r.status == 303 {
            assert_eq!(r.location(), "/login?next=%2Fruns%3Fplugin%3Dinventory");
            break;
        }
        assert_eq!(r.status, 200);
        assert!(Instant::now() < deadline, "the session did not expire");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_revoked_token_ends_its_sessions() {
    let d = Dash::start();
    let (session, _) = d.login_as("operator");
    assert_eq!(d.get("/", Some(&session)).status, 200);
    d.scheduler.engine().tokens.revoke("operator").unwrap();
    assert_eq!(d.get("/", Some(&session)).status, 303);
}

#[test]
fn the_overview_shows_the_local_device_and_the_plugins() {
    let d = Dash::start();
    let (session, _) = d.login_as("viewer");
    let r = d.get("/", Some(&session));
    for needle in [
        "id=\"devices\"",
        "data-device=\"local\"",
        "id=\"plugins\"",
        "data-plugin=\"inventory\"",
        "href=\"/plugins/inventory\"",
        "data-plugin=\"redeploy\"",
        "id=\"recent-problems\"",
        "href=\"/runs\"",
        "href=\"/hooks\"",
        "href=\"/notifiers\"",
        "id=\"logout\"",
    ] {
        assert!(r.body.contains(needle), "{needle} missing:\n{}", r.body);
    }
}

#[test]
fn checking_a_device_now_shows_its_check_and_containers() {
    let d = Dash::start();
    let (session, csrf) = d.login_as("operator");
    let r = d.post("/devices/local/check", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location(), "/devices/local");
    let r = d.get("/devices/local", Some(&session));
    for needle in [
        "id=\"last-check\"",
        "connected",
        "id=\"containers\"",
        "id=\"latency-chart\"",
        "id=\"check-now\"",
    ] {
        assert!(r.body.contains(needle), "{needle} missing:\n{}", r.body);
    }
    let r = d.get("/", Some(&session));
    assert!(r.body.contains("data-reach=\"yes\""), "{}", r.body);
    // A viewer sees the page but not the form.
    let (session, _) = d.login_as("viewer");
    let r = d.get("/devices/local", Some(&session));
    assert!(!r.body.contains("id=\"check-now\""));
}

#[test]
fn run_now_leads_to_the_run_page_with_its_host_calls() {
    let d = Dash::start();
    let (session, csrf) = d.login_as("operator");
    let page = d.get("/plugins/inventory", Some(&session));
    for needle in [
        "id=\"manifest\"",
        "id=\"runs-chart\"",
        "id=\"runs\"",
        "id=\"run-now\"",
        "may read info, containers, images",
    ] {
        assert!(
            page.body.contains(needle),
            "{needle} missing:\n{}",
            page.body
        );
    }
    let r = d.post(
        "/plugins/inventory/run",
        Some(&session),
        &[("csrf", &csrf), ("input", "{}")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let id = r.location().strip_prefix("/runs/").unwrap().to_string();
    let run = d.wait_final(&id, &session);
    assert!(run.body.contains("id=\"outcome\""));
    assert!(run.body.contains("data-status=\"ok\""), "{}", run.body);
    assert!(run.body.contains("id=\"host-calls\""));
    assert!(
        run.body.contains("class=\"call\" data-decision=\"allow\""),
        "{}",
        run.body
    );
    assert!(run.body.contains("id=\"logs\""));
    let runs = d.get("/runs?plugin=inventory", Some(&session));
    assert!(
        runs.body.contains(&format!("data-run=\"{id}\"")),
        "{}",
        runs.body
    );
    let ok = d.get("/runs?status=ok", Some(&session));
    assert!(ok.body.contains(&format!("data-run=\"{id}\"")));
    let failed = d.get("/runs?status=failed", Some(&session));
    assert!(!failed.body.contains(&format!("data-run=\"{id}\"")));
    // A viewer has no form, and is refused the action.
    let (session, csrf) = d.login_as("viewer");
    let page = d.get("/plugins/inventory", Some(&session));
    assert!(!page.body.contains("id=\"run-now\""));
    let r = d.post("/plugins/inventory/run", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(r.status, 403);
    assert!(r.body.contains("operator"), "{}", r.body);
}

#[test]
fn a_denied_host_call_is_highlighted_with_the_setting_that_would_allow_it() {
    use capstan::runs::{CallDecision, HostCall, RunEnd, RunLogs, RunTrigger};
    let d = Dash::start();
    let runs = d.scheduler.runs();
    let rec = runs
        .create("inventory", RunTrigger::Manual { by: "tests".into() })
        .unwrap();
    runs.start(rec.id).unwrap();
    let call = |decision, reason: &str| HostCall {
        op: "stop-container".into(),
        device: "local".into(),
        request: "POST /containers/web/stop".into(),
        decision,
        result: if decision == CallDecision::Deny {
            "denied".into()
        } else {
            "ok".into()
        },
        ms: 1.0,
        reason: reason.into(),
    };
    runs.append(
        rec.id,
        RunLogs::default(),
        vec![
            call(CallDecision::Allow, ""),
            call(
                CallDecision::Deny,
                "POST /containers/web/stop is denied: set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or POST=1) to allow it",
            ),
        ],
    )
    .unwrap();
    runs.finish(
        rec.id,
        RunEnd::error(capstan::runs::RunStatus::Denied, "denied"),
    )
    .unwrap();
    let (session, _) = d.login_as("viewer");
    let r = d.get(&format!("/runs/{}", rec.id), Some(&session));
    assert!(
        r.body
            .contains("class=\"call denied\" data-decision=\"deny\""),
        "{}",
        r.body
    );
    assert!(
        r.body.contains(
            "<td class=\"would-allow\">set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or POST=1)</td>"
        ),
        "{}",
        r.body
    );
    let overview = d.get("/", Some(&session));
    assert!(
        overview.body.contains(&format!("data-run=\"{}\"", rec.id)),
        "a denied run is a recent problem"
    );
}

#[test]
fn the_runs_stream_sends_each_new_run_as_it_happens() {
    let d = Dash::start();
    let (session, _) = d.login_as("viewer");
    let (head, mut r) = open_stream(&d, &session);
    assert!(head.contains("text/event-stream"), "{head}");
    let mut line = String::new();
    let id = d.submit("inventory");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended");
        if let Some(data) = line.trim().strip_prefix("data:") {
            let v: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
            if v["id"] == id.as_str() {
                assert_eq!(v["plugin"], "inventory");
                assert!(v["status"].is_string());
                break;
            }
        }
        assert!(Instant::now() < deadline, "no event for run {id}");
    }
}

#[test]
fn a_device_scoped_token_sees_only_its_devices_and_the_plugins_they_cover() {
    let d = Dash::start();
    let (session, csrf) = d.login_as("scoped");
    let r = d.get("/", Some(&session));
    assert!(!r.body.contains("data-device=\"local\""), "{}", r.body);
    assert!(
        !r.body.contains("data-plugin=\"inventory\""),
        "inventory reaches every device"
    );
    assert_eq!(d.get("/devices/local", Some(&session)).status, 404);
    assert_eq!(d.get("/plugins/inventory", Some(&session)).status, 404);
    assert_eq!(d.get("/runs?plugin=inventory", Some(&session)).status, 404);
    let r = d.post("/plugins/inventory/run", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(r.status, 404, "as for a plugin that is not installed");
    let id = d.submit("inventory");
    assert_eq!(d.get(&format!("/runs/{id}"), Some(&session)).status, 404);
    let runs = d.get("/runs", Some(&session));
    assert!(!runs.body.contains(&id));
    let hooks = d.get("/hooks", Some(&session));
    assert!(!hooks.body.contains("data-hook=\"redeploy\""));

    let (session, _) = d.login_as("local-viewer");
    let r = d.get("/", Some(&session));
    assert!(r.body.contains("data-device=\"local\""), "{}", r.body);
    assert_eq!(d.get("/devices/local", Some(&session)).status, 200);
}

#[test]
fn no_page_shows_a_secret() {
    let d = Dash::start();
    let engine = d.scheduler.engine().clone();
    let notifier_secret = "s3cr3t-notifier-pass";
    engine
        .notifier
        .add(
            &engine.vault,
            "ops",
            &capstan::secret::Secret::from_str_owned(format!(
                "ntfy://alice:{notifier_secret}@ntfy.example.org/alerts"
            )),
        )
        .unwrap();
    let (session, csrf) = d.login_as("admin");
    let run = d.submit("inventory");
    let mut secrets: Vec<String> = d.hook_secrets.clone();
    secrets.push(notifier_secret.to_string());
    secrets.extend(d.tokens.values().cloned());
    secrets.push(session.clone());
    let hooks = d.get("/hooks", Some(&session));
    assert!(
        hooks.body.contains("data-hook=\"redeploy\""),
        "{}",
        hooks.body
    );
    let notifiers = d.get("/notifiers", Some(&session));
    assert!(notifiers.body.contains("id=\"notifiers\"") && notifiers.body.contains("ops"));
    for p in capstan::web::PAGES
        .iter()
        .filter(|p| p.method == "GET" && p.path != "/events/runs")
    {
        let path = example(p, &run);
        let r = d.get(&path, Some(&session));
        for s in &secrets {
            assert!(!r.body.contains(s.as_str()), "{path} shows a secret");
            assert!(
                !r.header("set-cookie").contains(s.as_str()) || s == &session,
                "{path}"
            );
        }
        // The CSRF token is the one secret a page carries, in its forms only.
        assert_eq!(
            r.body.matches(&csrf).count(),
            r.body.matches("name=\"csrf\"").count(),
            "{path}"
        );
    }
}

#[test]
fn the_runs_stream_ends_with_its_session() {
    let d = Dash::start();
    let (session, csrf) = d.login_as("viewer");
    let (_, mut r) = open_stream(&d, &session);
    let out = d.post("/logout", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(out.status, 303);
    d.submit("inventory");
    // The server ends the chunked stream: its last chunk, then the connection idles.
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 || line == "0\r\n" {
            break;
        }
        assert!(!line.starts_with("data:"), "an event after logout: {line}");
    }
}

#[test]
fn over_tls_the_cookies_are_secure() {
    use tower::ServiceExt;
    let d = Dash::start();
    let state = capstan::api::AppState::new(d.scheduler.clone())
        .with_listen(capstan::api::ListenInfo { tls: true });
    let router = capstan::web::router(
        state,
        capstan::web::WebOptions {
            session_ttl: Duration::from_secs(60),
        },
    );
    let resp = d.rt.block_on(async {
        router
            .oneshot(
                axum::http::Request::get("/login")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap()
    });
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("capstan_login=") && cookie.contains("; Secure"),
        "{cookie}"
    );
}
