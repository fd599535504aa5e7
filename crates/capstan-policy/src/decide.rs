//! Deciding one request: normalise the path, find the endpoint, apply the variables.
//!
//! Capstan decides on exactly the request it will send. The path is percent-decoded once
//! and the decoded form is what gets forwarded, so the daemon never sees bytes that meant
//! something else at decision time. Refused as malformed (no variable can allow them):
//! - a path that does not start with `/`, or holds a character that is not allowed in a
//!   URL path (space, control characters, `"`, `<`, `\`, non-ASCII, …);
//! - a malformed escape (`%zz`, `%4`);
//! - an escape that decodes to `/`, `?`, `#` or `%` (it would change the path's meaning
//!   once decoded), or to a byte that may not stand unencoded in a path (space, control,
//!   non-ASCII, `"`, `[`, …), so the decoded path is always a valid one to forward;
//! - an empty segment (`//`), a trailing slash, and `.` or `..` segments — Docker's own
//!   clients never send them, so there is nothing to normalise, only to refuse;
//! - a query with a space, control or non-ASCII byte or a `#`;
//! - more than 24 segments, or a target longer than 65,535 bytes.
//!
//! Escapes that decode to ordinary characters are fine: `/%63ontainers/json` is decided,
//! and forwarded, as `/containers/json`. An optional API version prefix (`/v1.41`, `/v`
//! digits `.` digits) is kept in the forwarded path and skipped for matching. The query is
//! forwarded as received; it counts only where it changes what a request does (attach's
//! `logs`), read at least as strictly as the daemon reads it ([`query_may_set`]).
//!
//! The request's effect ([`Effects`]) comes from the endpoint's [`Effect`] in the table, not
//! from the HTTP method alone: a method other than GET/HEAD is always a write, and so is a
//! GET whose effect is one (attach over a websocket) or that asks to upgrade the connection
//! ([`Framing`]). Then, for the endpoint that matched, the order of linuxserver's proxy:
//! 1. the effect's guard off (a container's logs, top, changes, export, archive; image
//!    export; service and task logs) → deny;
//! 2. a lifecycle toggle on (start, stop, restart, kill, pause, unpause) → allow, unless
//!    the request asks for an upgrade;
//! 3. a write with POST off → deny;
//! 4. section on → allow; 5. otherwise deny.
//!
//! This only ever denies more than linuxserver, whose write gate is the method and whose
//! guards are the container sub-resources: every such write and guard is one here too.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use crate::create::CreateGuard;
use crate::endpoints::{self, Effect, Endpoint, Gate, Method, Span, TargetKind};
use crate::scope::{ContainerScope, DeviceScope};
use crate::vars::{Var, VarSet};

/// A policy ready to decide: the variables as a bit set, and the scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    vars: VarSet,
    devices: DeviceScope,
    containers: ContainerScope,
    create: CreateGuard,
}

impl CompiledPolicy {
    /// A policy from variables and scopes, with the default create guard.
    pub fn new(vars: VarSet, devices: DeviceScope, containers: ContainerScope) -> Self {
        CompiledPolicy {
            vars,
            devices,
            containers,
            create: CreateGuard::default(),
        }
    }

    /// The same policy with another create guard.
    pub fn with_create(mut self, create: CreateGuard) -> Self {
        self.create = create;
        self
    }

    /// What a container create may ask of the host.
    pub fn create(&self) -> &CreateGuard {
        &self.create
    }

    /// A policy with these variables, no device and every container.
    pub fn from_vars(vars: VarSet) -> Self {
        CompiledPolicy::new(vars, DeviceScope::none(), ContainerScope::all())
    }

    /// The variables that are on.
    pub fn vars(&self) -> VarSet {
        self.vars
    }

    /// Whether `var` is on.
    pub fn is_on(&self, var: Var) -> bool {
        self.vars.contains(var)
    }

    /// The devices the policy may act on.
    pub fn devices(&self) -> &DeviceScope {
        &self.devices
    }

    /// The containers the policy may act on.
    pub fn containers(&self) -> &ContainerScope {
        &self.containers
    }

