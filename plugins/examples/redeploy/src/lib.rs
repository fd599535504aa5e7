//! redeploy: when a registry or CI says an image was pushed, pull it and re-create the
//! containers that run it, on every device in scope, with their configuration kept.
//!
//! Accepted payloads (webhook body, or the input of a manual run):
//! - `{"image": "registry.example.com/team/app:1.4"}`;
//! - Docker Hub's `{"repository": {"repo_name": "team/app"}, "push_data": {"tag": "1.4"}}`;
//! - a registry's own notification (the distribution project's
//!   `application/vnd.docker.distribution.events.v1+json`): `{"events": [{"action":
//!   "push", "target": {"repository": "team/app", "tag": "1.4", …}, "request": {"host":
//!   "registry:5000"}}]}`, the newest tagged manifest push in it; an envelope with none
//!   (blob uploads, pulls) is answered "nothing to redeploy";
//! - GitHub Packages' `package` event (`"action": "published"`): the version's
//!   `package_url`, or the registry, owner, name and container tag;
//! - for a manual run, also a bare reference: `team/app:1.4`.
//!
//! A failed pull does not stop the redeploy when the image is present on the device (a
//! build pushed by CI to the host directly, or a registry that is down): the containers
//! are re-created from the local image and the report says the pull failed. Each
//! re-create is rolled back by the engine if the new container fails to start. The
//! containers of a compose project are re-created in dependency order (its
//! `com.docker.compose.depends_on` labels: dependencies first, see `capstan_sdk::stack`).

use capstan_sdk::prelude::*;
use capstan_sdk::stack;
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

/// The image reference a payload names; `None` for a registry notification that holds
/// no tagged manifest push (blob uploads, pulls, deletions).
fn image_of(payload: &str) -> Result<Option<String>, Error> {
    let text = payload.trim();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        if let Some(image) = v["image"].as_str() {
            return Ok(Some(image.to_string()));
        }
        if let Some(events) = v["events"].as_array() {
            return Ok(events.iter().rev().find_map(distribution_push));
        }
        if let Some(package) = v.get("package").filter(|p| p.is_object()) {
            return github_package(package).map(Some);
        }
        if let Some(repo) = v["repository"]["repo_name"].as_str() {
            let tag = v["push_data"]["tag"].as_str().unwrap_or("latest");
            return Ok(Some(format!("{repo}:{tag}")));
        }
        return Err(Error::Invalid(
            "the payload names no image: expected {\"image\": \"name:tag\"}, a registry's {\"events\": […]}, GitHub's {\"package\": …} or Docker Hub's {\"repository\": {\"repo_name\": …}, \"push_data\": {\"tag\": …}}".into(),
        ));
    }
    if !text.is_empty() && !text.contains(char::is_whitespace) {
        return Ok(Some(text.to_string()));
    }
    Err(Error::Invalid(format!(
        "`{text}` is neither JSON nor an image reference"
    )))
}

