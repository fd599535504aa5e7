//! Write Capstan plugins in plain Rust.
//!
//! A plugin implements [`Plugin`] (one function, `run`) and exports it with
//! [`export_plugin!`]; everything else is ordinary Rust calling the functions in
//! [`docker`], [`log`], [`config`], [`state`] and [`time`]:
//!
//! ```ignore
//! use capstan_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn run(event: Event) -> Result<Outcome, Error> {
//!         let mut names = Vec::new();
//!         for device in docker::list_devices() {
//!             let running = docker::list_containers(&device.name, &ContainerFilter::running())?;
//!             log::info(&format!("{}: {} running", device.name, running.len()));
//!             names.push(device.name);
//!         }
//!         Ok(Outcome::new(format!("looked at {}", names.join(", "))))
//!     }
//! }
//!
//! capstan_sdk::export_plugin!(Hello);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the plugin. Every Docker call is checked against
//! the policy in the plugin's `plugin.toml`; a refusal is `Err(Error::Denied(reason))`,
//! which a plugin handles like any other error.

/// The generated bindings of the `capstan:plugin@0.2.0` world (`wit/` in the Capstan
/// repository).
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "capstan:plugin/plugin@0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_capstan_plugin",
        default_bindings_module: "capstan_sdk::bindings",
    });
}

pub use bindings::capstan::plugin::types::{DockerError, Error, Timestamp};
pub use bindings::{
    CronEvent, DockerEvent, Event, Guest as Plugin, ManualEvent, Outcome, RunEvent, WebhookEvent,
};

/// Exports a type implementing [`Plugin`] as the component's `run`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ident) => {
        $crate::bindings::__export_capstan_plugin!($plugin with_types_in $crate::bindings);
    };
}

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::docker::{self, ContainerFilter, ContainerSummary, LogOptions, RecreateOptions};
    pub use crate::notify::{self, Notification, Priority, Sent};
    pub use crate::{Error, Event, Outcome, Plugin, config, log, state, time};
}

/// Docker on the devices in the plugin's scope: every function of the WIT `docker`
/// interface, plus constructors for its option records.
pub mod docker {
    pub use crate::bindings::capstan::plugin::docker::*;

    impl ContainerFilter {
        /// Running containers, no other condition.
        pub fn running() -> ContainerFilter {
            ContainerFilter {
                all: false,
                labels: Vec::new(),
                names: Vec::new(),
                status: Vec::new(),
                health: Vec::new(),
            }
        }

        /// Every container, stopped ones too.
        pub fn all() -> ContainerFilter {
            ContainerFilter {
                all: true,
                ..ContainerFilter::running()
            }
        }

        /// Also requires the label selector (`key` or `key=value`).
        pub fn label(mut self, selector: impl Into<String>) -> ContainerFilter {
            self.labels.push(selector.into());
            self
        }

        /// Also requires a name matching one of the globs given this way.
        pub fn name(mut self, glob: impl Into<String>) -> ContainerFilter {
            self.names.push(glob.into());
            self
        }

        /// Also requires one of the states given this way (`running`, `exited`, …).
        pub fn status(mut self, state: impl Into<String>) -> ContainerFilter {
            self.status.push(state.into());
            self
        }

        /// Also requires one of the health states given this way (`unhealthy`, …).
        pub fn health(mut self, health: impl Into<String>) -> ContainerFilter {
            self.health.push(health.into());
            self
        }
    }

    impl LogOptions {
        /// The last `n` lines of stdout and stderr.
        pub fn tail(n: u32) -> LogOptions {
            LogOptions {
                stdout: true,
                stderr: true,
                tail: Some(n),
                since: None,
                timestamps: false,
            }
        }
    }

    impl RecreateOptions {
        /// Pull the container's image anew, then re-create it from it.
        pub fn pull() -> RecreateOptions {
            RecreateOptions {
                image: None,
                pull: true,
                stop_timeout_secs: None,
            }
        }

        /// Re-create from the image as it is on the device now.
        pub fn local() -> RecreateOptions {
            RecreateOptions {
                image: None,
                pull: false,
                stop_timeout_secs: None,
            }
        }
    }

    impl ExecOptions {
        /// Runs `cmd` with the container's defaults and a 30 s timeout.
        pub fn cmd<S: Into<String>>(cmd: impl IntoIterator<Item = S>) -> ExecOptions {
            ExecOptions {
                cmd: cmd.into_iter().map(Into::into).collect(),
                env: Vec::new(),
                user: None,
                working_dir: None,
                timeout_secs: None,
            }
        }
    }
}

/// Structured log records, kept in the run's report.
pub mod log {
    use crate::bindings::capstan::plugin::host::{self, Level};

    /// A record with fields (`&[("container", "web")]`).
    pub fn with(level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        host::log(level, message, &fields);
    }

    pub fn debug(message: &str) {
        host::log(Level::Debug, message, &[]);
    }

