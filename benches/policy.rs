//! How long one policy decision takes, on a realistic mix of Docker API requests.
//!
//! Run with `cargo bench --bench policy`. Prints the median ns per decision over several
//! batches, the throughput, and the ratio to a baseline measured in the same run: the
//! socket proxies' own method (case-insensitive path-prefix checks, no decoding), which is
//! the least any decision can cost.

use std::hint::black_box;
use std::time::Instant;

use capstan::policy::{CompiledPolicy, Policy};

/// A plugin or proxy client that watches and heals containers (Dockman-like, read-only
/// apart from lifecycle toggles).
const POLICY: &str = "\
CONTAINERS=1
IMAGES=1
INFO=1
NETWORKS=1
VOLUMES=1
EVENTS=1
POST=0
ALLOW_START=1
ALLOW_RESTARTS=1
";

/// What such a client sends: `docker ps`, inspect, logs, restarts, pulls, and the odd
/// request that must be refused.
const MIX: &[(&str, &str)] = &[
    ("GET", "/_ping"),
    ("HEAD", "/_ping"),
    ("GET", "/v1.47/version"),
    ("GET", "/v1.47/info"),
    ("GET", "/v1.47/containers/json?all=1"),
    (
        "GET",
        "/v1.47/containers/json?filters=%7B%22label%22%3A%5B%22autoheal%3Dtrue%22%5D%7D",
    ),
    ("GET", "/v1.47/containers/4f1c2d9e8a7b/json"),
    ("GET", "/v1.47/containers/web-1/json?size=false"),
    (
        "GET",
        "/v1.47/containers/web-1/logs?stdout=1&stderr=1&tail=100",
    ),
    ("POST", "/v1.47/containers/web-1/restart?t=10"),
    ("POST", "/v1.47/containers/4f1c2d9e8a7b/start"),
    ("POST", "/containers/web-1/stop"),
    ("GET", "/v1.47/images/json"),
    ("GET", "/v1.47/images/library/busybox:latest/json"),
    ("POST", "/v1.47/images/create?fromImage=busybox&tag=latest"),
    ("DELETE", "/v1.47/containers/web-1?force=1"),
    ("GET", "/v1.47/networks"),
    ("GET", "/v1.47/events?since=1700000000"),
    ("GET", "/v1.47/containersX/json"),
    ("GET", "/version/../containers/json"),
];

/// The proxies' method: decide by case-insensitive prefix on the raw path.
fn prefix_baseline(method: &str, target: &str) -> bool {
    const SECTIONS: &[&str] = &[
        "/containers",
        "/images",
        "/info",
        "/networks",
        "/volumes",
        "/events",
        "/_ping",
        "/version",
    ];
    let path = target.split('?').next().unwrap_or(target);
    let path = match path.strip_prefix("/v") {
        Some(rest) => rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'),
        None => path,
    };
    let write = method != "GET" && method != "HEAD";
    !write
        && SECTIONS.iter().any(|s| {
            path.len() >= s.len() && path.as_bytes()[..s.len()].eq_ignore_ascii_case(s.as_bytes())
        })
}

const WARM_UP: usize = 200_000;
const BATCHES: usize = 11;
const PER_BATCH: usize = 200_000;

/// Median ns per call of `decide` over the mix.
fn measure(mut decide: impl FnMut(&str, &str) -> bool) -> f64 {
    let mut allowed = 0usize;
    for i in 0..WARM_UP {
        let (method, path) = MIX[i % MIX.len()];
        allowed += usize::from(decide(black_box(method), black_box(path)));
    }
    let mut per_call = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = Instant::now();
        for i in 0..PER_BATCH {
            let (method, path) = MIX[i % MIX.len()];
            allowed += usize::from(decide(black_box(method), black_box(path)));
        }
        per_call.push(start.elapsed().as_nanos() as f64 / PER_BATCH as f64);
    }
    black_box(allowed);
    per_call.sort_by(f64::total_cmp);
    per_call[BATCHES / 2]
}

fn main() {
    let policy: CompiledPolicy = Policy::from_env_block(POLICY)
        .expect("the benchmark policy parses")
        .compile();
    let allowed = MIX
        .iter()
        .filter(|(m, p)| policy.decide(m, p).is_allowed())
        .count();
    println!(
        "policy decision: {} requests in the mix, {allowed} allowed; {} decisions after a \
         {WARM_UP}-decision warm-up",
        MIX.len(),
        BATCHES * PER_BATCH
    );

    let capstan = measure(|m, p| policy.decide(m, p).is_allowed());
    let baseline = measure(prefix_baseline);

    println!(
        "capstan decide:        {capstan:8.1} ns/decision (median of {BATCHES} batches), {:.1} M decisions/s",
        1_000.0 / capstan
    );
    println!(
        "proxy prefix baseline: {baseline:8.1} ns/decision (median of {BATCHES} batches), {:.1} M decisions/s",
        1_000.0 / baseline
    );
    println!(
        "ratio capstan / prefix baseline: {:.2}x",
        capstan / baseline
    );
}