    /// Decides whether `method path_and_query` may be sent to the Docker daemon.
    ///
    /// `method` is the HTTP method token as received (case-sensitive); `path_and_query` is
    /// the request target in origin form (`/v1.47/containers/json?all=1`). Forward
    /// [`Decision::path`] — not the input — when the decision allows. A proxy that sees
    /// the request's headers calls [`decide_framed`](Self::decide_framed) instead.
    #[must_use = "a decision must be checked before the request is sent"]
    #[inline]
    pub fn decide<'a>(&self, method: &'a str, path_and_query: &'a str) -> Decision<'a> {
        self.decide_framed(method, path_and_query, Framing::default())
    }

    /// Decides as [`decide`](Self::decide), for a request framed as `framing` says: an
    /// upgrade is a write whatever the endpoint, and a form body may carry what the query
    /// does not show.
    #[must_use = "a decision must be checked before the request is sent"]
    pub fn decide_framed<'a>(
        &self,
        method: &'a str,
        path_and_query: &'a str,
        framing: Framing,
    ) -> Decision<'a> {
        let mut segments = [Span(0, 0); MAX_SEGMENTS];
        let (path, layout) = match normalise(path_and_query, &mut segments) {
            Ok(normal) => normal,
            Err(malformed) => {
                return Decision {
                    allowed: false,
                    rule: Rule::Malformed(malformed),
                    endpoint: None,
                    method,
                    path: Cow::Borrowed(path_and_query),
                    api: 0..0,
                    target: None,
                    vars: self.vars,
                    effects: Effects::NONE,
                    framing,
                };
            }
        };
        let mut segments = &segments[..layout.count];
        let mut api = 0..layout.path_end;
        if let Some(first) = segments.first()
            && is_version(first.of(&path).as_bytes())
        {
            api.start = usize::from(first.1);
            segments = &segments[1..];
        }
        let found = Method::parse(method)
            .and_then(|m| endpoints::find_segments(m, &path, segments).map(|f| (m, f)));
        let Some((method_token, (endpoint, target))) = found else {
            return Decision {
                allowed: false,
                rule: Rule::Unknown,
                endpoint: None,
                method,
                path,
                api,
                target: None,
                vars: self.vars,
                effects: Effects::NONE,
                framing,
            };
        };
        let query = &path[layout.path_end..];
        let effects = Effects::resolve(method_token, endpoint, query, framing);
        let rule = apply(self.vars, endpoint, effects, framing);
        Decision {
            allowed: rule.allows(),
            rule,
            endpoint: Some(endpoint),
            method,
            path,
            api,
            target: endpoint.target.zip(target),
            vars: self.vars,
            effects,
            framing,
        }
    }
}

impl From<VarSet> for CompiledPolicy {
    fn from(vars: VarSet) -> Self {
        CompiledPolicy::from_vars(vars)
    }
}

/// What a proxy sees of a request, beyond its method and target, that changes what the
/// request does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Framing {
    /// The request asks to upgrade the connection (`Connection: Upgrade` with
    /// `Upgrade: …`). Once the daemon agrees, bytes flow both ways and the policy sees none
    /// of them, so an upgrade is a write whatever the endpoint, and no lifecycle toggle
    /// allows it.
    pub upgrade: bool,
    /// The body is a form (`application/x-www-form-urlencoded` or `multipart/form-data`).
    /// The daemon reads its parameters from such a body before the query's, and the policy
    /// does not read bodies, so an effect that depends on parameters (attach's `logs`)
    /// assumes the worst.
    pub form_body: bool,
}

/// Why a request needs the write gate (POST=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCause {
    /// Its method is not GET or HEAD.
    Method,
    /// Its endpoint's effect is a write whatever the method (attach, `GET
    /// /swarm/unlockkey`).
    Effect,
    /// It asks to upgrade the connection to a two-way stream.
    Upgrade,
}

