//! Notifications: telling people what the engine and its plugins did.
//!
//! The operator configures **channels** (`capstan notifier add ops --url-file …`): a
//! name and a URL in the style of shoutrrr and Apprise ([`channel`]: ntfy, Slack,
//! Discord, Gotify, Teams, a generic JSON webhook, email over SMTP). The URL holds the
//! service's token, so it is a secret: sealed in the vault (`notifier/<name>/url`), never
//! shown, logged or returned; the `notifiers` tree keeps only what may be shown
//! ([`NotifierInfo`]: name, service, scheme and host).
//!
//! Notifications reach a channel two ways, both through [`Notifier::send`]:
//! - a plugin calls `host.notify(channel, notification)`, allowed only for the channels
//!   its manifest's `[notify] channels` names (the decision point, in
//!   `plugin/host/host.rs`; recorded as the run's host call `host.notify`);
//! - without plugin code, when a run ends with a status listed in `[notify] on` — in
//!   the plugin's manifest or in the engine config for every plugin ([`attach`]
//!   registers the run-end listener).
//!
//! On the way the engine drops a notification whose dedup key it saw for the same plugin
//! and channel within `notify.dedup_window`, holds each channel to `notify.rate_limit`,
//! and queues the rest (at most `notify.max_queue`; bounded memory). A background task
//! delivers from the queue, a few at a time, each attempt bounded by `notify.timeout`,
//! retrying what may succeed later (unreachable, timeouts, 5xx, 429) up to
//! `notify.max_attempts` with doubling back-off from `notify.retry_backoff`. Every final
//! outcome is written to the audit log (op `notify.delivery`, `GET /api/audit`) and
//! counted in `capstan_notifications_total{channel, result}`.
//!
//! Queued notifications live in memory: at shutdown the engine waits a few seconds for
//! them (so the runs it interrupted are still told of); those not delivered by then are
//! lost (the audit shows what was delivered).

pub mod channel;
pub mod send;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

pub use channel::{Channel, ChannelError, Service};

use crate::metrics::Metrics;
use crate::plugin::records::{Audit, AuditRecord};
use crate::plugin::report::{CallDecision, HostCall};
use crate::runs::{RunRecord, RunStatus, RunTrigger};
use crate::scheduler::Scheduler;
use crate::secret::Secret;
use crate::store::notifiers::NotifierRecords;
use crate::store::{Store, StoreError};
use crate::trigger::webhook::RateLimitConfig;
use crate::trigger::webhook::ratelimit::TokenBucket;
use crate::vault::{SecretName, Vault};

/// The vault's record kind for channel URLs: `notifier/<name>/url`.
const VAULT_KIND: &str = "notifier";
const VAULT_FIELD: &str = "url";

/// Bounds on one notification, bytes (tags: count).
pub const MAX_TITLE: usize = 256;
pub const MAX_MESSAGE: usize = 8 * 1024;
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG: usize = 64;
pub const MAX_DEDUP_KEY: usize = 256;
/// Dedup keys remembered at once; past it, expired ones are dropped first.
const MAX_DEDUP_KEYS: usize = 10_000;
/// Deliveries under way at once.
const MAX_IN_FLIGHT: usize = 8;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How urgent a notification is; each service maps it to its own scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Normal,
    High,
    Urgent,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

/// One notification as it is delivered (and as the generic webhook receives it).
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub title: String,
    pub message: String,
    pub priority: Priority,
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_key: Option<String>,
    /// The plugin it is about (that sent it, or whose run ended).
    pub plugin: String,
    /// The run it is about: the run that sent it, or the one whose end it tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The channel it went to.
    pub channel: String,
    pub time: DateTime<Utc>,
}

impl Message {
    /// Checks the bounds; the error names the one exceeded.
    pub fn check(&self) -> Result<(), String> {
        if self.title.trim().is_empty() {
            return Err("the title is empty".into());
        }
        let over = |what: &str, len: usize, max: usize| {
            (len > max).then(|| format!("the {what} has {len} bytes, more than {max}"))
        };
        if let Some(e) = over("title", self.title.len(), MAX_TITLE)
            .or_else(|| over("message", self.message.len(), MAX_MESSAGE))
            .or_else(|| {
                self.dedup_key
                    .as_ref()
                    .and_then(|k| over("dedup key", k.len(), MAX_DEDUP_KEY))
            })
        {
            return Err(e);
        }
        if self.tags.len() > MAX_TAGS {
            return Err(format!("{} tags, more than {MAX_TAGS}", self.tags.len()));
        }
        if let Some(t) = self.tags.iter().find(|t| t.len() > MAX_TAG) {
            return Err(format!("a tag has {} bytes, more than {MAX_TAG}", t.len()));
        }
        Ok(())
    }

