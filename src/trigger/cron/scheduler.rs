//! The engine's one cron timer: every installed trigger, fired from a single task.
//!
//! Why one task rather than a task per trigger: the engine may hold thousands of
//! triggers, most firing on the same second boundaries. The fires to come are kept
//! grouped by the instant they are due, so the loop sleeps once per distinct instant and
//! then takes that instant's whole set, already computed, with no sorting per
//! fire; triggers are added and removed at run time under one lock, and "stop firing"
//! at shutdown is a single flag. `benches/cron.rs` measures its lateness against a
//! task-per-trigger baseline, with 1,000 and 10,000 triggers on the same second.
//!
//! Each fire passes the trigger's [`OverlapGate`]. The fires an instant starts are handed
//! to the runtime in chunks (up to `CHUNK` fires to a tokio task, which drives their
//! callbacks side by side), so the loop spawns a few tasks rather than one per fire and
//! both worker threads start callbacks at once. When a callback's future ends, the gate
//! may start the fire that was queued behind it. A callback that panics is logged and
//! counts as finished.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::gate::{FireDecision, GateStats, OverlapGate};
use super::{CronTrigger, Jitter};

/// The longest the loop sleeps before looking at the wall clock again, so that a clock
/// step (NTP, suspend) is noticed promptly.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// How early the timer is set before a deadline; see the loop in [`CronScheduler::run`].
const EARLY_WAKE: Duration = Duration::from_millis(1);
/// Most fires one tokio task starts and drives. Small enough that an instant's fires
/// spread over the worker threads at once, large enough that 10,000 fires on one second
/// cost some 80 spawns rather than 10,000.
const CHUNK: usize = 128;

/// Names one cron trigger: the plugin and the trigger's position in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TriggerId {
    plugin: Arc<str>,
    index: u32,
}

impl TriggerId {
    pub fn new(plugin: &str, index: u32) -> TriggerId {
        TriggerId {
            plugin: Arc::from(plugin),
            index,
        }
    }

    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    pub fn index(&self) -> u32 {
        self.index
    }
}

impl std::fmt::Display for TriggerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#cron{}", self.plugin, self.index)
    }
}

/// What the callback is told about one fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FireInfo {
    /// The trigger's schedule as written (for the plugin's `cron` event and the run
    /// record).
    pub schedule: Arc<str>,
    /// The cron time this fire is for (without jitter). For `run_on_start`, the moment
    /// the trigger was added.
    pub scheduled_at: DateTime<Utc>,
    /// When the callback was invoked.
    pub fired_at: DateTime<Utc>,
}

/// A trigger's state, for `capstan plugin schedule` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerStatus {
    /// The next cron time (without jitter), if the schedule fires again.
    pub next_fire: Option<DateTime<Utc>>,
    /// Callbacks running now.
    pub running: usize,
    /// The scheduled time of the fire waiting behind a running one (`queue` policy).
    pub waiting: Option<DateTime<Utc>>,
    pub stats: GateStats,
}

/// What [`CronScheduler::run`] did at shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Callbacks still running at the shutdown signal that ended within the grace period.
    pub finished: usize,
    /// Callbacks still running when the grace period ran out; their futures were dropped.
    pub aborted: usize,
    /// Queued fires dropped.
    pub dropped_waiting: usize,
}

type SharedGate = Arc<Mutex<OverlapGate>>;
/// Next fire times computed in one batch: (schedule, zone, after) -> next.
type NextMemo = HashMap<(Arc<str>, Tz, DateTime<Utc>), Option<DateTime<Utc>>>;

/// Every cron trigger of the engine. Cheap to clone; clones share the triggers.
#[derive(Clone, Default)]
pub struct CronScheduler {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the loop when the earliest deadline may have changed.
    wake: Notify,
    running: AtomicBool,
    stopping: AtomicBool,
}

