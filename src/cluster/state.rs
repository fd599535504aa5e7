//! Shared configuration in cluster mode (`[cluster] shared_state = true`): devices,
//! plugins, API tokens, notifier channels and every vault secret (device credentials,
//! hook secrets, notifier URLs, plugin secrets) replicated through the JetStream KV
//! bucket `capstan_state` (`capstan_state_NAME` with `[cluster] name`), the plugins'
//! components through the object store `capstan_wasm` (`capstan_wasm_NAME`) keyed by
//! their SHA-256 (a component may exceed NATS's message size).
//!
//! Why each node keeps its sled store and vault file and the bucket only carries changes:
//! every handler, trigger and CLI command already works on the local store, so the store
//! stays each node's materialised copy of the bucket, and a node keeps working from it
//! while NATS is away.
//!
//! One entry per record ([`Key`]): `device.<uuid>` (the Device JSON), `token.<hex
//! sha256>` (TokenInfo JSON: the hash of a token, never the token), `plugin.<name>` (the
//! manifest text and the component's SHA-256), `notifier.<name>` (NotifierInfo JSON),
//! `secret.<name>` (the vault's sealed record exactly as the vault file keeps it: nonce
//! and ciphertext under the vault's data key, with the secret's name as associated data),
//! and `vault.header` (the vault header: KDF parameters and salt, or key-file mode, and the
//! data key wrapped under the master key). Nothing clear crosses NATS: every node opens
//! the sealed records with the data key it unwraps with its own passphrase or key file.
//! `pstate.<plugin>.<key>` holds one key of a plugin's key-value state (`state-set`),
//! sealed like a secret under the vault's data key (bound to its bucket key, in a
//! namespace of its own), so a plugin's next run sees its state on whichever node it
//! runs, about half a second ([`RECONCILE_EVERY`]) after the run that set it. The CLI's
//! own token (`local-cli`, minted by each node at start) stays per node.
//!
//! How changes travel:
//! - **Publish** (one seam for every family): [`SharedState::reconcile`] compares a
//!   snapshot of the local records with what this node knows the bucket holds, and puts
//!   (or deletes) what differs. It runs every [`RECONCILE_EVERY`], so every path that
//!   changes a record (API, in-process CLI, plugin install, hook rotation) is published
//!   without touching its callers.
//! - **Apply**: one task per node watches the whole bucket from the start (a node that
//!   joins late gets everything, in revision order) and applies each entry through the
//!   engine's operations: a plugin is installed and its triggers activated (without
//!   generating hook secrets: they come from the cluster), a device's cached Docker
//!   client is dropped, a deleted token stops authenticating at once.
//! - **No echo**: the node remembers each key's value as last seen in (or put into) the
//!   bucket; an entry equal to it is its own publish and is skipped, and an applied
//!   change equals it, so the next reconcile publishes nothing.
//! - **Last writer wins per key**. A value that does not parse is ignored with a
//!   warning. A value that parses but cannot be applied here (a plugin whose manifest
//!   names a device this node does not have) is logged and left; the node does not
//!   publish over it.
//! - **Join**: the bucket wins, except for what this node changed while it was stopped
//!   (the in-process CLI: `token create`, `token revoke`, …). The node keeps the SHA-256
//!   of every record as of its last sync (`DATA_DIR/cluster-state.json`, digests only);
//!   a record that differs from that digest was changed here and is published (a removal
//!   as a delete), any other difference takes the cluster's value (a record the cluster
//!   deleted is deleted here). On a node's first join, its records the bucket never had
//!   are published (the first node seeds the cluster) and the bucket wins for the rest.
//!
//! The vault: the first node puts its header in the bucket. A node adopts the cluster's
//! header when its own passphrase or key file opens it; a wrong one fails the start and
//! writes nothing. Secrets the node's vault already holds under a data key of its own (a
//! hook secret made on its first start) are re-sealed under the cluster's data key when
//! the same key opens both; a node whose vault its key does not open that way refuses to
//! start. `vault rotate-key` and `change-passphrase` are
//! per-node operations and would split the cluster's key: they are refused on a data
//! directory that holds [`DIGESTS_FILE`] (a shared-state node's, running or stopped).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::scheduler::Scheduler;

/// How often a node publishes what changed locally.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// How long the first read of the bucket may take at start.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The key of the vault header.
pub const VAULT_HEADER: &str = "vault.header";

/// Why the shared state could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("NATS: {what}: {detail}")]
    Nats { what: &'static str, detail: String },
    #[error("{0}")]
    Local(String),
    #[error(
        "this node's vault holds {secrets} secret(s) under another data key than the cluster's (bucket {bucket}): records sealed on other nodes would not open here. Start the node on an empty data directory with the cluster's passphrase or key file (the cluster's records are replicated to it), or leave out [cluster] shared_state"
    )]
    OtherDataKey { secrets: usize, bucket: String },
    #[error(
        "the vault {what} given to this node does not open the cluster's vault (vault.header in bucket {bucket}): start it with the passphrase or key file of the cluster's other nodes; nothing was changed"
    )]
    WrongKey { what: &'static str, bucket: String },
}