    /// An email's subject.
    pub fn subject(&self) -> String {
        format!("[capstan] {}", self.title.replace(['\r', '\n'], " "))
    }

    /// An email's body: the message, then what it is about.
    pub fn mail_body(&self) -> String {
        let mut s = format!(
            "{}\n\n-- \npriority: {}",
            self.message,
            self.priority.as_str()
        );
        if !self.tags.is_empty() {
            s.push_str(&format!("\ntags: {}", self.tags.join(", ")));
        }
        s.push_str(&format!("\nplugin: {}", self.plugin));
        if let Some(r) = &self.run_id {
            s.push_str(&format!("\nrun: {r}"));
        }
        s
    }
}

/// What may be shown of a channel: never its URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NotifierInfo {
    /// The channel's name, as manifests and `host.notify` name it.
    #[schema(example = "ops")]
    pub name: String,
    /// The service it reaches.
    pub service: Service,
    /// Scheme, host and port of the URL (no path, user, token or query).
    #[schema(example = "ntfy://ntfy.sh")]
    pub at: String,
    pub added_at: DateTime<Utc>,
}

/// What became of a notification handed to [`Notifier::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Its dedup key was seen within the window.
    Duplicate,
    /// The channel's rate limit is reached.
    RateLimited,
    /// The delivery queue is full.
    QueueFull,
}

impl Sent {
    pub fn as_str(self) -> &'static str {
        match self {
            Sent::Queued => "queued",
            Sent::Duplicate => "duplicate",
            Sent::RateLimited => "rate-limited",
            Sent::QueueFull => "queue-full",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "no notifier channel named `{0}`: add it with `capstan notifier add {0} --url-file FILE`"
    )]
    NotFound(String),
    #[error("a notifier channel named `{0}` exists: remove it first (`capstan notifier rm {0}`)")]
    Duplicate(String),
    #[error(
        "`{0}` is not a channel name: use letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 64 characters"
    )]
    BadName(String),
    #[error("invalid channel URL: {0}")]
    Url(#[from] ChannelError),
    #[error("invalid notification: {0}")]
    Invalid(String),
    /// A test message was not delivered; says why (never the URL).
    #[error("{0}")]
    Undelivered(String),
    #[error("notifier storage failed: {0}")]
    Storage(String),
}

impl From<StoreError> for NotifyError {
    fn from(e: StoreError) -> Self {
        NotifyError::Storage(e.to_string())
    }
}

impl From<crate::vault::VaultError> for NotifyError {
    fn from(e: crate::vault::VaultError) -> Self {
        NotifyError::Storage(e.to_string())
    }
}

/// Channel names: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_name(name: &str) -> Result<(), NotifyError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(NotifyError::BadName(name.chars().take(64).collect()))
    }
}

/// The `[notify]` table of a plugin's manifest.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// The notifier channels this plugin may send to with `host.notify`, and that its
    /// run-end notifications (`on`) go to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Run statuses that send a notification to `channels` when a run ends that way,
    /// without plugin code: `failed`, `timed-out`, `denied`, `interrupted`, `ok`.
    #[serde(default)]
    pub on: Vec<RunStatus>,
}

impl NotifySpec {
    /// Checks names and statuses; the error is (field, message).
    pub fn validate(&self, table: &str) -> Result<(), (String, String)> {
        for (i, c) in self.channels.iter().enumerate() {
            if !valid_name(c) {
                return Err((
                    format!("{table}.channels[{i}]"),
                    format!(
                        "`{c}` is not a channel name (letters, digits, `.`, `_`, `-`; at most 64)"
                    ),
                ));
            }
        }
        if let Some(s) = self.on.iter().find(|s| !s.is_final()) {
            return Err((
                format!("{table}.on"),
                format!(
                    "`{s}` is not how a run ends: use failed, timed-out, denied, interrupted or ok"
                ),
            ));
        }
        if !self.on.is_empty() && self.channels.is_empty() {
            return Err((
                format!("{table}.on"),
                format!("names run statuses but {table}.channels names no channel to send to"),
            ));
        }
        Ok(())
    }
}