/// What one request does: its endpoint's [`Effect`] resolved against its method, query
/// and framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Why it needs POST=1, when it does.
    pub write: Option<WriteCause>,
    /// The guard that must be on for it, if any.
    pub guard: Option<Var>,
}

impl Effects {
    /// Nothing: for requests that matched no endpoint (denied anyway).
    pub const NONE: Effects = Effects {
        write: None,
        guard: None,
    };

    /// Resolves `endpoint`'s effect for one request. The method only ever adds: anything
    /// but GET and HEAD is a write, whatever the table says.
    #[inline]
    fn resolve(method: Method, endpoint: &Endpoint, query: &str, framing: Framing) -> Effects {
        let write = if !method.is_read() {
            Some(WriteCause::Method)
        } else if endpoint.effect.writes() {
            Some(WriteCause::Effect)
        } else if framing.upgrade {
            Some(WriteCause::Upgrade)
        } else {
            None
        };
        let guard = match endpoint.effect {
            Effect::Attach => {
                (framing.form_body || query_may_set(query, b"logs")).then_some(Var::AllowLogs)
            }
            effect => effect.guard(),
        };
        Effects { write, guard }
    }

    /// Whether the request needs POST=1.
    pub const fn writes(self) -> bool {
        self.write.is_some()
    }
}

/// Whether `query` (with its leading `?`, or empty) may make the daemon read `key` as
/// true.
///
/// The daemon (moby's `httputils.BoolValue`) reads the first value of `key` after
/// percent-decoding (`+` is a space), trimming and lower-casing it, and takes `""`, `0`,
/// `no`, `false` and `none` for false, anything else (`1`, `true`, `True`, `yes`, `2`) for
/// true. This is stricter: every occurrence counts, not only the first; keys compare
/// ASCII-case-insensitively and trimmed; and what the daemon might read differently — a
/// malformed escape in a key or in this key's value, or a `;` anywhere (a separator for
/// older Go) — counts as setting it.
#[inline]
fn query_may_set(query: &str, key: &[u8]) -> bool {
    let query = query.strip_prefix('?').unwrap_or(query);
    if query.contains(';') {
        return true;
    }
    for pair in query.split('&') {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(name) = form_decode(raw_key) else {
            return true;
        };
        if !name.trim_ascii().eq_ignore_ascii_case(key) {
            continue;
        }
        let Some(value) = form_decode(raw_value) else {
            return true;
        };
        let value = value.trim_ascii().to_ascii_lowercase();
        if !matches!(&value[..], b"" | b"0" | b"no" | b"false" | b"none") {
            return true;
        }
    }
    false
}

/// Decodes one query component as a form does: `+` is a space, `%XX` a byte. `None` for a
/// malformed escape.
fn form_decode(raw: &str) -> Option<Vec<u8>> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push((hi << 4) | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

/// The decision order of linuxserver's socket proxy, on a matched endpoint, with the write
/// gate and the guards applied by effect.
#[inline]
fn apply(vars: VarSet, endpoint: &Endpoint, effects: Effects, framing: Framing) -> Rule {
    if let Some(var) = effects.guard
        && !vars.contains(var)
    {
        return Rule::Guard(var);
    }
    if let Gate::Toggle(toggles) = endpoint.gate
        && !framing.upgrade
        && let Some(&var) = toggles.iter().find(|&&v| vars.contains(v))
    {
        return Rule::Toggle(var);
    }
    if effects.writes() && !vars.contains(Var::Post) {
        return Rule::WriteGate;
    }
    if vars.contains(endpoint.section) {
        Rule::Section(endpoint.section)
    } else {
        Rule::SectionOff(endpoint.section)
    }
}

/// The rule that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Denied: the endpoint's guard variable is off.
    Guard(Var),
    /// Allowed: a lifecycle toggle is on.
    Toggle(Var),
    /// Denied: a write (by method or by effect) while POST is off.
    WriteGate,
    /// Allowed: the endpoint's section is on.
    Section(Var),
    /// Denied: the endpoint's section is off.
    SectionOff(Var),
    /// Denied: the request is no Docker Engine API endpoint.
    Unknown,
    /// Denied: the request target is malformed.
    Malformed(Malformed),
}

