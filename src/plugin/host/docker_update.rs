//! `check-image-update`'s reading of the daemon's answers, kept apart from the requests
//! so it can be tested without a daemon: which digests a local image was pulled by in a
//! tag's repository (`RepoDigests`), what the registry serves for the tag now
//! (`GET /distribution/{name}/json`), and the verdict.

use serde_json::Value;

use super::docker_api::split_reference;
use crate::plugin::bindings::wit_docker::{ImageUpdate, UpdateStatus};

/// `docker.io/library/app` → `app`: the repository as Docker's short form writes it
/// (`RepoDigests` use that form for Docker Hub's images).
pub fn short_repository(reference: &str) -> String {
    let (repo, _) = split_reference(reference);
    let repo = repo.strip_prefix("docker.io/").unwrap_or(&repo);
    repo.strip_prefix("library/").unwrap_or(repo).to_string()
}

/// What a reference lets the check follow: a tag of a repository, or why not.
pub fn followed_tag(reference: &str) -> Result<String, String> {
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    if reference.starts_with("sha256:")
        || (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(format!(
            "`{reference}` is an image ID, not a tag: there is no tag to follow"
        ));
    }
    if reference.contains('@') {
        return Err(format!(
            "`{reference}` is pinned to a digest: there is no tag to follow"
        ));
    }
    let (name, tag) = split_reference(reference);
    Ok(format!("{name}:{tag}"))
}

