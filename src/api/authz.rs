//! Who may do what: the one place the API (and the dashboard, which calls the same
//! functions) decides whether a token's role and device scope allow a request.
//!
//! - **Role.** Every route in [`super::ROUTES`] declares the [`Role`] it needs; the auth
//!   layer refuses a token below it with 403 before the handler runs
//!   ([`require_role`]). Reading is `viewer`, running plugins and checking devices is
//!   `operator`, changing anything (devices, plugins, secrets, hooks, notifiers) is
//!   `admin`. What `admin` changes spans every device, so it also needs a token
//!   without a device scope (`capstan token create` refuses to make a scoped admin).
//! - **Device scope.** A token limited to device globs (`capstan token create NAME
//!   --devices 'prod-*'`) sees only the devices they match: listings leave the others
//!   out, and a route naming another device answers 404 exactly as for a device that
//!   does not exist, so a scoped token cannot learn which names exist
//!   ([`authorize_device`]).
//! - **Plugins.** A scoped token sees, runs and reads the runs of only the plugins it
//!   *covers*: every device the plugin's policy may reach is one the token sees
//!   ([`TokenInfo::covers_devices`]). Other plugins answer 404 and are left out of
//!   listings ([`authorize_plugin`], [`PluginFilter`]). Runs of a plugin no longer
//!   installed are hidden from scoped tokens, whose coverage of it cannot be told.
//! - **Engine-wide reads** (the audit log and `/metrics`, which span every device and
//!   plugin) need a token without a device scope ([`require_unscoped`]): 403 otherwise.

use std::collections::HashSet;

use super::AppError;
use crate::plugin::{InstalledPlugin, PluginRuntime};
use crate::runs::{RunPage, RunQuery, RunRecord, RunStore};
use crate::token::{Role, TokenInfo};

/// 403 unless the token's role is `need` or above (and, for `admin`, the token has no
/// device scope). `action` names what was asked in the refusal, e.g.
/// `this token (ci) has role viewer; POST /api/plugins/{name}/run needs operator`.
pub fn require_role(token: &TokenInfo, need: Role, action: &str) -> Result<(), AppError> {
    if !token.allows(need) {
        return Err(AppError::Forbidden(format!(
            "this token ({}) has role {}; {action} needs {need}",
            token.name, token.role
        )));
    }
    if need == Role::Admin {
        return require_unscoped(token, action);
    }
    Ok(())
}

/// 403 for a token limited to devices: `what` (e.g. `the audit log`) spans every device.
pub fn require_unscoped(token: &TokenInfo, what: &str) -> Result<(), AppError> {
    if !token.is_device_scoped() {
        return Ok(());
    }
    Err(AppError::Forbidden(format!(
        "this token ({}) is limited to devices {}; {what} spans every device and needs a token without a device scope",
        token.name,
        token.devices.join(", ")
    )))
}

/// 404, as for a device that does not exist, unless the token sees device `name`.
pub fn authorize_device(token: &TokenInfo, name: &str) -> Result<(), AppError> {
    if token.sees_device(name) {
        return Ok(());
    }
    Err(AppError::NotFound(format!("no device named {name:?}")))
}

/// 404, as for a plugin that is not installed, unless the token covers every device
/// `plugin` may reach.
pub fn authorize_plugin(token: &TokenInfo, plugin: &InstalledPlugin) -> Result<(), AppError> {
    if token.covers_devices(plugin.devices.iter().map(String::as_str)) {
        return Ok(());
    }
    Err(not_installed(&plugin.name))
}

fn not_installed(name: &str) -> AppError {
    AppError::from(crate::plugin::PluginError::NotInstalled(name.to_string()))
}

/// Which plugins (and so which runs) a token may see, worked out once per request.
#[derive(Debug, Clone)]
pub enum PluginFilter {
    /// A token without a device scope: every plugin, installed or not.
    All,
    /// A scoped token: the installed plugins it covers.
    Only(HashSet<String>),
}

impl PluginFilter {
    /// The filter for `token`: for a scoped token, the installed plugins it covers.
    pub fn for_token(token: &TokenInfo, runtime: &PluginRuntime) -> Result<PluginFilter, AppError> {
        if !token.is_device_scoped() {
            return Ok(PluginFilter::All);
        }
        let covered = runtime
            .installed()?
            .into_iter()
            .filter(|p| authorize_plugin(token, p).is_ok())
            .map(|p| p.name)
            .collect();
        Ok(PluginFilter::Only(covered))
    }

    /// Whether the plugin named `plugin` (and its runs) may be seen.
    pub fn allows(&self, plugin: &str) -> bool {
        match self {
            PluginFilter::All => true,
            PluginFilter::Only(names) => names.contains(plugin),
        }
    }

