//! The Docker Engine API's endpoints, and matching a request against them.
//!
//! The socket proxies decide by case-insensitive path *prefix*, so `/versions`,
//! `/containersX/json` or `/containers/{id}/startx` fall under rules written for other
//! paths. Capstan instead matches a request against the endpoints the daemon really
//! serves (method + path template, taken from moby's `api/swagger.yaml` for API v1.56 plus
//! the routes the daemon registers beyond it: `/build/cancel`, `/grpc` and the
//! experimental checkpoint routes) and applies the variables to the endpoint that matched.
//! A request that is no endpoint is denied as unknown.
//!
//! Path parameters are matched strictly, segment by segment:
//! - a container (`{id}` under `/containers`) is one segment of `[A-Za-z0-9_.-]` starting
//!   with a letter or digit, Docker's own rule for names (IDs are hex);
//! - an image or Docker plugin reference (`{name}` under `/images`, `/plugins`,
//!   `/distribution`) spans one or more segments of `[A-Za-z0-9_.:@-]`, because references
//!   contain slashes (`/images/registry:5000/team/app:1.2/json`);
//! - every other parameter (exec, network, volume, node, service, task, secret, config,
//!   checkpoint) is one segment of `[A-Za-z0-9_.-]`.

use std::fmt;
use std::ops::Range;

use crate::policy::vars::Var;

/// An HTTP method that some Docker endpoint uses. Methods are case-sensitive tokens:
/// `get` is not `GET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
}

impl Method {
    /// Reads a method token exactly as sent; other methods (and other spellings) are `None`.
    #[inline]
    pub fn parse(token: &str) -> Option<Method> {
        match token {
            "GET" => Some(Method::Get),
            "HEAD" => Some(Method::Head),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    /// The method's token.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// GET and HEAD pass the write gate; everything else needs POST=1.
    #[inline]
    pub const fn is_read(self) -> bool {
        matches!(self, Method::Get | Method::Head)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The extra rule a container sub-resource carries on top of its section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Only the write gate and the section apply.
    Plain,
    /// Denied while this variable is off, whatever else is on (logs, top, changes,
    /// export, archive).
    Guard(Var),
    /// Allowed when any of these variables is on, even with POST=0 (start, stop, restart,
    /// kill, pause, unpause); otherwise the write gate and the section decide.
    Toggle(&'static [Var]),
}

/// What an endpoint's first path parameter names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// A container ID or name; check it against the policy's container scope.
    Container,
    /// An image reference or ID (may contain `/`).
    Image,
    /// A Docker Engine plugin reference (may contain `/`).
    Plugin,
    /// An exec instance ID.
    Exec,
    /// A network ID or name.
    Network,
    /// A volume name.
    Volume,
    /// A swarm node ID or name.
    Node,
    /// A swarm service ID or name.
    Service,
    /// A swarm task ID.
    Task,
    /// A swarm secret ID or name.
    Secret,
    /// A swarm config ID or name.
    Config,
}

impl TargetKind {
    /// Whether the parameter may span several path segments.
    const fn spans_segments(self) -> bool {
        matches!(self, TargetKind::Image | TargetKind::Plugin)
    }

    const fn charset(self) -> &'static [bool; 256] {
        match self {
            TargetKind::Container => &NAME_CHARS,
            TargetKind::Image | TargetKind::Plugin => &REFERENCE_CHARS,
            _ => &NAME_CHARS,
        }
    }
}

/// One Docker Engine API endpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The HTTP method.
    pub method: Method,
    /// The path template as the API reference writes it, e.g. `/containers/{id}/logs`.
    pub template: &'static str,
    /// The API reference's operation ID (`ContainerLogs`), or the route's name for the
    /// few routes the reference leaves out.
    pub operation: &'static str,
    /// The variable that turns the endpoint's section on.
    pub section: Var,
    /// The guard or lifecycle toggles of a container sub-resource.
    pub gate: Gate,
    /// What the first path parameter names, if there is one.
    pub target: Option<TargetKind>,
    /// Whether the daemon serves it only in experimental mode.
    pub experimental: bool,
    /// The template's segments, without the leading `/`.
    segments: &'static [&'static str],
}

impl Endpoint {
    const BASE: Endpoint = Endpoint {
        method: Method::Get,
        template: "",
        operation: "",
        section: Var::Ping,
        gate: Gate::Plain,
        target: None,
        experimental: false,
        segments: &[],
    };

