//! The engine's Docker event streams: one `GET /events` per device that any plugin's
//! `[[triggers.docker]]` listens to, shared by every such plugin.
//!
//! - **One stream per device**, through the device's pooled connections
//!   ([`crate::docker::Pool`]: local socket, SSH channel or TLS), started when a plugin
//!   that needs it is activated (or when [`run`] starts, in `capstan serve`) and stopped
//!   when the last such plugin goes or the engine shuts down. Devices added, edited or
//!   removed are picked up within [`RESCAN`] (an edited device's stream starts afresh).
//! - **No replay on start.** A stream starts at the daemon's own clock (`GET /info`'s
//!   `SystemTime`), so events from before the engine started never become runs, and
//!   engine and daemon clocks need not agree. Events while the engine is stopped are
//!   not delivered: the cron pass of a plugin is the safety net for those. (In cluster
//!   mode a stream starts at the cluster's cursor for the device, below.)
//! - **Reconnect and resume.** A stream that ends or fails is opened again after a
//!   back-off (the `[docker]` connection back-off, doubling), with `since=` the time of
//!   the last event seen; the events at exactly that time that were already delivered
//!   are skipped, so an event is neither lost nor delivered twice across a reconnect
//!   (as far as the daemon's own buffer of recent events, 256 in dockerd, reaches).
//!   A dead SSH session is noticed by its keep-alives.
//! - **Debounce** per plugin, trigger and object ([`super::DockerTrigger::debounce`]):
//!   folding survives reconnects; what is still folding at shutdown is dropped.
//! - **Bounded:** an event line longer than [`MAX_EVENT_BYTES`] is skipped, at most
//!   [`MAX_PENDING`] objects are folding per device (beyond, events run at once), the
//!   daemon's other answers (`/info`, an error) are read to a cap.
//! - **Cluster mode: only the device's owner watches.** A node streams the events of
//!   the devices whose lease it holds ([`crate::cluster::Cluster::holds`]), and stops a
//!   stream when it loses the lease (the lease keeper reconciles at once; the stream
//!   itself stops at its next event). Each matching event is handed to the cluster as a
//!   run, with a message id made of plugin, trigger, device, object, action and the
//!   event's time ([`event_msg_id`]), so the same event seen by an old and a new owner
//!   during a takeover is run once (within the runs stream's duplicate window). A run is
//!   handed over only while the node holds the device; what it could not hand over is
//!   left to the next owner.
//! - **Cluster mode: a new owner resumes where the old one stopped.** The owner keeps
//!   the device's cursor in the cluster ([`crate::cluster::cursors`]): the daemon time
//!   before which every event was handed over (the last event read, held back to the
//!   oldest event still folding or being handed over, and moved on with the daemon's
//!   clock less [`IDLE_SLACK`] while the open stream waits for events). A node that
//!   starts a device's stream without a cursor of its own starts it at the stored one
//!   when that is recent enough ([`crate::cluster::cursors::REPLAY_BOUND`]), so the
//!   events between the old owner's end and the takeover are run too; the events
//!   re-read that had run already are dropped by their message id. A debounced fold
//!   that was open when the old owner died may be folded otherwise when re-read, and
//!   then run once more. A stream this node stops while keeping the device (no plugin
//!   listens any more, the device changed) starts afresh next time.
//! - **Metrics** (`/metrics`): `capstan_docker_event_stream_up{device}` (1 while the
//!   stream is open, 0 while it is being retried), `capstan_docker_event_stream_failures_total{device}`,
//!   `capstan_docker_events_total{device}` (events received) and
//!   `capstan_docker_event_runs_total{plugin}` (runs submitted).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::DockerTrigger;
use crate::device::Device;
use crate::docker::{ConnectError, daemon, empty_body};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::plugin::TriggerEvent;
use crate::policy::CompiledPolicy;
use crate::scheduler::{Scheduler, SubmitError};

/// How often the devices are listed again, for devices added or removed since.
pub const RESCAN: Duration = Duration::from_secs(30);
/// The longest event line read; longer ones are skipped.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Objects folding at once per device; beyond, events run without debounce.
pub const MAX_PENDING: usize = 10_000;
/// Events remembered at the cursor's instant (to skip them when a stream resumes there);
/// past it, more events of that same nanosecond are not remembered.
const MAX_SEEN: usize = 4096;
/// What is read of a daemon's error answer (its first 512 bytes are quoted).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// How late an event may reach this node after it happened (on the daemon's clock) and
/// still be counted on: while an open stream waits, the cluster's cursor moves on with
/// the daemon's clock this far behind it.
pub const IDLE_SLACK: Duration = Duration::from_secs(5);

/// One plugin's Docker triggers and the policy that filters their events.
struct PluginSubs {
    policy: CompiledPolicy,
    triggers: Vec<DockerTrigger>,
}

impl PluginSubs {
    fn watches(&self, device: &str) -> bool {
        self.policy.devices().allows(device) && self.triggers.iter().any(|t| t.watches(device))
    }
}

type Subs = Arc<HashMap<String, Arc<PluginSubs>>>;

