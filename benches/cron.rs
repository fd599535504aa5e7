//! How late cron fires start when a thousand, then ten thousand triggers fire every
//! second.
//!
//! Run with `cargo bench --bench cron` (about two minutes). For each size in
//! `CAPSTAN_BENCH_TRIGGERS` (one count or a comma list; default `1000,10000`), the
//! engine's [`CronScheduler`] fires that many triggers on `* * * * * *` for
//! `CAPSTAN_BENCH_SECONDS` (default 30, per size); lateness is the time from a fire's
//! cron second to its callback starting. The baseline is the obvious alternative, one
//! tokio task per trigger sleeping to the next second, measured in the same run for half
//! as long. The two alternate in rounds of 10 s so that both see the same machine noise.
//!
//! Printed per size and variant: lateness percentiles over all fires; the median over
//! seconds of the *last* fire's lateness (how long a full second's batch takes); how
//! many seconds had a fire more than 10 ms late; missed fires; CPU use (from /proc,
//! 10 ms ticks, so only a rough figure). Then the lateness ratios per size, repeated
//! together at the end.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use capstan::trigger::cron::{CronScheduler, CronTrigger, TriggerId};

const ROUND_SECONDS: u64 = 10;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process so far, from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// (cron second, lateness in µs) for each fire in the measured window.
type Samples = Arc<Mutex<Vec<(i64, i64)>>>;

fn record(samples: &Samples, scheduled: DateTime<Utc>, from: i64, until: i64) {
    let s = scheduled.timestamp();
    if s >= from && s < until {
        let late = (Utc::now() - scheduled)
            .num_microseconds()
            .unwrap_or(i64::MAX);
        samples.lock().unwrap().push((s, late));
    }
}

#[derive(Default)]
struct Outcome {
    lateness_us: Vec<i64>,
    worst_per_second_us: Vec<i64>,
    expected: usize,
    seconds: u64,
    cpu: Duration,
}

impl Outcome {
    fn add(&mut self, samples: Samples, triggers: usize, seconds: u64, cpu: Duration) {
        let samples = std::mem::take(&mut *samples.lock().unwrap());
        let mut worst: BTreeMap<i64, i64> = BTreeMap::new();
        for (second, late) in samples {
            self.lateness_us.push(late);
            let w = worst.entry(second).or_default();
            *w = (*w).max(late);
        }
        self.worst_per_second_us.extend(worst.values());
        self.expected += triggers * seconds as usize;
        self.seconds += seconds;
        self.cpu += cpu;
    }

    fn sort(&mut self) {
        assert!(!self.lateness_us.is_empty(), "nothing fired");
        self.lateness_us.sort_unstable();
        self.worst_per_second_us.sort_unstable();
    }

    /// Lateness at per-mille `pm` (500 = median), in milliseconds.
    fn at(&self, pm: usize) -> f64 {
        let v = &self.lateness_us;
        v[(v.len() * pm / 1000).min(v.len() - 1)] as f64 / 1000.0
    }

    fn worst_second_median(&self) -> f64 {
        let v = &self.worst_per_second_us;
        v[v.len() / 2] as f64 / 1000.0
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<28} {:>7.2} {:>7.2} {:>8.2} {:>7.2} {:>13.2} {:>7}/{:<3} {:>6} {:>6.2}%",
            self.at(500),
            self.at(990),
            self.at(999),
            *self.lateness_us.last().unwrap() as f64 / 1000.0,
            self.worst_second_median(),
            self.worst_per_second_us
                .iter()
                .filter(|w| **w > 10_000)
                .count(),
            self.seconds,
            self.expected.saturating_sub(self.lateness_us.len()),
            self.cpu.as_secs_f64() * 100.0 / self.seconds as f64,
        );
    }
}

