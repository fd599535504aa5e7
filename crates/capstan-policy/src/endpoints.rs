//! The Docker Engine API's endpoints, and matching a request against them.
//!
//! The socket proxies decide by case-insensitive path *prefix*, so `/versions`,
//! `/containersX/json` or `/containers/{id}/startx` fall under rules written for other
//! paths. Capstan instead matches a request against the endpoints the daemon really
//! serves (method + path template, taken from moby's `api/swagger.yaml` for API v1.56 plus
//! the routes the daemon registers beyond it: `/build/cancel`, `/grpc` and the
//! experimental checkpoint routes) and applies the variables to the endpoint that matched.
//! A request that is no endpoint is denied as unknown. Each endpoint says what a request to
//! it does ([`Effect`]: read, guarded read, write, attach), and the write gate and guards
//! apply by that effect rather than by the HTTP method.
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

use crate::vars::Var;

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

    /// GET and HEAD may read; everything else is a write (needs POST=1), whatever the
    /// endpoint. A GET or HEAD is a write too when its endpoint's [`Effect`] is one.
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

/// What a request to an endpoint does. The write gate and the guards apply by effect, not
/// by HTTP method: a GET that opens a session into a container is a write, a GET that hands
/// out a container's logs needs ALLOW_LOGS wherever it lives in the API.
///
/// Every GET and HEAD endpoint was reviewed for what it does; the ones whose method would
/// mislead are:
/// - attach, both `POST …/attach` and `GET …/attach/ws`: [`Effect::Attach`];
/// - `GET /swarm/unlockkey`: hands out the key that unlocks a locked swarm's encrypted
///   state, a credential, so it is a [`Effect::Write`];
/// - `GET /images/get` and `GET /images/{name}/get` (`docker save`): the images' whole
///   filesystems, guarded by ALLOW_EXPORT like a container export;
/// - `GET /services/{id}/logs` and `GET /tasks/{id}/logs`: containers' logs, guarded by
///   ALLOW_LOGS like `/containers/{id}/logs`.
///
/// Any other method than GET and HEAD is a write whatever the table says (the table says
/// so too, and a test keeps it so), so effects only ever deny more than the proxies'
/// method rule. Reads that make the daemon contact a registry (`/images/search`,
/// `/distribution/{name}/json`, `/plugins/privileges`) change nothing and stay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Returns state, changes nothing, and returns nothing a guard protects.
    Read,
    /// Returns data a guard protects (a container's logs, processes, changes, filesystem;
    /// an image's filesystem): denied while the guard is off, whatever else is on.
    GuardedRead(Var),
    /// Changes state, runs something or hands out a credential: needs POST=1, whatever the
    /// method.
    Write,
    /// Writes data a guard protects (`PUT /containers/{id}/archive`): the guard and POST=1.
    GuardedWrite(Var),
    /// Attaches to a container's streams. Always a write, whatever the method: the session
    /// can carry stdin into the container's process (which runs as whoever the container
    /// runs as) and the detach keys. And a read of the container's logs, guarded by
    /// ALLOW_LOGS, when the request may ask for them (`logs` true in the query, a form body
    /// the policy cannot see, or a query it cannot read as the daemon would). Streamed
    /// output without `logs` is part of the session POST=1 allows.
    Attach,
}

impl Effect {
    /// Whether the effect needs the write gate (POST=1).
    #[inline]
    pub const fn writes(self) -> bool {
        matches!(
            self,
            Effect::Write | Effect::GuardedWrite(_) | Effect::Attach
        )
    }

    /// The guard the effect always needs; attach's depends on the request.
    #[inline]
    pub const fn guard(self) -> Option<Var> {
        match self {
            Effect::GuardedRead(var) | Effect::GuardedWrite(var) => Some(var),
            Effect::Read | Effect::Write | Effect::Attach => None,
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::Read => f.write_str("read"),
            Effect::GuardedRead(var) => write!(f, "read guarded by {var}"),
            Effect::Write => f.write_str("write"),
            Effect::GuardedWrite(var) => write!(f, "write guarded by {var}"),
            Effect::Attach => f.write_str("attach"),
        }
    }
}

/// The lifecycle toggles a container sub-resource carries on top of its section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Only the effect and the section apply.
    Plain,
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
    /// What a request to it does: decides the write gate and the guard.
    pub effect: Effect,
    /// The lifecycle toggles of a container sub-resource.
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
        effect: Effect::Read,
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

