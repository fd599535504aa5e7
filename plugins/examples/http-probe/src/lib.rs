//! http-probe: the scheduled health check people mean. On every run it requests the URL
//! each running container names in its `capstan.probe.url` label, records the latency,
//! restarts a container after N failed probes in a row (with back-off and a give-up
//! limit, as autoheal does), and notifies when it gives up on a container or when one it
//! restarted or gave up on answers again.
//!
//! Labels on a container (only `capstan.probe.url` is required):
//! - `capstan.probe.url` — the URL to request (`http://172.18.0.5:8080/health`); the
//!   manifest's `[policy] outbound` must allow its origin;
//! - `capstan.probe.status` — the statuses that count as healthy: codes and classes,
//!   comma-separated (`200`, `200,204`, `2xx,3xx`); default `2xx`;
//! - `capstan.probe.body` — text the body must contain;
//! - `capstan.probe.timeout` — a probe slower than this fails (`500ms`, `2s`, or
//!   seconds); default `timeout_ms` below. The request is given up after it (the
//!   engine's own per-request limit also holds);
//! - `capstan.probe.threshold` — failed probes in a row before a restart; default
//!   `threshold` below.
//!
//! Config (`[config]` in plugin.toml):
//! - `label` — the label selector that opts a container in (default `capstan.probe.url`);
//! - `threshold` — failed probes in a row before a restart (default 3);
//! - `timeout_ms` — default probe timeout (default 5000);
//! - `max_restarts` — restarts before giving up on a container (default 3);
//! - `backoff_secs` — least wait after the first restart before another; doubles with
//!   each restart, at most `max_backoff_secs` (defaults 60 and 3600);
//! - `stop_timeout_secs` — passed to the restart (default 10);
//! - `channel` — the notifier channel told about give-ups and recoveries (default none;
//!   the manifest's `[notify] channels` must allow it). A notification the engine
//!   refuses is logged and the run goes on.
//!
//! A probe the engine refuses (its URL's origin is not in `[policy] outbound`) is a
//! problem of the plugin's setup, reported in the outcome and never held against the
//! container.
//!
//! State, per container: `probe/<device>/<container id>` → `{failures, restarts,
//! last_restart_ms, gave_up}`, removed when the container answers well again or is no
//! longer running with the label.

use std::time::Instant;

use capstan_sdk::http;
use capstan_sdk::prelude::*;
use serde::{Deserialize, Serialize};

struct HttpProbe;

/// What the plugin remembers about a container between runs.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq)]
struct Track {
    /// Failed probes in a row since the last restart.
    failures: u32,
    /// Restarts since the container last answered well.
    restarts: u32,
    last_restart_ms: i64,
    /// Given up on: probed, never restarted again until it answers well.
    gave_up: bool,
}

/// The plugin's settings.
#[derive(Debug, Clone)]
struct Settings {
    label: String,
    threshold: u32,
    timeout_ms: u64,
    max_restarts: u32,
    backoff_ms: i64,
    max_backoff_ms: i64,
    stop_timeout: u32,
    channel: Option<String>,
}

impl Settings {
    fn read() -> Settings {
        Settings {
            label: config::get("label").unwrap_or_else(|| URL_LABEL.into()),
            threshold: config::get_or("threshold", 3u32).max(1),
            timeout_ms: config::get_or("timeout_ms", 5000u64).max(1),
            max_restarts: config::get_or("max_restarts", 3),
            backoff_ms: config::get_or::<i64>("backoff_secs", 60).max(0) * 1000,
            max_backoff_ms: config::get_or::<i64>("max_backoff_secs", 3600).max(0) * 1000,
            stop_timeout: config::get_or("stop_timeout_secs", 10),
            channel: config::get("channel").filter(|c| !c.trim().is_empty()),
        }
    }

