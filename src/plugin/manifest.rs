//! The plugin manifest (`plugin.toml`, beside the `.wasm`): what a plugin is, when it
//! runs, what it may touch, and how much it may use.
//!
//! Validated once, at install, so a mistake fails `capstan plugin install` with an error
//! that names the field, never a cron run at 3 a.m.: unknown keys are errors
//! (`deny_unknown_fields`), cron expressions and time zones are parsed, webhook names
//! checked, limits bounded, and a device named in the policy's scope without a glob must
//! exist.
//!
//! ```toml
//! name = "autoheal"
//! version = "0.1.0"
//! description = "Restarts unhealthy containers that opt in"
//!
//! [[triggers.cron]]
//! schedule = "*/1 * * * *"      # 5 fields (minute first), 6 with seconds first, or @hourly…
//! timezone = "Europe/Berlin"    # optional, default UTC
//! overlap = "skip"              # skip (default) | queue | allow
//! jitter = "10s"                # optional random delay per fire
//! run_on_start = false          # one run when installed / when the engine starts
//!
//! [[triggers.webhook]]          # POST /hooks/heal-now runs the plugin
//! name = "heal-now"
//! auth = "hmac-sha256"          # or "bearer"; the secret lives in the vault
//!
//! [[triggers.docker]]           # a Docker event runs the plugin (policy: EVENTS=1)
//! events = ["container:health_status: unhealthy"]
//! debounce = "5s"               # events per container within 5 s: one run, with a count
//!
//! [[triggers.run]]              # another plugin's run ended: run this one
//! plugins = ["redeploy"]        # names or globs (a glob never matches this plugin)
//! status = ["failed"]           # default: failed, denied, timed-out
//! outcome = "gave up"           # optional: text the outcome must contain
//!
//! [policy]                      # the policy engine's TOML (socket-proxy variables)
//! CONTAINERS = 1
//! ALLOW_RESTARTS = 1
//! devices = ["*"]
//! outbound = ["https://ntfy.sh"] # origins it may reach over HTTP (default: none)
//! [policy.containers]
//! labels = ["capstan.autoheal=true"]
//!
//! [limits]                      # every key optional; engine defaults fill the rest
//! memory_mib = 32
//! timeout_secs = 60
//!
//! [notify]                      # notifier channels (`capstan notifier add`)
//! channels = ["ops"]            # host.notify may send to these
//! on = ["failed", "timed-out"]  # and a run that ends so notifies them, no code needed
//!
//! [config]                      # free-form values the plugin reads with config-get
//! max_attempts = 5
//!
//! [secrets.ntfy]                # `{{secret.ntfy}}` in a URL or header, for these only
//! origins = ["https://ntfy.sh"] # (the value: `capstan plugin secret set autoheal ntfy`)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::trigger::cron::CronTriggerConfig;
use crate::trigger::docker::DockerTriggerConfig;
use crate::trigger::webhook::HookConfig;

/// The manifest's file name beside the `.wasm`.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// A plugin's manifest as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name: lower-case letters, digits, `-` and `_`, starting with a letter,
    /// at most 64 characters. Installing a plugin under a name already installed
    /// replaces it.
    pub name: String,
    /// Its version (free text, semantic versioning recommended).
    pub version: String,
    /// One line saying what it does.
    #[serde(default)]
    pub description: String,
    /// When it runs besides by hand.
    #[serde(default)]
    pub triggers: Triggers,
    /// What it may touch: socket-proxy variables plus `devices` and `[containers]`
    /// scopes, and the `outbound` origins it may reach over HTTP. Without one, a plugin
    /// may touch no device and reach no origin.
    #[serde(default)]
    pub policy: Policy,
    /// Resource limits; unset keys take the engine's defaults.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Notifications: the notifier channels `host.notify` may use (`channels`), and the
    /// run statuses that notify them without plugin code (`on`).
    #[serde(default)]
    pub notify: crate::notify::NotifySpec,
    /// Values the plugin reads with `config-get`.
    #[serde(default)]
    pub config: toml::Table,
    /// Secrets the plugin uses without seeing them (`[secrets.slack] origins = [...]`):
    /// it writes `{{secret.slack}}` in a URL or header value and the host puts the value
    /// stored with `capstan plugin secret set` there, only for a request to a bound
    /// origin.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSpec>,
}

/// One `[secrets.NAME]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The origins the secret may be sent to, written as `[policy] outbound` entries
    /// (`https://hooks.slack.com`); a request elsewhere that names the secret is denied.
    pub origins: Vec<String>,
}

