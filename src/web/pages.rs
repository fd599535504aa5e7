//! The dashboard's pages: overview, device, plugin, runs, run, hooks and notifiers.
//!
//! Each reads through the engine calls the API handlers use; none loads a whole history
//! (runs come in bounded pages from the run store) and none calls a device while
//! rendering but the device page, whose container listing is bounded by a timeout. The
//! overview shows each device's last recorded check and container listing, with their
//! age.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::render::{self, age, ms_f, page, time};
use super::session::Authed;
use super::{WebState, charts};
use crate::api::authz::{self, PluginFilter};
use crate::plugin::InstalledPlugin;
use crate::runs::{RunId, RunQuery, RunRecord, RunStatus, RunTrigger};
use crate::token::{Role, TokenInfo};

/// How long the device page waits for the daemon's container list.
const CONTAINER_LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows on a page of runs.
const RUNS_PER_PAGE: usize = 50;
/// Runs a filtered page looks through at most before it offers "older".
const MAX_SCANNED: usize = 2_000;
/// Problems the overview lists, and the newest runs it looks through for them.
const PROBLEMS_SHOWN: usize = 10;
const PROBLEMS_SCANNED: usize = 200;
/// Runs the plugin page lists and charts.
const PLUGIN_RUNS: usize = 40;

/// Every run status, in the order the filters show them.
pub const STATUSES: [RunStatus; 7] = [
    RunStatus::Queued,
    RunStatus::Running,
    RunStatus::Ok,
    RunStatus::Failed,
    RunStatus::Denied,
    RunStatus::TimedOut,
    RunStatus::Interrupted,
];

fn status_named(s: &str) -> Option<RunStatus> {
    STATUSES.into_iter().find(|st| st.as_str() == s)
}

pub fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "dashboard: {what}");
    render::error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("Cannot read {what}; the engine's log says why."),
    )
}

fn not_found(what: &str) -> Response {
    render::error_page(StatusCode::NOT_FOUND, what)
}

/// Which plugins (and so runs and hooks) the token may see.
pub fn filter_for(web: &WebState, token: &TokenInfo) -> Result<PluginFilter, crate::api::AppError> {
    PluginFilter::for_token(token, web.app.scheduler.runtime())
}

/// A device's containers by state and health, as last listed.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub at: Option<DateTime<Utc>>,
    pub by_state: BTreeMap<String, usize>,
    pub by_health: BTreeMap<String, usize>,
}

/// The last container listing of each device (device page, "check now").
#[derive(Default)]
pub struct ContainerCounts(Mutex<HashMap<String, Counts>>);

impl ContainerCounts {
    pub fn get(&self, device: &str) -> Option<Counts> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned()
    }

    pub fn set(&self, device: &str, counts: Counts) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= crate::docker::history::MAX_DEVICES && !m.contains_key(device) {
            return;
        }
        m.insert(device.to_string(), counts);
    }
}

/// One container as the device page lists it.
pub struct ContainerRow {
    pub name: String,
    pub image: String,
    pub state: String,
    pub health: Option<String>,
    /// Docker's status text, e.g. `Up 3 hours (healthy)`.
    pub status: String,
}