/// The image of one event of a registry notification, if it is a tagged manifest push:
/// `host/repository:tag`, the host as the client that pushed addressed the registry.
fn distribution_push(event: &Value) -> Option<String> {
    if event["action"].as_str() != Some("push") {
        return None;
    }
    let target = &event["target"];
    let tag = target["tag"].as_str().filter(|t| !t.is_empty())?;
    let repository = target["repository"].as_str().filter(|r| !r.is_empty())?;
    let host = event["request"]["host"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .or_else(|| {
            // `http://host:port/v2/…` of the manifest.
            let url = target["url"].as_str()?;
            let rest = url.split_once("://")?.1;
            Some(rest.split('/').next()?.to_string())
        })?;
    Some(format!("{host}/{repository}:{tag}"))
}

/// The image of GitHub Packages' `package` event: the version's `package_url` when it
/// names one, else the registry's host, the owner, the name and the container tag.
fn github_package(package: &Value) -> Result<String, Error> {
    let version = &package["package_version"];
    if let Some(url) = version["package_url"].as_str().filter(|u| !u.is_empty()) {
        return Ok(url.to_string());
    }
    let tag = version["container_metadata"]["tag"]["name"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or("latest");
    let host = package["registry"]["url"]
        .as_str()
        .and_then(|u| u.split_once("://").map(|(_, rest)| rest))
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|h| !h.is_empty());
    let owner = package["owner"]["login"]
        .as_str()
        .or(package["namespace"].as_str());
    match (host, owner, package["name"].as_str()) {
        (Some(host), Some(owner), Some(name)) => Ok(format!("{host}/{owner}/{name}:{tag}")),
        _ => Err(Error::Invalid(
            "GitHub's package event names no image: no package_version.package_url, nor registry.url, owner.login and name".into(),
        )),
    }
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
    let options = RecreateOptions {
        image: None,
        pull: false,
        stop_timeout_secs: Some(stop_timeout),
    };
    // A compose stack's dependencies first.
    for c in stack::recreate_in_order(device, &containers, &options) {
        match c.result {
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
            other => match image_of(&other.input())? {
                Some(image) => image,
                None => {
                    return Ok(Outcome::new(
                        "the registry's notification holds no tagged image push: nothing to redeploy",
                    ));
                }
            },
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
        let image = |payload: &str| image_of(payload).unwrap().unwrap();
        assert_eq!(image(r#"{"image": "team/app:1.4"}"#), "team/app:1.4");
        assert_eq!(
            image(r#"{"repository": {"repo_name": "team/app"}, "push_data": {"tag": "1.4"}}"#),
            "team/app:1.4"
        );
        assert_eq!(
            image(r#"{"repository": {"repo_name": "team/app"}}"#),
            "team/app:latest"
        );
        assert_eq!(image("nginx:1.27"), "nginx:1.27");
        assert!(image_of(r#"{"other": 1}"#).is_err());
        assert!(image_of("two words").is_err());
    }

    /// A registry's notification as the distribution project sends it: a layer upload, a
    /// pull and a tagged manifest push in one envelope.
    const DISTRIBUTION_EVENTS: &str = r#"{"events": [
        {"id": "1", "action": "push",
         "target": {"mediaType": "application/octet-stream", "digest": "sha256:aa", "repository": "team/app",
                    "url": "http://registry.example.com:5000/v2/team/app/blobs/sha256:aa"},
         "request": {"host": "registry.example.com:5000", "method": "PUT"}},
        {"id": "2", "action": "push",
         "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": "sha256:bb",
                    "repository": "team/app", "tag": "1.5",
                    "url": "http://registry.example.com:5000/v2/team/app/manifests/sha256:bb"},
         "request": {"host": "registry.example.com:5000", "method": "PUT"}},
        {"id": "3", "action": "pull",
         "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "repository": "team/other", "tag": "2"},
         "request": {"host": "registry.example.com:5000", "method": "GET"}}
    ]}"#;

    #[test]
    fn reads_the_tagged_manifest_push_of_a_registry_notification() {
        assert_eq!(
            image_of(DISTRIBUTION_EVENTS).unwrap().as_deref(),
            Some("registry.example.com:5000/team/app:1.5")
        );
        // Without the request's host, the manifest URL's.
        let no_host = r#"{"events": [{"action": "push", "target": {"repository": "team/app", "tag": "2",
            "url": "http://127.0.0.1:5000/v2/team/app/manifests/sha256:cc"}, "request": {}}]}"#;
        assert_eq!(
            image_of(no_host).unwrap().as_deref(),
            Some("127.0.0.1:5000/team/app:2")
        );
        // Only blob uploads and pulls: nothing to redeploy, not an error.
        let blobs = r#"{"events": [{"action": "push", "target": {"repository": "team/app", "digest": "sha256:aa"},
            "request": {"host": "r:5000"}}, {"action": "pull", "target": {"repository": "a", "tag": "1"}}]}"#;
        assert_eq!(image_of(blobs).unwrap(), None);
        assert_eq!(image_of(r#"{"events": []}"#).unwrap(), None);
    }

    #[test]
    fn reads_github_packages_published_event() {
        let with_url = r#"{"action": "published", "package": {"name": "app", "package_type": "CONTAINER",
            "owner": {"login": "team"},
            "package_version": {"package_url": "registry.example.com/team/app:1.6",
                                "container_metadata": {"tag": {"name": "1.6", "digest": "sha256:dd"}}},
            "registry": {"url": "https://registry.example.com"}}}"#;
        assert_eq!(
            image_of(with_url).unwrap().as_deref(),
            Some("registry.example.com/team/app:1.6")
        );
        let without_url = r#"{"action": "published", "package": {"name": "app", "owner": {"login": "team"},
            "package_version": {"container_metadata": {"tag": {"name": "1.7"}}},
            "registry": {"url": "https://registry.example.com/"}}}"#;
        assert_eq!(
            image_of(without_url).unwrap().as_deref(),
            Some("registry.example.com/team/app:1.7")
        );
        let nameless = r#"{"action": "published", "package": {"package_version": {}}}"#;
        assert!(image_of(nameless).is_err());
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
