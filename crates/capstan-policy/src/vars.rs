//! The socket-proxy variables: names, defaults, what they govern, and how a value is read.
//!
//! The names and defaults are those of linuxserver/docker-socket-proxy, so an operator can
//! paste the block they already run. Values are read more strictly than the proxies do:
//! the proxies treat `POST=true` as off without a word; Capstan refuses it.

use std::fmt;

use thiserror::Error;

macro_rules! variables {
    ($($(#[$doc:meta])* $var:ident = $name:literal, default $default:literal, $kind:ident;)+) => {
        /// One socket-proxy variable (`CONTAINERS`, `POST`, `ALLOW_RESTARTS`, …).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Var {
            $($(#[$doc])* $var,)+
        }

        impl Var {
            /// Every variable, in the order of the semantics table.
            pub const ALL: &'static [Var] = &[$(Var::$var,)+];

            /// The variable's name as written in an environment block or TOML table.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Var::$var => $name,)+
                }
            }

            /// Whether the variable is on when a policy does not mention it.
            pub const fn default_on(self) -> bool {
                match self {
                    $(Var::$var => $default != 0,)+
                }
            }

            /// What kind of rule the variable feeds.
            pub const fn kind(self) -> VarKind {
                match self {
                    $(Var::$var => VarKind::$kind,)+
                }
            }

            /// Looks a variable up by its exact (case-sensitive) name.
            pub fn from_name(name: &str) -> Option<Var> {
                match name {
                    $($name => Some(Var::$var),)+
                    _ => None,
                }
            }
        }
    };
}

variables! {
    /// `/_ping` (GET and HEAD).
    Ping = "PING", default 1, Section;
    /// `/version`.
    Version = "VERSION", default 1, Section;
    /// `/events`.
    Events = "EVENTS", default 1, Section;
    /// `/info`.
    Info = "INFO", default 0, Section;
    /// `/containers…`, including exec *create* (`POST /containers/{id}/exec`).
    Containers = "CONTAINERS", default 0, Section;
    /// `/images…` (pull is `POST /images/create`).
    Images = "IMAGES", default 0, Section;
    /// `/networks…`.
    Networks = "NETWORKS", default 0, Section;
    /// `/volumes…`.
    Volumes = "VOLUMES", default 0, Section;
    /// `/exec/{id}/start|resize|json`.
    Exec = "EXEC", default 0, Section;
    /// `/system/df`.
    System = "SYSTEM", default 0, Section;
    /// `/auth`.
    Auth = "AUTH", default 0, Section;
    /// `/build…`.
    Build = "BUILD", default 0, Section;
    /// `/commit`.
    Commit = "COMMIT", default 0, Section;
    /// `/configs…` (swarm).
    Configs = "CONFIGS", default 0, Section;
    /// `/secrets…` (swarm).
    Secrets = "SECRETS", default 0, Section;
    /// `/nodes…` (swarm).
    Nodes = "NODES", default 0, Section;
    /// `/services…` (swarm).
    Services = "SERVICES", default 0, Section;
    /// `/tasks…` (swarm).
    Tasks = "TASKS", default 0, Section;
    /// `/swarm…`.
    Swarm = "SWARM", default 0, Section;
    /// `/plugins…` (Docker Engine plugins, not Capstan plugins).
    Plugins = "PLUGINS", default 0, Section;
    /// `/distribution/{name}/json`.
    Distribution = "DISTRIBUTION", default 0, Section;
    /// `/session`.
    Session = "SESSION", default 0, Section;
    /// `/grpc`.
    Grpc = "GRPC", default 0, Section;
    /// The write gate: any write needs POST=1 — a method other than GET and HEAD, an
    /// attach (websocket GET too), a connection upgrade, `GET /swarm/unlockkey`.
    Post = "POST", default 0, WriteGate;
    /// `POST /containers/{id}/start`, even with POST=0.
    AllowStart = "ALLOW_START", default 0, Toggle;
    /// `POST /containers/{id}/stop`, even with POST=0.
    AllowStop = "ALLOW_STOP", default 0, Toggle;
    /// `POST /containers/{id}/stop`, `/restart` and `/kill`, even with POST=0.
    AllowRestarts = "ALLOW_RESTARTS", default 0, Toggle;
    /// `POST /containers/{id}/pause`, even with POST=0.
    AllowPause = "ALLOW_PAUSE", default 0, Toggle;
    /// `POST /containers/{id}/unpause`, even with POST=0.
    AllowUnpause = "ALLOW_UNPAUSE", default 0, Toggle;
    /// Guard: while off, `/containers/{id}/logs` is denied even with CONTAINERS=1, and so
    /// are service and task logs and an attach that may return logs (`logs=1`).
    AllowLogs = "ALLOW_LOGS", default 0, Guard;
    /// Guard: while off, `/containers/{id}/top` is denied even with CONTAINERS=1.
    AllowTop = "ALLOW_TOP", default 0, Guard;
    /// Guard: while off, `/containers/{id}/changes` is denied even with CONTAINERS=1.
    AllowChanges = "ALLOW_CHANGES", default 0, Guard;
    /// Guard: while off, `/containers/{id}/export` is denied even with CONTAINERS=1, and so
    /// is image export (`GET /images/get`, `/images/{name}/get`) even with IMAGES=1.
    AllowExport = "ALLOW_EXPORT", default 0, Guard;
    /// Guard: while off, `/containers/{id}/archive` is denied even with CONTAINERS=1.
    AllowArchive = "ALLOW_ARCHIVE", default 0, Guard;
}

/// The role a variable plays in the decision order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// Turns a whole API section on (`CONTAINERS`, `IMAGES`, …).
    Section,
    /// `POST`: lets methods other than GET and HEAD through.
    WriteGate,
    /// Allows one container lifecycle action even with POST=0 (`ALLOW_START`, …).
    Toggle,
    /// Must be on for a container sub-resource to be reachable at all (`ALLOW_LOGS`, …).
    Guard,
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Var {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Var::from_name(s).ok_or_else(|| ValueError::unknown(s))
    }
}