    /// The template's segments after the leading `/` (`["containers", "{id}", "logs"]`).
    pub fn segments(&self) -> &'static [&'static str] {
        self.segments
    }

    /// For a container sub-resource (`/containers/{id}/logs`), its name (`logs`); `None`
    /// for every other endpoint.
    pub fn action(&self) -> Option<&'static str> {
        match self.segments {
            ["containers", "{id}", action, ..] => Some(action),
            _ => None,
        }
    }

    /// Matches the segments after the first (`rest`, byte ranges into `path`). Returns
    /// `Some(target range)` on a match, the range being `None` for an endpoint without
    /// parameters.
    #[inline]
    fn match_rest(&self, path: &str, rest: &[Span]) -> Option<Option<Range<usize>>> {
        let template = &self.segments[1..];
        let spans = self.target.is_some_and(TargetKind::spans_segments);
        // How many segments beyond one the spanning parameter takes.
        let extra = if spans {
            rest.len().checked_sub(template.len())?
        } else if rest.len() == template.len() {
            0
        } else {
            return None;
        };
        // Literals first: they tell endpoints apart, parameters only need checking once.
        let mut first_param: Option<usize> = None;
        for (t, pattern) in template.iter().enumerate() {
            if pattern.starts_with('{') {
                first_param.get_or_insert(t);
                continue;
            }
            let i = if first_param.is_some() { t + extra } else { t };
            if rest[i].of(path) != *pattern {
                return None;
            }
        }
        let Some(first) = first_param else {
            return Some(None);
        };
        let target = Span(rest[first].0, rest[first + extra].1);
        let kind = self
            .target
            .expect("an endpoint with parameters has a target");
        for segment in &rest[first..=first + extra] {
            if !segment_in(segment.of(path), kind.charset()) {
                return None;
            }
        }
        if kind == TargetKind::Container
            && !path.as_bytes()[usize::from(target.0)].is_ascii_alphanumeric()
        {
            return None;
        }
        for (t, pattern) in template.iter().enumerate().skip(first + 1) {
            if pattern.starts_with('{') && !segment_in(rest[t + extra].of(path), &NAME_CHARS) {
                return None;
            }
        }
        Some(Some(target.range()))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

const fn charset(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// Container names, IDs and every other single-segment parameter.
static NAME_CHARS: [bool; 256] = charset(b"_.-");
/// Image and plugin references, one segment of them (`registry:5000`, `app@sha256:…`).
static REFERENCE_CHARS: [bool; 256] = charset(b"_.-:@");

#[inline]
fn segment_in(segment: &str, charset: &[bool; 256]) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| charset[b as usize])
}

/// Builds an [`Endpoint`] from its operation ID, method, segments and section.
macro_rules! endpoint {
    ($op:literal: $method:ident $(/ $seg:literal)+ => $section:ident $(, $field:ident: $value:expr)* $(,)?) => {
        Endpoint {
            method: Method::$method,
            template: concat!($("/", $seg),+),
            operation: $op,
            section: Var::$section,
            segments: &[$($seg),+],
            $($field: $value,)*
            ..Endpoint::BASE
        }
    };
}

const CONTAINER: Option<TargetKind> = Some(TargetKind::Container);
const IMAGE: Option<TargetKind> = Some(TargetKind::Image);
const PLUGIN: Option<TargetKind> = Some(TargetKind::Plugin);
const EXEC: Option<TargetKind> = Some(TargetKind::Exec);
const NETWORK: Option<TargetKind> = Some(TargetKind::Network);
const VOLUME: Option<TargetKind> = Some(TargetKind::Volume);
const NODE: Option<TargetKind> = Some(TargetKind::Node);
const SERVICE: Option<TargetKind> = Some(TargetKind::Service);
const TASK: Option<TargetKind> = Some(TargetKind::Task);
const SECRET: Option<TargetKind> = Some(TargetKind::Secret);
const CONFIG: Option<TargetKind> = Some(TargetKind::Config);