    /// How long to wait after `restarts` restarts before the next one.
    fn backoff(&self, restarts: u32) -> i64 {
        let factor = 1i64 << restarts.saturating_sub(1).min(20);
        self.backoff_ms
            .saturating_mul(factor)
            .min(self.max_backoff_ms)
    }
}

const URL_LABEL: &str = "capstan.probe.url";

/// What one container asks to be probed with, from its labels.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    url: String,
    expect: Vec<Expect>,
    body: Option<String>,
    timeout_ms: u64,
    threshold: u32,
}

/// One healthy status: a code, or a class (`2xx`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Code(u16),
    Class(u16),
}

impl Spec {
    /// The container's probe from its labels; an error names the label and says what
    /// to write.
    fn from_labels(labels: &[(String, String)], s: &Settings) -> Result<Spec, String> {
        let get = |k: &str| {
            labels
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.trim())
        };
        let url = get(URL_LABEL).unwrap_or_default().to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "label {URL_LABEL}={url:?} is not an http:// or https:// URL"
            ));
        }
        let expect = match get("capstan.probe.status") {
            None => vec![Expect::Class(2)],
            Some(v) => {
                parse_expect(v).map_err(|e| format!("label capstan.probe.status={v:?}: {e}"))?
            }
        };
        let timeout_ms = match get("capstan.probe.timeout") {
            None => s.timeout_ms,
            Some(v) => parse_timeout_ms(v).ok_or_else(|| {
                format!("label capstan.probe.timeout={v:?}: write e.g. 500ms, 2s or 2")
            })?,
        };
        let threshold = match get("capstan.probe.threshold") {
            None => s.threshold,
            Some(v) => v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                format!("label capstan.probe.threshold={v:?}: write a whole number, at least 1")
            })?,
        };
        Ok(Spec {
            url,
            expect,
            body: get("capstan.probe.body")
                .filter(|b| !b.is_empty())
                .map(str::to_string),
            timeout_ms,
            threshold,
        })
    }

    /// Whether a response with `status` and `body` after `ms` is healthy; why not.
    fn judge(&self, status: u16, body: &[u8], ms: u64) -> Result<(), String> {
        let status_ok = self.expect.iter().any(|e| match e {
            Expect::Code(c) => *c == status,
            Expect::Class(c) => status / 100 == *c,
        });
        if !status_ok {
            return Err(format!("answered {status}"));
        }
        if let Some(want) = &self.body
            && !String::from_utf8_lossy(body).contains(want.as_str())
        {
            return Err(format!("answered {status} without {want:?} in the body"));
        }
        if ms > self.timeout_ms {
            return Err(format!(
                "answered {status} after {ms} ms, over the {} ms timeout",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

fn parse_expect(v: &str) -> Result<Vec<Expect>, String> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let lower = part.to_ascii_lowercase();
        let e = if let Some(class) = lower.strip_suffix("xx") {
            match class.parse::<u16>() {
                Ok(c @ 1..=5) => Expect::Class(c),
                _ => return Err(format!("`{part}` is not a status class (1xx to 5xx)")),
            }
        } else {
            match part.parse::<u16>() {
                Ok(c @ 100..=599) => Expect::Code(c),
                _ => return Err(format!("`{part}` is not an HTTP status")),
            }
        };
        out.push(e);
    }
    if out.is_empty() {
        return Err("name at least one status, e.g. 200 or 2xx".into());
    }
    Ok(out)
}

/// `500ms`, `2s`, or a number of seconds.
fn parse_timeout_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let ms = if let Some(n) = v.strip_suffix("ms") {
        n.trim().parse::<u64>().ok()?
    } else if let Some(n) = v.strip_suffix('s') {
        n.trim().parse::<u64>().ok()?.checked_mul(1000)?
    } else {
        v.parse::<u64>().ok()?.checked_mul(1000)?
    };
    (ms > 0).then_some(ms)
}

/// What to do after a probe, given what is remembered.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Healthy, with nothing to tell.
    Healthy,
    /// Healthy again after restarts or a give-up: tell.
    Recovered { restarts: u32, had_given_up: bool },
    /// Failing, below the threshold.
    Failing { failures: u32 },
    /// Restart now.
    Restart { attempt: u32 },
    /// Failing, but the back-off since the last restart has not passed.
    Waiting { wait_ms: i64 },
    /// Give up now (tell), or still given up (`newly: false`).
    GiveUp { newly: bool },
}

