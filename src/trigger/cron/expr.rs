//! Cron expressions: parsed and checked here, field by field, then handed to the `cron`
//! crate in a normalised form it cannot misread.
//!
//! Why not pass the text straight through: the `cron` crate numbers days of the week
//! 1–7 from Sunday (Quartz style), so `0 9 * * 1` would fire on Sundays, and it always
//! ANDs day-of-month with day-of-week. Crontab users expect 0–7 with 0 and 7 for Sunday,
//! and Vixie cron's OR rule. So every field is parsed here into the set of values it
//! matches (with an error that names the field and says what is wrong), then written out
//! as an explicit list (day names for the day of week); the crate only enumerates
//! matching wall-clock times.
//!
//! Time zones: the crate enumerates *wall-clock* times (it is run in UTC as a stand-in
//! for "naive local time"); this module maps each onto the trigger's zone:
//! - a time that does not exist (the hour skipped when clocks go forward) fires at the
//!   first instant after the gap, once, for a schedule with fixed hours (`30 2 * * *`
//!   runs at 03:00 that day); a schedule that fires every hour (`*` in the hour field)
//!   simply has no fires in the gap — its cadence follows real time;
//! - a time that occurs twice (clocks going back) fires once, at its first occurrence,
//!   for fixed hours; every-hour schedules fire in both occurrences.
//!
//! This is what Vixie cron does for "fixed-time" and "wildcard" jobs.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use super::CronError;

/// A parsed schedule: a cron expression, a macro, or `@every <duration>`.
#[derive(Clone, Debug)]
pub struct Schedule {
    source: Arc<str>,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Cron {
        /// One expression, or two whose union is the schedule (day-of-month OR
        /// day-of-week).
        exprs: Vec<::cron::Schedule>,
        /// The hour field matches every hour: DST gaps and repeats follow real time.
        every_hour: bool,
        /// Seconds given explicitly (6 fields).
        seconds: bool,
    },
    Every(u64),
}

/// Upper bound on wall-clock candidates examined for one next-time query: enough to
/// cross a whole skipped day at one-second resolution.
const MAX_CANDIDATES: usize = 200_000;