/// The engine config's `[notify]` table: run-end notifications for every plugin, and
/// how deliveries are limited. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// Channels every plugin's run-end notifications (`on`) go to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Run statuses that notify `channels` for every plugin (`failed`, `timed-out`,
    /// `denied`, `interrupted`, `ok`).
    #[serde(default)]
    pub on: Vec<RunStatus>,
    /// How long a dedup key suppresses repeats on a channel. Default `"10m"`.
    pub dedup_window: Option<String>,
    /// Notifications each channel accepts. Default 30 per `"1m"`, bursts of 10.
    pub rate_limit: Option<RateLimitConfig>,
    /// Notifications waiting for delivery, across channels, before new ones are
    /// refused. Default 1000.
    pub max_queue: Option<usize>,
    /// Attempts per notification. Default 5.
    pub max_attempts: Option<u32>,
    /// The wait before the second attempt, doubled for each further one (at most 5m).
    /// Default `"2s"`.
    pub retry_backoff: Option<String>,
    /// How long one attempt may take. Default `"10s"`.
    pub timeout: Option<String>,
}

/// The `[notify]` table resolved.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    pub run_end: NotifySpec,
    pub dedup_window: Duration,
    pub rate_limit: RateLimitConfig,
    pub max_queue: usize,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub timeout: Duration,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            run_end: NotifySpec::default(),
            dedup_window: Duration::from_secs(600),
            rate_limit: RateLimitConfig {
                requests: 30,
                per: Duration::from_secs(60),
                burst: Some(10),
            },
            max_queue: 1000,
            max_attempts: 5,
            retry_backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

impl NotifySection {
    /// Over the defaults; the error is (field, message).
    pub fn resolve(&self) -> Result<NotifySettings, (&'static str, String)> {
        let mut s = NotifySettings {
            run_end: NotifySpec {
                channels: self.channels.clone(),
                on: self.on.clone(),
            },
            ..NotifySettings::default()
        };
        s.run_end.validate("notify").map_err(|(field, m)| {
            let field = if field.ends_with(".on") {
                "notify.on"
            } else {
                "notify.channels"
            };
            (field, m)
        })?;
        let duration = |field: &'static str, v: &Option<String>, d: Duration| match v {
            None => Ok(d),
            Some(t) => crate::trigger::units::parse_duration(t)
                .map_err(|m| (field, format!("{m} (write e.g. \"30s\", \"10m\")"))),
        };
        s.dedup_window = duration("notify.dedup_window", &self.dedup_window, s.dedup_window)?;
        s.retry_backoff = duration("notify.retry_backoff", &self.retry_backoff, s.retry_backoff)?;
        s.timeout = duration("notify.timeout", &self.timeout, s.timeout)?;
        if s.timeout.is_zero() {
            return Err(("notify.timeout", "must be longer than 0s".into()));
        }
        if let Some(r) = self.rate_limit {
            if r.requests == 0 || r.per.is_zero() {
                return Err((
                    "notify.rate_limit",
                    "requests must be at least 1 and per longer than 0s".into(),
                ));
            }
            s.rate_limit = r;
        }
        match self.max_queue {
            Some(0) => return Err(("notify.max_queue", "must be at least 1".into())),
            Some(n) if n > 100_000 => {
                return Err(("notify.max_queue", format!("{n} is more than 100000")));
            }
            Some(n) => s.max_queue = n,
            None => {}
        }
        match self.max_attempts {
            Some(n) if !(1..=20).contains(&n) => {
                return Err(("notify.max_attempts", format!("{n} is outside 1..=20")));
            }
            Some(n) => s.max_attempts = n,
            None => {}
        }
        Ok(s)
    }
}

/// One notification on its way.
struct Job {
    channel: Channel,
    message: Message,
    queued: Instant,
}

