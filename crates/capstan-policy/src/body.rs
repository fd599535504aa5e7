//! Reading what a request asks for beyond its path: the containers its query and JSON
//! body name, and what a create asks of the host.
//!
//! The container scope used to hold for the path only (`/containers/{id}/…`), so a
//! client confined to `rt-in-*` could create a container with `VolumesFrom: ["rt-out"]`
//! or `PidMode: "container:rt-out"`, or `POST /networks/bridge/disconnect
//! {"Container": "rt-out"}`, and reach a container it may not touch. [`inspect`] lists
//! every container a request names, wherever it names it, and the [`CreateAsks`] the
//! create guard judges; the caller checks each name against the scope with the daemon's
//! view (an ID or name resolves to the container's own name and labels).
//!
//! The daemon reads the body with Go's `encoding/json`, which matches field names
//! case-insensitively (Unicode folding: `ſ` is `s`, `K` (Kelvin) is `k`) and takes the
//! last of duplicate keys. So this reader is strict where Docker is lenient, and refuses
//! rather than guesses:
//! - a body that is not JSON, or larger than [`MAX_BODY`];
//! - a key given twice in one object, and two keys that fold to the same field;
//! - a field this module reads with another type than Docker's (`"Privileged": "yes"`);
//! - a query parameter it reads given twice, or with a malformed escape.
//!
//! Read, per endpoint:
//! - `POST /containers/create`: the new container's `name` (query) and `Labels`, `Image`,
//!   and in `HostConfig` (and, as old daemons also read them, at the top level)
//!   `VolumesFrom`, `Links`, `NetworkMode`/`PidMode`/`IpcMode` `container:NAME`, the
//!   PID, network, IPC, UTS and user namespaces (not the cgroup namespace: `host` is the
//!   daemon's own default on cgroup v1 hosts), `Privileged`, `SecurityOpt`, `MaskedPaths`, `ReadonlyPaths`, `CapAdd`,
//!   `Devices`, `DeviceRequests`, `DeviceCgroupRules`, `Binds`, `Mounts`; and the `Links`
//!   of each `NetworkingConfig.EndpointsConfig` entry;
//! - `POST /networks/{id}/connect|disconnect`: `Container`, `EndpointConfig.Links`;
//! - `POST /containers/{id}/update`: the device fields;
//! - `POST /containers/{id}/exec`: `Privileged`;
//! - `POST /volumes/create`: a `device` driver option (a bind mount by another name);
//! - `POST /commit`: the `container` query parameter;
//! - `POST /build`: the `networkmode` query parameter (`host`, `container:NAME`).

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use thiserror::Error;

use crate::create::CreateAsks;
use crate::endpoints::Endpoint;

/// The largest request body read for inspection (create bodies are a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a request's body or query cannot be judged; the request is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BodyError {
    /// Larger than [`MAX_BODY`].
    #[error("the request body is larger than {limit} bytes, the most Capstan reads to check it")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Empty where the endpoint needs a body.
    #[error("the request has no body, and this endpoint needs a JSON one")]
    Empty,
    /// A body that is not JSON (or not an object).
    #[error("the request body is not a JSON object ({0}), so its fields cannot be checked")]
    NotJson(String),
    /// Two keys that Docker would read as the same field.
    #[error(
        "the request body gives `{0}` more than once (Docker reads field names case-insensitively and keeps the last), so it cannot be checked; send each field once"
    )]
    Ambiguous(String),
    /// A field with a type Docker would not accept either.
    #[error("the request body's `{field}` is not {expected}")]
    WrongType {
        /// The field.
        field: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A query parameter given twice or badly escaped.
    #[error("the query parameter `{0}` is given twice or is malformed")]
    BadQuery(String),
    /// A body sent with a content encoding, which this reader does not decode.
    #[error("the request body is sent with Content-Encoding `{0}`; send it unencoded")]
    Encoded(String),
}

/// A container a request names outside its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedContainer {
    /// Where: `HostConfig.VolumesFrom`, `query container`, ….
    pub field: String,
    /// The ID or name as written (one leading `/` removed).
    pub reference: String,
}