/// Triggers live in slots so the fires to come refer to them by index, without hashing
/// ids on the hot path; `index` maps ids to slots for add and remove.
#[derive(Default)]
struct State {
    index: HashMap<TriggerId, usize>,
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// The fires to come, by the instant they are due (cron time plus jitter). Entries
    /// of removed or replaced triggers stay until their instant and are skipped then.
    due: BTreeMap<DateTime<Utc>, Vec<Due>>,
    /// Entries in `due`, stale ones included.
    queued: usize,
    /// The last instant's emptied list, reused for the next instant that gets one, so a
    /// steady schedule allocates nothing per fire.
    spare: Vec<Due>,
    next_generation: u64,
}

struct Entry {
    id: TriggerId,
    trigger: Arc<CronTrigger>,
    /// Shared with the trigger's running fires, which report their end to it without
    /// taking the scheduler's lock.
    gate: SharedGate,
    jitter: Jitter,
    /// Unique per installation, so due entries of a removed or replaced trigger (or of
    /// an earlier occupant of the slot) are recognised as stale.
    generation: u64,
    next_scheduled: Option<DateTime<Utc>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Due {
    generation: u64,
    scheduled_at: DateTime<Utc>,
    /// The one-off `run_on_start` fire, which does not continue the schedule.
    on_start: bool,
    slot: usize,
}

/// A fire that passed its gate, or a trigger to reschedule.
struct Fire {
    slot: usize,
    generation: u64,
    scheduled_at: DateTime<Utc>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn entry(&self, slot: usize, generation: u64) -> Option<&Entry> {
        self.slots
            .get(slot)?
            .as_ref()
            .filter(|e| e.generation == generation)
    }

    fn entry_mut(&mut self, slot: usize, generation: u64) -> Option<&mut Entry> {
        self.slots
            .get_mut(slot)?
            .as_mut()
            .filter(|e| e.generation == generation)
    }

    /// Files a fire under the instant it is due.
    fn push(&mut self, at: DateTime<Utc>, due: Due) {
        let spare = &mut self.spare;
        self.due
            .entry(at)
            .or_insert_with(|| std::mem::take(spare))
            .push(due);
        self.queued += 1;
    }