/// A set of variables that are on: one bit per [`Var`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VarSet(u64);

impl VarSet {
    /// No variable on.
    pub const EMPTY: VarSet = VarSet(0);

    /// The proxies' defaults: PING, VERSION and EVENTS on, everything else off.
    pub fn defaults() -> VarSet {
        let mut set = VarSet::EMPTY;
        for &var in Var::ALL {
            if var.default_on() {
                set.insert(var);
            }
        }
        set
    }

    /// Whether `var` is on.
    #[inline]
    pub const fn contains(self, var: Var) -> bool {
        self.0 & (1 << var as u8) != 0
    }

    /// Turns `var` on.
    pub fn insert(&mut self, var: Var) {
        self.0 |= 1 << var as u8;
    }

    /// Turns `var` off.
    pub fn remove(&mut self, var: Var) {
        self.0 &= !(1 << var as u8);
    }

    /// Sets `var` to `on`.
    pub fn set(&mut self, var: Var, on: bool) {
        if on {
            self.insert(var);
        } else {
            self.remove(var);
        }
    }

    /// The variables that are on, in table order.
    pub fn iter(self) -> impl Iterator<Item = Var> {
        Var::ALL.iter().copied().filter(move |&v| self.contains(v))
    }
}

impl Default for VarSet {
    fn default() -> Self {
        VarSet::defaults()
    }
}

/// Prints the variables that are on, as `PING=1 VERSION=1 EVENTS=1`.
impl fmt::Display for VarSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for var in self.iter() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{var}=1")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VarSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VarSet({self})")
    }
}

/// Names other proxies read that configure their own process and that linuxserver's
/// documentation does not list: refused with an explanation rather than silently dropped.
const PROXY_SETTINGS: &[&str] = &["BIND_CONFIG", "PUID", "PGID"];

/// A variable of linuxserver/docker-socket-proxy that decides nothing in Capstan but is
/// accepted, so that proxy's whole environment block pastes unchanged (see
/// [`Inert::get`]). A policy keeps what it was set to ([`crate::Policy::inert`]) so tools
/// can say that it had no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inert {
    name: &'static str,
    default: &'static str,
    kind: InertKind,
}

/// Why an [`Inert`] variable decides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InertKind {
    /// `LIBPOD_*`: governs Podman's `/libpod/…` API, which Capstan does not serve: every
    /// `/libpod/…` request is denied whatever these say, so they can only make Capstan
    /// stricter than linuxserver's proxy, never more permissive.
    Libpod,
    /// Configures the proxy's own process (log level, time zone, IPv6 listening, socket
    /// path); Capstan's equivalents are its own settings.
    ProcessSetting,
}

