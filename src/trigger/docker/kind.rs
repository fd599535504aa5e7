//! The Docker trigger kind: `[[triggers.docker]]` checked at install (patterns against
//! Docker's vocabulary, the policy allowing `GET /events`, named devices inside the
//! policy's device scope), and each plugin's triggers handed to the engine's
//! [`DockerWatchers`](super::DockerWatchers) when it is activated.
//!
//! A policy that denies EVENTS refuses the install rather than recording a denial per
//! event: such a trigger could never deliver anything, and a mistake in the manifest
//! should fail `capstan plugin install`, not pass silently until the day the event
//! matters.

use super::DockerTrigger;
use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{LoadedPlugin, Manifest, PluginError};
use crate::trigger::{SectionError, TriggerKind, Triggers};

/// The Docker trigger kind.
pub struct DockerEvents;

impl TriggerKind for DockerEvents {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn validate(&self, sections: &TriggerSections) -> Result<(), SectionError> {
        for (i, c) in sections.docker.iter().enumerate() {
            DockerTrigger::from_config(c).map_err(|e| SectionError {
                field: format!("triggers.docker[{i}].{}", e.field),
                message: e.message,
            })?;
        }
        Ok(())
    }

    /// The policy must allow `GET /events`, and a device a trigger names without a glob
    /// must be inside the policy's device scope.
    fn check_install(
        &self,
        _engine: &Engine,
        _triggers: &Triggers,
        manifest: &Manifest,
        source: &str,
    ) -> Result<(), PluginError> {
        if manifest.triggers.docker.is_empty() {
            return Ok(());
        }
        let policy = manifest.policy.compile();
        let decision = policy.decide("GET", "/events");
        if !decision.is_allowed() {
            return Err(PluginError::Source(format!(
                "{source}: triggers.docker needs Docker's events, but policy.EVENTS: {}",
                decision.reason()
            )));
        }
        if policy.devices().is_empty() {
            return Err(PluginError::Source(format!(
                "{source}: triggers.docker: the policy allows no device, so no event could reach the plugin; list the devices to watch in policy.devices"
            )));
        }
        for (i, c) in manifest.triggers.docker.iter().enumerate() {
            for (j, d) in c.devices.iter().flatten().enumerate() {
                if !d.contains(['*', '?']) && !policy.devices().allows(d) {
                    return Err(PluginError::Source(format!(
                        "{source}: triggers.docker[{i}].devices[{j}]: device `{d}` is outside the policy's device scope ({}); add it to policy.devices or remove it here",
                        policy.devices().patterns().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    fn activate(
        &self,
        _engine: &Engine,
        triggers: &Triggers,
        plugin: &LoadedPlugin,
    ) -> anyhow::Result<()> {
        let compiled = plugin
            .triggers
            .docker
            .iter()
            .map(DockerTrigger::from_config)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("triggers.docker: {}: {}", e.field, e.message))?;
        if !compiled.is_empty() && !plugin.policy.decide("GET", "/events").is_allowed() {
            triggers.docker.remove_plugin(&plugin.name);
            anyhow::bail!(
                "triggers.docker stay off: the policy does not allow Docker's events (set EVENTS=1)"
            );
        }
        triggers
            .docker
            .set_plugin(&plugin.name, plugin.policy.clone(), compiled);
        Ok(())
    }

    fn deactivate(&self, triggers: &Triggers, plugin: &str) {
        triggers.docker.remove_plugin(plugin);
    }
}