/// `/containers…`, including exec create and the experimental checkpoints.
pub static CONTAINERS: [Endpoint; 29] = [
    endpoint!("ContainerList": Get / "containers" / "json" => Containers),
    endpoint!("ContainerCreate": Post / "containers" / "create" => Containers),
    endpoint!("ContainerPrune": Post / "containers" / "prune" => Containers),
    endpoint!("ContainerInspect": Get / "containers" / "{id}" / "json" => Containers, target: CONTAINER),
    endpoint!("ContainerTop": Get / "containers" / "{id}" / "top" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowTop)),
    endpoint!("ContainerLogs": Get / "containers" / "{id}" / "logs" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowLogs)),
    endpoint!("ContainerChanges": Get / "containers" / "{id}" / "changes" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowChanges)),
    endpoint!("ContainerExport": Get / "containers" / "{id}" / "export" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowExport)),
    endpoint!("ContainerStats": Get / "containers" / "{id}" / "stats" => Containers, target: CONTAINER),
    endpoint!("ContainerResize": Post / "containers" / "{id}" / "resize" => Containers, target: CONTAINER),
    endpoint!("ContainerStart": Post / "containers" / "{id}" / "start" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowStart])),
    endpoint!("ContainerStop": Post / "containers" / "{id}" / "stop" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowStop, Var::AllowRestarts])),
    endpoint!("ContainerRestart": Post / "containers" / "{id}" / "restart" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowRestarts])),
    endpoint!("ContainerKill": Post / "containers" / "{id}" / "kill" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowRestarts])),
    endpoint!("ContainerUpdate": Post / "containers" / "{id}" / "update" => Containers, target: CONTAINER),
    endpoint!("ContainerRename": Post / "containers" / "{id}" / "rename" => Containers, target: CONTAINER),
    endpoint!("ContainerPause": Post / "containers" / "{id}" / "pause" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowPause])),
    endpoint!("ContainerUnpause": Post / "containers" / "{id}" / "unpause" => Containers,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowUnpause])),
    endpoint!("ContainerAttach": Post / "containers" / "{id}" / "attach" => Containers, target: CONTAINER),
    endpoint!("ContainerAttachWebsocket": Get / "containers" / "{id}" / "attach" / "ws" => Containers,
        target: CONTAINER),
    endpoint!("ContainerWait": Post / "containers" / "{id}" / "wait" => Containers, target: CONTAINER),
    endpoint!("ContainerDelete": Delete / "containers" / "{id}" => Containers, target: CONTAINER),
    endpoint!("ContainerArchiveInfo": Head / "containers" / "{id}" / "archive" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowArchive)),
    endpoint!("ContainerArchive": Get / "containers" / "{id}" / "archive" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowArchive)),
    endpoint!("PutContainerArchive": Put / "containers" / "{id}" / "archive" => Containers,
        target: CONTAINER, gate: Gate::Guard(Var::AllowArchive)),
    endpoint!("ContainerExec": Post / "containers" / "{id}" / "exec" => Containers, target: CONTAINER),
    endpoint!("CheckpointList": Get / "containers" / "{id}" / "checkpoints" => Containers,
        target: CONTAINER, experimental: true),
    endpoint!("CheckpointCreate": Post / "containers" / "{id}" / "checkpoints" => Containers,
        target: CONTAINER, experimental: true),
    endpoint!("CheckpointDelete": Delete / "containers" / "{id}" / "checkpoints" / "{checkpoint}" => Containers,
        target: CONTAINER, experimental: true),
];

/// `/exec/{id}/…`: running an exec instance that `POST /containers/{id}/exec` created.
pub static EXEC_INSTANCES: [Endpoint; 3] = [
    endpoint!("ExecStart": Post / "exec" / "{id}" / "start" => Exec, target: EXEC),
    endpoint!("ExecResize": Post / "exec" / "{id}" / "resize" => Exec, target: EXEC),
    endpoint!("ExecInspect": Get / "exec" / "{id}" / "json" => Exec, target: EXEC),
];

/// `/images…`.
pub static IMAGES: [Endpoint; 13] = [
    endpoint!("ImageList": Get / "images" / "json" => Images),
    endpoint!("ImageCreate": Post / "images" / "create" => Images),
    endpoint!("ImageSearch": Get / "images" / "search" => Images),
    endpoint!("ImagePrune": Post / "images" / "prune" => Images),
    endpoint!("ImageGetAll": Get / "images" / "get" => Images),
    endpoint!("ImageLoad": Post / "images" / "load" => Images),
    endpoint!("ImageInspect": Get / "images" / "{name}" / "json" => Images, target: IMAGE),
    endpoint!("ImageAttestations": Get / "images" / "{name}" / "attestations" => Images, target: IMAGE),
    endpoint!("ImageHistory": Get / "images" / "{name}" / "history" => Images, target: IMAGE),
    endpoint!("ImagePush": Post / "images" / "{name}" / "push" => Images, target: IMAGE),
    endpoint!("ImageTag": Post / "images" / "{name}" / "tag" => Images, target: IMAGE),
    endpoint!("ImageGet": Get / "images" / "{name}" / "get" => Images, target: IMAGE),
    endpoint!("ImageDelete": Delete / "images" / "{name}" => Images, target: IMAGE),
];