    /// 404 unless `run` belongs to a plugin the filter allows (the same answer as for a
    /// run that does not exist).
    pub fn authorize_run(&self, run: &RunRecord) -> Result<(), AppError> {
        if self.allows(&run.plugin) {
            return Ok(());
        }
        Err(AppError::from(crate::runs::RunError::NotFound(run.id)))
    }

    /// A page of the run history as [`RunStore::list`] answers it, holding only runs of
    /// plugins the filter allows. For a scoped token without a plugin in the query, the
    /// covered plugins' newest runs are merged: one indexed read per covered plugin, never
    /// a scan of the whole history.
    pub fn list_runs(&self, runs: &RunStore, query: &RunQuery) -> Result<RunPage, AppError> {
        let names = match self {
            PluginFilter::All => return Ok(runs.list(query)?),
            PluginFilter::Only(names) => names,
        };
        let empty = RunPage {
            runs: Vec::new(),
            next: None,
        };
        if let Some(p) = &query.plugin {
            return if names.contains(p) {
                Ok(runs.list(query)?)
            } else {
                Ok(empty)
            };
        }
        let limit = match query.limit {
            0 => 50,
            n => n.min(crate::runs::MAX_PAGE),
        };
        let mut merged = Vec::new();
        let mut more = false;
        for name in names {
            let page = runs.list(&RunQuery {
                plugin: Some(name.clone()),
                before: query.before,
                limit,
            })?;
            more |= page.next.is_some();
            merged.extend(page.runs);
        }
        merged.sort_by_key(|r| std::cmp::Reverse(r.id));
        more |= merged.len() > limit;
        merged.truncate(limit);
        Ok(RunPage {
            next: if more {
                merged.last().map(|r| r.id)
            } else {
                None
            },
            runs: merged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, devices: &[&str]) -> TokenInfo {
        let mut t = TokenInfo::internal("t1", "ci", role);
        t.devices = devices.iter().map(|d| d.to_string()).collect();
        t
    }

    #[test]
    fn a_role_below_the_one_needed_is_refused_with_both_named() {
        let e = require_role(&token(Role::Viewer, &[]), Role::Operator, "POST /x").unwrap_err();
        assert!(matches!(e, AppError::Forbidden(_)));
        assert_eq!(
            e.to_string(),
            "this token (ci) has role viewer; POST /x needs operator"
        );
        assert!(require_role(&token(Role::Admin, &[]), Role::Operator, "POST /x").is_ok());
        let scoped_admin = token(Role::Admin, &["prod-*"]);
        assert!(require_role(&scoped_admin, Role::Operator, "POST /x").is_ok());
        let e = require_role(&scoped_admin, Role::Admin, "DELETE /x").unwrap_err();
        assert!(e.to_string().contains("without a device scope"), "{e}");
    }

    #[test]
    fn pages_of_a_scoped_token_merge_its_plugins_runs_newest_first_and_leave_the_rest_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let runs = RunStore::open(&store, Default::default()).unwrap();
        let by = || crate::runs::RunTrigger::Manual { by: "t".into() };
        // Interleaved: a, b, hidden, a, b, hidden, ... oldest first.
        let mut want = Vec::new();
        for _ in 0..5 {
            for plugin in ["a", "b", "hidden"] {
                let r = runs.create(plugin, by()).unwrap();
                if plugin != "hidden" {
                    want.push(r.id);
                }
            }
        }
        want.reverse();
        let filter = PluginFilter::Only(["a".to_string(), "b".to_string()].into());
        let mut got = Vec::new();
        let mut query = RunQuery {
            limit: 3,
            ..Default::default()
        };
        loop {
            let page = filter.list_runs(&runs, &query).unwrap();
            assert!(page.runs.len() <= 3);
            got.extend(page.runs.iter().map(|r| r.id));
            match page.next {
                Some(next) => query.before = Some(next),
                None => break,
            }
        }
        assert_eq!(got, want, "every run of a and b once, newest first");
        let only_hidden = RunQuery {
            plugin: Some("hidden".into()),
            ..Default::default()
        };
        assert!(
            filter
                .list_runs(&runs, &only_hidden)
                .unwrap()
                .runs
                .is_empty()
        );
        assert_eq!(
            PluginFilter::All
                .list_runs(&runs, &only_hidden)
                .unwrap()
                .runs
                .len(),
            5
        );
    }

    #[test]
    fn a_device_outside_the_scope_reads_as_missing() {
        let t = token(Role::Operator, &["prod-*"]);
        assert!(authorize_device(&t, "prod-1").is_ok());
        let e = authorize_device(&t, "staging").unwrap_err();
        assert!(matches!(e, AppError::NotFound(_)), "{e}");
        assert!(require_unscoped(&t, "the audit log").is_err());
        assert!(require_unscoped(&token(Role::Viewer, &[]), "the audit log").is_ok());
    }
}
