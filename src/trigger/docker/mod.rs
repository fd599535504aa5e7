//! Docker events as a trigger: `[[triggers.docker]]` runs a plugin when something
//! happens on a Docker host (`container:die`, `container:health_status: unhealthy`,
//! `image:pull`, …), instead of the plugin polling for it on cron.
//!
//! What lives where:
//! - here: the manifest section ([`DockerTriggerConfig`]), Docker's vocabulary of event
//!   types and actions ([`EVENT_TYPES`]) that event patterns are checked against at
//!   install, and a trigger compiled for matching ([`DockerTrigger`]);
//! - [`kind`]: the [`TriggerKind`](super::TriggerKind): install checks (the policy must
//!   allow `GET /events`), registration when a plugin is activated;
//! - [`watch`]: the engine's event streams, one per device that any plugin listens to,
//!   over the pooled Docker connections, with reconnection, resumption, debounce and
//!   the plugins' scopes applied to every event.
//!
//! The rules, written down once:
//! - A pattern is `type:action` as Docker writes it. `type:*` is every action of the
//!   type. An action Docker suffixes (`health_status: unhealthy`, `exec_start: sh -c …`)
//!   matches its bare name (`container:health_status` is every health change); for
//!   `health_status` a status may be named (`container:health_status: unhealthy`).
//! - A run's event is the last of the events for one object (Docker's actor id) that
//!   arrived within `debounce` after the first (default [`DEFAULT_DEBOUNCE`]); its
//!   `count` says how many were folded. The window is fixed from the first event, so a
//!   storm still gives one run per window. `debounce = "0s"` runs once per event.
//! - Events reach a plugin only from devices in both its trigger's `devices` and its
//!   policy's device scope, and container events only for containers in its policy's
//!   container scope (by the event's `name` attribute and the labels Docker puts among
//!   the attributes) that carry the trigger's `labels`. Another object's event that names
//!   a container only by its id (a network connect, a volume mount) reaches a plugin only
//!   when its policy has no container scope.

pub mod kind;
pub mod watch;

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units;
use crate::policy::{DeviceScope, LabelSelector};

pub use kind::DockerEvents;
pub use watch::{DockerWatchers, WatchedEvent};

/// The debounce window when a trigger sets none.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(5);
/// The longest debounce window accepted.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(3600);
/// The most event patterns one trigger may list.
pub const MAX_PATTERNS: usize = 64;

/// Docker's event types and the actions each emits (Docker Engine API, `GET /events`).
pub const EVENT_TYPES: &[(&str, &[&str])] = &[
    (
        "container",
        &[
            "attach",
            "commit",
            "copy",
            "create",
            "destroy",
            "detach",
            "die",
            "exec_create",
            "exec_detach",
            "exec_die",
            "exec_start",
            "export",
            "health_status",
            "kill",
            "oom",
            "pause",
            "rename",
            "resize",
            "restart",
            "start",
            "stop",
            "top",
            "unpause",
            "update",
            "prune",
        ],
    ),
    (
        "image",
        &[
            "create", "delete", "import", "load", "pull", "push", "save", "tag", "untag", "prune",
        ],
    ),
    (
        "volume",
        &["create", "mount", "unmount", "destroy", "prune"],
    ),
    (
        "network",
        &[
            "create",
            "connect",
            "disconnect",
            "destroy",
            "update",
            "remove",
            "prune",
        ],
    ),
    ("daemon", &["reload"]),
    ("plugin", &["install", "enable", "disable", "remove"]),
    ("service", &["create", "update", "remove"]),
    ("node", &["create", "update", "remove"]),
    ("secret", &["create", "update", "remove"]),
    ("config", &["create", "update", "remove"]),
    ("builder", &["prune"]),
];

/// The statuses a `health_status` event carries.
pub const HEALTH_STATUSES: &[&str] = &["starting", "healthy", "unhealthy"];

/// A Docker trigger as written in a plugin manifest (`[[triggers.docker]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerTriggerConfig {
    /// The events that run the plugin, `type:action` as Docker writes them:
    /// `container:die`, `container:oom`, `container:health_status: unhealthy`,
    /// `image:pull`, `network:*`, …
    pub events: Vec<String>,
    /// The devices to watch (names or globs), within the policy's device scope. Unset:
    /// every device the policy's scope allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Label selectors (`key` or `key=value`) the event's object must all carry, read
    /// from the event's attributes (Docker puts a container's labels there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Events for one object within this time after the first are folded into one run
    /// with a `count` (e.g. `"10s"`; `"0s"`: one run per event). Default 5 s.
    #[serde(
        default,
        with = "units::serde_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub debounce: Option<Duration>,
}