/// `/build…` (BUILD).
pub static BUILD: [Endpoint; 3] = [
    endpoint!("ImageBuild": Post / "build" => Build),
    endpoint!("BuildPrune": Post / "build" / "prune" => Build),
    endpoint!("BuildCancel": Post / "build" / "cancel" => Build),
];

/// `/commit` (COMMIT).
pub static COMMIT: [Endpoint; 1] = [endpoint!("ImageCommit": Post / "commit" => Commit)];

/// `/auth` (AUTH).
pub static AUTH: [Endpoint; 1] = [endpoint!("SystemAuth": Post / "auth" => Auth)];

/// `/info` (INFO).
pub static INFO: [Endpoint; 1] = [endpoint!("SystemInfo": Get / "info" => Info)];

/// `/version` (VERSION).
pub static VERSION: [Endpoint; 1] = [endpoint!("SystemVersion": Get / "version" => Version)];

/// `/_ping` (PING).
pub static PING: [Endpoint; 2] = [
    endpoint!("SystemPing": Get / "_ping" => Ping),
    endpoint!("SystemPingHead": Head / "_ping" => Ping),
];

/// `/events` (EVENTS).
pub static EVENTS: [Endpoint; 1] = [endpoint!("SystemEvents": Get / "events" => Events)];

/// `/system/df` (SYSTEM).
pub static SYSTEM: [Endpoint; 1] = [endpoint!("SystemDataUsage": Get / "system" / "df" => System)];

/// `/volumes…`.
pub static VOLUMES: [Endpoint; 6] = [
    endpoint!("VolumeList": Get / "volumes" => Volumes),
    endpoint!("VolumeCreate": Post / "volumes" / "create" => Volumes),
    endpoint!("VolumePrune": Post / "volumes" / "prune" => Volumes),
    endpoint!("VolumeInspect": Get / "volumes" / "{name}" => Volumes, target: VOLUME),
    endpoint!("VolumeUpdate": Put / "volumes" / "{name}" => Volumes, target: VOLUME),
    endpoint!("VolumeDelete": Delete / "volumes" / "{name}" => Volumes, target: VOLUME),
];

/// `/networks…`.
pub static NETWORKS: [Endpoint; 7] = [
    endpoint!("NetworkList": Get / "networks" => Networks),
    endpoint!("NetworkCreate": Post / "networks" / "create" => Networks),
    endpoint!("NetworkPrune": Post / "networks" / "prune" => Networks),
    endpoint!("NetworkInspect": Get / "networks" / "{id}" => Networks, target: NETWORK),
    endpoint!("NetworkDelete": Delete / "networks" / "{id}" => Networks, target: NETWORK),
    endpoint!("NetworkConnect": Post / "networks" / "{id}" / "connect" => Networks, target: NETWORK),
    endpoint!("NetworkDisconnect": Post / "networks" / "{id}" / "disconnect" => Networks, target: NETWORK),
];

/// `/plugins…` (Docker Engine plugins).
pub static PLUGINS: [Endpoint; 11] = [
    endpoint!("PluginList": Get / "plugins" => Plugins),
    endpoint!("GetPluginPrivileges": Get / "plugins" / "privileges" => Plugins),
    endpoint!("PluginPull": Post / "plugins" / "pull" => Plugins),
    endpoint!("PluginCreate": Post / "plugins" / "create" => Plugins),
    endpoint!("PluginInspect": Get / "plugins" / "{name}" / "json" => Plugins, target: PLUGIN),
    endpoint!("PluginDelete": Delete / "plugins" / "{name}" => Plugins, target: PLUGIN),
    endpoint!("PluginEnable": Post / "plugins" / "{name}" / "enable" => Plugins, target: PLUGIN),
    endpoint!("PluginDisable": Post / "plugins" / "{name}" / "disable" => Plugins, target: PLUGIN),
    endpoint!("PluginUpgrade": Post / "plugins" / "{name}" / "upgrade" => Plugins, target: PLUGIN),
    endpoint!("PluginPush": Post / "plugins" / "{name}" / "push" => Plugins, target: PLUGIN),
    endpoint!("PluginSet": Post / "plugins" / "{name}" / "set" => Plugins, target: PLUGIN),
];

/// `/nodes…` (swarm).
pub static NODES: [Endpoint; 4] = [
    endpoint!("NodeList": Get / "nodes" => Nodes),
    endpoint!("NodeInspect": Get / "nodes" / "{id}" => Nodes, target: NODE),
    endpoint!("NodeDelete": Delete / "nodes" / "{id}" => Nodes, target: NODE),
    endpoint!("NodeUpdate": Post / "nodes" / "{id}" / "update" => Nodes, target: NODE),
];

