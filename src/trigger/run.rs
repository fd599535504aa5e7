//! Run-outcome triggers: a plugin runs when another plugin's run ends the way it asks
//! (`[[triggers.run]]`), so "tell me when autoheal gives up" or "clean up after a
//! failed redeploy" needs no polling of the run history.
//!
//! ```toml
//! [[triggers.run]]
//! plugins = ["autoheal", "redeploy-*"]   # names or globs; required
//! status = ["failed", "timed-out"]       # default: failed, denied, timed-out
//! outcome = "gave up"                    # optional: text the outcome must contain
//! ```
//!
//! The rules, written down once:
//! - `plugins` are plugin names or globs (`*` any run of characters, `?` one). A plugin
//!   never sees its own runs through a glob: only naming itself literally makes a plugin
//!   follow its own runs (a retry loop, say), and the chain limit below bounds that.
//! - `status` lists how a run may have ended: `ok`, `failed`, `denied` or `timed-out`.
//!   Without it a trigger fires on `failed`, `denied` and `timed-out`. `interrupted` is
//!   refused: runs end that way when the engine stops (or stopped), when no new run can
//!   start, so such a trigger could never fire.
//! - `outcome`, when given, must occur in the ended run's outcome text, ignoring case:
//!   its outcome's summary, or its error when it has no outcome (the `outcome` the
//!   plugin gets in the event).
//! - An ended run starts at most one run of each watching plugin, however many of that
//!   plugin's triggers match.
//! - Chains are bounded. A run started by a run-outcome trigger has depth `d + 1`, where
//!   `d` is the ended run's depth (0 when something else started it). A run deeper than
//!   the engine's `runs.max_chain_depth` (default 3) is refused and recorded: a `denied`
//!   record whose error says why, a warning in the log, and a `denied` run in the
//!   `capstan_runs_total` metric; the run-end listeners hear of it as of any run's end
//!   (`[notify] on = ["denied"]` tells of it). A refused run starts nothing itself.
//! - Runs that end at shutdown start nothing (the engine takes no new runs then).
//! - Breadth is bounded as well: one ended run may start every plugin watching it, and
//!   each of those the plugins watching them, up to the depth limit; each plugin's queue
//!   (`runs.max_queued_per_plugin`) refuses runs past it (logged).
//!
//! The listener that applies these rules is registered on the scheduler by
//! [`listen`] when the app is built (`capstan serve`); a CLI that opens the data
//! directory in-process fires no run-outcome triggers, as it fires no cron schedules.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use capstan_policy::Glob;
use serde::{Deserialize, Serialize};

use super::{SectionError, TriggerKind, Triggers};
use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{LoadedPlugin, TriggerEvent};
use crate::runs::{RunRecord, RunStatus, RunTrigger};
use crate::scheduler::{Scheduler, SubmitError};

/// The statuses a trigger fires on when it names none.
pub const DEFAULT_STATUSES: [RunStatus; 3] =
    [RunStatus::Failed, RunStatus::Denied, RunStatus::TimedOut];

/// The ends a trigger may watch for: the statuses `status` may name.
const WATCHABLE: [RunStatus; 4] = [
    RunStatus::Ok,
    RunStatus::Failed,
    RunStatus::Denied,
    RunStatus::TimedOut,
];

/// The longest `outcome` match accepted, bytes.
const MAX_OUTCOME_MATCH: usize = 256;

/// The most of an ended run's outcome text a watching plugin gets, bytes (the rest is
/// cut at a character boundary).
pub const MAX_EVENT_OUTCOME: usize = 4096;

/// One `[[triggers.run]]` entry as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunOutcomeTrigger {
    /// The plugins whose runs are watched: names or `*`/`?` globs. A glob never matches
    /// the watching plugin itself; name it literally to follow its own runs.
    pub plugins: Vec<String>,
    /// The ends that count: `ok`, `failed`, `denied`, `timed-out`. Default
    /// `["failed", "denied", "timed-out"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<String>>,
    /// Text the ended run's outcome summary (or error, when it has no outcome) must
    /// contain, ignoring case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