/// One event pattern, checked against [`EVENT_TYPES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPattern {
    kind: String,
    /// `None`: every action of the type.
    action: Option<String>,
    /// A `health_status` status, when named.
    status: Option<String>,
}

impl EventPattern {
    /// Parses `type:action`, `type:*` or `container:health_status: STATUS`.
    pub fn parse(text: &str) -> Result<EventPattern, String> {
        let types = || {
            EVENT_TYPES
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((kind, rest)) = text.split_once(':') else {
            return Err(format!(
                "`{text}` is not `type:action` (e.g. `container:die`); the types are {}",
                types()
            ));
        };
        let kind = kind.trim();
        let Some((_, actions)) = EVENT_TYPES.iter().find(|(t, _)| *t == kind) else {
            return Err(format!(
                "`{kind}` is not a Docker event type; the types are {}",
                types()
            ));
        };
        let (action, status) = match rest.split_once(':') {
            Some((a, s)) => (a.trim(), Some(s.trim())),
            None => (rest.trim(), None),
        };
        if action == "*" && status.is_none() {
            return Ok(EventPattern {
                kind: kind.to_string(),
                action: None,
                status: None,
            });
        }
        if !actions.contains(&action) {
            return Err(format!(
                "`{action}` is not an action of Docker's `{kind}` events; they are {} (or `*` for all)",
                actions.join(", ")
            ));
        }
        let status = match status {
            None => None,
            Some(s) if action == "health_status" && HEALTH_STATUSES.contains(&s) => {
                Some(s.to_string())
            }
            Some(s) if action == "health_status" => {
                return Err(format!(
                    "`{s}` is not a health status; write one of {}, or leave it out for every change",
                    HEALTH_STATUSES.join(", ")
                ));
            }
            Some(_) => {
                return Err(format!(
                    "only `container:health_status` takes a status after a second `:`; write `{kind}:{action}`"
                ));
            }
        };
        Ok(EventPattern {
            kind: kind.to_string(),
            action: Some(action.to_string()),
            status,
        })
    }

    /// The event type the pattern is about.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Whether Docker's event `kind` / `action` (as the daemon writes it) matches.
    pub fn matches(&self, kind: &str, action: &str) -> bool {
        if kind != self.kind {
            return false;
        }
        let Some(want) = &self.action else {
            return true;
        };
        let (base, suffix) = match action.split_once(':') {
            Some((b, s)) => (b.trim(), Some(s.trim())),
            None => (action.trim(), None),
        };
        base == want
            && match &self.status {
                None => true,
                Some(status) => suffix == Some(status.as_str()),
            }
    }
}

/// Why a `[[triggers.docker]]` entry is refused: the field (relative to the entry, as
/// `events[1]`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// A Docker trigger checked and ready for matching.
#[derive(Debug, Clone)]
pub struct DockerTrigger {
    patterns: Vec<EventPattern>,
    /// `None`: every device of the policy's scope.
    devices: Option<DeviceScope>,
    labels: Vec<LabelSelector>,
    debounce: Duration,
}

impl DockerTrigger {
    /// Checks a manifest entry.
    pub fn from_config(c: &DockerTriggerConfig) -> Result<DockerTrigger, ConfigError> {
        let err = |field: String, message: String| ConfigError { field, message };
        if c.events.is_empty() {
            return Err(err(
                "events".into(),
                "lists no event: name at least one, e.g. `container:die`".into(),
            ));
        }
        if c.events.len() > MAX_PATTERNS {
            return Err(err(
                "events".into(),
                format!("lists {} events; at most {MAX_PATTERNS}", c.events.len()),
            ));
        }
        let patterns = c
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| EventPattern::parse(e).map_err(|m| err(format!("events[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let devices = match &c.devices {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(err(
                    "devices".into(),
                    "lists no device: leave it out to watch every device the policy allows".into(),
                ));
            }
            Some(list) => {
                for (i, d) in list.iter().enumerate() {
                    DeviceScope::new([d])
                        .map_err(|e| err(format!("devices[{i}]"), e.to_string()))?;
                }
                Some(DeviceScope::new(list).map_err(|e| err("devices".into(), e.to_string()))?)
            }
        };
        let labels = c
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.parse::<LabelSelector>()
                    .map_err(|e| err(format!("labels[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let debounce = c.debounce.unwrap_or(DEFAULT_DEBOUNCE);
        if debounce > MAX_DEBOUNCE {
            return Err(err(
                "debounce".into(),
                format!(
                    "{} is longer than the most accepted, {}",
                    units::format_duration(debounce),
                    units::format_duration(MAX_DEBOUNCE)
                ),
            ));
        }
        Ok(DockerTrigger {
            patterns,
            devices,
            labels,
            debounce,
        })
    }

    pub fn debounce(&self) -> Duration {
        self.debounce
    }

    /// Whether `device` is watched for this trigger (its own list; the policy's scope is
    /// applied by the caller).
    pub fn watches(&self, device: &str) -> bool {
        self.devices.as_ref().is_none_or(|d| d.allows(device))
    }

    /// Whether an event of `kind`/`action` whose object has `attributes` matches.
    pub fn matches(&self, kind: &str, action: &str, attributes: &HashMap<String, String>) -> bool {
        self.patterns.iter().any(|p| p.matches(kind, action))
            && self.labels.iter().all(|l| l.matches(attributes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(events: &[&str]) -> DockerTriggerConfig {
        DockerTriggerConfig {
            events: events.iter().map(|s| s.to_string()).collect(),
            devices: None,
            labels: Vec::new(),
            debounce: None,
        }
    }

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patterns_match_docker_actions_with_and_without_their_suffix() {
        let p = |s: &str| EventPattern::parse(s).unwrap();
        assert!(p("container:die").matches("container", "die"));
        assert!(!p("container:die").matches("image", "die"));
        assert!(!p("container:die").matches("container", "start"));
        assert!(p("container:health_status").matches("container", "health_status: unhealthy"));
        assert!(
            p("container:health_status: unhealthy")
                .matches("container", "health_status: unhealthy")
        );
        assert!(
            !p("container:health_status: unhealthy").matches("container", "health_status: healthy")
        );
        assert!(p("container:exec_start").matches("container", "exec_start: sh -c true"));
        assert!(p("network:*").matches("network", "connect"));
        assert!(!p("network:*").matches("container", "connect"));
        assert!(p(" image : pull ").matches("image", "pull"));
    }

    #[test]
    fn refuses_unknown_types_actions_and_statuses_listing_what_exists() {
        let e = EventPattern::parse("container:dye").unwrap_err();
        assert!(e.contains("`dye`") && e.contains("die"), "{e}");
        let e = EventPattern::parse("contianer:die").unwrap_err();
        assert!(e.contains("contianer") && e.contains("container"), "{e}");
        let e = EventPattern::parse("die").unwrap_err();
        assert!(e.contains("type:action"), "{e}");
        let e = EventPattern::parse("container:health_status: sick").unwrap_err();
        assert!(e.contains("unhealthy"), "{e}");
        let e = EventPattern::parse("container:die: 137").unwrap_err();
        assert!(e.contains("health_status"), "{e}");
    }

    #[test]
    fn an_invalid_entry_names_the_field_inside_it() {
        let e = DockerTrigger::from_config(&config(&["container:die", "container:explode"]))
            .unwrap_err();
        assert_eq!(e.field, "events[1]");
        let e = DockerTrigger::from_config(&config(&[])).unwrap_err();
        assert_eq!(e.field, "events");
        let mut c = config(&["container:die"]);
        c.labels = vec!["=x".into()];
        assert_eq!(
            DockerTrigger::from_config(&c).unwrap_err().field,
            "labels[0]"
        );
        let mut c = config(&["container:die"]);
        c.devices = Some(vec!["ok".into(), "bad name".into()]);
        assert_eq!(
            DockerTrigger::from_config(&c).unwrap_err().field,
            "devices[1]"
        );
        let mut c = config(&["container:die"]);
        c.debounce = Some(Duration::from_secs(7200));
        assert_eq!(
            DockerTrigger::from_config(&c).unwrap_err().field,
            "debounce"
        );
    }

    #[test]
    fn label_filters_and_device_lists_narrow_what_matches() {
        let mut c = config(&["container:die"]);
        c.labels = vec!["tier=web".into(), "team".into()];
        c.devices = Some(vec!["prod-*".into()]);
        let t = DockerTrigger::from_config(&c).unwrap();
        assert_eq!(t.debounce(), DEFAULT_DEBOUNCE);
        assert!(t.matches(
            "container",
            "die",
            &attrs(&[("tier", "web"), ("team", "a")])
        ));
        assert!(!t.matches("container", "die", &attrs(&[("tier", "db"), ("team", "a")])));
        assert!(!t.matches("container", "die", &attrs(&[("tier", "web")])));
        assert!(t.watches("prod-1") && !t.watches("local"));
        assert!(
            DockerTrigger::from_config(&config(&["container:die"]))
                .unwrap()
                .watches("anything")
        );
    }
}