macro_rules! inert {
    ($($name:literal = $default:literal, $kind:ident;)+) => {
        /// Every inert variable, with its linuxserver default.
        pub const INERT: &[Inert] = &[$(Inert { name: $name, default: $default, kind: InertKind::$kind },)+];
    };
}

inert! {
    "LIBPOD_ALLOW_PAUSE" = "0", Libpod;
    "LIBPOD_ALLOW_POD_PAUSE" = "0", Libpod;
    "LIBPOD_ALLOW_POD_RESTARTS" = "0", Libpod;
    "LIBPOD_ALLOW_POD_START" = "0", Libpod;
    "LIBPOD_ALLOW_POD_STOP" = "0", Libpod;
    "LIBPOD_ALLOW_POD_UNPAUSE" = "0", Libpod;
    "LIBPOD_ALLOW_RESTARTS" = "0", Libpod;
    "LIBPOD_ALLOW_START" = "0", Libpod;
    "LIBPOD_ALLOW_STOP" = "0", Libpod;
    "LIBPOD_ALLOW_UNPAUSE" = "0", Libpod;
    "LIBPOD_CONTAINERS" = "0", Libpod;
    "LIBPOD_EVENTS" = "0", Libpod;
    "LIBPOD_EXEC" = "0", Libpod;
    "LIBPOD_GENERATE" = "0", Libpod;
    "LIBPOD_IMAGES" = "0", Libpod;
    "LIBPOD_INFO" = "0", Libpod;
    "LIBPOD_MANIFESTS" = "0", Libpod;
    "LIBPOD_NETWORKS" = "0", Libpod;
    "LIBPOD_PING" = "1", Libpod;
    "LIBPOD_PLAY" = "0", Libpod;
    "LIBPOD_PODS" = "0", Libpod;
    "LIBPOD_SECRETS" = "0", Libpod;
    "LIBPOD_SYSTEM" = "0", Libpod;
    "LIBPOD_VERSION" = "1", Libpod;
    "LIBPOD_VOLUMES" = "0", Libpod;
    "LOG_LEVEL" = "info", ProcessSetting;
    "DISABLE_IPV6" = "0", ProcessSetting;
    "TZ" = "Etc/UTC", ProcessSetting;
    "SOCKET_PATH" = "/var/run/docker.sock", ProcessSetting;
}

/// linuxserver's log levels (haproxy's syslog levels).
const LOG_LEVELS: &[&str] = &[
    "debug", "info", "notice", "warning", "err", "crit", "alert", "emerg",
];

impl Inert {
    /// Looks an inert variable up by its exact (case-sensitive) name.
    pub fn get(name: &str) -> Option<Inert> {
        INERT.iter().copied().find(|v| v.name == name)
    }

    pub const fn name(self) -> &'static str {
        self.name
    }

    /// linuxserver's default value.
    pub const fn default_value(self) -> &'static str {
        self.default
    }

    pub const fn kind(self) -> InertKind {
        self.kind
    }

    /// Checks a value as linuxserver's proxy would read it, more strictly: `LIBPOD_*` and
    /// `DISABLE_IPV6` take an integer (as the policy variables do), `LOG_LEVEL` one of
    /// haproxy's levels, `SOCKET_PATH` an absolute path, `TZ` anything non-empty.
    pub fn check(self, value: &str) -> Result<(), ValueError> {
        let value = value.trim();
        let bad = |expected: &'static str| {
            Err(ValueError::InvalidInert {
                name: self.name,
                value: value.to_owned(),
                expected,
            })
        };
        match self.name {
            "LOG_LEVEL" if !LOG_LEVELS.contains(&value) => {
                bad("one of debug, info, notice, warning, err, crit, alert, emerg")
            }
            "SOCKET_PATH" if !value.starts_with('/') => bad("an absolute path"),
            "TZ" if value.is_empty() => bad("a time zone such as Etc/UTC"),
            "LOG_LEVEL" | "SOCKET_PATH" | "TZ" => Ok(()),
            _ if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) => {
                bad("an integer: 1 for on, 0 for off")
            }
            _ => Ok(()),
        }
    }

    /// Why the variable has no effect, in one sentence.
    pub const fn why(self) -> &'static str {
        match self.kind {
            InertKind::Libpod => {
                "Capstan serves the Docker Engine API only and denies every /libpod/… \
                 (Podman) request whatever the LIBPOD_* variables say"
            }
            InertKind::ProcessSetting => {
                "it configures linuxserver's proxy process, not what it allows; Capstan's \
                 own settings (capstan.toml, RUST_LOG) do that"
            }
        }
    }
}