impl RunOutcomeTrigger {
    /// One line for listings: `run after autoheal,redeploy-* failed|timed-out "gave up"`.
    pub fn describe(&self) -> String {
        let statuses = match &self.status {
            Some(list) => list.join("|"),
            None => DEFAULT_STATUSES.map(|s| s.as_str()).join("|"),
        };
        let mut line = format!("run after {} {statuses}", self.plugins.join(","));
        if let Some(o) = &self.outcome {
            line.push_str(&format!(" {o:?}"));
        }
        line
    }
}

/// A [`RunOutcomeTrigger`] checked and ready to match.
#[derive(Debug, Clone)]
struct Watch {
    plugins: Vec<Glob>,
    statuses: Vec<RunStatus>,
    /// Lower-cased.
    outcome: Option<String>,
}

impl Watch {
    /// Checks one entry; the error names the entry's field (`plugins`, `status`,
    /// `outcome`).
    fn from_config(c: &RunOutcomeTrigger) -> Result<Watch, (&'static str, String)> {
        if c.plugins.is_empty() {
            return Err((
                "plugins",
                "name at least one plugin (or a glob such as `*`) whose runs this trigger watches"
                    .into(),
            ));
        }
        let mut plugins = Vec::new();
        for p in &c.plugins {
            let name_chars = p.chars().all(|ch| {
                ch.is_ascii_lowercase()
                    || ch.is_ascii_digit()
                    || matches!(ch, '-' | '_' | '*' | '?')
            });
            if !name_chars {
                return Err((
                    "plugins",
                    format!(
                        "`{p}` is neither a plugin name nor a glob of one: use lower-case letters, digits, `-`, `_`, and `*` or `?`"
                    ),
                ));
            }
            plugins.push(Glob::new(p, "plugin").map_err(|e| ("plugins", e.to_string()))?);
        }
        let statuses = match &c.status {
            None => DEFAULT_STATUSES.to_vec(),
            Some(list) if list.is_empty() => {
                return Err((
                    "status",
                    "list at least one status, or leave `status` out for failed, denied and timed-out".into(),
                ));
            }
            Some(list) => list
                .iter()
                .map(|s| parse_status(s).map_err(|m| ("status", m)))
                .collect::<Result<_, _>>()?,
        };
        let outcome = match &c.outcome {
            None => None,
            Some(o) if o.trim().is_empty() => {
                return Err((
                    "outcome",
                    "must not be empty: leave it out to fire whatever the outcome".into(),
                ));
            }
            Some(o) if o.len() > MAX_OUTCOME_MATCH => {
                return Err((
                    "outcome",
                    format!("is {} bytes; at most {MAX_OUTCOME_MATCH}", o.len()),
                ));
            }
            Some(o) => Some(o.to_lowercase()),
        };
        Ok(Watch {
            plugins,
            statuses,
            outcome,
        })
    }

    /// Whether a run of `plugin` that ended with `status` and `outcome` (lower-cased)
    /// fires this trigger of plugin `watcher`.
    fn matches(&self, watcher: &str, plugin: &str, status: RunStatus, outcome: &str) -> bool {
        let plugin_matches = if plugin == watcher {
            self.plugins.iter().any(|g| g.as_str() == watcher)
        } else {
            self.plugins.iter().any(|g| g.matches(plugin))
        };
        plugin_matches
            && self.statuses.contains(&status)
            && self
                .outcome
                .as_ref()
                .is_none_or(|o| outcome.contains(o.as_str()))
    }
}

/// A status as `status` names it: one of [`WATCHABLE`].
fn parse_status(s: &str) -> Result<RunStatus, String> {
    if let Some(st) = WATCHABLE.iter().find(|st| st.as_str() == s) {
        return Ok(*st);
    }
    let known: Vec<&str> = WATCHABLE.iter().map(|s| s.as_str()).collect();
    let why = match s {
        "queued" | "running" => format!("`{s}` is not how a run ends"),
        "interrupted" => "`interrupted` runs end when the engine stops, when no run can start, so this trigger could never fire".to_string(),
        _ => format!("`{s}` is not a run status"),
    };
    Err(format!("{why}; use one of {}", known.join(", ")))
}