/// The decision for one probe of a container with `threshold`, and the track to keep
/// (`None`: forget it).
fn decide(
    track: Option<Track>,
    healthy: bool,
    threshold: u32,
    s: &Settings,
    now: i64,
) -> (Step, Option<Track>) {
    let mut t = track.unwrap_or_default();
    if healthy {
        let step = if t.restarts > 0 || t.gave_up {
            Step::Recovered {
                restarts: t.restarts,
                had_given_up: t.gave_up,
            }
        } else {
            Step::Healthy
        };
        return (step, None);
    }
    t.failures = t.failures.saturating_add(1);
    if t.gave_up {
        return (Step::GiveUp { newly: false }, Some(t));
    }
    if t.failures < threshold {
        let failures = t.failures;
        return (Step::Failing { failures }, Some(t));
    }
    if t.restarts >= s.max_restarts {
        t.gave_up = true;
        return (Step::GiveUp { newly: true }, Some(t));
    }
    if t.restarts > 0 {
        let wait_ms = s.backoff(t.restarts) - (now - t.last_restart_ms);
        if wait_ms > 0 {
            return (Step::Waiting { wait_ms }, Some(t));
        }
    }
    t.restarts += 1;
    t.failures = 0;
    t.last_restart_ms = now;
    let attempt = t.restarts;
    (Step::Restart { attempt }, Some(t))
}

/// One probe, as the outcome's details give it.
#[derive(Serialize, Debug)]
struct Probe {
    device: String,
    container: String,
    url: String,
    healthy: bool,
    /// The response's status, when there was one.
    status: Option<u16>,
    latency_ms: f64,
    /// Why it failed.
    error: Option<String>,
    /// Failed probes in a row now.
    failures: u32,
}

#[derive(Serialize, Default)]
struct Report {
    probes: Vec<Probe>,
    restarted: Vec<String>,
    waiting: Vec<String>,
    gave_up: Vec<String>,
    recovered: Vec<String>,
    /// Restarts or notifications that did not happen, and containers with bad labels.
    problems: Vec<String>,
    device_errors: Vec<String>,
}

/// Requests `spec.url`: the status, the body and the time taken, or why there is none.
/// A request the engine refuses (the URL's origin is not in `[policy] outbound`) is
/// `Err(Error::Denied)`: the plugin's setup, not the container, is at fault.
fn request(spec: &Spec) -> (Result<(u16, Vec<u8>), Error>, f64) {
    let start = Instant::now();
    let timeout = u32::try_from(spec.timeout_ms).unwrap_or(u32::MAX);
    let result = http::send(http::Request::get(spec.url.as_str()).timeout_ms(timeout))
        .map(|r| (r.status, r.body));
    (result, start.elapsed().as_secs_f64() * 1000.0)
}

/// Tells the configured channel, if any; a refusal is logged, not fatal.
fn tell(s: &Settings, report: &mut Report, note: Notification) {
    let Some(channel) = &s.channel else {
        return;
    };
    match notify::send(channel, &note) {
        Ok(sent) => log::info(&format!("notified {channel}: {} ({sent:?})", note.title)),
        Err(e) => {
            log::warn(&format!(
                "could not notify {channel} ({}): {}",
                note.title,
                e.message()
            ));
            report
                .problems
                .push(format!("notify {channel}: {}", e.message()));
        }
    }
}