/// The longest secret name: `[a-z][a-z0-9_-]{0,63}`, as plugin names.
pub const MAX_SECRET_NAME: usize = 64;

/// The `[triggers]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// Cron schedules (`[[triggers.cron]]`): `schedule`, `timezone`, `overlap`,
    /// `jitter`, `run_on_start`; see [`crate::trigger::cron`].
    #[serde(default)]
    pub cron: Vec<CronTriggerConfig>,
    /// Webhooks (`[[triggers.webhook]]`): a verified `POST /hooks/<name>` runs the
    /// plugin with a `webhook` event; see [`crate::trigger::webhook`].
    #[serde(default)]
    pub webhook: Vec<HookConfig>,
    /// Docker events (`[[triggers.docker]]`): `events`, `devices`, `labels`,
    /// `debounce`; an event on a watched device runs the plugin with a `docker` event;
    /// see [`crate::trigger::docker`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub docker: Vec<DockerTriggerConfig>,
    /// Run-outcome triggers (`[[triggers.run]]`): another plugin's run that ends as
    /// `status` lists (and, with `outcome`, says so) runs the plugin with a `run` event;
    /// see [`crate::trigger::run`].
    #[serde(default)]
    pub run: Vec<crate::trigger::run::RunOutcomeTrigger>,
}

/// The `[limits]` table: each key optional.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Linear memory the plugin may grow to, MiB.
    pub memory_mib: Option<u32>,
    /// Wall-clock time a run may take, seconds (host calls included).
    pub timeout_secs: Option<u32>,
    /// Log records kept per run, bytes: each record's message and fields plus a fixed
    /// overhead per record and per field (so empty records count too); the rest is
    /// dropped and counted.
    pub max_log_bytes: Option<u32>,
    /// Log records kept per run, counted; the rest is dropped and counted.
    pub max_log_records: Option<u32>,
    /// Fields one log record may carry; a record with more ends the run.
    pub max_log_fields: Option<u32>,
    /// Captured stdout and stderr per run, bytes each; the rest is dropped and counted.
    pub max_output_bytes: Option<u32>,
    /// The plugin's persistent state, bytes in total (keys and values).
    pub max_state_bytes: Option<u32>,
    /// Host calls per run.
    pub max_host_calls: Option<u32>,
    /// Memory the engine may hold on a run's behalf, bytes: log records, captured
    /// output, host-call records, the outcome, state values read back. Past it the run
    /// ends. Unset, it is the engine's default or, when larger, what the other limits
    /// need (`max_log_bytes` + 2 × `max_output_bytes` + `max_state_bytes` + 1 MiB).
    pub max_host_bytes: Option<u32>,
    /// Outbound HTTP requests per run (`wasi:http`); past it a request is refused.
    pub max_http_requests: Option<u32>,
    /// How long one outbound HTTP request may take, milliseconds: connecting, the
    /// answer's head, and each wait for more of its body (the run's deadline holds too).
    pub http_timeout_ms: Option<u32>,
    /// The largest outbound HTTP response body a plugin may read, bytes; a longer one
    /// fails with `http-response-body-size`.
    pub max_http_response_bytes: Option<u32>,
}

/// Limits resolved against the engine's defaults.
///
/// A key missing from a stored record (one written before the key existed) reads as the
/// engine's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub memory_mib: u32,
    pub timeout_secs: u32,
    pub max_log_bytes: u32,
    pub max_log_records: u32,
    pub max_log_fields: u32,
    pub max_output_bytes: u32,
    pub max_state_bytes: u32,
    pub max_host_calls: u32,
    pub max_host_bytes: u32,
    pub max_http_requests: u32,
    pub http_timeout_ms: u32,
    pub max_http_response_bytes: u32,
}

/// What `max_host_bytes` must leave besides logs, output and a state value read back.
pub const HOST_BYTES_HEADROOM: u32 = 1024 * 1024;

impl Limits {
    /// The engine-wide defaults.
    pub const DEFAULT: Limits = Limits {
        memory_mib: 64,
        timeout_secs: 60,
        max_log_bytes: 256 * 1024,
        max_log_records: 10_000,
        max_log_fields: 64,
        max_output_bytes: 64 * 1024,
        max_state_bytes: 1024 * 1024,
        max_host_calls: 10_000,
        max_host_bytes: 32 * 1024 * 1024,
        max_http_requests: 100,
        http_timeout_ms: 10_000,
        max_http_response_bytes: 1024 * 1024,
    };

