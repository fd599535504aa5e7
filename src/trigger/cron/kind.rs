//! The cron trigger kind: `[[triggers.cron]]` checked at install, each schedule
//! registered in the engine's one [`CronScheduler`](super::CronScheduler) when its plugin
//! is activated, and every fire submitted as a run with a `cron` event.

use std::sync::Arc;
use std::time::Duration;

use super::{CronError, CronTrigger, FireInfo, SCHEDULE_HELP, TriggerId};
use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{LoadedPlugin, TriggerEvent};
use crate::scheduler::{Scheduler, SubmitError};
use crate::trigger::{SectionError, TriggerKind, Triggers};

/// The cron trigger kind.
pub struct Cron;

impl TriggerKind for Cron {
    fn name(&self) -> &'static str {
        "cron"
    }

    fn validate(&self, sections: &TriggerSections) -> Result<(), SectionError> {
        for (i, c) in sections.cron.iter().enumerate() {
            CronTrigger::from_config(c).map_err(|e| {
                let (field, help) = match &e {
                    CronError::Timezone { .. } => ("timezone", ""),
                    CronError::Jitter(_) => ("jitter", ""),
                    _ => ("schedule", SCHEDULE_HELP),
                };
                let message = if help.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}\n{}", help.trim_end())
                };
                SectionError {
                    field: format!("triggers.cron[{i}].{field}"),
                    message,
                }
            })?;
        }
        Ok(())
    }

    fn activate(
        &self,
        _engine: &Engine,
        triggers: &Triggers,
        plugin: &LoadedPlugin,
    ) -> anyhow::Result<()> {
        triggers.cron.remove_plugin(&plugin.name);
        for (i, c) in plugin.triggers.cron.iter().enumerate() {
            // `run_on_start` fires on install and when the engine starts.
            let trigger = CronTrigger::from_config(c)?;
            triggers
                .cron
                .add(TriggerId::new(&plugin.name, i as u32), trigger);
        }
        Ok(())
    }

    fn deactivate(&self, triggers: &Triggers, plugin: &str) {
        triggers.cron.remove_plugin(plugin);
    }
}

/// The event of one fire.
pub fn event(fire: &FireInfo) -> TriggerEvent {
    TriggerEvent::Cron {
        schedule: fire.schedule.to_string(),
        scheduled_at: fire.scheduled_at,
    }
}

/// Fires the engine's cron triggers until `shutdown` resolves. Each fire is a run; the
/// trigger's overlap policy sees the run as going on until it ends.
pub async fn fire_runs(scheduler: Arc<Scheduler>, shutdown: impl std::future::Future<Output = ()>) {
    let triggers = scheduler.triggers().clone();
    let report = triggers
        .cron
        .run(
            move |id: TriggerId, fire: FireInfo| {
                let scheduler = scheduler.clone();
                async move { fire_one(&scheduler, id, fire).await }
            },
            shutdown,
            // The fires only wait for their runs; the scheduler's shutdown looks after
            // the runs.
            Duration::ZERO,
        )
        .await;
    tracing::debug!(?report, "cron scheduler stopped");
}

async fn fire_one(scheduler: &Arc<Scheduler>, id: TriggerId, fire: FireInfo) {
    // Cluster mode: every node publishes the fire under the same id; one node runs it.
    if let Some(cluster) = scheduler.cluster() {
        let msg_id = crate::cluster::cron_msg_id(id.plugin(), id.index(), fire.scheduled_at);
        if let Err(e) = cluster.hand_over(id.plugin(), event(&fire), &msg_id).await {
            tracing::warn!(plugin = id.plugin(), trigger = id.index(), error = %e, "cron fire not handed to the cluster");
        }
        return;
    }
    match scheduler.submit(id.plugin(), event(&fire)) {
        Ok(run) => scheduler.until_ended(run).await,
        Err(SubmitError::ShuttingDown) => {}
        Err(e) => {
            tracing::warn!(plugin = id.plugin(), trigger = id.index(), error = %e, "cron fire not run")
        }
    }
}
