//! Plugin administration: install, remove, load at start-up, and the hook secrets of
//! installed plugins.
//!
//! [`PluginAdmin`] is the one place that installs and removes plugins while the engine
//! runs, so a plugin's triggers start and stop with it: it stores the plugin through the
//! [`PluginRuntime`] and walks [`crate::trigger::KINDS`] to check, prepare, register and
//! take away each kind's triggers. Installs, removals and secret changes go one at a
//! time. Runs themselves are the scheduler's ([`crate::scheduler`]).

use std::sync::{Arc, Mutex};

use super::{
    InstalledPlugin, LoadSummary, LoadedPlugin, Manifest, PluginError, PluginRuntime, PluginSource,
};
use crate::engine::Engine;
use crate::secret::Secret;
use crate::trigger::webhook::{HookError, HookKeys};
use crate::trigger::{KINDS, Triggers};

/// Why a hook's secrets could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum HookAdminError {
    #[error("no installed plugin declares hook {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Shortest hook secret accepted.
pub const MIN_HOOK_SECRET: usize = 16;

/// What [`PluginAdmin::install`] did.
#[derive(Debug)]
pub struct Installed {
    pub plugin: InstalledPlugin,
    /// Webhook secrets generated for hooks that had none, shown to the user once.
    pub generated_secrets: Vec<(String, Secret)>,
}

/// Installs and removes plugins and keeps their triggers in step.
pub struct PluginAdmin {
    engine: Arc<Engine>,
    runtime: Arc<PluginRuntime>,
    triggers: Arc<Triggers>,
    /// Installs and removes one at a time.
    lock: Mutex<()>,
}

