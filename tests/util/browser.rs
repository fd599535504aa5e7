//! A headless Chromium driven over WebDriver, for the dashboard's browser tests.
//!
//! Each [`Browser`] starts its own Debian `chromedriver` on a free loopback port (in a
//! process group of its own, so the Chromium it launches goes with it), waits until
//! `/status` says it is ready, and opens one session with a fresh profile directory.
//! Dropping it ends the session and stops the group by its id. Every call is bounded by
//! the test's overall budget; a failing test leaves a screenshot (and chromedriver's log)
//! in `target/test-artifacts/browser/`.
//!
//! The calls are synchronous and take CSS selectors, so a test reads as the steps a
//! person takes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WindowHandle;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::Infra;
use crate::util::free_port;

/// How long one WebDriver command or wait may take (within the test's budget).
const STEP: Duration = Duration::from_secs(20);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);

/// Where the browser tests put their screenshots.
pub fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/browser")
}

/// The Chromium and chromedriver that `scripts/testinfra up` installed. Panics with what
/// is missing and how to get it: a browser test never skips.
fn binaries() -> (PathBuf, PathBuf) {
    let infra = Infra::get();
    let find = |key: &str, package: &str| {
        let path = infra.fact(key).map(PathBuf::from).unwrap_or_else(|| {
            panic!("infra.env has no {key} (Debian's {package}): run `scripts/testinfra up`, which installs it")
        });
        assert!(
            path.is_file(),
            "{} is missing (Debian package {package}): run `scripts/testinfra up`, which installs it",
            path.display()
        );
        path
    };
    (
        find("CHROMIUM", "chromium"),
        find("CHROMEDRIVER", "chromium-driver"),
    )
}

