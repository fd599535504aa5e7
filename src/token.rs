//! API bearer tokens, stored hashed.
//!
//! A token is `cap_<id>_<secret>`: the id (8 hex digits) names it in listings and
//! revocation; the whole token is hashed with SHA-256 and only the hash is stored, so the
//! database never holds a usable token. A token is shown once, when created.
//!
//! Each token has a [`Role`] (`admin`, `operator`, `viewer`) and optionally a device scope
//! (globs in the plugin policies' vocabulary, e.g. `prod-*`): the API and the dashboard
//! check both alike, through [`TokenInfo::allows`] and [`TokenInfo::sees_device`].
//! Records written before roles existed read back as `admin` of every device, which is
//! what those tokens could do.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;
use crate::store::tokens::TokenRecords;
use crate::store::{Store, StoreError};

/// What a token may do. Ordered: each role may do everything the one below it may.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: devices, containers, plugins, runs, hooks (never a secret).
    Viewer,
    /// Read, run plugins and check devices.
    Operator,
    /// Everything, including changing devices, plugins, hooks, notifiers and the vault.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected admin, operator or viewer"
            )),
        }
    }
}

fn admin() -> Role {
    Role::Admin
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// What the token may do (records from before roles: `admin`).
    #[serde(default = "admin")]
    pub role: Role,
    /// Device globs the token is limited to; empty: every device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl TokenInfo {
    /// A record for a caller that is not a stored token (the in-process CLI): `role` on
    /// every device.
    pub fn internal(id: &str, name: &str, role: Role) -> TokenInfo {
        TokenInfo {
            id: id.to_string(),
            name: name.to_string(),
            created_at: Utc::now(),
            role,
            devices: Vec::new(),
        }
    }

    /// Whether the token's role is `need` or above.
    pub fn allows(&self, need: Role) -> bool {
        self.role >= need
    }

    /// Whether the token is limited to some devices.
    pub fn is_device_scoped(&self) -> bool {
        !self.devices.is_empty()
    }

    /// Whether every device a plugin with device scope `patterns` may reach is one this
    /// token sees: so a device-scoped token can run (or see the runs of) only plugins
    /// that cannot touch other devices. Sound, not complete: a plugin pattern is covered
    /// when the token has the same pattern, or a `prefix*` glob (no other wildcard) whose
    /// prefix the plugin pattern starts with. A plugin with no device covers nothing and
    /// is always covered.
    pub fn covers_devices<'a>(&self, patterns: impl IntoIterator<Item = &'a str>) -> bool {
        if self.devices.is_empty() {
            return true;
        }
        patterns.into_iter().all(|p| {
            self.devices.iter().any(|g| {
                g == p
                    || g.strip_suffix('*')
                        .is_some_and(|prefix| !prefix.contains(['*', '?']) && p.starts_with(prefix))
            })
        })
    }

    /// Whether the token may see and act on device `name` (its role permitting).
    pub fn sees_device(&self, name: &str) -> bool {
        self.devices.is_empty()
            || self
                .devices
                .iter()
                .any(|p| capstan_policy::Glob::new(p, "device").is_ok_and(|g| g.matches(name)))
    }
}

#[derive(Clone)]
pub struct Tokens {
    records: TokenRecords,
}

fn hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    pub fn new(store: &Store) -> Result<Tokens, StoreError> {
        Ok(Tokens {
            records: TokenRecords::open(store)?,
        })
    }

    /// Creates an `admin` token of every device; returns it (show it once) and its record.
    pub fn create(&self, name: &str) -> Result<(Secret, TokenInfo), StoreError> {
        self.create_with(name, Role::Admin, Vec::new())
    }

    /// Creates a token with `role`, limited to the device globs `devices` (empty: every
    /// device; each must be a valid glob, see [`capstan_policy::Glob`]).
    pub fn create_with(
        &self,
        name: &str,
        role: Role,
        devices: Vec<String>,
    ) -> Result<(Secret, TokenInfo), StoreError> {
        let mut id = [0u8; 4];
        let mut secret = zeroize::Zeroizing::new([0u8; 24]);
        crate::vault::crypto::random_fill(&mut id);
        crate::vault::crypto::random_fill(&mut secret[..]);
        let token = Secret::from_str_owned(format!(
            "cap_{}_{}",
            hex::encode(id),
            hex::encode(&secret[..])
        ));
        let info = TokenInfo {
            id: hex::encode(id),
            name: name.to_string(),
            created_at: Utc::now(),
            role,
            devices,
        };
        self.records.put(&hash(token.expose()), &info)?;
        Ok((token, info))
    }

    /// Looks a presented token up by its hash.
    pub fn verify(&self, presented: &[u8]) -> Result<Option<TokenInfo>, StoreError> {
        if !presented.starts_with(b"cap_") {
            return Ok(None);
        }
        self.records.get(&hash(presented))
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut v = self.records.list()?;
        v.sort_by_key(|a| a.created_at);
        Ok(v)
    }

    /// The stored records (for cluster replication: hashes, never tokens).
    pub fn records(&self) -> &TokenRecords {
        &self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Revokes every token whose id or name is `id_or_name`; returns how many.
    pub fn revoke(&self, id_or_name: &str) -> Result<usize, StoreError> {
        self.records
            .remove_where(|info| info.id == id_or_name || info.name == id_or_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_each_allows_the_ones_below() {
        let t = |role| TokenInfo::internal("x", "x", role);
        assert!(t(Role::Admin).allows(Role::Operator));
        assert!(t(Role::Operator).allows(Role::Viewer));
        assert!(!t(Role::Operator).allows(Role::Admin));
        assert!(!t(Role::Viewer).allows(Role::Operator));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("admin, operator or viewer")
        );
    }

    #[test]
    fn a_device_scoped_token_sees_only_matching_devices() {
        let mut t = TokenInfo::internal("x", "x", Role::Viewer);
        assert!(t.sees_device("prod-1") && !t.is_device_scoped());
        t.devices = vec!["prod-*".into(), "local".into()];
        assert!(t.sees_device("prod-1"));
        assert!(t.sees_device("local"));
        assert!(!t.sees_device("staging-1"));
        assert!(!t.sees_device("localhost"));
    }

    #[test]
    fn a_device_scoped_token_covers_a_plugin_only_when_no_other_device_is_reachable() {
        let mut t = TokenInfo::internal("x", "x", Role::Operator);
        assert!(t.covers_devices(["*"]));
        t.devices = vec!["prod-*".into(), "local".into(), "db-?".into()];
        assert!(t.covers_devices(["prod-1", "prod-web-*", "local"]));
        assert!(t.covers_devices(["prod-*"]));
        assert!(t.covers_devices(std::iter::empty()));
        assert!(t.covers_devices(["db-?"]));
        assert!(!t.covers_devices(["*"]));
        assert!(!t.covers_devices(["prod-1", "staging"]));
        assert!(!t.covers_devices(["loc*"]));
        // `db-?` matches the text `db-*` but not every device `db-*` reaches.
        assert!(!t.covers_devices(["db-*"]));
    }
}
