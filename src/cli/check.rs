//! Running and printing Docker connection checks for `capstan device check` (each one
//! asked of the engine's API).

use std::io::{IsTerminal, Write};

use anyhow::Context;
use futures_util::StreamExt;

use super::print_table as table;
use crate::docker::CheckReport;

/// How many devices `--all` checks at once unless `--concurrency` says (the engine's own
/// default bound, `[docker] check_concurrency`).
pub(crate) const DEFAULT_CONCURRENCY: u16 = crate::docker::DEFAULT_CHECK_CONCURRENCY as u16;

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Checks every device, `concurrency` at once (`check_one` per item, a check through the
/// engine's API); reports come back in the items' order. With `progress`, a progress bar
/// is drawn on stderr when it is a terminal.
pub(crate) async fn run_all<T, F, Fut>(
    work: Vec<T>,
    check_one: F,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<Vec<CheckReport>>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<CheckReport>>,
{
    let total = work.len();
    let bar = progress && total > 1 && std::io::stderr().is_terminal();
    let mut done = 0;
    let mut out: Vec<Option<CheckReport>> = vec![None; total];
    let check_one = &check_one;
    let mut results = futures_util::stream::iter(work.into_iter().enumerate())
        .map(|(i, item)| async move { (i, check_one(item).await) })
        .buffer_unordered(concurrency.max(1));
    if bar {
        draw_bar(0, total, 0);
    }
    let mut failed = 0;
    while let Some((i, r)) = results.next().await {
        let r = r?;
        done += 1;
        if !r.connected {
            failed += 1;
        }
        out[i] = Some(r);
        if bar {
            draw_bar(done, total, failed);
        }
    }
    if bar {
        eprintln!();
    }
    Ok(out.into_iter().flatten().collect())
}

fn draw_bar(done: usize, total: usize, failed: usize) {
    const WIDTH: usize = 30;
    let filled = WIDTH * done / total.max(1);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\rchecking [{}{}] {done}/{total}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    let _ = err.flush();
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// One device, in detail.
pub(crate) fn print_one(r: &CheckReport) {
    if r.connected {
        println!(
            "device {} ({}, {}): connected in {}",
            r.device,
            r.kind,
            r.address,
            ms(r.total_ms)
        );
    } else {
        println!(
            "device {} ({}, {}): FAILED at {} ({})",
            r.device,
            r.kind,
            r.address,
            r.failed_step.as_deref().unwrap_or("?"),
            r.error.as_ref().map(|e| e.kind.as_ref()).unwrap_or("?")
        );
    }
    if let Some(o) = &r.owner {
        println!("  through:  owner node {o} (cluster mode; this node does not own the device)");
    }
    if let Some(d) = &r.docker {
        println!(
            "  docker:   {} (API {}, speaking {}), {}/{}{}",
            d.version,
            d.api_version,
            d.negotiated_api_version,
            d.os,
            d.arch,
            d.operating_system
                .as_ref()
                .map(|o| format!(", {o}"))
                .unwrap_or_default()
        );
    }
    if let Some(l) = r.latency_ms {
        println!("  latency:  {} (ping)", ms(l));
    }
    if !r.steps.is_empty() {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| format!("{} {}", s.step, ms(s.ms)))
            .collect();
        println!("  steps:    {}", steps.join(", "));
    }
    if let Some(k) = &r.host_key {
        let state = if k.trusted_now {
            "trusted now"
        } else if k.pinned {
            "pinned"
        } else if r
            .error
            .as_ref()
            .is_some_and(|e| e.kind == "host-key-mismatch")
        {
            "NOT the pinned key"
        } else {
            "not pinned"
        };
        println!("  host key: {} {} ({state})", k.algorithm, k.fingerprint);
    }
    if let Some(e) = &r.error {
        if let Some(m) = &e.offered_methods {
            println!("  the server offers: {}", m.join(", "));
        }
        if let Some(p) = &e.presented_fingerprint {
            match &e.expected_fingerprint {
                Some(x) => println!("  host key expected {x}, presented {p}"),
                None => println!("  host key presented {p} (not pinned)"),
            }
        }
    }
}

/// Many devices: one row each, then what failed.
pub(crate) fn print_table(reports: &[CheckReport]) {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.device.clone(),
                r.kind.to_string(),
                r.address.clone(),
                if r.connected {
                    "ok".into()
                } else {
                    format!(
                        "FAILED ({})",
                        r.error.as_ref().map(|e| e.kind.as_ref()).unwrap_or("?")
                    )
                },
                r.docker
                    .as_ref()
                    .map(|d| format!("{} (API {})", d.version, d.negotiated_api_version))
                    .unwrap_or_else(|| "-".into()),
                r.latency_ms.map(ms).unwrap_or_else(|| "-".into()),
                ms(r.total_ms),
            ]
        })
        .collect();
    table(
        &[
            "DEVICE", "KIND", "ADDRESS", "RESULT", "DOCKER", "LATENCY", "TOTAL",
        ],
        &rows,
    );
    let failures: Vec<&CheckReport> = reports.iter().filter(|r| !r.connected).collect();
    if !failures.is_empty() {
        println!();
        for r in failures {
            if let Some(e) = &r.error {
                println!("{}", e.message);
            }
        }
    }
}
