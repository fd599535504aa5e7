//! Cron triggers: a schedule in a time zone, an overlap policy, optional jitter.
//!
//! A plugin's manifest declares its cron triggers ([`CronTriggerConfig`]); they are
//! validated at install ([`CronTrigger::from_config`]), never at 3 a.m., and the one
//! [`CronScheduler`] of the engine fires them all from a single timer.
//!
//! # Schedules
//! The number of fields decides the resolution:
//! - **5 fields** `m h dom mon dow`: fires on the minute (second 0), as in crontab.
//! - **6 fields** `s m h dom mon dow`: seconds first, as in the `cron` crate and Quartz.
//! - **7 fields** (a trailing year) are refused: a job meant for one year is better
//!   removed than left to idle, and a 7th field is read differently by different tools.
//! - Macros: `@yearly` (= `@annually`), `@monthly`, `@weekly`, `@daily` (= `@midnight`),
//!   `@hourly`; and `@every <duration>` (e.g. `@every 90s`), fixed intervals counted from
//!   the Unix epoch, so the times are the same after a restart and ignore the zone.
//!   `@reboot` is refused in favour of `run_on_start = true`.
//!
//! Fields take `*`, `N`, `A-B`, `*/S`, `A-B/S`, `N/S` (from N to the end, every S) and
//! comma lists; months `JAN`–`DEC`; days of week `0`–`7` (0 and 7 are Sunday) or
//! `SUN`–`SAT`. When both day-of-month and day-of-week are restricted (neither starts
//! with `*`), a day matching *either* fires, as in Vixie cron. See [`SCHEDULE_HELP`].
//!
//! # Time zones
//! Each trigger reads its schedule in an IANA zone (default UTC). Fire times are computed
//! in that zone, including daylight-saving changes: see [`expr`] for the exact rules.
//!
//! # Missed fires
//! No catch-up: after downtime (or a stalled process), fires that were missed are not
//! replayed; the schedule resumes from the current time. A trigger that wants a run when
//! it is installed or the engine starts sets `run_on_start = true`.

pub mod expr;
pub mod gate;
pub mod kind;
pub mod scheduler;

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use expr::Schedule;
pub use gate::{FireDecision, GateStats, OverlapGate, OverlapPolicy};
pub use kind::{Cron, fire_runs};
pub use scheduler::{CronScheduler, FireInfo, ShutdownReport, TriggerId, TriggerStatus};

use super::units;

/// `--help` text for a schedule argument.
pub const SCHEDULE_HELP: &str = "\
A cron schedule, read in the trigger's time zone (default UTC):
  5 fields  m h dom mon dow      on the minute, e.g. \"*/5 * * * *\"
  6 fields  s m h dom mon dow    seconds first, e.g. \"*/10 * * * * *\"
  @yearly @annually @monthly @weekly @daily @midnight @hourly
  @every DURATION                fixed interval counted from the Unix epoch (aligned to 00:00
                                 UTC when it divides a day), e.g. \"@every 90s\", \"@every 1h30m\"
Fields take *, N, A-B, */S, A-B/S, N/S and comma lists; months JAN-DEC; days of the
week 0-7 (0 and 7 are Sunday) or SUN-SAT. When both day-of-month and day-of-week are
restricted, a day matching either fires. 7 fields (with a year) are not accepted.";

/// `--help` text for a time zone argument.
pub const TIMEZONE_HELP: &str = "\
An IANA time zone name such as Europe/Paris or America/New_York (default UTC). Times
are computed in the zone: a fixed time skipped when clocks go forward fires when they
jump; a fixed time repeated when they go back fires once.";

/// `--help` text for an overlap policy argument.
pub const OVERLAP_HELP: &str = "\
What to do when the schedule fires while the previous run is still going:
  skip   drop the fire (default)
  queue  start it when the running one ends; at most one waits
  allow  start it anyway";

/// `--help` text for a jitter argument.
pub const JITTER_HELP: &str = "\
Delay each fire by a random time between 0 and this duration (e.g. 30s), to spread
many hosts' jobs; the run's scheduled time stays the cron time.";

/// The longest jitter accepted.
pub const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("cron schedule {expr:?}: {field} field {text:?}: {reason}")]
    Field {
        expr: String,
        field: &'static str,
        text: String,
        reason: String,
    },
    #[error(
        "cron schedule {expr:?} has {count} fields{}: write 5 (`m h dom mon dow`) or 6 with seconds first (`s m h dom mon dow`)",
        year_note(.count)
    )]
    FieldCount { expr: String, count: usize },
    #[error("cron schedule {expr:?}: {reason}")]
    Invalid { expr: String, reason: String },
    #[error(
        "time zone {name:?} is not an IANA time zone name (like UTC or Europe/Paris){suggestion}"
    )]
    Timezone { name: String, suggestion: String },
    #[error("jitter {0}")]
    Jitter(String),
}

fn year_note(count: &usize) -> &'static str {
    if *count == 7 {
        " (a year field is not supported)"
    } else {
        ""
    }
}