/// Builds an [`Endpoint`] from its operation ID, method, segments, section and effect.
macro_rules! endpoint {
    ($op:literal: $method:ident $(/ $seg:literal)+ => $section:ident, $effect:ident $(($guard:ident))?
        $(, $field:ident: $value:expr)* $(,)?) => {
        Endpoint {
            method: Method::$method,
            template: concat!($("/", $seg),+),
            operation: $op,
            section: Var::$section,
            effect: Effect::$effect $((Var::$guard))?,
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
    endpoint!("ContainerList": Get / "containers" / "json" => Containers, Read),
    endpoint!("ContainerCreate": Post / "containers" / "create" => Containers, Write),
    endpoint!("ContainerPrune": Post / "containers" / "prune" => Containers, Write),
    endpoint!("ContainerInspect": Get / "containers" / "{id}" / "json" => Containers, Read, target: CONTAINER),
    endpoint!("ContainerTop": Get / "containers" / "{id}" / "top" => Containers, GuardedRead(AllowTop),
        target: CONTAINER),
    endpoint!("ContainerLogs": Get / "containers" / "{id}" / "logs" => Containers, GuardedRead(AllowLogs),
        target: CONTAINER),
    endpoint!("ContainerChanges": Get / "containers" / "{id}" / "changes" => Containers, GuardedRead(AllowChanges),
        target: CONTAINER),
    endpoint!("ContainerExport": Get / "containers" / "{id}" / "export" => Containers, GuardedRead(AllowExport),
        target: CONTAINER),
    endpoint!("ContainerStats": Get / "containers" / "{id}" / "stats" => Containers, Read, target: CONTAINER),
    endpoint!("ContainerResize": Post / "containers" / "{id}" / "resize" => Containers, Write, target: CONTAINER),
    endpoint!("ContainerStart": Post / "containers" / "{id}" / "start" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowStart])),
    endpoint!("ContainerStop": Post / "containers" / "{id}" / "stop" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowStop, Var::AllowRestarts])),
    endpoint!("ContainerRestart": Post / "containers" / "{id}" / "restart" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowRestarts])),
    endpoint!("ContainerKill": Post / "containers" / "{id}" / "kill" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowRestarts])),
    endpoint!("ContainerUpdate": Post / "containers" / "{id}" / "update" => Containers, Write, target: CONTAINER),
    endpoint!("ContainerRename": Post / "containers" / "{id}" / "rename" => Containers, Write, target: CONTAINER),
    endpoint!("ContainerPause": Post / "containers" / "{id}" / "pause" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowPause])),
    endpoint!("ContainerUnpause": Post / "containers" / "{id}" / "unpause" => Containers, Write,
        target: CONTAINER, gate: Gate::Toggle(&[Var::AllowUnpause])),
    endpoint!("ContainerAttach": Post / "containers" / "{id}" / "attach" => Containers, Attach, target: CONTAINER),
    endpoint!("ContainerAttachWebsocket": Get / "containers" / "{id}" / "attach" / "ws" => Containers, Attach,
        target: CONTAINER),
    endpoint!("ContainerWait": Post / "containers" / "{id}" / "wait" => Containers, Write, target: CONTAINER),
    endpoint!("ContainerDelete": Delete / "containers" / "{id}" => Containers, Write, target: CONTAINER),
    endpoint!("ContainerArchiveInfo": Head / "containers" / "{id}" / "archive" => Containers, GuardedRead(AllowArchive),
        target: CONTAINER),
    endpoint!("ContainerArchive": Get / "containers" / "{id}" / "archive" => Containers, GuardedRead(AllowArchive),
        target: CONTAINER),
    endpoint!("PutContainerArchive": Put / "containers" / "{id}" / "archive" => Containers, GuardedWrite(AllowArchive),
        target: CONTAINER),
    endpoint!("ContainerExec": Post / "containers" / "{id}" / "exec" => Containers, Write, target: CONTAINER),
    endpoint!("CheckpointList": Get / "containers" / "{id}" / "checkpoints" => Containers, Read,
        target: CONTAINER, experimental: true),
    endpoint!("CheckpointCreate": Post / "containers" / "{id}" / "checkpoints" => Containers, Write,
        target: CONTAINER, experimental: true),
    endpoint!("CheckpointDelete": Delete / "containers" / "{id}" / "checkpoints" / "{checkpoint}" => Containers, Write,
        target: CONTAINER, experimental: true),
];