/// `/swarm…`.
pub static SWARM: [Endpoint; 7] = [
    endpoint!("SwarmInspect": Get / "swarm" => Swarm),
    endpoint!("SwarmInit": Post / "swarm" / "init" => Swarm),
    endpoint!("SwarmJoin": Post / "swarm" / "join" => Swarm),
    endpoint!("SwarmLeave": Post / "swarm" / "leave" => Swarm),
    endpoint!("SwarmUpdate": Post / "swarm" / "update" => Swarm),
    endpoint!("SwarmUnlockkey": Get / "swarm" / "unlockkey" => Swarm),
    endpoint!("SwarmUnlock": Post / "swarm" / "unlock" => Swarm),
];

/// `/services…` (swarm).
pub static SERVICES: [Endpoint; 6] = [
    endpoint!("ServiceList": Get / "services" => Services),
    endpoint!("ServiceCreate": Post / "services" / "create" => Services),
    endpoint!("ServiceInspect": Get / "services" / "{id}" => Services, target: SERVICE),
    endpoint!("ServiceDelete": Delete / "services" / "{id}" => Services, target: SERVICE),
    endpoint!("ServiceUpdate": Post / "services" / "{id}" / "update" => Services, target: SERVICE),
    endpoint!("ServiceLogs": Get / "services" / "{id}" / "logs" => Services, target: SERVICE),
];

/// `/tasks…` (swarm).
pub static TASKS: [Endpoint; 3] = [
    endpoint!("TaskList": Get / "tasks" => Tasks),
    endpoint!("TaskInspect": Get / "tasks" / "{id}" => Tasks, target: TASK),
    endpoint!("TaskLogs": Get / "tasks" / "{id}" / "logs" => Tasks, target: TASK),
];

/// `/secrets…` (swarm).
pub static SECRETS: [Endpoint; 5] = [
    endpoint!("SecretList": Get / "secrets" => Secrets),
    endpoint!("SecretCreate": Post / "secrets" / "create" => Secrets),
    endpoint!("SecretInspect": Get / "secrets" / "{id}" => Secrets, target: SECRET),
    endpoint!("SecretDelete": Delete / "secrets" / "{id}" => Secrets, target: SECRET),
    endpoint!("SecretUpdate": Post / "secrets" / "{id}" / "update" => Secrets, target: SECRET),
];

/// `/configs…` (swarm).
pub static CONFIGS: [Endpoint; 5] = [
    endpoint!("ConfigList": Get / "configs" => Configs),
    endpoint!("ConfigCreate": Post / "configs" / "create" => Configs),
    endpoint!("ConfigInspect": Get / "configs" / "{id}" => Configs, target: CONFIG),
    endpoint!("ConfigDelete": Delete / "configs" / "{id}" => Configs, target: CONFIG),
    endpoint!("ConfigUpdate": Post / "configs" / "{id}" / "update" => Configs, target: CONFIG),
];

/// `/distribution/{name}/json` (DISTRIBUTION).
pub static DISTRIBUTION: [Endpoint; 1] = [endpoint!(
    "DistributionInspect": Get / "distribution" / "{name}" / "json" => Distribution, target: IMAGE
)];

/// `/session` (SESSION).
pub static SESSION: [Endpoint; 1] = [endpoint!("Session": Post / "session" => Session)];

/// `/grpc` (GRPC).
pub static GRPC: [Endpoint; 1] = [endpoint!("Grpc": Post / "grpc" => Grpc)];

/// Every endpoint, grouped by first path segment.
static GROUPS: [&[Endpoint]; 23] = [
    &CONTAINERS,
    &EXEC_INSTANCES,
    &IMAGES,
    &BUILD,
    &COMMIT,
    &AUTH,
    &INFO,
    &VERSION,
    &PING,
    &EVENTS,
    &SYSTEM,
    &VOLUMES,
    &NETWORKS,
    &PLUGINS,
    &NODES,
    &SWARM,
    &SERVICES,
    &TASKS,
    &SECRETS,
    &CONFIGS,
    &DISTRIBUTION,
    &SESSION,
    &GRPC,
];

/// Every endpoint Capstan knows, in table order.
pub fn all() -> impl Iterator<Item = &'static Endpoint> {
    GROUPS.iter().flat_map(|group| group.iter())
}

