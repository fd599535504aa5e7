//! Secrets plugins use without seeing them: values an operator stores for a plugin
//! (`capstan plugin secret set PLUGIN NAME`, `PUT /api/plugins/{name}/secrets/{secret}`)
//! that the host writes into the plugin's outbound requests in place of
//! `{{secret.NAME}}` — only for the origins the manifest's `[secrets.NAME] origins`
//! binds (see [`super::host::http`]).
//!
//! The values are sealed in the vault under `plugin-secret/<plugin>/<name>`; nothing
//! here returns one. A secret must be declared by the installed plugin's manifest
//! before it can be set, is text (it stands in a URL or a header value: no control
//! characters) of at most [`MAX_SECRET_BYTES`], and goes when the plugin is removed.

use serde::Serialize;

use super::PluginRuntime;
use super::host::http::{SECRET_KIND, secret_name};
use crate::secret::Secret;
use crate::vault::Vault;

/// The largest secret value, bytes.
pub const MAX_SECRET_BYTES: usize = 8 * 1024;

/// One secret a plugin declares, and whether it has a value. Never the value.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PluginSecret {
    /// The name the plugin writes as `{{secret.NAME}}`.
    pub name: String,
    /// The origins it may be sent to (`[secrets.NAME] origins`).
    pub origins: Vec<String>,
    /// Whether a value is stored.
    pub set: bool,
}

/// Why a secret could not be listed, stored or removed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no plugin named `{0}` is installed (see `capstan plugin list`)")]
    NotInstalled(String),
    #[error(
        "plugin {plugin} declares no secret `{name}` ({declared}): add `[secrets.{name}] origins = [\"https://…\"]` to its manifest and reinstall it"
    )]
    Undeclared {
        plugin: String,
        name: String,
        declared: String,
    },
    #[error("plugin {plugin} has no value stored for secret `{name}`")]
    NotSet { plugin: String, name: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the vault failed: {0}")]
    Vault(String),
}

/// The secrets of plugin `plugin` as its manifest declares them.
pub fn list(
    vault: &Vault,
    runtime: &PluginRuntime,
    plugin: &str,
) -> Result<Vec<PluginSecret>, SecretError> {
    let loaded = runtime
        .plugin(plugin)
        .ok_or_else(|| SecretError::NotInstalled(plugin.to_string()))?;
    loaded
        .secrets
        .iter()
        .map(|(name, origins)| {
            let set = vault
                .contains(&secret_name(plugin, name))
                .map_err(|e| SecretError::Vault(e.to_string()))?;
            Ok(PluginSecret {
                name: name.clone(),
                origins: origins
                    .rules()
                    .iter()
                    .map(|r| r.as_str().to_string())
                    .collect(),
                set,
            })
        })
        .collect()
}

/// Stores `value` as plugin `plugin`'s secret `name`, replacing any value it had.
pub fn set(
    vault: &Vault,
    runtime: &PluginRuntime,
    plugin: &str,
    name: &str,
    value: &Secret,
) -> Result<(), SecretError> {
    declared(runtime, plugin, name)?;
    check_value(name, value)?;
    vault
        .put(&secret_name(plugin, name), value)
        .map_err(|e| SecretError::Vault(e.to_string()))?;
    tracing::info!(plugin, secret = name, "plugin secret stored");
    Ok(())
}

/// Removes plugin `plugin`'s secret `name`'s value.
pub fn remove(
    vault: &Vault,
    runtime: &PluginRuntime,
    plugin: &str,
    name: &str,
) -> Result<(), SecretError> {
    declared(runtime, plugin, name)?;
    let key = secret_name(plugin, name);
    if !vault
        .contains(&key)
        .map_err(|e| SecretError::Vault(e.to_string()))?
    {
        return Err(SecretError::NotSet {
            plugin: plugin.to_string(),
            name: name.to_string(),
        });
    }
    vault
        .remove(&key)
        .map_err(|e| SecretError::Vault(e.to_string()))?;
    tracing::info!(plugin, secret = name, "plugin secret removed");
    Ok(())
}

/// Removes every secret of plugin `plugin` (when it is removed).
pub fn remove_all(vault: &Vault, plugin: &str) -> Result<usize, SecretError> {
    vault
        .remove_record(SECRET_KIND, plugin)
        .map_err(|e| SecretError::Vault(e.to_string()))
}

fn declared(runtime: &PluginRuntime, plugin: &str, name: &str) -> Result<(), SecretError> {
    let loaded = runtime
        .plugin(plugin)
        .ok_or_else(|| SecretError::NotInstalled(plugin.to_string()))?;
    if loaded.secrets.contains_key(name) {
        return Ok(());
    }
    let names: Vec<&str> = loaded.secrets.keys().map(String::as_str).collect();
    Err(SecretError::Undeclared {
        plugin: plugin.to_string(),
        name: name.to_string(),
        declared: if names.is_empty() {
            "it declares none".to_string()
        } else {
            format!("it declares {}", names.join(", "))
        },
    })
}

/// A value must be usable in a URL or header: non-empty text without control
/// characters, at most [`MAX_SECRET_BYTES`]. The errors never quote it.
fn check_value(name: &str, value: &Secret) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Invalid(format!(
            "the value of secret `{name}` is empty"
        )));
    }
    if value.expose().len() > MAX_SECRET_BYTES {
        return Err(SecretError::Invalid(format!(
            "the value of secret `{name}` has {} bytes; at most {MAX_SECRET_BYTES} are kept",
            value.expose().len()
        )));
    }
    let text = value.expose_str().map_err(|_| {
        SecretError::Invalid(format!("the value of secret `{name}` is not UTF-8 text"))
    })?;
    if text.chars().any(char::is_control) {
        return Err(SecretError::Invalid(format!(
            "the value of secret `{name}` holds a control character (a line break?); it must fit in a URL or a header value"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_must_be_short_text_without_control_characters_and_errors_never_quote_it() {
        let ok = Secret::from_str_owned("T000/B000/xyzzy".into());
        check_value("slack", &ok).unwrap();
        for bad in ["", "line\nbreak-hunter2", "tab\there-hunter2"] {
            let e = check_value("slack", &Secret::from_str_owned(bad.into()))
                .unwrap_err()
                .to_string();
            assert!(e.contains("slack"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let long = Secret::from_str_owned("x".repeat(MAX_SECRET_BYTES + 1));
        assert!(check_value("s", &long).is_err());
        assert!(check_value("s", &Secret::new(vec![0xff, 0xfe])).is_err());
    }
}
