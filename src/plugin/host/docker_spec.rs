//! What the `docker` write operations send: the create body a `container-spec` becomes,
//! and the prune filters, both checked here so a bad argument is `invalid` before any
//! request is decided or sent.
//!
//! The create body is then judged exactly as a proxied `POST /containers/create` is (the
//! create guard, the containers it names, the new container's place in the scope):
//! building it is this module's job, judging it is the policy's.

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::HostError;
use super::docker_api::{container_ref, image_ref};
use crate::plugin::bindings::wit_docker::{ContainerSpec, Mount, PortBinding, PruneFilter};
use crate::policy::LabelSelector;

/// A JSON object, as the create body's parts are built.
type Object = Map<String, Value>;

/// The body of `POST /containers/create` for `spec`.
pub fn create_body(spec: &ContainerSpec) -> Result<Value, HostError> {
    let mut body = Map::new();
    body.insert("Image".into(), json!(image_ref(&spec.image)?));
    if !spec.command.is_empty() {
        body.insert("Cmd".into(), json!(spec.command));
    }
    if let Some(entrypoint) = &spec.entrypoint {
        body.insert("Entrypoint".into(), json!(entrypoint));
    }
    for e in &spec.env {
        if e.is_empty() || e.starts_with('=') || e.contains('\0') {
            return Err(HostError::invalid(format!(
                "env entry `{e}` is not KEY=VALUE"
            )));
        }
    }
    if !spec.env.is_empty() {
        body.insert("Env".into(), json!(spec.env));
    }
    let mut labels = Map::new();
    for (k, v) in &spec.labels {
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(HostError::invalid(format!("label `{k}` is not a label")));
        }
        if labels.insert(k.clone(), json!(v)).is_some() {
            return Err(HostError::invalid(format!("label `{k}` is given twice")));
        }
    }
    if !labels.is_empty() {
        body.insert("Labels".into(), Value::Object(labels));
    }
    for (key, value) in [
        ("User", &spec.user),
        ("WorkingDir", &spec.working_dir),
        ("Hostname", &spec.hostname),
    ] {
        if let Some(v) = value {
            if v.is_empty() || v.contains('\0') {
                return Err(HostError::invalid(format!(
                    "{key} `{v}` is empty or not text"
                )));
            }
            body.insert(key.into(), json!(v));
        }
    }

    let mut host = Map::new();
    let (exposed, bindings) = ports(&spec.ports)?;
    if !exposed.is_empty() {
        body.insert("ExposedPorts".into(), Value::Object(exposed));
        host.insert("PortBindings".into(), Value::Object(bindings));
    }
    if !spec.mounts.is_empty() {
        let mounts = spec
            .mounts
            .iter()
            .map(mount)
            .collect::<Result<Vec<_>, _>>()?;
        host.insert("Mounts".into(), json!(mounts));
    }
    if let Some(policy) = &spec.restart_policy {
        host.insert("RestartPolicy".into(), restart_policy(policy)?);
    }
    if let Some(m) = spec.memory_bytes {
        if m == 0 || m > i64::MAX as u64 {
            return Err(HostError::invalid("memory-bytes must be above 0"));
        }
        host.insert("Memory".into(), json!(m));
    }
    if let Some(cpus) = spec.cpus {
        if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
            return Err(HostError::invalid(format!(
                "cpus {cpus} is not a CPU count above 0"
            )));
        }
        host.insert("NanoCpus".into(), json!((cpus * 1e9).round() as i64));
    }
    for (key, caps) in [("CapAdd", &spec.cap_add), ("CapDrop", &spec.cap_drop)] {
        for cap in caps {
            let name = cap.strip_prefix("CAP_").unwrap_or(cap);
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(HostError::invalid(format!(
                    "`{cap}` is not a capability name"
                )));
            }
        }
        if !caps.is_empty() {
            host.insert(key.into(), json!(caps));
        }
    }
    if spec.read_only_rootfs {
        host.insert("ReadonlyRootfs".into(), json!(true));
    }
    if spec.privileged {
        host.insert("Privileged".into(), json!(true));
    }
    if let Some(network) = &spec.network {
        network_mode(network)?;
        host.insert("NetworkMode".into(), json!(network));
        if !spec.network_aliases.is_empty() {
            if matches!(network.as_str(), "bridge" | "default" | "host" | "none")
                || network.starts_with("container:")
            {
                return Err(HostError::invalid(format!(
                    "network aliases need a network of your own, not `{network}`"
                )));
            }
            for a in &spec.network_aliases {
                container_ref(a)
                    .map_err(|_| HostError::invalid(format!("`{a}` is not a network alias")))?;
            }
            body.insert(
                "NetworkingConfig".into(),
                json!({"EndpointsConfig": {network.as_str(): {"Aliases": spec.network_aliases}}}),
            );
        }
    } else if !spec.network_aliases.is_empty() {
        return Err(HostError::invalid(
            "network aliases need a network (set `network`)",
        ));
    }
    if !host.is_empty() {
        body.insert("HostConfig".into(), Value::Object(host));
    }
    Ok(Value::Object(body))
}

