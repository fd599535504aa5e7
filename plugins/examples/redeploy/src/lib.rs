//! redeploy: when a registry or CI says an image was pushed, pull it and re-create the
//! containers that run it, on every device in scope, with their configuration kept.
//!
//! Accepted payloads (webhook body, or the input of a manual run):
//! - `{"image": "registry.example.com/team/app:1.4"}`;
//! - Docker Hub's `{"repository": {"repo_name": "team/app"}, "push_data": {"tag": "1.4"}}`;
//! - for a manual run, also a bare reference: `team/app:1.4`.
//!
//! A failed pull does not stop the redeploy when the image is present on the device (a
//! build pushed by CI to the host directly, or a registry that is down): the containers
//! are re-created from the local image and the report says the pull failed. Each
//! re-create is rolled back by the engine if the new container fails to start.

use capstan_sdk::prelude::*;
use serde::Serialize;
use serde_json::Value;

struct Redeploy;

#[derive(Serialize, Default)]
struct DeviceResult {
    device: String,
    pulled: bool,
    pull_error: Option<String>,
    recreated: Vec<String>,
    failed: Vec<String>,
}

/// The image reference a payload names.
fn image_of(payload: &str) -> Result<String, Error> {
    let text = payload.trim();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        if let Some(image) = v["image"].as_str() {
            return Ok(image.to_string());
        }
        if let Some(repo) = v["repository"]["repo_name"].as_str() {
            let tag = v["push_data"]["tag"].as_str().unwrap_or("latest");
            return Ok(format!("{repo}:{tag}"));
        }
        return Err(Error::Invalid(
            "the payload names no image: expected {\"image\": \"name:tag\"} or Docker Hub's {\"repository\": {\"repo_name\": …}, \"push_data\": {\"tag\": …}}".into(),
        ));
    }
    if !text.is_empty() && !text.contains(char::is_whitespace) {
        return Ok(text.to_string());
    }
    Err(Error::Invalid(format!(
        "`{text}` is neither JSON nor an image reference"
    )))
}

/// `nginx` → `docker.io/library/nginx:latest`, so references written differently compare
/// equal.
fn normalise(reference: &str) -> String {
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
        _ => (reference.to_string(), "latest".to_string()),
    };
    let (name, tag) = match reference.split_once('@') {
        Some((n, digest)) => (n.to_string(), digest.to_string()),
        None => (name, tag),
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let name = if has_registry {
        name
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{name}:{tag}")
}

/// `sha256:…` or a bare hex ID.
fn looks_like_id(image: &str) -> bool {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    hex.len() >= 12 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

fn redeploy_device(device: &str, image: &str, stop_timeout: u32) -> Result<DeviceResult, Error> {
    let wanted = normalise(image);
    let mut containers = Vec::new();
    for c in docker::list_containers(device, &ContainerFilter::all())? {
        // Once its tag has moved to a newer image (a pull, a local build), Docker lists a
        // container's image by ID; its configuration still names the reference.
        let runs_it = normalise(&c.image) == wanted
            || (looks_like_id(&c.image)
                && docker::inspect_container(device, &c.id)
                    .is_ok_and(|d| normalise(&d.image) == wanted));
        if runs_it {
            containers.push(c);
        }
    }
    let mut result = DeviceResult {
        device: device.to_string(),
        ..Default::default()
    };
    if containers.is_empty() {
        return Ok(result);
    }
    match docker::pull_image(device, image) {
        Ok(p) => {
            result.pulled = true;
            log::info(&format!("{device}: pulled {image}: {}", p.status));
        }
        Err(e) => {
            log::warn(&format!(
                "{device}: pull of {image} failed, using the local image if present: {}",
                e.message()
            ));
            result.pull_error = Some(e.message());
        }
    }
    for c in containers {
        let options = RecreateOptions {
            image: None,
            pull: false,
            stop_timeout_secs: Some(stop_timeout),
        };
        match docker::recreate_container(device, &c.id, &options) {
            Ok(r) => {
                let changed = if r.old_image_id == r.new_image_id {
                    "same image"
                } else {
                    "new image"
                };
                result.recreated.push(format!("{} ({changed})", r.name));
            }
            Err(e) => result.failed.push(format!("{}: {}", c.name, e.message())),
        }
    }
    Ok(result)
}

impl Plugin for Redeploy {
    fn run(event: Event) -> Result<Outcome, Error> {
        let image = match &event {
            Event::Cron(_) => {
                return Err(Error::Invalid(
                    "redeploy runs on a webhook or by hand, with an image".into(),
                ));
            }
            other => image_of(&other.input())?,
        };
        let stop_timeout = config::get_or("stop_timeout_secs", 10);
        let mut results = Vec::new();
        for device in docker::list_devices() {
            match redeploy_device(&device.name, &image, stop_timeout) {
                Ok(r) => results.push(r),
                Err(e) => results.push(DeviceResult {
                    device: device.name.clone(),
                    failed: vec![e.message()],
                    ..Default::default()
                }),
            }
        }
        let recreated: Vec<String> = results
            .iter()
            .flat_map(|r| r.recreated.iter().map(move |c| format!("{}/{c}", r.device)))
            .collect();
        let failed: Vec<String> = results
            .iter()
            .flat_map(|r| r.failed.iter().map(move |c| format!("{}/{c}", r.device)))
            .collect();
        let pull_errors = results.iter().filter(|r| r.pull_error.is_some()).count();
        let mut summary = format!("{image}: recreated {}", recreated.len());
        if !recreated.is_empty() {
            summary.push_str(&format!(" ({})", recreated.join(", ")));
        }
        if pull_errors > 0 {
            summary.push_str(&format!(
                "; pull failed on {pull_errors} device(s), used the local image"
            ));
        }
        if !failed.is_empty() {
            summary.push_str(&format!(
                "; failed {} ({})",
                failed.len(),
                failed.join("; ")
            ));
        }
        let outcome = Outcome::new(summary).with_details(&results);
        if !failed.is_empty() && recreated.is_empty() {
            return Err(Error::Failed(outcome.summary));
        }
        Ok(outcome)
    }
}

capstan_sdk::export_plugin!(Redeploy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_image_from_each_payload_kind() {
        assert_eq!(
            image_of(r#"{"image": "team/app:1.4"}"#).unwrap(),
            "team/app:1.4"
        );
        assert_eq!(
            image_of(r#"{"repository": {"repo_name": "team/app"}, "push_data": {"tag": "1.4"}}"#)
                .unwrap(),
            "team/app:1.4"
        );
        assert_eq!(
            image_of(r#"{"repository": {"repo_name": "team/app"}}"#).unwrap(),
            "team/app:latest"
        );
        assert_eq!(image_of("nginx:1.27").unwrap(), "nginx:1.27");
        assert!(image_of(r#"{"other": 1}"#).is_err());
        assert!(image_of("two words").is_err());
    }

    #[test]
    fn compares_references_written_differently() {
        assert_eq!(
            normalise("nginx"),
            normalise("docker.io/library/nginx:latest")
        );
        assert_eq!(
            normalise("team/app"),
            normalise("docker.io/team/app:latest")
        );
        assert_ne!(normalise("team/app:1"), normalise("team/app:2"));
        assert_eq!(normalise("registry:5000/app"), "registry:5000/app:latest");
        assert_eq!(normalise("localhost/app:2"), "localhost/app:2");
        assert!(looks_like_id("sha256:0123456789abcdef0123"));
        assert!(looks_like_id("0123456789ab"));
        assert!(!looks_like_id("nginx"));
    }
}