    /// The most a manifest may ask for (the pooling allocator reserves memory slots of
    /// `memory_mib` at most).
    pub const MAX: Limits = Limits {
        memory_mib: 1024,
        timeout_secs: 3600,
        max_log_bytes: 16 * 1024 * 1024,
        max_log_records: 1_000_000,
        max_log_fields: 4096,
        max_output_bytes: 16 * 1024 * 1024,
        max_state_bytes: 64 * 1024 * 1024,
        max_host_calls: 1_000_000,
        max_host_bytes: 1024 * 1024 * 1024,
        max_http_requests: 100_000,
        http_timeout_ms: 3_600_000,
        max_http_response_bytes: 256 * 1024 * 1024,
    };

    /// `spec` over `defaults`. An unset `max_host_bytes` grows to what the other limits
    /// need ([`Limits::host_bytes_needed`]).
    pub fn resolve(spec: &LimitsSpec, defaults: &Limits) -> Limits {
        let mut l = Limits {
            memory_mib: spec.memory_mib.unwrap_or(defaults.memory_mib),
            timeout_secs: spec.timeout_secs.unwrap_or(defaults.timeout_secs),
            max_log_bytes: spec.max_log_bytes.unwrap_or(defaults.max_log_bytes),
            max_log_records: spec.max_log_records.unwrap_or(defaults.max_log_records),
            max_log_fields: spec.max_log_fields.unwrap_or(defaults.max_log_fields),
            max_output_bytes: spec.max_output_bytes.unwrap_or(defaults.max_output_bytes),
            max_state_bytes: spec.max_state_bytes.unwrap_or(defaults.max_state_bytes),
            max_host_calls: spec.max_host_calls.unwrap_or(defaults.max_host_calls),
            max_host_bytes: defaults.max_host_bytes,
            max_http_requests: spec.max_http_requests.unwrap_or(defaults.max_http_requests),
            http_timeout_ms: spec.http_timeout_ms.unwrap_or(defaults.http_timeout_ms),
            max_http_response_bytes: spec
                .max_http_response_bytes
                .unwrap_or(defaults.max_http_response_bytes),
        };
        l.max_host_bytes = spec
            .max_host_bytes
            .unwrap_or_else(|| defaults.max_host_bytes.max(l.host_bytes_needed()));
        l
    }

