//! A plugin for the engine's run-outcome trigger tests: a manual run with input
//! `fail:MESSAGE` fails with that message (any other input succeeds), and a run started
//! by another run's end returns that run as it got it (`run_id`, `plugin`, `status`,
//! `outcome`, `depth` in the outcome's details), or fails saying so when its config has
//! `fail_on_run = true`, to make chains.

use capstan_sdk::prelude::*;
use serde_json::json;

struct Relay;

impl Plugin for Relay {
    fn run(event: Event) -> Result<Outcome, Error> {
        match event {
            Event::Run(r) => {
                let seen = format!(
                    "saw {} end {} at depth {}: {}",
                    r.plugin, r.status, r.depth, r.outcome
                );
                if config::get_or("fail_on_run", false) {
                    return Err(Error::failed(seen));
                }
                Ok(Outcome::new(seen).with_details(&json!({
                    "run_id": r.run_id,
                    "plugin": r.plugin,
                    "status": r.status,
                    "outcome": r.outcome,
                    "depth": r.depth,
                })))
            }
            other => match other.input().strip_prefix("fail:") {
                Some(message) => Err(Error::failed(message)),
                None => Ok(Outcome::new("ok")),
            },
        }
    }
}

capstan_sdk::export_plugin!(Relay);