/// Why one `NAME=VALUE` entry of a policy is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    /// The name is not a policy variable.
    #[error("`{name}` is not a policy variable{}", suggest(.suggestion))]
    UnknownVariable {
        /// The name as written.
        name: String,
        /// The closest variable name, when one is close enough to be a likely typo.
        suggestion: Option<&'static str>,
    },
    /// The name configures the socket proxy's own process.
    #[error(
        "`{0}` configures the socket proxy process itself, not what it allows; Capstan has no \
         such setting here, remove the line"
    )]
    ProxySetting(String),
    /// An inert variable where it is not accepted (a TOML policy, a single assignment).
    #[error(
        "`{}` decides nothing in Capstan: {}; it is accepted only in a pasted environment \
         block, leave it out here", .0.name(), .0.why()
    )]
    Inert(Inert),
    /// The value of an accepted, inert variable is not one linuxserver's proxy reads.
    #[error("{name} has value `{value}`; expected {expected}")]
    InvalidInert {
        /// The variable's name.
        name: &'static str,
        /// The value as written.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// The value is not a non-negative integer.
    #[error(
        "{var} has value `{value}`, which is not an integer: write {var}=1 to turn it on or \
         {var}=0 to leave it off"
    )]
    InvalidValue {
        /// The variable.
        var: Var,
        /// The value as written.
        value: String,
    },
}

fn suggest(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(name) => format!(" (did you mean `{name}`?)"),
        None => String::new(),
    }
}

impl ValueError {
    /// The error for an unknown name, with a did-you-mean when a variable is close.
    pub fn unknown(name: &str) -> ValueError {
        if PROXY_SETTINGS.contains(&name) {
            return ValueError::ProxySetting(name.to_owned());
        }
        if let Some(var) = Inert::get(name) {
            return ValueError::Inert(var);
        }
        ValueError::UnknownVariable {
            name: name.to_owned(),
            suggestion: closest(
                name,
                Var::ALL
                    .iter()
                    .map(|v| v.name())
                    .chain(INERT.iter().map(|v| v.name)),
            ),
        }
    }
}

/// Reads a variable's value: an unsigned decimal integer, surrounding whitespace allowed;
/// non-zero means on. Anything else (`true`, `yes`, empty, `1x`, `-1`) is an error.
pub fn parse_value(var: Var, text: &str) -> Result<bool, ValueError> {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::InvalidValue {
            var,
            value: text.to_owned(),
        });
    }
    // Any length is fine: only "is it zero" matters, so no overflow to worry about.
    Ok(digits.bytes().any(|b| b != b'0'))
}

/// Parses `NAME` and `VALUE` into a variable and its setting.
pub fn parse_assignment(name: &str, value: &str) -> Result<(Var, bool), ValueError> {
    let var = Var::from_name(name).ok_or_else(|| ValueError::unknown(name))?;
    Ok((var, parse_value(var, value)?))
}