    /// The least `max_host_bytes` that holds a run's capped logs and output, one state
    /// value read back, and [`HOST_BYTES_HEADROOM`] for host-call records and results.
    pub fn host_bytes_needed(&self) -> u32 {
        let need = u64::from(self.max_log_bytes)
            + 2 * u64::from(self.max_output_bytes)
            + u64::from(self.max_state_bytes)
            + u64::from(HOST_BYTES_HEADROOM);
        need.min(u64::from(u32::MAX)) as u32
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Why a manifest is refused. The message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl Manifest {
    /// Parses a manifest; `file` names it in errors. Syntax only: see
    /// [`Manifest::validate`].
    pub fn parse(text: &str, file: &str) -> Result<Manifest, ManifestError> {
        toml::from_str(text).map_err(|e| ManifestError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Checks every field; `known_devices` are the engine's device names, for the
    /// policy's device scope.
    pub fn validate(&self, file: &str, known_devices: &[String]) -> Result<(), ManifestError> {
        let invalid = |field: &str, message: String| ManifestError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        validate_name(&self.name).map_err(|m| invalid("name", m))?;
        if self.version.trim().is_empty() {
            return Err(invalid("version", "must not be empty".into()));
        }
        if self.description.contains('\n') {
            return Err(invalid("description", "must be one line".into()));
        }
        for kind in crate::trigger::KINDS {
            kind.validate(&self.triggers)
                .map_err(|e| invalid(&e.field, e.message))?;
        }
        for pattern in self.policy.devices().patterns() {
            if !pattern.contains(['*', '?']) && !known_devices.iter().any(|d| d == pattern) {
                let known = if known_devices.is_empty() {
                    "none yet".to_string()
                } else {
                    known_devices.join(", ")
                };
                return Err(invalid(
                    "policy.devices",
                    format!(
                        "no device is named `{pattern}` (known: {known}); add it first with `capstan device add`, or use a glob"
                    ),
                ));
            }
        }
        self.notify
            .validate("notify")
            .map_err(|(field, m)| invalid(&field, m))?;
        let l = &self.limits;
        let bounded = [
            ("limits.memory_mib", l.memory_mib, 1, Limits::MAX.memory_mib),
            (
                "limits.timeout_secs",
                l.timeout_secs,
                1,
                Limits::MAX.timeout_secs,
            ),
            (
                "limits.max_log_bytes",
                l.max_log_bytes,
                0,
                Limits::MAX.max_log_bytes,
            ),
            (
                "limits.max_log_records",
                l.max_log_records,
                0,
                Limits::MAX.max_log_records,
            ),
            (
                "limits.max_log_fields",
                l.max_log_fields,
                0,
                Limits::MAX.max_log_fields,
            ),
            (
                "limits.max_output_bytes",
                l.max_output_bytes,
                0,
                Limits::MAX.max_output_bytes,
            ),
            (
                "limits.max_state_bytes",
                l.max_state_bytes,
                0,
                Limits::MAX.max_state_bytes,
            ),
            (
                "limits.max_host_calls",
                l.max_host_calls,
                0,
                Limits::MAX.max_host_calls,
            ),
            (
                "limits.max_host_bytes",
                l.max_host_bytes,
                HOST_BYTES_HEADROOM,
                Limits::MAX.max_host_bytes,
            ),
            (
                "limits.max_http_requests",
                l.max_http_requests,
                0,
                Limits::MAX.max_http_requests,
            ),
            (
                "limits.http_timeout_ms",
                l.http_timeout_ms,
                1,
                Limits::MAX.http_timeout_ms,
            ),
            (
                "limits.max_http_response_bytes",
                l.max_http_response_bytes,
                0,
                Limits::MAX.max_http_response_bytes,
            ),
        ];
        for (field, value, min, max) in bounded {
            if let Some(v) = value
                && !(min..=max).contains(&v)
            {
                return Err(invalid(field, format!("{v} is outside {min}..={max}")));
            }
        }
        let resolved = Limits::resolve(l, &Limits::DEFAULT);
        if let Some(v) = l.max_host_bytes
            && v < resolved.host_bytes_needed()
        {
            return Err(invalid(
                "limits.max_host_bytes",
                format!(
                    "{v} cannot hold what the other limits allow: max_log_bytes + 2 × max_output_bytes + max_state_bytes + 1 MiB = {}; raise it or leave it unset",
                    resolved.host_bytes_needed()
                ),
            ));
        }
        for (name, spec) in &self.secrets {
            let field = format!("secrets.{name}");
            validate_secret_name(name).map_err(|m| invalid(&field, m))?;
            if spec.origins.is_empty() {
                return Err(invalid(
                    &format!("{field}.origins"),
                    "names no origin: list the origins the secret may be sent to, e.g. [\"https://hooks.slack.com\"]".into(),
                ));
            }
            crate::policy::OutboundList::new(&spec.origins)
                .map_err(|e| invalid(&format!("{field}.origins"), e.to_string()))?;
        }
        Ok(())
    }

    /// Each `[secrets.NAME]` with the origins it is bound to (validated entries; an
    /// entry that does not parse binds nothing — [`Manifest::validate`] refuses it).
    pub fn secret_bindings(&self) -> BTreeMap<String, crate::policy::OutboundList> {
        self.secrets
            .iter()
            .map(|(name, spec)| {
                let list = crate::policy::OutboundList::new(&spec.origins).unwrap_or_default();
                (name.clone(), list)
            })
            .collect()
    }

    /// `[config]` values as `config-get` returns them: strings as they are, other
    /// scalars as TOML writes them, arrays and tables as JSON.
    pub fn config_values(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), render_config_value(v)))
            .collect()
    }
}

fn render_config_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// Plugin names: `[a-z][a-z0-9_-]{0,63}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_lower_name(name, "plugin", 64)
}

/// Secret names: `[a-z][a-z0-9_-]{0,63}`, as plugin names (they appear in
/// `{{secret.NAME}}` and in the vault's record names).
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    validate_lower_name(name, "secret", MAX_SECRET_NAME)
}

/// `[a-z][a-z0-9_-]*` of at most `max` bytes; the error calls it a `what` name.
fn validate_lower_name(name: &str, what: &str, max: usize) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a {what} name: use lower-case letters, digits, `-` and `_`, starting with a letter, at most {max} characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "autoheal"
version = "0.1.0"
description = "Restarts unhealthy containers"

[[triggers.cron]]
schedule = "*/2 * * * *"
timezone = "Europe/Berlin"
overlap = "queue"

[[triggers.webhook]]
name = "heal-now"
auth = "bearer"