/// Whether chromedriver on `addr` answers `/status` with `ready: true`. (It keeps the
/// connection open whatever the request says, so the body is read by its length.)
fn driver_ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let req = format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return head.starts_with("HTTP/1.1 200")
                    && serde_json::from_str::<Value>(body)
                        .map(|v| v["value"]["ready"] == true)
                        .unwrap_or(false);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One chromedriver and one browser session on it, for one test.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    /// The dashboard's origin, `http://127.0.0.1:PORT`.
    pub base: String,
    test: String,
    deadline: Instant,
    shots: std::cell::Cell<u32>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium for test `test` (the screenshots' name
    /// prefix) against the dashboard at `base`; everything the test does must finish within
    /// `budget`.
    pub fn start(test: &str, base: &str, budget: Duration) -> Browser {
        let deadline = Instant::now() + budget;
        let (chromium, chromedriver) = binaries();
        std::fs::create_dir_all(artifacts_dir()).expect("create the artifacts directory");
        let log = artifacts_dir().join(format!("{test}-chromedriver.log"));
        let port = free_port();
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: stopping the group stops the browser too.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let profile = tempfile::tempdir().expect("create a browser profile directory");
        let mut b = Browser {
            rt,
            client: None,
            driver,
            _profile: profile,
            base: base.trim_end_matches('/').to_string(),
            test: test.to_string(),
            deadline,
            shots: std::cell::Cell::new(0),
        };
        let url = format!("http://127.0.0.1:{port}");
        b.wait_for_driver(&url, &log);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let session = b.bounded(
            "open a WebDriver session",
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url),
        );
        b.client = Some(session.unwrap_or_else(|e| {
            panic!(
                "chromedriver could not start Chromium: {e} (log: {})",
                log.display()
            )
        }));
        b
    }

    /// Polls chromedriver's `/status` until it is ready; fails if it exits first.
    fn wait_for_driver(&mut self, url: &str, log: &Path) {
        let addr = url.trim_start_matches("http://").to_string();
        let until = (Instant::now() + STEP).min(self.deadline);
        loop {
            if let Some(st) = self.driver.try_wait().unwrap() {
                panic!(
                    "chromedriver exited ({st}) before it was ready (log: {})",
                    log.display()
                );
            }
            if driver_ready(&addr) {
                return;
            }
            assert!(
                Instant::now() < until,
                "chromedriver on {url} was not ready within {STEP:?} (log: {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("a WebDriver session")
    }

    /// The time left of the test's budget; panics when it is spent.
    fn remaining(&self, what: &str) -> Duration {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| panic!("{}: the test's time budget is spent ({what})", self.test))
    }

    /// Runs `fut` for at most one step (and no longer than the budget left).
    fn bounded<T>(&self, what: &str, fut: impl std::future::Future<Output = T>) -> T {
        let limit = self.remaining(what).min(STEP);
        self.rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
            .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
    }

    /// Runs a WebDriver command; panics saying what failed.
    fn cmd<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    ) -> T {
        self.bounded(what, fut)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Opens `path` on the dashboard (or a full URL).
    pub fn goto(&self, path: &str) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.cmd(&format!("open {url}"), self.client().goto(&url));
    }

    /// The current page's path and query (`/runs?plugin=x`).
    pub fn path(&self) -> String {
        let url = self.cmd("read the URL", self.client().current_url());
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Waits until `ready` holds, looking every 100 ms, for at most `within` (and the
    /// budget); panics naming `what` otherwise.
    pub fn wait_until(&self, what: &str, within: Duration, ready: impl FnMut(&Browser) -> bool) {
        self.poll(what, within, POLL, ready)
    }

    /// [`Browser::wait_until`], looking every `every`.
    pub fn poll(
        &self,
        what: &str,
        within: Duration,
        every: Duration,
        mut ready: impl FnMut(&Browser) -> bool,
    ) {
        let until = Instant::now() + within.min(self.remaining(what));
        loop {
            if ready(self) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{}: waited {within:?} for {what} (page {})",
                self.test,
                self.path()
            );
            std::thread::sleep(every);
        }
    }

    /// Waits (one step at most) for an element matching `css`.
    pub fn wait_for(&self, css: &str) {
        self.wait_until(&format!("`{css}` on the page"), STEP, |b| b.exists(css));
    }

    /// Waits (one step at most) until the page's path starts with `prefix`.
    pub fn wait_for_path(&self, prefix: &str) {
        self.wait_until(&format!("a page under {prefix}"), STEP, |b| {
            b.path().starts_with(prefix)
        });
    }

    pub fn exists(&self, css: &str) -> bool {
        self.count(css) > 0
    }

    pub fn count(&self, css: &str) -> usize {
        self.cmd(
            &format!("find `{css}`"),
            self.client().find_all(Locator::Css(css)),
        )
        .len()
    }

    fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.cmd(
            &format!("find `{css}` on {}", self.path()),
            self.client().find(Locator::Css(css)),
        )
    }

    /// The visible text of the first element matching `css`. (Read in one script, so a
    /// row the live stream replaces meanwhile is never half read.)
    pub fn text(&self, css: &str) -> String {
        let v = self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null",
            vec![json!(css)],
        );
        match v {
            Value::String(s) => s,
            _ => panic!("{}: no `{css}` on {}", self.test, self.path()),
        }
    }

    /// The visible text of every element matching `css`.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let v = self.execute(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)",
            vec![json!(css)],
        );
        serde_json::from_value(v).expect("a list of texts")
    }

    /// An attribute of the first element matching `css`.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let v = self.execute(
            "const e = document.querySelector(arguments[0]); \
             if (!e) return {missing: true}; return {value: e.getAttribute(arguments[1])}",
            vec![json!(css), json!(name)],
        );
        assert!(
            v["missing"] != true,
            "{}: no `{css}` on {}",
            self.test,
            self.path()
        );
        v["value"].as_str().map(str::to_string)
    }

    /// Clicks the first element matching `css`; looks it up again if the page replaced
    /// it between finding and clicking.
    pub fn click(&self, css: &str) {
        for _ in 0..3 {
            let e = self.find(css);
            match self.bounded(&format!("click `{css}`"), e.click()) {
                Ok(()) => return,
                Err(err) if err.to_string().contains("stale element") => continue,
                Err(err) => panic!("click `{css}`: {err}"),
            }
        }
        panic!("click `{css}`: the page kept replacing it");
    }

    /// Replaces the value of the field matching `css` with `text`, as typed.
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd(&format!("clear `{css}`"), e.clear());
        self.cmd(&format!("type into `{css}`"), e.send_keys(text));
    }

    /// Runs `script` in the page (`arguments[i]` are `args`) and returns its value.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            &format!("run script `{script}`"),
            self.client().execute(script, args),
        )
    }

    /// Runs an asynchronous `script`: it calls `arguments[arguments.length - 1]` with its
    /// result.
    pub fn execute_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            &format!("run async script `{script}`"),
            self.client().execute_async(script, args),
        )
    }

    /// The page's HTML as the browser holds it now.
    pub fn source(&self) -> String {
        self.cmd("read the page source", self.client().source())
    }

    /// The current window.
    pub fn window(&self) -> WindowHandle {
        self.cmd("read the window handle", self.client().window())
    }

    /// Opens a new window (not a tab) and switches to it; returns it.
    pub fn new_window(&self) -> WindowHandle {
        let w = self.cmd("open a window", self.client().new_window(false));
        self.switch_to(&w.handle);
        w.handle
    }

    pub fn switch_to(&self, w: &WindowHandle) {
        self.cmd("switch windows", self.client().switch_to_window(w.clone()));
    }

    /// The browser's cookies for the current page, as (name, value) pairs.
    pub fn cookies(&self) -> Vec<(String, String)> {
        self.cmd("read the cookies", self.client().get_all_cookies())
            .into_iter()
            .map(|c| (c.name().to_string(), c.value().to_string()))
            .collect()
    }

    /// Sizes the window `width` wide and as tall as the page (at most `max_height`), so
    /// a screenshot shows all of it.
    pub fn fit_page(&self, width: u32, max_height: u32) {
        self.cmd(
            "resize the window",
            self.client().set_window_size(width, 900),
        );
        let h = self
            .execute("return document.documentElement.scrollHeight", vec![])
            .as_u64()
            .expect("the page's height") as u32;
        let h = h.min(max_height);
        self.cmd("resize the window", self.client().set_window_size(width, h));
        // The window's outer size includes what headless Chromium keeps for its frame:
        // grow it until the viewport holds the page.
        let inner = self
            .execute("return window.innerHeight", vec![])
            .as_u64()
            .unwrap_or(0) as u32;
        if inner < h {
            self.cmd(
                "resize the window",
                self.client().set_window_size(width, h + (h - inner)),
            );
        }
    }

    /// Saves a PNG of the window as `target/test-artifacts/browser/TEST-NN-STEP.png` and
    /// returns its path.
    pub fn screenshot(&self, step: &str) -> PathBuf {
        let png = self.cmd("take a screenshot", self.client().screenshot());
        let n = self.shots.get() + 1;
        self.shots.set(n);
        let path = artifacts_dir().join(format!("{}-{n:02}-{step}.png", self.test));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Logs in with `token` on the login page, as a person would; returns the page's
    /// path afterwards (`/` when it worked, `/login` when it did not).
    pub fn login(&self, token: &str) -> String {
        self.goto("/login");
        self.wait_for("form#login");
        self.fill("form#login input[name=token]", token);
        self.click("form#login button[type=submit]");
        self.wait_until("the login form to be answered", STEP, |b| {
            b.execute("return document.readyState", vec![]) == "complete"
                && (!b.path().starts_with("/login") || b.exists(".error"))
        });
        self.path()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() && self.client.is_some() {
            // Best effort, and never a second panic.
            if let Ok(Ok(Ok(png))) = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), async {
                    Ok::<_, ()>(self.client().screenshot().await)
                })
                .await
            }) {
                let path = artifacts_dir().join(format!("{}-failure.png", self.test));
                if std::fs::write(&path, png).is_ok() {
                    eprintln!("browser screenshot at the failure: {}", path.display());
                }
            }
        }
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), client.close()).await
            });
        }
        // chromedriver and the Chromium it started share the group chromedriver leads.
        let group = self.driver.id() as i32;
        // SAFETY: a plain syscall on the process group this harness created.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while self.driver.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.driver.try_wait().ok().flatten().is_none() {
            // SAFETY: as above; chromedriver did not stop: the whole group goes now.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = self.driver.wait();
        } else {
            // A group outlives its leader while it has members (and its id is not reused
            // meanwhile): a browser that lingers goes too.
            // SAFETY: signal 0 only asks whether the group has members.
            if unsafe { libc::kill(-group, 0) } == 0 {
                // SAFETY: as above.
                unsafe { libc::kill(-group, libc::SIGKILL) };
            }
        }
    }
}