/// `ExposedPorts` and `HostConfig.PortBindings`.
fn ports(ports: &[PortBinding]) -> Result<(Object, Object), HostError> {
    let (mut exposed, mut bindings) = (Map::new(), Map::new());
    for p in ports {
        let protocol = if p.protocol.is_empty() {
            "tcp"
        } else {
            p.protocol.as_str()
        };
        if !matches!(protocol, "tcp" | "udp" | "sctp") {
            return Err(HostError::invalid(format!(
                "port protocol `{protocol}` is not tcp, udp or sctp"
            )));
        }
        if p.container_port == 0 {
            return Err(HostError::invalid("container-port 0 is not a port"));
        }
        if let Some(ip) = &p.host_ip
            && ip.parse::<IpAddr>().is_err()
        {
            return Err(HostError::invalid(format!(
                "host-ip `{ip}` is not an IP address"
            )));
        }
        let key = format!("{}/{protocol}", p.container_port);
        exposed.insert(key.clone(), json!({}));
        let binding = json!({
            "HostIp": p.host_ip.clone().unwrap_or_default(),
            "HostPort": p.host_port.map(|h| h.to_string()).unwrap_or_default(),
        });
        match bindings.entry(key).or_insert_with(|| json!([])) {
            Value::Array(list) => list.push(binding),
            _ => unreachable!("port bindings are arrays"),
        }
    }
    Ok((exposed, bindings))
}

/// One entry of `HostConfig.Mounts`.
fn mount(m: &Mount) -> Result<Value, HostError> {
    if !m.target.starts_with('/') || m.target.contains('\0') {
        return Err(HostError::invalid(format!(
            "mount target `{}` is not an absolute path",
            m.target
        )));
    }
    let kind = match m.kind.as_str() {
        "bind" => {
            if !m.source.starts_with('/') || m.source.contains('\0') {
                return Err(HostError::invalid(format!(
                    "bind source `{}` is not an absolute host path",
                    m.source
                )));
            }
            "bind"
        }
        "volume" => {
            container_ref(&m.source)
                .map_err(|_| HostError::invalid(format!("`{}` is not a volume name", m.source)))?;
            "volume"
        }
        "tmpfs" => {
            if !m.source.is_empty() {
                return Err(HostError::invalid("a tmpfs mount has no source"));
            }
            "tmpfs"
        }
        other => {
            return Err(HostError::invalid(format!(
                "mount kind `{other}` is not bind, volume or tmpfs"
            )));
        }
    };
    let mut v = json!({"Type": kind, "Target": m.target, "ReadOnly": m.read_only});
    if kind != "tmpfs" {
        v["Source"] = json!(m.source);
    }
    Ok(v)
}

/// `no`, `always`, `unless-stopped`, `on-failure`, `on-failure:N`.
fn restart_policy(text: &str) -> Result<Value, HostError> {
    let (name, count) = match text.split_once(':') {
        Some(("on-failure", n)) => (
            "on-failure",
            n.parse::<u32>().map_err(|_| {
                HostError::invalid(format!("`{text}`: the retry count is not a number"))
            })?,
        ),
        _ => (text, 0),
    };
    if !matches!(name, "no" | "always" | "unless-stopped" | "on-failure") {
        return Err(HostError::invalid(format!(
            "restart policy `{text}` is not no, always, unless-stopped or on-failure[:N]"
        )));
    }
    Ok(json!({"Name": name, "MaximumRetryCount": count}))
}

