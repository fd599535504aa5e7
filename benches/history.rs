//! Run history at scale: listing and paging a history of 100,000 finished runs.
//!
//! Run with `cargo bench --bench history` (release; a few minutes, most of it filling
//! the store). A scratch data directory gets `CAPSTAN_BENCH_RUNS` (default 100000)
//! finished runs of four plugins, recorded as the engine records them
//! ([`RunStore::create`], `start`, `finish`: two record writes per run) from two threads,
//! each run with two log lines, three host calls and a JSON outcome. Filling stops at
//! `CAPSTAN_BENCH_FILL_SECONDS` (default 300) whatever the count; the count reached and
//! the time it took are printed. Retention is raised out of the way while filling (no
//! cap per plugin, the default 30-day age), as an operator keeping this much history
//! would set it.
//!
//! Then the store is closed and reopened (timed: what `capstan serve` pays at start,
//! [`Store::open`] and [`RunStore::open`], which counts each plugin's runs), and the
//! whole history is paged through once, 1000 at a time (the first read after a cold
//! open). Each listing below is repeated `CAPSTAN_BENCH_REPEATS` (default 100) times:
//! - first page and deep pages (a `before` cursor drawn from the older half of the
//!   history, a different one per repeat), for all plugins and for one plugin, with
//!   pages of 50 (the API's default) and 1000 (its maximum);
//! - `capstan runs --limit 5000`: five pages of 1000, each following the previous
//!   page's `next`, as the CLI reads them; also with each page encoded as the JSON the
//!   API answers.
//!
//! Printed per listing: milliseconds per page (p50, p99), per record (µs), and two
//! baselines measured in the same run: a raw read of the same number of records' bytes
//! from the store's `runs` tree at the same position, newest first, without index or
//! decoding (the floor of any listing over this store), and the same listing on a store
//! holding 1,000 runs of the same shape (how listing scales with the history's size;
//! for first pages, where the small store has as many runs to give). Then where a page
//! of 1000 goes: the listing, the raw read and decoding the same records with
//! `capstan::store::decode`, measured in turn. Then opening the [`RunStore`] over the
//! history (warm, p50 of 5), and two retention passes that each remove about 1% of the
//! history: by count (`keep_per_plugin` just under each plugin's count) and by age
//! (`max_age` placing the cutoff at the 1,000th oldest run), with their time per run
//! removed; and a pass that removes nothing (the hourly steady state).

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;

use capstan::runs::{
    CallDecision, HostCall, LogLevel, LogLine, MAX_PAGE, RunEnd, RunId, RunLogs, RunQuery,
    RunRecord, RunStatus, RunStore, RunStoreConfig, RunTrigger,
};
use capstan::store::Store;

const PLUGINS: [&str; 4] = ["autoheal", "inventory", "redeploy", "crashloop"];
/// The history of the small store, the scaling baseline.
const SMALL_RUNS: usize = 1_000;
/// The plugin the one-plugin listings read.
const ONE: &str = "autoheal";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Retention while filling: no cap per plugin, the default age.
fn fill_config() -> RunStoreConfig {
    RunStoreConfig {
        keep_per_plugin: None,
        ..RunStoreConfig::default()
    }
}

fn trigger_of(plugin: &str, n: usize) -> RunTrigger {
    match plugin {
        "autoheal" | "inventory" => RunTrigger::Cron {
            schedule: "0 * * * * *".into(),
            scheduled_at: Utc::now(),
        },
        "redeploy" => RunTrigger::Webhook {
            hook: "redeploy".into(),
            delivery: Some(format!("6f1c2d4e-{n:08x}-4b1a-9c3e-0d5f7a8b9c0d")),
        },
        _ => RunTrigger::Docker {
            device: "local".into(),
            event: "container:die".into(),
            actor: format!("{n:064x}"),
            count: 1,
        },
    }
}