impl Rule {
    /// Whether the rule allows the request.
    pub const fn allows(self) -> bool {
        matches!(self, Rule::Toggle(_) | Rule::Section(_))
    }

    /// The variable that decided, when one did (POST for the write gate).
    pub const fn var(self) -> Option<Var> {
        match self {
            Rule::Guard(var) | Rule::Toggle(var) | Rule::Section(var) | Rule::SectionOff(var) => {
                Some(var)
            }
            Rule::WriteGate => Some(Var::Post),
            Rule::Unknown | Rule::Malformed(_) => None,
        }
    }

    /// The rule's kind as one word: `guard`, `toggle`, `write-gate`, `section`,
    /// `section-off`, `unknown` or `malformed`.
    pub const fn kind(self) -> &'static str {
        match self {
            Rule::Guard(_) => "guard",
            Rule::Toggle(_) => "toggle",
            Rule::WriteGate => "write-gate",
            Rule::Section(_) => "section",
            Rule::SectionOff(_) => "section-off",
            Rule::Unknown => "unknown",
            Rule::Malformed(_) => "malformed",
        }
    }
}

/// Why a request target is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// It does not start with `/` (or is empty).
    NotOriginForm,
    /// A character that is not allowed in a URL path.
    BadCharacter,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`: an encoded `/`.
    EncodedSlash,
    /// `%3F`, `%23` or `%25`: an encoded `?`, `#` or `%`.
    EncodedDelimiter,
    /// An escape for a byte that may not stand unencoded in a path (space, control,
    /// non-ASCII, `"`, `<`, …).
    EncodedUnsafe,
    /// `//`.
    EmptySegment,
    /// A `/` at the end.
    TrailingSlash,
    /// A `.` or `..` segment.
    DotSegment,
    /// A space, control or non-ASCII byte or `#` in the query.
    BadQuery,
    /// More segments than any Docker endpoint has (24).
    TooManySegments,
    /// A request target longer than 65,535 bytes.
    TooLong,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::NotOriginForm => "the path does not start with `/`",
            Malformed::BadCharacter => "the path holds a character that is not allowed in a URL",
            Malformed::BadEscape => "the path holds a malformed percent-escape",
            Malformed::EncodedSlash => {
                "the path holds an encoded `/` (%2F), which would change its meaning once decoded"
            }
            Malformed::EncodedDelimiter => {
                "the path holds an encoded `?`, `#` or `%`, which would change its meaning once \
                 decoded"
            }
            Malformed::EncodedUnsafe => {
                "the path holds an escape for a character that may not stand in a URL path \
                 (space, control, non-ASCII, `\"`, …)"
            }
            Malformed::EmptySegment => "the path holds an empty segment (`//`)",
            Malformed::TrailingSlash => "the path ends with `/`",
            Malformed::DotSegment => "the path holds a `.` or `..` segment",
            Malformed::BadQuery => "the query holds a space, control or non-ASCII byte or `#`",
            Malformed::TooManySegments => "the path has more segments than any Docker endpoint",
            Malformed::TooLong => "the request target is longer than 65,535 bytes",
        })
    }
}

/// The outcome of [`CompiledPolicy::decide`].
#[must_use = "a decision must be checked before the request is sent"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    allowed: bool,
    rule: Rule,
    endpoint: Option<&'static Endpoint>,
    method: &'a str,
    path: Cow<'a, str>,
    /// The API path (no version prefix, no query) within `path`.
    api: Range<usize>,
    target: Option<(TargetKind, Range<usize>)>,
    vars: VarSet,
    effects: Effects,
    framing: Framing,
}

/// The resource a request names in its path: a container, image, network, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'d> {
    /// What the name names.
    pub kind: TargetKind,
    /// The ID or name exactly as in the (decoded) path, e.g. `web-1` or
    /// `library/busybox:latest`.
    pub name: &'d str,
}

