//! Compose stacks: the order in which to re-create containers so that a service's
//! dependencies come first, as `docker compose up` starts them, and a redeploy that
//! follows it ([`recreate_in_order`]), shared by the `redeploy` and `updates` plugins.
//!
//! Compose v2 labels each container with its project (`com.docker.compose.project`), its
//! service (`com.docker.compose.service`) and what the service depends on
//! (`com.docker.compose.depends_on`: a comma-separated list of
//! `service:condition:restart` entries, or just `service`). The order:
//! - containers of one project are ordered by their services' dependencies (Kahn's
//!   topological sort; among services ready at the same time, by name); replicas of one
//!   service by container name;
//! - projects one after the other, by project name; containers outside any project last,
//!   by name;
//! - a dependency on a service that is not among the containers being ordered imposes
//!   nothing (it is not being re-created, so it keeps running);
//! - a dependency cycle cannot be ordered: that project's containers go in name order and
//!   a warning says which services form the cycle.

use std::collections::{BTreeMap, BTreeSet};

use crate::docker::{self, ContainerSummary, RecreateOptions, RecreateResult};
use crate::{Error, log};

/// The label holding a container's compose project.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// The label holding a container's compose service.
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
/// The label holding the services a container's service depends on.
pub const DEPENDS_ON_LABEL: &str = "com.docker.compose.depends_on";

/// An order to re-create containers in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Indices into the containers given, dependencies first.
    pub indices: Vec<usize>,
    /// What could not be ordered (a dependency cycle), one line each.
    pub warnings: Vec<String>,
}

/// The services a `com.docker.compose.depends_on` value names (`db:service_started:false,
/// cache` → `db`, `cache`).
pub fn depends_on(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|entry| entry.split(':').next())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The order in which to re-create `containers` (each a name and its labels): see the
/// module's documentation.
pub fn order(containers: &[(&str, &[(String, String)])]) -> Order {
    // project → service → container indices; and what each service depends on.
    let mut projects: BTreeMap<&str, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
    let mut deps: BTreeMap<(&str, &str), BTreeSet<String>> = BTreeMap::new();
    let mut loose = Vec::new();
    for (i, (_, labels)) in containers.iter().enumerate() {
        match (label(labels, PROJECT_LABEL), label(labels, SERVICE_LABEL)) {
            (Some(project), Some(service)) if !project.is_empty() && !service.is_empty() => {
                projects
                    .entry(project)
                    .or_default()
                    .entry(service)
                    .or_default()
                    .push(i);
                deps.entry((project, service)).or_default().extend(
                    label(labels, DEPENDS_ON_LABEL)
                        .map(depends_on)
                        .unwrap_or_default(),
                );
            }
            _ => loose.push(i),
        }
    }
    let by_name = |a: &usize, b: &usize| containers[*a].0.cmp(containers[*b].0);
    let mut order = Order {
        indices: Vec::with_capacity(containers.len()),
        warnings: Vec::new(),
    };
    for (project, services) in &projects {
        // Only dependencies among the services present count.
        let mut waiting_on: BTreeMap<&str, BTreeSet<&str>> = services
            .keys()
            .map(|s| {
                let present = deps[&(*project, *s)]
                    .iter()
                    .filter_map(|d| services.get_key_value(d.as_str()).map(|(k, _)| *k))
                    .filter(|d| d != s)
                    .collect();
                (*s, present)
            })
            .collect();
        let mut sorted = Vec::with_capacity(services.len());
        loop {
            let ready: Vec<&str> = waiting_on
                .iter()
                .filter(|(_, w)| w.is_empty())
                .map(|(s, _)| *s)
                .collect();
            if ready.is_empty() {
                break;
            }
            for s in ready {
                waiting_on.remove(s);
                for w in waiting_on.values_mut() {
                    w.remove(s);
                }
                sorted.push(s);
            }
        }
        let mut indices: Vec<usize> = if waiting_on.is_empty() {
            sorted
                .iter()
                .flat_map(|s| {
                    let mut replicas = services[s].clone();
                    replicas.sort_by(by_name);
                    replicas
                })
                .collect()
        } else {
            let cycle: Vec<&str> = waiting_on.keys().copied().collect();
            order.warnings.push(format!(
                "compose project {project}: services {} cannot be ordered, their dependencies form a cycle; the project's containers are re-created in name order",
                cycle.join(", ")
            ));
            let mut all: Vec<usize> = services.values().flatten().copied().collect();
            all.sort_by(by_name);
            all
        };
        order.indices.append(&mut indices);
    }
    loose.sort_by(by_name);
    order.indices.append(&mut loose);
    order
}