#[inline]
fn group(first: &str) -> Option<&'static [Endpoint]> {
    Some(match first {
        "containers" => &CONTAINERS,
        "exec" => &EXEC_INSTANCES,
        "images" => &IMAGES,
        "build" => &BUILD,
        "commit" => &COMMIT,
        "auth" => &AUTH,
        "info" => &INFO,
        "version" => &VERSION,
        "_ping" => &PING,
        "events" => &EVENTS,
        "system" => &SYSTEM,
        "volumes" => &VOLUMES,
        "networks" => &NETWORKS,
        "plugins" => &PLUGINS,
        "nodes" => &NODES,
        "swarm" => &SWARM,
        "services" => &SERVICES,
        "tasks" => &TASKS,
        "secrets" => &SECRETS,
        "configs" => &CONFIGS,
        "distribution" => &DISTRIBUTION,
        "session" => &SESSION,
        "grpc" => &GRPC,
        _ => return None,
    })
}

/// A path segment: its byte range in the path (without the `/`s). Request targets longer
/// than `u16::MAX` bytes are refused before matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span(pub(crate) u16, pub(crate) u16);

impl Span {
    /// The segment's text.
    #[inline]
    pub(crate) fn of(self, path: &str) -> &str {
        &path[usize::from(self.0)..usize::from(self.1)]
    }

    /// The byte range.
    pub(crate) fn range(self) -> Range<usize> {
        usize::from(self.0)..usize::from(self.1)
    }
}

/// The endpoint a request is, and the byte range of its target parameter in `path`.
///
/// `segments` are the API path's segments (after any version prefix) as byte ranges into
/// `path`, already checked to be non-empty and not `.` or `..`.
#[inline]
pub(crate) fn find_segments(
    method: Method,
    path: &str,
    segments: &[Span],
) -> Option<(&'static Endpoint, Option<Range<usize>>)> {
    let (first, rest) = segments.split_first()?;
    for endpoint in group(first.of(path))? {
        if endpoint.method != method {
            continue;
        }
        if let Some(target) = endpoint.match_rest(path, rest) {
            return Some((endpoint, target));
        }
    }
    None
}

/// The endpoint an API path such as `/containers/abc/json` (no version prefix, no query)
/// is with this method, and the byte range of its target parameter; `None` for a path that
/// is no endpoint or has an empty, `.` or `..` segment.
pub fn find(method: Method, path: &str) -> Option<(&'static Endpoint, Option<Range<usize>>)> {
    let rest = path.strip_prefix('/')?;
    let mut segments = Vec::new();
    let mut start = 1;
    for segment in rest.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return None;
        }
        let end = start + segment.len();
        segments.push(Span(u16::try_from(start).ok()?, u16::try_from(end).ok()?));
        start = end + 1;
    }
    find_segments(method, path, &segments)
}