impl<'a> Decision<'a> {
    /// Whether the request may be sent.
    #[inline]
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// The rule that decided.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// The endpoint the request matched, if any.
    pub fn endpoint(&self) -> Option<&'static Endpoint> {
        self.endpoint
    }

    /// What the request does, as decided: the write gate and the guard it needed. Nothing
    /// for a request that matched no endpoint.
    pub fn effects(&self) -> Effects {
        self.effects
    }

    /// The method as given.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The path and query to forward: percent-decoded once, version prefix and query kept.
    /// Borrowed from the input unless an escape was decoded. For a malformed request this
    /// is the input as given, and must not be forwarded (the decision denies anyway).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Takes the path and query to forward.
    pub fn into_path(self) -> Cow<'a, str> {
        self.path
    }

    /// The path the endpoint was matched on: no version prefix, no query.
    pub fn api_path(&self) -> &str {
        &self.path[self.api.clone()]
    }

    /// The resource named in the path, for endpoints that name one.
    pub fn target(&self) -> Option<Target<'_>> {
        self.target.as_ref().map(|(kind, range)| Target {
            kind: *kind,
            name: &self.path[range.clone()],
        })
    }

    /// The container ID or name of a container endpoint (`/containers/{id}/…`): check it
    /// against [`CompiledPolicy::containers`] before sending.
    pub fn container(&self) -> Option<&str> {
        self.target_of(TargetKind::Container)
    }

    /// The image reference of an image endpoint (`/images/{name}/…`,
    /// `/distribution/{name}/json`). Pulls name their image in the query (`fromImage`),
    /// not here.
    pub fn image(&self) -> Option<&str> {
        self.target_of(TargetKind::Image)
    }

    fn target_of(&self, kind: TargetKind) -> Option<&str> {
        self.target().filter(|t| t.kind == kind).map(|t| t.name)
    }

    /// A sentence saying what was decided and, for a denial, which variables would allow
    /// the request, e.g. "POST /containers/abc/stop is denied: set ALLOW_STOP=1 (or
    /// ALLOW_RESTARTS=1, or POST=1 with CONTAINERS=1) to allow it".
    pub fn reason(&self) -> String {
        let request = format!("{} {}", self.method, self.path);
        let endpoint = match (self.rule, self.endpoint) {
            (Rule::Malformed(why), _) => {
                return format!("{request} is denied: {why}; no variable allows it");
            }
            (Rule::Unknown, _) | (_, None) => return self.unknown_reason(&request),
            (_, Some(endpoint)) => endpoint,
        };
        // What the section path needs: the guard, the write gate, the section.
        let mut needs: Vec<Var> = Vec::with_capacity(3);
        needs.extend(self.effects.guard);
        if self.effects.writes() {
            needs.push(Var::Post);
        }
        needs.push(endpoint.section);
        match self.rule {
            Rule::Toggle(var) => format!("{request} is allowed by {var}=1"),
            Rule::Section(_) => format!("{request} is allowed by {}", join(&needs, " and ")),
            _ => {
                let missing: Vec<Var> = needs
                    .into_iter()
                    .filter(|&v| !self.vars.contains(v))
                    .collect();
                let note = self.effect_note(endpoint);
                match endpoint.gate {
                    Gate::Toggle(toggles) if !self.framing.upgrade => {
                        let mut alternatives = toggles.iter().map(|v| format!("{v}=1"));
                        let first = alternatives.next().unwrap_or_default();
                        let mut others: Vec<String> = alternatives.collect();
                        others.push(join(&missing, " with "));
                        format!(
                            "{request} is denied: set {first} (or {}) to allow it{note}",
                            others.join(", or ")
                        )
                    }
                    _ => format!(
                        "{request} is denied: set {} to allow it{note}",
                        join(&missing, " and ")
                    ),
                }
            }
        }
    }

    /// Why a denied request needs more than its method suggests, in parentheses; empty when
    /// the method says it all.
    fn effect_note(&self, endpoint: &Endpoint) -> &'static str {
        match (endpoint.effect, self.effects.write) {
            (Effect::Attach, _) => {
                " (attaching to a container is a write whatever the method, since the session \
                 can carry stdin into it, and needs ALLOW_LOGS=1 as well when it may return the \
                 container's logs: logs=1, or a form body)"
            }
            (_, Some(WriteCause::Effect)) => " (its effect is a write whatever the method)",
            (_, Some(WriteCause::Upgrade)) => {
                " (it asks to upgrade the connection to a two-way stream the policy cannot see \
                 into, which is a write whatever the method)"
            }
            _ => "",
        }
    }

    fn unknown_reason(&self, request: &str) -> String {
        let api = self.api_path();
        // Podman's versions have three parts (`/v4.0.0/libpod/…`), Docker's two.
        let unversioned = match api.strip_prefix("/v").and_then(|rest| rest.split_once('/')) {
            Some((version, rest)) if version.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                &api[api.len() - rest.len() - 1..]
            }
            _ => api,
        };
        if unversioned == "/libpod" || unversioned.starts_with("/libpod/") {
            return format!(
                "{request} is denied: it is Podman's libpod API, which Capstan does not \
                 serve, so no variable allows it (the LIBPOD_* variables are accepted for \
                 linuxserver compatibility and have no effect)"
            );
        }
        let methods: Vec<&str> = endpoints::with_path(api)
            .map(|endpoint| endpoint.method.as_str())
            .collect();
        let hint = if methods.contains(&self.method.to_ascii_uppercase().as_str()) {
            format!(
                " (methods are case-sensitive: write {})",
                self.method.to_ascii_uppercase()
            )
        } else if !methods.is_empty() {
            format!(" ({api} takes {} only)", methods.join(" or "))
        } else {
            String::new()
        };
        format!(
            "{request} is denied: it is not a Docker Engine API endpoint{hint}, so no variable \
             allows it"
        )
    }
}

