//! The policy engine: may this plugin, or this proxied client, make this Docker API request?
//!
//! Why it exists: every Docker call Capstan makes on someone's behalf — a plugin's host
//! function or a request arriving in proxy mode — is first expressed as the Docker Engine
//! API request it will send (method + path), and this crate decides on that request.
//! One decision procedure for both paths, so there is no second list of rules to drift.
//!
//! Why it is a crate of its own: the decision is pure — a request and a policy in, a
//! [`Decision`] out, asking no daemon and needing nothing else of Capstan — and its tests
//! and properties are the ones to run after every change to it. On its own the crate
//! builds and tests in seconds (`cargo test -p capstan-policy`), without the engine's
//! Docker clients, HTTP stack and WebAssembly runtime. Capstan re-exports it as
//! `capstan::policy`; what has to ask the daemon which container a reference means (the
//! scope check of named containers, the filtered listings) lives with the Docker
//! connections, in `capstan::docker::daemon`.
//!
//! It speaks the vocabulary of the Docker socket proxies (linuxserver and Tecnativa
//! docker-socket-proxy: `CONTAINERS=1 POST=0 ALLOW_RESTARTS=1`), so operators can paste the
//! environment block they already run, and follows linuxserver's decision order on
//! well-formed requests. Unlike the proxies it matches the Docker API's real endpoints
//! instead of path prefixes, refuses paths that could mean something else once forwarded,
//! and forwards exactly the path it decided on — so it is never more permissive than
//! linuxserver on any request. `docs/POLICY-SEMANTICS.md` states the semantics.
//!
//! What a policy grants by default: PING, VERSION and EVENTS (the proxies' defaults), no
//! device ([`DeviceScope`] is default-deny), within the devices granted every container
//! ([`ContainerScope`] narrows by labels and names), and creates of plain containers only
//! ([`CreateGuard`] refuses privileges, host namespaces, devices, added capabilities and
//! bind mounts until the `[create]` table allows them).
//!
//! Beyond the path, [`body`] reads the containers a request names in its query and body
//! (`VolumesFrom`, `container:NAME` modes, `Links`, network connect's `Container`,
//! `commit?container=`) and what a create asks for, so the scopes and the guard hold
//! there too.
//!
//! Where the semantics document is silent, the choices are strict and written down where
//! they are implemented:
//! - request targets ([`decide`](CompiledPolicy::decide)): decode once and forward the
//!   decoded path; refuse a trailing slash, empty and dot segments, encoded `/`, `?`, `#`,
//!   `%` and unsafe bytes; match case-sensitively; more than 24 segments is malformed;
//! - path parameters ([`endpoints`]): container names follow Docker's name rule, image
//!   and plugin references may span segments;
//! - effects ([`Effect`]): the write gate and the guards apply by what a request does, not
//!   by its method: attach is a write whatever the method (and needs ALLOW_LOGS when it
//!   may return logs), an upgrade is a write, image export needs ALLOW_EXPORT and service
//!   and task logs ALLOW_LOGS;
//! - scopes ([`DeviceScope`], [`ContainerScope`]): devices default-deny; containers in
//!   scope when every label selector and (if any) some name glob match;
//! - parsing ([`Policy::from_env_block`], [`Policy::from_toml_str`]): in an environment
//!   block the last assignment wins, as in a shell; in TOML a key set twice is an error;
//!   the variables of linuxserver's proxy that decide nothing here (`LIBPOD_*`, which
//!   govern Podman's `/libpod/…` API that Capstan refuses outright, and its process
//!   settings `LOG_LEVEL`, `TZ`, `DISABLE_IPV6`, `SOCKET_PATH`) are accepted in an
//!   environment block, checked, and kept as [`Policy::inert`] so tools can say so;
//!   other proxies' process settings (`PUID`, …) are refused with an explanation.
//!
//! The flow: [`Policy`] (parsed with [`Policy::from_env_block`] or
//! [`Policy::from_toml_str`], or deserialised as a `[policy]` table inside a manifest) →
//! [`Policy::compile`] → [`CompiledPolicy::decide`] → [`Decision`].
//!
//! ```
//! use capstan_policy::Policy;
//!
//! let policy = Policy::from_env_block("CONTAINERS=1\nALLOW_RESTARTS=1\n")?.compile();
//! let decision = policy.decide("POST", "/v1.47/containers/web/restart");
//! assert!(decision.is_allowed());
//! assert_eq!(decision.container(), Some("web"));
//! # Ok::<(), capstan_policy::PolicyError>(())
//! ```

