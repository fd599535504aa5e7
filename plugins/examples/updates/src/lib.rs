//! updates: which containers run a tag the registry now serves a newer image for, found
//! without pulling (`check-image-update`), in the style of What's Up Docker, diun or Cup.
//!
//! On every run (cron or manual), for each running container in scope that carries
//! `label` (every one in scope when `label` is empty), on every device in scope:
//! - **report**: the outcome lists the containers with an update (image, local digests,
//!   the registry's digest), and those up to date or unknown (with the reason: an image
//!   built locally, a registry that cannot be reached, a tag it does not have);
//! - **notify**: with `channel` set, one notification per new update — per device, image
//!   and registry digest —, remembered in plugin state so the next runs do not repeat it;
//! - **redeploy** (`mode = "redeploy"`): once an update has been seen for `min_age` (the
//!   first time it was seen is kept in plugin state, like diun's or WUD's maturity), the
//!   image is pulled and its containers re-created with their configuration, the
//!   containers of a compose project in dependency order (`capstan_sdk::stack`). A pull
//!   that fails, or that brings no other image, re-creates nothing.
//!
//! State: `update/<device>/<image>` holds the registry digest last seen for that image,
//! when it was first seen and whether it was notified; it is removed once the image is
//! up to date again.

use std::collections::{BTreeMap, BTreeSet};

use capstan_sdk::prelude::*;
use capstan_sdk::stack;
use serde::{Deserialize, Serialize};

struct Updates;

/// How the run acts on an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Report,
    Redeploy,
}

/// The run's settings, from the manifest's `[config]`.
struct Settings {
    label: String,
    mode: Mode,
    min_age_ms: i64,
    channel: String,
    stop_timeout_secs: u32,
}

impl Settings {
    fn read() -> Result<Settings, Error> {
        let mode = match config::get("mode").unwrap_or_default().trim() {
            "" | "report" => Mode::Report,
            "redeploy" => Mode::Redeploy,
            other => {
                return Err(Error::Invalid(format!(
                    "config mode = {other:?}: expected \"report\" or \"redeploy\""
                )));
            }
        };
        let min_age = config::get("min_age").unwrap_or_else(|| "24h".into());
        let min_age_secs = parse_duration(&min_age)
            .map_err(|e| Error::Invalid(format!("config min_age = {min_age:?}: {e}")))?;
        Ok(Settings {
            label: config::get("label").unwrap_or_default().trim().to_string(),
            mode,
            min_age_ms: i64::try_from(min_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            channel: config::get("channel")
                .unwrap_or_default()
                .trim()
                .to_string(),
            stop_timeout_secs: config::get_or("stop_timeout_secs", 10),
        })
    }
}

/// `0`, `90`, `90s`, `90m`, `24h`, `7d`, `1h30m` → seconds. A TOML string keeps its
/// quotes in config text; they are dropped.
fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim().trim_matches('"');
    if text.is_empty() {
        return Err("empty: write `0`, `90m`, `24h`, `7d` or seconds".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let (mut total, mut number) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("unknown unit `{c}`: use s, m, h or d")),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("`{c}` follows no number"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!("`{number}` has no unit: use s, m, h or d"));
    }
    Ok(total)
}

/// What plugin state remembers of an update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Seen {
    /// The registry's digest when it was first seen.
    remote: String,
    /// When it was first seen (ms since the epoch).
    first_seen: i64,
    /// Whether the channel was told.
    notified: bool,
}

fn state_key(device: &str, image: &str) -> String {
    format!("update/{device}/{image}")
}

/// What the state should hold for an update seen now: the remembered record when the
/// registry still serves the same digest, else a new one.
fn seen_now(previous: Option<Seen>, remote: &str, now: i64) -> Seen {
    match previous {
        Some(s) if s.remote == remote => s,
        _ => Seen {
            remote: remote.to_string(),
            first_seen: now,
            notified: false,
        },
    }
}

#[derive(Serialize, Default)]
struct Report {
    available: Vec<Available>,
    up_to_date: Vec<Checked>,
    unknown: Vec<Checked>,
    notified: Vec<String>,
    waiting: Vec<String>,
    redeployed: Vec<String>,
    failed: Vec<String>,
}

#[derive(Serialize)]
struct Available {
    device: String,
    container: String,
    image: String,
    local_digests: Vec<String>,
    remote_digest: String,
    /// When the update was first seen (ms since the epoch).
    first_seen: i64,
}

