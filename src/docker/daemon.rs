//! The daemon's view for scope checks: which container an ID or name is, and which
//! containers a listing may show.
//!
//! A request names a container by ID, ID prefix or name; the scope speaks of names and
//! labels. Only the daemon knows which container a reference means, so the check asks it
//! (`GET /containers/{ref}/json`) and judges the answer's own name and labels. The proxy
//! and the plugin host functions both call [`check_named`] and filter listings with
//! [`filter_container_list`] / [`filter_network_containers`], so the two paths cannot
//! drift.

use std::collections::HashSet;

use http_body_util::{BodyExt, Limited};
use hyper::{Request, StatusCode, header};
use serde_json::Value;

use crate::docker::{DockerClient, empty_body};
use crate::policy::ContainerScope;
use crate::policy::body::NamedContainer;

/// The most of a daemon answer read for a scope check or a filtered listing.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// A container reference outside the scope, or one that cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeRefusal {
    /// The container is outside the scope.
    #[error("container {name} ({field}) is outside the policy's container scope ({selectors})")]
    Outside {
        /// Its own name.
        name: String,
        /// Where the request named it.
        field: String,
        /// The scope's selectors.
        selectors: String,
    },
    /// No such container.
    #[error("container {reference:?} ({field}) does not exist (or is out of scope)")]
    NotFound {
        /// The reference as written.
        reference: String,
        /// Where the request named it.
        field: String,
    },
    /// The daemon could not be asked.
    #[error("cannot check container {reference:?} against the scope: {why}")]
    Unchecked {
        /// The reference as written.
        reference: String,
        /// What failed.
        why: String,
    },
}

/// Sends a GET and reads its JSON answer (at most [`MAX_ANSWER`] bytes); `Ok(None)` on
/// 404.
async fn get_json(client: &DockerClient, path: &str) -> Result<Option<Value>, String> {
    let req = Request::get(path)
        .header(header::HOST, "docker")
        .body(empty_body())
        .map_err(|e| e.to_string())?;
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("cannot read the daemon's answer to GET {path}: {e}"))?
        .to_bytes();
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("the daemon answered {status} to GET {path}"));
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| format!("unreadable answer to GET {path}: {e}"))
}

/// The container's inspect output, `Ok(None)` when there is none.
pub async fn inspect(client: &DockerClient, reference: &str) -> Result<Option<Value>, String> {
    get_json(
        client,
        &format!("/containers/{}/json", encode_segment(reference)),
    )
    .await
}

/// Checks every named container against `scope`, asking the daemon which container each
/// reference is. Nothing to do when the scope holds every container.
pub async fn check_named(
    client: &DockerClient,
    scope: &ContainerScope,
    named: &[NamedContainer],
) -> Result<(), ScopeRefusal> {
    if scope.is_all() {
        return Ok(());
    }
    for c in named {
        let details = inspect(client, &c.reference)
            .await
            .map_err(|why| ScopeRefusal::Unchecked {
                reference: c.reference.clone(),
                why,
            })?
            .ok_or_else(|| ScopeRefusal::NotFound {
                reference: c.reference.clone(),
                field: c.field.clone(),
            })?;
        judge(scope, &details, &c.field)?;
    }
    Ok(())
}

/// Whether the container of `details` (inspect output) is in scope, as a refusal.
pub fn judge(scope: &ContainerScope, details: &Value, field: &str) -> Result<(), ScopeRefusal> {
    if scope.admits_details(details) {
        Ok(())
    } else {
        Err(ScopeRefusal::Outside {
            name: details["Name"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            field: field.to_string(),
            selectors: scope.describe(),
        })
    }
}

/// The IDs of every container (running or not) in scope.
pub async fn ids_in_scope(
    client: &DockerClient,
    scope: &ContainerScope,
) -> Result<HashSet<String>, String> {
    let list = get_json(client, "/containers/json?all=1")
        .await?
        .unwrap_or(Value::Null);
    Ok(list
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| scope.admits_summary(c))
                .filter_map(|c| c["Id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// `GET /containers/json`'s answer with only the containers in scope.
pub fn filter_container_list(scope: &ContainerScope, list: &mut Value) {
    if let Some(a) = list.as_array_mut() {
        a.retain(|c| scope.admits_summary(c));
    }
}

/// A network's (or a network list's) `Containers`, keyed by container ID, with only the
/// IDs in `allowed`.
pub fn filter_network_containers(network: &mut Value, allowed: &HashSet<String>) {
    let one = |n: &mut Value| {
        if let Some(m) = n.get_mut("Containers").and_then(Value::as_object_mut) {
            m.retain(|id, _| allowed.contains(id));
        }
    };
    match network {
        Value::Array(a) => a.iter_mut().for_each(one),
        n => one(n),
    }
}

/// Percent-encodes a path segment (container names are `[a-zA-Z0-9_.-]`, IDs hex; this
/// only guards against anything else).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listings_keep_only_containers_in_scope_by_their_own_name() {
        let scope = ContainerScope::new([""; 0], ["rt-in-*"]).unwrap();
        let mut list = json!([
            {"Id": "1", "Names": ["/rt-in-1"], "Labels": {}},
            {"Id": "2", "Names": ["/rt-out", "/rt-in-1/db"], "Labels": {}},
        ]);
        filter_container_list(&scope, &mut list);
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["Id"], "1");
    }

    #[test]
    fn network_containers_keep_only_allowed_ids() {
        let allowed: HashSet<String> = ["a".to_string()].into();
        let mut net = json!({"Name": "bridge", "Containers": {"a": {"Name": "rt-in"}, "b": {"Name": "rt-out"}}});
        filter_network_containers(&mut net, &allowed);
        assert_eq!(net["Containers"].as_object().unwrap().len(), 1);
        let mut nets = json!([{"Containers": {"b": {}}}, {"Containers": null}]);
        filter_network_containers(&mut nets, &allowed);
        assert!(nets[0]["Containers"].as_object().unwrap().is_empty());
    }

    #[test]
    fn refusals_name_the_container_the_field_and_the_scope() {
        let scope = ContainerScope::new([""; 0], ["rt-in-*"]).unwrap();
        let e = judge(
            &scope,
            &json!({"Name": "/rt-out", "Config": {"Labels": {}}}),
            "HostConfig.VolumesFrom",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "container rt-out (HostConfig.VolumesFrom) is outside the policy's container scope (name rt-in-*)"
        );
    }
}