/// The engine's live run-outcome triggers: each watching plugin's checked entries.
#[derive(Default)]
pub struct RunWatchers {
    by_plugin: RwLock<BTreeMap<String, Vec<Watch>>>,
}

impl RunWatchers {
    pub fn new() -> RunWatchers {
        RunWatchers::default()
    }

    fn set(&self, plugin: &str, watches: Vec<Watch>) {
        let mut map = self.by_plugin.write().unwrap_or_else(|e| e.into_inner());
        if watches.is_empty() {
            map.remove(plugin);
        } else {
            map.insert(plugin.to_string(), watches);
        }
    }

    /// Plugins with run-outcome triggers.
    pub fn len(&self) -> usize {
        self.by_plugin
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plugins (each once, by name) that a run of `plugin` ending with `status` and
    /// `outcome` starts.
    pub fn matching(&self, plugin: &str, status: RunStatus, outcome: &str) -> Vec<String> {
        let outcome = outcome.to_lowercase();
        self.by_plugin
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(watcher, watches)| {
                watches
                    .iter()
                    .any(|w| w.matches(watcher, plugin, status, &outcome))
            })
            .map(|(watcher, _)| watcher.clone())
            .collect()
    }
}

/// The run-outcome trigger kind.
pub struct RunOutcome;

