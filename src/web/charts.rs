//! SVG charts drawn on the server: run durations and outcomes of a plugin, and a
//! device's check latency. Plain shapes with classes (the stylesheet colours them), a
//! `<title>` on each mark for a tooltip, axis labels; no script.

use maud::{Markup, html};

use crate::docker::history::CheckedAt;
use crate::runs::RunRecord;

const W: f64 = 640.0;
const H: f64 = 180.0;
/// Room for the axis labels.
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 10.0;
const RIGHT: f64 = 10.0;

fn fmt_ms(ms: f64) -> String {
    super::render::millis(ms.round() as i64)
}

/// A scale maximum that reads well: 1, 2 or 5 times a power of ten, at least `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn axes(max_label: &str, left_label: &str, right_label: &str) -> Markup {
    let plot_h = H - TOP - BOTTOM;
    html! {
        line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(TOP + plot_h) {}
        line.axis x1=(LEFT) y1=(TOP + plot_h) x2=(W - RIGHT) y2=(TOP + plot_h) {}
        text.label x=(LEFT - 4.0) y=(TOP + 8.0) text-anchor="end" { (max_label) }
        text.label x=(LEFT - 4.0) y=(TOP + plot_h) text-anchor="end" { "0" }
        text.label x=(LEFT) y=(H - 6.0) text-anchor="start" { (left_label) }
        text.label x=(W - RIGHT) y=(H - 6.0) text-anchor="end" { (right_label) }
    }
}

/// `svg#runs-chart`: one bar per run, oldest left, height its duration, class its
/// status. `runs` newest first, as the run store lists them.
pub fn runs(runs: &[RunRecord]) -> Markup {
    let runs: Vec<&RunRecord> = runs.iter().rev().collect();
    let durations: Vec<f64> = runs
        .iter()
        .map(|r| {
            r.duration()
                .map(|d| d.num_milliseconds() as f64)
                .unwrap_or(0.0)
        })
        .collect();
    let max = nice_max(durations.iter().copied().fold(0.0, f64::max));
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / runs.len().max(1) as f64;
    let bar = (slot * 0.8).clamp(1.0, 28.0);
    let first = runs
        .first()
        .map(|r| super::render::time(r.queued_at))
        .unwrap_or_default();
    let last = runs
        .last()
        .map(|r| super::render::time(r.queued_at))
        .unwrap_or_default();
    html! {
        svg #runs-chart xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {W} {H}"))
            role="img" aria-label="Run durations and outcomes, oldest left" {
            title { "Run durations and outcomes" }
            (axes(&fmt_ms(max), &first, &last))
            text.label x=(LEFT + 4.0) y=(TOP + 8.0) { "duration" }
            @for (i, (r, d)) in runs.iter().zip(&durations).enumerate() {
                @let h = (d / max * plot_h).max(2.0);
                rect class=(format!("bar {}", r.status)) x=(format!("{:.1}", LEFT + i as f64 * slot + (slot - bar) / 2.0))
                    y=(format!("{:.1}", TOP + plot_h - h)) width=(format!("{bar:.1}")) height=(format!("{h:.1}")) {
                    title { (r.status.as_str()) ", " (fmt_ms(*d)) ", " (r.queued_at.format("%Y-%m-%d %H:%M:%S")) }
                }
            }
            @if runs.is_empty() {
                text.label x=(W / 2.0) y=(H / 2.0) text-anchor="middle" { "no runs yet" }
            }
        }
    }
}

/// `svg#latency-chart`: the ping latency of the device's recent checks (oldest left);
/// failed checks are marked on the axis.
pub fn latency(checks: &[CheckedAt]) -> Markup {
    let values: Vec<Option<f64>> = checks
        .iter()
        .map(|c| c.report.latency_ms.filter(|_| c.report.connected))
        .collect();
    let max = nice_max(values.iter().flatten().copied().fold(0.0, f64::max));
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let step = if checks.len() > 1 {
        plot_w / (checks.len() - 1) as f64
    } else {
        0.0
    };
    let x = |i: usize| {
        LEFT + if checks.len() > 1 {
            i as f64 * step
        } else {
            plot_w / 2.0
        }
    };
    let y = |v: f64| TOP + plot_h - v / max * plot_h;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
        .collect();
    let first = checks
        .first()
        .map(|c| super::render::time(c.at))
        .unwrap_or_default();
    let last = checks
        .last()
        .map(|c| super::render::time(c.at))
        .unwrap_or_default();
    html! {
        svg #latency-chart xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {W} {H}"))
            role="img" aria-label="Check latency, oldest left" {
            title { "Check latency" }
            (axes(&super::render::ms_f(max), &first, &last))
            text.label x=(LEFT + 4.0) y=(TOP + 8.0) { "ping latency" }
            @if points.len() > 1 {
                polyline.line points=(points.join(" ")) {}
            }
            @for (i, (c, v)) in checks.iter().zip(&values).enumerate() {
                @match v {
                    Some(v) => {
                        circle.point cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", y(*v))) r="3" {
                            title { (super::render::ms_f(*v)) ", " (c.at.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                    None => {
                        circle.point.failed cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", TOP + plot_h)) r="4" {
                            title { "failed: " (c.report.error.as_ref().map(|e| e.kind.as_ref()).unwrap_or("?")) ", " (c.at.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
            @if checks.is_empty() {
                text.label x=(W / 2.0) y=(H / 2.0) text-anchor="middle" { "no checks yet: check now" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_end_on_round_numbers() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(120.0), 200.0);
        assert_eq!(nice_max(1000.0), 1000.0);
    }
}
