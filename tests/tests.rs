//! Integration tests: one binary, one module per area. They run the real `capstan`
//! binary against the real dockerd, sshd and TLS endpoint that `scripts/testinfra` starts.

mod util;

mod api;
mod cli_device;
mod cli_plugin;
mod cli_policy;
mod cli_vault;
mod docker;
mod limits;
mod plugin_examples;
mod plugins;
mod proxy;
mod serve;
mod triggers;
