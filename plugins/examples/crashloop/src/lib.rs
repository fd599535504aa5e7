//! crashloop: counts the deaths (`die`, `oom` events) of each container within a window
//! and, when a container is crash-looping, notifies a channel and says so in the run's
//! outcome.
//!
//! Config (`[config]` in plugin.toml):
//! - `threshold` — deaths within the window that make a crash loop (default 3);
//! - `window_secs` — the window (default 300);
//! - `channel` — the notifier channel to tell (default `ops`). A notification that
//!   cannot be sent (no such channel, not allowed by the manifest) is logged and noted
//!   in the outcome; the crash loop is reported either way.
//!
//! State, per container: `deaths/<device>/<container id>` → `{deaths: [ms…],
//! notified_ms}`. A container is notified about at most once per window.

use capstan_sdk::prelude::*;
use serde::{Deserialize, Serialize};

struct Crashloop;

#[derive(Serialize, Deserialize, Default)]
struct Deaths {
    /// When each death within the window happened, ms since the epoch.
    deaths: Vec<i64>,
    /// When the last notification about this container went out.
    notified_ms: i64,
}

/// The most deaths kept per container (a window never needs more than the threshold).
const MAX_KEPT: usize = 1000;

/// Adds `count` deaths at `at_ms`, forgets those older than the window, and says whether
/// the container is crash-looping.
fn record(d: &mut Deaths, at_ms: i64, count: u32, window_ms: i64, threshold: usize) -> bool {
    for _ in 0..count.min(MAX_KEPT as u32) {
        d.deaths.push(at_ms);
    }
    d.deaths.retain(|&t| at_ms - t < window_ms);
    let excess = d.deaths.len().saturating_sub(MAX_KEPT);
    d.deaths.drain(..excess);
    d.deaths.len() >= threshold
}

impl Plugin for Crashloop {
    fn run(event: Event) -> Result<Outcome, Error> {
        let Event::Docker(e) = event else {
            return Ok(Outcome::new(
                "nothing to do: crashloop reacts to Docker events",
            ));
        };
        let threshold: usize = config::get_or("threshold", 3usize).max(1);
        let window_ms = config::get_or::<i64>("window_secs", 300).max(1) * 1000;
        let channel = config::get("channel").unwrap_or_else(|| "ops".into());
        let name = e
            .attributes
            .iter()
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| e.actor_id.chars().take(12).collect());
        let who = format!("{}/{name}", e.device);
        let key = format!("deaths/{}/{}", e.device, e.actor_id);
        let mut d: Deaths = state::get_json(&key).unwrap_or_default();
        let looping = record(&mut d, e.time, e.count, window_ms, threshold);
        let deaths = d.deaths.len();
        let mut summary = if looping {
            format!(
                "{who} is crash-looping: {deaths} deaths ({}) in {} s",
                e.action,
                window_ms / 1000
            )
        } else {
            format!("{who}: {deaths} death(s) in the window, below {threshold}")
        };
        if looping && e.time - d.notified_ms >= window_ms {
            let note = Notification::new(
                format!("{who} is crash-looping"),
                format!(
                    "Container {name} on {} died {deaths} times within {} s (last: {}).",
                    e.device,
                    window_ms / 1000,
                    e.action
                ),
            )
            .priority(Priority::High)
            .tag("crashloop")
            .dedup_key(format!("crashloop/{}/{}", e.device, e.actor_id));
            match notify::send(&channel, &note) {
                Ok(sent) => {
                    d.notified_ms = e.time;
                    summary.push_str(&format!("; notified {channel} ({sent:?})"));
                }
                Err(err) => {
                    log::with(
                        log::LogLevel::Warn,
                        "cannot notify about a crash loop",
                        &[("channel", &channel), ("error", &err.message())],
                    );
                    summary.push_str(&format!("; not notified ({channel}: {})", err.message()));
                }
            }
        }
        state::set_json(&key, &d)?;
        log::with(
            log::LogLevel::Info,
            "container death counted",
            &[
                ("container", &who),
                ("action", &e.action),
                ("deaths", &deaths.to_string()),
            ],
        );
        Ok(Outcome::new(summary).with_details(&serde_json::json!({
            "device": e.device,
            "container": name,
            "id": e.actor_id,
            "deaths": deaths,
            "crash_looping": looping,
        })))
    }
}

capstan_sdk::export_plugin!(Crashloop);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_crash_loops_once_enough_deaths_fall_within_the_window() {
        let mut d = Deaths::default();
        assert!(!record(&mut d, 1_000, 1, 60_000, 3));
        assert!(!record(&mut d, 2_000, 1, 60_000, 3));
        assert!(record(&mut d, 3_000, 1, 60_000, 3));
        // Long after, the old deaths no longer count.
        assert!(!record(&mut d, 100_000, 1, 60_000, 3));
        assert_eq!(d.deaths, vec![100_000]);
        // A folded event counts every death it stands for.
        assert!(record(&mut d, 101_000, 2, 60_000, 3));
    }
}
