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
//! [`runs`] records every run.

pub mod api;
pub mod cli;
pub mod config;
pub mod device;
pub mod docker;
pub mod engine;
pub mod metrics;
pub mod plugin;
pub mod policy;
pub mod proxy;
pub mod runs;
pub mod scheduler;
pub mod secret;
pub mod store;
pub mod token;
pub mod trigger;
pub mod vault;
