//! Prometheus metrics (placeholder interface; the exposition lands with the API work).

use std::time::Duration;

/// The engine's counters.
#[derive(Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {}
    }

    pub fn run_finished(&self, _plugin: &str, _status: &str, _duration: Duration) {}

    pub fn host_call(&self, _op: &str, _decision: &str) {}

    pub fn webhook_delivery(&self, _hook: &str, _result: &str) {}

    pub fn render(&self, _pool: &crate::docker::Pool) -> String {
        String::new()
    }
}