/// A cron trigger as written in a plugin manifest (`[[trigger.cron]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CronTriggerConfig {
    /// The schedule; see [`SCHEDULE_HELP`].
    pub schedule: String,
    /// IANA time zone the schedule is read in. Default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// What to do when the schedule fires while a run is still going. Default `skip`.
    #[serde(default)]
    pub overlap: OverlapPolicy,
    /// Delay each fire by a random time up to this (e.g. `"30s"`). Default none.
    #[serde(default, with = "units::serde_duration::option")]
    pub jitter: Option<Duration>,
    /// Fire once when the trigger is installed or the engine starts. Default false.
    #[serde(default)]
    pub run_on_start: bool,
}

/// A validated cron trigger.
#[derive(Debug, Clone)]
pub struct CronTrigger {
    schedule: Schedule,
    timezone: Tz,
    overlap: OverlapPolicy,
    jitter: Duration,
    jitter_seed: Option<u64>,
    run_on_start: bool,
}

impl CronTrigger {
    /// A trigger on `schedule` in UTC with the defaults (skip, no jitter).
    pub fn new(schedule: &str) -> Result<CronTrigger, CronError> {
        Ok(CronTrigger {
            schedule: Schedule::parse(schedule)?,
            timezone: Tz::UTC,
            overlap: OverlapPolicy::default(),
            jitter: Duration::ZERO,
            jitter_seed: None,
            run_on_start: false,
        })
    }

    pub fn from_config(config: &CronTriggerConfig) -> Result<CronTrigger, CronError> {
        let mut t = CronTrigger::new(&config.schedule)?
            .with_overlap(config.overlap)
            .with_run_on_start(config.run_on_start);
        if let Some(name) = &config.timezone {
            t = t.with_timezone(parse_timezone(name)?);
        }
        if let Some(j) = config.jitter {
            t = t.with_jitter(j)?;
        }
        Ok(t)
    }

    pub fn with_timezone(mut self, tz: Tz) -> Self {
        self.timezone = tz;
        self
    }

    pub fn with_overlap(mut self, overlap: OverlapPolicy) -> Self {
        self.overlap = overlap;
        self
    }

    pub fn with_run_on_start(mut self, yes: bool) -> Self {
        self.run_on_start = yes;
        self
    }

    pub fn with_jitter(mut self, max: Duration) -> Result<Self, CronError> {
        if max > MAX_JITTER {
            return Err(CronError::Jitter(format!(
                "{} is longer than the maximum of {}",
                units::format_duration(max),
                units::format_duration(MAX_JITTER)
            )));
        }
        self.jitter = max;
        Ok(self)
    }

    /// Makes the jitter sequence reproducible (tests, benchmarks).
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    pub fn overlap(&self) -> OverlapPolicy {
        self.overlap
    }

    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    pub fn run_on_start(&self) -> bool {
        self.run_on_start
    }