pub mod body;
pub mod create;
mod decide;
pub mod endpoints;
pub mod outbound;
mod parse;
mod scope;
mod vars;

#[cfg(test)]
mod props;
#[cfg(any(test, feature = "proptest"))]
pub mod strategies;
#[cfg(test)]
mod tests;

use std::io::{self, BufRead, Write};

pub use create::{CreateAsks, CreateDenial, CreateError, CreateGuard};
pub use decide::{CompiledPolicy, Decision, Effects, Framing, Malformed, Rule, Target, WriteCause};
pub use endpoints::{Effect, Endpoint, Gate, Method, TargetKind};
pub use outbound::{Origin, OutboundError, OutboundList, OutboundRule, Scheme, special_address};
pub use parse::{EnvLineError, PolicyError, assignment};
pub use scope::{ContainerScope, DeviceScope, Glob, LabelSelector, ScopeError, own_names};
pub use vars::{INERT, Inert, InertKind, ValueError, Var, VarKind, VarSet, parse_value};

/// A policy as written: the variables it sets, and its scopes.
///
/// Variables it does not set keep the proxies' defaults. Deserialises from a table (see
/// [`Policy::from_toml_str`] for the keys), so a manifest can embed it as `[policy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The variables set explicitly.
    explicit: VarSet,
    /// Their values (only the bits in `explicit` count).
    values: VarSet,
    devices: DeviceScope,
    containers: ContainerScope,
    create: CreateGuard,
    outbound: OutboundList,
    /// Inert variables set in an environment block, with their values (last wins).
    inert: Vec<(Inert, String)>,
}

impl Default for Policy {
    /// The proxies' defaults, no device, every container.
    fn default() -> Self {
        Policy {
            explicit: VarSet::EMPTY,
            values: VarSet::EMPTY,
            devices: DeviceScope::none(),
            containers: ContainerScope::all(),
            create: CreateGuard::default(),
            outbound: OutboundList::default(),
            inert: Vec::new(),
        }
    }
}

impl Policy {
    /// Parses a socket-proxy environment block as pasted from a compose file or `.env`:
    /// `KEY=VALUE`, `export KEY=VALUE`, `- KEY=VALUE`, `KEY: VALUE`, quotes, comments, an
    /// optional leading `environment:` line. The last assignment of a name wins, as in a
    /// shell. An environment block sets no scope: no device, every container. The
    /// create guard keeps its safe defaults unless `CREATE_*` names widen it (see
    /// [`create`]).
    pub fn from_env_block(text: &str) -> Result<Policy, PolicyError> {
        parse::env_block(text)
    }

    /// Parses a TOML policy table: the variable names with integer values, plus
    /// `devices = ["prod-*", "local"]`, a `[containers]` table with `labels` and
    /// `names`, and a `[create]` table (see [`create`]). Unknown keys are errors.
    pub fn from_toml_str(text: &str) -> Result<Policy, PolicyError> {
        parse::toml_str(text)
    }

    /// Whether `var` is on, explicitly or by default.
    pub fn get(&self, var: Var) -> bool {
        self.explicit(var).unwrap_or(var.default_on())
    }

    /// The value `var` was set to, or `None` when it keeps its default.
    pub fn explicit(&self, var: Var) -> Option<bool> {
        self.explicit
            .contains(var)
            .then(|| self.values.contains(var))
    }