    pub fn info(message: &str) {
        host::log(Level::Info, message, &[]);
    }

    pub fn warn(message: &str) {
        host::log(Level::Warn, message, &[]);
    }

    pub fn error(message: &str) {
        host::log(Level::Error, message, &[]);
    }

    pub use crate::bindings::capstan::plugin::host::Level as LogLevel;
}

/// The manifest's `[config]` values.
pub mod config {
    use crate::bindings::capstan::plugin::host;

    /// The value of `key` as text, if set.
    pub fn get(key: &str) -> Option<String> {
        host::config_get(key)
    }

    /// The value of `key` parsed as `T`, or `default` when unset or unparsable.
    pub fn get_or<T: std::str::FromStr>(key: &str, default: T) -> T {
        get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    /// Every key and value.
    pub fn all() -> Vec<(String, String)> {
        host::config_all()
    }
}

/// The plugin's persistent key-value state (kept across runs and restarts).
pub mod state {
    use crate::Error;
    use crate::bindings::capstan::plugin::host;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::state_get(key)
    }

    pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
        host::state_set(key, value)
    }

    pub fn delete(key: &str) {
        host::state_delete(key)
    }

    /// Keys starting with `prefix`, in byte order.
    pub fn keys(prefix: &str) -> Vec<String> {
        host::state_keys(prefix)
    }

    /// The value under `key` read as JSON; `None` when missing or unreadable.
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Stores `value` as JSON.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Failed(e.to_string()))?;
        set(key, &bytes)
    }
}

/// Messages for people, through the notifier channels the operator configured
/// (`capstan notifier add`) and the manifest's `[notify] channels` allows.
pub mod notify {
    pub use crate::bindings::capstan::plugin::host::{Notification, Priority, Sent};
    use crate::Error;

    /// Sends `notification` to `channel`. `Ok(Sent::Queued)` once the engine has it (it
    /// delivers with retries); `Duplicate` and `RateLimited` say it was not sent.
    pub fn send(channel: &str, notification: &Notification) -> Result<Sent, Error> {
        crate::bindings::capstan::plugin::host::notify(channel, notification)
    }

    impl Notification {
        /// A notification of normal priority, without tags or dedup key.
        pub fn new(title: impl Into<String>, message: impl Into<String>) -> Notification {
            Notification {
                title: title.into(),
                message: message.into(),
                priority: Priority::Normal,
                tags: Vec::new(),
                dedup_key: None,
            }
        }

        pub fn priority(mut self, priority: Priority) -> Notification {
            self.priority = priority;
            self
        }

        /// Adds a tag.
        pub fn tag(mut self, tag: impl Into<String>) -> Notification {
            self.tags.push(tag.into());
            self
        }

        /// Notifications with the same key on the same channel within the engine's
        /// dedup window are sent once.
        pub fn dedup_key(mut self, key: impl Into<String>) -> Notification {
            self.dedup_key = Some(key.into());
            self
        }
    }
}

/// The time.
pub mod time {
    use crate::Timestamp;

    /// Now, in milliseconds since the Unix epoch.
    pub fn now() -> Timestamp {
        crate::bindings::capstan::plugin::host::now()
    }
}

impl Outcome {
    /// An outcome with a summary and no details.
    pub fn new(summary: impl Into<String>) -> Outcome {
        Outcome {
            summary: summary.into(),
            details: String::new(),
        }
    }

    /// Adds details as JSON.
    pub fn with_details<T: serde::Serialize>(mut self, details: &T) -> Outcome {
        self.details = serde_json::to_string(details).unwrap_or_default();
        self
    }
}

impl Error {
    /// A failure of the plugin's own.
    pub fn failed(message: impl Into<String>) -> Error {
        Error::Failed(message.into())
    }

    /// One line saying what went wrong.
    pub fn message(&self) -> String {
        match self {
            Error::Denied(m) => format!("denied: {m}"),
            Error::NotFound(m) => format!("not found: {m}"),
            Error::Unreachable(m) => format!("unreachable: {m}"),
            Error::Docker(d) => format!("docker answered {}: {}", d.status, d.message),
            Error::Invalid(m) => format!("invalid: {m}"),
            Error::Timeout(m) => format!("timeout: {m}"),
            Error::Failed(m) => format!("failed: {m}"),
        }
    }

    /// Whether the policy refused the call.
    pub fn is_denied(&self) -> bool {
        matches!(self, Error::Denied(_))
    }
}

impl Event {
    /// The event's text input: the manual input, or the webhook body as UTF-8 (empty
    /// for the other kinds).
    pub fn input(&self) -> String {
        match self {
            Event::Manual(m) => m.input.clone(),
            Event::Webhook(w) => String::from_utf8_lossy(&w.body).into_owned(),
            Event::Cron(_) | Event::Docker(_) | Event::Run(_) => String::new(),
        }
    }
}