/// Prints the [`Decision::reason`].
impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

fn join(vars: &[Var], separator: &str) -> String {
    vars.iter()
        .map(|v| format!("{v}=1"))
        .collect::<Vec<_>>()
        .join(separator)
}

/// The most segments a path may have, version prefix included. No Docker endpoint comes
/// close; image references with twenty path components do not occur.
const MAX_SEGMENTS: usize = 24;

/// Where the parts of a normalised request target are.
struct Layout {
    /// Where the path ends and the query (with its `?`) starts.
    path_end: usize,
    /// How many segments the path has.
    count: usize,
    /// Whether the path holds `%` escapes.
    escaped: bool,
}

/// Byte classes of a request target, for the single scanning pass.
const BAD: u8 = 0;
const PLAIN: u8 = 1;
const SLASH: u8 = 2;
const PERCENT: u8 = 3;
const QUERY: u8 = 4;

/// RFC 3986 `pchar` (unreserved, sub-delims, `:`, `@`) is plain; `/`, `%` and `?` are
/// structure; everything else (space, controls, `"`, `#`, `<`, `\`, non-ASCII, …) is bad.
static PATH_CLASS: [u8; 256] = {
    let mut table = [BAD; 256];
    let plain = b"-._~!$&'()*+,;=:@";
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            table[b] = PLAIN;
        }
        b += 1;
    }
    let mut i = 0;
    while i < plain.len() {
        table[plain[i] as usize] = PLAIN;
        i += 1;
    }
    table[b'/' as usize] = SLASH;
    table[b'%' as usize] = PERCENT;
    table[b'?' as usize] = QUERY;
    table
};

/// The query may hold any printable ASCII but `#`.
#[inline]
fn query_byte_ok(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'#'
}

/// Normalises a request target in origin form, writing the path's segments to `segments`.
/// Returns the target to forward (decoded once, borrowed when nothing was decoded) and
/// where its parts are.
#[inline]
fn normalise<'a>(
    input: &'a str,
    segments: &mut [Span; MAX_SEGMENTS],
) -> Result<(Cow<'a, str>, Layout), Malformed> {
    let layout = scan(input, segments)?;
    if !layout.escaped {
        return Ok((Cow::Borrowed(input), layout));
    }
    let decoded = decode(&input[..layout.path_end], &input[layout.path_end..])?;
    let layout = scan(&decoded, segments)?;
    debug_assert!(!layout.escaped, "decoding leaves no `%` in the path");
    Ok((Cow::Owned(decoded), layout))
}