/// How a typical run ends: two log lines, three host calls, a small outcome; one in
/// twenty fails.
fn end_of(n: usize) -> RunEnd {
    let container = format!("web-{}", n % 37);
    let at = Utc::now();
    let mut logs = RunLogs::default();
    for message in [
        format!("checking 12 containers on device local (pass {n})"),
        format!("{container} unhealthy for 45s; restarting it"),
    ] {
        logs.push(
            LogLine {
                at,
                level: LogLevel::Info,
                message,
            },
            capstan::runs::DEFAULT_LOG_CAP_BYTES,
        );
    }
    let call = |op: &str, request: String, ms: f64| HostCall {
        op: op.into(),
        device: "local".into(),
        request,
        decision: CallDecision::Allow,
        result: "ok".into(),
        ms,
        reason: String::new(),
    };
    let host_calls = vec![
        call("docker.list-containers", "GET /containers/json".into(), 1.7),
        call(
            "docker.inspect-container",
            format!("GET /containers/{container}/json"),
            0.6,
        ),
        call(
            "docker.restart-container",
            format!("POST /containers/{container}/restart"),
            412.3,
        ),
    ];
    let mut end = if n % 20 == 19 {
        RunEnd::error(
            RunStatus::Failed,
            format!("restart-container {container}: the daemon answered 500"),
        )
    } else {
        RunEnd::ok(Some(serde_json::json!({
            "checked": 12,
            "restarted": [container],
        })))
    };
    end.logs = logs;
    end.host_calls = host_calls;
    end
}