fn nats(what: &'static str) -> impl FnOnce(String) -> StateError {
    move |detail| StateError::Nats { what, detail }
}

fn local(e: impl std::fmt::Display) -> StateError {
    StateError::Local(e.to_string())
}

/// One replicated record's key in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Device(Uuid),
    /// The SHA-256 of a token.
    Token([u8; 32]),
    Plugin(String),
    Notifier(String),
    /// A vault secret's name, `kind/id/field`.
    Secret(String),
    VaultHeader,
    /// One key of a plugin's key-value state (`state-set`), its value sealed under the
    /// vault's data key in the bucket.
    PluginState {
        plugin: String,
        key: String,
    },
}

/// Encodes a name into the characters a KV key may hold: letters, digits, `-`, `_` and
/// `/` stay; every other byte becomes `=XX` (hex).
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.is_empty()).then_some(s)
}

impl Key {
    pub fn encode(&self) -> String {
        match self {
            Key::Device(id) => format!("device.{id}"),
            Key::Token(h) => format!("token.{}", hex::encode(h)),
            Key::Plugin(n) => format!("plugin.{}", encode(n)),
            Key::Notifier(n) => format!("notifier.{}", encode(n)),
            Key::Secret(n) => format!("secret.{}", encode(n)),
            Key::VaultHeader => VAULT_HEADER.to_string(),
            Key::PluginState { plugin, key } => {
                format!("pstate.{}.{}", encode(plugin), encode(key))
            }
        }
    }

    /// The key an entry names, or `None` for a key that is not one of Capstan's.
    pub fn parse(text: &str) -> Option<Key> {
        if text == VAULT_HEADER {
            return Some(Key::VaultHeader);
        }
        let (family, rest) = text.split_once('.')?;
        Some(match family {
            "device" => Key::Device(Uuid::parse_str(rest).ok()?),
            "token" => {
                let bytes = hex::decode(rest).ok()?;
                Key::Token(bytes.try_into().ok()?)
            }
            "plugin" => Key::Plugin(decode(rest)?),
            "notifier" => Key::Notifier(decode(rest)?),
            "pstate" => {
                let (plugin, key) = rest.split_once('.')?;
                let key = decode(key)?;
                if key.len() > crate::plugin::records::MAX_STATE_KEY {
                    return None;
                }
                Key::PluginState {
                    plugin: decode(plugin)?,
                    key,
                }
            }
            "secret" => {
                let name = decode(rest)?;
                if name.split('/').count() != 3 || name.split('/').any(str::is_empty) {
                    return None;
                }
                Key::Secret(name)
            }
            _ => return None,
        })
    }

    /// The order a node publishes in: what others depend on first (a plugin's manifest
    /// may name devices; its hooks need their secrets).
    fn rank(&self) -> u8 {
        match self {
            Key::VaultHeader => 0,
            Key::Device(_) => 1,
            Key::Secret(_) => 2,
            Key::Notifier(_) => 3,
            Key::Token(_) => 4,
            Key::Plugin(_) => 5,
            Key::PluginState { .. } => 6,
        }
    }
}

/// A plugin as the bucket holds it: its component is in the object store under `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    pub manifest: String,
    pub sha256: String,
    pub size: u64,
}

/// Checks that `value` is what a `key` entry holds; why not otherwise.
pub fn check_value(key: &Key, value: &[u8]) -> Result<(), String> {
    let json = |r: Result<(), serde_json::Error>| r.map_err(|e| e.to_string());
    match key {
        Key::Device(id) => {
            let d: crate::device::Device =
                serde_json::from_slice(value).map_err(|e| e.to_string())?;
            if d.id != *id {
                return Err(format!("the device's id {} is not the key's", d.id));
            }
            Ok(())
        }
        Key::Token(_) => json(serde_json::from_slice::<crate::token::TokenInfo>(value).map(drop)),
        Key::Plugin(name) => {
            let p: PluginEntry = serde_json::from_slice(value).map_err(|e| e.to_string())?;
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("the component's sha256 is not 64 hex digits".into());
            }
            let m = crate::plugin::Manifest::parse(&p.manifest, "plugin.toml")
                .map_err(|e| e.to_string())?;
            if m.name != *name {
                return Err(format!("the manifest names plugin {:?}", m.name));
            }
            Ok(())
        }
        Key::Notifier(_) => {
            json(serde_json::from_slice::<crate::notify::NotifierInfo>(value).map(drop))
        }
        // A sealed record is checked when it is opened (under the data key).
        Key::Secret(_) | Key::PluginState { .. } => Ok(()),
        Key::VaultHeader => json(serde_json::from_slice::<crate::vault::Header>(value).map(drop)),
    }
}

