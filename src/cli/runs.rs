//! `capstan runs`: the run history, newest first, and `--follow` for runs as they
//! happen. Asks the engine's API: the running engine's, or the data directory's opened
//! here (where there is nothing to follow).

use anyhow::{Context, bail};

use super::client::ApiClient;
use super::{GlobalArgs, print_table};
use crate::runs::{MAX_PAGE, RunId, RunRecord, RunTrigger};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunsArgs {
    #[command(subcommand)]
    cmd: Option<RunsCmd>,
    /// Only this plugin's runs.
    #[arg(long, value_name = "NAME")]
    plugin: Option<String>,
    /// How many runs to list, newest first. Past the API's page size (1000) the list is
    /// read page by page.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// After the list, print runs as they are queued, start and end, until interrupted
    /// (needs the running engine).
    #[arg(long, short)]
    follow: bool,
    /// Print JSON (one record per line with --follow).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum RunsCmd {
    /// One run in full: trigger, times, status, outcome, logs, host calls.
    Show {
        /// The run id (from `capstan runs`).
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &GlobalArgs, mut args: RunsArgs) -> anyhow::Result<()> {
    let settings = g.settings(None)?;
    let data_dir = settings.data_dir.clone();
    let rt = super::check::runtime()?;
    let api = {
        let _guard = rt.enter();
        ApiClient::connect(settings, &g.passphrase())?
    };
    rt.block_on(async {
        match args.cmd.take() {
            Some(RunsCmd::Show { id, json }) => {
                let id: RunId = id.parse().map_err(anyhow::Error::msg)?;
                let v = api.json("GET", &format!("/api/runs/{id}"), None).await?;
                let record: RunRecord =
                    serde_json::from_value(v).context("the engine's run record")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&record)?);
                } else {
                    print!("{}", render(&record));
                }
                Ok(())
            }
            None if args.follow && api.is_in_process() => bail!(
                "--follow shows runs as the engine runs them, and no engine is running on {}; start it with `capstan serve`",
                data_dir.display()
            ),
            None => list(&api, &args).await,
        }
    })
}

/// The list, then with `--follow` the runs as they happen.
async fn list(api: &ApiClient, args: &RunsArgs) -> anyhow::Result<()> {
    let runs = newest(api, args.plugin.as_deref(), args.limit.max(1)).await?;
    print_list(&runs, args.json)?;
    if !args.follow {
        return Ok(());
    }
    let path = match &args.plugin {
        Some(p) => format!("/api/runs/events?plugin={p}"),
        None => "/api/runs/events".to_string(),
    };
    let json = args.json;
    api.stream(&path, |v| {
        let r: RunRecord = serde_json::from_value(v).context("a run update")?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{}  {:<11} {:<16} {}  {}",
                chrono::Utc::now().format("%H:%M:%S%.3f"),
                r.status.as_str(),
                r.plugin,
                r.id,
                summary(&r)
            );
        }
        Ok(true)
    })
    .await?;
    bail!("the engine closed the stream (did it stop?)")
}

/// The newest `want` runs (of `plugin`), read a page of at most [`MAX_PAGE`] at a time
/// and following each page's `next` until there are enough or the history ends.
async fn newest(
    api: &ApiClient,
    plugin: Option<&str>,
    want: usize,
) -> anyhow::Result<Vec<RunRecord>> {
    let mut runs: Vec<RunRecord> = Vec::new();
    let mut before: Option<String> = None;
    while runs.len() < want {
        let mut query = format!("/api/runs?limit={}", (want - runs.len()).min(MAX_PAGE));
        if let Some(p) = plugin {
            query.push_str(&format!("&plugin={p}"));
        }
        if let Some(b) = &before {
            query.push_str(&format!("&before={b}"));
        }
        let page = api.json("GET", &query, None).await?;
        let got: Vec<RunRecord> =
            serde_json::from_value(page["runs"].clone()).context("the engine's run list")?;
        let end = got.is_empty();
        runs.extend(got);
        match page["next"].as_str() {
            Some(next) if !end => before = Some(next.to_string()),
            _ => break,
        }
    }
    Ok(runs)
}