/// Records `total` finished runs over [`PLUGINS`] from two threads, stopping at
/// `deadline`. Returns how many were recorded.
fn fill(runs: &RunStore, total: usize, deadline: Instant) -> usize {
    let threads = 2;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut done = 0;
                    for n in (t..total).step_by(threads) {
                        if n % 256 == 0 && Instant::now() >= deadline {
                            break;
                        }
                        let plugin = PLUGINS[n % PLUGINS.len()];
                        let r = runs.create(plugin, trigger_of(plugin, n)).unwrap();
                        runs.start(r.id).unwrap();
                        runs.finish(r.id, end_of(n)).unwrap();
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

/// Milliseconds, sorted.
struct Timings(Vec<f64>);

impl Timings {
    fn of(repeats: usize, mut f: impl FnMut(usize)) -> Timings {
        // One untimed call, so the first repeat does not pay for a cold cache alone.
        f(0);
        let mut v: Vec<f64> = (0..repeats)
            .map(|i| {
                let t = Instant::now();
                f(i);
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_by(f64::total_cmp);
        Timings(v)
    }

    fn at(&self, pm: usize) -> f64 {
        self.0[(self.0.len() * pm / 1000).min(self.0.len() - 1)]
    }

    fn p50(&self) -> f64 {
        self.at(500)
    }

    fn p99(&self) -> f64 {
        self.at(990)
    }
}

/// Pages through a whole listing, 1000 at a time; returns every id, newest first.
fn page_through(runs: &RunStore, plugin: Option<&str>) -> Vec<RunId> {
    let mut ids = Vec::new();
    let mut before = None;
    loop {
        let page = runs
            .list(&RunQuery {
                plugin: plugin.map(str::to_string),
                before,
                limit: MAX_PAGE,
            })
            .unwrap();
        ids.extend(page.runs.iter().map(|r| r.id));
        match page.next {
            Some(next) => before = Some(next),
            None => return ids,
        }
    }
}

/// `capstan runs --limit want`: pages of at most 1000, each after the previous one's
/// `next`. With `answer`, each page is also encoded as the API's JSON answer.
fn newest(runs: &RunStore, plugin: Option<&str>, want: usize, answer: bool) -> usize {
    let mut got = 0;
    let mut before = None;
    while got < want {
        let page = runs
            .list(&RunQuery {
                plugin: plugin.map(str::to_string),
                before,
                limit: (want - got).min(MAX_PAGE),
            })
            .unwrap();
        got += page.runs.len();
        if answer {
            std::hint::black_box(serde_json::to_vec(&page.runs).unwrap());
        }
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    got
}

/// The floor: `n` records' bytes, newest first from `before`, straight from the tree.
fn raw_read(tree: &sled::Tree, before: Option<RunId>, n: usize) -> usize {
    let iter = match before {
        Some(b) => tree.range(..&b.as_bytes()[..]),
        None => tree.iter(),
    };
    iter.values().rev().take(n).map(|v| v.unwrap().len()).sum()
}

/// Cursors from the older half of `ids` (newest first) that leave at least `page` runs
/// after them where the history is long enough, in a fixed pseudo-random order.
fn deep_cursors(ids: &[RunId], page: usize, count: usize) -> Vec<RunId> {
    let hi = ids.len().saturating_sub(page + 1).max(1);
    let lo = (ids.len() / 2).min(hi - 1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count.max(1))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ids[(lo + (x as usize) % (hi - lo)).min(ids.len() - 1)]
        })
        .collect()
}

struct Row {
    name: String,
    ours: Timings,
    per_page: usize,
    raw: Timings,
    small: Option<Timings>,
}

impl Row {
    fn print(&self) {
        let small = match &self.small {
            Some(s) => format!("{:>9.3} {:>7.2}x", s.p50(), self.ours.p50() / s.p50()),
            None => format!("{:>9} {:>8}", "-", "-"),
        };
        println!(
            "{:<40} {:>8.3} {:>8.3} {:>7.2} {:>8.3} {:>7.1}x {small}",
            self.name,
            self.ours.p50(),
            self.ours.p99(),
            self.ours.p50() * 1000.0 / self.per_page.max(1) as f64,
            self.raw.p50(),
            self.ours.p50() / self.raw.p50(),
        );
    }
}

fn open(dir: &Path, config: RunStoreConfig) -> (Store, RunStore) {
    let store = Store::open(dir).expect("open the scratch data directory");
    let runs = RunStore::open(&store, config).expect("open the run history");
    (store, runs)
}

fn main() {
    let total = env_or("CAPSTAN_BENCH_RUNS", 100_000) as usize;
    let fill_seconds = env_or("CAPSTAN_BENCH_FILL_SECONDS", 300);
    let repeats = env_or("CAPSTAN_BENCH_REPEATS", 100).max(1) as usize;
    let started = Instant::now();
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let (big_dir, small_dir) = (scratch.path().join("big"), scratch.path().join("small"));

    println!(
        "run history: {total} finished runs of {} plugins (2 log lines, 3 host calls each), listings repeated {repeats}x",
        PLUGINS.len()
    );
    let deadline = Instant::now() + Duration::from_secs(fill_seconds);
    let (store, runs) = open(&big_dir, fill_config());
    let t = Instant::now();
    let filled = fill(&runs, total, deadline);
    runs.flush().unwrap();
    let fill_time = t.elapsed();
    println!(
        "filled {filled} runs in {:.1}s ({:.0} runs/s, a record written twice each){}",
        fill_time.as_secs_f64(),
        filled as f64 / fill_time.as_secs_f64(),
        if filled < total {
            format!("; stopped at CAPSTAN_BENCH_FILL_SECONDS={fill_seconds}, {total} not reached")
        } else {
            String::new()
        }
    );
    drop(runs);
    drop(store);

    let (small_store, small_runs) = open(&small_dir, fill_config());
    fill(
        &small_runs,
        SMALL_RUNS,
        Instant::now() + Duration::from_secs(60),
    );
    small_runs.flush().unwrap();

    // What `capstan serve` pays at start: the database, then the history's counts.
    let t = Instant::now();
    let store = Store::open(&big_dir).expect("reopen the data directory");
    let store_open = t.elapsed();
    let t = Instant::now();
    let runs = RunStore::open(&store, fill_config()).unwrap();
    let runs_open = t.elapsed();
    println!(
        "cold open: Store::open {:.1} ms, RunStore::open {:.1} ms (counts {:?})",
        store_open.as_secs_f64() * 1000.0,
        runs_open.as_secs_f64() * 1000.0,
        PLUGINS.map(|p| runs.count(p)),
    );
    let tree = store.tree("runs").unwrap();
    let record_bytes: usize = tree.iter().values().map(|v| v.unwrap().len()).sum();
    println!(
        "records: {} bytes on average in the runs tree",
        record_bytes / filled.max(1)
    );

    let t = Instant::now();
    let all_ids = page_through(&runs, None);
    let whole = t.elapsed();
    println!(
        "the whole history paged through once after the cold open, 1000 a page: {} runs in {:.0} ms ({:.2} ms per page)",
        all_ids.len(),
        whole.as_secs_f64() * 1000.0,
        whole.as_secs_f64() * 1000.0 / all_ids.len().div_ceil(MAX_PAGE).max(1) as f64,
    );
    assert_eq!(all_ids.len(), filled, "the listing misses runs");
    let one_ids = page_through(&runs, Some(ONE));
    assert_eq!(
        one_ids.len(),
        runs.count(ONE),
        "the plugin listing misses runs"
    );

    let small_tree = small_store.tree("runs").unwrap();
    println!();
    println!(
        "{:<40} {:>8} {:>8} {:>7} {:>8} {:>8} {:>9} {:>8}",
        "listing (ms per page)", "p50", "p99", "µs/run", "raw p50", "x raw", "1k-store", "x 1k"
    );
    let mut rows = Vec::new();
    for page in [50, MAX_PAGE] {
        for (plugin, ids) in [(None, &all_ids), (Some(ONE), &one_ids)] {
            let who = plugin.map_or("all plugins".to_string(), |p| format!("plugin {p}"));
            let query = |before| RunQuery {
                plugin: plugin.map(str::to_string),
                before,
                limit: page,
            };
            // First page.
            let ours = Timings::of(repeats, |_| {
                let p = runs.list(&query(None)).unwrap();
                assert_eq!(p.runs.len(), page.min(ids.len()));
            });
            let raw = Timings::of(repeats, |_| {
                std::hint::black_box(raw_read(&tree, None, page));
            });
            // Only where the small store has a full page to give.
            let small_has = match plugin {
                Some(_) => SMALL_RUNS / PLUGINS.len(),
                None => SMALL_RUNS,
            };
            let small = (page <= small_has).then(|| {
                Timings::of(repeats, |_| {
                    let p = small_runs.list(&query(None)).unwrap();
                    assert_eq!(p.runs.len(), page);
                })
            });
            rows.push(Row {
                name: format!("first page of {page}, {who}"),
                ours,
                per_page: page,
                raw,
                small,
            });
            rows.last().unwrap().print();
            // Deep pages.
            let cursors = deep_cursors(ids, page, repeats);
            let ours = Timings::of(repeats, |i| {
                let p = runs.list(&query(Some(cursors[i % cursors.len()]))).unwrap();
                assert!(p.runs.len() == page || ids.len() <= 2 * page + 1);
            });
            let all_cursors = deep_cursors(&all_ids, page, repeats);
            let raw = Timings::of(repeats, |i| {
                std::hint::black_box(raw_read(
                    &tree,
                    Some(all_cursors[i % all_cursors.len()]),
                    page,
                ));
            });
            rows.push(Row {
                name: format!("deep page of {page}, {who}"),
                ours,
                per_page: page,
                raw,
                small: None,
            });
            rows.last().unwrap().print();
        }
    }
    for (answer, name) in [
        (false, "runs --limit 5000"),
        (true, "runs --limit 5000 + JSON"),
    ] {
        let want = 5_000.min(filled);
        let ours = Timings::of(repeats.div_ceil(5), |_| {
            assert_eq!(newest(&runs, None, want, answer), want);
        });
        let raw = Timings::of(repeats.div_ceil(5), |_| {
            std::hint::black_box(raw_read(&tree, None, want));
        });
        // Per page: the five pages' total over five.
        let pages = want.div_ceil(MAX_PAGE) as f64;
        let row = Row {
            name: format!("{name}, per page"),
            ours: Timings(ours.0.iter().map(|t| t / pages).collect()),
            per_page: MAX_PAGE,
            raw: Timings(raw.0.iter().map(|t| t / pages).collect()),
            small: None,
        };
        row.print();
    }
    drop(small_tree);

    // Where a page of 1000 goes: decoding the same records from their stored bytes.
    let newest: Vec<(sled::IVec, sled::IVec)> = tree
        .iter()
        .rev()
        .take(MAX_PAGE)
        .map(|kv| kv.unwrap())
        .collect();
    let decodes = newest
        .iter()
        .all(|(k, v)| capstan::store::decode::<RunRecord>(k, v).is_ok());
    if decodes {
        // The three in turn, so that they see the same machine.
        let (mut list, mut raw, mut decode) = (Vec::new(), Vec::new(), Vec::new());
        let query = RunQuery {
            limit: MAX_PAGE,
            ..RunQuery::default()
        };
        for _ in 0..=repeats {
            let t = Instant::now();
            std::hint::black_box(runs.list(&query).unwrap());
            list.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            std::hint::black_box(raw_read(&tree, None, MAX_PAGE));
            raw.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            for (k, v) in &newest {
                std::hint::black_box(capstan::store::decode::<RunRecord>(k, v).unwrap());
            }
            decode.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let [list, raw, decode] = [list, raw, decode].map(|mut v| {
            v.remove(0);
            v.sort_by(f64::total_cmp);
            Timings(v)
        });
        println!(
            "first page of 1000, all plugins: {:.3} ms p50, of which reading the bytes {:.3} ms and decoding the records (capstan::store::decode) {:.3} ms ({:.0}%)",
            list.p50(),
            raw.p50(),
            decode.p50(),
            decode.p50() * 100.0 / list.p50(),
        );
    } else {
        println!(
            "(the stored records are not what capstan::store::decode reads: no decode figure)"
        );
    }

    println!();
    let reopen = Timings::of(5, |_| {
        std::hint::black_box(RunStore::open(&store, fill_config()).unwrap());
    });
    let small_reopen = Timings::of(5, |_| {
        std::hint::black_box(RunStore::open(&small_store, fill_config()).unwrap());
    });
    println!(
        "RunStore::open over {filled} runs (warm): {:.1} ms p50 ({:.3} ms over {SMALL_RUNS} runs, {:.0}x for {:.0}x the runs)",
        reopen.p50(),
        small_reopen.p50(),
        reopen.p50() / small_reopen.p50(),
        filled as f64 / SMALL_RUNS as f64,
    );

    // Retention. A pass that removes nothing: what the hourly pass costs most hours.
    let t = Instant::now();
    let none = runs.apply_retention().unwrap();
    println!(
        "retention pass removing nothing: {:.3} ms ({none:?})",
        t.elapsed().as_secs_f64() * 1000.0
    );
    // By count: each plugin keeps all but its oldest 1% or so.
    let counts: HashMap<&str, usize> = PLUGINS.iter().map(|p| (*p, runs.count(p))).collect();
    let min_count = counts.values().copied().min().unwrap_or(0);
    let keep = min_count - min_count / 100;
    let by_count = RunStore::open(
        &store,
        RunStoreConfig {
            keep_per_plugin: Some(keep),
            ..RunStoreConfig::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    let removed = by_count.apply_retention().unwrap();
    let took = t.elapsed();
    println!(
        "retention pass by count (keep {keep} per plugin): removed {} in {:.1} ms ({:.1} µs per run removed)",
        removed.removed_over_count,
        took.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1e6 / removed.removed_over_count.max(1) as f64,
    );
    drop(by_count);
    // By age: the cutoff at the 1000th oldest run left.
    let left = page_through(&runs, None);
    let nth_oldest = left[left.len().saturating_sub(1_000.min(left.len()))];
    let max_age = Duration::from_secs(30 * 24 * 3600);
    let now = nth_oldest.created_at() + chrono::Duration::from_std(max_age).unwrap();
    let by_age = RunStore::open(
        &store,
        RunStoreConfig {
            keep_per_plugin: None,
            max_age: Some(max_age),
            ..RunStoreConfig::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    let removed = by_age.apply_retention_at(now).unwrap();
    let took = t.elapsed();
    println!(
        "retention pass by age (the oldest ~1000): removed {} in {:.1} ms ({:.1} µs per run removed)",
        removed.removed_over_age,
        took.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1e6 / removed.removed_over_age.max(1) as f64,
    );

    let worst_page = rows.iter().map(|r| r.ours.p99()).fold(0.0, f64::max);
    println!();
    println!(
        "worst p99 per page: {worst_page:.2} ms; first page of 50 vs 1k-store: {}   ({:.0}s total)",
        rows.iter()
            .filter_map(|r| r.small.as_ref().map(|s| format!(
                "{:.2}x ({})",
                r.ours.p50() / s.p50(),
                r.name
            )))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
}
