//! Capstan: a WebAssembly-extensible automation engine for Docker hosts.
//!
//! The modules mirror the flow of a request through the engine: configuration and the
//! command line resolve into settings ([`config`], [`cli`]); the [`store`] holds every
//! record and the [`vault`] every secret; [`device`] describes the Docker hosts and
//! [`docker`] connects to them (SSH, TLS, local socket), pooled and checked; the
//! [`api`] serves it all over HTTP behind bearer tokens ([`token`]). The [`policy`] engine
//! decides every Docker API request, [`proxy`] serves the Docker API behind it, and
//! [`plugin`] runs sandboxed WebAssembly plugins under it.
//! [`trigger`] decides when plugins run (cron schedules, verified webhook deliveries) and
//! [`runs`] records every run. Every listener (API, webhooks, proxies) is served by
//! [`server`], which bounds what a client can hold open; [`web`] is the dashboard served
//! beside the API. [`app`] builds it all into the process `capstan serve` runs.

pub mod api;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod device;
pub mod docker;
pub mod engine;
pub mod metrics;
pub mod notify;
pub mod plugin;
/// The policy engine, a crate of its own (`crates/capstan-policy`).
pub use capstan_policy as policy;
pub mod proxy;
pub mod runs;
pub mod scheduler;
pub mod secret;
pub mod server;
pub mod store;
pub mod token;
pub mod trigger;
pub mod vault;
pub mod web;

/// A duration in milliseconds to the microsecond, as reports and records give times
/// (`0.347`, not `0.34724099999999997`).
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    #[test]
    fn millis_keep_microseconds() {
        use std::time::Duration;
        assert_eq!(super::millis(Duration::from_nanos(347_241)), 0.347);
        assert_eq!(super::millis(Duration::from_micros(14_488)), 14.488);
        assert_eq!(super::millis(Duration::from_secs(2)), 2000.0);
    }
}