/// One pass over the target: classifies every byte, splits the path into segments and
/// refuses empty, `.` and `..` segments and a trailing slash. The root `/` has no segment.
#[inline]
fn scan(input: &str, segments: &mut [Span; MAX_SEGMENTS]) -> Result<Layout, Malformed> {
    let bytes = input.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Malformed::NotOriginForm);
    }
    if bytes.len() > u16::MAX as usize {
        return Err(Malformed::TooLong);
    }
    let mut count = 0;
    let mut escaped = false;
    let mut start = 1;
    let mut i = 1;
    while i < bytes.len() {
        match PATH_CLASS[bytes[i] as usize] {
            PLAIN => {}
            SLASH => {
                push_segment(bytes, start, i, false, segments, &mut count)?;
                start = i + 1;
            }
            PERCENT => escaped = true,
            QUERY => break,
            _ => return Err(Malformed::BadCharacter),
        }
        i += 1;
    }
    let path_end = i;
    if path_end > 1 {
        push_segment(bytes, start, path_end, true, segments, &mut count)?;
    }
    if !bytes[path_end..].iter().all(|&b| query_byte_ok(b)) {
        return Err(Malformed::BadQuery);
    }
    Ok(Layout {
        path_end,
        count,
        escaped,
    })
}

#[inline]
fn push_segment(
    bytes: &[u8],
    start: usize,
    end: usize,
    last: bool,
    segments: &mut [Span; MAX_SEGMENTS],
    count: &mut usize,
) -> Result<(), Malformed> {
    match &bytes[start..end] {
        [] if last => return Err(Malformed::TrailingSlash),
        [] => return Err(Malformed::EmptySegment),
        b"." | b".." => return Err(Malformed::DotSegment),
        _ => {}
    }
    let slot = segments.get_mut(*count).ok_or(Malformed::TooManySegments)?;
    // `scan` refused targets longer than u16::MAX bytes.
    *slot = Span(start as u16, end as u16);
    *count += 1;
    Ok(())
}