async fn sleep_until_second(second: i64) {
    let at = DateTime::from_timestamp(second, 0).unwrap();
    if let Ok(d) = (at - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

/// The window to measure: whole seconds, after a second of warm-up.
fn window(seconds: u64) -> (i64, i64) {
    let from = Utc::now().timestamp() + 2;
    (from, from + seconds as i64)
}

async fn with_scheduler(triggers: usize, seconds: u64, out: &mut Outcome) {
    let sched = CronScheduler::new();
    for i in 0..triggers {
        sched.add(
            TriggerId::new(&format!("plugin-{i}"), 0),
            CronTrigger::new("* * * * * *").unwrap(),
        );
    }
    let (from, until) = window(seconds);
    let samples: Samples = Arc::default();
    let s = samples.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let sched = sched.clone();
        tokio::spawn(async move {
            sched
                .run(
                    move |_id, fire| {
                        record(&s, fire.scheduled_at, from, until);
                        async {}
                    },
                    async {
                        let _ = stopped.await;
                    },
                    Duration::from_secs(1),
                )
                .await
        })
    };
    sleep_until_second(from).await;
    let cpu0 = cpu_time();
    sleep_until_second(until).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    runner.await.unwrap();
    out.add(samples, triggers, seconds, cpu);
}

async fn with_a_task_per_trigger(triggers: usize, seconds: u64, out: &mut Outcome) {
    let (from, until) = window(seconds);
    let samples: Samples = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..triggers {
        let s = samples.clone();
        tasks.spawn(async move {
            loop {
                let now = Utc::now();
                let next = DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap();
                if next.timestamp() >= until {
                    break;
                }
                let wait = (next - now).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                // Each fire runs on its own task, as the scheduler's do.
                let s = s.clone();
                tokio::spawn(async move { record(&s, next, from, until) });
            }
        });
    }
    sleep_until_second(from).await;
    let cpu0 = cpu_time();
    sleep_until_second(until).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(300)).await;
    out.add(samples, triggers, seconds, cpu);
}

/// `CAPSTAN_BENCH_TRIGGERS`: one count or a comma list; default 1000 and 10000.
fn trigger_counts() -> Vec<usize> {
    let list = std::env::var("CAPSTAN_BENCH_TRIGGERS").unwrap_or_default();
    let counts: Vec<usize> = list
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    if counts.is_empty() {
        vec![1_000, 10_000]
    } else {
        counts
    }
}

fn main() {
    let seconds = env_or("CAPSTAN_BENCH_SECONDS", 30).max(2);
    let sizes = trigger_counts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    println!(
        "cron lateness on `* * * * * *`: {sizes:?} triggers, per size the scheduler {seconds}s and the baseline {}s in alternating rounds (2 worker threads)",
        seconds.div_ceil(2)
    );
    let mut summary = Vec::new();
    for triggers in sizes {
        let (mut ours, mut base) = (Outcome::default(), Outcome::default());
        rt.block_on(async {
            let mut left = seconds;
            while left > 0 {
                let round = left.min(ROUND_SECONDS);
                with_scheduler(triggers, round, &mut ours).await;
                with_a_task_per_trigger(triggers, round.div_ceil(2), &mut base).await;
                left -= round;
            }
        });
        ours.sort();
        base.sort();
        println!();
        println!(
            "{:<28} {:>7} {:>7} {:>8} {:>7} {:>13} {:>11} {:>6} {:>7}",
            format!("{triggers} triggers (ms)"),
            "p50",
            "p99",
            "p99.9",
            "max",
            "last/s p50",
            ">10ms s",
            "missed",
            "cpu"
        );
        ours.print("scheduler (one timer)");
        base.print("baseline (task per trigger)");
        let line = format!(
            "{triggers} triggers: scheduler p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; ratio scheduler/baseline: p50 {:.2}x, p99 {:.2}x, last-fire-per-second {:.2}x",
            ours.at(500),
            ours.at(990),
            *ours.lateness_us.last().unwrap() as f64 / 1000.0,
            ours.at(500) / base.at(500).max(0.001),
            ours.at(990) / base.at(990).max(0.001),
            ours.worst_second_median() / base.worst_second_median().max(0.001),
        );
        println!("{line}");
        summary.push(line);
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    println!("({:.0}s total)", started.elapsed().as_secs_f64());
}
