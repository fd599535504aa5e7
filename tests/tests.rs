//! Integration tests: one binary, one module per area. They run the real `capstan`
//! binary against the real dockerd, sshd and TLS endpoint that `scripts/testinfra` starts.

// The tests set up environments for the processes they start, and build databases as
// crashes and older versions left them.
#![allow(clippy::disallowed_methods)]

mod util;

mod api;
mod browser;
mod cli_device;
mod cli_plugin;
mod cli_policy;
mod cli_vault;
mod cluster;
mod cluster_devices;
mod cluster_faults;
mod cluster_fence;
mod cluster_history;
mod cluster_owner;
mod cluster_replay;
mod cluster_state;
mod container_ops;
mod dashboard;
mod deploy;
mod docker;
mod durability;
mod events;
mod http_probe;
mod limits;
mod notify;
mod outbound;
mod plugin_examples;
mod plugins;
mod proxy;
mod registry;
mod roles;
mod run_triggers;
mod serve;
mod triggers;
mod updates;
