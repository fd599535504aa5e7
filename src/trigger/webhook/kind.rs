//! The webhook trigger kind: `[[triggers.webhook]]` checked at install (a hook name
//! belongs to one plugin), a secret generated for a hook that has none, each hook put in
//! [`Webhooks`](super::Webhooks) when its plugin is activated, and every verified new
//! delivery submitted as a run with a `webhook` event ([`Delivery::into_event`]).

use super::{Delivery, HookError, HookKeys};
use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{InstalledPlugin, LoadedPlugin, Manifest, PluginError, TriggerEvent};
use crate::secret::Secret;
use crate::trigger::{SectionError, TriggerKind, Triggers};

/// The webhook trigger kind.
pub struct Webhook;

impl TriggerKind for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn validate(&self, sections: &TriggerSections) -> Result<(), SectionError> {
        let mut hooks = std::collections::HashSet::new();
        for (i, h) in sections.webhook.iter().enumerate() {
            h.validate().map_err(|e| SectionError {
                field: format!("triggers.webhook[{i}]"),
                message: e.to_string(),
            })?;
            if !hooks.insert(&h.name) {
                return Err(SectionError {
                    field: format!("triggers.webhook[{i}].name"),
                    message: format!("hook `{}` is declared twice", h.name),
                });
            }
        }
        Ok(())
    }

    /// A hook owned by another plugin is refused before anything is stored.
    fn check_install(
        &self,
        _engine: &Engine,
        triggers: &Triggers,
        manifest: &Manifest,
        source: &str,
    ) -> Result<(), PluginError> {
        for h in &manifest.triggers.webhook {
            if let Some(owner) = triggers.hooks.owner(&h.name)
                && owner != manifest.name
            {
                return Err(PluginError::Source(format!(
                    "{source}: hook {:?} already belongs to plugin {owner:?}; choose another name or remove that plugin first",
                    h.name
                )));
            }
        }
        Ok(())
    }

    /// Hooks without a secret get a generated one.
    fn prepare(
        &self,
        engine: &Engine,
        manifest: &Manifest,
        generated: &mut Vec<(String, Secret)>,
    ) -> Result<(), PluginError> {
        for h in &manifest.triggers.webhook {
            match HookKeys::load(&engine.vault, &h.name) {
                Ok(_) => {}
                Err(HookError::NoSecret(_)) => {
                    let secret = Secret::random_hex(32);
                    HookKeys::set(&engine.vault, &h.name, &secret)
                        .map_err(|e| PluginError::Trigger(e.to_string()))?;
                    generated.push((h.name.clone(), secret));
                }
                Err(e) => return Err(PluginError::Trigger(e.to_string())),
            }
        }
        Ok(())
    }

    /// Hooks the plugin still declares are replaced in place, so their delivery ids are
    /// remembered across an update; a hook without a secret stays closed.
    fn activate(
        &self,
        engine: &Engine,
        triggers: &Triggers,
        plugin: &LoadedPlugin,
    ) -> anyhow::Result<()> {
        let hooks = &triggers.hooks;
        for old in hooks.list() {
            if old.plugin == plugin.name
                && !plugin.triggers.webhook.iter().any(|h| h.name == old.name)
            {
                hooks.remove(&old.name)?;
            }
        }
        let mut missing = Vec::new();
        for h in &plugin.triggers.webhook {
            let spec = h.validate()?;
            match HookKeys::load(&engine.vault, &h.name) {
                Ok(keys) => hooks.install(&plugin.name, spec, keys)?,
                Err(HookError::NoSecret(_)) => {
                    hooks.remove(&h.name)?;
                    missing.push(h.name.clone());
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !missing.is_empty() {
            anyhow::bail!(
                "hook(s) {} have no secret in the vault and stay closed: set one with `capstan hook rotate NAME`",
                missing.join(", ")
            );
        }
        Ok(())
    }

    fn deactivate(&self, triggers: &Triggers, plugin: &str) {
        if let Err(e) = triggers.hooks.remove_plugin(plugin) {
            tracing::warn!(plugin, error = %e, "could not remove the plugin's hooks");
        }
    }

    /// The hooks' secrets go with the plugin.
    fn forget(&self, engine: &Engine, plugin: &InstalledPlugin) {
        for h in &plugin.triggers.webhook {
            if let Err(e) = HookKeys::remove(&engine.vault, &h.name) {
                tracing::warn!(hook = %h.name, error = %e, "could not remove the hook's secrets");
            }
        }
    }
}

impl Delivery {
    /// The event the plugin's run gets for this delivery.
    pub fn into_event(self) -> TriggerEvent {
        TriggerEvent::Webhook {
            hook: self.hook,
            delivery: self.delivery_id,
            headers: self.headers,
            body: self.body.to_vec(),
        }
    }
}