/// Lists `device`'s containers over the engine's pooled connection, within the timeout,
/// and records their counts.
pub async fn list_containers(web: &WebState, device: &str) -> Result<Vec<ContainerRow>, String> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let dev = web
        .app
        .devices()
        .and_then(|d| d.get(device))
        .map_err(|e| e.to_string())?;
    let work = async {
        let docker = web
            .app
            .engine
            .docker(&dev)
            .await
            .map_err(|e| e.to_string())?;
        docker
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
            .await
            .map_err(|e| e.to_string())
    };
    let list = tokio::time::timeout(CONTAINER_LIST_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!(
                "the daemon did not list its containers within {} s",
                CONTAINER_LIST_TIMEOUT.as_secs()
            )
        })??;
    let mut rows: Vec<ContainerRow> = list
        .into_iter()
        .map(|c| {
            let status = c.status.unwrap_or_default();
            let health = [
                ("(healthy)", "healthy"),
                ("(unhealthy)", "unhealthy"),
                ("(health: starting)", "starting"),
            ]
            .iter()
            .find(|(needle, _)| status.contains(needle))
            .map(|(_, h)| h.to_string());
            let name = c
                .names
                .unwrap_or_default()
                .iter()
                .map(|n| n.trim_start_matches('/'))
                .find(|n| !n.contains('/'))
                .unwrap_or_default()
                .to_string();
            ContainerRow {
                name,
                image: c.image.unwrap_or_default(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                health,
                status,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let mut counts = Counts {
        at: Some(Utc::now()),
        ..Counts::default()
    };
    for r in &rows {
        *counts.by_state.entry(r.state.clone()).or_default() += 1;
        if let Some(h) = &r.health {
            *counts.by_health.entry(h.clone()).or_default() += 1;
        }
    }
    web.containers.set(device, counts);
    Ok(rows)
}

/// `3 running, 1 exited`.
fn counts_text(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------
// Overview

pub async fn overview(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
) -> Response {
    let token = &authed.token;
    let devices = match web.app.devices().and_then(|d| d.list()) {
        Ok(d) => d,
        Err(e) => return internal("the devices", e),
    };
    let plugins = match web.app.scheduler.runtime().installed() {
        Ok(p) => p,
        Err(e) => return internal("the plugins", e),
    };
    let filter = match filter_for(&web, token) {
        Ok(f) => f,
        Err(e) => return internal("the plugins", e),
    };
    let runs = web.app.scheduler.runs();
    let history = web.app.docker.history();

    let devices_table = html! {
        table #devices {
            thead { tr {
                th { "Device" } th { "Kind" } th { "Reachable" } th { "Latency" }
                th { "Docker" } th { "Containers" } th { "Health" } th { "Checked" }
            } }
            tbody {
                @for d in devices.iter().filter(|d| authz::authorize_device(token, &d.name).is_ok()) {
                    @let last = history.last(&d.name);
                    @let counts = web.containers.get(&d.name);
                    tr data-device=(d.name) {
                        td { a href=(format!("/devices/{}", d.name)) { (d.name) } }
                        td { (d.kind.to_string()) }
                        @match &last {
                            Some(c) if c.report.connected => {
                                td.reach.ok data-reach="yes" { "yes" }
                            }
                            Some(c) => {
                                td.reach.bad data-reach="no" title=(c.report.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")) {
                                    "no: " (c.report.error.as_ref().map(|e| e.kind.as_ref()).unwrap_or("failed"))
                                }
                            }
                            None => { td.reach.unknown data-reach="unknown" { "not checked yet" } }
                        }
                        td.latency { (last.as_ref().and_then(|c| c.report.latency_ms).map(ms_f).unwrap_or_default()) }
                        td.docker-version { (last.as_ref().and_then(|c| c.report.docker.as_ref()).map(|f| f.version.as_str()).unwrap_or("")) }
                        td.containers {
                            @if let Some(c) = &counts {
                                (counts_text(&c.by_state))
                            } @else if let Some(f) = last.as_ref().and_then(|c| c.report.docker.as_ref()) {
                                @if let (Some(run), Some(all)) = (f.containers_running, f.containers) {
                                    (run) " running of " (all)
                                }
                            }
                        }
                        td.health { (counts.as_ref().filter(|c| !c.by_health.is_empty()).map(|c| counts_text(&c.by_health)).unwrap_or_default()) }
                        td.age { (last.as_ref().map(|c| age(c.at)).unwrap_or_default()) }
                    }
                }
            }
        }
    };

    let cron = web.app.scheduler.cron();
    let plugins_table = html! {
        table #plugins {
            thead { tr {
                th { "Plugin" } th { "Triggers" } th { "Next fire" } th { "Last run" } th { "Loaded" }
            } }
            tbody {
                @for p in plugins.iter().filter(|p| filter.allows(&p.name)) {
                    @let next = (0..p.triggers.cron.len())
                        .filter_map(|i| cron.status(&crate::trigger::cron::TriggerId::new(&p.name, i as u32)))
                        .filter_map(|s| s.next_fire)
                        .min();
                    @let last = runs.list(&RunQuery { plugin: Some(p.name.clone()), before: None, limit: 1 }).ok().and_then(|pg| pg.runs.into_iter().next());
                    tr data-plugin=(p.name) {
                        td { a href=(format!("/plugins/{}", p.name)) { (p.name) } }
                        td.triggers { (triggers_short(p)) }
                        td.next-fire { @if let Some(t) = next { (time(t)) " (" (render::until(t)) ")" } }
                        td.last-run {
                            @if let Some(r) = &last {
                                a href=(format!("/runs/{}", r.id)) class=(format!("status {}", r.status)) { (r.status.as_str()) }
                                " " (age(r.queued_at))
                            }
                        }
                        td.loaded { (if web.app.scheduler.runtime().plugin(&p.name).is_some() { "yes" } else { "no" }) }
                    }
                }
            }
        }
    };

    // The newest failed, denied or timed-out runs, from a bounded look at the history.
    let mut problems = Vec::new();
    let mut before = None;
    let mut scanned = 0;
    while scanned < PROBLEMS_SCANNED && problems.len() < PROBLEMS_SHOWN {
        let Ok(pg) = filter.list_runs(
            runs,
            &RunQuery {
                plugin: None,
                before,
                limit: 50,
            },
        ) else {
            break;
        };
        scanned += pg.runs.len();
        for r in pg.runs {
            if matches!(
                r.status,
                RunStatus::Failed | RunStatus::Denied | RunStatus::TimedOut
            ) && filter.allows(&r.plugin)
                && problems.len() < PROBLEMS_SHOWN
            {
                problems.push(r);
            }
        }
        match pg.next {
            Some(n) => before = Some(n),
            None => break,
        }
    }

    page(
        "Overview",
        &authed,
        html! {
            h1 { "Overview" }
            section {
                h2 { "Devices" }
                (devices_table)
            }
            section {
                h2 { "Plugins" }
                (plugins_table)
            }
            section #recent-problems {
                h2 { "Recent problems" }
                @if problems.is_empty() {
                    p.empty { "No failed, denied or timed-out runs lately." }
                } @else {
                    ul {
                        @for r in &problems {
                            li data-run=(r.id) data-status=(r.status.as_str()) {
                                a href=(format!("/runs/{}", r.id)) { (r.plugin) " " span class=(format!("status {}", r.status)) { (r.status.as_str()) } }
                                " " (age(r.queued_at))
                                @if let Some(e) = &r.error { " — " span.why { (truncate(e, 160)) } }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n).collect();
    t.push('…');
    t
}

/// `cron 0 * * * *; webhook redeploy; docker container:die; after autoheal failed`.
fn triggers_short(p: &InstalledPlugin) -> String {
    let t = &p.triggers;
    let mut parts: Vec<String> = Vec::new();
    parts.extend(t.cron.iter().map(|c| format!("cron {}", c.schedule)));
    parts.extend(t.webhook.iter().map(|h| format!("webhook {}", h.name)));
    parts.extend(
        t.docker
            .iter()
            .map(|d| format!("docker {}", d.events.join(","))),
    );
    parts.extend(t.run.iter().map(|r| r.describe()));
    if parts.is_empty() {
        "manual only".into()
    } else {
        parts.join("; ")
    }
}

// ---------------------------------------------------------------------------------
// Device

pub async fn device(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Path(name): Path<String>,
) -> Response {
    if authz::authorize_device(&authed.token, &name).is_err() {
        return not_found(&format!("No device {name} (or your token may not see it)."));
    }
    let dev = match web.app.devices().and_then(|d| d.get(&name)) {
        Ok(d) => d,
        Err(crate::device::DeviceError::NotFound(_)) => {
            return not_found(&format!("No device {name} (or your token may not see it)."));
        }
        Err(e) => return internal("the device", e),
    };
    let checks = web.app.docker.history().recent(&dev.name);
    let last = checks.last().cloned();
    let containers = list_containers(&web, &dev.name).await;
    let may_check = authed.token.allows(Role::Operator);
    page(
        &dev.name,
        &authed,
        html! {
            h1 { "Device " (dev.name) }
            p.meta { (dev.kind.to_string()) " · " (dev.address()) }
            section #last-check {
                h2 { "Last check" }
                @match &last {
                    None => p.empty { "Not checked since the engine started." }
                    Some(c) => {
                        p {
                            span class=(if c.report.connected { "status ok" } else { "status failed" }) {
                                (if c.report.connected { "connected" } else { "failed" })
                            }
                            " · " (time(c.at)) " (" (age(c.at)) ") · total " (ms_f(c.report.total_ms))
                            @if let Some(l) = c.report.latency_ms { " · ping " (ms_f(l)) }
                            @if let Some(f) = &c.report.docker { " · Docker " (f.version) " (API " (f.api_version) ", " (f.os) "/" (f.arch) ")" }
                        }
                        @if let Some(e) = &c.report.error {
                            p.error { (e.kind.as_ref()) " at " (c.report.failed_step.as_deref().unwrap_or("?")) ": " (e.message) }
                        }
                        table.steps {
                            thead { tr { th { "Step" } th { "Took" } } }
                            tbody {
                                @for s in &c.report.steps {
                                    tr { td { (s.step.as_ref()) } td.ms { (ms_f(s.ms)) } }
                                }
                            }
                        }
                    }
                }
                @if may_check {
                    form #check-now method="post" action=(format!("/devices/{}/check", dev.name)) {
                        (render::csrf_input(&authed.csrf))
                        button type="submit" { "Check now" }
                    }
                }
            }
            section {
                h2 { "Latency" }
                (charts::latency(&checks))
            }
            section {
                h2 { "Containers" }
                @if let Err(e) = &containers {
                    p.error { "Cannot list the containers: " (e) }
                }
                table #containers {
                    thead { tr { th { "Name" } th { "Image" } th { "State" } th { "Health" } th { "Status" } } }
                    tbody {
                        @if let Ok(rows) = &containers {
                            @for c in rows {
                                tr data-container=(c.name) data-state=(c.state) {
                                    td { (c.name) }
                                    td.image { (c.image) }
                                    td.state { (c.state) }
                                    td.health { (c.health.as_deref().unwrap_or("")) }
                                    td.uptime { (c.status) }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

// ---------------------------------------------------------------------------------
// Plugin

pub async fn plugin(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Path(name): Path<String>,
) -> Response {
    let installed = match web.app.scheduler.runtime().installed_plugin(&name) {
        Ok(p) => p,
        Err(crate::plugin::PluginError::NotInstalled(_)) => {
            return not_found(&format!("No plugin {name} is installed."));
        }
        Err(e) => return internal("the plugin", e),
    };
    if authz::authorize_plugin(&authed.token, &installed).is_err() {
        return not_found(&format!(
            "No plugin {name} is installed (or your token may not see it)."
        ));
    }
    let loaded = web.app.scheduler.runtime().plugin(&name);
    let view = crate::api::plugins::view(&web.app, installed.clone());
    let recent = web
        .app
        .scheduler
        .runs()
        .list(&RunQuery {
            plugin: Some(name.clone()),
            before: None,
            limit: PLUGIN_RUNS,
        })
        .map(|p| p.runs)
        .unwrap_or_default();
    let cron = web.app.scheduler.cron();
    let limits = &installed.limits;
    let may_run = authed.token.allows(Role::Operator);
    page(
        &name,
        &authed,
        html! {
            h1 { "Plugin " (name) }
            section #manifest {
                p.description { (view.description) }
                dl {
                    dt { "Version" } dd { (view.version) " · " (view.size / 1024) " KiB · sha256 " code { (&view.sha256[..view.sha256.len().min(12)]) } }
                    dt { "Loaded" } dd { (if view.loaded { "yes" } else { "no (see the engine's log)" }) }
                    dt { "Triggers" }
                    dd.triggers {
                        ul {
                            li { "by hand (run now, the API or the CLI)" }
                            @for (i, c) in installed.triggers.cron.iter().enumerate() {
                                @let next = cron.status(&crate::trigger::cron::TriggerId::new(&name, i as u32)).and_then(|s| s.next_fire);
                                li.cron {
                                    "on the schedule " code { (c.schedule) }
                                    @if let Some(tz) = &c.timezone { " (" (tz) ")" }
                                    @if let Some(t) = next { "; next at " (time(t)) " (" (render::until(t)) ")" }
                                }
                            }
                            @for h in &installed.triggers.webhook {
                                li.webhook { "when " code { "POST /hooks/" (h.name) } " is delivered" }
                            }
                            @for d in &installed.triggers.docker {
                                li.docker { "on Docker events " (d.events.join(", "))
                                    @if let Some(devs) = &d.devices { " on " (devs.join(", ")) } }
                            }
                            @for r in &installed.triggers.run {
                                li.run { (r.describe()) }
                            }
                        }
                    }
                    dt { "Devices" }
                    dd.devices { @if installed.devices.is_empty() { "none" } @else { (installed.devices.join(", ")) } }
                    @if let Some(l) = &loaded {
                        dt { "Policy" }
                        dd.policy { ul { @for line in policy_in_words(&l.policy) { li { (line) } } } }
                        dt { "Containers" }
                        dd.containers { (if l.policy.containers().is_all() { "every container on its devices".to_string() } else { l.policy.containers().describe() }) }
                        @if !l.outbound.is_empty() {
                            dt { "Outbound HTTP" }
                            dd.outbound { (l.outbound.rules().iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")) }
                        }
                    }
                    dt { "Limits" }
                    dd.limits {
                        (limits.memory_mib) " MiB memory · " (limits.timeout_secs) " s per run · "
                        (limits.max_host_calls) " host calls · " (limits.max_log_bytes / 1024) " KiB of logs"
                    }
                }
            }
            @if may_run {
                section {
                    h2 { "Run now" }
                    form #run-now method="post" action=(format!("/plugins/{name}/run")) {
                        (render::csrf_input(&authed.csrf))
                        label for="run-input" { "Input (handed to the plugin as the manual event's input)" }
                        textarea #run-input name="input" rows="3" {}
                        button type="submit" { "Run " (name) }
                    }
                }
            }
            section {
                h2 { "Recent runs" }
                (charts::runs(&recent))
                (runs_table(&recent, Some(&name), None, true))
                p { a href=(format!("/runs?plugin={}", render::url_encode(&name))) { "All runs of " (name) } }
            }
        },
    )
}

/// What the policy's variables let the plugin do, in words.
fn policy_in_words(policy: &crate::policy::CompiledPolicy) -> Vec<String> {
    use crate::policy::Var;
    let on = |v: Var| policy.is_on(v);
    let mut lines = Vec::new();
    let sections: Vec<&str> = Var::ALL
        .iter()
        .filter(|v| {
            on(**v)
                && !v.name().starts_with("ALLOW_")
                && !matches!(v.name(), "POST" | "PING" | "VERSION" | "EVENTS")
        })
        .map(|v| v.name())
        .collect();
    let lower: Vec<String> = sections.iter().map(|s| s.to_lowercase()).collect();
    if !lower.is_empty() {
        if on(Var::Post) {
            lines.push(format!("may read and change {}", lower.join(", ")));
        } else {
            lines.push(format!("may read {}", lower.join(", ")));
        }
    } else if on(Var::Post) {
        lines.push("may send changes (POST=1), but no section is on".into());
    }
    let toggles = [
        ("ALLOW_START", "may start containers"),
        ("ALLOW_STOP", "may stop containers"),
        ("ALLOW_RESTARTS", "may restart, stop and kill containers"),
        ("ALLOW_PAUSE", "may pause containers"),
        ("ALLOW_UNPAUSE", "may unpause containers"),
        ("ALLOW_LOGS", "may read container logs"),
        ("ALLOW_TOP", "may list container processes"),
        ("ALLOW_CHANGES", "may read container filesystem changes"),
        ("ALLOW_EXPORT", "may export containers"),
        ("ALLOW_ARCHIVE", "may read and write container files"),
    ];
    for (name, words) in toggles {
        if Var::from_name(name).is_some_and(on) {
            lines.push(words.to_string());
        }
    }
    if !on(Var::Post) {
        lines.push("read-only otherwise (POST=0)".into());
    }
    let vars: Vec<&str> = Var::ALL
        .iter()
        .filter(|v| on(**v))
        .map(|v| v.name())
        .collect();
    lines.push(format!("variables on: {}", vars.join(", ")));
    lines
}

// ---------------------------------------------------------------------------------
// Runs

/// A run as a row: the fields the runs table shows, also the SSE events' data.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: String,
    pub plugin: String,
    pub status: &'static str,
    pub trigger: String,
    pub queued: String,
    pub duration: String,
    pub error: String,
}

impl RunRow {
    pub fn of(r: &RunRecord) -> RunRow {
        RunRow {
            id: r.id.to_string(),
            plugin: r.plugin.clone(),
            status: r.status.as_str(),
            trigger: trigger_text(&r.trigger),
            queued: r.queued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            duration: r
                .duration()
                .map(|d| render::millis(d.num_milliseconds()))
                .unwrap_or_default(),
            error: r
                .error
                .as_deref()
                .map(|e| truncate(e, 200))
                .unwrap_or_default(),
        }
    }
}

fn trigger_text(t: &RunTrigger) -> String {
    match t {
        RunTrigger::Cron { schedule, .. } => format!("cron {schedule}"),
        RunTrigger::Webhook { hook, .. } => format!("webhook {hook}"),
        RunTrigger::Manual { by } => format!("manual by {by}"),
        RunTrigger::Docker { device, event, .. } => format!("docker {event} on {device}"),
        RunTrigger::Run { plugin, status, .. } => format!("after {plugin} {status}"),
    }
}

/// `table#runs`; `live` marks it for `app.js` to insert new runs matching the filters.
fn runs_table(
    runs: &[RunRecord],
    plugin: Option<&str>,
    status: Option<RunStatus>,
    live: bool,
) -> Markup {
    html! {
        table #runs data-live=(if live { "yes" } else { "no" })
            data-filter-plugin=(plugin.unwrap_or(""))
            data-filter-status=(status.map(|s| s.as_str()).unwrap_or("")) {
            thead { tr {
                th { "Run" } th { "Plugin" } th { "Status" } th { "Trigger" } th { "Queued" } th { "Took" } th { "Error" }
            } }
            tbody {
                @for r in runs {
                    (run_row(&RunRow::of(r)))
                }
            }
        }
    }
}

/// One row; `app.js` builds the same cells from a [`RunRow`] event.
fn run_row(r: &RunRow) -> Markup {
    html! {
        tr data-run=(r.id) data-status=(r.status) data-plugin=(r.plugin) {
            // The id's random tail: its head is the time, alike for runs close together.
            td.id { a href=(format!("/runs/{}", r.id)) title=(r.id) { (&r.id[r.id.len().saturating_sub(12)..]) } }
            td.plugin { a href=(format!("/plugins/{}", r.plugin)) { (r.plugin) } }
            td.run-status { span class=(format!("status {}", r.status)) { (r.status) } }
            td.trigger { (r.trigger) }
            td.queued { (r.queued) }
            td.duration { (r.duration) }
            td.error { (r.error) }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    plugin: Option<String>,
    status: Option<String>,
    before: Option<String>,
}

pub async fn runs(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Query(q): Query<RunsQuery>,
) -> Response {
    let plugin = q.plugin.filter(|p| !p.is_empty());
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match status_named(s) {
            Some(st) => Some(st),
            None => {
                return render::error_page(
                    StatusCode::BAD_REQUEST,
                    &format!("{s:?} is not a run status."),
                );
            }
        },
    };
    let before = match q.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => match b.parse::<RunId>() {
            Ok(id) => Some(id),
            Err(e) => return render::error_page(StatusCode::BAD_REQUEST, &e),
        },
    };
    let installed = web.app.scheduler.runtime().installed().unwrap_or_default();
    let token = &authed.token;
    let filter = match filter_for(&web, token) {
        Ok(f) => f,
        Err(e) => return internal("the plugins", e),
    };
    if let Some(p) = &plugin
        && !filter.allows(p)
    {
        return not_found(&format!(
            "No plugin {p} (or your token may not see its runs)."
        ));
    }
    let (shown, next) = match page_of_runs(&web, &filter, plugin.clone(), status, before) {
        Ok(x) => x,
        Err(e) => return internal("the run history", e),
    };
    let link = |plugin: Option<&str>, status: Option<&str>, before: Option<String>| {
        let mut q = Vec::new();
        if let Some(p) = plugin {
            q.push(format!("plugin={}", render::url_encode(p)));
        }
        if let Some(s) = status {
            q.push(format!("status={s}"));
        }
        if let Some(b) = before {
            q.push(format!("before={b}"));
        }
        if q.is_empty() {
            "/runs".to_string()
        } else {
            format!("/runs?{}", q.join("&"))
        }
    };
    let st = status.map(|s| s.as_str());
    page(
        "Runs",
        &authed,
        html! {
            h1 { "Runs" span #live data-state="closed" { "live" } }
            nav.filters aria-label="Filter by plugin" {
                "Plugin: "
                a href=(link(None, st, None)) class=(if plugin.is_none() { "on" } else { "" }) { "all" }
                @for p in installed.iter().filter(|p| filter.allows(&p.name)) {
                    a href=(link(Some(&p.name), st, None)) class=(if plugin.as_deref() == Some(p.name.as_str()) { "on" } else { "" }) data-plugin=(p.name) { (p.name) }
                }
            }
            nav.filters aria-label="Filter by status" {
                "Status: "
                a href=(link(plugin.as_deref(), None, None)) class=(if status.is_none() { "on" } else { "" }) { "all" }
                @for s in STATUSES {
                    a href=(link(plugin.as_deref(), Some(s.as_str()), None)) class=(if status == Some(s) { "on" } else { "" }) data-status=(s.as_str()) { (s.as_str()) }
                }
            }
            // New runs are inserted live on the first page only.
            (runs_table(&shown, plugin.as_deref(), status, before.is_none()))
            @if shown.is_empty() { p #no-runs .empty { "No runs." } }
            p.pager {
                @if before.is_some() { a.newest href=(link(plugin.as_deref(), st, None)) { "Newest" } " " }
                @if let Some(n) = next { a.older href=(link(plugin.as_deref(), st, Some(n.to_string()))) { "Older" } }
            }
        },
    )
}

/// One page of runs the filter allows, newest first, matching `status`: pages of the
/// run history are read until the page is full or [`MAX_SCANNED`] runs were looked at;
/// the cursor continues where the look stopped.
pub fn page_of_runs(
    web: &WebState,
    filter: &PluginFilter,
    plugin: Option<String>,
    status: Option<RunStatus>,
    before: Option<RunId>,
) -> Result<(Vec<RunRecord>, Option<RunId>), crate::api::AppError> {
    let filtering = status.is_some();
    let mut shown = Vec::new();
    let mut cursor = before;
    let mut scanned = 0;
    loop {
        let limit = if filtering { 200 } else { RUNS_PER_PAGE };
        let pg = filter.list_runs(
            web.app.scheduler.runs(),
            &RunQuery {
                plugin: plugin.clone(),
                before: cursor,
                limit,
            },
        )?;
        for r in pg.runs {
            scanned += 1;
            cursor = Some(r.id);
            if status.is_none_or(|s| r.status == s) {
                shown.push(r);
                if shown.len() == RUNS_PER_PAGE {
                    // Whether anything older exists is found on the next page.
                    return Ok((shown, cursor));
                }
            }
        }
        if pg.next.is_none() {
            return Ok((shown, None));
        }
        if scanned >= MAX_SCANNED {
            return Ok((shown, cursor));
        }
    }
}

// ---------------------------------------------------------------------------------
// Run

pub async fn run(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Path(id): Path<String>,
) -> Response {
    let Ok(run_id) = id.parse::<RunId>() else {
        return not_found(&format!("{id:?} is not a run id."));
    };
    let rec = match web.app.scheduler.runs().get(run_id) {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(&format!("No run {run_id}.")),
        Err(e) => return internal("the run", e),
    };
    let filter = match filter_for(&web, &authed.token) {
        Ok(f) => f,
        Err(e) => return internal("the plugins", e),
    };
    if filter.authorize_run(&rec).is_err() {
        return not_found(&format!("No run {run_id} (or your token may not see it)."));
    }
    let row = RunRow::of(&rec);
    page(
        &format!("Run {}", &row.id[row.id.len().saturating_sub(12)..]),
        &authed,
        html! {
            h1 { "Run " code { (row.id) } }
            section #outcome data-status=(row.status) data-run=(row.id) data-final=(if rec.status.is_final() { "yes" } else { "no" }) {
                p {
                    a href=(format!("/plugins/{}", rec.plugin)) { (rec.plugin) } " · "
                    span class=(format!("status {}", row.status)) { (row.status) }
                    " · " (row.trigger) " · queued " (row.queued)
                    @if !row.duration.is_empty() { " · took " (row.duration) }
                }
                @if let Some(e) = &rec.error { p.error { (e) } }
                @if let Some(o) = &rec.outcome {
                    pre.outcome { (serde_json::to_string_pretty(o).unwrap_or_default()) }
                }
            }
            section {
                h2 { "Host calls" }
                table #host-calls {
                    thead { tr { th { "Call" } th { "Device" } th { "Request" } th { "Decision" } th { "Reason" } th { "Would allow" } } }
                    tbody {
                        @for c in &rec.host_calls {
                            @let deny = c.decision == crate::runs::CallDecision::Deny;
                            @let reason = c.recorded_reason().unwrap_or("");
                            tr.call.denied[deny] data-decision=(c.decision.as_str()) {
                                td.op { (c.op) }
                                td.device { (c.device) }
                                td.request { code { (c.request) } }
                                td.decision { (c.decision.as_str()) }
                                td.reason { (reason) }
                                @if deny {
                                    td.would-allow { (would_allow(reason).unwrap_or("(the reason says what would)")) }
                                } @else {
                                    td {}
                                }
                            }
                        }
                    }
                }
                @if rec.host_calls.is_empty() { p.empty { "No host calls." } }
                @if rec.host_calls_dropped > 0 { p.note { (rec.host_calls_dropped) " more host calls were not kept." } }
            }
            section {
                h2 { "Logs" }
                pre #logs {
                    @for l in &rec.logs.lines {
                        (l.at.format("%H:%M:%S%.3f")) " " (format!("{:?}", l.level).to_lowercase()) " " (l.message) "\n"
                    }
                }
                @if rec.logs.dropped_lines > 0 { p.note { (rec.logs.dropped_lines) " older log lines were not kept." } }
            }
        },
    )
}

/// The setting a denial's reason names: `set ALLOW_STOP=1 (or …)`, `add … to … `: the
/// clause before "to allow it".
pub fn would_allow(reason: &str) -> Option<&str> {
    let end = reason.find(" to allow it")?;
    let head = &reason[..end];
    let start = ["set ", "add ", "list ", "raise "]
        .iter()
        .filter_map(|w| {
            head.rfind(&format!(": {w}"))
                .map(|i| i + 2)
                .or_else(|| head.starts_with(w).then_some(0))
        })
        .max()?;
    Some(&head[start..])
}

// ---------------------------------------------------------------------------------
// Hooks and notifiers

pub async fn hooks(State(web): State<WebState>, Extension(authed): Extension<Authed>) -> Response {
    let filter = match filter_for(&web, &authed.token) {
        Ok(f) => f,
        Err(e) => return internal("the plugins", e),
    };
    let hooks = crate::api::hooks::views(&web.app, &filter, true);
    page(
        "Hooks",
        &authed,
        html! {
            h1 { "Hooks" }
            p.note { "Secrets are never shown: the table says which ones a hook accepts. Rotate or retire them with " code { "capstan hook" } "." }
            table #hooks {
                thead { tr { th { "Hook" } th { "Plugin" } th { "Auth" } th { "Delivered to" } th { "Replays" } th { "Secrets" } } }
                tbody {
                    @for h in &hooks {
                        tr data-hook=(h.name) {
                            td { (h.name) }
                            td { a href=(format!("/plugins/{}", h.plugin)) { (h.plugin) } }
                            td { (h.auth) }
                            td { code { "POST " (h.url_path) } }
                            td { (if h.rejects_replays { "rejected" } else { "accepted" }) }
                            td.secrets { (h.secrets.unwrap_or("")) }
                        }
                    }
                }
            }
        },
    )
}

pub async fn notifiers(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
) -> Response {
    let list = match web.app.notifier.list() {
        Ok(l) => l,
        Err(e) => return internal("the notifiers", e),
    };
    page(
        "Notifiers",
        &authed,
        html! {
            h1 { "Notifiers" }
            p.note { "A channel's URL is sealed in the vault; only its service and host are shown." }
            table #notifiers {
                thead { tr { th { "Channel" } th { "Service" } th { "At" } th { "Added" } } }
                tbody {
                    @for n in &list {
                        tr data-notifier=(n.name) {
                            td { (n.name) }
                            td { (n.service.as_str()) }
                            td { (n.at) }
                            td { (time(n.added_at)) }
                        }
                    }
                }
            }
            @if list.is_empty() { p.empty { "No notifier channels." } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_that_would_allow_a_denial_is_read_from_its_reason() {
        assert_eq!(
            would_allow(
                "POST /containers/web/stop is denied: set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or POST=1) to allow it"
            ),
            Some("set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or POST=1)")
        );
        assert_eq!(
            would_allow(
                "https://x.example: add `https://x.example` to `[policy] outbound` to allow it"
            ),
            Some("add `https://x.example` to `[policy] outbound`")
        );
        assert_eq!(would_allow("device prod is out of scope"), None);
    }
}