    /// Sets `var`.
    pub fn set(&mut self, var: Var, on: bool) {
        self.explicit.insert(var);
        self.values.set(var, on);
    }

    /// The inert variables (`LIBPOD_*`, `LOG_LEVEL`, …) the environment block set, with
    /// their values: accepted so linuxserver's block pastes unchanged, deciding nothing
    /// (see [`Inert`]).
    pub fn inert(&self) -> &[(Inert, String)] {
        &self.inert
    }

    /// Records an inert variable's value (replacing an earlier one).
    pub fn set_inert(&mut self, var: Inert, value: &str) {
        let value = value.trim().to_owned();
        match self.inert.iter_mut().find(|(v, _)| *v == var) {
            Some(slot) => slot.1 = value,
            None => self.inert.push((var, value)),
        }
    }

    /// Returns `var` to its default.
    pub fn unset(&mut self, var: Var) {
        self.explicit.remove(var);
        self.values.remove(var);
    }

    /// Every variable's effective value.
    pub fn vars(&self) -> VarSet {
        let mut set = VarSet::defaults();
        for &var in Var::ALL {
            set.set(var, self.get(var));
        }
        set
    }

    /// The devices the policy may act on.
    pub fn devices(&self) -> &DeviceScope {
        &self.devices
    }

    /// Replaces the device scope.
    pub fn set_devices(&mut self, devices: DeviceScope) {
        self.devices = devices;
    }

    /// The containers the policy may act on.
    pub fn containers(&self) -> &ContainerScope {
        &self.containers
    }

    /// Replaces the container scope.
    pub fn set_containers(&mut self, containers: ContainerScope) {
        self.containers = containers;
    }

    /// What a container create may ask of the host.
    pub fn create(&self) -> &CreateGuard {
        &self.create
    }

    /// Replaces the create guard.
    pub fn set_create(&mut self, create: CreateGuard) {
        self.create = create;
    }

    /// The origins a plugin may reach over HTTP (`outbound`; see [`outbound`]).
    pub fn outbound(&self) -> &OutboundList {
        &self.outbound
    }

    /// Replaces the outbound allow-list.
    pub fn set_outbound(&mut self, outbound: OutboundList) {
        self.outbound = outbound;
    }

    /// The form that decides: variables as a bit set, scopes ready to match.
    pub fn compile(&self) -> CompiledPolicy {
        CompiledPolicy::new(self.vars(), self.devices.clone(), self.containers.clone())
            .with_create(self.create.clone())
    }
}

/// Decides a stream of requests, one `METHOD PATH` a line, writing `allow` or `deny` per
/// request (with `\t` and [`Decision::reason`] when `with_reasons`).
///
/// Blank lines and lines starting with `#` are skipped. A line that is not two words (or
/// is not UTF-8) gets `deny\tmalformed input line`, and the stream goes on. Returns how
/// many requests were allowed and denied (malformed lines count as denied).
pub fn decide_stream(
    policy: &CompiledPolicy,
    mut input: impl BufRead,
    mut out: impl Write,
    with_reasons: bool,
) -> io::Result<(usize, usize)> {
    let (mut allowed, mut denied) = (0, 0);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        if input.read_until(b'\n', &mut buffer)? == 0 {
            break;
        }
        let Ok(line) = std::str::from_utf8(&buffer) else {
            denied += 1;
            writeln!(out, "deny\tmalformed input line")?;
            continue;
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            denied += 1;
            writeln!(out, "deny\tmalformed input line")?;
            continue;
        };
        let decision = policy.decide(method, path);
        let verdict = if decision.is_allowed() {
            allowed += 1;
            "allow"
        } else {
            denied += 1;
            "deny"
        };
        if with_reasons {
            writeln!(out, "{verdict}\t{}", decision.reason())?;
        } else {
            writeln!(out, "{verdict}")?;
        }
    }
    out.flush()?;
    Ok((allowed, denied))
}