/// The endpoints whose template matches `path` with any method (for explaining denials).
pub fn with_path(path: &str) -> impl Iterator<Item = &'static Endpoint> + '_ {
    [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
    ]
    .into_iter()
    .filter_map(move |method| find(method, path).map(|(endpoint, _)| endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of moby's `api/swagger.yaml` (API v1.56), as `METHOD template`.
    const SWAGGER: &str = "\
        GET /containers/json|POST /containers/create|GET /containers/{id}/json|\
        GET /containers/{id}/top|GET /containers/{id}/logs|GET /containers/{id}/changes|\
        GET /containers/{id}/export|GET /containers/{id}/stats|POST /containers/{id}/resize|\
        POST /containers/{id}/start|POST /containers/{id}/stop|POST /containers/{id}/restart|\
        POST /containers/{id}/kill|POST /containers/{id}/update|POST /containers/{id}/rename|\
        POST /containers/{id}/pause|POST /containers/{id}/unpause|POST /containers/{id}/attach|\
        GET /containers/{id}/attach/ws|POST /containers/{id}/wait|DELETE /containers/{id}|\
        HEAD /containers/{id}/archive|GET /containers/{id}/archive|PUT /containers/{id}/archive|\
        POST /containers/prune|GET /images/json|POST /build|POST /build/prune|POST /images/create|\
        GET /images/{name}/json|GET /images/{name}/attestations|GET /images/{name}/history|\
        POST /images/{name}/push|POST /images/{name}/tag|DELETE /images/{name}|GET /images/search|\
        POST /images/prune|POST /auth|GET /info|GET /version|GET /_ping|HEAD /_ping|POST /commit|\
        GET /events|GET /system/df|GET /images/{name}/get|GET /images/get|POST /images/load|\
        POST /containers/{id}/exec|POST /exec/{id}/start|POST /exec/{id}/resize|\
        GET /exec/{id}/json|GET /volumes|POST /volumes/create|GET /volumes/{name}|\
        PUT /volumes/{name}|DELETE /volumes/{name}|POST /volumes/prune|GET /networks|\
        GET /networks/{id}|DELETE /networks/{id}|POST /networks/create|\
        POST /networks/{id}/connect|POST /networks/{id}/disconnect|POST /networks/prune|\
        GET /plugins|GET /plugins/privileges|POST /plugins/pull|GET /plugins/{name}/json|\
        DELETE /plugins/{name}|POST /plugins/{name}/enable|POST /plugins/{name}/disable|\
        POST /plugins/{name}/upgrade|POST /plugins/create|POST /plugins/{name}/push|\
        POST /plugins/{name}/set|GET /nodes|GET /nodes/{id}|DELETE /nodes/{id}|\
        POST /nodes/{id}/update|GET /swarm|POST /swarm/init|POST /swarm/join|POST /swarm/leave|\
        POST /swarm/update|GET /swarm/unlockkey|POST /swarm/unlock|GET /services|\
        POST /services/create|GET /services/{id}|DELETE /services/{id}|\
        POST /services/{id}/update|GET /services/{id}/logs|GET /tasks|GET /tasks/{id}|\
        GET /tasks/{id}/logs|GET /secrets|POST /secrets/create|GET /secrets/{id}|\
        DELETE /secrets/{id}|POST /secrets/{id}/update|GET /configs|POST /configs/create|\
        GET /configs/{id}|DELETE /configs/{id}|POST /configs/{id}/update|\
        GET /distribution/{name}/json|POST /session";

    /// Routes the daemon registers that the reference leaves out.
    const ROUTES_BEYOND_SWAGGER: &[&str] = &[
        "POST /build/cancel",
        "POST /grpc",
        "GET /containers/{id}/checkpoints",
        "POST /containers/{id}/checkpoints",
        "DELETE /containers/{id}/checkpoints/{checkpoint}",
    ];

    fn listed(endpoint: &Endpoint) -> String {
        format!("{} {}", endpoint.method, endpoint.template)
    }

    /// A concrete path for a template, with the given value for every parameter.
    fn instantiate(template: &str, value: &str) -> String {
        template
            .split('/')
            .map(|seg| if seg.starts_with('{') { value } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn covers_every_operation_of_the_api_reference_and_nothing_else_but_daemon_routes() {
        let table: Vec<String> = all().map(listed).collect();
        let mut expected: Vec<String> = SWAGGER.split('|').map(|s| s.trim().to_owned()).collect();
        assert_eq!(expected.len(), 108);
        expected.extend(ROUTES_BEYOND_SWAGGER.iter().map(|s| s.to_string()));
        for entry in &expected {
            assert!(table.contains(entry), "missing {entry}");
        }
        for entry in &table {
            assert!(expected.contains(entry), "not in the API: {entry}");
        }
        assert_eq!(table.len(), expected.len(), "duplicates in the table");
    }

    #[test]
    fn matches_every_endpoint_back_from_its_own_template() {
        for endpoint in all() {
            for value in ["abc123", "web-1.blue_x"] {
                let path = instantiate(endpoint.template, value);
                let (found, target) = find(endpoint.method, &path).expect(&path);
                assert_eq!(found, endpoint, "{path}");
                match endpoint.target {
                    Some(_) => assert_eq!(&path[target.unwrap()], value, "{path}"),
                    None => assert!(target.is_none()),
                }
            }
        }
    }

    #[test]
    fn keeps_the_template_and_its_segments_in_step() {
        for endpoint in all() {
            assert_eq!(
                format!("/{}", endpoint.segments().join("/")),
                endpoint.template
            );
            let params = endpoint
                .segments()
                .iter()
                .filter(|s| s.starts_with('{'))
                .count();
            assert_eq!(params > 0, endpoint.target.is_some(), "{endpoint}");
        }
    }

    #[test]
    fn reads_image_names_that_contain_slashes_colons_and_digests() {
        let cases = [
            (
                "/images/library/busybox:latest/json",
                "library/busybox:latest",
            ),
            ("/images/registry:5000/a/b/json", "registry:5000/a/b"),
            (
                "/images/busybox@sha256:abcdef0123/json",
                "busybox@sha256:abcdef0123",
            ),
            ("/images/sha256:abcdef/json", "sha256:abcdef"),
            ("/images/json/json", "json"),
            ("/images/a/json/json", "a/json"),
        ];
        for (path, name) in cases {
            let (endpoint, target) = find(Method::Get, path).expect(path);
            assert_eq!(endpoint.operation, "ImageInspect");
            assert_eq!(&path[target.unwrap()], name);
        }
        let path = "/images/registry:5000/a/b:1.2";
        let (endpoint, target) = find(Method::Delete, path).unwrap();
        assert_eq!(endpoint.operation, "ImageDelete");
        assert_eq!(&path[target.unwrap()], "registry:5000/a/b:1.2");
        let path = "/images/registry:5000/a/b/push";
        assert_eq!(find(Method::Post, path).unwrap().0.operation, "ImagePush");
    }

    #[test]
    fn reads_plugin_and_distribution_names_that_contain_slashes() {
        let path = "/plugins/vieux/sshfs:latest/enable";
        let (endpoint, target) = find(Method::Post, path).unwrap();
        assert_eq!(endpoint.operation, "PluginEnable");
        assert_eq!(&path[target.unwrap()], "vieux/sshfs:latest");
        let path = "/distribution/ghcr.io/org/app:1/json";
        let (endpoint, target) = find(Method::Get, path).unwrap();
        assert_eq!(endpoint.operation, "DistributionInspect");
        assert_eq!(&path[target.unwrap()], "ghcr.io/org/app:1");
    }

    #[test]
    fn prefers_fixed_paths_over_parameters() {
        assert_eq!(
            find(Method::Get, "/images/json").unwrap().0.operation,
            "ImageList"
        );
        assert_eq!(
            find(Method::Get, "/images/get").unwrap().0.operation,
            "ImageGetAll"
        );
        assert_eq!(
            find(Method::Get, "/images/x/get").unwrap().0.operation,
            "ImageGet"
        );
        assert_eq!(
            find(Method::Post, "/containers/create")
                .unwrap()
                .0
                .operation,
            "ContainerCreate"
        );
        assert_eq!(
            find(Method::Get, "/plugins/privileges")
                .unwrap()
                .0
                .operation,
            "GetPluginPrivileges"
        );
    }

    #[test]
    fn refuses_container_names_outside_dockers_name_rule() {
        for id in ["-x", "_x", "a:b", "a@b", "a b", "a%b", "é"] {
            let path = format!("/containers/{id}/json");
            assert!(find(Method::Get, &path).is_none(), "{path}");
        }
        assert!(find(Method::Get, "/containers/a/json").is_some());
        assert!(find(Method::Get, "/containers/web.1_x-y/json").is_some());
    }

    #[test]
    fn matches_no_path_with_extra_or_missing_segments() {
        for path in [
            "/containers",
            "/containers/abc/start/x",
            "/containers/abc/startx",
            "/containersX/json",
            "/infox",
            "/versions",
            "/systemd",
            "/system",
            "/execute",
            "/exec/abc",
            "/images",
            "/distribution/x",
            "/",
            "",
        ] {
            for method in [
                Method::Get,
                Method::Post,
                Method::Head,
                Method::Put,
                Method::Delete,
            ] {
                assert!(find(method, path).is_none(), "{method} {path}");
            }
        }
    }

    #[test]
    fn matches_methods_exactly() {
        assert!(find(Method::Get, "/containers/abc/start").is_none());
        assert!(find(Method::Head, "/containers/json").is_none());
        assert!(find(Method::Head, "/_ping").is_some());
        assert_eq!(Method::parse("get"), None);
        assert_eq!(Method::parse("Get"), None);
        assert_eq!(Method::parse("PATCH"), None);
        assert_eq!(Method::parse("GET"), Some(Method::Get));
    }

    #[test]
    fn names_the_action_of_container_sub_resources() {
        let action = |method, path| find(method, path).unwrap().0.action();
        assert_eq!(
            action(Method::Post, "/containers/abc/restart"),
            Some("restart")
        );
        assert_eq!(
            action(Method::Get, "/containers/abc/attach/ws"),
            Some("attach")
        );
        assert_eq!(action(Method::Delete, "/containers/abc"), None);
        assert_eq!(action(Method::Get, "/containers/json"), None);
        assert_eq!(action(Method::Post, "/exec/abc/start"), None);
    }

    #[test]
    fn gives_guards_and_toggles_only_to_container_sub_resources() {
        for endpoint in all() {
            if endpoint.gate != Gate::Plain {
                assert_eq!(endpoint.section, Var::Containers, "{endpoint}");
                assert!(endpoint.action().is_some(), "{endpoint}");
            }
            if let Gate::Toggle(_) = endpoint.gate {
                assert_eq!(endpoint.method, Method::Post, "{endpoint}");
            }
        }
    }

    #[test]
    fn lists_the_methods_a_path_accepts() {
        let methods: Vec<Method> = with_path("/containers/abc/archive")
            .map(|e| e.method)
            .collect();
        assert_eq!(methods, vec![Method::Get, Method::Head, Method::Put]);
    }
}