    /// Takes a trigger out; a fire waiting behind its running one is dropped with it.
    fn take(&mut self, id: &TriggerId) -> Option<Entry> {
        let slot = self.index.remove(id)?;
        let entry = self.slots[slot].take()?;
        self.free.push(slot);
        lock(&entry.gate).clear_waiting();
        Some(entry)
    }
}

impl CronScheduler {
    pub fn new() -> CronScheduler {
        CronScheduler::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Installs a trigger (or replaces the one with the same id: its running callbacks
    /// go on, its waiting fire is dropped). Returns whether one was replaced. Takes
    /// effect at once, also while [`CronScheduler::run`] is running.
    pub fn add(&self, id: TriggerId, trigger: CronTrigger) -> bool {
        let now = Utc::now();
        let next = trigger.next_after(now);
        let mut st = self.state();
        let replaced = st.take(&id).is_some();
        let generation = st.next_generation;
        st.next_generation += 1;
        let slot = match st.free.pop() {
            Some(slot) => slot,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        let mut entry = Entry {
            id: id.clone(),
            jitter: trigger.jitter_source(),
            gate: Arc::new(Mutex::new(OverlapGate::new(trigger.overlap()))),
            trigger: Arc::new(trigger),
            generation,
            next_scheduled: None,
        };
        if entry.trigger.run_on_start() {
            st.push(
                now,
                Due {
                    generation,
                    scheduled_at: now,
                    on_start: true,
                    slot,
                },
            );
        }
        if let Some((at, due)) = due_at(slot, &mut entry, next) {
            st.push(at, due);
        }
        st.slots[slot] = Some(entry);
        st.index.insert(id, slot);
        compact(&mut st);
        drop(st);
        self.shared.wake.notify_one();
        replaced
    }

    /// Removes a trigger: it fires no more, and a fire waiting behind its running one
    /// is dropped; a callback already running finishes.
    pub fn remove(&self, id: &TriggerId) -> bool {
        let removed = self.state().take(id).is_some();
        if removed {
            self.shared.wake.notify_one();
        }
        removed
    }

    /// Removes every trigger of a plugin (uninstall). Returns how many.
    pub fn remove_plugin(&self, plugin: &str) -> usize {
        let mut st = self.state();
        let ids: Vec<TriggerId> = st
            .index
            .keys()
            .filter(|id| id.plugin() == plugin)
            .cloned()
            .collect();
        for id in &ids {
            st.take(id);
        }
        drop(st);
        if !ids.is_empty() {
            self.shared.wake.notify_one();
        }
        ids.len()
    }

    pub fn len(&self) -> usize {
        self.state().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Installed trigger ids, sorted.
    pub fn ids(&self) -> Vec<TriggerId> {
        let mut ids: Vec<_> = self.state().index.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn status(&self, id: &TriggerId) -> Option<TriggerStatus> {
        let st = self.state();
        let e = st.slots[*st.index.get(id)?].as_ref()?;
        let gate = lock(&e.gate);
        Some(TriggerStatus {
            next_fire: e.next_scheduled,
            running: gate.running(),
            waiting: gate.waiting(),
            stats: gate.stats(),
        })
    }

    /// Fires triggers until `shutdown` resolves, calling `callback` on its own task for
    /// every started fire. At shutdown, no new fire starts and waiting fires are
    /// dropped; running callbacks get `grace` to finish, then their futures are
    /// dropped (the caller marks their runs interrupted).
    ///
    /// # Panics
    /// If the scheduler is already running (one loop per scheduler).
    pub async fn run<F, Fut>(
        &self,
        callback: F,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> ShutdownReport
    where
        F: Fn(TriggerId, FireInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        assert!(
            !self.shared.running.swap(true, Ordering::SeqCst),
            "CronScheduler::run called twice"
        );
        self.shared.stopping.store(false, Ordering::SeqCst);
        let runner = Arc::new(Runner {
            shared: self.shared.clone(),
            callback,
            in_flight: AtomicUsize::new(0),
        });
        // The chunks in flight, pruned of finished ones now and then (amortised).
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        let mut prune_at = 64;
        // Buffers kept from one instant to the next.
        let (mut started, mut fired, mut memo) = (Vec::new(), Vec::new(), NextMemo::new());
        tokio::pin!(shutdown);
        loop {
            let now = Utc::now();
            self.fire_due(now, &mut started, &mut fired);
            let mut fires = started.drain(..);
            loop {
                let chunk: Vec<Started> = fires.by_ref().take(CHUNK).collect();
                if chunk.is_empty() {
                    break;
                }
                tasks.push(tokio::spawn(run_chunk(runner.clone(), chunk)));
            }
            drop(fires);
            let next = self.reschedule(&mut fired, &mut memo, now);
            if tasks.len() >= prune_at {
                tasks.retain(|t| !t.is_finished());
                prune_at = (tasks.len() * 2).max(64);
            }
            let wait = next
                .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            if wait <= EARLY_WAKE {
                // Tokio's timer wakes a millisecond or more late, so the timer is set
                // that much early and the last stretch is waited out by yielding.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep(wait - EARLY_WAKE) => {}
            }
        }

        self.shared.stopping.store(true, Ordering::SeqCst);
        let dropped_waiting = self
            .state()
            .slots
            .iter()
            .flatten()
            .filter(|e| lock(&e.gate).clear_waiting())
            .count();
        tasks.retain(|t| !t.is_finished());
        let in_flight = runner.in_flight.load(Ordering::SeqCst);
        let drained = tokio::time::timeout(grace, async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        })
        .await
        .is_ok();
        let mut aborted = 0;
        if !drained {
            // Callbacks still running; dropping their chunks drops their futures.
            aborted = runner.in_flight.load(Ordering::SeqCst);
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        self.shared.running.store(false, Ordering::SeqCst);
        ShutdownReport {
            finished: in_flight.saturating_sub(aborted),
            aborted,
            dropped_waiting,
        }
    }

    /// Takes every instant that is due, passes each of its fires through the trigger's
    /// gate and appends the started ones to `started`, and to `fired` the triggers whose
    /// next fire is to be scheduled: firing comes first, so callbacks do not wait while
    /// next times are computed.
    fn fire_due(&self, now: DateTime<Utc>, started: &mut Vec<Started>, fired: &mut Vec<Fire>) {
        let mut guard = self.state();
        let st = &mut *guard;
        while let Some(instant) = st.due.first_entry() {
            if *instant.key() > now {
                break;
            }
            let mut dues = instant.remove();
            st.queued -= dues.len();
            for due in dues.drain(..) {
                let Some(entry) = st.entry(due.slot, due.generation) else {
                    continue;
                };
                let decision = lock(&entry.gate).on_fire(due.scheduled_at);
                match decision {
                    FireDecision::Start => started.push(Started {
                        id: entry.id.clone(),
                        gate: entry.gate.clone(),
                        schedule: entry.trigger.schedule().source().clone(),
                        scheduled_at: due.scheduled_at,
                    }),
                    FireDecision::Queue => {
                        tracing::debug!(trigger = %entry.id, scheduled_at = %due.scheduled_at, "previous run still going; fire queued")
                    }
                    FireDecision::Skip => {
                        tracing::info!(trigger = %entry.id, scheduled_at = %due.scheduled_at, "previous run still going; fire skipped")
                    }
                }
                if !due.on_start {
                    fired.push(Fire {
                        slot: due.slot,
                        generation: due.generation,
                        scheduled_at: due.scheduled_at,
                    });
                }
            }
            if dues.capacity() > st.spare.capacity() {
                st.spare = dues;
            }
        }
    }

    /// Schedules the next fire of each trigger that just fired (no catch-up: the next
    /// time after now), emptying `fired`. Identical schedules in one zone share one
    /// computation. Returns the earliest deadline.
    fn reschedule(
        &self,
        fired: &mut Vec<Fire>,
        memo: &mut NextMemo,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        memo.clear();
        let mut guard = self.state();
        let st = &mut *guard;
        for f in fired.drain(..) {
            let Some(entry) = st.entry_mut(f.slot, f.generation) else {
                continue;
            };
            let after = now.max(f.scheduled_at);
            let trigger = &entry.trigger;
            let key = (
                trigger.schedule().source().clone(),
                trigger.timezone(),
                after,
            );
            let next = *memo.entry(key).or_insert_with(|| trigger.next_after(after));
            if let Some((at, due)) = due_at(f.slot, entry, next) {
                st.push(at, due);
            }
        }
        st.due.first_key_value().map(|(at, _)| *at)
    }
}

/// The due entry for a fire at `scheduled_at`, and the instant it is due (plus jitter);
/// records the time on the entry.
fn due_at(
    slot: usize,
    entry: &mut Entry,
    scheduled_at: Option<DateTime<Utc>>,
) -> Option<(DateTime<Utc>, Due)> {
    entry.next_scheduled = scheduled_at;
    let scheduled_at = scheduled_at?;
    let delay = entry.jitter.next_delay();
    let at = scheduled_at + chrono::Duration::from_std(delay).unwrap_or_default();
    Some((
        at,
        Due {
            generation: entry.generation,
            scheduled_at,
            on_start: false,
            slot,
        },
    ))
}

/// Drops the due entries of removed or replaced triggers once they are most of them.
fn compact(st: &mut State) {
    if st.queued <= 2 * st.index.len() + 64 {
        return;
    }
    let State {
        slots, due, queued, ..
    } = st;
    let live = |d: &Due| {
        slots
            .get(d.slot)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.generation == d.generation)
    };
    *queued = 0;
    due.retain(|_, dues| {
        dues.retain(|d| live(d));
        *queued += dues.len();
        !dues.is_empty()
    });
}

/// What every running fire shares for one [`CronScheduler::run`].
struct Runner<F> {
    shared: Arc<Shared>,
    callback: F,
    /// Callbacks running now (for the shutdown report).
    in_flight: AtomicUsize,
}

/// A fire that passed its gate, to run.
struct Started {
    id: TriggerId,
    gate: SharedGate,
    schedule: Arc<str>,
    scheduled_at: DateTime<Utc>,
}

/// Runs a chunk of started fires side by side on one task. Aborting the task (past the
/// shutdown grace period) drops their callbacks' futures.
async fn run_chunk<F, Fut>(runner: Arc<Runner<F>>, fires: Vec<Started>)
where
    F: Fn(TriggerId, FireInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if fires.len() == 1 {
        for start in fires {
            run_fire(&runner, start).await;
        }
        return;
    }
    let mut running: FuturesUnordered<_> =
        fires.into_iter().map(|s| run_fire(&runner, s)).collect();
    while running.next().await.is_some() {}
}

/// Runs one started fire, then any fire that queued behind it.
async fn run_fire<F, Fut>(runner: &Runner<F>, start: Started)
where
    F: Fn(TriggerId, FireInfo) -> Fut,
    Fut: Future<Output = ()>,
{
    let Started {
        id,
        gate,
        schedule,
        mut scheduled_at,
    } = start;
    loop {
        let info = FireInfo {
            schedule: schedule.clone(),
            scheduled_at,
            fired_at: Utc::now(),
        };
        runner.in_flight.fetch_add(1, Ordering::SeqCst);
        // A panic, in making the callback's future or in polling it, ends this fire
        // alone, not the chunk it runs in.
        let ended = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            (runner.callback)(id.clone(), info)
        })) {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        runner.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Err(panic) = ended {
            tracing::error!(trigger = %id, panic = panic_message(&panic), "cron callback panicked; counted as finished");
        }
        let next = lock(&gate).on_finish();
        match next {
            Some(s) if !runner.shared.stopping.load(Ordering::SeqCst) => scheduled_at = s,
            _ => break,
        }
    }
}

fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic)")
}

#[cfg(test)]
mod tests {
    //! These run on real time with per-second schedules (6 fields), so each takes a few
    //! seconds; they run in parallel.

