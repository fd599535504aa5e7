//! `capstan:plugin/host`: structured log, config values, the plugin's key-value state,
//! and the time. No scope applies (a plugin only ever reaches its own config and state);
//! the limits do: the run's host-call budget, `max_log_bytes`, `max_log_records`,
//! `max_log_fields`, `max_state_bytes`, and the run's host memory (`max_host_bytes`)
//! for every record kept and every value read back.

use super::{HostError, RunState};
use crate::plugin::bindings::wit_host::{Host, Level, Notification, Sent};
use crate::plugin::budget::{LimitError, log_record_cost};
use crate::plugin::records::{MAX_STATE_KEY, StateSet};
use crate::plugin::report::LogRecord;

fn level_str(level: Level) -> &'static str {
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

fn store_trap(e: impl std::fmt::Display) -> wasmtime::Error {
    wasmtime::format_err!("plugin state store failed: {e}")
}

impl Host for RunState {
    async fn log(
        &mut self,
        level: Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        let run = &mut self.run;
        run.count_call()?;
        let limits = run.plugin.limits;
        if fields.len() > limits.max_log_fields as usize {
            return Err(run.limit(LimitError::LogFields {
                fields: fields.len(),
                max: limits.max_log_fields,
            }));
        }
        let level = level_str(level);
        let cost = log_record_cost(level, &message, &fields);
        if run.logs.len() >= limits.max_log_records as usize
            || run.log_bytes + cost > limits.max_log_bytes as usize
        {
            run.logs_dropped += 1;
            return Ok(());
        }
        run.budget
            .keep("a log record", cost)
            .map_err(|e| run.limit(e))?;
        run.log_bytes += cost;
        tracing::debug!(plugin = %run.plugin.name, level, %message, "plugin log");
        run.logs.push(LogRecord {
            at_ms: crate::millis(run.started.elapsed()),
            level: level.to_string(),
            message,
            fields,
        });
        Ok(())
    }

    async fn config_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.run.count_call()?;
        Ok(self.run.plugin.config.get(&key).cloned())
    }

    async fn config_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        self.run.count_call()?;
        Ok(self
            .run
            .plugin
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn state_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.run.count_call()?;
        let value = self
            .run
            .services
            .state
            .get(&self.run.plugin.name, &key)
            .map_err(store_trap)?;
        let size = value.as_ref().map_or(0, Vec::len);
        self.run
            .budget
            .hold("a state value read back", size)
            .map_err(|e| self.run.limit(e))?;
        Ok(value)
    }

    async fn state_set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        self.run.count_call().map_err(HostError::Trap)?;
        if key.is_empty() || key.len() > MAX_STATE_KEY {
            return Err(HostError::invalid(format!(
                "state keys are 1 to {MAX_STATE_KEY} bytes; this one has {}",
                key.len()
            )));
        }
        let max = u64::from(self.run.plugin.limits.max_state_bytes);
        let set = self
            .run
            .services
            .state
            .set(&self.run.plugin.name, &key, &value, max)
            .map_err(|e| HostError::Trap(store_trap(e)))?;
        match set {
            StateSet::Stored { .. } => Ok(()),
            StateSet::OverQuota { size, would_be } => Err(HostError::invalid(format!(
                "the plugin's state would grow from {size} to {would_be} bytes, more than {max} (limits.max_state_bytes); delete keys first"
            ))),
        }
    }

    async fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.run.count_call()?;
        self.run
            .services
            .state
            .delete(&self.run.plugin.name, &key)
            .map_err(store_trap)
    }

    async fn state_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        self.run.count_call()?;
        let keys = self
            .run
            .services
            .state
            .keys(&self.run.plugin.name, &prefix)
            .map_err(store_trap)?;
        let size: usize = keys
            .iter()
            .map(|k| std::mem::size_of::<String>() + k.len())
            .sum();
        self.run
            .budget
            .hold("the state keys read back", size)
            .map_err(|e| self.run.limit(e))?;
        Ok(keys)
    }

    async fn now(&mut self) -> wasmtime::Result<i64> {
        self.run.count_call()?;
        Ok(chrono::Utc::now().timestamp_millis())
    }

    async fn notify(
        &mut self,
        channel: String,
        _notification: Notification,
    ) -> Result<Sent, HostError> {
        self.run.count_call().map_err(HostError::Trap)?;
        Err(HostError::denied(format!(
            "notifier channel `{channel}` is not allowed: the manifest's `[notify] channels` does not name it"
        )))
    }
}