/// The digests (`sha256:…`) in an image inspect's `RepoDigests` that belong to the
/// repository of `reference`, sorted and without repeats.
pub fn local_digests(image: &Value, reference: &str) -> Vec<String> {
    let repo = short_repository(reference);
    let mut out: Vec<String> = image["RepoDigests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|d| d.split_once('@'))
        .filter(|(name, _)| short_repository(name) == repo)
        .map(|(_, digest)| digest.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The digest in the daemon's answer to `GET /distribution/{name}/json`
/// (`{"Descriptor": {"digest": "sha256:…", …}, "Platforms": […]}`).
pub fn remote_digest(answer: &Value) -> Option<String> {
    answer["Descriptor"]["digest"]
        .as_str()
        .filter(|d| d.starts_with("sha256:") && d.len() > 7)
        .map(str::to_string)
}

/// Why the registry's digest could not be read, from the daemon's error answer to
/// `GET /distribution/{name}/json`.
pub fn registry_failure(status: u16, message: &str, tag: &str) -> String {
    match status {
        404 => format!("the registry has no tag {tag} ({message})"),
        401 | 403 => format!(
            "the registry refused to tell the digest of {tag} ({message}); registry credentials are not passed (yet): only anonymous access works"
        ),
        _ => format!("the registry of {tag} could not be asked ({message})"),
    }
}

/// The verdict: `remote` is the registry's digest, or why it could not be read.
pub fn verdict(
    image: String,
    image_id: String,
    local: Vec<String>,
    remote: Result<String, String>,
) -> ImageUpdate {
    let (remote_digest, status) = match remote {
        Err(why) => (None, UpdateStatus::Unknown(why)),
        Ok(digest) => {
            let status = if local.is_empty() {
                UpdateStatus::Unknown(format!(
                    "the local image {} has no digest in the repository of {image}: it was built or tagged locally, never pulled or pushed, so it cannot be compared with the registry's",
                    short_id(&image_id)
                ))
            } else if local.contains(&digest) {
                UpdateStatus::UpToDate
            } else {
                UpdateStatus::Available
            };
            (Some(digest), status)
        }
    };
    ImageUpdate {
        image,
        image_id,
        local_digests: local,
        remote_digest,
        status,
    }
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D1: &str = "sha256:3b51dd8415686d23744f5e5e48c3e33845fb67360abe19e1939f0462fea34852";
    const D2: &str = "sha256:0d1f0c6f7b3bd0a5d7c1f4d02a7b6e1c7b38cb2c2b0c2a8f2b6f8f7d3c1a2b3c";

    #[test]
    fn reads_the_registrys_digest_from_the_distribution_answer() {
        // As dockerd 20.10 answers for a registry on loopback.
        let answer = json!({
            "Descriptor": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": D1, "size": 943},
            "Platforms": [{"architecture": "amd64", "os": "linux"}]
        });
        assert_eq!(remote_digest(&answer).as_deref(), Some(D1));
        assert_eq!(remote_digest(&json!({"Descriptor": {}})), None);
        assert_eq!(
            remote_digest(&json!({"Descriptor": {"digest": "md5:x"}})),
            None
        );
        assert_eq!(remote_digest(&Value::Null), None);
    }

    #[test]
    fn keeps_only_the_digests_of_the_tags_repository() {
        let image = json!({"RepoDigests": [
            format!("127.0.0.1:5000/team/app@{D1}"),
            format!("127.0.0.1:5000/team/other@{D2}"),
            format!("127.0.0.1:5000/team/app@{D1}"),
            format!("nginx@{D2}"),
        ]});
        assert_eq!(local_digests(&image, "127.0.0.1:5000/team/app:1"), vec![D1]);
        // Docker Hub's images are listed in the short form, however the tag is written.
        assert_eq!(
            local_digests(&image, "docker.io/library/nginx:1.27"),
            vec![D2]
        );
        assert_eq!(local_digests(&image, "nginx"), vec![D2]);
        assert!(local_digests(&image, "team/app:1").is_empty());
        assert!(local_digests(&json!({"RepoDigests": null}), "app").is_empty());
        assert!(local_digests(&json!({}), "app").is_empty());
    }

    #[test]
    fn follows_tags_but_not_digests_or_ids() {
        assert_eq!(followed_tag("nginx").unwrap(), "nginx:latest");
        assert_eq!(
            followed_tag("127.0.0.1:5000/team/app:1").unwrap(),
            "127.0.0.1:5000/team/app:1"
        );
        assert!(
            followed_tag(&format!("app@{D1}"))
                .unwrap_err()
                .contains("pinned")
        );
        assert!(followed_tag(D1).unwrap_err().contains("image ID"));
        assert!(followed_tag(&D1[7..]).unwrap_err().contains("image ID"));
    }

    #[test]
    fn decides_up_to_date_available_or_unknown() {
        let check = |local: &[&str], remote: Result<&str, &str>| {
            verdict(
                "r/app:1".into(),
                D2.into(),
                local.iter().map(|s| s.to_string()).collect(),
                remote.map(str::to_string).map_err(str::to_string),
            )
        };
        assert!(matches!(
            check(&[D1], Ok(D1)).status,
            UpdateStatus::UpToDate
        ));
        let available = check(&[D1], Ok(D2));
        assert!(matches!(available.status, UpdateStatus::Available));
        assert_eq!(available.remote_digest.as_deref(), Some(D2));
        assert_eq!(available.local_digests, vec![D1]);
        // Pulled by one of several digests (a tag pushed twice with the same content).
        assert!(matches!(
            check(&[D2, D1], Ok(D1)).status,
            UpdateStatus::UpToDate
        ));
        match check(&[], Ok(D1)).status {
            UpdateStatus::Unknown(why) => assert!(why.contains("built or tagged locally"), "{why}"),
            other => panic!("{other:?}"),
        }
        let unreachable = check(&[D1], Err("the registry could not be asked"));
        assert_eq!(unreachable.remote_digest, None);
        assert!(matches!(unreachable.status, UpdateStatus::Unknown(_)));
    }

    #[test]
    fn says_why_the_registry_gave_no_digest() {
        assert!(
            registry_failure(404, "manifest unknown", "r/app:9").contains("has no tag r/app:9")
        );
        assert!(registry_failure(401, "unauthorized", "r/app:1").contains("credentials"));
        assert!(
            registry_failure(500, "dial tcp 127.0.0.1:1: connection refused", "x/y:1")
                .contains("could not be asked (dial tcp")
        );
    }
}
