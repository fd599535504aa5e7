//! Triggers: what starts a plugin run.
//!
//! A run starts because a cron schedule fired ([`cron`]), a webhook delivery was
//! verified ([`webhook`]), someone asked ([`manual`], through the API or the CLI),
//! something happened on a Docker host ([`docker`]), or another plugin's run ended the way
//! a run-outcome trigger watches for ([`run`]).
//! Each kind is one module that implements [`TriggerKind`]: it checks its section of the
//! manifest's `[triggers]` table at install, registers the plugin's triggers in
//! [`Triggers`] when the plugin is activated (and takes them away when it is removed), and
//! builds the [`TriggerEvent`] it submits runs with. [`KINDS`] is the one list of kinds:
//! the manifest check, plugin install and remove ([`crate::plugin::admin`]) walk it.
//!
//! This module owns triggers up to the point of "start this plugin now, for this reason";
//! the run itself belongs to the scheduler and the plugin runtime, and its record to
//! [`crate::runs`].
//!
//! [`TriggerEvent`]: crate::plugin::TriggerEvent

pub mod cron;
pub mod docker;
pub mod manual;
pub mod run;
pub mod units;
pub mod webhook;

use std::sync::Arc;

use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{InstalledPlugin, LoadedPlugin, Manifest, PluginError};
use crate::secret::Secret;

/// Every trigger kind, in the order their manifest sections are checked and their
/// triggers registered. A new kind is one module and one line here.
pub const KINDS: &[&dyn TriggerKind] = &[
    &cron::Cron,
    &webhook::Webhook,
    &manual::Manual,
    &docker::DockerEvents,
    &run::RunOutcome,
];

/// The engine's live triggers, filled by plugin activation and read by what fires them
/// (the scheduler's cron loop, the hook route).
pub struct Triggers {
    pub cron: cron::CronScheduler,
    pub hooks: Arc<webhook::Webhooks>,
    pub docker: Arc<docker::DockerWatchers>,
    /// Run-outcome triggers, read when a run ends.
    pub run: run::RunWatchers,
}

impl Triggers {
    pub fn open(store: &crate::store::Store) -> Result<Triggers, webhook::HookError> {
        Ok(Triggers {
            cron: cron::CronScheduler::new(),
            hooks: Arc::new(webhook::Webhooks::open(store)?),
            docker: Arc::new(docker::DockerWatchers::new()),
            run: run::RunWatchers::new(),
        })
    }
}

/// A manifest field a trigger kind refused, and why (`triggers.cron[0].schedule`, …).
#[derive(Debug)]
pub struct SectionError {
    pub field: String,
    pub message: String,
}

/// One kind of trigger. Only [`TriggerKind::validate`] and [`TriggerKind::activate`]
/// are required; the install steps default to nothing.
pub trait TriggerKind: Sync {
    /// The kind's name, as `TriggerEvent::kind` and the run record give it.
    fn name(&self) -> &'static str;

    /// Checks the kind's section of `[triggers]` (every check that can be made before a
    /// trigger fires), at install.
    fn validate(&self, sections: &TriggerSections) -> Result<(), SectionError>;

    /// Refuses an install before anything is stored (e.g. a hook name another plugin
    /// owns). `source` names the manifest in errors.
    fn check_install(
        &self,
        _engine: &Engine,
        _triggers: &Triggers,
        _manifest: &Manifest,
        _source: &str,
    ) -> Result<(), PluginError> {
        Ok(())
    }

    /// Prepares what the plugin's triggers need once it is stored (e.g. hook secrets);
    /// secrets generated for the user to see once go to `generated`.
    fn prepare(
        &self,
        _engine: &Engine,
        _manifest: &Manifest,
        _generated: &mut Vec<(String, Secret)>,
    ) -> Result<(), PluginError> {
        Ok(())
    }

    /// Puts a loaded plugin's triggers of this kind in place of whatever it had.
    fn activate(
        &self,
        engine: &Engine,
        triggers: &Triggers,
        plugin: &LoadedPlugin,
    ) -> anyhow::Result<()>;

    /// Takes the plugin's triggers of this kind away (runs under way finish).
    fn deactivate(&self, _triggers: &Triggers, _plugin: &str) {}

    /// Forgets what [`TriggerKind::prepare`] stored, when the plugin is removed.
    fn forget(&self, _engine: &Engine, _plugin: &InstalledPlugin) {}
}

#[cfg(test)]
mod tests {
    use super::KINDS;

    #[test]
    fn every_kind_is_registered_once_under_the_name_its_events_carry() {
        let names: Vec<_> = KINDS.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["cron", "webhook", "manual", "docker", "run"]);
        assert_eq!(crate::plugin::TriggerEvent::manual("").kind(), "manual");
    }
}
