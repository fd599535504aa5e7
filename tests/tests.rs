//! Integration tests: one binary, one module per area. They run the real `capstan`
//! binary against the real dockerd, sshd and TLS endpoint that `scripts/testinfra` starts.

// The tests set up environments for the processes they start, and build databases as
// crashes and older versions left them.
#![allow(clippy::disallowed_methods)]

mod util;

mod api;
mod cli_device;
mod cli_plugin;
mod cli_policy;
mod cli_vault;
mod docker;
mod events;
mod limits;
mod plugin_examples;
mod plugins;
mod proxy;
mod serve;
mod triggers;