/// Every replicated record this node holds, by key.
pub fn snapshot(scheduler: &Scheduler) -> Result<BTreeMap<String, Vec<u8>>, StateError> {
    let engine = scheduler.engine();
    let mut out = BTreeMap::new();
    for d in engine.devices().and_then(|d| d.list()).map_err(local)? {
        out.insert(
            Key::Device(d.id).encode(),
            serde_json::to_vec(&d).map_err(local)?,
        );
    }
    for (hash, info) in engine.tokens.records().entries().map_err(local)? {
        if info.name == crate::app::cli_token::TOKEN_NAME {
            continue;
        }
        out.insert(
            Key::Token(hash).encode(),
            serde_json::to_vec(&info).map_err(local)?,
        );
    }
    for n in engine.notifier.list().map_err(local)? {
        out.insert(
            Key::Notifier(n.name.clone()).encode(),
            serde_json::to_vec(&n).map_err(local)?,
        );
    }
    for (name, sealed) in engine.vault.sealed_records() {
        out.insert(Key::Secret(name).encode(), sealed);
    }
    let runtime = scheduler.runtime();
    for (plugin, key, value) in runtime.state().entries().map_err(local)? {
        // Clear here (as the plugin state tree holds it): sealed when published.
        out.insert(Key::PluginState { plugin, key }.encode(), value);
    }
    for rec in runtime.installed().map_err(local)? {
        let entry = PluginEntry {
            manifest: runtime.manifest_text(&rec.name).map_err(local)?,
            sha256: rec.sha256.clone(),
            size: rec.size,
        };
        out.insert(
            Key::Plugin(rec.name).encode(),
            serde_json::to_vec(&entry).map_err(local)?,
        );
    }
    Ok(out)
}

/// This node's record under `key`, as [`snapshot`] has it. A plugin state value is read
/// on its own: plugins set state on every run, and the watch must not copy every
/// record for each such change.
fn local_value(scheduler: &Scheduler, key: &Key) -> Result<Option<Vec<u8>>, StateError> {
    match key {
        Key::PluginState { plugin, key } => {
            scheduler.runtime().state().get(plugin, key).map_err(local)
        }
        _ => Ok(snapshot(scheduler)?.remove(&key.encode())),
    }
}

/// An entry's key and value (`None`: deleted), or `None` for an entry that is not one
/// of Capstan's records or does not parse (logged) and the vault header (read at start).
/// A plugin state value is opened with `vault`'s data key: the value returned is the
/// state as the plugin stored it, as [`snapshot`] has it.
fn checked(entry: &kv::Entry, vault: &crate::vault::Vault) -> Option<(Key, Option<Vec<u8>>)> {
    let Some(key) = Key::parse(&entry.key) else {
        tracing::warn!(key = %entry.key, "cluster: an entry of the state bucket that is not Capstan's is ignored");
        return None;
    };
    if key == Key::VaultHeader {
        return None;
    }
    let value = match entry.operation {
        kv::Operation::Put => Some(entry.value.to_vec()),
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    if let Some(v) = &value
        && let Err(why) = check_value(&key, v)
    {
        tracing::warn!(key = %entry.key, revision = entry.revision, error = %why, "cluster: a state entry that does not parse is ignored");
        return None;
    }
    if let (Key::PluginState { .. }, Some(sealed)) = (&key, &value) {
        let Some(clear) = vault.open_outside(&entry.key, sealed) else {
            tracing::warn!(key = %entry.key, revision = entry.revision, "cluster: a plugin state value that does not open under this vault's data key is ignored");
            return None;
        };
        return Some((key, Some(clear.expose().to_vec())));
    }
    Some((key, value))
}

/// The file where a node keeps the SHA-256 of each record as last in step with the
/// bucket, so that at the next join it can tell its own changes made while it was away
/// (published) from records the cluster changed (applied). Digests only: no ciphertext
/// is kept beside the vault.
pub const DIGESTS_FILE: &str = "cluster-state.json";

#[derive(Serialize, Deserialize)]
struct Digests {
    bucket: String,
    digests: BTreeMap<String, String>,
}

fn digest(v: &[u8]) -> String {
    crate::plugin::cache::sha256_hex(v)
}

fn digests_path(scheduler: &Scheduler) -> std::path::PathBuf {
    scheduler.engine().settings.data_dir.join(DIGESTS_FILE)
}

/// The digests of the last sync with `bucket`; `None` when this node never synced with
/// it (a first join).
fn load_digests(path: &std::path::Path, bucket: &str) -> Option<BTreeMap<String, String>> {
    let bytes = std::fs::read(path).ok()?;
    let d: Digests = serde_json::from_slice(&bytes).ok()?;
    (d.bucket == bucket).then_some(d.digests)
}

fn save_digests(path: &std::path::Path, bucket: &str, known: &BTreeMap<String, Vec<u8>>) {
    let d = Digests {
        bucket: bucket.to_string(),
        digests: known.iter().map(|(k, v)| (k.clone(), digest(v))).collect(),
    };
    let tmp = path.with_extension("json.new");
    let written = serde_json::to_vec(&d)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cluster: cannot record the state in step with the cluster");
    }
}