/// A network name, `bridge`, `host`, `none` or `container:NAME`.
fn network_mode(text: &str) -> Result<(), HostError> {
    let name = text.strip_prefix("container:").unwrap_or(text);
    container_ref(name)
        .map(|_| ())
        .map_err(|_| HostError::invalid(format!("`{text}` is not a network")))
}

/// A prune filter, checked: `until` as a cut-off time, the label selectors parsed.
pub struct Prune {
    /// Unix seconds: only what was created before it.
    pub cutoff: Option<f64>,
    pub labels: Vec<LabelSelector>,
    pub not_labels: Vec<LabelSelector>,
}

impl Prune {
    /// Checks `filter`, reading a relative `until` back from `now` (Unix seconds).
    pub fn parse(filter: &PruneFilter, now: f64) -> Result<Prune, HostError> {
        let cutoff = filter.until.as_deref().map(|u| until(u, now)).transpose()?;
        let selectors = |list: &[String], what: &str| {
            list.iter()
                .map(|l| {
                    if l.contains('\0') {
                        return Err(HostError::invalid(format!(
                            "{what} `{l}` is not a label selector"
                        )));
                    }
                    l.parse::<LabelSelector>()
                        .map_err(|e| HostError::invalid(format!("{what} `{l}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Prune {
            cutoff,
            labels: selectors(&filter.labels, "labels")?,
            not_labels: selectors(&filter.not_labels, "not-labels")?,
        })
    }

    /// Whether something created at `created` (Unix seconds) with `labels` matches, as
    /// the daemon's prune judges it: created before the cut-off, every `label`
    /// matching, and not every `label!` matching.
    pub fn matches(&self, created: f64, labels: &HashMap<String, String>) -> bool {
        self.cutoff.is_none_or(|c| created < c)
            && self.labels.iter().all(|l| l.matches(labels))
            && (self.not_labels.is_empty() || !self.not_labels.iter().all(|l| l.matches(labels)))
    }
}

/// The Engine API's `filters` object for `filter` (already checked by [`Prune::parse`]),
/// with `extra` entries.
pub fn filters_json(filter: &PruneFilter, extra: &[(&str, Vec<String>)]) -> Value {
    let mut f = Map::new();
    for (k, v) in extra {
        f.insert((*k).into(), json!(v));
    }
    if let Some(u) = &filter.until {
        f.insert("until".into(), json!([u]));
    }
    if !filter.labels.is_empty() {
        f.insert("label".into(), json!(filter.labels));
    }
    if !filter.not_labels.is_empty() {
        f.insert("label!".into(), json!(filter.not_labels));
    }
    Value::Object(f)
}

/// `until` as Unix seconds: a Go duration back from `now` (`24h`, `1h30m`, `1.5h`), Unix
/// seconds (`1700000000`, `1700000000.5`) or an RFC 3339 time — the forms the daemon
/// reads too, so the same text may be passed on to it.
fn until(text: &str, now: f64) -> Result<f64, HostError> {
    let bad = || {
        HostError::invalid(format!(
            "until `{text}` is not a duration (24h, 90m, 1h30m), Unix seconds or an RFC 3339 time"
        ))
    };
    if text.is_empty() || text.len() > 64 {
        return Err(bad());
    }
    if let Some(secs) = go_duration(text) {
        return Ok(now - secs);
    }
    if text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return text.parse::<f64>().map_err(|_| bad());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .map_err(|_| bad())
}

/// A Go duration (`300ms`, `1.5h`, `2h45m`) in seconds; `None` when `text` is not one.
/// A bare number is not a duration (it is a Unix time).
fn go_duration(text: &str) -> Option<f64> {
    let mut rest = text;
    let mut total = 0.0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += value * scale;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str) -> ContainerSpec {
        ContainerSpec {
            image: image.into(),
            command: vec![],
            entrypoint: None,
            env: vec![],
            labels: vec![],
            ports: vec![],
            mounts: vec![],
            restart_policy: None,
            network: None,
            network_aliases: vec![],
            user: None,
            working_dir: None,
            hostname: None,
            memory_bytes: None,
            cpus: None,
            cap_add: vec![],
            cap_drop: vec![],
            read_only_rootfs: false,
            privileged: false,
        }
    }

    #[test]
    fn a_spec_becomes_the_engine_apis_create_body() {
        let mut s = spec("app:1");
        s.command = vec!["serve".into()];
        s.env = vec!["A=1".into()];
        s.labels = vec![("tier".into(), "web".into())];
        s.ports = vec![PortBinding {
            container_port: 80,
            protocol: String::new(),
            host_port: Some(8080),
            host_ip: Some("127.0.0.1".into()),
        }];
        s.mounts = vec![Mount {
            kind: "bind".into(),
            source: "/srv/app".into(),
            target: "/data".into(),
            read_only: true,
        }];
        s.restart_policy = Some("on-failure:3".into());
        s.network = Some("backend".into());
        s.network_aliases = vec!["web".into()];
        s.cpus = Some(0.5);
        let b = create_body(&s).unwrap();
        assert_eq!(b["Image"], "app:1");
        assert_eq!(b["Cmd"], json!(["serve"]));
        assert_eq!(b["Labels"]["tier"], "web");
        assert_eq!(b["ExposedPorts"], json!({"80/tcp": {}}));
        let hc = &b["HostConfig"];
        assert_eq!(
            hc["PortBindings"]["80/tcp"],
            json!([{"HostIp": "127.0.0.1", "HostPort": "8080"}])
        );
        assert_eq!(hc["Mounts"][0]["Type"], "bind");
        assert_eq!(hc["Mounts"][0]["Source"], "/srv/app");
        assert_eq!(
            hc["RestartPolicy"],
            json!({"Name": "on-failure", "MaximumRetryCount": 3})
        );
        assert_eq!(hc["NanoCpus"], 500_000_000);
        assert_eq!(hc["NetworkMode"], "backend");
        assert_eq!(
            b["NetworkingConfig"]["EndpointsConfig"]["backend"]["Aliases"],
            json!(["web"])
        );
        assert_eq!(
            create_body(&spec("busybox")).unwrap(),
            json!({"Image": "busybox"})
        );
    }

    #[test]
    fn refuses_specs_docker_would_misread() {
        for broken in [
            {
                let mut s = spec("app");
                s.restart_policy = Some("sometimes".into());
                s
            },
            {
                let mut s = spec("app");
                s.mounts = vec![Mount {
                    kind: "bind".into(),
                    source: "relative".into(),
                    target: "/x".into(),
                    read_only: false,
                }];
                s
            },
            {
                let mut s = spec("app");
                s.network_aliases = vec!["a".into()];
                s
            },
            {
                let mut s = spec("app");
                s.labels = vec![("a".into(), "1".into()), ("a".into(), "2".into())];
                s
            },
            spec("a b"),
        ] {
            assert!(
                matches!(
                    create_body(&broken),
                    Err(HostError::Wit(crate::plugin::bindings::WitError::Invalid(
                        _
                    )))
                ),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn reads_until_as_the_daemon_does() {
        let now = 1_000_000.0;
        assert_eq!(until("24h", now).unwrap(), now - 86_400.0);
        assert_eq!(until("1h30m", now).unwrap(), now - 5_400.0);
        assert_eq!(until("1.5h", now).unwrap(), now - 5_400.0);
        assert_eq!(until("0s", now).unwrap(), now);
        assert_eq!(until("1700000000", now).unwrap(), 1_700_000_000.0);
        assert_eq!(
            until("0", now).unwrap(),
            0.0,
            "a bare 0 is a time, as Docker reads it"
        );
        assert_eq!(until("2026-12-01T00:00:00Z", now).unwrap(), 1_796_083_200.0);
        for bad in ["", "soon", "24x", "h", "-1h", "1e3"] {
            assert!(until(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_prune_keeps_what_matches_every_not_label() {
        let f = Prune::parse(
            &PruneFilter {
                until: Some("1h".into()),
                labels: vec!["cleanup=true".into()],
                not_labels: vec!["keep".into()],
            },
            10_000.0,
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(f.matches(1_000.0, &labels(&[("cleanup", "true")])));
        assert!(
            !f.matches(9_000.0, &labels(&[("cleanup", "true")])),
            "too young"
        );
        assert!(!f.matches(1_000.0, &labels(&[("cleanup", "false")])));
        assert!(!f.matches(1_000.0, &labels(&[("cleanup", "true"), ("keep", "")])));
    }
}