    /// A jitter source for this trigger: seeded if asked, random otherwise.
    pub fn jitter_source(&self) -> Jitter {
        let seed = self.jitter_seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            crate::vault::crypto::random_fill(&mut b);
            u64::from_le_bytes(b)
        });
        Jitter::new(self.jitter, seed)
    }

    /// The next fire time strictly after `after` (without jitter).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.next_after(self.timezone, after)
    }

    /// The next `n` fire times after `after` (without jitter), for
    /// `capstan plugin schedule NAME`.
    pub fn next_fire_times(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Uniform random delays in `0..=max` at millisecond resolution (SplitMix64: fast,
/// reproducible from a seed; not for secrets).
#[derive(Debug, Clone)]
pub struct Jitter {
    max_ms: u64,
    state: u64,
}

impl Jitter {
    pub fn new(max: Duration, seed: u64) -> Jitter {
        Jitter {
            max_ms: max.as_millis().min(u64::MAX as u128) as u64,
            state: seed,
        }
    }

    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }

    /// The delay for the next fire.
    pub fn next_delay(&mut self) -> Duration {
        if self.max_ms == 0 {
            return Duration::ZERO;
        }
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The modulo bias is below 2^-40 for any jitter up to a day.
        Duration::from_millis(z % (self.max_ms + 1))
    }
}

/// Reads an IANA time zone name; a near miss is refused with a suggestion.
pub fn parse_timezone(name: &str) -> Result<Tz, CronError> {
    if let Ok(tz) = name.parse::<Tz>() {
        return Ok(tz);
    }
    let suggestion = suggest_timezone(name)
        .map(|s| format!("; did you mean {s:?}?"))
        .unwrap_or_default();
    Err(CronError::Timezone {
        name: name.to_string(),
        suggestion,
    })
}

fn suggest_timezone(name: &str) -> Option<&'static str> {
    let wanted = name.trim().to_ascii_lowercase().replace(' ', "_");
    let names = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
    // Same name in another case, or a city given without its region.
    if let Some(n) = names.clone().find(|n| {
        let lower = n.to_ascii_lowercase();
        lower == wanted || lower.rsplit('/').next() == Some(wanted.as_str())
    }) {
        return Some(n);
    }
    names
        .map(|n| (edit_distance(&n.to_ascii_lowercase(), &wanted), n))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_manifest_trigger_reads_from_toml_with_defaults() {
        let c: CronTriggerConfig = toml::from_str("schedule = \"*/5 * * * *\"").unwrap();
        assert_eq!(c.overlap, OverlapPolicy::Skip);
        assert_eq!(c.timezone, None);
        assert!(!c.run_on_start);
        let t = CronTrigger::from_config(&c).unwrap();
        assert_eq!(t.timezone(), Tz::UTC);
        assert_eq!(t.jitter(), Duration::ZERO);

        let c: CronTriggerConfig = toml::from_str(
            "schedule = \"0 9 * * MON-FRI\"\ntimezone = \"Europe/Paris\"\n\
             overlap = \"queue\"\njitter = \"30s\"\nrun_on_start = true\n",
        )
        .unwrap();
        let t = CronTrigger::from_config(&c).unwrap();
        assert_eq!(t.timezone(), chrono_tz::Europe::Paris);
        assert_eq!(t.overlap(), OverlapPolicy::Queue);
        assert_eq!(t.jitter(), Duration::from_secs(30));
        assert!(t.run_on_start());
    }

    #[test]
    fn unknown_keys_and_bad_values_in_a_manifest_trigger_are_errors() {
        let e = toml::from_str::<CronTriggerConfig>("schedule = \"* * * * *\"\nzone = \"UTC\"")
            .unwrap_err();
        assert!(e.to_string().contains("zone"), "{e}");
        let e =
            toml::from_str::<CronTriggerConfig>("schedule = \"* * * * *\"\noverlap = \"parallel\"")
                .unwrap_err();
        assert!(e.to_string().contains("parallel"), "{e}");
        let e = toml::from_str::<CronTriggerConfig>("schedule = \"* * * * *\"\njitter = \"30\"")
            .unwrap_err();
        assert!(e.to_string().contains("no unit"), "{e}");
        let c: CronTriggerConfig =
            toml::from_str("schedule = \"* * * * *\"\njitter = \"2d\"").unwrap();
        let e = CronTrigger::from_config(&c).unwrap_err();
        assert!(
            e.to_string().contains("longer than the maximum of 1d"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_time_zone_is_refused_with_a_suggestion() {
        assert_eq!(
            parse_timezone("Asia/Tokyo").unwrap(),
            chrono_tz::Asia::Tokyo
        );
        let cases = [
            ("europe/paris", "Europe/Paris"),
            ("Paris", "Europe/Paris"),
            ("America/New_Yrok", "America/New_York"),
            ("new york", "America/New_York"),
        ];
        for (given, suggested) in cases {
            let e = parse_timezone(given).unwrap_err().to_string();
            assert!(
                e.contains(&format!("did you mean {suggested:?}")),
                "{given}: {e}"
            );
        }
        let e = parse_timezone("Mars/Olympus_Mons").unwrap_err().to_string();
        assert!(e.contains("not an IANA time zone name"), "{e}");
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn next_fire_times_lists_the_coming_times_in_order() {
        let t = CronTrigger::new("0 9 * * *")
            .unwrap()
            .with_timezone(chrono_tz::Asia::Tokyo);
        let times = t.next_fire_times(utc("2026-05-01T12:00:00Z"), 3);
        assert_eq!(
            times,
            [
                utc("2026-05-02T00:00:00Z"),
                utc("2026-05-03T00:00:00Z"),
                utc("2026-05-04T00:00:00Z")
            ]
        );
        assert!(t.next_fire_times(utc("2026-05-01T12:00:00Z"), 0).is_empty());
    }

    #[test]
    fn seeded_jitter_is_reproducible_and_stays_within_its_bound() {
        let max = Duration::from_millis(1500);
        let mut a = Jitter::new(max, 42);
        let mut b = Jitter::new(max, 42);
        let xs: Vec<_> = (0..1000).map(|_| a.next_delay()).collect();
        let ys: Vec<_> = (0..1000).map(|_| b.next_delay()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|d| *d <= max));
        assert!(xs.iter().any(|d| *d < Duration::from_millis(300)));
        assert!(xs.iter().any(|d| *d > Duration::from_millis(1200)));
        let mut other = Jitter::new(max, 43);
        assert_ne!(
            (0..10).map(|_| other.next_delay()).collect::<Vec<_>>(),
            xs[..10]
        );
        assert_eq!(Jitter::new(Duration::ZERO, 1).next_delay(), Duration::ZERO);
    }

    #[test]
    fn the_help_text_names_both_field_layouts_and_every_macro() {
        for needle in [
            "m h dom mon dow",
            "s m h dom mon dow",
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
            "@every",
            "7 fields",
        ] {
            assert!(SCHEDULE_HELP.contains(needle), "{needle}");
        }
    }
}