/// `/exec/{id}/…`: running an exec instance that `POST /containers/{id}/exec` created.
pub static EXEC_INSTANCES: [Endpoint; 3] = [
    endpoint!("ExecStart": Post / "exec" / "{id}" / "start" => Exec, Write, target: EXEC),
    endpoint!("ExecResize": Post / "exec" / "{id}" / "resize" => Exec, Write, target: EXEC),
    endpoint!("ExecInspect": Get / "exec" / "{id}" / "json" => Exec, Read, target: EXEC),
];

/// `/images…`.
pub static IMAGES: [Endpoint; 13] = [
    endpoint!("ImageList": Get / "images" / "json" => Images, Read),
    endpoint!("ImageCreate": Post / "images" / "create" => Images, Write),
    endpoint!("ImageSearch": Get / "images" / "search" => Images, Read),
    endpoint!("ImagePrune": Post / "images" / "prune" => Images, Write),
    endpoint!("ImageGetAll": Get / "images" / "get" => Images, GuardedRead(AllowExport)),
    endpoint!("ImageLoad": Post / "images" / "load" => Images, Write),
    endpoint!("ImageInspect": Get / "images" / "{name}" / "json" => Images, Read, target: IMAGE),
    endpoint!("ImageAttestations": Get / "images" / "{name}" / "attestations" => Images, Read, target: IMAGE),
    endpoint!("ImageHistory": Get / "images" / "{name}" / "history" => Images, Read, target: IMAGE),
    endpoint!("ImagePush": Post / "images" / "{name}" / "push" => Images, Write, target: IMAGE),
    endpoint!("ImageTag": Post / "images" / "{name}" / "tag" => Images, Write, target: IMAGE),
    endpoint!("ImageGet": Get / "images" / "{name}" / "get" => Images, GuardedRead(AllowExport), target: IMAGE),
    endpoint!("ImageDelete": Delete / "images" / "{name}" => Images, Write, target: IMAGE),
];

/// `/build…` (BUILD).
pub static BUILD: [Endpoint; 3] = [
    endpoint!("ImageBuild": Post / "build" => Build, Write),
    endpoint!("BuildPrune": Post / "build" / "prune" => Build, Write),
    endpoint!("BuildCancel": Post / "build" / "cancel" => Build, Write),
];

/// `/commit` (COMMIT).
pub static COMMIT: [Endpoint; 1] = [endpoint!("ImageCommit": Post / "commit" => Commit, Write)];

/// `/auth` (AUTH).
pub static AUTH: [Endpoint; 1] = [endpoint!("SystemAuth": Post / "auth" => Auth, Write)];

/// `/info` (INFO).
pub static INFO: [Endpoint; 1] = [endpoint!("SystemInfo": Get / "info" => Info, Read)];

/// `/version` (VERSION).
pub static VERSION: [Endpoint; 1] = [endpoint!("SystemVersion": Get / "version" => Version, Read)];

/// `/_ping` (PING).
pub static PING: [Endpoint; 2] = [
    endpoint!("SystemPing": Get / "_ping" => Ping, Read),
    endpoint!("SystemPingHead": Head / "_ping" => Ping, Read),
];

/// `/events` (EVENTS).
pub static EVENTS: [Endpoint; 1] = [endpoint!("SystemEvents": Get / "events" => Events, Read)];

/// `/system/df` (SYSTEM).
pub static SYSTEM: [Endpoint; 1] =
    [endpoint!("SystemDataUsage": Get / "system" / "df" => System, Read)];

/// `/volumes…`.
pub static VOLUMES: [Endpoint; 6] = [
    endpoint!("VolumeList": Get / "volumes" => Volumes, Read),
    endpoint!("VolumeCreate": Post / "volumes" / "create" => Volumes, Write),
    endpoint!("VolumePrune": Post / "volumes" / "prune" => Volumes, Write),
    endpoint!("VolumeInspect": Get / "volumes" / "{name}" => Volumes, Read, target: VOLUME),
    endpoint!("VolumeUpdate": Put / "volumes" / "{name}" => Volumes, Write, target: VOLUME),
    endpoint!("VolumeDelete": Delete / "volumes" / "{name}" => Volumes, Write, target: VOLUME),
];

/// `/networks…`.
pub static NETWORKS: [Endpoint; 7] = [
    endpoint!("NetworkList": Get / "networks" => Networks, Read),
    endpoint!("NetworkCreate": Post / "networks" / "create" => Networks, Write),
    endpoint!("NetworkPrune": Post / "networks" / "prune" => Networks, Write),
    endpoint!("NetworkInspect": Get / "networks" / "{id}" => Networks, Read, target: NETWORK),
    endpoint!("NetworkDelete": Delete / "networks" / "{id}" => Networks, Write, target: NETWORK),
    endpoint!("NetworkConnect": Post / "networks" / "{id}" / "connect" => Networks, Write, target: NETWORK),
    endpoint!("NetworkDisconnect": Post / "networks" / "{id}" / "disconnect" => Networks, Write, target: NETWORK),
];

