//! What happens when a schedule fires while the trigger's previous run is still going.
//!
//! A small state machine per trigger, free of clocks and tasks so every transition is
//! unit-tested: the scheduler asks it on every fire ([`OverlapGate::on_fire`]) and tells
//! it when a run ends ([`OverlapGate::on_finish`]), which may hand back a queued fire to
//! start at once.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The per-trigger overlap policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapPolicy {
    /// A fire while a run is going is dropped (and counted as skipped).
    #[default]
    Skip,
    /// A fire while a run is going waits, and starts when the run ends. At most one
    /// waits: later fires while one is waiting are skipped.
    Queue,
    /// Every fire starts a run, however many are already going.
    Allow,
}

impl OverlapPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OverlapPolicy::Skip => "skip",
            OverlapPolicy::Queue => "queue",
            OverlapPolicy::Allow => "allow",
        }
    }
}

impl std::fmt::Display for OverlapPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OverlapPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(OverlapPolicy::Skip),
            "queue" => Ok(OverlapPolicy::Queue),
            "allow" => Ok(OverlapPolicy::Allow),
            other => Err(format!(
                "overlap policy {other:?} is not one of skip, queue, allow"
            )),
        }
    }
}

/// The gate's answer to one fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireDecision {
    /// Start a run now.
    Start,
    /// Wait for the running one to end ([`OverlapGate::on_finish`] hands it back).
    Queue,
    /// Drop this fire.
    Skip,
}

/// Counters since the gate was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Runs started, including queued fires started when a run ended.
    pub started: u64,
    /// Fires that had to wait.
    pub queued: u64,
    /// Fires dropped.
    pub skipped: u64,
}

/// One trigger's overlap state.
#[derive(Debug, Clone)]
pub struct OverlapGate {
    policy: OverlapPolicy,
    running: usize,
    waiting: Option<DateTime<Utc>>,
    stats: GateStats,
}

impl OverlapGate {
    pub fn new(policy: OverlapPolicy) -> Self {
        OverlapGate {
            policy,
            running: 0,
            waiting: None,
            stats: GateStats::default(),
        }
    }

    /// A fire scheduled at `scheduled_at` arrived. On [`FireDecision::Start`] the caller
    /// starts a run and must call [`OverlapGate::on_finish`] when it ends.
    pub fn on_fire(&mut self, scheduled_at: DateTime<Utc>) -> FireDecision {
        let decision = match self.policy {
            _ if self.running == 0 => FireDecision::Start,
            OverlapPolicy::Allow => FireDecision::Start,
            OverlapPolicy::Queue if self.waiting.is_none() => FireDecision::Queue,
            OverlapPolicy::Queue | OverlapPolicy::Skip => FireDecision::Skip,
        };
        match decision {
            FireDecision::Start => {
                self.running += 1;
                self.stats.started += 1;
            }
            FireDecision::Queue => {
                self.waiting = Some(scheduled_at);
                self.stats.queued += 1;
            }
            FireDecision::Skip => self.stats.skipped += 1,
        }
        decision
    }

    /// A run ended. Returns the scheduled time of the waiting fire, if any, which counts
    /// as started from now on (the caller starts it at once).
    pub fn on_finish(&mut self) -> Option<DateTime<Utc>> {
        debug_assert!(self.running > 0, "on_finish without a running run");
        self.running = self.running.saturating_sub(1);
        let next = self.waiting.take()?;
        self.running += 1;
        self.stats.started += 1;
        Some(next)
    }

    /// Drops the waiting fire (at shutdown). Returns whether there was one.
    pub fn clear_waiting(&mut self) -> bool {
        self.waiting.take().is_some()
    }

    pub fn policy(&self) -> OverlapPolicy {
        self.policy
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// The scheduled time of the fire waiting to start, if one is.
    pub fn waiting(&self) -> Option<DateTime<Utc>> {
        self.waiting
    }

    pub fn stats(&self) -> GateStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn skip_starts_when_idle_and_drops_fires_while_running() {
        let mut g = OverlapGate::new(OverlapPolicy::Skip);
        assert_eq!(g.on_fire(t(0)), FireDecision::Start);
        assert_eq!(g.on_fire(t(1)), FireDecision::Skip);
        assert_eq!(g.on_fire(t(2)), FireDecision::Skip);
        assert_eq!(g.on_finish(), None);
        assert_eq!(g.running(), 0);
        assert_eq!(g.on_fire(t(3)), FireDecision::Start);
        assert_eq!(
            g.stats(),
            GateStats {
                started: 2,
                queued: 0,
                skipped: 2
            }
        );
    }

    #[test]
    fn queue_keeps_at_most_one_waiting_fire_and_starts_it_when_the_run_ends() {
        let mut g = OverlapGate::new(OverlapPolicy::Queue);
        assert_eq!(g.on_fire(t(0)), FireDecision::Start);
        assert_eq!(g.on_fire(t(1)), FireDecision::Queue);
        assert_eq!(g.on_fire(t(2)), FireDecision::Skip);
        assert_eq!(g.waiting(), Some(t(1)), "the first waiting fire is kept");
        assert_eq!(g.on_finish(), Some(t(1)));
        assert_eq!(g.running(), 1, "the queued fire is now running");
        assert_eq!(g.on_fire(t(3)), FireDecision::Queue);
        assert_eq!(g.on_finish(), Some(t(3)));
        assert_eq!(g.on_finish(), None);
        assert_eq!(g.running(), 0);
        assert_eq!(
            g.stats(),
            GateStats {
                started: 3,
                queued: 2,
                skipped: 1
            }
        );
    }

    #[test]
    fn allow_starts_every_fire_and_counts_each_finish() {
        let mut g = OverlapGate::new(OverlapPolicy::Allow);
        for i in 0..3 {
            assert_eq!(g.on_fire(t(i)), FireDecision::Start);
        }
        assert_eq!(g.running(), 3);
        assert_eq!(g.on_finish(), None);
        assert_eq!(g.running(), 2);
        assert_eq!(g.stats().started, 3);
        assert_eq!(g.stats().skipped, 0);
    }

    #[test]
    fn clearing_the_waiting_fire_means_nothing_starts_after_the_run() {
        let mut g = OverlapGate::new(OverlapPolicy::Queue);
        g.on_fire(t(0));
        g.on_fire(t(1));
        assert!(g.clear_waiting());
        assert_eq!(g.on_finish(), None);
        assert!(!g.clear_waiting());
    }

    #[test]
    fn policies_read_from_config_text_and_refuse_unknown_names() {
        assert_eq!("queue".parse::<OverlapPolicy>(), Ok(OverlapPolicy::Queue));
        assert_eq!(OverlapPolicy::default(), OverlapPolicy::Skip);
        assert!(
            "parallel"
                .parse::<OverlapPolicy>()
                .unwrap_err()
                .contains("skip, queue, allow")
        );
    }
}
