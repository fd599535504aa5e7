//! The smallest useful plugin, for the engine's benchmark: `run` returns at once, or
//! (input `calls:N`) makes N host calls (`host.now`) first.

use capstan_sdk::prelude::*;

struct Trivial;

impl Plugin for Trivial {
    fn run(event: Event) -> Result<Outcome, Error> {
        let input = event.input();
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