/// Whether a segment is an API version: `v`, digits, `.`, digits.
#[inline]
fn is_version(segment: &[u8]) -> bool {
    let [b'v', version @ ..] = segment else {
        return false;
    };
    let major = version.iter().take_while(|b| b.is_ascii_digit()).count();
    let minor = version.len().saturating_sub(major + 1);
    major > 0
        && minor > 0
        && version[major] == b'.'
        && version[major + 1..].iter().all(u8::is_ascii_digit)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes every escape once; the query is appended unchanged. An escape must decode to a
/// character that may stand unencoded in a path and does not change its structure.
fn decode(raw_path: &str, query: &str) -> Result<String, Malformed> {
    let bytes = raw_path.as_bytes();
    let mut out = String::with_capacity(raw_path.len() + query.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Malformed::BadEscape);
        };
        let decoded = (hi << 4) | lo;
        match decoded {
            b'/' => return Err(Malformed::EncodedSlash),
            b'?' | b'#' | b'%' => return Err(Malformed::EncodedDelimiter),
            _ if PATH_CLASS[decoded as usize] == PLAIN => out.push(char::from(decoded)),
            _ => return Err(Malformed::EncodedUnsafe),
        }
        i += 3;
    }
    out.push_str(query);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(input: &str) -> Result<(Cow<'_, str>, Layout, Vec<Span>), Malformed> {
        let mut segments = [Span(0, 0); MAX_SEGMENTS];
        let (path, layout) = normalise(input, &mut segments)?;
        let used = segments[..layout.count].to_vec();
        Ok((path, layout, used))
    }

    #[test]
    fn recognises_version_segments_of_digits_dot_digits_only() {
        for segment in ["v1.41", "v1.24", "v10.123", "v0.0"] {
            assert!(is_version(segment.as_bytes()), "{segment}");
        }
        for segment in [
            "v1", "v1.", "v.1", "v1.41x", "V1.41", "vx.y", "v", "v1.2.3", "",
        ] {
            assert!(!is_version(segment.as_bytes()), "{segment}");
        }
    }

    #[test]
    fn splits_the_path_into_segments_and_stops_at_the_query() {
        let (path, layout, segments) = normal("/v1.41/containers/json?all=1/x").unwrap();
        let texts: Vec<&str> = segments.iter().map(|s| s.of(&path)).collect();
        assert_eq!(texts, ["v1.41", "containers", "json"]);
        assert_eq!(&path[layout.path_end..], "?all=1/x");
        assert_eq!(normal("/").unwrap().1.count, 0);
        assert_eq!(normal("/?x").unwrap().1.count, 0);
    }

    #[test]
    fn refuses_paths_with_more_segments_than_any_endpoint() {
        let deep = "/images/".to_owned() + &"a/".repeat(23) + "json";
        assert_eq!(normal(&deep).err(), Some(Malformed::TooManySegments));
        let fine = "/images/".to_owned() + &"a/".repeat(22) + "json";
        assert!(normal(&fine).is_ok());
        let long = "/images/".to_owned() + &"a".repeat(70_000) + "/json";
        assert_eq!(normal(&long).err(), Some(Malformed::TooLong));
    }

    #[test]
    fn borrows_the_input_when_nothing_was_decoded() {
        let (path, _, _) = normal("/v1.41/containers/json?all=1").unwrap();
        assert!(matches!(path, Cow::Borrowed(_)));
    }

    #[test]
    fn decodes_escapes_once_and_keeps_the_query_verbatim() {
        let (path, layout, segments) = normal("/%63ontainers/json?filters=%7B%7D").unwrap();
        assert_eq!(path, "/containers/json?filters=%7B%7D");
        assert_eq!(layout.path_end, 16);
        assert_eq!(segments[0].of(&path), "containers");
        assert_eq!(normal("/%2563").err(), Some(Malformed::EncodedDelimiter));
    }

    #[test]
    fn refuses_each_kind_of_malformed_target() {
        let cases = [
            ("", Malformed::NotOriginForm),
            ("containers/json", Malformed::NotOriginForm),
            ("http://x/containers/json", Malformed::NotOriginForm),
            ("/containers/json x", Malformed::BadCharacter),
            ("/containers/a\"b/json", Malformed::BadCharacter),
            ("/containers/é/json", Malformed::BadCharacter),
            ("/containers/%zz/json", Malformed::BadEscape),
            ("/containers/%4", Malformed::BadEscape),
            ("/containers%2Fjson", Malformed::EncodedSlash),
            ("/containers%2fjson", Malformed::EncodedSlash),
            ("/containers/a%3Fb/json", Malformed::EncodedDelimiter),
            ("/containers/a%23b/json", Malformed::EncodedDelimiter),
            ("/containers/a%20b/json", Malformed::EncodedUnsafe),
            ("/containers/a%00b/json", Malformed::EncodedUnsafe),
            ("/containers/a%C3%A9/json", Malformed::EncodedUnsafe),
            ("/containers/a%22b/json", Malformed::EncodedUnsafe),
            ("/containers/a%5Bb/json", Malformed::EncodedUnsafe),
            ("/containers//json", Malformed::EmptySegment),
            ("//containers/json", Malformed::EmptySegment),
            ("/containers/json/", Malformed::TrailingSlash),
            ("/v1.41/", Malformed::TrailingSlash),
            ("/containers/./json", Malformed::DotSegment),
            ("/containers/abc/..", Malformed::DotSegment),
            ("/containers/%2E%2E/json", Malformed::DotSegment),
            ("/containers/json?a b", Malformed::BadQuery),
            ("/containers/json?a#b", Malformed::BadQuery),
        ];
        for (input, expected) in cases {
            assert_eq!(normal(input).err(), Some(expected), "{input}");
        }
    }
}