const MACROS: &[(&str, &str)] = &[
    ("@yearly", "0 0 0 1 1 *"),
    ("@annually", "0 0 0 1 1 *"),
    ("@monthly", "0 0 0 1 * *"),
    ("@weekly", "0 0 0 * * 0"),
    ("@daily", "0 0 0 * * *"),
    ("@midnight", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    /// Inclusive bounds as written (day of week 0–7, both ends Sunday).
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Second | Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    fn describe_bounds(self) -> String {
        let (lo, hi) = self.bounds();
        match self {
            Field::Month => format!("{lo}-{hi} or JAN-DEC"),
            Field::DayOfWeek => format!("{lo}-{hi} (0 and 7 are Sunday) or SUN-SAT"),
            _ => format!("{lo}-{hi}"),
        }
    }

    fn value(self, token: &str) -> Result<u32, String> {
        if token.bytes().all(|b| b.is_ascii_digit()) && !token.is_empty() {
            let v: u32 = token
                .parse()
                .map_err(|_| format!("{token} is out of range {}", self.describe_bounds()))?;
            let (lo, hi) = self.bounds();
            if v < lo || v > hi {
                return Err(format!("{v} is out of range {}", self.describe_bounds()));
            }
            return Ok(v);
        }
        let upper = token.to_ascii_uppercase();
        let names: &[&str] = match self {
            Field::Month => &MONTH_NAMES,
            Field::DayOfWeek => &DAY_NAMES,
            _ => {
                return Err(format!(
                    "{token:?} is not a number (expected {})",
                    self.describe_bounds()
                ));
            }
        };
        match names.iter().position(|n| *n == upper) {
            Some(i) if self == Field::Month => Ok(i as u32 + 1),
            Some(i) => Ok(i as u32),
            None => Err(format!(
                "{token:?} is not a {} (expected {})",
                if self == Field::Month {
                    "month name"
                } else {
                    "day name"
                },
                self.describe_bounds()
            )),
        }
    }
}

/// The values one field matches, and whether it was written as a wildcard (`*…`, `?`),
/// which decides the day-of-month/day-of-week rule.
struct ParsedField {
    values: BTreeSet<u32>,
    wildcard: bool,
}

fn parse_field(field: Field, text: &str) -> Result<ParsedField, String> {
    let (lo, hi) = field.bounds();
    let mut values = BTreeSet::new();
    for element in text.split(',') {
        if element.is_empty() {
            return Err("empty element in a comma list".into());
        }
        let (base, step) = match element.split_once('/') {
            Some((b, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("step {s:?} is not a number"))?;
                if step == 0 {
                    return Err("a step must be at least 1".into());
                }
                let span = if field == Field::DayOfWeek {
                    7
                } else {
                    hi - lo + 1
                };
                if step >= span {
                    return Err(format!(
                        "step {step} is not smaller than the field's span ({span} values): \
                         for intervals longer than a {} use @every",
                        field.label()
                    ));
                }
                (b, step)
            }
            None => (element, 1),
        };
        let (start, end) = if base == "*" || base == "?" {
            if base == "?" && !matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
                return Err("? is only allowed in the day-of-month and day-of-week fields".into());
            }
            let hi = if field == Field::DayOfWeek { 6 } else { hi };
            (lo, hi)
        } else if let Some((a, b)) = base.split_once('-') {
            let (a, b) = (field.value(a)?, field.value(b)?);
            if a > b {
                return Err(format!(
                    "range {base} runs backwards; ranges do not wrap around, write it as two: \
                     e.g. {b}-{hi},{lo}-{a}"
                ));
            }
            (a, b)
        } else {
            let v = field.value(base)?;
            if element.contains('/') {
                // `A/S`: from A to the end of the range, every S.
                let hi = if field == Field::DayOfWeek { 6 } else { hi };
                (v, hi.max(v))
            } else {
                (v, v)
            }
        };
        for v in (start..=end).step_by(step as usize) {
            values.insert(if field == Field::DayOfWeek && v == 7 {
                0
            } else {
                v
            });
        }
    }
    let wildcard = text.starts_with('*') || text == "?";
    Ok(ParsedField { values, wildcard })
}