    use std::sync::atomic::AtomicUsize;

    use std::pin::Pin;

    use super::super::OverlapPolicy;
    use super::*;

    type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    #[derive(Default)]
    struct Recorder {
        fires: Mutex<Vec<(TriggerId, FireInfo)>>,
        running: AtomicUsize,
        max_running: AtomicUsize,
    }

    impl Recorder {
        fn fires(&self) -> Vec<(TriggerId, FireInfo)> {
            self.fires.lock().unwrap().clone()
        }

        fn fires_of(&self, id: &TriggerId) -> Vec<FireInfo> {
            self.fires()
                .into_iter()
                .filter(|(i, _)| i == id)
                .map(|(_, f)| f)
                .collect()
        }
    }

    /// A callback that records each fire and then holds its run for `hold`.
    fn recording(
        rec: &Arc<Recorder>,
        hold: Duration,
    ) -> impl Fn(TriggerId, FireInfo) -> BoxFuture + Send + Sync + 'static {
        let rec = rec.clone();
        move |id, info| {
            let rec = rec.clone();
            Box::pin(async move {
                rec.fires.lock().unwrap().push((id, info));
                let now = rec.running.fetch_add(1, Ordering::SeqCst) + 1;
                rec.max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                rec.running.fetch_sub(1, Ordering::SeqCst);
            })
        }
    }

    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        handle: tokio::task::JoinHandle<ShutdownReport>,
    }