/// What the delivery tasks share with the notifier.
struct Shared {
    settings: NotifySettings,
    audit: Audit,
    metrics: OnceLock<Arc<Metrics>>,
    slots: Arc<Semaphore>,
    /// Notifications queued and not yet at their final outcome.
    pending: std::sync::atomic::AtomicUsize,
    /// Woken when `pending` drops to zero.
    idle: tokio::sync::Notify,
}

impl Shared {
    /// One queued notification reached its final outcome (or never entered the queue).
    fn done_one(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn count(&self, channel: &str, result: &str) {
        if let Some(m) = self.metrics.get() {
            m.notification(channel, result);
        }
    }
}

/// Dedup keys seen and each channel's rate.
#[derive(Default)]
struct Gate {
    seen: HashMap<(String, String, String), Instant>,
    buckets: HashMap<String, TokenBucket>,
}

/// The notifier: channels, the delivery queue and its worker.
pub struct Notifier {
    records: NotifierRecords,
    shared: Arc<Shared>,
    queue: mpsc::Sender<Job>,
    /// The queue's receiving end until the worker starts (on the first notification,
    /// within the tokio runtime that sends it).
    waiting: Mutex<Option<mpsc::Receiver<Job>>>,
    gate: Mutex<Gate>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn secret_name(name: &str) -> SecretName {
    SecretName::new(VAULT_KIND, name, VAULT_FIELD)
}

impl Notifier {
    pub fn open(store: &Store, settings: NotifySettings) -> Result<Notifier, StoreError> {
        let (tx, rx) = mpsc::channel(settings.max_queue);
        Ok(Notifier {
            records: NotifierRecords::open(store)?,
            shared: Arc::new(Shared {
                settings,
                audit: Audit::open(store)?,
                metrics: OnceLock::new(),
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                pending: std::sync::atomic::AtomicUsize::new(0),
                idle: tokio::sync::Notify::new(),
            }),
            queue: tx,
            waiting: Mutex::new(Some(rx)),
            gate: Mutex::new(Gate::default()),
        })
    }

    /// Counts sends and deliveries in these metrics from now on.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.shared.metrics.set(metrics);
    }

    pub fn settings(&self) -> &NotifySettings {
        &self.shared.settings
    }

    /// Adds a channel: its URL checked, sealed in the vault, its record stored.
    pub fn add(
        &self,
        vault: &Vault,
        name: &str,
        url: &Secret,
    ) -> Result<NotifierInfo, NotifyError> {
        check_name(name)?;
        let text = url
            .expose_str()
            .map_err(|_| ChannelError::Malformed("not UTF-8 text".into()))?;
        let channel = Channel::parse(text)?;
        if self.records.get(name)?.is_some() {
            return Err(NotifyError::Duplicate(name.to_string()));
        }
        let info = NotifierInfo {
            name: name.to_string(),
            service: channel.service(),
            at: channel.display().to_string(),
            added_at: Utc::now(),
        };
        vault.put(
            &secret_name(name),
            &Secret::from_str_owned(text.trim().to_string()),
        )?;
        if let Err(e) = self.records.put(&info) {
            let _ = vault.remove(&secret_name(name));
            return Err(e.into());
        }
        tracing::info!(channel = %name, service = %info.service, at = %info.at, "notifier channel added");
        Ok(info)
    }

    /// Every channel, by name.
    pub fn list(&self) -> Result<Vec<NotifierInfo>, NotifyError> {
        Ok(self.records.list()?)
    }

    /// Removes a channel and its URL.
    pub fn remove(&self, vault: &Vault, name: &str) -> Result<NotifierInfo, NotifyError> {
        let info = self
            .records
            .get(name)?
            .ok_or_else(|| NotifyError::NotFound(name.to_string()))?;
        vault.remove_record(VAULT_KIND, name)?;
        self.records.remove(name)?;
        lock(&self.gate).buckets.remove(name);
        tracing::info!(channel = %name, "notifier channel removed");
        Ok(info)
    }