/// The normalised text of a field for the `cron` crate.
fn render(field: Field, values: &BTreeSet<u32>) -> String {
    let (lo, hi) = field.bounds();
    let full = match field {
        Field::DayOfWeek => values.len() == 7,
        _ => values.len() as u32 == hi - lo + 1,
    };
    if full {
        return "*".into();
    }
    let parts: Vec<String> = values
        .iter()
        .map(|&v| {
            if field == Field::DayOfWeek {
                DAY_NAMES[v as usize].to_string()
            } else {
                v.to_string()
            }
        })
        .collect();
    parts.join(",")
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, CronError> {
        let source = text.trim().to_string();
        let invalid = |reason: String| CronError::Invalid {
            expr: source.clone(),
            reason,
        };
        if let Some(rest) = source.strip_prefix("@every") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(invalid("@every needs a duration, e.g. @every 90s".into()));
            }
            let d = super::super::units::parse_duration(rest).map_err(invalid)?;
            return Self::every(&source, d).map_err(invalid);
        }
        let expanded = if source.starts_with('@') {
            if source == "@reboot" {
                return Err(invalid(
                    "@reboot is not a schedule; set run_on_start = true on the trigger".into(),
                ));
            }
            match MACROS.iter().find(|(name, _)| *name == source) {
                Some((_, fields)) => fields.to_string(),
                None => {
                    return Err(invalid(format!(
                        "unknown macro; use one of {}, or @every <duration>",
                        MACROS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" ")
                    )));
                }
            }
        } else {
            source.clone()
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (seconds, fields) = match fields.len() {
            5 => (false, [&["0"][..], &fields[..]].concat()),
            6 => (true, fields),
            n => {
                return Err(CronError::FieldCount {
                    expr: source,
                    count: n,
                });
            }
        };
        let order = [
            Field::Second,
            Field::Minute,
            Field::Hour,
            Field::DayOfMonth,
            Field::Month,
            Field::DayOfWeek,
        ];
        let mut parsed = Vec::with_capacity(6);
        for (field, text) in order.iter().zip(&fields) {
            let p = parse_field(*field, text).map_err(|reason| CronError::Field {
                expr: source.clone(),
                field: field.label(),
                text: text.to_string(),
                reason,
            })?;
            parsed.push(p);
        }
        let rendered: Vec<String> = order
            .iter()
            .zip(&parsed)
            .map(|(f, p)| render(*f, &p.values))
            .collect();
        let every_hour = rendered[2] == "*";
        let (dom, dow) = (&parsed[3], &parsed[5]);
        let variants: Vec<(String, String)> = if !dom.wildcard && !dow.wildcard {
            // Vixie rule: both restricted, a day matching either fires.
            vec![
                (rendered[3].clone(), "*".into()),
                ("*".into(), rendered[5].clone()),
            ]
        } else {
            vec![(rendered[3].clone(), rendered[5].clone())]
        };
        let mut exprs = Vec::with_capacity(2);
        for (dom, dow) in variants {
            let normalised = format!(
                "{} {} {} {dom} {} {dow}",
                rendered[0], rendered[1], rendered[2], rendered[4]
            );
            let expr = ::cron::Schedule::from_str(&normalised)
                .map_err(|e| invalid(format!("rejected by the cron engine: {e}")))?;
            exprs.push(expr);
        }
        let schedule = Schedule {
            source: Arc::from(source.as_str()),
            kind: Kind::Cron {
                exprs,
                every_hour,
                seconds,
            },
        };
        if schedule.next_naive(epoch_naive()).is_none() {
            return Err(invalid(
                "never fires: no date matches the day-of-month and month fields together".into(),
            ));
        }
        Ok(schedule)
    }

    fn every(source: &str, d: Duration) -> Result<Schedule, String> {
        if d.subsec_millis() != 0 {
            return Err("@every takes whole seconds".into());
        }
        if d.as_secs() == 0 {
            return Err("@every needs an interval of at least 1s".into());
        }
        Ok(Schedule {
            source: Arc::from(source),
            kind: Kind::Every(d.as_secs()),
        })
    }

    /// The schedule as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The schedule as written, shared (a cheap key for identical schedules).
    pub fn source(&self) -> &Arc<str> {
        &self.source
    }

    /// Whether the schedule is written with seconds (6 fields or `@every`).
    pub fn has_seconds(&self) -> bool {
        match self.kind {
            Kind::Cron { seconds, .. } => seconds,
            Kind::Every(_) => true,
        }
    }

    /// `@every`'s interval, if this is one.
    pub fn interval(&self) -> Option<Duration> {
        match self.kind {
            Kind::Every(s) => Some(Duration::from_secs(s)),
            Kind::Cron { .. } => None,
        }
    }

    /// The first wall-clock time strictly after `after` that the fields match.
    fn next_naive(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let Kind::Cron { exprs, .. } = &self.kind else {
            return None;
        };
        let start = Utc.from_utc_datetime(&after);
        exprs
            .iter()
            .filter_map(|e| e.after(&start).next())
            .min()
            .map(|t| t.naive_utc())
    }

    /// The first fire time strictly after `after`, computed in `tz`. `None` if the
    /// schedule never fires again (a year past the cron engine's range).
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let every_hour = match &self.kind {
            Kind::Every(secs) => {
                let secs = *secs as i64;
                let next = (after.timestamp().div_euclid(secs) + 1) * secs;
                return DateTime::from_timestamp(next, 0);
            }
            Kind::Cron { every_hour, .. } => *every_hour,
        };
        let local = after.with_timezone(&tz);
        let naive = local.naive_local();
        // Inside the first pass of a repeated hour, the second pass of earlier wall
        // times is still ahead: start looking that much earlier.
        let mut cursor = match tz.from_local_datetime(&naive) {
            LocalResult::Ambiguous(first, second) if first == local => {
                naive - (second.naive_utc() - first.naive_utc())
            }
            _ => naive,
        };
        // Fire instants taken in the first pass of each wall time grow with the wall
        // time; second passes (every-hour schedules only) interleave with them, so the
        // earliest second pass seen before the first qualifying first pass competes.
        let mut second_pass: Option<DateTime<Tz>> = None;
        for _ in 0..MAX_CANDIDATES {
            let candidate = self.next_naive(cursor)?;
            cursor = candidate;
            let primary = match tz.from_local_datetime(&candidate) {
                LocalResult::Single(t) => Some(t),
                LocalResult::Ambiguous(first, second) => {
                    if every_hour && second.with_timezone(&Utc) > after {
                        second_pass = Some(second_pass.map_or(second, |s| s.min(second)));
                    }
                    Some(first)
                }
                LocalResult::None if every_hour => None,
                LocalResult::None => Some(gap_end(tz, candidate)),
            };
            if let Some(p) = primary
                && p.with_timezone(&Utc) > after
            {
                let best = second_pass.map_or(p, |s| s.min(p));
                return Some(best.with_timezone(&Utc));
            }
        }
        second_pass.map(|s| s.with_timezone(&Utc))
    }
}