/// What this node knows the bucket holds, and whether it is up to date with it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateView {
    /// The KV bucket (`capstan_state`).
    pub bucket: String,
    /// Records in the bucket as this node last saw them.
    pub records: usize,
    /// The last revision of the bucket this node applied.
    pub applied_revision: u64,
    /// The bucket's last revision.
    pub bucket_revision: u64,
    /// Whether this node has applied every change in the bucket.
    pub up_to_date: bool,
}

/// A node's link to the shared state.
pub struct SharedState {
    kv: kv::Store,
    wasm: object_store::ObjectStore,
    bucket: String,
    /// Each key's value as last seen in, or put into, the bucket. Held while a change
    /// is applied or published, so the two never interleave.
    known: tokio::sync::Mutex<BTreeMap<String, Vec<u8>>>,
    applied: AtomicU64,
    records: AtomicUsize,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// The bucket and object store names for cluster `name`.
pub fn names(name: Option<&str>) -> (String, String) {
    match name {
        None => ("capstan_state".into(), "capstan_wasm".into()),
        Some(n) => (format!("capstan_state_{n}"), format!("capstan_wasm_{n}")),
    }
}

/// Opens (the first node: creates) the state bucket and the component store.
pub async fn open(
    js: &jetstream::Context,
    name: Option<&str>,
    replicas: usize,
) -> Result<SharedState, StateError> {
    let (bucket, store) = names(name);
    let kv = super::retry::kv_bucket(
        js,
        kv::Config {
            bucket: bucket.clone(),
            description:
                "Capstan shared configuration: devices, plugins, tokens, notifiers, sealed secrets"
                    .into(),
            history: 5,
            num_replicas: replicas,
            ..Default::default()
        },
        "creating the state bucket",
    )
    .await
    .map_err(|e| StateError::Local(e.to_string()))?;
    let wasm = match js.get_object_store(&store).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: store.clone(),
                description: Some("Capstan plugin components by SHA-256".into()),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the component store")(e.to_string()))?,
    };
    Ok(SharedState {
        kv,
        wasm,
        bucket,
        known: tokio::sync::Mutex::new(BTreeMap::new()),
        applied: AtomicU64::new(0),
        records: AtomicUsize::new(0),
    })
}

impl SharedState {
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Before the engine opens its vault: makes this data directory's vault the
    /// cluster's, or refuses (see the module docs). Writes nothing unless the node's key
    /// opens the cluster's header.
    pub async fn prepare_vault(
        &self,
        settings: &crate::config::Settings,
        pass: &crate::engine::PassphraseInput,
    ) -> anyhow::Result<()> {
        let Some(bytes) = self
            .kv
            .get(VAULT_HEADER)
            .await
            .map_err(|e| nats("reading the vault header")(e.to_string()))?
        else {
            return Ok(());
        };
        let header: crate::vault::Header = serde_json::from_slice(&bytes).map_err(|e| {
            StateError::Local(format!(
                "the cluster's vault header (bucket {}) is unreadable: {e}",
                self.bucket
            ))
        })?;
        let store = crate::store::Store::open(&settings.data_dir)?;
        let stored = crate::vault::read_stored(&store)?;
        if let Some(c) = &stored
            && c.header.wrapped_data_key() == header.wrapped_data_key()
            && c.header.generation == header.generation
        {
            return Ok(());
        }
        let source = crate::engine::key_source_for(settings, &header.protection, pass)?;
        match crate::vault::adopt_header(&store, &header, &source) {
            Ok(resealed) => {
                tracing::info!(bucket = %self.bucket, resealed, "cluster: this node's vault now is the cluster's (the same data key; its own secrets re-sealed under it)");
                Ok(())
            }
            Err(crate::vault::VaultError::AlreadyInitialized) => Err(StateError::OtherDataKey {
                secrets: stored.as_ref().map_or(0, |c| c.sealed.len()),
                bucket: self.bucket.clone(),
            }
            .into()),
            Err(crate::vault::VaultError::WrongKey(what)) => Err(StateError::WrongKey {
                what,
                bucket: self.bucket.clone(),
            }
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Puts this node's vault header in the bucket when the bucket has none (the first
    /// node); checks that the node's vault is the cluster's otherwise.
    async fn publish_header(&self, vault: &crate::vault::Vault) -> Result<(), StateError> {
        let value = serde_json::to_vec(vault.header()).map_err(local)?;
        match self.kv.create(VAULT_HEADER, value.into()).await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "cluster: this node's vault header is the cluster's");
                Ok(())
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let theirs = self
                    .kv
                    .get(VAULT_HEADER)
                    .await
                    .map_err(|e| nats("reading the vault header")(e.to_string()))?
                    .and_then(|b| serde_json::from_slice::<crate::vault::Header>(&b).ok());
                match theirs {
                    Some(h) if vault.shares_data_key_with(&h) => Ok(()),
                    _ => Err(StateError::OtherDataKey {
                        secrets: vault.len(),
                        bucket: self.bucket.clone(),
                    }),
                }
            }
            Err(e) => Err(nats("putting the vault header")(e.to_string())),
        }
    }

