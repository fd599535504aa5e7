//! cleanup: removes the stopped containers that carry a label and were created more
//! than `older_than_secs` ago, and dangling images, on every device in scope — or, in a
//! dry run (the default), reports what it would remove and removes nothing.
//!
//! The removal is the engine's prune (`prune-containers`, `prune-images`) with the same
//! filters the dry run applies to the lists, so a dry run shows what the real run takes:
//! stopped (`created`, `exited`, `dead`) containers carrying `label`, inside the
//! plugin's container scope, older than the cut-off; untagged images (carrying
//! `image_label`, when set) older than the cut-off. One difference: the daemon keeps a
//! dangling image some container still uses, and a dry run cannot see containers
//! outside the scope, so it may list an image the real run leaves.
//!
//! Settings come from the manifest's `[config]`; a manual run's input may override them
//! with a JSON object (`{"dry_run": false, "older_than_secs": 3600}`).

use capstan_sdk::prelude::*;
use serde::Serialize;
use serde_json::Value;

struct Cleanup;

/// The run's settings.
struct Settings {
    dry_run: bool,
    label: String,
    older_than_secs: u64,
    images: bool,
    image_label: String,
}

impl Settings {
    fn read(event: &Event) -> Result<Settings, Error> {
        let input: serde_json::Map<String, Value> = match event {
            Event::Manual(m) if !m.input.trim().is_empty() => serde_json::from_str(&m.input)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "the input is a JSON object of settings to override ({e})"
                    ))
                })?,
            _ => serde_json::Map::new(),
        };
        let get = |key: &str| -> Option<String> {
            match input.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => Some(v.to_string()),
                None => config::get(key),
            }
        };
        let parse = |key: &str, default: &str| -> Result<String, Error> {
            Ok(get(key).unwrap_or_else(|| default.to_string()))
        };
        let flag = |key: &str, default: bool| -> Result<bool, Error> {
            match get(key) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| Error::Invalid(format!("{key} = {v:?} is not true or false"))),
            }
        };
        let older_than = parse("older_than_secs", "86400")?;
        Ok(Settings {
            dry_run: flag("dry_run", true)?,
            label: parse("label", "capstan.cleanup=true")?,
            older_than_secs: older_than.parse().map_err(|_| {
                Error::Invalid(format!(
                    "older_than_secs = {older_than:?} is not a number of seconds"
                ))
            })?,
            images: flag("images", true)?,
            image_label: parse("image_label", "")?,
        })
    }
}

#[derive(Serialize, Default)]
struct DeviceReport {
    device: String,
    dry_run: bool,
    /// Container names removed (or, in a dry run, that would be).
    containers: Vec<String>,
    /// Image IDs deleted (or that would be).
    images: Vec<String>,
    space_reclaimed: u64,
    failed: Vec<String>,
    error: Option<String>,
}

/// Whether `labels` satisfy the selector `key` or `key=value`.
fn carries(labels: &[(String, String)], selector: &str) -> bool {
    let (key, value) = match selector.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (selector, None),
    };
    labels
        .iter()
        .any(|(k, v)| k == key && value.is_none_or(|want| want == v))
}

fn clean(device: &str, s: &Settings) -> Result<DeviceReport, Error> {
    let mut report = DeviceReport {
        device: device.to_string(),
        dry_run: s.dry_run,
        ..DeviceReport::default()
    };
    let until = format!("{}s", s.older_than_secs);
    let cutoff_ms = time::now() - (s.older_than_secs as i64).saturating_mul(1000);
    if s.dry_run {
        let stopped = ContainerFilter::all()
            .label(&s.label)
            .status("created")
            .status("exited")
            .status("dead");
        report.containers = docker::list_containers(device, &stopped)?
            .into_iter()
            .filter(|c| c.created < cutoff_ms)
            .map(|c| c.name)
            .collect();
        if s.images {
            report.images = docker::list_images(device, false)?
                .into_iter()
                .filter(|i| i.tags.is_empty() && i.created < cutoff_ms)
                .filter(|i| s.image_label.is_empty() || carries(&i.labels, &s.image_label))
                .map(|i| i.id)
                .collect();
        }
        return Ok(report);
    }
    let pruned = docker::prune_containers(
        device,
        &PruneFilter::any().until(until.clone()).label(&s.label),
    )?;
    report.containers = pruned.removed.into_iter().map(|c| c.name).collect();
    report.space_reclaimed = pruned.space_reclaimed;
    report.failed = pruned.failed;
    if s.images {
        let mut filter = PruneFilter::any().until(until);
        if !s.image_label.is_empty() {
            filter = filter.label(&s.image_label);
        }
        let images = docker::prune_images(device, &filter, true)?;
        report.images = images.deleted;
        report.space_reclaimed += images.space_reclaimed;
    }
    Ok(report)
}

impl Plugin for Cleanup {
    fn run(event: Event) -> Result<Outcome, Error> {
        let settings = Settings::read(&event)?;
        let mut reports = Vec::new();
        for device in docker::list_devices() {
            let report = clean(&device.name, &settings).unwrap_or_else(|e| {
                log::warn(&format!("{}: {}", device.name, e.message()));
                DeviceReport {
                    device: device.name.clone(),
                    dry_run: settings.dry_run,
                    error: Some(e.message()),
                    ..DeviceReport::default()
                }
            });
            reports.push(report);
        }
        let containers: usize = reports.iter().map(|r| r.containers.len()).sum();
        let images: usize = reports.iter().map(|r| r.images.len()).sum();
        let errors = reports.iter().filter(|r| r.error.is_some()).count();
        let verb = if settings.dry_run {
            "dry run: would remove"
        } else {
            "removed"
        };
        let mut summary = format!(
            "{verb} {containers} container(s) and {images} image(s) on {} device(s)",
            reports.len()
        );
        if !settings.dry_run {
            let bytes: u64 = reports.iter().map(|r| r.space_reclaimed).sum();
            summary.push_str(&format!(", {} MiB reclaimed", bytes / (1024 * 1024)));
        }
        if errors > 0 {
            summary.push_str(&format!("; {errors} device(s) failed"));
        }
        Ok(Outcome::new(summary).with_details(&reports))
    }
}

capstan_sdk::export_plugin!(Cleanup);