fn epoch_naive() -> NaiveDateTime {
    DateTime::<Utc>::UNIX_EPOCH.naive_utc()
}

/// The first instant after a skipped wall-clock time: the moment the clocks jumped.
fn gap_end(tz: Tz, skipped: NaiveDateTime) -> DateTime<Tz> {
    // Offsets lie within ±15 h, so the jump is within that window of the wall time read
    // as UTC; find the first second whose wall time is past `skipped`.
    let centre = skipped.and_utc().timestamp();
    let (mut lo, mut hi) = (centre - 15 * 3600, centre + 15 * 3600);
    let wall = |ts: i64| {
        tz.timestamp_opt(ts, 0)
            .single()
            .expect("a UTC timestamp maps to one local time")
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if wall(mid).naive_local() > skipped {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    wall(hi)
}

impl FromStr for Schedule {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Schedule::parse(s)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next_n(expr: &str, tz: Tz, after: &str, n: usize) -> Vec<String> {
        let s = Schedule::parse(expr).unwrap();
        let mut t = utc(after);
        let mut out = Vec::new();
        for _ in 0..n {
            t = s.next_after(tz, t).unwrap();
            out.push(t.with_timezone(&tz).to_rfc3339());
        }
        out
    }

    fn err(expr: &str) -> String {
        Schedule::parse(expr).unwrap_err().to_string()
    }

    #[test]
    fn five_fields_fire_on_the_minute_and_six_fields_take_seconds_first() {
        assert_eq!(
            next_n("*/20 * * * *", Tz::UTC, "2026-03-01T10:05:30Z", 2),
            ["2026-03-01T10:20:00+00:00", "2026-03-01T10:40:00+00:00"]
        );
        assert_eq!(
            next_n("*/20 * * * * *", Tz::UTC, "2026-03-01T10:05:30Z", 2),
            ["2026-03-01T10:05:40+00:00", "2026-03-01T10:06:00+00:00"]
        );
        assert!(!Schedule::parse("* * * * *").unwrap().has_seconds());
        assert!(Schedule::parse("* * * * * *").unwrap().has_seconds());
    }

    #[test]
    fn day_of_week_follows_crontab_numbering_with_sunday_as_zero_or_seven() {
        // 2026-03-02 is a Monday.
        assert_eq!(
            next_n("0 9 * * 1", Tz::UTC, "2026-03-01T00:00:00Z", 1),
            ["2026-03-02T09:00:00+00:00"]
        );
        for sunday in ["0 9 * * 0", "0 9 * * 7", "0 9 * * sun"] {
            assert_eq!(
                next_n(sunday, Tz::UTC, "2026-03-02T00:00:00Z", 1),
                ["2026-03-08T09:00:00+00:00"],
                "{sunday}"
            );
        }
        assert_eq!(
            next_n("0 9 * * 5-7", Tz::UTC, "2026-03-02T00:00:00Z", 3),
            [
                "2026-03-06T09:00:00+00:00",
                "2026-03-07T09:00:00+00:00",
                "2026-03-08T09:00:00+00:00"
            ]
        );
        assert_eq!(
            next_n("0 9 * * MON-FRI/2", Tz::UTC, "2026-03-01T00:00:00Z", 3),
            [
                "2026-03-02T09:00:00+00:00",
                "2026-03-04T09:00:00+00:00",
                "2026-03-06T09:00:00+00:00"
            ]
        );
    }

    #[test]
    fn restricted_day_of_month_and_day_of_week_fire_on_either_as_in_vixie_cron() {
        // The 13th, or any Friday: 2026-03-06 (Fri), 2026-03-13 (Fri and 13th), 03-20.
        assert_eq!(
            next_n("0 0 13 * 5", Tz::UTC, "2026-03-01T00:00:00Z", 3),
            [
                "2026-03-06T00:00:00+00:00",
                "2026-03-13T00:00:00+00:00",
                "2026-03-20T00:00:00+00:00"
            ]
        );
        // A day-of-month starting with `*` keeps the AND: odd days that are Mondays.
        assert_eq!(
            next_n("0 0 */2 * 1", Tz::UTC, "2026-03-01T00:00:00Z", 2),
            ["2026-03-09T00:00:00+00:00", "2026-03-23T00:00:00+00:00"]
        );
    }

    #[test]
    fn macros_and_every_expand_to_the_expected_times() {
        let at = "2026-03-04T05:06:07Z";
        assert_eq!(
            next_n("@hourly", Tz::UTC, at, 1),
            ["2026-03-04T06:00:00+00:00"]
        );
        assert_eq!(
            next_n("@daily", Tz::UTC, at, 1),
            ["2026-03-05T00:00:00+00:00"]
        );
        assert_eq!(
            next_n("@midnight", Tz::UTC, at, 1),
            ["2026-03-05T00:00:00+00:00"]
        );
        assert_eq!(
            next_n("@weekly", Tz::UTC, at, 1),
            ["2026-03-08T00:00:00+00:00"]
        );
        assert_eq!(
            next_n("@monthly", Tz::UTC, at, 1),
            ["2026-04-01T00:00:00+00:00"]
        );
        for y in ["@yearly", "@annually"] {
            assert_eq!(next_n(y, Tz::UTC, at, 1), ["2027-01-01T00:00:00+00:00"]);
        }
        assert_eq!(
            next_n("@every 90s", Tz::UTC, at, 3),
            [
                "2026-03-04T05:07:30+00:00",
                "2026-03-04T05:09:00+00:00",
                "2026-03-04T05:10:30+00:00"
            ]
        );
        assert_eq!(
            Schedule::parse("@every 1h30m").unwrap().interval(),
            Some(Duration::from_secs(5400))
        );
    }

    #[test]
    fn the_wrong_number_of_fields_is_refused_with_the_two_accepted_forms() {
        let e = err("* * * *");
        assert!(e.contains("has 4 fields"), "{e}");
        assert!(
            e.contains("m h dom mon dow") && e.contains("s m h dom mon dow"),
            "{e}"
        );
        let e = err("0 0 12 * * * 2030");
        assert!(e.contains("has 7 fields") && e.contains("year"), "{e}");
    }

    #[test]
    fn an_invalid_field_is_named_with_what_is_wrong_with_it() {
        let cases = [
            ("61 * * * *", "minute field \"61\": 61 is out of range 0-59"),
            ("* 24 * * *", "hour field \"24\": 24 is out of range 0-23"),
            (
                "0 0 0 * *",
                "day-of-month field \"0\": 0 is out of range 1-31",
            ),
            (
                "0 0 * 13 *",
                "month field \"13\": 13 is out of range 1-12 or JAN-DEC",
            ),
            (
                "0 0 * FOO *",
                "month field \"FOO\": \"FOO\" is not a month name",
            ),
            (
                "0 0 * * 8",
                "day-of-week field \"8\": 8 is out of range 0-7",
            ),
            (
                "0 0 * * MONX",
                "day-of-week field \"MONX\": \"MONX\" is not a day name",
            ),
            (
                "*/0 * * * *",
                "minute field \"*/0\": a step must be at least 1",
            ),
            (
                "*/x * * * *",
                "minute field \"*/x\": step \"x\" is not a number",
            ),
            (
                "*/90 * * * *",
                "minute field \"*/90\": step 90 is not smaller",
            ),
            (
                "0 5-3 * * *",
                "hour field \"5-3\": range 5-3 runs backwards",
            ),
            ("0 1,,2 * * *", "hour field \"1,,2\": empty element"),
            ("? * * * *", "minute field \"?\": ? is only allowed"),
            ("a * * * * *", "second field \"a\": \"a\" is not a number"),
        ];
        for (expr, expected) in cases {
            let e = err(expr);
            assert!(e.contains(expected), "{expr}: {e}");
            assert!(e.starts_with(&format!("cron schedule {expr:?}")), "{e}");
        }
    }

    #[test]
    fn unknown_macros_reboot_bad_every_and_impossible_dates_are_refused() {
        assert!(err("@fortnightly").contains("unknown macro"));
        assert!(err("@reboot").contains("run_on_start"));
        assert!(err("@every").contains("needs a duration"));
        assert!(err("@every 0s").contains("at least 1s"));
        assert!(err("@every 1500ms").contains("whole seconds"));
        assert!(err("@every 10").contains("no unit"));
        assert!(err("0 0 30 2 *").contains("never fires"));
    }

    #[test]
    fn a_fixed_time_in_the_skipped_hour_fires_once_when_the_clocks_jump() {
        // New York springs forward on 2026-03-08 at 02:00 EST -> 03:00 EDT.
        let ny = chrono_tz::America::New_York;
        assert_eq!(
            next_n("30 2 * * *", ny, "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
        );
        assert_eq!(
            next_n("*/20 2 * * *", ny, "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"]
        );
    }

    #[test]
    fn an_every_hour_schedule_has_no_fires_in_the_skipped_hour() {
        let ny = chrono_tz::America::New_York;
        assert_eq!(
            next_n("0 * * * *", ny, "2026-03-08T05:30:00Z", 3),
            [
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00"
            ]
        );
    }

    #[test]
    fn a_repeated_wall_time_fires_once_for_fixed_hours_and_twice_for_every_hour() {
        // New York falls back on 2026-11-01 at 02:00 EDT -> 01:00 EST.
        let ny = chrono_tz::America::New_York;
        assert_eq!(
            next_n("30 1 * * *", ny, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
        );
        assert_eq!(
            next_n("*/30 * * * *", ny, "2026-11-01T04:40:00Z", 5),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
        // Asked from late in the first pass, the second pass is still ahead.
        assert_eq!(
            next_n("*/30 * * * *", ny, "2026-11-01T05:45:00Z", 1),
            ["2026-11-01T01:00:00-05:00"]
        );
        // Asked from inside the second pass, a fixed time that already fired waits a day.
        assert_eq!(
            next_n("30 1 * * *", ny, "2026-11-01T06:10:00Z", 1),
            ["2026-11-02T01:30:00-05:00"]
        );
    }

    #[test]
    fn times_are_computed_in_the_zone_not_in_utc() {
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            next_n("0 9 * * *", paris, "2026-07-01T00:00:00Z", 1),
            ["2026-07-01T09:00:00+02:00"]
        );
        assert_eq!(
            next_n("0 9 * * *", paris, "2026-01-01T00:00:00Z", 1),
            ["2026-01-01T09:00:00+01:00"]
        );
    }
}