/// The container a create makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewContainer {
    /// The `name` query parameter, if any (one leading `/` removed).
    pub name: Option<String>,
    /// Its `Labels`.
    pub labels: HashMap<String, String>,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Named {
    /// Containers named in the query or body.
    pub containers: Vec<NamedContainer>,
    /// What a create, exec, update or volume create asks of the host.
    pub asks: Option<CreateAsks>,
    /// The container a create makes.
    pub new_container: Option<NewContainer>,
}

/// Whether the endpoint's body must be read (and bounded) before it is forwarded.
pub fn needs_body(endpoint: &Endpoint) -> bool {
    matches!(
        endpoint.operation,
        "ContainerCreate"
            | "ContainerUpdate"
            | "ContainerExec"
            | "NetworkConnect"
            | "NetworkDisconnect"
            | "VolumeCreate"
    )
}

/// Whether the endpoint names containers or asks host privileges in its query or body.
pub fn inspects(endpoint: &Endpoint) -> bool {
    needs_body(endpoint) || matches!(endpoint.operation, "ImageCommit" | "ImageBuild")
}

/// Lists what the request to `endpoint` with `query` (without `?`) and `body` names.
/// `body` is only read for endpoints where [`needs_body`] holds.
pub fn inspect(endpoint: &Endpoint, query: &str, body: &[u8]) -> Result<Named, BodyError> {
    let mut named = Named::default();
    if !inspects(endpoint) {
        return Ok(named);
    }
    let root = if needs_body(endpoint) {
        if body.len() > MAX_BODY {
            return Err(BodyError::TooLarge { limit: MAX_BODY });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(BodyError::Empty);
        }
        match serde_json::from_slice::<Json>(body) {
            Ok(Json::Obj(o)) => o,
            Ok(_) => return Err(BodyError::NotJson("not an object".into())),
            Err(e) => return Err(BodyError::NotJson(e.to_string())),
        }
    } else {
        Vec::new()
    };
    let mut asks = CreateAsks::default();
    match endpoint.operation {
        "ContainerCreate" => {
            let name = query_param(query, "name")?.map(|n| strip_slash(&n).to_string());
            let labels = match field(&root, "Labels", "")? {
                None => HashMap::new(),
                Some(Json::Obj(o)) => o
                    .iter()
                    .map(|(k, v)| match v {
                        Json::Str(s) => Ok((k.clone(), s.clone())),
                        _ => Err(wrong(&format!("Labels.{k}"), "a string")),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(wrong("Labels", "an object")),
            };
            named.new_container = Some(NewContainer { name, labels });
            asks.image = string(&root, "Image", "")?;
            host_config(&root, "", &mut named, &mut asks)?;
            if let Some(hc) = object(&root, "HostConfig", "")? {
                host_config(hc, "HostConfig.", &mut named, &mut asks)?;
            }
            if let Some(nc) = object(&root, "NetworkingConfig", "")?
                && let Some(eps) = object(nc, "EndpointsConfig", "NetworkingConfig.")?
            {
                for (network, ep) in eps {
                    match ep {
                        Json::Null => {}
                        Json::Obj(ep) => {
                            let at = format!("NetworkingConfig.EndpointsConfig.{network}.");
                            links(ep, &at, &mut named)?;
                        }
                        _ => return Err(wrong(&format!("EndpointsConfig.{network}"), "an object")),
                    }
                }
            }
            named.asks = Some(asks);
        }
        "NetworkConnect" | "NetworkDisconnect" => {
            match string(&root, "Container", "")? {
                Some(c) => named.containers.push(NamedContainer {
                    field: "Container".into(),
                    reference: strip_slash(&c).to_string(),
                }),
                None => return Err(wrong("Container", "a container ID or name")),
            }
            if let Some(ep) = object(&root, "EndpointConfig", "")? {
                links(ep, "EndpointConfig.", &mut named)?;
            }
        }
        "ContainerUpdate" => {
            devices(&root, "", &mut asks)?;
            named.asks = Some(asks);
        }
        "ContainerExec" => {
            if boolean(&root, "Privileged", "")? {
                asks.privileged.push("Privileged (exec)".into());
            }
            named.asks = Some(asks);
        }
        "VolumeCreate" => {
            if let Some(opts) = object(&root, "DriverOpts", "")? {
                for (k, v) in opts {
                    if k == "device" {
                        let Json::Str(device) = v else {
                            return Err(wrong("DriverOpts.device", "a string"));
                        };
                        asks.binds
                            .push(("DriverOpts.device".into(), device.clone()));
                    }
                }
            }
            named.asks = Some(asks);
        }
        "ImageCommit" => {
            if let Some(c) = query_param(query, "container")? {
                named.containers.push(NamedContainer {
                    field: "query container".into(),
                    reference: strip_slash(&c).to_string(),
                });
            }
        }
        "ImageBuild" => {
            if let Some(mode) = query_param(query, "networkmode")? {
                namespace_mode(&mode, "query networkmode", true, &mut named, &mut asks);
            }
            named.asks = Some(asks);
        }
        _ => {}
    }
    Ok(named)
}

/// The fields of a `HostConfig` this module reads, found in `obj` (prefix `at`).
fn host_config(
    obj: &[(String, Json)],
    at: &str,
    named: &mut Named,
    asks: &mut CreateAsks,
) -> Result<(), BodyError> {
    for (f, containers) in [
        ("NetworkMode", true),
        ("PidMode", true),
        ("IpcMode", true),
        ("UTSMode", false),
        ("UsernsMode", false),
    ] {
        if let Some(mode) = string(obj, f, at)? {
            namespace_mode(&mode, &format!("{at}{f}"), containers, named, asks);
        }
    }
    for entry in strings(obj, "VolumesFrom", at)? {
        let name = entry.split(':').next().unwrap_or_default();
        named.containers.push(NamedContainer {
            field: format!("{at}VolumesFrom"),
            reference: strip_slash(name).to_string(),
        });
    }
    links(obj, at, named)?;
    if boolean(obj, "Privileged", at)? {
        asks.privileged.push(format!("{at}Privileged"));
    }
    for opt in strings(obj, "SecurityOpt", at)? {
        let lower = opt.to_ascii_lowercase();
        if lower.contains("unconfined") || lower.replace(':', "=") == "label=disable" {
            asks.privileged.push(format!("{at}SecurityOpt {opt}"));
        }
    }
    for f in ["MaskedPaths", "ReadonlyPaths"] {
        if let Some(Json::Arr(a)) = field(obj, f, at)?
            && a.is_empty()
        {
            asks.privileged
                .push(format!("{at}{f} = [] (unmasks the host's /proc and /sys)"));
        }
    }
    asks.cap_add.extend(str_or_strings(obj, "CapAdd", at)?);
    devices(obj, at, asks)?;
    for bind in strings(obj, "Binds", at)? {
        let mut parts = bind.splitn(2, ':');
        let source = parts.next().unwrap_or_default();
        if parts.next().is_some() && source.starts_with('/') {
            asks.binds.push((format!("{at}Binds"), source.to_string()));
        }
    }
    if let Some(mounts) = field(obj, "Mounts", at)? {
        let Json::Arr(mounts) = mounts else {
            return Err(wrong(&format!("{at}Mounts"), "an array"));
        };
        for m in mounts {
            let Json::Obj(m) = m else {
                return Err(wrong(&format!("{at}Mounts"), "an array of objects"));
            };
            let kind = string(m, "Type", "Mounts.")?.unwrap_or_default();
            if kind == "bind" {
                let source = string(m, "Source", "Mounts.")?.unwrap_or_default();
                asks.binds.push((format!("{at}Mounts"), source));
            }
            if let Some(vo) = object(m, "VolumeOptions", "Mounts.")?
                && let Some(dc) = object(vo, "DriverConfig", "Mounts.VolumeOptions.")?
                && let Some(opts) = object(dc, "Options", "Mounts.VolumeOptions.DriverConfig.")?
            {
                for (k, v) in opts {
                    if k == "device" {
                        let Json::Str(device) = v else {
                            return Err(wrong(
                                "Mounts.VolumeOptions.DriverConfig.Options.device",
                                "a string",
                            ));
                        };
                        asks.binds
                            .push((format!("{at}Mounts VolumeOptions device"), device.clone()));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A `…Mode` value: `host` asks for a host namespace, `container:NAME` names a container
/// (for the modes that take one).
fn namespace_mode(
    mode: &str,
    at: &str,
    containers: bool,
    named: &mut Named,
    asks: &mut CreateAsks,
) {
    if mode == "host" {
        asks.host_namespaces.push(format!("{at}=host"));
    } else if let Some(c) = mode.strip_prefix("container:")
        && containers
    {
        named.containers.push(NamedContainer {
            field: at.to_string(),
            reference: strip_slash(c).to_string(),
        });
    }
}

fn devices(obj: &[(String, Json)], at: &str, asks: &mut CreateAsks) -> Result<(), BodyError> {
    for f in ["Devices", "DeviceRequests", "DeviceCgroupRules"] {
        match field(obj, f, at)? {
            None => {}
            Some(Json::Arr(a)) if a.is_empty() => {}
            Some(Json::Arr(_)) => asks.devices.push(format!("{at}{f}")),
            Some(_) => return Err(wrong(&format!("{at}{f}"), "an array")),
        }
    }
    Ok(())
}

/// `Links` entries (`name:alias`).
fn links(obj: &[(String, Json)], at: &str, named: &mut Named) -> Result<(), BodyError> {
    for link in strings(obj, "Links", at)? {
        let name = link.split(':').next().unwrap_or_default();
        named.containers.push(NamedContainer {
            field: format!("{at}Links"),
            reference: strip_slash(name).to_string(),
        });
    }
    Ok(())
}

fn strip_slash(s: &str) -> &str {
    s.strip_prefix('/').unwrap_or(s)
}

fn wrong(field: &str, expected: &'static str) -> BodyError {
    BodyError::WrongType {
        field: field.to_string(),
        expected,
    }
}

/// Folds a key as Go's `encoding/json` compares field names (for the ASCII names read
/// here, the only non-ASCII characters that matter are `ſ` and the Kelvin sign).
fn folds_to(key: &str, name: &str) -> bool {
    let mut folded = key.chars().flat_map(|c| match c {
        '\u{17F}' => 's'.to_lowercase(),
        c => c.to_lowercase(),
    });
    let mut want = name.chars().map(|c| c.to_ascii_lowercase());
    loop {
        match (folded.next(), want.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The value of field `name` in `obj`, as Docker would find it; two keys that fold to it
/// are refused. `null` counts as absent.
fn field<'a>(
    obj: &'a [(String, Json)],
    name: &str,
    at: &str,
) -> Result<Option<&'a Json>, BodyError> {
    let mut found = None;
    for (k, v) in obj {
        if folds_to(k, name) {
            if found.is_some() {
                return Err(BodyError::Ambiguous(format!("{at}{name}")));
            }
            found = Some(v);
        }
    }
    Ok(found.filter(|v| !matches!(v, Json::Null)))
}

fn object<'a>(
    obj: &'a [(String, Json)],
    name: &str,
    at: &str,
) -> Result<Option<&'a [(String, Json)]>, BodyError> {
    match field(obj, name, at)? {
        None => Ok(None),
        Some(Json::Obj(o)) => Ok(Some(o)),
        Some(_) => Err(wrong(&format!("{at}{name}"), "an object")),
    }
}

fn string(obj: &[(String, Json)], name: &str, at: &str) -> Result<Option<String>, BodyError> {
    match field(obj, name, at)? {
        None => Ok(None),
        Some(Json::Str(s)) => Ok(Some(s.clone())),
        Some(_) => Err(wrong(&format!("{at}{name}"), "a string")),
    }
}

fn boolean(obj: &[(String, Json)], name: &str, at: &str) -> Result<bool, BodyError> {
    match field(obj, name, at)? {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(wrong(&format!("{at}{name}"), "true or false")),
    }
}

fn strings(obj: &[(String, Json)], name: &str, at: &str) -> Result<Vec<String>, BodyError> {
    match field(obj, name, at)? {
        None => Ok(Vec::new()),
        Some(Json::Arr(a)) => a
            .iter()
            .map(|v| match v {
                Json::Str(s) => Ok(s.clone()),
                _ => Err(wrong(&format!("{at}{name}"), "an array of strings")),
            })
            .collect(),
        Some(_) => Err(wrong(&format!("{at}{name}"), "an array of strings")),
    }
}

/// Docker's `StrSlice`: a string or an array of strings.
fn str_or_strings(obj: &[(String, Json)], name: &str, at: &str) -> Result<Vec<String>, BodyError> {
    match field(obj, name, at)? {
        Some(Json::Str(s)) => Ok(vec![s.clone()]),
        _ => strings(obj, name, at),
    }
}

/// One query parameter, percent-decoded (`+` is a space, as Go reads it); given twice it
/// is refused, since Docker reads the first and a reviewer might read the last.
pub fn query_param(query: &str, name: &str) -> Result<Option<String>, BodyError> {
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k).ok_or_else(|| BodyError::BadQuery(k.to_string()))?;
        if k != name {
            continue;
        }
        if found.is_some() {
            return Err(BodyError::BadQuery(name.to_string()));
        }
        found = Some(decode(v).ok_or_else(|| BodyError::BadQuery(name.to_string()))?);
    }
    Ok(found)
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A JSON value that keeps every key in order and refuses a key given twice.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num,
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Json, E> {
        Ok(Json::Num)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Json, E> {
        Ok(Json::Num)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Json, E> {
        Ok(Json::Num)
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Json::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if entries.iter().any(|(e, _)| *e == k) {
                return Err(de::Error::custom(format_args!("key `{k}` is given twice")));
            }
            let v = map.next_value()?;
            entries.push((k, v));
        }
        Ok(Json::Obj(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{Method, find};

    fn endpoint(method: Method, path: &str) -> &'static Endpoint {
        find(method, path).expect("an endpoint").0
    }

    fn create(body: &str) -> Result<Named, BodyError> {
        inspect(
            endpoint(Method::Post, "/containers/create"),
            "name=rt-in-1",
            body.as_bytes(),
        )
    }

    fn refs(n: &Named) -> Vec<(&str, &str)> {
        n.containers
            .iter()
            .map(|c| (c.field.as_str(), c.reference.as_str()))
            .collect()
    }

    #[test]
    fn lists_every_container_a_create_body_names() {
        let n = create(
            r#"{"Image":"busybox","HostConfig":{"VolumesFrom":["rt-out:ro"],"PidMode":"container:rt-pid",
               "IpcMode":"container:/rt-ipc","NetworkMode":"container:rt-net","Links":["/rt-link:alias"]},
               "NetworkingConfig":{"EndpointsConfig":{"bridge":{"Links":["rt-ep:x"]}}}}"#,
        )
        .unwrap();
        let mut got = refs(&n);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("HostConfig.IpcMode", "rt-ipc"),
                ("HostConfig.Links", "rt-link"),
                ("HostConfig.NetworkMode", "rt-net"),
                ("HostConfig.PidMode", "rt-pid"),
                ("HostConfig.VolumesFrom", "rt-out"),
                ("NetworkingConfig.EndpointsConfig.bridge.Links", "rt-ep"),
            ]
        );
        let new = n.new_container.unwrap();
        assert_eq!(new.name.as_deref(), Some("rt-in-1"));
    }

    #[test]
    fn reads_field_names_as_docker_does_case_insensitively() {
        let n = create(r#"{"hostconfig":{"volumesfrom":["rt-out"],"PRIVILEGED":true}}"#).unwrap();
        assert_eq!(refs(&n), vec![("HostConfig.VolumesFrom", "rt-out")]);
        assert_eq!(n.asks.unwrap().privileged, vec!["HostConfig.Privileged"]);
        // `ſ` (long s) folds to `s` in Go: "Link\u{17F}" is `Links` to the daemon.
        let n = create("{\"HostConfig\":{\"Link\u{17F}\":[\"rt-out:a\"]}}").unwrap();
        assert_eq!(refs(&n), vec![("HostConfig.Links", "rt-out")]);
    }

    #[test]
    fn refuses_bodies_docker_could_read_differently() {
        for body in [
            r#"{"HostConfig":{"Privileged":false,"privileged":true}}"#,
            r#"{"HostConfig":{"Privileged":false,"Privileged":true}}"#,
            r#"{"HostConfig":{},"hostConfig":{"Privileged":true}}"#,
            r#"{"HostConfig":{"Privileged":"true"}}"#,
            r#"{"HostConfig":{"VolumesFrom":"rt-out"}}"#,
            r#"{"Labels":{"a":"1","a":"2"}}"#,
            "not json",
            "[]",
            "",
        ] {
            assert!(create(body).is_err(), "{body}");
        }
        let big = format!("{{\"Image\":\"{}\"}}", "a".repeat(MAX_BODY));
        assert_eq!(create(&big), Err(BodyError::TooLarge { limit: MAX_BODY }));
    }

    #[test]
    fn reads_host_privileges_from_a_create_and_the_old_top_level_form() {
        let n = create(
            r#"{"Image":"app","Privileged":true,"HostConfig":{"PidMode":"host","UsernsMode":"host",
               "CapAdd":"SYS_ADMIN","Devices":[{"PathOnHost":"/dev/sda"}],
               "Binds":["/etc:/x","named:/y","/anon"],"SecurityOpt":["seccomp=unconfined"],
               "Mounts":[{"Type":"bind","Source":"/root"},{"Type":"volume","Source":"v",
                 "VolumeOptions":{"DriverConfig":{"Options":{"device":"/home","o":"bind"}}}}]}}"#,
        )
        .unwrap();
        let a = n.asks.unwrap();
        assert_eq!(a.image.as_deref(), Some("app"));
        assert_eq!(
            a.privileged,
            vec!["Privileged", "HostConfig.SecurityOpt seccomp=unconfined"]
        );
        assert_eq!(
            a.host_namespaces,
            vec!["HostConfig.PidMode=host", "HostConfig.UsernsMode=host"]
        );
        assert_eq!(a.cap_add, vec!["SYS_ADMIN"]);
        assert_eq!(a.devices, vec!["HostConfig.Devices"]);
        let sources: Vec<&str> = a.binds.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(sources, vec!["/etc", "/root", "/home"]);
    }

    #[test]
    fn reads_the_container_of_network_connect_and_commit() {
        let n = inspect(
            endpoint(Method::Post, "/networks/bridge/disconnect"),
            "",
            br#"{"container":"rt-out","Force":true}"#,
        )
        .unwrap();
        assert_eq!(refs(&n), vec![("Container", "rt-out")]);
        assert!(
            inspect(
                endpoint(Method::Post, "/networks/bridge/connect"),
                "",
                b"{}"
            )
            .is_err()
        );
        let n = inspect(
            endpoint(Method::Post, "/commit"),
            "container=rt%2Dout&repo=x",
            b"",
        )
        .unwrap();
        assert_eq!(refs(&n), vec![("query container", "rt-out")]);
        assert!(
            inspect(
                endpoint(Method::Post, "/commit"),
                "container=rt-in&container=rt-out",
                b""
            )
            .is_err()
        );
    }

    #[test]
    fn reads_exec_privilege_update_devices_and_volume_devices() {
        let n = inspect(
            endpoint(Method::Post, "/containers/web/exec"),
            "",
            br#"{"Cmd":["id"],"Privileged":true}"#,
        )
        .unwrap();
        assert_eq!(n.asks.unwrap().privileged.len(), 1);
        let n = inspect(
            endpoint(Method::Post, "/containers/web/update"),
            "",
            br#"{"Devices":[{"PathOnHost":"/dev/mem"}]}"#,
        )
        .unwrap();
        assert_eq!(n.asks.unwrap().devices, vec!["Devices"]);
        let n = inspect(
            endpoint(Method::Post, "/volumes/create"),
            "",
            br#"{"Name":"v","DriverOpts":{"type":"none","o":"bind","device":"/etc"}}"#,
        )
        .unwrap();
        assert_eq!(n.asks.unwrap().binds[0].1, "/etc");
    }
}