    /// A channel, its URL opened from the vault.
    fn channel(&self, vault: &Vault, name: &str) -> Result<(NotifierInfo, Channel), NotifyError> {
        let not_found = || NotifyError::NotFound(name.chars().take(64).collect());
        if !valid_name(name) {
            return Err(not_found());
        }
        let info = self.records.get(name)?.ok_or_else(not_found)?;
        let url = vault.get(&secret_name(name))?.ok_or_else(|| {
            NotifyError::Storage(format!(
                "the vault holds no URL for channel `{name}`: remove it and add it again"
            ))
        })?;
        let text = url
            .expose_str()
            .map_err(|_| NotifyError::Storage(format!("channel `{name}`'s URL is not text")))?;
        let channel = Channel::parse(text).map_err(|e| {
            NotifyError::Storage(format!(
                "channel `{name}`'s stored URL no longer parses: {e}"
            ))
        })?;
        Ok((info, channel))
    }

    /// Hands `message` to channel `name`: dropped when its dedup key was seen within the
    /// window (per plugin and channel) or the channel is over its rate, else queued for
    /// delivery. Never waits.
    pub fn send(
        &self,
        vault: &Vault,
        name: &str,
        mut message: Message,
    ) -> Result<Sent, NotifyError> {
        message.check().map_err(NotifyError::Invalid)?;
        // Only that the channel exists, before dedup and the rate: its URL is opened from
        // the vault for a notification that is going to be sent, not for every repeat.
        if !valid_name(name) || self.records.get(name)?.is_none() {
            return Err(NotifyError::NotFound(name.chars().take(64).collect()));
        }
        message.channel = name.to_string();
        let settings = &self.shared.settings;
        let now = Instant::now();
        let mut gate = lock(&self.gate);
        let key = message
            .dedup_key
            .as_ref()
            .map(|k| (message.plugin.clone(), name.to_string(), k.clone()));
        if let Some(k) = &key
            && gate
                .seen
                .get(k)
                .is_some_and(|at| now.duration_since(*at) < settings.dedup_window)
        {
            self.shared.count(name, Sent::Duplicate.as_str());
            return Ok(Sent::Duplicate);
        }
        let r = settings.rate_limit;
        let bucket = gate.buckets.entry(name.to_string()).or_insert_with(|| {
            TokenBucket::new(r.requests, r.per, r.burst.unwrap_or(r.requests), now)
        });
        if bucket.try_take(now).is_err() {
            self.shared.count(name, Sent::RateLimited.as_str());
            return Ok(Sent::RateLimited);
        }
        let (_, channel) = self.channel(vault, name)?;
        self.start_worker();
        let job = Job {
            channel,
            message,
            queued: now,
        };
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.done_one();
                self.shared.count(name, Sent::QueueFull.as_str());
                return Ok(Sent::QueueFull);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.done_one();
                return Err(NotifyError::Storage("the delivery task has stopped".into()));
            }
        }
        if let Some(k) = key {
            let window = settings.dedup_window;
            if gate.seen.len() >= MAX_DEDUP_KEYS {
                gate.seen.retain(|_, at| now.duration_since(*at) < window);
            }
            if gate.seen.len() < MAX_DEDUP_KEYS {
                gate.seen.insert(k, now);
            }
        }
        self.shared.count(name, Sent::Queued.as_str());
        Ok(Sent::Queued)
    }

    /// Sends a test message to channel `name` now, once, past dedup and rate limit;
    /// answers with the channel when the service accepted it.
    pub async fn test(&self, vault: &Vault, name: &str) -> Result<NotifierInfo, NotifyError> {
        let (info, channel) = self.channel(vault, name)?;
        let message = Message {
            title: format!("Capstan test message for channel {name}"),
            message: format!(
                "This is a test message from Capstan: channel `{name}` ({}) works.",
                info.service
            ),
            priority: Priority::Low,
            tags: vec!["capstan".into(), "test".into()],
            dedup_key: None,
            plugin: String::new(),
            run_id: None,
            channel: name.to_string(),
            time: Utc::now(),
        };
        let started = Instant::now();
        let r = send::deliver(&channel, &message, self.shared.settings.timeout).await;
        let (result, reason) = match &r {
            Ok(()) => ("delivered", "test message delivered".to_string()),
            Err(f) => (
                "failed",
                format!("test message not delivered: {}", f.message()),
            ),
        };
        self.shared
            .outcome(&message, channel.display(), result, reason, started);
        r.map(|()| info).map_err(|f| {
            NotifyError::Undelivered(format!(
                "the test message was not delivered: {}",
                f.message()
            ))
        })
    }

    /// Waits until every queued notification has reached its final outcome, at most
    /// `within`; returns how many had not (for the shutdown, so that notifications of the
    /// runs it interrupted still go out).
    pub async fn drain(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the count is read: a wake-up in between is not missed.
            let idle = self.shared.idle.notified();
            let left = self.shared.pending.load(Ordering::SeqCst);
            if left == 0 || tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.shared.pending.load(Ordering::SeqCst);
            }
        }
    }

    /// Starts the delivery worker on the current tokio runtime, once.
    fn start_worker(&self) {
        let mut waiting = lock(&self.waiting);
        if waiting.is_none() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let rx = waiting.take().expect("checked above");
                handle.spawn(work(rx, self.shared.clone()));
            }
            Err(_) => {
                tracing::warn!("notifications are queued but no runtime runs their delivery yet")
            }
        }
    }

    /// Sends run-end notifications for `record` as the engine's `[notify]` table and
    /// the plugin's manifest (`spec`) ask.
    pub fn run_ended(&self, vault: &Vault, record: &RunRecord, spec: Option<&NotifySpec>) {
        let mut channels = BTreeSet::new();
        for rule in std::iter::once(&self.shared.settings.run_end).chain(spec) {
            if rule.on.contains(&record.status) {
                channels.extend(rule.channels.iter().cloned());
            }
        }
        for name in channels {
            let message = run_end_message(record, &name);
            match self.send(vault, &name, message) {
                Ok(Sent::Queued) => {}
                Ok(other) => {
                    tracing::info!(channel = %name, plugin = %record.plugin, run = %record.id, result = other.as_str(), "run-end notification not sent")
                }
                Err(e) => {
                    tracing::warn!(channel = %name, plugin = %record.plugin, run = %record.id, error = %e, "run-end notification not sent")
                }
            }
        }
    }
}