#[derive(Serialize)]
struct Checked {
    device: String,
    container: String,
    image: String,
    /// The digest for `up_to_date`, the reason for `unknown`.
    note: String,
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Checks every watched container of `device`; returns the containers with an update,
/// by image.
fn check_device(
    device: &str,
    settings: &Settings,
    report: &mut Report,
) -> Result<BTreeMap<String, (String, Vec<ContainerSummary>)>, Error> {
    let mut filter = ContainerFilter::running();
    if !settings.label.is_empty() {
        filter = filter.label(settings.label.clone());
    }
    let mut by_image: BTreeMap<String, (String, Vec<ContainerSummary>)> = BTreeMap::new();
    let mut current: BTreeSet<String> = BTreeSet::new();
    for c in docker::list_containers(device, &filter)? {
        let u = match docker::check_container_update(device, &c.id) {
            Ok(u) => u,
            Err(e) => {
                report
                    .failed
                    .push(format!("{device}/{}: {}", c.name, e.message()));
                continue;
            }
        };
        current.insert(u.image.clone());
        match u.status {
            UpdateStatus::UpToDate => report.up_to_date.push(Checked {
                device: device.to_string(),
                container: c.name.clone(),
                image: u.image,
                note: u.remote_digest.unwrap_or_default(),
            }),
            UpdateStatus::Unknown(why) => report.unknown.push(Checked {
                device: device.to_string(),
                container: c.name.clone(),
                image: u.image,
                note: why,
            }),
            UpdateStatus::Available => {
                let remote = u.remote_digest.unwrap_or_default();
                report.available.push(Available {
                    device: device.to_string(),
                    container: c.name.clone(),
                    image: u.image.clone(),
                    local_digests: u.local_digests,
                    remote_digest: remote.clone(),
                    first_seen: 0,
                });
                by_image
                    .entry(u.image)
                    .or_insert_with(|| (remote, Vec::new()))
                    .1
                    .push(c);
            }
        }
    }
    // Forget the updates of images checked now that have none any more.
    let prefix = state_key(device, "");
    for key in state::keys(&prefix) {
        let image = &key[prefix.len()..];
        if current.contains(image) && !by_image.contains_key(image) {
            state::delete(&key);
        }
    }
    Ok(by_image)
}

/// Notifies, and in redeploy mode re-creates, what has an update on `device`.
fn act_on_device(
    device: &str,
    settings: &Settings,
    updates: BTreeMap<String, (String, Vec<ContainerSummary>)>,
    now: i64,
    report: &mut Report,
) {
    let mut mature: Vec<(String, Vec<ContainerSummary>)> = Vec::new();
    for (image, (remote, containers)) in updates {
        let key = state_key(device, &image);
        let mut seen = seen_now(state::get_json(&key), &remote, now);
        for a in report
            .available
            .iter_mut()
            .filter(|a| a.device == device && a.image == image)
        {
            a.first_seen = seen.first_seen;
        }
        if !settings.channel.is_empty() && !seen.notified {
            let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
            let note = Notification::new(
                format!("Update available: {image}"),
                format!(
                    "{device}: the registry serves {remote} for {image}; {} run(s) an older image: {}",
                    if names.len() == 1 { "1 container" } else { "containers" },
                    names.join(", ")
                ),
            )
            .tag("update")
            .tag(device)
            .dedup_key(format!("update:{device}:{image}:{remote}"));
            match notify::send(&settings.channel, &note) {
                Ok(_) => {
                    seen.notified = true;
                    report.notified.push(format!("{device}/{image}"));
                }
                Err(e) => {
                    log::with(
                        log::LogLevel::Warn,
                        "cannot notify about an update",
                        &[("channel", &settings.channel), ("error", &e.message())],
                    );
                    report
                        .failed
                        .push(format!("notify {}: {}", settings.channel, e.message()));
                }
            }
        }
        if let Err(e) = state::set_json(&key, &seen) {
            report.failed.push(format!(
                "{device}/{image}: cannot keep state: {}",
                e.message()
            ));
        }
        if settings.mode == Mode::Redeploy {
            let age = now.saturating_sub(seen.first_seen);
            if age >= settings.min_age_ms {
                mature.push((image, containers));
            } else {
                let left = (settings.min_age_ms - age + 999) / 1000;
                report.waiting.push(format!(
                    "{device}/{image}: redeployed once the update is {} s old ({left} s from now)",
                    settings.min_age_ms / 1000
                ));
            }
        }
    }
    if mature.is_empty() {
        return;
    }
    // Pull each image once; only containers whose image the pull replaced are
    // re-created, all of them together so a compose stack goes in dependency order.
    let mut to_recreate = Vec::new();
    for (image, containers) in mature {
        match docker::pull_image(device, &image) {
            Ok(p) => {
                log::info(&format!("{device}: pulled {image}: {}", p.status));
                for c in containers {
                    if c.image_id == p.id {
                        report.failed.push(format!(
                            "{device}/{}: the pull of {image} brought the image it runs; nothing to re-create",
                            c.name
                        ));
                    } else {
                        to_recreate.push(c);
                    }
                }
            }
            Err(e) => report.failed.push(format!(
                "{device}/{image}: pull failed, nothing re-created: {}",
                e.message()
            )),
        }
    }
    let options = RecreateOptions {
        image: None,
        pull: false,
        stop_timeout_secs: Some(settings.stop_timeout_secs),
    };
    for r in stack::recreate_in_order(device, &to_recreate, &options) {
        match r.result {
            Ok(done) => report.redeployed.push(format!(
                "{device}/{} ({} → {})",
                done.name,
                short(&done.old_image_id),
                short(&done.new_image_id)
            )),
            Err(e) => report
                .failed
                .push(format!("{device}/{}: {}", r.name, e.message())),
        }
    }
}

fn summary(report: &Report) -> String {
    let mut s = format!("{} update(s) available", report.available.len());
    if !report.available.is_empty() {
        let list: Vec<String> = report
            .available
            .iter()
            .map(|a| {
                let local = a
                    .local_digests
                    .iter()
                    .map(|d| short(d))
                    .collect::<Vec<_>>()
                    .join("|");
                format!(
                    "{}/{} ({} {local} → {})",
                    a.device,
                    a.container,
                    a.image,
                    short(&a.remote_digest)
                )
            })
            .collect();
        s.push_str(&format!(" ({})", list.join(", ")));
    }
    s.push_str(&format!(
        "; {} up to date; {} unknown",
        report.up_to_date.len(),
        report.unknown.len()
    ));
    if !report.unknown.is_empty() {
        let list: Vec<String> = report
            .unknown
            .iter()
            .map(|u| format!("{}/{}: {}", u.device, u.container, u.note))
            .collect();
        s.push_str(&format!(" ({})", list.join("; ")));
    }
    if !report.notified.is_empty() {
        s.push_str(&format!("; notified {}", report.notified.join(", ")));
    }
    if !report.redeployed.is_empty() {
        s.push_str(&format!("; redeployed {}", report.redeployed.join(", ")));
    }
    if !report.waiting.is_empty() {
        s.push_str(&format!("; waiting: {}", report.waiting.join("; ")));
    }
    if !report.failed.is_empty() {
        s.push_str(&format!("; failed: {}", report.failed.join("; ")));
    }
    s
}

impl Plugin for Updates {
    fn run(_event: Event) -> Result<Outcome, Error> {
        let settings = Settings::read()?;
        let now = time::now();
        let mut report = Report::default();
        for device in docker::list_devices() {
            match check_device(&device.name, &settings, &mut report) {
                Ok(updates) => act_on_device(&device.name, &settings, updates, now, &mut report),
                Err(e) => report
                    .failed
                    .push(format!("{}: {}", device.name, e.message())),
            }
        }
        for a in &report.available {
            log::with(
                log::LogLevel::Info,
                "update available",
                &[
                    ("device", &a.device),
                    ("container", &a.container),
                    ("image", &a.image),
                    ("local", &a.local_digests.join(",")),
                    ("remote", &a.remote_digest),
                ],
            );
        }
        let text = summary(&report);
        let checked = report.available.len() + report.up_to_date.len() + report.unknown.len();
        if checked == 0 && !report.failed.is_empty() {
            return Err(Error::Failed(text));
        }
        Ok(Outcome::new(text).with_details(&report))
    }
}

capstan_sdk::export_plugin!(Updates);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_min_age_durations() {
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("\"24h\""), Ok(86400));
        assert_eq!(parse_duration("7d"), Ok(604800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("1h30").unwrap_err().contains("no unit"));
        assert!(parse_duration("h").unwrap_err().contains("no number"));
    }

    #[test]
    fn keeps_the_first_sighting_of_a_digest_and_restarts_it_for_a_new_one() {
        let first = seen_now(None, "sha256:aa", 1000);
        assert_eq!(first.first_seen, 1000);
        assert!(!first.notified);
        let notified = Seen {
            notified: true,
            ..first
        };
        // Same digest later: same first sighting, still notified.
        assert_eq!(
            seen_now(Some(notified.clone()), "sha256:aa", 5000),
            notified
        );
        // Another push meanwhile: a new update, to be told and to mature anew.
        let newer = seen_now(Some(notified), "sha256:bb", 9000);
        assert_eq!(newer.first_seen, 9000);
        assert!(!newer.notified);
        assert_eq!(newer.remote, "sha256:bb");
    }
}