fn lock(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PluginAdmin {
    pub fn new(
        engine: Arc<Engine>,
        runtime: Arc<PluginRuntime>,
        triggers: Arc<Triggers>,
    ) -> PluginAdmin {
        PluginAdmin {
            engine,
            runtime,
            triggers,
            lock: Mutex::new(()),
        }
    }

    /// Loads every installed plugin and activates its triggers. Returns the plugins (or
    /// triggers) that could not be, with why; the others run.
    pub fn load_installed(&self) -> anyhow::Result<(LoadSummary, Vec<String>)> {
        let mut summary = self.runtime.load_installed()?;
        let mut problems = Vec::new();
        for rec in self.runtime.installed()? {
            let Some(plugin) = self.runtime.plugin(&rec.name) else {
                continue;
            };
            if let Err(e) = self.activate(&plugin) {
                problems.push(format!("plugin {}: {e}", rec.name));
            }
        }
        summary.failed.sort();
        Ok((summary, problems))
    }

    /// Installs (or replaces) a plugin from its manifest and component, and activates
    /// its triggers at once. Hooks without a secret get a generated one.
    pub fn install(&self, src: &PluginSource) -> Result<Installed, PluginError> {
        let mut generated_secrets = Vec::new();
        let plugin = self.install_with(src, Some(&mut generated_secrets))?;
        Ok(Installed {
            plugin,
            generated_secrets,
        })
    }

    /// The steps of an install: check the manifest against every trigger kind, store
    /// the plugin, prepare its triggers (generating missing hook secrets into
    /// `generated` when given), activate them, flush.
    fn install_with(
        &self,
        src: &PluginSource,
        generated: Option<&mut Vec<(String, Secret)>>,
    ) -> Result<InstalledPlugin, PluginError> {
        let _admin = lock(&self.lock);
        let (manifest, source) = (src.manifest.as_str(), src.manifest_file.as_str());
        let parsed = Manifest::parse(manifest, source)?;
        for kind in KINDS {
            kind.check_install(&self.engine, &self.triggers, &parsed, source)?;
        }
        let plugin = self
            .runtime
            .install_bytes(manifest, source, &src.wasm, &src.wasm_file)?;
        if let Some(generated) = generated {
            for kind in KINDS {
                kind.prepare(&self.engine, &parsed, generated)?;
            }
        }
        let loaded = self
            .runtime
            .plugin(&plugin.name)
            .ok_or_else(|| PluginError::NotInstalled(plugin.name.clone()))?;
        self.activate(&loaded)
            .map_err(|e| PluginError::Trigger(format!("{e:#}")))?;
        self.engine.store.flush()?;
        Ok(plugin)
    }

    /// Installs (or replaces) a plugin another node of the cluster installed, and
    /// activates its triggers. Unlike [`PluginAdmin::install`] it generates no hook
    /// secret: the hooks' secrets come from the cluster too (a hook stays closed until
    /// its secret arrives, see [`PluginAdmin::refresh_hook`]).
    pub fn install_replicated(&self, src: &PluginSource) -> Result<InstalledPlugin, PluginError> {
        self.install_with(src, None)
    }

    /// Puts hook `name`'s secrets, as the vault holds them now, into effect (after the
    /// cluster replicated them). A hook no installed plugin declares is left alone.
    pub fn refresh_hook(&self, name: &str) -> Result<(), HookAdminError> {
        let _admin = lock(&self.lock);
        let plugin = match self.hook_plugin(name) {
            Ok(p) => p,
            Err(HookAdminError::Unknown(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.apply_hook_keys(name, &plugin) {
            Err(HookAdminError::Hook(HookError::NoSecret(_))) => Ok(()),
            other => other,
        }
    }

    /// Removes a plugin: its triggers stop at once (runs under way finish), then its
    /// files, compiled code, state and hook secrets go.
    pub fn remove(&self, name: &str) -> Result<InstalledPlugin, PluginError> {
        let _admin = lock(&self.lock);
        let rec = self.runtime.installed_plugin(name)?;
        self.deactivate(name);
        for kind in KINDS {
            kind.forget(&self.engine, &rec);
        }
        self.runtime.remove(name)
    }

    /// The plugin that declares hook `name`.
    fn hook_plugin(&self, name: &str) -> Result<String, HookAdminError> {
        self.runtime
            .installed()?
            .into_iter()
            .find(|p| p.triggers.webhook.iter().any(|h| h.name == name))
            .map(|p| p.name)
            .ok_or_else(|| HookAdminError::Unknown(name.to_string()))
    }

    /// Puts a hook's secrets from the vault into effect at once.
    fn apply_hook_keys(&self, name: &str, plugin: &str) -> Result<(), HookAdminError> {
        let keys = HookKeys::load(&self.engine.vault, name)?;
        if !self.triggers.hooks.set_keys(name, keys)
            && let Some(p) = self.runtime.plugin(plugin)
        {
            // The hook was closed for want of a secret: open it now.
            self.activate(&p)
                .map_err(|e| HookAdminError::Invalid(format!("{e:#}")))?;
        }
        self.engine.store.flush()?;
        Ok(())
    }

    /// Gives hook `name` a new secret (`None`: a generated one, returned to show once).
    /// The old secret stays valid until [`PluginAdmin::retire_hook`], so senders can be
    /// switched over without losing deliveries. Takes effect at once.
    pub fn rotate_hook(
        &self,
        name: &str,
        secret: Option<Secret>,
    ) -> Result<Option<Secret>, HookAdminError> {
        let _admin = lock(&self.lock);
        let plugin = self.hook_plugin(name)?;
        let (secret, generated) = match secret {
            Some(s) => (s, false),
            None => (Secret::random_hex(32), true),
        };
        if secret.expose().len() < MIN_HOOK_SECRET {
            return Err(HookAdminError::Invalid(format!(
                "a hook secret must be at least {MIN_HOOK_SECRET} bytes"
            )));
        }
        match HookKeys::rotate(&self.engine.vault, name, &secret) {
            Ok(()) => {}
            Err(HookError::NoSecret(_)) => HookKeys::set(&self.engine.vault, name, &secret)?,
            Err(e) => return Err(e.into()),
        }
        self.apply_hook_keys(name, &plugin)?;
        tracing::info!(hook = name, "hook secret rotated");
        Ok(generated.then_some(secret))
    }

    /// Stops accepting hook `name`'s previous secret. Returns whether it had one.
    pub fn retire_hook(&self, name: &str) -> Result<bool, HookAdminError> {
        let _admin = lock(&self.lock);
        let plugin = self.hook_plugin(name)?;
        let had = HookKeys::retire_previous(&self.engine.vault, name)?;
        self.apply_hook_keys(name, &plugin)?;
        Ok(had)
    }

    /// Puts a loaded plugin's triggers, of every kind, in place of whatever it had.
    fn activate(&self, plugin: &LoadedPlugin) -> anyhow::Result<()> {
        for kind in KINDS {
            kind.activate(&self.engine, &self.triggers, plugin)?;
        }
        Ok(())
    }

    fn deactivate(&self, name: &str) {
        for kind in KINDS {
            kind.deactivate(&self.triggers, name);
        }
    }
}