fn probe_device(device: &str, s: &Settings, now: i64, report: &mut Report) -> Result<(), Error> {
    let containers =
        docker::list_containers(device, &ContainerFilter::running().label(s.label.as_str()))?;
    let prefix = format!("probe/{device}/");
    for c in &containers {
        let who = format!("{device}/{}", c.name);
        let spec = match Spec::from_labels(&c.labels, s) {
            Ok(spec) => spec,
            Err(e) => {
                log::warn(&format!("{who}: {e}"));
                report.problems.push(format!("{who}: {e}"));
                continue;
            }
        };
        let (result, latency_ms) = request(&spec);
        let (status, verdict) = match result {
            Ok((status, body)) => (Some(status), spec.judge(status, &body, latency_ms as u64)),
            // Not the container's fault: never counted against it, never a restart.
            Err(e @ Error::Denied(_)) => {
                log::warn(&format!("{who}: not probed: {}", e.message()));
                report
                    .problems
                    .push(format!("{who}: not probed: {}", e.message()));
                continue;
            }
            Err(e) => (None, Err(e.message())),
        };
        let key = format!("{prefix}{}", c.id);
        let (step, mut keep) = decide(
            state::get_json(&key),
            verdict.is_ok(),
            spec.threshold,
            s,
            now,
        );
        let failures = keep.as_ref().map(|t| t.failures).unwrap_or(0);
        let latency = format!("{latency_ms:.1}");
        let status_text = status.map(|s| s.to_string()).unwrap_or_default();
        let mut fields = vec![
            ("device", device),
            ("container", c.name.as_str()),
            ("url", spec.url.as_str()),
            ("latency_ms", latency.as_str()),
            ("status", status_text.as_str()),
        ];
        let error = verdict.as_ref().err().cloned().unwrap_or_default();
        if verdict.is_err() {
            fields.push(("error", error.as_str()));
        }
        let level = if verdict.is_ok() {
            log::LogLevel::Info
        } else {
            log::LogLevel::Warn
        };
        log::with(level, "probed", &fields);

        match step {
            Step::Healthy | Step::Failing { .. } => {}
            Step::Recovered {
                restarts,
                had_given_up,
            } => {
                let how = if had_given_up {
                    format!("after being given up on ({restarts} restarts)")
                } else {
                    format!("after {restarts} restart(s)")
                };
                report.recovered.push(format!("{who} ({how})"));
                tell(
                    s,
                    report,
                    Notification::new(
                        format!("{who} recovered"),
                        format!("{} answers well again, {how}.", spec.url),
                    )
                    .tag("http-probe")
                    .tag("recovered")
                    .dedup_key(format!("http-probe/recovered/{device}/{}", c.id)),
                );
            }
            Step::Restart { attempt } => {
                match docker::restart_container(device, &c.id, Some(s.stop_timeout)) {
                    Ok(()) => {
                        log::with(
                            log::LogLevel::Info,
                            "restarted a container that failed its probes",
                            &[
                                ("device", device),
                                ("container", &c.name),
                                ("attempt", &attempt.to_string()),
                                ("error", &error),
                            ],
                        );
                        report.restarted.push(format!("{who} (attempt {attempt})"));
                    }
                    Err(e) => {
                        log::warn(&format!("cannot restart {who}: {}", e.message()));
                        report
                            .problems
                            .push(format!("restart {who}: {}", e.message()));
                        // Not restarted: the next failing probe tries again.
                        if let Some(t) = keep.as_mut() {
                            t.restarts = t.restarts.saturating_sub(1);
                            t.failures = spec.threshold.saturating_sub(1);
                        }
                    }
                }
            }
            Step::Waiting { wait_ms } => {
                report
                    .waiting
                    .push(format!("{who} (next restart in {} s)", wait_ms / 1000));
            }
            Step::GiveUp { newly } => {
                let restarts = keep.as_ref().map(|t| t.restarts).unwrap_or(0);
                report
                    .gave_up
                    .push(format!("{who} (after {restarts} restarts)"));
                if newly {
                    log::with(
                        log::LogLevel::Error,
                        "gave up on a container that keeps failing its probes",
                        &[
                            ("device", device),
                            ("container", &c.name),
                            ("error", &error),
                        ],
                    );
                    tell(
                        s,
                        report,
                        Notification::new(
                            format!("http-probe gave up on {who}"),
                            format!(
                                "{} still fails after {restarts} restart(s): {error}. It is probed but not restarted again until it answers well.",
                                spec.url
                            ),
                        )
                        .priority(Priority::High)
                        .tag("http-probe")
                        .tag("gave-up")
                        .dedup_key(format!("http-probe/gave-up/{device}/{}", c.id)),
                    );
                }
            }
        }
        match &keep {
            Some(t) => state::set_json(&key, t)?,
            None => state::delete(&key),
        }
        push_probe(
            report, device, c, &spec, status, latency_ms, &verdict, failures,
        );
    }
    // Containers no longer running with the label: forget them.
    for key in state::keys(&prefix) {
        let id = &key[prefix.len()..];
        if !containers.iter().any(|c| c.id == id) {
            state::delete(&key);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn push_probe(
    report: &mut Report,
    device: &str,
    c: &ContainerSummary,
    spec: &Spec,
    status: Option<u16>,
    latency_ms: f64,
    verdict: &Result<(), String>,
    failures: u32,
) {
    report.probes.push(Probe {
        device: device.to_string(),
        container: c.name.clone(),
        url: spec.url.clone(),
        healthy: verdict.is_ok(),
        status,
        latency_ms: (latency_ms * 10.0).round() / 10.0,
        error: verdict.as_ref().err().cloned(),
        failures,
    });
}

impl Plugin for HttpProbe {
    fn run(_event: Event) -> Result<Outcome, Error> {
        let s = Settings::read();
        let now = time::now();
        let mut report = Report::default();
        for device in docker::list_devices() {
            if let Err(e) = probe_device(&device.name, &s, now, &mut report) {
                log::error(&format!("device {}: {}", device.name, e.message()));
                report
                    .device_errors
                    .push(format!("{}: {}", device.name, e.message()));
            }
        }
        let healthy = report.probes.iter().filter(|p| p.healthy).count();
        let mut parts = vec![format!("probed {}, {healthy} healthy", report.probes.len())];
        for (what, n) in [
            ("failing", report.probes.len() - healthy),
            ("restarted", report.restarted.len()),
            ("waiting", report.waiting.len()),
            ("gave up on", report.gave_up.len()),
            ("recovered", report.recovered.len()),
            ("problems", report.problems.len()),
            ("device errors", report.device_errors.len()),
        ] {
            if n > 0 {
                parts.push(format!("{what} {n}"));
            }
        }
        let mut summary = parts.join(", ");
        if !report.restarted.is_empty() {
            summary.push_str(&format!("; restarted {}", report.restarted.join(", ")));
        }
        if !report.gave_up.is_empty() {
            summary.push_str(&format!("; gave up on {}", report.gave_up.join(", ")));
        }
        Ok(Outcome::new(summary).with_details(&report))
    }
}

capstan_sdk::export_plugin!(HttpProbe);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            label: URL_LABEL.into(),
            threshold: 2,
            timeout_ms: 5000,
            max_restarts: 2,
            backoff_ms: 60_000,
            max_backoff_ms: 300_000,
            stop_timeout: 10,
            channel: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_a_probe_from_labels_with_defaults() {
        let s = settings();
        let spec =
            Spec::from_labels(&labels(&[(URL_LABEL, "http://10.0.0.5:8080/h")]), &s).unwrap();
        assert_eq!(spec.expect, [Expect::Class(2)]);
        assert_eq!(
            (spec.timeout_ms, spec.threshold, spec.body),
            (5000, 2, None)
        );
        let spec = Spec::from_labels(
            &labels(&[
                (URL_LABEL, "https://x/h"),
                ("capstan.probe.status", "200, 3xx"),
                ("capstan.probe.body", "ok"),
                ("capstan.probe.timeout", "750ms"),
                ("capstan.probe.threshold", "5"),
            ]),
            &s,
        )
        .unwrap();
        assert_eq!(spec.expect, [Expect::Code(200), Expect::Class(3)]);
        assert_eq!(spec.body.as_deref(), Some("ok"));
        assert_eq!((spec.timeout_ms, spec.threshold), (750, 5));
    }

    #[test]
    fn bad_labels_are_named() {
        let s = settings();
        let e = Spec::from_labels(&labels(&[(URL_LABEL, "10.0.0.5:80")]), &s).unwrap_err();
        assert!(e.contains(URL_LABEL), "{e}");
        for (k, v) in [
            ("capstan.probe.status", "6xx"),
            ("capstan.probe.status", "abc"),
            ("capstan.probe.timeout", "soon"),
            ("capstan.probe.threshold", "0"),
        ] {
            let e = Spec::from_labels(&labels(&[(URL_LABEL, "http://x"), (k, v)]), &s).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn judges_status_body_and_time() {
        let s = settings();
        let spec = Spec::from_labels(
            &labels(&[
                (URL_LABEL, "http://x"),
                ("capstan.probe.body", "healthy"),
                ("capstan.probe.timeout", "1s"),
            ]),
            &s,
        )
        .unwrap();
        assert_eq!(spec.judge(200, b"all healthy", 5), Ok(()));
        assert!(spec.judge(404, b"healthy", 5).unwrap_err().contains("404"));
        assert!(spec.judge(200, b"sick", 5).unwrap_err().contains("healthy"));
        assert!(
            spec.judge(200, b"healthy", 1500)
                .unwrap_err()
                .contains("timeout")
        );
    }

    #[test]
    fn restarts_after_the_threshold_backs_off_and_gives_up() {
        let s = settings();
        let (step, t) = decide(None, false, 2, &s, 0);
        assert_eq!(step, Step::Failing { failures: 1 });
        let (step, t) = decide(t, false, 2, &s, 1_000);
        assert_eq!(step, Step::Restart { attempt: 1 });
        assert_eq!(t.as_ref().unwrap().failures, 0);
        // Two more failures, but within the back-off of the first restart.
        let (_, t) = decide(t, false, 2, &s, 2_000);
        let (step, t) = decide(t, false, 2, &s, 3_000);
        assert_eq!(step, Step::Waiting { wait_ms: 58_000 });
        let (step, t) = decide(t, false, 2, &s, 61_000);
        assert_eq!(step, Step::Restart { attempt: 2 });
        let (_, t) = decide(t, false, 2, &s, 62_000);
        let (step, t) = decide(t, false, 2, &s, 500_000);
        assert_eq!(step, Step::GiveUp { newly: true });
        let (step, t) = decide(t, false, 2, &s, 600_000);
        assert_eq!(step, Step::GiveUp { newly: false }, "told once");
        let (step, t) = decide(t, true, 2, &s, 700_000);
        assert_eq!(
            step,
            Step::Recovered {
                restarts: 2,
                had_given_up: true
            }
        );
        assert_eq!(t, None, "a healthy container is forgotten");
    }

    #[test]
    fn a_blip_below_the_threshold_is_forgotten_without_a_word() {
        let s = settings();
        let (_, t) = decide(None, false, 2, &s, 0);
        assert_eq!(decide(t, true, 2, &s, 1), (Step::Healthy, None));
    }

    #[test]
    fn timeouts_read_milliseconds_seconds_and_bare_numbers() {
        assert_eq!(parse_timeout_ms("500ms"), Some(500));
        assert_eq!(parse_timeout_ms("2s"), Some(2000));
        assert_eq!(parse_timeout_ms("3"), Some(3000));
        assert_eq!(parse_timeout_ms("0"), None);
        assert_eq!(parse_timeout_ms("x"), None);
    }
}
