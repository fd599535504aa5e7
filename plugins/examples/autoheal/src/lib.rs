//! autoheal: restarts unhealthy containers that opt in with a label, with back-off and a
//! maximum number of attempts per container, and reports what it did and what it gave
//! up on.
//!
//! A `docker` event (`container:health_status: unhealthy`) heals that one container on
//! its device at once; any other run (the cron pass, by hand) looks at every device.
//!
//! Config (`[config]` in plugin.toml):
//! - `label` — the opt-in label selector (default `capstan.autoheal=true`);
//! - `max_attempts` — restarts per container before giving up (default 5);
//! - `backoff_secs` — wait after the first restart; doubles with each attempt, at most
//!   `max_backoff_secs` (defaults 60 and 3600);
//! - `reset_after_secs` — a container healthy this long after its last restart starts
//!   again with a clean slate (default 3600);
//! - `stop_timeout_secs` — passed to the restart (default 10).
//!
//! State, per container: `heal/<device>/<container id>` → `{attempts, last_ms}`.

use capstan_sdk::prelude::*;
use serde::{Deserialize, Serialize};

struct Autoheal;

#[derive(Serialize, Deserialize, Default)]
struct Attempts {
    attempts: u32,
    last_ms: i64,
}

#[derive(Serialize, Default)]
struct Report {
    restarted: Vec<String>,
    waiting: Vec<String>,
    gave_up: Vec<String>,
    failed: Vec<String>,
    recovered: Vec<String>,
    device_errors: Vec<String>,
}

struct Settings {
    label: String,
    max_attempts: u32,
    backoff_ms: i64,
    max_backoff_ms: i64,
    reset_after_ms: i64,
    stop_timeout: u32,
}

impl Settings {
    fn read() -> Settings {
        Settings {
            label: config::get("label").unwrap_or_else(|| "capstan.autoheal=true".into()),
            max_attempts: config::get_or("max_attempts", 5),
            backoff_ms: config::get_or::<i64>("backoff_secs", 60) * 1000,
            max_backoff_ms: config::get_or::<i64>("max_backoff_secs", 3600) * 1000,
            reset_after_ms: config::get_or::<i64>("reset_after_secs", 3600) * 1000,
            stop_timeout: config::get_or("stop_timeout_secs", 10),
        }
    }

    /// How long to wait after `attempts` restarts before the next one.
    fn backoff(&self, attempts: u32) -> i64 {
        let factor = 1i64 << attempts.saturating_sub(1).min(20);
        self.backoff_ms
            .saturating_mul(factor)
            .min(self.max_backoff_ms)
    }
}

/// Heals the unhealthy opted-in containers of `device` — only container `only` when
/// given (a Docker event names it), and then the records of others are left alone.
fn heal_device(
    device: &str,
    only: Option<&str>,
    s: &Settings,
    now: i64,
    report: &mut Report,
) -> Result<(), Error> {
    let mut unhealthy = docker::list_containers(
        device,
        &ContainerFilter::running()
            .label(s.label.as_str())
            .health("unhealthy"),
    )?;
    if let Some(id) = only {
        unhealthy.retain(|c| c.id == id);
    }
    let prefix = format!("heal/{device}/");
    for c in &unhealthy {
        let who = format!("{device}/{}", c.name);
        let key = format!("{prefix}{}", c.id);
        let mut a: Attempts = state::get_json(&key).unwrap_or_default();
        if a.attempts >= s.max_attempts {
            report
                .gave_up
                .push(format!("{who} (after {} restarts)", a.attempts));
            continue;
        }
        if a.attempts > 0 && now - a.last_ms < s.backoff(a.attempts) {
            let wait = (s.backoff(a.attempts) - (now - a.last_ms)) / 1000;
            report
                .waiting
                .push(format!("{who} (next restart in {wait} s)"));
            continue;
        }
        match docker::restart_container(device, &c.id, Some(s.stop_timeout)) {
            Ok(()) => {
                a.attempts += 1;
                a.last_ms = now;
                log::with(
                    log::LogLevel::Info,
                    "restarted an unhealthy container",
                    &[
                        ("device", device),
                        ("container", &c.name),
                        ("attempt", &a.attempts.to_string()),
                    ],
                );
                report
                    .restarted
                    .push(format!("{who} (attempt {})", a.attempts));
                state::set_json(&key, &a)?;
            }
            Err(e) => {
                log::warn(&format!("cannot restart {who}: {}", e.message()));
                report.failed.push(format!("{who}: {}", e.message()));
            }
        }
    }
    if only.is_some() {
        return Ok(());
    }
    // Containers with a record that are no longer unhealthy: forget them once they have
    // stayed well long enough.
    for key in state::keys(&prefix) {
        let id = &key[prefix.len()..];
        if unhealthy.iter().any(|c| c.id == id) {
            continue;
        }
        let a: Attempts = state::get_json(&key).unwrap_or_default();
        if now - a.last_ms >= s.reset_after_ms {
            state::delete(&key);
            report
                .recovered
                .push(format!("{device}/{}", &id[..id.len().min(12)]));
        }
    }
    Ok(())
}

impl Plugin for Autoheal {
    fn run(event: Event) -> Result<Outcome, Error> {
        let s = Settings::read();
        let now = time::now();
        let mut report = Report::default();
        let (devices, only) = match &event {
            Event::Docker(e) => (vec![e.device.clone()], Some(e.actor_id.as_str())),
            _ => (
                docker::list_devices().into_iter().map(|d| d.name).collect(),
                None,
            ),
        };
        for device in devices {
            if let Err(e) = heal_device(&device, only, &s, now, &mut report) {
                log::error(&format!("device {device}: {}", e.message()));
                report
                    .device_errors
                    .push(format!("{device}: {}", e.message()));
            }
        }
        let mut parts = vec![format!("restarted {}", report.restarted.len())];
        for (what, list) in [
            ("waiting", &report.waiting),
            ("gave up on", &report.gave_up),
            ("failed", &report.failed),
            ("recovered", &report.recovered),
            ("device errors", &report.device_errors),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} {}", list.len()));
            }
        }
        let mut summary = parts.join(", ");
        if !report.restarted.is_empty() {
            summary.push_str(&format!(": {}", report.restarted.join(", ")));
        }
        if !report.gave_up.is_empty() {
            summary.push_str(&format!("; gave up on {}", report.gave_up.join(", ")));
        }
        Ok(Outcome::new(summary).with_details(&report))
    }
}

capstan_sdk::export_plugin!(Autoheal);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_exponentially_up_to_the_maximum() {
        let s = Settings {
            label: String::new(),
            max_attempts: 5,
            backoff_ms: 60_000,
            max_backoff_ms: 300_000,
            reset_after_ms: 0,
            stop_timeout: 10,
        };
        assert_eq!(s.backoff(1), 60_000);
        assert_eq!(s.backoff(2), 120_000);
        assert_eq!(s.backoff(3), 240_000);
        assert_eq!(s.backoff(4), 300_000);
        assert_eq!(s.backoff(40), 300_000);
    }
}