    impl Running {
        async fn stop(self) -> ShutdownReport {
            let _ = self.stop.send(());
            self.handle.await.unwrap()
        }
    }

    fn start<F, Fut>(sched: &CronScheduler, callback: F, grace: Duration) -> Running
    where
        F: Fn(TriggerId, FireInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let s = sched.clone();
        let handle = tokio::spawn(async move {
            s.run(
                callback,
                async {
                    let _ = rx.await;
                },
                grace,
            )
            .await
        });
        Running { stop, handle }
    }

    fn every_second(policy: OverlapPolicy) -> CronTrigger {
        CronTrigger::new("* * * * * *")
            .unwrap()
            .with_overlap(policy)
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_every_second_trigger_fires_on_whole_seconds_and_never_early() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), every_second(OverlapPolicy::Skip));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(2600).await;
        run.stop().await;
        let fires = rec.fires_of(&id);
        assert!(fires.len() >= 2, "{fires:?}");
        for f in &fires {
            assert_eq!(&*f.schedule, "* * * * * *");
            assert_eq!(f.scheduled_at.timestamp_subsec_nanos(), 0, "{f:?}");
            let late = f.fired_at - f.scheduled_at;
            assert!(late >= chrono::Duration::zero(), "fired early: {f:?}");
            // On time is measured by the cron benchmark; here only that the fire belongs
            // to its own second (a loaded machine may delay it, not by a whole second).
            assert!(late < chrono::Duration::seconds(1), "late: {f:?}");
        }
        let seconds: Vec<_> = fires.iter().map(|f| f.scheduled_at.timestamp()).collect();
        assert!(seconds.windows(2).all(|w| w[1] == w[0] + 1), "{seconds:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skip_drops_fires_while_the_previous_run_is_going() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), every_second(OverlapPolicy::Skip));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::from_millis(1500)),
            Duration::from_secs(3),
        );
        sleep_ms(3700).await;
        let status = sched.status(&id).unwrap();
        run.stop().await;
        assert_eq!(rec.max_running.load(Ordering::SeqCst), 1);
        assert!(status.stats.skipped >= 1, "{status:?}");
        assert!(status.stats.started >= 2, "{status:?}");
        assert_eq!(status.stats.queued, 0);
        let fires = rec.fires_of(&id);
        assert!(
            fires
                .windows(2)
                .all(|w| w[1].scheduled_at - w[0].scheduled_at >= chrono::Duration::seconds(2)),
            "a fire inside a run was started: {fires:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_holds_one_fire_and_starts_it_when_the_run_ends() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), every_second(OverlapPolicy::Queue));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::from_millis(2500)),
            Duration::from_secs(5),
        );
        sleep_ms(4300).await;
        let status = sched.status(&id).unwrap();
        run.stop().await;
        assert_eq!(rec.max_running.load(Ordering::SeqCst), 1);
        let fires = rec.fires_of(&id);
        assert!(fires.len() >= 2, "{fires:?}");
        let (first, second) = (&fires[0], &fires[1]);
        assert_eq!(
            second.scheduled_at - first.scheduled_at,
            chrono::Duration::seconds(1),
            "the queued fire is the one right after the first"
        );
        let waited = second.fired_at - first.fired_at;
        assert!(
            waited >= chrono::Duration::milliseconds(2450),
            "the queued fire started before the run ended: {waited}"
        );
        assert!(status.stats.queued >= 1, "{status:?}");
        assert!(
            status.stats.skipped >= 1,
            "a second waiting fire was kept: {status:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allow_runs_fires_side_by_side() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), every_second(OverlapPolicy::Allow));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::from_millis(2500)),
            Duration::ZERO,
        );
        sleep_ms(3300).await;
        let report = run.stop().await;
        assert!(rec.max_running.load(Ordering::SeqCst) >= 2);
        assert_eq!(sched.status(&id).unwrap().stats.skipped, 0);
        assert!(report.aborted >= 1, "{report:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_trigger_fires_no_more_while_the_others_go_on() {
        let sched = CronScheduler::new();
        let (keep, gone) = (TriggerId::new("keep", 0), TriggerId::new("gone", 0));
        sched.add(keep.clone(), every_second(OverlapPolicy::Skip));
        sched.add(gone.clone(), every_second(OverlapPolicy::Skip));
        sched.add(TriggerId::new("gone", 1), every_second(OverlapPolicy::Skip));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(1300).await;
        assert!(!rec.fires_of(&gone).is_empty());
        assert!(sched.remove(&gone));
        assert!(!sched.remove(&gone), "removing twice finds nothing");
        assert_eq!(sched.remove_plugin("gone"), 1);
        let removed_at = Utc::now();
        assert_eq!(sched.ids(), vec![keep.clone()]);
        sleep_ms(2200).await;
        run.stop().await;
        assert!(
            rec.fires()
                .iter()
                .filter(|(id, _)| id.plugin() == "gone")
                .all(|(_, f)| f.fired_at <= removed_at),
            "a removed trigger fired"
        );
        assert!(rec.fires_of(&keep).iter().any(|f| f.fired_at > removed_at));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trigger_added_while_running_fires_without_a_restart() {
        let sched = CronScheduler::new();
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(300).await;
        let id = TriggerId::new("late", 0);
        assert!(!sched.add(id.clone(), every_second(OverlapPolicy::Skip)));
        sleep_ms(1300).await;
        run.stop().await;
        assert!(!rec.fires_of(&id).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_on_start_fires_once_at_once_and_the_schedule_goes_on() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        let added_at = Utc::now();
        sched.add(
            id.clone(),
            CronTrigger::new("@yearly").unwrap().with_run_on_start(true),
        );
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(900).await;
        let status = sched.status(&id).unwrap();
        run.stop().await;
        let fires = rec.fires_of(&id);
        assert_eq!(fires.len(), 1, "{fires:?}");
        assert!(fires[0].scheduled_at >= added_at);
        // At start, not at its (yearly) schedule.
        assert!(fires[0].fired_at - added_at < chrono::Duration::seconds(1));
        assert!(status.next_fire.unwrap() > Utc::now() + chrono::Duration::days(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trigger_without_run_on_start_does_not_catch_up_missed_fires() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), CronTrigger::new("@hourly").unwrap());
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(300).await;
        run.stop().await;
        assert!(rec.fires().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_short_runs_and_drops_long_ones_after_the_grace_period() {
        let sched = CronScheduler::new();
        sched.add(TriggerId::new("p", 0), every_second(OverlapPolicy::Skip));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::from_millis(400)),
            Duration::from_secs(3),
        );
        while rec.running.load(Ordering::SeqCst) == 0 {
            sleep_ms(10).await;
        }
        let report = run.stop().await;
        assert_eq!(
            report,
            ShutdownReport {
                finished: 1,
                aborted: 0,
                dropped_waiting: 0
            }
        );

        let sched = CronScheduler::new();
        sched.add(TriggerId::new("p", 0), every_second(OverlapPolicy::Queue));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::from_secs(30)),
            Duration::from_millis(200),
        );
        sleep_ms(2300).await;
        let stopped = std::time::Instant::now();
        let report = run.stop().await;
        assert!(stopped.elapsed() < Duration::from_secs(2));
        assert_eq!(
            report,
            ShutdownReport {
                finished: 0,
                aborted: 1,
                dropped_waiting: 1
            }
        );
        assert_eq!(rec.fires().len(), 1, "the waiting fire did not start");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_callback_counts_as_finished() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), every_second(OverlapPolicy::Skip));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let run = start(
            &sched,
            move |_, _| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    panic!("plugin host bug");
                }
            },
            Duration::from_secs(1),
        );
        sleep_ms(2600).await;
        run.stop().await;
        assert!(calls.load(Ordering::SeqCst) >= 2);
        assert_eq!(sched.status(&id).unwrap().running, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_callback_panicking_leaves_the_other_fires_of_its_instant_running() {
        // Fires of one instant share a task; a panic, whether in making the callback's
        // future or in polling it, ends that fire alone.
        let sched = CronScheduler::new();
        for plugin in ["panics-making", "panics-polling", "good"] {
            sched.add(TriggerId::new(plugin, 0), every_second(OverlapPolicy::Skip));
        }
        let rec = Arc::new(Recorder::default());
        let inner = recording(&rec, Duration::from_millis(100));
        let run = start(
            &sched,
            move |id: TriggerId, info: FireInfo| -> BoxFuture {
                match id.plugin() {
                    "panics-making" => panic!("plugin host bug before the future"),
                    "panics-polling" => Box::pin(async { panic!("plugin host bug in the future") }),
                    _ => inner(id, info),
                }
            },
            Duration::from_secs(1),
        );
        sleep_ms(2600).await;
        let report = run.stop().await;
        let good = TriggerId::new("good", 0);
        assert!(rec.fires_of(&good).len() >= 2, "{:?}", rec.fires());
        assert_eq!(report.aborted, 0, "{report:?}");
        for plugin in ["panics-making", "panics-polling", "good"] {
            let status = sched.status(&TriggerId::new(plugin, 0)).unwrap();
            assert_eq!(status.running, 0, "{plugin}: {status:?}");
            assert!(status.stats.started >= 2, "{plugin}: {status:?}");
        }
    }

    #[test]
    fn replacing_a_trigger_again_and_again_keeps_the_due_set_small() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        for _ in 0..10_000 {
            sched.add(id.clone(), CronTrigger::new("@yearly").unwrap());
        }
        sched.add(TriggerId::new("q", 0), every_second(OverlapPolicy::Skip));
        let st = sched.state();
        assert!(st.queued <= 2 * st.index.len() + 64, "{} queued", st.queued);
        assert_eq!(st.queued, st.due.values().map(Vec::len).sum::<usize>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jitter_delays_each_fire_by_the_seeded_amount() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        let max = Duration::from_millis(600);
        sched.add(
            id.clone(),
            every_second(OverlapPolicy::Allow)
                .with_jitter(max)
                .unwrap()
                .with_jitter_seed(7),
        );
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(3000).await;
        run.stop().await;
        let mut expected = Jitter::new(max, 7);
        let fires = rec.fires_of(&id);
        assert!(fires.len() >= 2, "{fires:?}");
        for f in fires {
            let want = chrono::Duration::from_std(expected.next_delay()).unwrap();
            let got = f.fired_at - f.scheduled_at;
            // At least the seeded delay, and not a whole second more (timing is the
            // benchmark's business; a loaded machine may add some).
            assert!(
                got >= want && got < want + chrono::Duration::seconds(1),
                "delay {got} for a jitter of {want}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replacing_a_trigger_takes_the_new_schedule() {
        let sched = CronScheduler::new();
        let id = TriggerId::new("p", 0);
        sched.add(id.clone(), CronTrigger::new("@yearly").unwrap());
        let yearly_next = sched.status(&id).unwrap().next_fire.unwrap();
        assert!(sched.add(id.clone(), every_second(OverlapPolicy::Skip)));
        let next = sched.status(&id).unwrap().next_fire.unwrap();
        assert!(next < yearly_next && next <= Utc::now() + chrono::Duration::seconds(1));
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(1300).await;
        run.stop().await;
        assert!(!rec.fires_of(&id).is_empty());
        assert_eq!(sched.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_every_second_triggers_all_fire_each_second() {
        let sched = CronScheduler::new();
        for i in 0..1000 {
            sched.add(
                TriggerId::new(&format!("p{i}"), 0),
                every_second(OverlapPolicy::Skip),
            );
        }
        let rec = Arc::new(Recorder::default());
        let run = start(
            &sched,
            recording(&rec, Duration::ZERO),
            Duration::from_secs(1),
        );
        sleep_ms(3600).await;
        run.stop().await;
        let fires = rec.fires();
        let mut by_second: HashMap<i64, usize> = HashMap::new();
        for (_, f) in &fires {
            *by_second.entry(f.scheduled_at.timestamp()).or_default() += 1;
        }
        let full = by_second.values().filter(|n| **n == 1000).count();
        assert!(full >= 2, "{by_second:?}");
        let mut late: Vec<_> = fires
            .iter()
            .map(|(_, f)| f.fired_at - f.scheduled_at)
            .collect();
        late.sort();
        let p99 = late[late.len() * 99 / 100];
        // Each fire in its own second; how late is the cron benchmark's measure.
        assert!(p99 < chrono::Duration::seconds(1), "p99 lateness {p99}");
    }
}