[policy]
CONTAINERS = 1
ALLOW_RESTARTS = 1
devices = ["local", "prod-*"]
[policy.containers]
labels = ["capstan.autoheal=true"]

[limits]
memory_mib = 32

[config]
max_attempts = 5
label = "capstan.autoheal"
backoff = [60, 300]
"#;

    fn devices() -> Vec<String> {
        vec!["local".to_string()]
    }

    #[test]
    fn reads_and_validates_a_complete_manifest() {
        let m = Manifest::parse(GOOD, "plugin.toml").unwrap();
        m.validate("plugin.toml", &devices()).unwrap();
        assert_eq!(
            m.triggers.cron[0].overlap,
            crate::trigger::cron::OverlapPolicy::Queue
        );
        assert_eq!(m.triggers.webhook[0].name, "heal-now");
        assert!(m.policy.devices().allows("prod-eu"));
        let limits = Limits::resolve(&m.limits, &Limits::DEFAULT);
        assert_eq!(limits.memory_mib, 32);
        assert_eq!(limits.timeout_secs, Limits::DEFAULT.timeout_secs);
        let config = m.config_values();
        assert_eq!(config["max_attempts"], "5");
        assert_eq!(config["label"], "capstan.autoheal");
        assert_eq!(config["backoff"], "[60,300]");
    }

    fn error_of(text: &str) -> String {
        match Manifest::parse(text, "plugin.toml") {
            Err(e) => e.to_string(),
            Ok(m) => m
                .validate("plugin.toml", &devices())
                .unwrap_err()
                .to_string(),
        }
    }

    #[test]
    fn refuses_unknown_keys_naming_them() {
        let e = error_of("name = \"a\"\nversion = \"1\"\nauthor = \"me\"\n");
        assert!(e.contains("author"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[limits]\nmemory = 3\n");
        assert!(e.contains("memory"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[policy]\nCONTAINER = 1\n");
        assert!(e.contains("CONTAINER"), "{e}");
    }

    #[test]
    fn refuses_a_bad_cron_expression_naming_the_trigger() {
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"61 * * * *\"\n",
        );
        assert!(e.contains("triggers.cron[0].schedule"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"* *\"\n");
        assert!(e.contains("2 fields"), "{e}");
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n",
        );
        assert!(e.contains("triggers.cron[0].timezone"), "{e}");
    }

    #[test]
    fn triggers_survive_the_stored_record_round_trip() {
        let text = "name = \"a\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"@hourly\"\n\
                    [[triggers.cron]]\nschedule = \"*/5 * * * * *\"\njitter = \"1m30s\"\nrun_on_start = true\n\
                    [[triggers.webhook]]\nname = \"h\"\nauth = \"hmac-sha256\"\nmax_body = \"2KiB\"\n\
                    replay_window = \"90s\"\ntimestamp_header = \"X-T\"\nsigned_payload = \"{timestamp}.{body}\"\n\
                    rate_limit = { requests = 5, per = \"1m\" }\n\
                    [[triggers.webhook]]\nname = \"b\"\nauth = \"bearer\"\n";
        let m = Manifest::parse(text, "p").unwrap();
        m.validate("p", &devices()).unwrap();
        let json = serde_json::to_string(&m.triggers).unwrap();
        let back: Triggers = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m.triggers, "{json}");
        assert_eq!(back.webhook[0].max_body, Some(2048));
    }

    #[test]
    fn accepts_crontab_seconds_and_macro_forms() {
        for schedule in ["*/5 * * * *", "0 30 9 * * Mon-Fri", "@hourly"] {
            let text = format!(
                "name = \"a\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"{schedule}\"\n"
            );
            let m = Manifest::parse(&text, "p").unwrap();
            m.validate("p", &devices()).unwrap();
        }
    }

    #[test]
    fn refuses_an_unknown_device_unless_it_is_a_glob() {
        let e = error_of("name = \"a\"\nversion = \"1\"\n[policy]\ndevices = [\"web9\"]\n");
        assert!(e.contains("policy.devices") && e.contains("web9"), "{e}");
        assert!(e.contains("local"), "lists the known devices: {e}");
        let m = Manifest::parse(
            "name = \"a\"\nversion = \"1\"\n[policy]\ndevices = [\"web*\"]\n",
            "p",
        )
        .unwrap();
        m.validate("p", &devices()).unwrap();
    }

    #[test]
    fn refuses_bad_names_hooks_and_limits() {
        assert!(error_of("name = \"Auto Heal\"\nversion = \"1\"\n").contains("name"));
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"a/b\"\nauth = \"bearer\"\n",
        );
        assert!(e.contains("triggers.webhook[0]"), "{e}");
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"h\"\nauth = \"bearer\"\n[[triggers.webhook]]\nname = \"h\"\nauth = \"bearer\"\n",
        );
        assert!(e.contains("declared twice"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[limits]\nmemory_mib = 100000\n");
        assert!(e.contains("limits.memory_mib"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[limits]\ntimeout_secs = 0\n");
        assert!(e.contains("limits.timeout_secs"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[limits]\nmax_log_fields = 5000\n");
        assert!(e.contains("limits.max_log_fields"), "{e}");
    }

    #[test]
    fn reads_outbound_origins_secrets_and_http_limits() {
        let m = Manifest::parse(
            "name = \"a\"\nversion = \"1\"\n[policy]\noutbound = [\"https://hooks.slack.com\", \"http://127.0.0.1:*\"]\n\
             [limits]\nmax_http_requests = 3\nhttp_timeout_ms = 500\n\
             [secrets.slack]\norigins = [\"https://hooks.slack.com\"]\n",
            "p",
        )
        .unwrap();
        m.validate("p", &devices()).unwrap();
        assert_eq!(m.policy.outbound().rules().len(), 2);
        assert_eq!(m.secrets["slack"].origins, ["https://hooks.slack.com"]);
        let l = Limits::resolve(&m.limits, &Limits::DEFAULT);
        assert_eq!((l.max_http_requests, l.http_timeout_ms), (3, 500));
        assert_eq!(
            l.max_http_response_bytes,
            Limits::DEFAULT.max_http_response_bytes
        );
    }

    #[test]
    fn refuses_bad_outbound_entries_secrets_and_http_limits_naming_the_field() {
        let e = error_of("name = \"a\"\nversion = \"1\"\n[policy]\noutbound = [\"ntfy.sh\"]\n");
        assert!(
            e.contains("outbound") && e.contains("`ntfy.sh` is not an origin"),
            "{e}"
        );
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[secrets.Slack]\norigins = [\"https://x.io\"]\n",
        );
        assert!(
            e.contains("secrets.Slack") && e.contains("not a secret name"),
            "{e}"
        );
        let e = error_of("name = \"a\"\nversion = \"1\"\n[secrets.slack]\norigins = []\n");
        assert!(e.contains("secrets.slack.origins"), "{e}");
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[secrets.slack]\norigins = [\"hooks.slack.com\"]\n",
        );
        assert!(
            e.contains("secrets.slack.origins") && e.contains("scheme://"),
            "{e}"
        );
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[secrets.slack]\norigin = [\"https://x.io\"]\n",
        );
        assert!(e.contains("origin"), "{e}");
        let e = error_of("name = \"a\"\nversion = \"1\"\n[limits]\nhttp_timeout_ms = 0\n");
        assert!(e.contains("limits.http_timeout_ms"), "{e}");
    }

    #[test]
    fn the_host_memory_budget_holds_what_the_other_limits_allow() {
        let d = Limits::DEFAULT;
        assert!(d.max_host_bytes >= d.host_bytes_needed());
        // Raising the log cap raises an unset budget with it ...
        let spec = LimitsSpec {
            max_log_bytes: Some(16 * 1024 * 1024),
            max_state_bytes: Some(64 * 1024 * 1024),
            ..Default::default()
        };
        let l = Limits::resolve(&spec, &d);
        assert_eq!(
            l.max_host_bytes,
            16 * 1024 * 1024 + 2 * 64 * 1024 + 64 * 1024 * 1024 + 1024 * 1024,
            "{l:?}"
        );
        // ... while one set too small to hold them is refused at install, naming both.
        let e = error_of(
            "name = \"a\"\nversion = \"1\"\n[limits]\nmax_log_bytes = 8388608\nmax_host_bytes = 4194304\n",
        );
        assert!(e.contains("limits.max_host_bytes"), "{e}");
        assert!(e.contains("max_log_bytes"), "{e}");
        // Records stored before the new keys existed still load, with the defaults.
        let old = r#"{"memory_mib":64,"timeout_secs":60,"max_log_bytes":262144,"max_output_bytes":65536,"max_state_bytes":1048576,"max_host_calls":10000}"#;
        let l: Limits = serde_json::from_str(old).unwrap();
        assert_eq!(l, Limits::DEFAULT);
    }
}