/// What became of one container of [`recreate_in_order`].
pub struct Recreated {
    /// The container's name when it was listed.
    pub name: String,
    pub result: Result<RecreateResult, Error>,
}

/// Re-creates `containers` of `device` with `options`, in compose dependency order
/// ([`order`]); a warning about the order is logged. One container failing does not stop
/// the others.
pub fn recreate_in_order(
    device: &str,
    containers: &[ContainerSummary],
    options: &RecreateOptions,
) -> Vec<Recreated> {
    let named: Vec<(&str, &[(String, String)])> = containers
        .iter()
        .map(|c| (c.name.as_str(), c.labels.as_slice()))
        .collect();
    let order = order(&named);
    for w in &order.warnings {
        log::warn(&format!("{device}: {w}"));
    }
    order
        .indices
        .into_iter()
        .map(|i| {
            let c = &containers[i];
            Recreated {
                name: c.name.clone(),
                result: docker::recreate_container(device, &c.id, options),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(project: &str, service: &str, depends: &str) -> Vec<(String, String)> {
        let mut l = vec![
            (PROJECT_LABEL.to_string(), project.to_string()),
            (SERVICE_LABEL.to_string(), service.to_string()),
        ];
        if !depends.is_empty() {
            l.push((DEPENDS_ON_LABEL.to_string(), depends.to_string()));
        }
        l
    }

    fn names(containers: &[(&str, Vec<(String, String)>)]) -> (Vec<String>, Vec<String>) {
        let refs: Vec<(&str, &[(String, String)])> =
            containers.iter().map(|(n, l)| (*n, l.as_slice())).collect();
        let o = order(&refs);
        (
            o.indices
                .iter()
                .map(|&i| containers[i].0.to_string())
                .collect(),
            o.warnings,
        )
    }

    #[test]
    fn reads_compose_v2_depends_on_labels() {
        assert_eq!(
            depends_on("db:service_healthy:false,cache:service_started:true"),
            vec!["db", "cache"]
        );
        assert_eq!(depends_on("db"), vec!["db"]);
        assert_eq!(depends_on(" db , api "), vec!["db", "api"]);
        assert!(depends_on("").is_empty());
    }

    #[test]
    fn puts_dependencies_first() {
        let (order, warnings) = names(&[
            ("p-web-1", labels("p", "web", "api:service_started:false")),
            ("p-api-1", labels("p", "api", "db:service_healthy:false")),
            ("p-db-1", labels("p", "db", "")),
        ]);
        assert_eq!(order, vec!["p-db-1", "p-api-1", "p-web-1"]);
        assert!(warnings.is_empty());
    }

    #[test]
    fn orders_replicas_projects_and_loose_containers_by_name() {
        let (order, _) = names(&[
            ("solo-b", vec![]),
            ("q-web-2", labels("q", "web", "db")),
            ("q-web-1", labels("q", "web", "db")),
            ("solo-a", vec![]),
            ("q-db-1", labels("q", "db", "")),
            ("p-app-1", labels("p", "app", "")),
            ("p-cache-1", labels("p", "cache", "")),
        ]);
        assert_eq!(
            order,
            vec![
                "p-app-1",
                "p-cache-1",
                "q-db-1",
                "q-web-1",
                "q-web-2",
                "solo-a",
                "solo-b"
            ]
        );
    }

    #[test]
    fn ignores_dependencies_on_services_not_being_recreated() {
        // `db` is not among them (another image, or out of scope): api and web still go
        // in their order.
        let (order, warnings) = names(&[
            ("p-web-1", labels("p", "web", "api,db")),
            ("p-api-1", labels("p", "api", "db")),
        ]);
        assert_eq!(order, vec!["p-api-1", "p-web-1"]);
        assert!(warnings.is_empty());
    }

    #[test]
    fn falls_back_to_name_order_with_a_warning_on_a_cycle() {
        let (order, warnings) = names(&[
            ("p-b-1", labels("p", "b", "a")),
            ("p-a-1", labels("p", "a", "b")),
            ("p-c-1", labels("p", "c", "")),
            ("other-x-1", labels("other", "x", "")),
        ]);
        assert_eq!(order, vec!["other-x-1", "p-a-1", "p-b-1", "p-c-1"]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("project p") && warnings[0].contains("a, b"),
            "{warnings:?}"
        );
        // A service naming itself is no cycle.
        let (order, warnings) = names(&[("p-a-1", labels("p", "a", "a"))]);
        assert_eq!(order, vec!["p-a-1"]);
        assert!(warnings.is_empty());
    }
}