/// `/plugins…` (Docker Engine plugins).
pub static PLUGINS: [Endpoint; 11] = [
    endpoint!("PluginList": Get / "plugins" => Plugins, Read),
    endpoint!("GetPluginPrivileges": Get / "plugins" / "privileges" => Plugins, Read),
    endpoint!("PluginPull": Post / "plugins" / "pull" => Plugins, Write),
    endpoint!("PluginCreate": Post / "plugins" / "create" => Plugins, Write),
    endpoint!("PluginInspect": Get / "plugins" / "{name}" / "json" => Plugins, Read, target: PLUGIN),
    endpoint!("PluginDelete": Delete / "plugins" / "{name}" => Plugins, Write, target: PLUGIN),
    endpoint!("PluginEnable": Post / "plugins" / "{name}" / "enable" => Plugins, Write, target: PLUGIN),
    endpoint!("PluginDisable": Post / "plugins" / "{name}" / "disable" => Plugins, Write, target: PLUGIN),
    endpoint!("PluginUpgrade": Post / "plugins" / "{name}" / "upgrade" => Plugins, Write, target: PLUGIN),
    endpoint!("PluginPush": Post / "plugins" / "{name}" / "push" => Plugins, Write, target: PLUGIN),
    endpoint!("PluginSet": Post / "plugins" / "{name}" / "set" => Plugins, Write, target: PLUGIN),
];

/// `/nodes…` (swarm).
pub static NODES: [Endpoint; 4] = [
    endpoint!("NodeList": Get / "nodes" => Nodes, Read),
    endpoint!("NodeInspect": Get / "nodes" / "{id}" => Nodes, Read, target: NODE),
    endpoint!("NodeDelete": Delete / "nodes" / "{id}" => Nodes, Write, target: NODE),
    endpoint!("NodeUpdate": Post / "nodes" / "{id}" / "update" => Nodes, Write, target: NODE),
];

/// `/swarm…`.
pub static SWARM: [Endpoint; 7] = [
    endpoint!("SwarmInspect": Get / "swarm" => Swarm, Read),
    endpoint!("SwarmInit": Post / "swarm" / "init" => Swarm, Write),
    endpoint!("SwarmJoin": Post / "swarm" / "join" => Swarm, Write),
    endpoint!("SwarmLeave": Post / "swarm" / "leave" => Swarm, Write),
    endpoint!("SwarmUpdate": Post / "swarm" / "update" => Swarm, Write),
    endpoint!("SwarmUnlockkey": Get / "swarm" / "unlockkey" => Swarm, Write),
    endpoint!("SwarmUnlock": Post / "swarm" / "unlock" => Swarm, Write),
];

/// `/services…` (swarm).
pub static SERVICES: [Endpoint; 6] = [
    endpoint!("ServiceList": Get / "services" => Services, Read),
    endpoint!("ServiceCreate": Post / "services" / "create" => Services, Write),
    endpoint!("ServiceInspect": Get / "services" / "{id}" => Services, Read, target: SERVICE),
    endpoint!("ServiceDelete": Delete / "services" / "{id}" => Services, Write, target: SERVICE),
    endpoint!("ServiceUpdate": Post / "services" / "{id}" / "update" => Services, Write, target: SERVICE),
    endpoint!("ServiceLogs": Get / "services" / "{id}" / "logs" => Services, GuardedRead(AllowLogs), target: SERVICE),
];

/// `/tasks…` (swarm).
pub static TASKS: [Endpoint; 3] = [
    endpoint!("TaskList": Get / "tasks" => Tasks, Read),
    endpoint!("TaskInspect": Get / "tasks" / "{id}" => Tasks, Read, target: TASK),
    endpoint!("TaskLogs": Get / "tasks" / "{id}" / "logs" => Tasks, GuardedRead(AllowLogs), target: TASK),
];

/// `/secrets…` (swarm).
pub static SECRETS: [Endpoint; 5] = [
    endpoint!("SecretList": Get / "secrets" => Secrets, Read),
    endpoint!("SecretCreate": Post / "secrets" / "create" => Secrets, Write),
    endpoint!("SecretInspect": Get / "secrets" / "{id}" => Secrets, Read, target: SECRET),
    endpoint!("SecretDelete": Delete / "secrets" / "{id}" => Secrets, Write, target: SECRET),
    endpoint!("SecretUpdate": Post / "secrets" / "{id}" / "update" => Secrets, Write, target: SECRET),
];

