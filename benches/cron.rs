//! How late cron fires start when a thousand triggers fire every second.
//!
//! Run with `cargo bench --bench cron`. For `CAPSTAN_BENCH_SECONDS` (default 60) the
//! engine's [`CronScheduler`] fires `CAPSTAN_BENCH_TRIGGERS` (default 1000) triggers on
//! `* * * * * *`; lateness is the time from a fire's cron second to its callback
//! starting. The baseline, measured in the same run for a third of that period, is the
//! obvious alternative: one tokio task per trigger sleeping to the next second. Prints
//! p50/p99/max lateness, missed fires and CPU time for both, and the ratios.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use capstan::trigger::cron::{CronScheduler, CronTrigger, TriggerId};

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

struct Outcome {
    lateness_us: Vec<i64>,
    expected: usize,
    cpu: Duration,
}

impl Outcome {
    /// Lateness at per-mille `pm` (500 = median), in milliseconds.
    fn at(&self, pm: usize) -> f64 {
        let v = &self.lateness_us;
        v[(v.len() * pm / 1000).min(v.len() - 1)] as f64 / 1000.0
    }

    fn max(&self) -> f64 {
        *self.lateness_us.last().unwrap() as f64 / 1000.0
    }

    fn print(&self, name: &str, seconds: u64) {
        println!(
            "{name:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>10.1}%",
            self.at(500),
            self.at(990),
            self.at(999),
            self.max(),
            self.expected.saturating_sub(self.lateness_us.len()),
            self.cpu.as_secs_f64() * 100.0 / seconds as f64,
        );
    }
}

/// Lateness samples for fires scheduled in `[from, until)`.
type Samples = Arc<Mutex<Vec<i64>>>;

fn record(samples: &Samples, scheduled: DateTime<Utc>, from: i64, until: i64) {
    let s = scheduled.timestamp();
    if s >= from && s < until {
        let late = (Utc::now() - scheduled)
            .num_microseconds()
            .unwrap_or(i64::MAX);
        samples.lock().unwrap().push(late);
    }
}

async fn with_scheduler(triggers: usize, seconds: u64) -> Outcome {
    let sched = CronScheduler::new();
    for i in 0..triggers {
        sched.add(
            TriggerId::new(&format!("plugin-{i}"), 0),
            CronTrigger::new("* * * * * *").unwrap(),
        );
    }
    // Measure whole seconds, after one second of warm-up.
    let from = Utc::now().timestamp() + 2;
    let until = from + seconds as i64;
    let samples: Samples = Arc::default();
    let s = samples.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cpu0 = cpu_time();
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
    sleep_until_second(until).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    runner.await.unwrap();
    let cpu = cpu_time().saturating_sub(cpu0);
    finish(samples, triggers * seconds as usize, cpu)
}

async fn with_a_task_per_trigger(triggers: usize, seconds: u64) -> Outcome {
    let from = Utc::now().timestamp() + 2;
    let until = from + seconds as i64;
    let samples: Samples = Arc::default();
    let cpu0 = cpu_time();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..triggers {
        let s = samples.clone();
        tasks.spawn(async move {
            loop {
                let now = Utc::now();
                let next = DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap();
                if next.timestamp() > until {
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
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    finish(samples, triggers * seconds as usize, cpu)
}

async fn sleep_until_second(second: i64) {
    let at = DateTime::from_timestamp(second, 0).unwrap();
    if let Ok(d) = (at - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

fn finish(samples: Samples, expected: usize, cpu: Duration) -> Outcome {
    let mut lateness_us = std::mem::take(&mut *samples.lock().unwrap());
    lateness_us.sort_unstable();
    assert!(!lateness_us.is_empty(), "nothing fired");
    Outcome {
        lateness_us,
        expected,
        cpu,
    }
}

fn main() {
    let seconds = env_or("CAPSTAN_BENCH_SECONDS", 60).max(3);
    let baseline_seconds = (seconds / 3).max(3);
    let triggers = env_or("CAPSTAN_BENCH_TRIGGERS", 1000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    println!(
        "cron lateness: {triggers} triggers on `* * * * * *`, scheduler {seconds}s, baseline {baseline_seconds}s (2 worker threads)"
    );
    let ours = rt.block_on(with_scheduler(triggers, seconds));
    let base = rt.block_on(with_a_task_per_trigger(triggers, baseline_seconds));
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11}",
        "", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "missed", "cpu"
    );
    ours.print("scheduler (one heap)", seconds);
    base.print("baseline (task per trigger)", baseline_seconds);
    println!(
        "ratio scheduler/baseline: p50 {:.2}x, p99 {:.2}x, cpu {:.2}x   ({:.0}s total)",
        ours.at(500) / base.at(500).max(0.001),
        ours.at(990) / base.at(990).max(0.001),
        (ours.cpu.as_secs_f64() / seconds as f64)
            / (base.cpu.as_secs_f64() / baseline_seconds as f64).max(1e-9),
        started.elapsed().as_secs_f64()
    );
}