/// What the streams need to submit runs: set by [`run`], cleared at shutdown.
#[derive(Clone)]
struct Runner {
    scheduler: Weak<Scheduler>,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    /// Where streams run (activation may be called from outside the runtime's tasks).
    runtime: tokio::runtime::Handle,
}

/// The engine's Docker triggers and the event streams that serve them.
#[derive(Default)]
pub struct DockerWatchers {
    subs: Arc<RwLock<Subs>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    runner: Option<Runner>,
    streams: HashMap<String, Stream>,
    /// Where the streams stopped at shutdown had got (for the cluster's cursors, which
    /// the lease keeper writes when it lets the devices go).
    stopped_at: HashMap<String, i64>,
    /// Cluster mode: devices whose stream stopped while this node kept the device (no
    /// plugin listened, the device changed): their next stream starts at the present,
    /// not at the cluster's cursor.
    restart_fresh: HashSet<String>,
}

/// A device's stream task, the device record it was started for, and how far it got.
struct Stream {
    device: Device,
    task: tokio::task::AbortHandle,
    progress: Arc<Mutex<Progress>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DockerWatchers {
    pub fn new() -> DockerWatchers {
        DockerWatchers::default()
    }

    /// Puts `plugin`'s Docker triggers in place of whatever it had (none: it listens to
    /// nothing), and starts or stops streams to match.
    pub fn set_plugin(&self, plugin: &str, policy: CompiledPolicy, triggers: Vec<DockerTrigger>) {
        let subs = (!triggers.is_empty()).then(|| Arc::new(PluginSubs { policy, triggers }));
        self.update(plugin, subs);
    }

    /// Docker triggers registered, over every plugin.
    pub fn len(&self) -> usize {
        let all = self.subs.read().unwrap_or_else(|e| e.into_inner());
        all.values().map(|s| s.triggers.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `plugin`'s Docker triggers away.
    pub fn remove_plugin(&self, plugin: &str) {
        self.update(plugin, None);
    }

    fn update(&self, plugin: &str, subs: Option<Arc<PluginSubs>>) {
        {
            let mut all = self.subs.write().unwrap_or_else(|e| e.into_inner());
            let mut next = HashMap::clone(&all);
            match subs {
                Some(s) => next.insert(plugin.to_string(), s),
                None => next.remove(plugin),
            };
            *all = Arc::new(next);
        }
        self.reconcile();
    }

    fn snapshot(&self) -> Subs {
        self.subs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the streams the plugins need and stops the others (nothing before
    /// [`run`] has started the watchers); in cluster mode, only for devices this node
    /// owns.
    pub fn reconcile(&self) {
        let mut state = lock(&self.state);
        let Some(runner) = state.runner.clone() else {
            return;
        };
        let devices = match runner.engine.devices().and_then(|d| d.list()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the devices for Docker event triggers");
                return;
            }
        };
        let subs = self.snapshot();
        let cluster = runner
            .scheduler
            .upgrade()
            .and_then(|s| s.cluster().cloned());
        let wanted: HashMap<String, Device> = devices
            .into_iter()
            .filter(|d| subs.values().any(|p| p.watches(&d.name)))
            .filter(|d| cluster.as_ref().is_none_or(|c| c.holds(&d.name)))
            .map(|d| (d.name.clone(), d))
            .collect();
        let st = &mut *state;
        st.streams.retain(|name, stream| {
            // An edited device (another address, other credentials) starts afresh.
            let keep = wanted.get(name) == Some(&stream.device);
            if !keep {
                stream.task.abort();
                runner.metrics.docker_event_stream_gone(name);
                tracing::info!(device = %name, "Docker event stream stopped: no plugin listens to it, or the device changed");
                // Not a lost lease: the stream's history ends here, in the cluster too.
                if let Some(c) = cluster.as_ref().filter(|c| c.holds(name)) {
                    st.restart_fresh.insert(name.clone());
                    let (c, name) = (c.clone(), name.clone());
                    runner.runtime.spawn(async move { c.forget_cursor(&name).await });
                }
            }
            keep
        });
        for (name, device) in wanted {
            if state.streams.contains_key(&name) {
                continue;
            }
            tracing::info!(device = %name, "Docker event stream starting");
            let resume = !state.restart_fresh.remove(&name);
            let progress = Arc::new(Mutex::new(Progress::new(resume)));
            let task = runner.runtime.spawn(watch_device(
                name.clone(),
                runner.clone(),
                self.subs.clone(),
                progress.clone(),
            ));
            state.stopped_at.remove(&name);
            state.streams.insert(
                name,
                Stream {
                    device,
                    task: task.abort_handle(),
                    progress,
                },
            );
        }
    }

    fn start(&self, scheduler: &Arc<Scheduler>) {
        lock(&self.state).runner = Some(Runner {
            scheduler: Arc::downgrade(scheduler),
            engine: scheduler.engine().clone(),
            metrics: scheduler.metrics().clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        self.reconcile();
    }

    fn stop(&self) {
        let mut state = lock(&self.state);
        if let Some(runner) = state.runner.take() {
            let now = Instant::now();
            let streams: Vec<(String, Stream)> = state.streams.drain().collect();
            for (device, stream) in streams {
                stream.task.abort();
                runner.metrics.docker_event_stream_gone(&device);
                if let Some(at) = lock(&stream.progress).position(now) {
                    state.stopped_at.insert(device, at);
                }
            }
        }
    }

    /// The daemon time before which every event of `device`'s stream was handed over
    /// (its progress): of the stream running now, else of the one stopped at
    /// shutdown; `None` without a stream.
    pub fn position(&self, device: &str) -> Option<i64> {
        let state = lock(&self.state);
        match state.streams.get(device) {
            Some(s) => lock(&s.progress).position(Instant::now()),
            None => state.stopped_at.get(device).copied(),
        }
    }
}

/// Watches the devices the engine's Docker triggers need until `shutdown` resolves:
/// streams start at once for the plugins already activated, and as plugins are
/// activated and removed; the device list is read again every [`RESCAN`].
pub async fn run(scheduler: Arc<Scheduler>, shutdown: impl std::future::Future<Output = ()>) {
    let watchers = scheduler.triggers().docker.clone();
    watchers.start(&scheduler);
    drop(scheduler);
    tokio::pin!(shutdown);
    let mut every = tokio::time::interval(RESCAN);
    every.tick().await;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = every.tick() => watchers.reconcile(),
        }
    }
    watchers.stop();
}

/// One event as the daemon writes it on `/events`.
#[derive(Debug, Deserialize)]
struct RawEvent {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor", default)]
    actor: RawActor,
    #[serde(default)]
    time: i64,
    #[serde(rename = "timeNano", default)]
    time_nano: i64,
}

#[derive(Debug, Default, Deserialize)]
struct RawActor {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: HashMap<String, String>,
}

impl RawEvent {
    fn nanos(&self) -> i64 {
        if self.time_nano != 0 {
            self.time_nano
        } else {
            self.time.saturating_mul(1_000_000_000)
        }
    }
}

/// A matched event on its way to a run: whose, through which trigger, and the event.
#[derive(Debug, Clone)]
pub struct WatchedEvent {
    pub plugin: String,
    pub trigger: usize,
    pub debounce: Duration,
    pub event: TriggerEvent,
}

/// Where a stream resumes: the time of the last event seen and the events seen at
/// exactly that time (the daemon sends those again for `since=` that time).
#[derive(Debug, Default)]
struct Cursor {
    nanos: i64,
    seen: HashSet<(String, String, String)>,
}

impl Cursor {
    fn at(nanos: i64) -> Cursor {
        Cursor {
            nanos,
            seen: HashSet::new(),
        }
    }

    /// Whether `e` is new, recording it.
    fn admit(&mut self, e: &RawEvent) -> bool {
        let t = e.nanos();
        let id = (e.kind.clone(), e.action.clone(), e.actor.id.clone());
        if t < self.nanos {
            return false;
        }
        if t > self.nanos {
            self.nanos = t;
            self.seen.clear();
        }
        if self.seen.len() >= MAX_SEEN {
            return !self.seen.contains(&id);
        }
        self.seen.insert(id)
    }

    /// The `since` query value: seconds and nanoseconds.
    fn since(&self) -> String {
        format!(
            "{}.{:09}",
            self.nanos.div_euclid(1_000_000_000),
            self.nanos.rem_euclid(1_000_000_000)
        )
    }
}

/// How far a device's stream has got, for the cluster's cursor
/// ([`crate::cluster::cursors`]): the daemon time before which every event was read and
/// handed over ([`Progress::position`]).
#[derive(Debug, Default)]
struct Progress {
    /// In cluster mode, the stream may start at the cluster's cursor.
    resume: bool,
    /// The stream's cursor (the last event read); `None` until the stream's start is
    /// known.
    read: Option<i64>,
    /// The times of events read that are still folding or being handed over, each with
    /// how many runs of it are.
    outstanding: BTreeMap<i64, usize>,
    /// While the stream is open: the daemon's clock read just before it was opened, and
    /// when that answer came here.
    clock: Option<(i64, Instant)>,
    /// The open stream is waiting for data, with no partial event held.
    waiting: bool,
    /// Events were read or handed over since the cursor was last written.
    moved: bool,
}

impl Progress {
    fn new(resume: bool) -> Progress {
        Progress {
            resume,
            ..Progress::default()
        }
    }

    /// The stream starts at `nanos`.
    fn start(&mut self, nanos: i64) {
        self.read = Some(nanos);
        self.moved = true;
    }

    fn read_up_to(&mut self, nanos: i64) {
        if self.read.is_none_or(|r| r < nanos) {
            self.read = Some(nanos);
            self.moved = true;
        }
    }

    /// An event at `nanos` is on its way to a run.
    fn hold(&mut self, nanos: i64) {
        *self.outstanding.entry(nanos).or_default() += 1;
    }

    /// An event at `nanos` is handed over (or folded into another, or failed).
    fn release(&mut self, nanos: i64) {
        if let Some(n) = self.outstanding.get_mut(&nanos) {
            *n -= 1;
            if *n == 0 {
                self.outstanding.remove(&nanos);
            }
            self.moved = true;
        }
    }

    /// Before which daemon time every event was handed over (or matched nothing), at
    /// `now`: the last event read (events at that very time are read again on resuming
    /// there), no later than the oldest still outstanding; while the open stream waits,
    /// at least the daemon's clock less [`IDLE_SLACK`] (an event that happened before
    /// that has arrived).
    fn position(&self, now: Instant) -> Option<i64> {
        let mut at = self.read?;
        if self.waiting
            && let Some((clock, when)) = self.clock
        {
            let passed =
                i64::try_from(now.saturating_duration_since(when).as_nanos()).unwrap_or(i64::MAX);
            let slack = i64::try_from(IDLE_SLACK.as_nanos()).unwrap_or(i64::MAX);
            at = at.max(clock.saturating_add(passed).saturating_sub(slack));
        }
        if let Some((&first, _)) = self.outstanding.first_key_value() {
            at = at.min(first);
        }
        Some(at)
    }
}

fn event_nanos(event: &TriggerEvent) -> i64 {
    match event {
        TriggerEvent::Docker { time, .. } => time.timestamp_nanos_opt().unwrap_or_default(),
        _ => 0,
    }
}

/// Why a stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the daemon answered {status} to {what}: {message}")]
    Daemon {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("{what} did not answer within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("reading the event stream: {0}")]
    Read(String),
    #[error("the daemon ended the event stream")]
    Ended,
}

/// The stream of one device, for as long as the task lives: connect, read, dispatch;
/// on failure wait and resume. Debounced runs are submitted beside it.
async fn watch_device(
    device: String,
    runner: Runner,
    subs: Arc<RwLock<Subs>>,
    progress: Arc<Mutex<Progress>>,
) {
    let (tx, rx) = mpsc::channel::<WatchedEvent>(1024);
    let stream = async {
        let mut cursor: Option<Cursor> = None;
        let mut failures: u32 = 0;
        loop {
            let result = stream_once(
                &device,
                &runner,
                &subs,
                &mut cursor,
                &tx,
                &mut failures,
                &progress,
            )
            .await;
            {
                let mut p = lock(&progress);
                p.clock = None;
                p.waiting = false;
            }
            runner.metrics.docker_event_stream(&device, false);
            let e = result.err().unwrap_or(StreamError::Ended);
            failures = failures.saturating_add(1);
            runner.metrics.docker_event_stream_failed(&device);
            let pause = runner.engine.docker.options().backoff(failures);
            if failures == 1 {
                tracing::warn!(%device, error = %e, retry_in = ?pause, "Docker event stream lost; retrying");
            } else {
                tracing::debug!(%device, error = %e, retry_in = ?pause, "Docker event stream still failing");
            }
            tokio::time::sleep(pause).await;
        }
    };
    tokio::join!(
        stream,
        debounce(&device, &runner, rx, &progress),
        keep_cursor(&device, &runner, &progress)
    );
}

/// In cluster mode, writes the device's cursor to the cluster while it moves (see
/// [`crate::cluster::cursors`]); only while this node holds the device.
async fn keep_cursor(device: &str, runner: &Runner, progress: &Mutex<Progress>) {
    use crate::cluster::cursors::{IDLE_WRITE_EVERY, WRITE_EVERY};
    let Some(cluster) = runner
        .scheduler
        .upgrade()
        .and_then(|s| s.cluster().cloned())
    else {
        return;
    };
    let mut every = tokio::time::interval(WRITE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<(i64, Instant)> = None;
    loop {
        every.tick().await;
        let now = Instant::now();
        let (at, moved) = {
            let mut p = lock(progress);
            let Some(at) = p.position(now) else {
                continue;
            };
            let due = match written {
                None => true,
                Some((w, when)) => {
                    w != at && (p.moved || now.saturating_duration_since(when) >= IDLE_WRITE_EVERY)
                }
            };
            if !due {
                continue;
            }
            (at, std::mem::take(&mut p.moved))
        };
        match cluster.save_cursor(device, at).await {
            Ok(true) => written = Some((at, now)),
            Ok(false) => {}
            Err(e) => {
                lock(progress).moved |= moved;
                tracing::debug!(%device, error = %e, "cannot write the device's event cursor to the cluster; trying again");
            }
        }
    }
}

/// The daemon's present time, as `GET /info`'s `SystemTime` gives it (nanos).
fn daemon_time(body: &[u8]) -> Result<i64, String> {
    let info: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    info["SystemTime"]
        .as_str()
        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
        .map(|t| t.timestamp_nanos_opt().unwrap_or(0))
        .ok_or_else(|| "GET /info gave no SystemTime".to_string())
}

/// Where a stream with no cursor of its own starts in cluster mode: at the cursor the
/// cluster stored for `device` if it is recent enough, else at the daemon's present
/// time `now`, saying why.
async fn resume_point(device: &str, cluster: &crate::cluster::Cluster, now: i64) -> i64 {
    use crate::cluster::cursors::{REPLAY_BOUND, Resume, resume_at};
    let stored = match cluster.load_cursor(device).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%device, error = %e, "cannot read the device's Docker event cursor from the cluster: the stream starts at the daemon's present time, and events since its previous owner stopped are not replayed");
            return now;
        }
    };
    let time = |n: i64| DateTime::from_timestamp_nanos(n).to_rfc3339();
    let from = stored.as_ref().map(|c| c.node.as_str()).unwrap_or_default();
    match resume_at(stored.as_ref().map(|c| c.nanos), now, REPLAY_BOUND) {
        Resume::Stored(at) => {
            tracing::info!(%device, since = %time(at), behind = ?Duration::from_nanos(now.saturating_sub(at).unsigned_abs()), previous = from, "Docker event stream resumes where the device's previous owner stopped");
            at
        }
        Resume::Fresh => now,
        Resume::TooOld { age } => {
            tracing::warn!(%device, from = %time(now.saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX))), to = %time(now), previous = from, "Docker events of the device in this span were not replayed: the cursor the cluster kept for it is {age:?} old, more than the {REPLAY_BOUND:?} within which events re-read are known to have run already; the stream starts at the daemon's present time");
            now
        }
        Resume::Ahead { by } => {
            tracing::warn!(%device, previous = from, "the Docker event cursor the cluster kept for the device is {by:?} ahead of the daemon's clock (set back?): the stream starts at the daemon's present time, and events since its previous owner stopped are not replayed");
            now
        }
    }
}

/// Opens the stream at the cursor (on the first call: at the daemon's present time, or
/// in cluster mode at the cluster's cursor for the device), reads it until it ends, and
/// sends each new matching event on.
async fn stream_once(
    device: &str,
    runner: &Runner,
    subs: &RwLock<Subs>,
    cursor: &mut Option<Cursor>,
    tx: &mpsc::Sender<WatchedEvent>,
    failures: &mut u32,
    progress: &Mutex<Progress>,
) -> Result<(), StreamError> {
    let cluster = runner
        .scheduler
        .upgrade()
        .and_then(|s| s.cluster().cloned());
    let engine = &runner.engine;
    let record = engine
        .devices()
        .and_then(|d| d.get(device))
        .map_err(|e| StreamError::Device(e.to_string()))?;
    let client = engine.docker_client(&record)?;
    let opts = engine.docker.options();
    let timeout = opts.connect_timeout + opts.request_timeout;
    let send = |what: &'static str, path: String| {
        let client = client.clone();
        async move {
            let req = hyper::Request::get(path)
                .body(empty_body())
                .expect("a path is a valid URI");
            let resp = tokio::time::timeout(timeout, client.send(req))
                .await
                .map_err(|_| StreamError::Timeout { what, timeout })??;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), MAX_ERROR_BODY).collect();
                let body = tokio::time::timeout(Duration::from_secs(5), body)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let message = String::from_utf8_lossy(&body[..body.len().min(512)])
                    .trim()
                    .to_string();
                return Err(StreamError::Daemon {
                    what,
                    status,
                    message,
                });
            }
            Ok(resp)
        }
    };
    // The daemon's clock: where a first stream starts, and in cluster mode what the
    // cursor moves on with while the stream waits.
    let mut clock = None;
    if cursor.is_none() || cluster.is_some() {
        let resp = send("GET /info", "/info".to_string()).await?;
        let body = Limited::new(resp.into_body(), daemon::MAX_ANSWER).collect();
        let body = tokio::time::timeout(timeout, body)
            .await
            .map_err(|_| StreamError::Timeout {
                what: "GET /info",
                timeout,
            })?
            .map_err(|e| StreamError::Read(e.to_string()))?
            .to_bytes();
        clock = Some((
            daemon_time(&body).map_err(StreamError::Read)?,
            Instant::now(),
        ));
    }
    if cursor.is_none() {
        let (now, _) = clock.expect("read above");
        let resume = lock(progress).resume;
        let start = match &cluster {
            Some(c) if resume => resume_point(device, c, now).await,
            _ => now,
        };
        *cursor = Some(Cursor::at(start));
        lock(progress).start(start);
    }
    let cursor = cursor.as_mut().expect("set above");
    let resp = send("GET /events", format!("/events?since={}", cursor.since())).await?;
    lock(progress).clock = clock.filter(|_| cluster.is_some());
    runner.metrics.docker_event_stream(device, true);
    if *failures > 0 {
        tracing::info!(%device, since = %cursor.since(), "Docker event stream resumed");
    }
    *failures = 0;
    let mut body = resp.into_body();
    let mut lines = Lines::new(MAX_EVENT_BYTES);
    loop {
        lock(progress).waiting = lines.buf.is_empty();
        let frame = body.frame().await;
        lock(progress).waiting = false;
        let frame = match frame {
            None => return Err(StreamError::Ended),
            Some(Err(e)) => return Err(StreamError::Read(e.to_string())),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let (complete, skipped) = lines.push(&data);
        if skipped {
            tracing::warn!(%device, "skipped an event longer than {MAX_EVENT_BYTES} bytes");
        }
        for line in complete {
            let Ok(event) = serde_json::from_slice::<RawEvent>(&line) else {
                tracing::debug!(%device, "skipped an event line that is not an event");
                continue;
            };
            if !cursor.admit(&event) {
                continue;
            }
            if let Some(c) = &cluster
                && !c.holds(device)
            {
                return Err(StreamError::Device(format!(
                    "this node no longer owns device {device}"
                )));
            }
            runner.metrics.docker_event(device);
            let snapshot = subs.read().unwrap_or_else(|e| e.into_inner()).clone();
            let matched = dispatch(device, &snapshot, &event);
            {
                let mut p = lock(progress);
                for _ in &matched {
                    p.hold(event.nanos());
                }
                p.read_up_to(cursor.nanos);
            }
            for w in matched {
                if tx.send(w).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The stream cut into lines (one event each), holding at most `max` bytes of a line:
/// a longer line is dropped whole.
struct Lines {
    buf: BytesMut,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
    max: usize,
    /// Inside a line that was too long: drop up to its end.
    skipping: bool,
}

impl Lines {
    fn new(max: usize) -> Lines {
        Lines {
            buf: BytesMut::new(),
            scanned: 0,
            max,
            skipping: false,
        }
    }

    /// Takes more of the stream; returns the lines it completed, and whether a line
    /// began to be dropped.
    fn push(&mut self, data: &[u8]) -> (Vec<BytesMut>, bool) {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(nl) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let line = self.buf.split_to(self.scanned + nl + 1);
            self.scanned = 0;
            if !std::mem::take(&mut self.skipping) {
                out.push(line);
            }
        }
        self.scanned = self.buf.len();
        let mut skipped = false;
        if self.buf.len() > self.max {
            skipped = !self.skipping;
            self.skipping = true;
        }
        if self.skipping {
            self.buf.clear();
            self.scanned = 0;
        }
        (out, skipped)
    }
}

/// The plugins (at most one trigger each: the first that matches) that get `e` from
/// `device`, by their triggers and their policy's scopes.
fn dispatch(
    device: &str,
    subs: &HashMap<String, Arc<PluginSubs>>,
    e: &RawEvent,
) -> Vec<WatchedEvent> {
    let mut out = Vec::new();
    let attrs = &e.actor.attributes;
    // Worked out for the first plugin that gets the event, shared by the rest.
    let mut attributes: Option<Vec<(String, String)>> = None;
    let time = DateTime::from_timestamp_nanos(e.nanos());
    for (plugin, p) in subs {
        if !p.policy.devices().allows(device) || !p.policy.decide("GET", "/events").is_allowed() {
            continue;
        }
        if e.kind == "container" {
            let name = attrs.get("name").map(String::as_str).unwrap_or_default();
            if !p.policy.containers().matches(name, attrs) {
                continue;
            }
        } else if attrs.contains_key("container") && !p.policy.containers().is_all() {
            // A network connect or a volume mount names a container only by its id: a
            // plugin with a container scope gets none of them, as the proxy shows a
            // network's containers only in scope.
            continue;
        }
        let Some((i, t)) = p
            .triggers
            .iter()
            .enumerate()
            .find(|(_, t)| t.watches(device) && t.matches(&e.kind, &e.action, attrs))
        else {
            continue;
        };
        let attributes = attributes
            .get_or_insert_with(|| {
                let mut a: Vec<(String, String)> =
                    attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                a.sort();
                a
            })
            .clone();
        out.push(WatchedEvent {
            plugin: plugin.clone(),
            trigger: i,
            debounce: t.debounce(),
            event: TriggerEvent::Docker {
                device: device.to_string(),
                kind: e.kind.clone(),
                action: e.action.clone(),
                actor_id: e.actor.id.clone(),
                attributes,
                time,
                count: 1,
            },
        });
    }
    out
}

/// Events for one object folding into one run.
struct Pending {
    event: TriggerEvent,
    due: Instant,
    /// The time of the fold's first event (held in [`Progress`] until it is handed over).
    first: i64,
}

/// Folds events per plugin, trigger and object for their trigger's debounce window,
/// then submits one run with the last event and the count.
async fn debounce(
    device: &str,
    runner: &Runner,
    mut rx: mpsc::Receiver<WatchedEvent>,
    progress: &Arc<Mutex<Progress>>,
) {
    let mut pending: HashMap<(String, usize, String), Pending> = HashMap::new();
    loop {
        let next = pending.values().map(|p| p.due).min();
        let item = tokio::select! {
            item = rx.recv() => match item {
                Some(w) => Some(w),
                None => return,
            },
            _ = async {
                match next {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        if let Some(w) = item {
            let actor = match &w.event {
                TriggerEvent::Docker { actor_id, .. } => actor_id.clone(),
                _ => String::new(),
            };
            let key = (w.plugin.clone(), w.trigger, actor);
            let at = event_nanos(&w.event);
            if let Some(p) = pending.get_mut(&key) {
                let count = match &p.event {
                    TriggerEvent::Docker { count, .. } => *count,
                    _ => 1,
                };
                p.event = w.event;
                if let TriggerEvent::Docker { count: c, .. } = &mut p.event {
                    *c = count.saturating_add(1);
                }
                // The fold's first event holds the cursor back for it.
                lock(progress).release(at);
            } else if w.debounce.is_zero() || pending.len() >= MAX_PENDING {
                submit(device, runner, &w.plugin, w.trigger, w.event, at, progress);
            } else {
                pending.insert(
                    key,
                    Pending {
                        event: w.event,
                        due: Instant::now() + w.debounce,
                        first: at,
                    },
                );
            }
        }
        let now = Instant::now();
        let due: Vec<_> = pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(p) = pending.remove(&key) {
                submit(device, runner, &key.0, key.1, p.event, p.first, progress);
            }
        }
    }
}

/// The `Nats-Msg-Id` of a Docker event's run in cluster mode: the same for the same
/// event whichever node saw it.
pub fn event_msg_id(plugin: &str, trigger: usize, event: &TriggerEvent) -> Option<String> {
    match event {
        TriggerEvent::Docker {
            device,
            kind,
            action,
            actor_id,
            time,
            ..
        } => Some(format!(
            "docker:{plugin}:{trigger}:{device}:{kind}:{action}:{actor_id}:{}",
            time.timestamp_nanos_opt().unwrap_or_default()
        )),
        _ => None,
    }
}

/// Runs `event` for `plugin` (in cluster mode: hands it to the cluster), then lets the
/// fold's first event at `first` go from `progress`.
fn submit(
    device: &str,
    runner: &Runner,
    plugin: &str,
    trigger: usize,
    event: TriggerEvent,
    first: i64,
    progress: &Arc<Mutex<Progress>>,
) {
    let Some(scheduler) = runner.scheduler.upgrade() else {
        return;
    };
    if let Some(cluster) = scheduler.cluster().cloned() {
        let Some(msg_id) = event_msg_id(plugin, trigger, &event) else {
            lock(progress).release(first);
            return;
        };
        if !cluster.holds(device) {
            // Still held back in the cursor: the device's next owner reads it again.
            tracing::debug!(%device, plugin, "Docker event not handed over: this node does not own the device now");
            return;
        }
        let (device, plugin, metrics, progress) = (
            device.to_string(),
            plugin.to_string(),
            runner.metrics.clone(),
            progress.clone(),
        );
        runner.runtime.spawn(async move {
            match cluster.hand_over(&plugin, event, &msg_id).await {
                Ok(_) => metrics.docker_event_run(&plugin),
                Err(e) => {
                    tracing::warn!(%device, plugin, error = %e, "Docker event not handed to the cluster")
                }
            }
            lock(&progress).release(first);
        });
        return;
    }
    lock(progress).release(first);
    match scheduler.submit(plugin, event) {
        Ok(run) => {
            runner.metrics.docker_event_run(plugin);
            tracing::debug!(%device, plugin, %run, "Docker event run submitted");
        }
        Err(SubmitError::ShuttingDown) | Err(SubmitError::NotInstalled(_)) => {}
        Err(e) => tracing::warn!(%device, plugin, error = %e, "Docker event not run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(nanos: i64, action: &str, id: &str) -> RawEvent {
        RawEvent {
            kind: "container".into(),
            action: action.into(),
            actor: RawActor {
                id: id.into(),
                attributes: HashMap::new(),
            },
            time: nanos / 1_000_000_000,
            time_nano: nanos,
        }
    }

    #[test]
    fn the_cursor_skips_what_was_seen_and_what_is_older_but_not_new_events_at_the_same_time() {
        let mut c = Cursor::at(5_000_000_000);
        assert!(
            !c.admit(&event(4_999_999_999, "die", "a")),
            "before the start"
        );
        assert!(c.admit(&event(5_000_000_000, "die", "a")), "at the start");
        assert!(c.admit(&event(6_000_000_001, "die", "a")));
        assert_eq!(c.since(), "6.000000001");
        // The daemon sends the events at `since` again after a reconnect.
        assert!(!c.admit(&event(6_000_000_001, "die", "a")), "a repeat");
        assert!(
            c.admit(&event(6_000_000_001, "kill", "a")),
            "another event at that time"
        );
        assert!(c.admit(&event(7_000_000_000, "die", "a")));
    }

    #[test]
    fn the_cluster_cursor_stays_before_events_not_handed_over_and_moves_with_the_clock_only_while_waiting()
     {
        let s = 1_000_000_000i64;
        let t0 = Instant::now();
        let mut p = Progress::default();
        assert_eq!(p.position(t0), None, "no start known yet");
        p.start(100 * s);
        assert_eq!(p.position(t0), Some(100 * s));
        // Two runs of an event at 101 s, one of another at 102 s, on their way.
        p.hold(101 * s);
        p.hold(101 * s);
        p.read_up_to(101 * s);
        p.hold(102 * s);
        p.read_up_to(102 * s);
        assert_eq!(p.position(t0), Some(101 * s), "held back to the oldest");
        p.release(101 * s);
        assert_eq!(p.position(t0), Some(101 * s), "one run of it is still out");
        p.release(101 * s);
        assert_eq!(p.position(t0), Some(102 * s));
        p.release(102 * s);
        assert_eq!(p.position(t0), Some(102 * s), "the last event read");
        p.release(7 * s);
        assert_eq!(p.position(t0), Some(102 * s), "releasing what is not held");
        p.read_up_to(50 * s);
        assert_eq!(p.position(t0), Some(102 * s), "never backwards");

        // The open stream waits: the daemon's clock, read at 110 s, moves it on less
        // the slack, but not past an event still out.
        p.clock = Some((110 * s, t0));
        assert_eq!(
            p.position(t0 + Duration::from_secs(20)),
            Some(102 * s),
            "not waiting"
        );
        p.waiting = true;
        assert_eq!(p.position(t0), Some(105 * s), "110 s less the slack");
        assert_eq!(p.position(t0 + Duration::from_secs(20)), Some(125 * s));
        p.hold(111 * s);
        assert_eq!(p.position(t0 + Duration::from_secs(20)), Some(111 * s));
        p.release(111 * s);
        // A stream that is not open does not move it.
        p.clock = None;
        assert_eq!(p.position(t0 + Duration::from_secs(20)), Some(102 * s));
    }

    #[test]
    fn lines_longer_than_the_limit_are_dropped_whole_and_the_next_ones_still_read() {
        let mut l = Lines::new(8);
        let (got, skipped) = l.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(got, vec![BytesMut::from(&b"{\"a\":1}\n"[..])]);
        assert!(!skipped);
        let (got, skipped) = l.push(b":2222222222");
        assert!(got.is_empty() && skipped, "too long: dropped");
        assert!(l.buf.is_empty(), "nothing of it is held");
        let (got, skipped) = l.push(b"22222}\n{}\n");
        assert_eq!(
            got,
            vec![BytesMut::from(&b"{}\n"[..])],
            "its tail is dropped too"
        );
        assert!(!skipped);
    }

    fn subs(policy: &str, events: &[&str]) -> Arc<PluginSubs> {
        let policy = crate::policy::Policy::from_toml_str(policy)
            .unwrap()
            .compile();
        let config = super::super::DockerTriggerConfig {
            events: events.iter().map(|e| e.to_string()).collect(),
            devices: None,
            labels: Vec::new(),
            debounce: None,
        };
        Arc::new(PluginSubs {
            policy,
            triggers: vec![DockerTrigger::from_config(&config).unwrap()],
        })
    }

    #[test]
    fn an_event_reaches_only_the_plugins_whose_device_and_container_scopes_hold_it() {
        let all = HashMap::from([
            (
                "web-only".to_string(),
                subs(
                    "devices = [\"local\"]\n[containers]\nnames = [\"web-*\"]\n",
                    &["container:die"],
                ),
            ),
            (
                "labelled".to_string(),
                subs(
                    "devices = [\"*\"]\n[containers]\nlabels = [\"heal=true\"]\n",
                    &["container:*"],
                ),
            ),
            (
                "elsewhere".to_string(),
                subs("devices = [\"prod-*\"]\n", &["container:die"]),
            ),
            (
                "deaf".to_string(),
                subs("EVENTS = 0\ndevices = [\"*\"]\n", &["container:die"]),
            ),
        ]);
        let mut e = event(1, "die", "abc");
        e.actor.attributes = HashMap::from([("name".to_string(), "web-1".to_string())]);
        let got: Vec<String> = dispatch("local", &all, &e)
            .into_iter()
            .map(|w| w.plugin)
            .collect();
        assert_eq!(got, ["web-only"]);
        e.actor
            .attributes
            .insert("heal".to_string(), "true".to_string());
        let mut got: Vec<String> = dispatch("local", &all, &e)
            .into_iter()
            .map(|w| w.plugin)
            .collect();
        got.sort();
        assert_eq!(got, ["labelled", "web-only"]);
        let w = &dispatch("local", &all, &e)[0];
        match &w.event {
            TriggerEvent::Docker {
                device,
                action,
                count,
                attributes,
                ..
            } => {
                assert_eq!(
                    (device.as_str(), action.as_str(), *count),
                    ("local", "die", 1)
                );
                assert!(attributes.contains(&("name".to_string(), "web-1".to_string())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn events_naming_a_container_by_id_reach_only_plugins_without_a_container_scope() {
        let all = HashMap::from([
            (
                "web-only".to_string(),
                subs(
                    "NETWORKS = 1\ndevices = [\"*\"]\n[containers]\nnames = [\"web-*\"]\n",
                    &["network:connect"],
                ),
            ),
            (
                "any".to_string(),
                subs("NETWORKS = 1\ndevices = [\"*\"]\n", &["network:connect"]),
            ),
        ]);
        let mut e = event(1, "connect", "net1");
        e.kind = "network".into();
        e.actor.attributes = HashMap::from([
            ("container".to_string(), "0123abcd".to_string()),
            ("name".to_string(), "web-net".to_string()),
        ]);
        let got: Vec<String> = dispatch("local", &all, &e)
            .into_iter()
            .map(|w| w.plugin)
            .collect();
        assert_eq!(got, ["any"]);
    }

    #[test]
    fn events_are_read_as_the_daemon_writes_them() {
        let line = br#"{"status":"die","id":"abc","from":"img","Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{"exitCode":"137","name":"web","tier":"x"}},"scope":"local","time":1700000000,"timeNano":1700000000123456789}"#;
        let e: RawEvent = serde_json::from_slice(line).unwrap();
        assert_eq!((e.kind.as_str(), e.action.as_str()), ("container", "die"));
        assert_eq!(e.actor.attributes["name"], "web");
        assert_eq!(e.nanos(), 1_700_000_000_123_456_789);
    }
}
