//! `capstan:plugin/host`: structured log, config values, the plugin's key-value state,
//! and the time. No scope applies (a plugin only ever reaches its own config and state);
//! the limits do: the run's host-call budget, `max_log_bytes` and `max_state_bytes`.

use super::{HostError, RunState};
use crate::plugin::bindings::wit_host::{Host, Level};
use crate::plugin::records::MAX_STATE_KEY;
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
        let size = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if run.log_bytes + size > run.plugin.limits.max_log_bytes as usize {
            run.logs_dropped += 1;
            return Ok(());
        }
        run.log_bytes += size;
        let level = level_str(level);
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
        self.run
            .services
            .state
            .get(&self.run.plugin.name, &key)
            .map_err(store_trap)
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
        let stored = self
            .run
            .services
            .state
            .set(&self.run.plugin.name, &key, &value, max)
            .map_err(|e| HostError::Trap(store_trap(e)))?;
        if stored {
            Ok(())
        } else {
            Err(HostError::invalid(format!(
                "the plugin's state would exceed {max} bytes (limits.max_state_bytes); delete keys first"
            )))
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
        self.run
            .services
            .state
            .keys(&self.run.plugin.name, &prefix)
            .map_err(store_trap)
    }

    async fn now(&mut self) -> wasmtime::Result<i64> {
        self.run.count_call()?;
        Ok(chrono::Utc::now().timestamp_millis())
    }
}