impl TriggerKind for RunOutcome {
    fn name(&self) -> &'static str {
        "run"
    }

    fn validate(&self, sections: &TriggerSections) -> Result<(), SectionError> {
        for (i, c) in sections.run.iter().enumerate() {
            Watch::from_config(c).map_err(|(field, message)| SectionError {
                field: format!("triggers.run[{i}].{field}"),
                message,
            })?;
        }
        Ok(())
    }

    fn activate(
        &self,
        _engine: &Engine,
        triggers: &Triggers,
        plugin: &LoadedPlugin,
    ) -> anyhow::Result<()> {
        let watches = plugin
            .triggers
            .run
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Watch::from_config(c)
                    .map_err(|(field, m)| anyhow::anyhow!("triggers.run[{i}].{field}: {m}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        triggers.run.set(&plugin.name, watches);
        Ok(())
    }

    fn deactivate(&self, triggers: &Triggers, plugin: &str) {
        triggers.run.set(plugin, Vec::new());
    }
}

/// How many run-outcome triggers led to `record`'s run (0 when something else started
/// it).
pub fn depth_of(record: &RunRecord) -> u32 {
    match record.trigger {
        RunTrigger::Run { depth, .. } => depth,
        _ => 0,
    }
}

/// An ended run's outcome text: its outcome's summary, or its error when it has no
/// outcome, at most [`MAX_EVENT_OUTCOME`] bytes.
pub fn outcome_text(record: &RunRecord) -> String {
    let summary = record
        .outcome
        .as_ref()
        .and_then(|o| o.get("summary"))
        .and_then(|s| s.as_str());
    let mut text = summary
        .or(record.error.as_deref())
        .unwrap_or_default()
        .to_string();
    if text.len() > MAX_EVENT_OUTCOME {
        let mut cut = MAX_EVENT_OUTCOME;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The event of the runs `ended` starts.
pub fn event(ended: &RunRecord) -> TriggerEvent {
    event_with(ended, outcome_text(ended))
}

/// [`event`] with the ended run's [`outcome_text`] already taken.
fn event_with(ended: &RunRecord, outcome: String) -> TriggerEvent {
    TriggerEvent::Run {
        run_id: ended.id.to_string(),
        plugin: ended.plugin.clone(),
        status: ended.status.as_str().to_string(),
        outcome,
        depth: depth_of(ended).saturating_add(1),
    }
}

/// Registers the listener that starts the runs of the engine's run-outcome triggers.
/// Called once, where the app is built.
pub fn listen(scheduler: &Arc<Scheduler>) {
    scheduler.on_run_end(Box::new(on_run_end));
}

/// Starts (or refuses, past the chain limit) the runs `ended` triggers. Does not block:
/// a submit records the run and hands it to a task of its own.
fn on_run_end(scheduler: &Arc<Scheduler>, ended: &RunRecord) {
    let run_triggers = &scheduler.triggers().run;
    if run_triggers.is_empty() {
        return; // the common case: nothing to look at, nothing to copy
    }
    let outcome = outcome_text(ended);
    let watchers = run_triggers.matching(&ended.plugin, ended.status, &outcome);
    if watchers.is_empty() {
        return;
    }
    let max = scheduler.config().max_chain_depth;
    if depth_of(ended) > max {
        return; // a refused run: it starts nothing
    }
    let event = event_with(ended, outcome);
    let depth = depth_of(ended).saturating_add(1);
    for watcher in watchers {
        if depth > max {
            refuse(scheduler, &watcher, &event, ended, max);
            continue;
        }
        match scheduler.submit(&watcher, event.clone()) {
            Ok(_) | Err(SubmitError::ShuttingDown) => {}
            Err(e) => tracing::warn!(
                plugin = %watcher,
                ended_run = %ended.id,
                error = %e,
                "run-outcome trigger not run"
            ),
        }
    }
}

/// Records the run `watcher` would have had as `denied`, saying why and what to change.
/// On a task of its own: the scheduler tells the refusal to the run-end listeners, this
/// one among them, which must not be called within themselves.
fn refuse(
    scheduler: &Arc<Scheduler>,
    watcher: &str,
    event: &TriggerEvent,
    ended: &RunRecord,
    max: u32,
) {
    let reason = format!(
        "refused: the run of {} (run {}) that ended {} would start this run as link {} of a chain of run-outcome triggers, past the engine's limit of {max} (runs.max_chain_depth); raise the limit in the engine config's [runs] table, or change the plugins' [[triggers.run]] so they stop triggering each other",
        ended.plugin,
        ended.id,
        ended.status,
        max + 1,
    );
    tracing::warn!(
        plugin = %watcher,
        ended_run = %ended.id,
        ended_plugin = %ended.plugin,
        max_chain_depth = max,
        "run-outcome chain too long: run refused and recorded as denied"
    );
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        // Only when the runtime itself is going away, at the very end of a shutdown.
        tracing::error!(plugin = %watcher, "cannot record the refused run: the engine is stopping");
        return;
    };
    let (scheduler, watcher, event) = (scheduler.clone(), watcher.to_string(), event.clone());
    rt.spawn(async move {
        if let Err(e) = scheduler.refuse(&watcher, &event, &reason) {
            tracing::error!(plugin = %watcher, error = %e, "cannot record the refused run");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(plugins: &[&str], status: Option<&[&str]>, outcome: Option<&str>) -> Watch {
        try_watch(plugins, status, outcome).unwrap()
    }

    fn try_watch(
        plugins: &[&str],
        status: Option<&[&str]>,
        outcome: Option<&str>,
    ) -> Result<Watch, (&'static str, String)> {
        Watch::from_config(&RunOutcomeTrigger {
            plugins: plugins.iter().map(|s| s.to_string()).collect(),
            status: status.map(|s| s.iter().map(|s| s.to_string()).collect()),
            outcome: outcome.map(str::to_string),
        })
    }

    #[test]
    fn fires_on_failed_denied_and_timed_out_runs_of_the_named_plugin_by_default() {
        let w = watch(&["autoheal"], None, None);
        for s in [RunStatus::Failed, RunStatus::Denied, RunStatus::TimedOut] {
            assert!(w.matches("alert", "autoheal", s, ""), "{s}");
        }
        for s in [RunStatus::Ok, RunStatus::Interrupted] {
            assert!(!w.matches("alert", "autoheal", s, ""), "{s}");
        }
        assert!(!w.matches("alert", "inventory", RunStatus::Failed, ""));
    }

    #[test]
    fn fires_only_on_the_statuses_it_names() {
        let w = watch(&["a"], Some(&["ok", "denied"]), None);
        assert!(w.matches("b", "a", RunStatus::Ok, ""));
        assert!(w.matches("b", "a", RunStatus::Denied, ""));
        assert!(!w.matches("b", "a", RunStatus::Failed, ""));
        assert!(!w.matches("b", "a", RunStatus::Interrupted, ""));
    }

    #[test]
    fn globs_match_other_plugins_but_never_the_watcher_itself() {
        let w = watch(&["redeploy-*", "*"], None, None);
        assert!(w.matches("alert", "redeploy-web", RunStatus::Failed, ""));
        assert!(w.matches("alert", "inventory", RunStatus::Failed, ""));
        assert!(!w.matches("alert", "alert", RunStatus::Failed, ""));
        let own = watch(&["retry", "a?"], None, None);
        assert!(own.matches("retry", "retry", RunStatus::Failed, ""));
        assert!(own.matches("retry", "ab", RunStatus::Failed, ""));
        assert!(!own.matches("retry", "abc", RunStatus::Failed, ""));
    }

    #[test]
    fn the_outcome_match_is_a_substring_ignoring_case() {
        let watchers = RunWatchers::new();
        let w = watch(&["autoheal"], Some(&["ok", "failed"]), Some("Gave Up"));
        watchers.set("x", vec![w]);
        let fires = |status, outcome| !watchers.matching("autoheal", status, outcome).is_empty();
        assert!(fires(RunStatus::Ok, "web: gave up after 5 restarts"));
        assert!(fires(RunStatus::Failed, "GAVE UP"));
        assert!(!fires(RunStatus::Ok, "restarted web"));
        assert!(!fires(RunStatus::Ok, ""));
    }

    #[test]
    fn refuses_bad_entries_naming_the_field_and_the_fix() {
        let (f, m) = try_watch(&["a"], Some(&["failed", "faild"]), None).unwrap_err();
        assert_eq!(f, "status");
        assert!(m.contains("`faild`") && m.contains("timed-out"), "{m}");
        let (f, m) = try_watch(&["a"], Some(&["running"]), None).unwrap_err();
        assert_eq!(f, "status");
        assert!(m.contains("not how a run ends"), "{m}");
        let (f, m) = try_watch(&["a"], Some(&["interrupted"]), None).unwrap_err();
        assert_eq!(f, "status");
        assert!(m.contains("could never fire"), "{m}");
        assert_eq!(try_watch(&["a"], Some(&[]), None).unwrap_err().0, "status");
        assert_eq!(try_watch(&[], None, None).unwrap_err().0, "plugins");
        assert_eq!(
            try_watch(&["Auto Heal"], None, None).unwrap_err().0,
            "plugins"
        );
        assert_eq!(try_watch(&[""], None, None).unwrap_err().0, "plugins");
        assert_eq!(try_watch(&["a"], None, Some(" ")).unwrap_err().0, "outcome");
        let long = "x".repeat(MAX_OUTCOME_MATCH + 1);
        assert_eq!(
            try_watch(&["a"], None, Some(&long)).unwrap_err().0,
            "outcome"
        );
    }

    #[test]
    fn an_ended_run_starts_each_watching_plugin_once() {
        let watchers = RunWatchers::new();
        watchers.set(
            "alert",
            vec![watch(&["autoheal"], None, None), watch(&["*"], None, None)],
        );
        watchers.set(
            "retry",
            vec![watch(&["autoheal"], Some(&["timed-out"]), None)],
        );
        assert_eq!(
            watchers.matching("autoheal", RunStatus::Failed, ""),
            ["alert"]
        );
        assert_eq!(
            watchers.matching("autoheal", RunStatus::TimedOut, ""),
            ["alert", "retry"]
        );
        watchers.set("alert", Vec::new());
        assert_eq!(watchers.len(), 1);
        assert!(
            watchers
                .matching("autoheal", RunStatus::Failed, "")
                .is_empty()
        );
    }

    fn record(
        trigger: RunTrigger,
        outcome: Option<serde_json::Value>,
        error: Option<&str>,
    ) -> RunRecord {
        RunRecord {
            id: crate::runs::RunId::new(),
            plugin: "autoheal".into(),
            trigger,
            queued_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            status: RunStatus::Failed,
            outcome,
            error: error.map(str::to_string),
            logs: Default::default(),
            host_calls: Vec::new(),
            host_calls_dropped: 0,
            node: None,
        }
    }

    #[test]
    fn the_event_carries_the_ended_run_and_one_more_link_of_depth() {
        let manual = RunTrigger::Manual { by: "cli".into() };
        let ended = record(manual, None, Some("failed: gave up on web"));
        let TriggerEvent::Run {
            run_id,
            plugin,
            status,
            outcome,
            depth,
        } = event(&ended)
        else {
            panic!("not a run event")
        };
        assert_eq!(run_id, ended.id.to_string());
        assert_eq!((plugin.as_str(), status.as_str()), ("autoheal", "failed"));
        assert_eq!(outcome, "failed: gave up on web");
        assert_eq!(depth, 1);

        let chained = RunTrigger::Run {
            run_id: "x".into(),
            plugin: "a".into(),
            status: "failed".into(),
            depth: 2,
        };
        let ended = record(
            chained,
            Some(serde_json::json!({"summary": "restarted 2", "details": null})),
            None,
        );
        let TriggerEvent::Run { outcome, depth, .. } = event(&ended) else {
            panic!("not a run event")
        };
        assert_eq!((outcome.as_str(), depth), ("restarted 2", 3));
    }

    #[test]
    fn a_manifest_naming_an_unknown_status_is_refused_naming_the_field() {
        let text = "name = \"a\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"b\"]\n\
                    [[triggers.run]]\nplugins = [\"c\"]\nstatus = [\"broken\"]\n";
        let m = crate::plugin::Manifest::parse(text, "plugin.toml").unwrap();
        let e = m.validate("plugin.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("triggers.run[1].status"), "{e}");
        assert!(e.contains("`broken` is not a run status"), "{e}");
        let e = crate::plugin::Manifest::parse(
            "name = \"a\"\nversion = \"1\"\n[[triggers.run]]\nplugin = [\"b\"]\n",
            "plugin.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("plugin"), "unknown keys are refused: {e}");
    }

    #[test]
    fn run_triggers_survive_the_stored_record_round_trip() {
        let text = "name = \"a\"\nversion = \"1\"\n[[triggers.run]]\nplugins = [\"b*\"]\n\
                    status = [\"ok\"]\noutcome = \"gave up\"\n[[triggers.run]]\nplugins = [\"c\"]\n";
        let m = crate::plugin::Manifest::parse(text, "plugin.toml").unwrap();
        m.validate("plugin.toml", &[]).unwrap();
        let json = serde_json::to_string(&m.triggers).unwrap();
        let back: TriggerSections = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m.triggers, "{json}");
        let old: TriggerSections = serde_json::from_str(r#"{"cron":[],"webhook":[]}"#).unwrap();
        assert!(
            old.run.is_empty(),
            "records stored before run triggers still load"
        );
    }

    #[test]
    fn a_trigger_describes_itself_in_one_line_with_its_defaults() {
        let t = RunOutcomeTrigger {
            plugins: vec!["autoheal".into(), "redeploy-*".into()],
            status: None,
            outcome: None,
        };
        assert_eq!(
            t.describe(),
            "run after autoheal,redeploy-* failed|denied|timed-out"
        );
        let t = RunOutcomeTrigger {
            plugins: vec!["http-probe".into()],
            status: Some(vec!["ok".into()]),
            outcome: Some("gave up".into()),
        };
        assert_eq!(t.describe(), "run after http-probe ok \"gave up\"");
    }

    #[test]
    fn a_long_outcome_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_EVENT_OUTCOME);
        let ended = record(RunTrigger::Manual { by: "cli".into() }, None, Some(&long));
        let text = outcome_text(&ended);
        assert!(text.len() <= MAX_EVENT_OUTCOME && text.len() > MAX_EVENT_OUTCOME - 2);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