/// The longest run error quoted in a run-end notification, characters.
const MAX_QUOTED_ERROR: usize = 1000;

fn run_end_message(record: &RunRecord, channel: &str) -> Message {
    let status = record.status;
    let mut message = format!(
        "Run {} of plugin {} ended {status} (trigger: {}).",
        record.id,
        record.plugin,
        trigger_kind(record)
    );
    if let Some(e) = &record.error {
        let e: String = e.chars().take(MAX_QUOTED_ERROR).collect();
        message.push_str(&format!("\n{e}"));
    }
    Message {
        title: format!("{}: run {status}", record.plugin),
        message,
        priority: match status {
            RunStatus::Ok => Priority::Low,
            RunStatus::Interrupted => Priority::Normal,
            _ => Priority::High,
        },
        tags: vec!["capstan".into(), record.plugin.clone(), status.to_string()],
        dedup_key: None,
        plugin: record.plugin.clone(),
        run_id: Some(record.id.to_string()),
        channel: channel.to_string(),
        time: Utc::now(),
    }
}

fn trigger_kind(record: &RunRecord) -> &'static str {
    match record.trigger {
        RunTrigger::Cron { .. } => "cron",
        RunTrigger::Webhook { .. } => "webhook",
        RunTrigger::Manual { .. } => "manual",
        RunTrigger::Docker { .. } => "docker",
        RunTrigger::Run { .. } => "run",
    }
}

/// The delivery worker: takes jobs off the queue and delivers each on a task of its own.
/// At most `notify.max_queue` jobs are off the queue at once (attempting, or waiting to
/// retry), so memory stays bounded at twice the queue; at most [`MAX_IN_FLIGHT`]
/// attempts run at once, and a job waiting to retry holds no attempt slot, so one
/// failing service does not hold up the others.
async fn work(mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    let taken = Arc::new(Semaphore::new(shared.settings.max_queue));
    while let Some(job) = rx.recv().await {
        let Ok(held) = taken.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            deliver_with_retries(job, &shared).await;
            shared.done_one();
            drop(held);
        });
    }
}