/// `/configs…` (swarm).
pub static CONFIGS: [Endpoint; 5] = [
    endpoint!("ConfigList": Get / "configs" => Configs, Read),
    endpoint!("ConfigCreate": Post / "configs" / "create" => Configs, Write),
    endpoint!("ConfigInspect": Get / "configs" / "{id}" => Configs, Read, target: CONFIG),
    endpoint!("ConfigDelete": Delete / "configs" / "{id}" => Configs, Write, target: CONFIG),
    endpoint!("ConfigUpdate": Post / "configs" / "{id}" / "update" => Configs, Write, target: CONFIG),
];

/// `/distribution/{name}/json` (DISTRIBUTION).
pub static DISTRIBUTION: [Endpoint; 1] = [endpoint!(
    "DistributionInspect": Get / "distribution" / "{name}" / "json" => Distribution, Read, target: IMAGE
)];

/// `/session` (SESSION).
pub static SESSION: [Endpoint; 1] = [endpoint!("Session": Post / "session" => Session, Write)];

/// `/grpc` (GRPC).
pub static GRPC: [Endpoint; 1] = [endpoint!("Grpc": Post / "grpc" => Grpc, Write)];

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
    fn gives_toggles_only_to_container_sub_resources_that_write() {
        for endpoint in all() {
            if let Gate::Toggle(_) = endpoint.gate {
                assert_eq!(endpoint.section, Var::Containers, "{endpoint}");
                assert!(endpoint.action().is_some(), "{endpoint}");
                assert_eq!(endpoint.method, Method::Post, "{endpoint}");
                assert_eq!(endpoint.effect, Effect::Write, "{endpoint}");
            }
        }
    }

    #[test]
    fn makes_every_method_but_get_and_head_a_write() {
        for endpoint in all() {
            if !endpoint.method.is_read() {
                assert!(endpoint.effect.writes(), "{endpoint}: {}", endpoint.effect);
            }
        }
    }

    #[test]
    fn names_every_read_method_endpoint_whose_effect_is_more_than_a_read() {
        let mut beyond: Vec<String> = all()
            .filter(|e| e.method.is_read() && e.effect != Effect::Read)
            .map(|e| format!("{e} {}", e.effect))
            .collect();
        beyond.sort();
        assert_eq!(
            beyond,
            [
                "GET /containers/{id}/archive read guarded by ALLOW_ARCHIVE",
                "GET /containers/{id}/attach/ws attach",
                "GET /containers/{id}/changes read guarded by ALLOW_CHANGES",
                "GET /containers/{id}/export read guarded by ALLOW_EXPORT",
                "GET /containers/{id}/logs read guarded by ALLOW_LOGS",
                "GET /containers/{id}/top read guarded by ALLOW_TOP",
                "GET /images/get read guarded by ALLOW_EXPORT",
                "GET /images/{name}/get read guarded by ALLOW_EXPORT",
                "GET /services/{id}/logs read guarded by ALLOW_LOGS",
                "GET /swarm/unlockkey write",
                "GET /tasks/{id}/logs read guarded by ALLOW_LOGS",
                "HEAD /containers/{id}/archive read guarded by ALLOW_ARCHIVE",
            ]
        );
    }

    #[test]
    fn keeps_every_guard_of_the_proxies_on_its_container_sub_resource() {
        for (action, guard) in [
            ("logs", Var::AllowLogs),
            ("top", Var::AllowTop),
            ("changes", Var::AllowChanges),
            ("export", Var::AllowExport),
            ("archive", Var::AllowArchive),
        ] {
            let guarded: Vec<&Endpoint> = all().filter(|e| e.action() == Some(action)).collect();
            assert!(!guarded.is_empty(), "{action}");
            for endpoint in guarded {
                assert_eq!(endpoint.effect.guard(), Some(guard), "{endpoint}");
            }
        }
        let attach: Vec<&Endpoint> = all().filter(|e| e.action() == Some("attach")).collect();
        assert_eq!(attach.len(), 2);
        assert!(attach.iter().all(|e| e.effect == Effect::Attach));
    }

    #[test]
    fn lists_the_methods_a_path_accepts() {
        let methods: Vec<Method> = with_path("/containers/abc/archive")
            .map(|e| e.method)
            .collect();
        assert_eq!(methods, vec![Method::Get, Method::Head, Method::Put]);
    }
}