/// The candidate closest to `name`, if it is close enough to be a likely typo:
/// same name in another case, the same name with or without `ALLOW_`, or within a small
/// edit distance (ignoring case).
pub fn closest<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let wanted = name.to_ascii_uppercase();
    let bare = wanted.strip_prefix("ALLOW_").unwrap_or(&wanted);
    let budget = match wanted.len() {
        0..=2 => 0,
        3..=5 => 1,
        6..=9 => 2,
        _ => 3,
    };
    let mut best: Option<(usize, &'c str)> = None;
    for candidate in candidates {
        let upper = candidate.to_ascii_uppercase();
        let candidate_bare = upper.strip_prefix("ALLOW_").unwrap_or(&upper);
        let distance = if upper == wanted {
            0
        } else if candidate_bare == bare {
            1
        } else {
            edit_distance(&wanted, &upper)
        };
        if distance <= budget && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and
/// transpositions of neighbours each cost one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a = a.as_bytes();
    let b = b.as_bytes();
    let width = b.len() + 1;
    let mut rows = vec![0usize; (a.len() + 1) * width];
    for (j, cell) in rows.iter_mut().take(width).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        rows[i * width] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[(i - 1) * width + j] + 1)
                .min(rows[i * width + j - 1] + 1)
                .min(rows[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[(i - 2) * width + j - 2] + 1);
            }
            rows[i * width + j] = d;
        }
    }
    rows[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_thirty_four_variables_with_unique_names_and_bits() {
        assert_eq!(Var::ALL.len(), 34);
        assert!(Var::ALL.len() <= 64, "VarSet is one u64");
        for (i, var) in Var::ALL.iter().enumerate() {
            assert_eq!(*var as usize, i);
            assert_eq!(Var::from_name(var.name()), Some(*var));
        }
    }

    #[test]
    fn turns_on_only_ping_version_and_events_by_default() {
        let on: Vec<Var> = VarSet::defaults().iter().collect();
        assert_eq!(on, vec![Var::Ping, Var::Version, Var::Events]);
        assert_eq!(VarSet::defaults().to_string(), "PING=1 VERSION=1 EVENTS=1");
    }

    #[test]
    fn reads_any_non_zero_integer_as_on_and_zero_as_off() {
        assert_eq!(parse_value(Var::Post, "0"), Ok(false));
        assert_eq!(parse_value(Var::Post, "000"), Ok(false));
        assert_eq!(parse_value(Var::Post, "1"), Ok(true));
        assert_eq!(parse_value(Var::Post, "2"), Ok(true));
        assert_eq!(parse_value(Var::Post, " 1 "), Ok(true));
        assert_eq!(parse_value(Var::Post, "\t0\t"), Ok(false));
        assert_eq!(
            parse_value(Var::Post, "99999999999999999999999999"),
            Ok(true)
        );
    }

    #[test]
    fn rejects_values_that_are_not_integers_naming_the_variable() {
        for text in [
            "true", "yes", "", " ", "1x", "-1", "+1", "0x1", "1.0", "on", "１",
        ] {
            let err = parse_value(Var::Post, text).unwrap_err();
            assert_eq!(
                err,
                ValueError::InvalidValue {
                    var: Var::Post,
                    value: text.to_owned()
                }
            );
            let message = err.to_string();
            assert!(message.contains("POST"), "{message}");
            assert!(message.contains("POST=1"), "{message}");
        }
    }

    #[test]
    fn suggests_the_closest_variable_for_a_near_miss() {
        let cases = [
            ("CONTAINER", "CONTAINERS"),
            ("ALLOW_RESTART", "ALLOW_RESTARTS"),
            ("containers", "CONTAINERS"),
            ("IMAGE", "IMAGES"),
            ("RESTARTS", "ALLOW_RESTARTS"),
            ("LOGS", "ALLOW_LOGS"),
            ("ALLOW_INFO", "INFO"),
            ("POTS", "POST"),
            ("VOLUMS", "VOLUMES"),
            ("DISTRIBUTIONS", "DISTRIBUTION"),
        ];
        for (typo, meant) in cases {
            match ValueError::unknown(typo) {
                ValueError::UnknownVariable { name, suggestion } => {
                    assert_eq!(name, typo);
                    assert_eq!(suggestion, Some(meant), "{typo}");
                }
                other => panic!("{typo}: {other:?}"),
            }
        }
        let message = ValueError::unknown("CONTAINER").to_string();
        assert_eq!(
            message,
            "`CONTAINER` is not a policy variable (did you mean `CONTAINERS`?)"
        );
    }

    #[test]
    fn offers_no_suggestion_for_a_name_far_from_every_variable() {
        assert_eq!(
            ValueError::unknown("DOCKER_HOST"),
            ValueError::UnknownVariable {
                name: "DOCKER_HOST".into(),
                suggestion: None
            }
        );
        assert_eq!(
            ValueError::unknown("X").to_string(),
            "`X` is not a policy variable"
        );
    }

    #[test]
    fn explains_that_proxy_process_settings_are_not_policy() {
        let message = ValueError::unknown("PUID").to_string();
        assert!(message.contains("PUID"), "{message}");
        assert!(message.contains("socket proxy process"), "{message}");
    }

    #[test]
    fn explains_where_an_inert_variable_is_not_accepted() {
        let message = ValueError::unknown("LIBPOD_PING").to_string();
        assert!(message.contains("decides nothing in Capstan"), "{message}");
        assert!(message.contains("/libpod/"), "{message}");
        let message = ValueError::unknown("LOG_LEVEL").to_string();
        assert!(
            message.contains("configures linuxserver's proxy process"),
            "{message}"
        );
    }

    #[test]
    fn knows_every_variable_of_linuxservers_default_environment() {
        // The `ENV` of linuxserver/docker-socket-proxy's Dockerfile, as of its libpod
        // support, with each default.
        let linuxserver = "ALLOW_ARCHIVE=0 ALLOW_CHANGES=0 ALLOW_EXPORT=0 ALLOW_LOGS=0 \
            ALLOW_PAUSE=0 ALLOW_RESTARTS=0 ALLOW_STOP=0 ALLOW_START=0 ALLOW_TOP=0 \
            ALLOW_UNPAUSE=0 AUTH=0 BUILD=0 COMMIT=0 CONFIGS=0 CONTAINERS=0 DISTRIBUTION=0 \
            EVENTS=1 EXEC=0 IMAGES=0 INFO=0 LOG_LEVEL=info NETWORKS=0 NODES=0 PING=1 \
            PLUGINS=0 POST=0 SECRETS=0 SERVICES=0 SESSION=0 SOCKET_PATH=/var/run/docker.sock \
            SWARM=0 SYSTEM=0 TASKS=0 VERSION=1 VOLUMES=0 LIBPOD_ALLOW_PAUSE=0 \
            LIBPOD_ALLOW_POD_PAUSE=0 LIBPOD_ALLOW_POD_RESTARTS=0 LIBPOD_ALLOW_POD_START=0 \
            LIBPOD_ALLOW_POD_STOP=0 LIBPOD_ALLOW_POD_UNPAUSE=0 LIBPOD_ALLOW_RESTARTS=0 \
            LIBPOD_ALLOW_START=0 LIBPOD_ALLOW_STOP=0 LIBPOD_ALLOW_UNPAUSE=0 \
            LIBPOD_CONTAINERS=0 LIBPOD_EVENTS=0 LIBPOD_EXEC=0 LIBPOD_GENERATE=0 \
            LIBPOD_IMAGES=0 LIBPOD_INFO=0 LIBPOD_MANIFESTS=0 LIBPOD_NETWORKS=0 LIBPOD_PING=1 \
            LIBPOD_PLAY=0 LIBPOD_PODS=0 LIBPOD_SECRETS=0 LIBPOD_SYSTEM=0 LIBPOD_VERSION=1 \
            LIBPOD_VOLUMES=0 DISABLE_IPV6=0 TZ=Etc/UTC GRPC=0";
        for pair in linuxserver.split_whitespace() {
            let (name, default) = pair.split_once('=').unwrap();
            match (Var::from_name(name), Inert::get(name)) {
                (Some(var), None) => {
                    assert_eq!(var.default_on(), default == "1", "{name}");
                }
                (None, Some(inert)) => {
                    assert_eq!(inert.default_value(), default, "{name}");
                    assert_eq!(inert.check(default), Ok(()), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let named = linuxserver.split_whitespace().count();
        assert_eq!(
            named,
            Var::ALL.len() + INERT.len(),
            "a variable is missing from the list"
        );
    }

    #[test]
    fn checks_inert_values_as_strictly_as_the_variables() {
        let get = |name| Inert::get(name).unwrap();
        for bad in ["true", "", "on", "-1"] {
            let message = get("LIBPOD_PING").check(bad).unwrap_err().to_string();
            assert!(
                message.contains("LIBPOD_PING") && message.contains("integer"),
                "{message}"
            );
        }
        let message = get("LOG_LEVEL").check("verbose").unwrap_err().to_string();
        assert!(message.contains("debug, info, notice"), "{message}");
        assert!(get("SOCKET_PATH").check("docker.sock").is_err());
        assert!(get("TZ").check(" ").is_err());
        assert_eq!(get("TZ").check("Europe/Berlin"), Ok(()));
        assert_eq!(get("LOG_LEVEL").check("warning"), Ok(()));
        assert_eq!(get("DISABLE_IPV6").check("1"), Ok(()));
    }

    #[test]
    fn measures_edit_distance_with_transpositions() {
        assert_eq!(edit_distance("POST", "POST"), 0);
        assert_eq!(edit_distance("POTS", "POST"), 1);
        assert_eq!(edit_distance("CONTAINER", "CONTAINERS"), 1);
        assert_eq!(edit_distance("", "ABC"), 3);
        assert_eq!(edit_distance("KITTEN", "SITTING"), 3);
    }
}