async fn deliver_with_retries(job: Job, shared: &Shared) {
    let s = &shared.settings;
    let at = job.channel.display();
    let name = job.message.channel.as_str();
    let mut backoff = s.retry_backoff;
    for attempt in 1..=s.max_attempts {
        let Ok(slot) = shared.slots.acquire().await else {
            return;
        };
        let result = send::deliver(&job.channel, &job.message, s.timeout).await;
        drop(slot);
        match result {
            Ok(()) => {
                let how = if attempt == 1 {
                    "delivered".to_string()
                } else {
                    format!("delivered on attempt {attempt}")
                };
                shared.outcome(&job.message, at, "delivered", how, job.queued);
                return;
            }
            Err(send::Failure::Retry(e)) if attempt < s.max_attempts => {
                shared.count(name, "retried");
                tracing::info!(channel = %name, attempt, error = %e, retry_in = ?backoff, "notification not delivered; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(f) => {
                let why = match &f {
                    send::Failure::Retry(e) => format!("gave up after {attempt} attempts: {e}"),
                    send::Failure::Permanent(e) => {
                        format!("not delivered (attempt {attempt}, not retried): {e}")
                    }
                };
                shared.outcome(&job.message, at, "failed", why, job.queued);
                return;
            }
        }
    }
}

impl Shared {
    /// A delivery's final outcome: counted, logged and written to the audit log.
    fn outcome(&self, m: &Message, at: &str, result: &str, reason: String, since: Instant) {
        self.count(&m.channel, result);
        // The reason may quote a service's answer (an SMTP reply): bounded.
        let reason: String = reason.chars().take(MAX_QUOTED_ERROR).collect();
        if result == "delivered" {
            tracing::info!(channel = %m.channel, plugin = %m.plugin, %reason, "notification delivered");
        } else {
            tracing::warn!(channel = %m.channel, plugin = %m.plugin, %reason, "notification not delivered");
        }
        let mut request = format!("notify {} ({at})", m.channel);
        if let Some(r) = &m.run_id {
            request.push_str(&format!(" for run {r}"));
        }
        let rec = AuditRecord {
            time: Utc::now(),
            plugin: m.plugin.clone(),
            call: HostCall {
                op: "notify.delivery".into(),
                device: String::new(),
                request,
                decision: CallDecision::Allow,
                result: result.to_string(),
                ms: crate::millis(since.elapsed()),
                reason: format!("{result}: {reason}"),
            },
        };
        if let Err(e) = self.audit.record(&rec) {
            tracing::error!(error = %e, "cannot write the audit record of a notification");
        }
    }
}

/// Wires notifications into a scheduler: deliveries counted in its metrics, and the
/// run-end listener that sends `[notify] on` notifications (the engine's and each
/// plugin's).
pub fn attach(scheduler: &Arc<Scheduler>) {
    let notifier = &scheduler.engine().notifier;
    notifier.set_metrics(scheduler.metrics().clone());
    if let Ok(known) = notifier.list() {
        for c in &notifier.settings().run_end.channels {
            if !known.iter().any(|k| &k.name == c) {
                tracing::warn!(channel = %c, "the engine config's [notify] channels names a channel that does not exist (yet): add it with `capstan notifier add`");
            }
        }
    }
    scheduler.on_run_end(Box::new(|s, record| {
        let spec = s.runtime().plugin(&record.plugin).map(|p| p.notify.clone());
        let engine = s.engine();
        engine
            .notifier
            .run_ended(&engine.vault, record, spec.as_ref());
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier(settings: NotifySettings) -> (tempfile::TempDir, Vault, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = dir.path().join("k");
        crate::vault::generate_key_file(&key).unwrap();
        let vault = Vault::init(
            &store,
            &crate::vault::KeySource::KeyFile(key),
            crate::vault::Argon2Params::DEFAULT,
        )
        .unwrap();
        let n = Notifier::open(&store, settings).unwrap();
        (dir, vault, n)
    }

    fn message(key: Option<&str>) -> Message {
        Message {
            title: "t".into(),
            message: "m".into(),
            priority: Priority::Normal,
            tags: vec![],
            dedup_key: key.map(str::to_string),
            plugin: "p".into(),
            run_id: None,
            channel: String::new(),
            time: Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_channel_url_goes_to_the_vault_and_only_scheme_and_host_to_the_record() {
        let (dir, vault, n) = notifier(NotifySettings::default());
        let url = "ntfy://:tk_Zq9SeCrEt@ntfy.example.org/capstan-alerts";
        let info = n
            .add(&vault, "ops", &Secret::from_str_owned(url.into()))
            .unwrap();
        assert_eq!(
            (info.service, info.at.as_str()),
            (Service::Ntfy, "ntfy://ntfy.example.org")
        );
        assert!(matches!(
            n.add(&vault, "ops", &Secret::from_str_owned(url.into())),
            Err(NotifyError::Duplicate(_))
        ));
        let listed = serde_json::to_string(&n.list().unwrap()).unwrap();
        assert!(
            !listed.contains("tk_Zq9SeCrEt") && !listed.contains("capstan-alerts"),
            "{listed}"
        );
        n.remove(&vault, "ops").unwrap();
        assert!(n.list().unwrap().is_empty());
        assert!(vault.names().unwrap().is_empty());
        drop(dir);
    }

    #[tokio::test]
    async fn repeats_of_a_dedup_key_and_sends_over_the_rate_are_not_queued() {
        let settings = NotifySettings {
            rate_limit: RateLimitConfig {
                requests: 3,
                per: Duration::from_secs(3600),
                burst: Some(3),
            },
            ..NotifySettings::default()
        };
        let (_dir, vault, n) = notifier(settings);
        // Nothing listens on port 9: deliveries fail, sends are what is tested.
        n.add(
            &vault,
            "ops",
            &Secret::from_str_owned("generic+http://127.0.0.1:9/x".into()),
        )
        .unwrap();
        assert_eq!(
            n.send(&vault, "ops", message(Some("k"))).unwrap(),
            Sent::Queued
        );
        assert_eq!(
            n.send(&vault, "ops", message(Some("k"))).unwrap(),
            Sent::Duplicate
        );
        assert_eq!(
            n.send(&vault, "ops", message(Some("other"))).unwrap(),
            Sent::Queued
        );
        assert_eq!(n.send(&vault, "ops", message(None)).unwrap(), Sent::Queued);
        assert_eq!(
            n.send(&vault, "ops", message(None)).unwrap(),
            Sent::RateLimited
        );
        assert!(matches!(
            n.send(&vault, "nope", message(None)),
            Err(NotifyError::NotFound(_))
        ));
        let mut big = message(None);
        big.title = "x".repeat(MAX_TITLE + 1);
        assert!(matches!(
            n.send(&vault, "ops", big),
            Err(NotifyError::Invalid(_))
        ));
    }

    #[test]
    fn the_engine_config_notify_table_takes_every_documented_key() {
        // As examples/capstan.toml documents it, uncommented.
        let text = r#"
[notify]
on = ["failed", "timed-out"]
channels = ["ops"]
dedup_window = "10m"
rate_limit = { requests = 30, per = "1m", burst = 10 }
max_queue = 1000
max_attempts = 5
retry_backoff = "2s"
timeout = "10s"
"#;
        let file = crate::config::ConfigFile::parse(text).unwrap();
        let s = file.notify.resolve().unwrap();
        assert_eq!(s.run_end.on, [RunStatus::Failed, RunStatus::TimedOut]);
        assert_eq!(s.dedup_window, Duration::from_secs(600));
        assert_eq!(s.rate_limit.burst, Some(10));
        let e = crate::config::ConfigFile::parse(
            "[notify]
retries = 3
",
        )
        .unwrap_err();
        assert!(e.contains("retries"), "{e}");
        let file = crate::config::ConfigFile::parse(
            "[notify]
timeout = \"soon\"
",
        )
        .unwrap();
        assert_eq!(file.notify.resolve().unwrap_err().0, "notify.timeout");
    }

    #[test]
    fn run_end_rules_need_channels_and_final_statuses() {
        let spec = NotifySpec {
            channels: vec![],
            on: vec![RunStatus::Failed],
        };
        assert_eq!(spec.validate("notify").unwrap_err().0, "notify.on");
        let spec = NotifySpec {
            channels: vec!["ops".into()],
            on: vec![RunStatus::Running],
        };
        assert!(
            spec.validate("notify")
                .unwrap_err()
                .1
                .contains("not how a run ends")
        );
        let spec = NotifySpec {
            channels: vec!["o/ps".into()],
            on: vec![],
        };
        assert_eq!(spec.validate("notify").unwrap_err().0, "notify.channels[0]");
        let section: NotifySection = toml::from_str("max_attempts = 50").unwrap();
        assert_eq!(section.resolve().unwrap_err().0, "notify.max_attempts");
    }
}