    /// At start, before the API listens: the vault header checked (or published), every
    /// entry of the bucket applied, then this node's records the bucket lacks published.
    /// Returns the watch that goes on with the changes after those (for [`Self::run`]).
    pub async fn sync(&self, scheduler: &Arc<Scheduler>) -> Result<kv::Watch, StateError> {
        self.publish_header(&scheduler.engine().vault).await?;
        let mut status = self
            .kv
            .status()
            .await
            .map_err(|e| nats("reading the state bucket")(e.to_string()))?;
        // The last value of every key (delete markers included), then every change.
        let mut watch = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| nats("watching the state bucket")(e.to_string()))?;
        // The bucket's last value (or delete marker) of every key.
        let mut bucket: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        if status.values() > 0 {
            let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
            loop {
                let next = tokio::time::timeout_at(deadline, watch.next())
                    .await
                    .map_err(|_| nats("reading the state bucket")("timed out".into()))?;
                let entry = match next {
                    Some(Ok(entry)) => entry,
                    Some(Err(e)) => return Err(nats("reading the state bucket")(e.to_string())),
                    None => return Err(nats("reading the state bucket")("the watch ended".into())),
                };
                let last = entry.delta == 0;
                self.applied.fetch_max(entry.revision, Ordering::Relaxed);
                if let Some((key, value)) = checked(&entry, &scheduler.engine().vault) {
                    bucket.insert(key.encode(), value);
                }
                if last {
                    break;
                }
            }
        }
        let path = digests_path(scheduler);
        let synced = load_digests(&path, &self.bucket);
        let here = snapshot(scheduler)?;
        let mut known = self.known.lock().await;
        for (k, v) in &bucket {
            if let Some(v) = v {
                known.insert(k.clone(), v.clone());
            }
        }
        let keys: std::collections::BTreeSet<&String> = bucket.keys().chain(here.keys()).collect();
        for k in keys {
            let theirs = bucket.get(k).and_then(Option::as_ref);
            let mine = here.get(k);
            if theirs == mine {
                continue;
            }
            // Changed here since the last sync (or, on a first join, absent from the
            // bucket): this node's record wins and is published by the reconcile below.
            let changed_here = match &synced {
                Some(d) => d.get(k) != mine.map(|v| digest(v)).as_ref(),
                None => !bucket.contains_key(k),
            };
            if changed_here {
                continue;
            }
            let Some(key) = Key::parse(k) else { continue };
            if let Err(e) = self.apply(scheduler, &key, theirs.map(Vec::as_slice)).await {
                tracing::warn!(key = %k, error = %e, "cluster: a record of the cluster cannot be applied on this node; it keeps its own");
                match mine {
                    Some(v) => known.insert(k.clone(), v.clone()),
                    None => known.remove(k),
                };
            }
        }
        drop(known);
        self.reconcile(scheduler).await?;
        status = self
            .kv
            .status()
            .await
            .map_err(|e| nats("reading the state bucket")(e.to_string()))?;
        tracing::info!(
            bucket = %self.bucket,
            records = self.records.load(Ordering::Relaxed),
            revision = status.info.state.last_sequence,
            "cluster: shared state in step"
        );
        Ok(watch)
    }

    /// Applies the bucket's changes and publishes this node's until `stopped`.
    pub async fn run(
        self: Arc<Self>,
        scheduler: Arc<Scheduler>,
        mut watch: kv::Watch,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        let mut every = tokio::time::interval(RECONCILE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = every.tick() => {
                    if let Err(e) = self.reconcile(&scheduler).await {
                        tracing::warn!(error = %e, "cluster: cannot publish this node's configuration changes; retrying");
                    }
                }
                next = watch.next() => match next {
                    Some(Ok(entry)) => self.handle(&scheduler, entry).await,
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!(error = %e, "cluster: the state watch failed; watching again");
                        }
                        let from = self.applied.load(Ordering::Relaxed) + 1;
                        match self.kv.watch_all_from_revision(from).await {
                            Ok(w) => watch = w,
                            Err(e) => {
                                tracing::warn!(error = %e, "cluster: cannot watch the state bucket; retrying");
                                tokio::select! {
                                    _ = &mut stopped => return,
                                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                }
                            }
                        }
                    }
                },
            }
        }
    }

    /// One entry from the bucket: checked, then applied unless it is this node's own.
    async fn handle(&self, scheduler: &Arc<Scheduler>, entry: kv::Entry) {
        self.applied.fetch_max(entry.revision, Ordering::Relaxed);
        let Some((key, value)) = checked(&entry, &scheduler.engine().vault) else {
            return;
        };
        let mut known = self.known.lock().await;
        let name = key.encode();
        if known.get(&name) == value.as_ref() {
            return;
        }
        match &value {
            Some(v) => known.insert(name.clone(), v.clone()),
            None => known.remove(&name),
        };
        self.records.store(known.len(), Ordering::Relaxed);
        let here = match local_value(scheduler, &key) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot read this node's records");
                return;
            }
        };
        if here == value {
            return;
        }
        if let Err(e) = self.apply(scheduler, &key, value.as_deref()).await {
            tracing::warn!(key = %name, revision = entry.revision, error = %e, "cluster: a change from the cluster cannot be applied on this node; it keeps its own record and does not publish it");
            // What the node has stays out of the next publish.
            match here {
                Some(v) => known.insert(name, v),
                None => known.remove(&name),
            };
        } else {
            tracing::info!(key = %name, revision = entry.revision, "cluster: applied a configuration change");
        }
        save_digests(&digests_path(scheduler), &self.bucket, &known);
    }

    /// Makes the local record under `key` be `value` (`None`: removed), through the
    /// engine's operations.
    async fn apply(
        &self,
        scheduler: &Arc<Scheduler>,
        key: &Key,
        value: Option<&[u8]>,
    ) -> Result<(), StateError> {
        let engine = scheduler.engine();
        match key {
            Key::VaultHeader => Ok(()),
            Key::Device(id) => {
                let recs =
                    crate::store::devices::DeviceRecords::open(&engine.store).map_err(local)?;
                let old = recs.get(*id).map_err(local)?;
                match value {
                    Some(v) => {
                        let dev: crate::device::Device =
                            serde_json::from_slice(v).map_err(local)?;
                        let put = recs
                            .put(old.as_ref().map(|d| d.name.as_str()), &dev)
                            .map_err(local)?;
                        if put == crate::store::devices::Put::NameTaken {
                            // The cluster's device of that name wins over this node's own.
                            if let Some(other) = recs.id_of(&dev.name).map_err(local)? {
                                recs.remove(other, &dev.name).map_err(local)?;
                                engine.docker.forget(other);
                            }
                            recs.put(old.as_ref().map(|d| d.name.as_str()), &dev)
                                .map_err(local)?;
                        }
                    }
                    None => {
                        if let Some(old) = &old {
                            recs.remove(*id, &old.name).map_err(local)?;
                        }
                    }
                }
                engine.docker.forget(*id);
                Ok(())
            }
            Key::Token(hash) => {
                let recs = engine.tokens.records();
                match value {
                    Some(v) => {
                        let info: crate::token::TokenInfo =
                            serde_json::from_slice(v).map_err(local)?;
                        recs.put(hash, &info).map_err(local)
                    }
                    None => recs.remove(hash).map(drop).map_err(local),
                }
            }
            Key::Notifier(name) => {
                let recs =
                    crate::store::notifiers::NotifierRecords::open(&engine.store).map_err(local)?;
                match value {
                    Some(v) => {
                        let info: crate::notify::NotifierInfo =
                            serde_json::from_slice(v).map_err(local)?;
                        recs.put(&info).map_err(local)
                    }
                    None => recs.remove(name).map(drop).map_err(local),
                }
            }
            Key::Secret(name) => {
                match value {
                    Some(v) => engine.vault.put_sealed(name, v).map(drop).map_err(local)?,
                    None => engine.vault.remove_named(name).map(drop).map_err(local)?,
                }
                let mut parts = name.splitn(3, '/');
                match (parts.next(), parts.next()) {
                    (Some(crate::trigger::webhook::SECRET_KIND), Some(hook)) => {
                        let hook = hook.to_string();
                        let s = scheduler.clone();
                        tokio::task::block_in_place(|| s.plugins().refresh_hook(&hook))
                            .map_err(local)?;
                    }
                    (Some(crate::device::VAULT_KIND), Some(id)) => {
                        if let Ok(id) = Uuid::parse_str(id) {
                            engine.docker.forget(id);
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            Key::PluginState { plugin, key } => {
                let state = scheduler.runtime().state();
                match value {
                    // The plugin's quota held where the value was set.
                    Some(v) => state.set(plugin, key, v, u64::MAX).map(drop),
                    None => state.delete(plugin, key),
                }
                .map_err(local)
            }
            Key::Plugin(name) => match value {
                Some(v) => {
                    let entry: PluginEntry = serde_json::from_slice(v).map_err(local)?;
                    let wasm = self.component(&entry).await?;
                    let src = crate::plugin::PluginSource {
                        manifest: entry.manifest,
                        manifest_file: crate::plugin::manifest::MANIFEST_FILE.to_string(),
                        wasm,
                        wasm_file: format!("{name}.wasm"),
                    };
                    let s = scheduler.clone();
                    tokio::task::block_in_place(|| s.plugins().install_replicated(&src))
                        .map(drop)
                        .map_err(local)
                }
                None => {
                    if scheduler.runtime().installed_plugin(name).is_ok() {
                        let s = scheduler.clone();
                        tokio::task::block_in_place(|| s.plugins().remove(name))
                            .map(drop)
                            .map_err(local)?;
                    }
                    Ok(())
                }
            },
        }
    }

    /// A plugin's component from the object store, checked against its SHA-256.
    async fn component(&self, entry: &PluginEntry) -> Result<Vec<u8>, StateError> {
        let mut object = self
            .wasm
            .get(&entry.sha256)
            .await
            .map_err(|e| nats("reading a plugin component")(e.to_string()))?;
        let mut wasm = Vec::with_capacity(entry.size as usize);
        object
            .read_to_end(&mut wasm)
            .await
            .map_err(|e| nats("reading a plugin component")(e.to_string()))?;
        if crate::plugin::cache::sha256_hex(&wasm) != entry.sha256 {
            return Err(StateError::Local(format!(
                "the component {} in the object store does not have that SHA-256",
                entry.sha256
            )));
        }
        Ok(wasm)
    }

    /// Publishes every local record that differs from what the bucket holds, and deletes
    /// what this node no longer has.
    pub async fn reconcile(&self, scheduler: &Arc<Scheduler>) -> Result<(), StateError> {
        let mut known = self.known.lock().await;
        let snap = snapshot(scheduler)?;
        let mut changed: Vec<(Key, &String, &Vec<u8>)> = snap
            .iter()
            .filter(|(k, v)| known.get(*k) != Some(*v))
            .filter_map(|(k, v)| Key::parse(k).map(|key| (key, k, v)))
            .collect();
        changed.sort_by_key(|(key, k, _)| (key.rank(), (*k).clone()));
        let mut dirty = !changed.is_empty();
        for (key, k, v) in changed {
            if let Key::Plugin(name) = &key {
                let entry: PluginEntry = serde_json::from_slice(v).map_err(local)?;
                if self.wasm.info(&entry.sha256).await.is_err() {
                    let src = scheduler.runtime().source_of(name).map_err(local)?;
                    self.wasm
                        .put(entry.sha256.as_str(), &mut src.wasm.as_slice())
                        .await
                        .map_err(|e| nats("storing a plugin component")(e.to_string()))?;
                }
            }
            let value = match &key {
                Key::PluginState { .. } => scheduler.engine().vault.seal_outside(k, v),
                _ => v.clone(),
            };
            self.kv
                .put(k, value.into())
                .await
                .map_err(|e| nats("publishing a configuration change")(e.to_string()))?;
            tracing::debug!(key = %k, "cluster: published a configuration change");
            known.insert(k.clone(), v.clone());
        }
        let gone: Vec<String> = known
            .keys()
            .filter(|k| !snap.contains_key(*k))
            .cloned()
            .collect();
        dirty |= !gone.is_empty();
        for k in gone {
            self.kv
                .delete(&k)
                .await
                .map_err(|e| nats("publishing a removal")(e.to_string()))?;
            tracing::debug!(key = %k, "cluster: published a removal");
            known.remove(&k);
        }
        self.records.store(known.len(), Ordering::Relaxed);
        if dirty {
            save_digests(&digests_path(scheduler), &self.bucket, &known);
        }
        Ok(())
    }

    /// The view for `capstan cluster status`.
    pub async fn view(&self) -> Result<StateView, StateError> {
        let status = self
            .kv
            .status()
            .await
            .map_err(|e| nats("reading the state bucket")(e.to_string()))?;
        let bucket_revision = status.info.state.last_sequence;
        let applied_revision = self.applied.load(Ordering::Relaxed);
        Ok(StateView {
            bucket: self.bucket.clone(),
            records: self.records.load(Ordering::Relaxed),
            applied_revision,
            bucket_revision,
            up_to_date: applied_revision >= bucket_revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_encode_and_decode_for_every_family() {
        let id = Uuid::new_v4();
        let cases = [
            Key::Device(id),
            Key::Token([7u8; 32]),
            Key::Plugin("check-health".into()),
            Key::Notifier("ops team.1".into()),
            Key::Secret(format!("device/{id}/password")),
            Key::Secret("hook/gh.push/current".into()),
            Key::VaultHeader,
            Key::PluginState {
                plugin: "crashloop".into(),
                key: "restarts/web.1 x".into(),
            },
        ];
        for key in cases {
            let text = key.encode();
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_/=.".contains(&b)),
                "{text} holds a character a KV key may not"
            );
            assert_eq!(Key::parse(&text), Some(key.clone()), "{text}");
        }
        // A dot inside a name is escaped, so the family is always the first part.
        assert_eq!(Key::Notifier("a.b".into()).encode(), "notifier.a=2Eb");
        assert_eq!(
            Key::PluginState {
                plugin: "p".into(),
                key: "a.b".into()
            }
            .encode(),
            "pstate.p.a=2Eb"
        );
        // A state key longer than a plugin may set is not Capstan's.
        let long = format!("pstate.p.{}", "k".repeat(257));
        assert_eq!(Key::parse(&long), None);
        assert_eq!(
            Key::Token([0xab; 32]).encode(),
            format!("token.{}", "ab".repeat(32))
        );
    }

    #[test]
    fn keys_that_are_not_capstans_are_refused() {
        for bad in [
            "",
            "device",
            "device.not-a-uuid",
            "token.abcd",
            "token.zz",
            "plugin.",
            "plugin.a=G0",
            "plugin.a=4",
            "secret.only/two",
            "secret.a//b",
            "other.x",
            "vault.other",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn values_that_do_not_parse_are_refused_per_family() {
        let id = Uuid::new_v4();
        assert!(check_value(&Key::Device(id), b"{").is_err());
        assert!(check_value(&Key::Token([1; 32]), b"[]").is_err());
        assert!(check_value(&Key::Notifier("n".into()), b"null").is_err());
        let entry = |manifest: &str, sha: &str| {
            serde_json::to_vec(&PluginEntry {
                manifest: manifest.into(),
                sha256: sha.into(),
                size: 1,
            })
            .unwrap()
        };
        let good = "name = \"p\"\nversion = \"1\"\n";
        assert!(check_value(&Key::Plugin("p".into()), &entry(good, &"a".repeat(64))).is_ok());
        // Another name in the manifest than the key's, a bad hash, a bad manifest.
        assert!(check_value(&Key::Plugin("q".into()), &entry(good, &"a".repeat(64))).is_err());
        assert!(check_value(&Key::Plugin("p".into()), &entry(good, "abc")).is_err());
        assert!(check_value(&Key::Plugin("p".into()), &entry("name = ", &"a".repeat(64))).is_err());
    }

    /// The no-echo rule on a scratch engine: what this node publishes equals what it
    /// applies, so an applied record is not published back, and a local change is.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_applied_record_reads_back_as_the_published_value() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(crate::engine::Engine::scratch(dir.path()));
        let scheduler = Scheduler::with_defaults(engine.clone()).unwrap();
        let (_token, info) = engine.tokens.create("ci").unwrap();
        let before = snapshot(&scheduler).unwrap();
        let (key, value) = before
            .iter()
            .find(|(k, _)| k.starts_with("token."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        let Some(Key::Token(hash)) = Key::parse(&key) else {
            panic!("{key}")
        };
        // Removed here, then the cluster's value applied: it reads back byte for byte.
        engine.tokens.records().remove(&hash).unwrap();
        assert!(!snapshot(&scheduler).unwrap().contains_key(&key));
        let back: crate::token::TokenInfo = serde_json::from_slice(&value).unwrap();
        assert_eq!(back.id, info.id);
        engine.tokens.records().put(&hash, &back).unwrap();
        assert_eq!(snapshot(&scheduler).unwrap().get(&key), Some(&value));
        // The CLI's own token is never replicated.
        crate::app::cli_token::mint(&engine.tokens).unwrap();
        let after = snapshot(&scheduler).unwrap();
        assert_eq!(
            after.keys().filter(|k| k.starts_with("token.")).count(),
            1,
            "{after:?}"
        );
        // A sealed secret travels as the vault stores it and is stored back as is.
        let name = crate::vault::SecretName::new("hook", "gh", "current");
        engine
            .vault
            .put(
                &name,
                &crate::secret::Secret::from_str_owned("s3cret-value-long".into()),
            )
            .unwrap();
        let snap = snapshot(&scheduler).unwrap();
        let sealed = snap.get("secret.hook/gh/current").unwrap().clone();
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        engine.vault.remove_named("hook/gh/current").unwrap();
        assert!(engine.vault.put_sealed("hook/gh/current", &sealed).unwrap());
        assert!(!engine.vault.put_sealed("hook/gh/current", &sealed).unwrap());
        assert_eq!(
            snapshot(&scheduler).unwrap().get("secret.hook/gh/current"),
            Some(&sealed)
        );
        // A record sealed under another name does not go in.
        assert!(
            engine
                .vault
                .put_sealed("hook/other/current", &sealed)
                .is_err()
        );
    }
}
