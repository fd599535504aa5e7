//! `capstan:plugin/host`: structured log, config values, the plugin's key-value state,
//! the time, and notifications. No Docker scope applies (a plugin only ever reaches its
//! own config and state); `notify` has its own decision point, the manifest's `[notify]
//! channels` (see [`crate::notify`]). The limits apply: the run's host-call budget,
//! `max_log_bytes`, `max_log_records`, `max_log_fields`, `max_state_bytes`, and the run's
//! host memory (`max_host_bytes`) for every record kept and every value read back.

use super::{HostError, RunState, render_wit_error};
use crate::notify::{Message, NotifyError, Priority as NotifyPriority, Sent as NotifySent};
use crate::plugin::bindings::WitError;
use crate::plugin::bindings::wit_host::{Host, Level, Notification, Priority, Sent};
use crate::plugin::budget::{LimitError, log_record_cost};
use crate::plugin::records::AuditRecord;
use crate::plugin::records::{MAX_STATE_KEY, StateSet};
use crate::plugin::report::LogRecord;
use crate::plugin::report::{CallDecision, Denial, HostCall};

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
        notification: Notification,
    ) -> Result<Sent, HostError> {
        self.run.count_call().map_err(HostError::Trap)?;
        let started = std::time::Instant::now();
        let r = send_notification(&self.run, &channel, notification);
        // The channel name is the plugin's argument: bounded before it is recorded.
        let shown: String = channel.chars().take(64).collect();
        let (decision, result, reason) = match &r {
            Ok((_, sent)) => (
                CallDecision::Allow,
                sent.as_str(),
                match sent {
                    NotifySent::Queued => "queued for delivery".to_string(),
                    NotifySent::Duplicate => format!(
                        "not sent: the same dedup key went to `{shown}` within notify.dedup_window"
                    ),
                    NotifySent::RateLimited => {
                        format!("not sent: channel `{shown}` is over notify.rate_limit")
                    }
                    NotifySent::QueueFull => {
                        "not sent: the engine's notification queue is full (notify.max_queue)"
                            .to_string()
                    }
                },
            ),
            Err(e @ HostError::Wit(WitError::Denied(m))) => {
                (CallDecision::Deny, e.kind(), m.clone())
            }
            Err(e @ HostError::Wit(w)) => (CallDecision::Allow, e.kind(), render_wit_error(w)),
            Err(e @ HostError::Trap(t)) => {
                (CallDecision::Allow, e.kind(), format!("host failure: {t}"))
            }
        };
        let call = HostCall {
            op: "host.notify".into(),
            device: String::new(),
            request: format!("notify {shown}"),
            decision,
            result: result.to_string(),
            ms: crate::millis(started.elapsed()),
            // The reason may list the manifest's channels or quote an error: bounded as
            // every recorded field is.
            reason: super::docker::bounded(&reason),
        };
        if decision == CallDecision::Deny {
            tracing::info!(plugin = %self.run.plugin.name, channel = %shown, "plugin notification denied");
            self.run.keep_denial(Denial {
                op: call.op.clone(),
                device: String::new(),
                request: call.request.clone(),
                reason: call.reason.clone(),
            });
        }
        let rec = AuditRecord {
            time: chrono::Utc::now(),
            plugin: self.run.plugin.name.clone(),
            call: call.clone(),
        };
        self.run.keep_host_call(call);
        if let Err(e) = self.run.services.audit.record(&rec) {
            tracing::error!(error = %e, "cannot write the audit record");
        }
        r.map(|(sent, _)| sent)
    }
}

/// `host.notify`'s four steps: the manifest's `[notify] channels` decides (denied
/// otherwise, naming the setting); the notification's bounds; the notifier's dedup, rate
/// limit and queue; its errors as WIT values.
fn send_notification(
    run: &super::RunCtx,
    channel: &str,
    n: Notification,
) -> Result<(Sent, NotifySent), HostError> {
    if !crate::notify::valid_name(channel) {
        return Err(HostError::invalid(
            "not a channel name: letters, digits, `.`, `_` and `-`, at most 64",
        ));
    }
    let plugin = &run.plugin;
    if !plugin.notify.channels.iter().any(|c| c == channel) {
        let allowed = if plugin.notify.channels.is_empty() {
            "it names none".to_string()
        } else {
            format!("it names {:?}", plugin.notify.channels)
        };
        return Err(HostError::denied(format!(
            "notifier channel `{channel}` is not allowed: the manifest's `[notify] channels` does not name it ({allowed})"
        )));
    }
    let message = Message {
        title: n.title,
        message: n.message,
        priority: match n.priority {
            Priority::Low => NotifyPriority::Low,
            Priority::Normal => NotifyPriority::Normal,
            Priority::High => NotifyPriority::High,
            Priority::Urgent => NotifyPriority::Urgent,
        },
        tags: n.tags,
        dedup_key: n.dedup_key,
        plugin: plugin.name.clone(),
        run_id: Some(run.run_id.to_string()),
        channel: channel.to_string(),
        time: chrono::Utc::now(),
    };
    let engine = &run.services.engine;
    match engine.notifier.send(&engine.vault, channel, message) {
        Ok(sent) => Ok((
            match sent {
                NotifySent::Queued => Sent::Queued,
                NotifySent::Duplicate => Sent::Duplicate,
                NotifySent::RateLimited | NotifySent::QueueFull => Sent::RateLimited,
            },
            sent,
        )),
        Err(e @ NotifyError::NotFound(_)) => Err(HostError::not_found(e.to_string())),
        Err(NotifyError::Invalid(why)) => Err(HostError::invalid(why)),
        Err(e) => Err(HostError::trap(e)),
    }
}