fn print_list(runs: &[RunRecord], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(runs)?);
        return Ok(());
    }
    if runs.is_empty() {
        println!("no runs yet");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.plugin.clone(),
                trigger(&r.trigger),
                r.status.as_str().to_string(),
                r.queued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.duration()
                    .map(|d| format!("{} ms", d.num_milliseconds()))
                    .unwrap_or_default(),
                summary(r),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "PLUGIN",
            "TRIGGER",
            "STATUS",
            "QUEUED (UTC)",
            "TOOK",
            "SUMMARY",
        ],
        &rows,
    );
    Ok(())
}

fn trigger(t: &RunTrigger) -> String {
    match t {
        RunTrigger::Cron { schedule, .. } => format!("cron {schedule}"),
        RunTrigger::Webhook { hook, .. } => format!("webhook {hook}"),
        RunTrigger::Manual { by } => format!("manual ({by})"),
        RunTrigger::Docker {
            device,
            event,
            count,
            ..
        } if *count > 1 => format!("docker {event}@{device} ×{count}"),
        RunTrigger::Docker { device, event, .. } => format!("docker {event}@{device}"),
        RunTrigger::Run { plugin, status, .. } => format!("run {plugin} {status}"),
    }
}

fn summary(r: &RunRecord) -> String {
    let text = match (&r.outcome, &r.error) {
        (Some(o), _) => o["summary"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| o.to_string()),
        (None, Some(e)) => e.clone(),
        (None, None) => String::new(),
    };
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > 80 {
        format!("{}…", line.chars().take(79).collect::<String>())
    } else {
        line.to_string()
    }
}

/// A run in full, for `capstan runs show`.
pub fn render(r: &RunRecord) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "run:      {}", r.id);
    let _ = writeln!(out, "plugin:   {}", r.plugin);
    let _ = writeln!(out, "trigger:  {}", trigger(&r.trigger));
    match &r.trigger {
        RunTrigger::Cron { scheduled_at, .. } => {
            let _ = writeln!(out, "scheduled {}", scheduled_at.to_rfc3339());
        }
        RunTrigger::Webhook {
            delivery: Some(d), ..
        } => {
            let _ = writeln!(out, "delivery: {d}");
        }
        _ => {}
    }
    let _ = writeln!(out, "status:   {}", r.status);
    let _ = writeln!(out, "queued:   {}", r.queued_at.to_rfc3339());
    if let Some(t) = r.started_at {
        let _ = writeln!(out, "started:  {}", t.to_rfc3339());
    }
    if let Some(t) = r.finished_at {
        let _ = writeln!(out, "finished: {}", t.to_rfc3339());
    }
    if let Some(d) = r.duration() {
        let _ = writeln!(out, "took:     {} ms", d.num_milliseconds());
    }
    if let Some(o) = &r.outcome {
        let _ = writeln!(
            out,
            "outcome:  {}",
            serde_json::to_string_pretty(o).unwrap_or_default()
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "error:    {e}");
    }
    if !r.logs.lines.is_empty() || r.logs.dropped_lines > 0 {
        let _ = writeln!(out, "logs:");
        if r.logs.dropped_lines > 0 {
            let _ = writeln!(
                out,
                "  ({} earlier line(s), {} bytes, dropped at the cap)",
                r.logs.dropped_lines, r.logs.dropped_bytes
            );
        }
        for l in &r.logs.lines {
            let _ = writeln!(
                out,
                "  {} {:<5} {}",
                l.at.format("%H:%M:%S%.3f"),
                format!("{:?}", l.level).to_lowercase(),
                l.message
            );
        }
    }
    if !r.host_calls.is_empty() {
        let _ = writeln!(out, "host calls:");
        for c in r.host_calls.iter().map(crate::runs::RecordedCall::from) {
            let _ = writeln!(
                out,
                "  {:<5} {} {} {}{}",
                format!("{:?}", c.decision).to_lowercase(),
                c.op,
                c.device.as_deref().unwrap_or("-"),
                c.request.as_deref().unwrap_or(""),
                c.reason
                    .as_deref()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
        if r.host_calls_dropped > 0 {
            let _ = writeln!(out, "  … {} more not kept", r.host_calls_dropped);
        }
    }
    out
}
