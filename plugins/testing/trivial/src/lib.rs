//! The smallest useful plugin, for the engine's benchmarks and tests: `run` returns at
//! once, or (input `calls:N`) makes N host calls (`host.now`) first, or (input
//! `sleep:MS`, or config `sleep_ms` for cron runs) sleeps that long first.

use capstan_sdk::prelude::*;

struct Trivial;

impl Plugin for Trivial {
    fn run(event: Event) -> Result<Outcome, Error> {
        let input = event.input();
        // Only cron runs read the config: a manual or webhook run makes no host call it
        // was not asked for (the benchmarks count them).
        let sleep_ms = match &event {
            Event::Cron(_) => config::get_or("sleep_ms", 0u64),
            _ => input
                .strip_prefix("sleep:")
                .map(|ms| ms.trim().parse().unwrap_or(0))
                .unwrap_or(0),
        };
        if sleep_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(sleep_ms));
            return Ok(Outcome::new(format!("slept {sleep_ms} ms")));
        }
        if let Some(n) = input.strip_prefix("calls:") {
            let n: u64 = n
                .trim()
                .parse()
                .map_err(|_| Error::failed("calls:N needs a number"))?;
            let mut last = 0;
            for _ in 0..n {
                last = time::now();
            }
            return Ok(Outcome::new(format!("{n} calls, last at {last}")));
        }
        Ok(Outcome::new("ok"))
    }
}

capstan_sdk::export_plugin!(Trivial);
