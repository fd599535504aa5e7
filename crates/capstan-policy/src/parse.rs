//! Reading a [`Policy`]: from a socket-proxy environment block, or from TOML.
//!
//! The environment block is what operators already have: the `environment:` section of
//! the compose service that runs their socket proxy, or its `.env` file, pasted as is.
//! Accepted, one entry a line:
//!
//! ```text
//! # a comment                   whole-line comments and blank lines are skipped
//! environment:                  tolerated as the first entry (the compose key)
//! CONTAINERS=1                  shell / env-file form
//! export POST=0                 `export ` prefix
//! - ALLOW_RESTARTS=1            compose list form; `- "INFO=1"` with the item quoted too
//! IMAGES: 1                     compose mapping form
//! NETWORKS="1"  # trailing      quoted values ('…' or "…"), trailing ` # comments`
//! ```
//!
//! A name given twice takes the last value, as a shell would. The error for a line names
//! the line.
//!
//! The TOML form (plugin manifests, the engine config) is a table of the same names with
//! integer values, plus the scopes no proxy has:
//!
//! ```toml
//! CONTAINERS = 1
//! ALLOW_RESTARTS = 1
//! devices = ["prod-*", "local"]
//!
//! [containers]
//! labels = ["autoheal=true", "com.example.tier"]
//! names = ["web-*"]
//!
//! outbound = ["https://ntfy.sh"] # origins the plugin may reach over HTTP (`outbound`)
//!
//! [create]                      # what a container create may ask of the host
//! privileged = false            # the defaults; see `policy::create`
//! host_namespaces = false
//! bind_roots = ["/srv/app"]
//! images = ["registry.local/app:*"]
//! ```
//!
//! In an environment block the create guard's settings are `CREATE_PRIVILEGED=1`,
//! `CREATE_HOST_NAMESPACES=1`, `CREATE_DEVICES=1` (integers, as the variables) and
//! `CREATE_CAP_ADD`, `CREATE_BIND_ROOTS`, `CREATE_IMAGES` (comma-separated lists, no empty
//! item; the last assignment wins, as for every name). Any other `CREATE_` name is an
//! error.
//!
//! Keys are case-sensitive (`CONTAINERS` is the variable, `containers` the scope table).
//! Unknown keys are errors with a did-you-mean; a key set twice is an error (TOML refuses
//! it already, and so does [`Policy`]'s `Deserialize` for any other format). A value may
//! be an integer or a string holding one (`"1"`); `true` and `false` are refused. The
//! `[create]` table is Capstan's own: it takes booleans and lists of strings.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use thiserror::Error;

use crate::Policy;
use crate::create::{CreateGuard, CreateTable};
use crate::scope::{ContainerScope, DeviceScope};
use crate::vars::{Inert, ValueError, Var, closest, parse_assignment, parse_value};

/// Why a policy could not be read.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A line of an environment block.
    #[error("line {line}: {error}")]
    Env {
        /// 1-based line number in the block.
        line: usize,
        /// What is wrong with it.
        error: EnvLineError,
    },
    /// A TOML policy (the message carries the position).
    #[error("invalid policy: {0}")]
    Toml(#[from] toml::de::Error),
}

/// What is wrong with one line of an environment block.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvLineError {
    /// Unknown name or invalid value.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// Not `NAME=VALUE` or `NAME: VALUE`.
    #[error("expected NAME=VALUE (or NAME: VALUE), found `{0}`")]
    Syntax(String),
    /// `NAME` alone (compose's pass-through form) or `NAME=` with nothing after it.
    #[error("{0} has no value: write {0}=1 to turn it on or {0}=0 to leave it off")]
    MissingValue(String),
    /// A quote that is not closed on its line.
    #[error("unterminated quote in `{0}`")]
    UnterminatedQuote(String),
    /// A `CREATE_*` name that is no create-guard setting.
    #[error(
        "`{0}` is not a create-guard setting: the names are CREATE_PRIVILEGED, CREATE_HOST_NAMESPACES, CREATE_DEVICES, CREATE_CAP_ADD, CREATE_BIND_ROOTS and CREATE_IMAGES"
    )]
    UnknownCreate(String),
    /// A bad value for a create-guard setting.
    #[error("{0}")]
    Create(String),
}

/// One entry of an environment block.
enum EnvEntry {
    /// A socket-proxy variable.
    Var(Var, bool),
    /// A create-guard setting (`CREATE_…`), with its unquoted value.
    Create(String, String),
    /// An inert variable of linuxserver's proxy, with its checked value.
    Inert(Inert, String),
}

/// Parses a socket-proxy environment block (see the module docs for the forms accepted).
pub fn env_block(text: &str) -> Result<Policy, PolicyError> {
    let mut policy = Policy::default();
    let mut seen_entry = false;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = !seen_entry;
        seen_entry = true;
        if first && strip_comment(line) == "environment:" {
            continue;
        }
        let at = |error| PolicyError::Env {
            line: index + 1,
            error,
        };
        match env_line(line).map_err(at)? {
            EnvEntry::Var(var, on) => policy.set(var, on),
            EnvEntry::Inert(var, value) => policy.set_inert(var, &value),
            EnvEntry::Create(name, value) => match policy.create.set_env(&name, &value) {
                None => return Err(at(EnvLineError::UnknownCreate(name))),
                Some(Err(why)) => return Err(at(EnvLineError::Create(why))),
                Some(Ok(())) => {}
            },
        }
    }
    Ok(policy)
}

/// One non-blank, non-comment line, already trimmed.
fn env_line(line: &str) -> Result<EnvEntry, EnvLineError> {
    let mut entry = line;
    if let Some(item) = entry.strip_prefix('-') {
        entry = item.trim_start();
        if entry.starts_with(['"', '\'']) {
            // A quoted list item: `- "POST=0"`.
            let (inner, rest) = unquote(entry).ok_or_else(|| unterminated(line))?;
            if !strip_comment(rest).is_empty() {
                return Err(EnvLineError::Syntax(line.to_owned()));
            }
            entry = inner;
        }
    }
    if let Some(rest) = entry.strip_prefix("export ") {
        entry = rest.trim_start();
    }
    let name_len = entry
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let (name, rest) = entry.split_at(name_len);
    let starts_like_a_name = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !starts_like_a_name {
        return Err(EnvLineError::Syntax(line.to_owned()));
    }
    let rest = rest.trim_start();
    let value = if let Some(value) = rest.strip_prefix('=') {
        value
    } else if let Some(value) = rest.strip_prefix(':') {
        value
    } else if strip_comment(rest).is_empty() {
        // `NAME` alone: check the name first so a typo is reported as such.
        if !name.starts_with(CREATE_PREFIX) && Inert::get(name).is_none() {
            Var::from_name(name).ok_or_else(|| ValueError::unknown(name))?;
        }
        return Err(EnvLineError::MissingValue(name.to_owned()));
    } else {
        return Err(EnvLineError::Syntax(line.to_owned()));
    };
    let value = value.trim_start();
    let value = if value.starts_with(['"', '\'']) {
        let (inner, rest) = unquote(value).ok_or_else(|| unterminated(line))?;
        if !strip_comment(rest).is_empty() {
            return Err(EnvLineError::Syntax(line.to_owned()));
        }
        inner
    } else {
        strip_comment(value)
    };
    if let Some(var) = Inert::get(name) {
        var.check(value)?;
        return Ok(EnvEntry::Inert(var, value.to_owned()));
    }
    if value.trim().is_empty() {
        if name.starts_with(CREATE_PREFIX) || Var::from_name(name).is_some() {
            return Err(EnvLineError::MissingValue(name.to_owned()));
        }
        return Err(ValueError::unknown(name).into());
    }
    if name.starts_with(CREATE_PREFIX) {
        return Ok(EnvEntry::Create(name.to_owned(), value.to_owned()));
    }
    let var = Var::from_name(name).ok_or_else(|| ValueError::unknown(name))?;
    Ok(EnvEntry::Var(var, parse_value(var, value)?))
}

/// The names of the create guard's settings in an environment block start with this.
const CREATE_PREFIX: &str = "CREATE_";

fn unterminated(line: &str) -> EnvLineError {
    EnvLineError::UnterminatedQuote(line.to_owned())
}

/// Splits `"inner" rest` (or with single quotes) into `inner` and `rest`.
fn unquote(text: &str) -> Option<(&str, &str)> {
    let quote = text.chars().next()?;
    let body = &text[1..];
    let end = body.find(quote)?;
    Some((&body[..end], &body[end + 1..]))
}

/// Drops a trailing comment (`#` at the start or after whitespace) and trims.
fn strip_comment(text: &str) -> &str {
    let bytes = text.as_bytes();
    let cut = (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
        .unwrap_or(bytes.len());
    text[..cut].trim()
}

/// Parses a TOML document whose top level is a policy table.
pub fn toml_str(text: &str) -> Result<Policy, PolicyError> {
    Ok(toml::from_str(text)?)
}

/// The keys a policy table accepts besides the variables.
const SCOPE_KEYS: [&str; 4] = ["devices", "containers", "create", "outbound"];

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PolicyVisitor)
    }
}

struct PolicyVisitor;

impl<'de> Visitor<'de> for PolicyVisitor {
    type Value = Policy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a policy table of socket-proxy variables (CONTAINERS = 1, …), `devices`, \
             `[containers]`, `[create]` and `outbound`",
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Policy, A::Error> {
        let mut policy = Policy::default();
        let mut devices_seen = false;
        let mut containers_seen = false;
        let mut create_seen = false;
        let mut outbound_seen = false;
        while let Some(key) = map.next_key::<PolicyKey>()? {
            match key {
                PolicyKey::Var(var) => {
                    if policy.explicit(var).is_some() {
                        return Err(de::Error::custom(format_args!("{var} is set twice")));
                    }
                    let on = map.next_value_seed(VarValue(var))?;
                    policy.set(var, on);
                }
                PolicyKey::Devices => {
                    if std::mem::replace(&mut devices_seen, true) {
                        return Err(de::Error::custom("`devices` is set twice"));
                    }
                    policy.devices = map.next_value()?;
                }
                PolicyKey::Containers => {
                    if std::mem::replace(&mut containers_seen, true) {
                        return Err(de::Error::custom("`containers` is set twice"));
                    }
                    policy.containers = map.next_value()?;
                }
                PolicyKey::Create => {
                    if std::mem::replace(&mut create_seen, true) {
                        return Err(de::Error::custom("`create` is set twice"));
                    }
                    let table: CreateTable = map.next_value()?;
                    policy.create = CreateGuard::try_from(table).map_err(de::Error::custom)?;
                }
                PolicyKey::Outbound => {
                    if std::mem::replace(&mut outbound_seen, true) {
                        return Err(de::Error::custom("`outbound` is set twice"));
                    }
                    policy.outbound = map.next_value()?;
                }
            }
        }
        Ok(policy)
    }
}

/// A key of a policy table; an unknown key fails here, so the error points at it.
enum PolicyKey {
    Var(Var),
    Devices,
    Containers,
    Create,
    Outbound,
}

impl<'de> Deserialize<'de> for PolicyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(PolicyKeyVisitor)
    }
}

struct PolicyKeyVisitor;

impl Visitor<'_> for PolicyKeyVisitor {
    type Value = PolicyKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a socket-proxy variable, `devices`, `containers`, `create` or `outbound`")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<PolicyKey, E> {
        if let Some(var) = Var::from_name(key) {
            return Ok(PolicyKey::Var(var));
        }
        match key {
            "devices" => Ok(PolicyKey::Devices),
            "containers" => Ok(PolicyKey::Containers),
            "create" => Ok(PolicyKey::Create),
            "outbound" => Ok(PolicyKey::Outbound),
            _ => Err(E::custom(unknown_key(key))),
        }
    }
}

fn unknown_key(key: &str) -> String {
    if Inert::get(key).is_some() {
        return ValueError::unknown(key).to_string();
    }
    let names = Var::ALL.iter().map(|v| v.name()).chain(SCOPE_KEYS);
    match closest(key, names) {
        Some(name) => format!("unknown policy key `{key}` (did you mean `{name}`?)"),
        None => ValueError::unknown(key).to_string(),
    }
}

/// A list of device names and globs, validated as it is read.
impl<'de> Deserialize<'de> for DeviceScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let patterns = Vec::<String>::deserialize(deserializer)?;
        DeviceScope::new(patterns).map_err(de::Error::custom)
    }
}

/// A `[containers]` table (`labels`, `names`), validated as it is read.
impl<'de> Deserialize<'de> for ContainerScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = deserializer.deserialize_map(ContainersVisitor)?;
        ContainerScope::new(table.labels, table.names).map_err(de::Error::custom)
    }
}

/// Reads one variable's value, naming the variable in every error.
struct VarValue(Var);

impl<'de> DeserializeSeed<'de> for VarValue {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for VarValue {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer for {} (1 = on, 0 = off)", self.0)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<bool, E> {
        Ok(value != 0)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<bool, E> {
        if value < 0 {
            return Err(E::custom(ValueError::InvalidValue {
                var: self.0,
                value: value.to_string(),
            }));
        }
        Ok(value != 0)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
        parse_value(self.0, value).map_err(E::custom)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
        Err(E::custom(ValueError::InvalidValue {
            var: self.0,
            value: value.to_string(),
        }))
    }
}

/// The `[containers]` sub-table.
struct ContainersTable {
    labels: Vec<String>,
    names: Vec<String>,
}

struct ContainersVisitor;

impl<'de> Visitor<'de> for ContainersVisitor {
    type Value = ContainersTable;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a `[containers]` table with `labels` and `names` lists (the variable is \
             `CONTAINERS`, in capitals)",
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ContainersTable, A::Error> {
        let mut labels: Option<Vec<String>> = None;
        let mut names: Option<Vec<String>> = None;
        while let Some(key) = map.next_key::<ContainersKey>()? {
            let (slot, name) = match key {
                ContainersKey::Labels => (&mut labels, "labels"),
                ContainersKey::Names => (&mut names, "names"),
            };
            if slot.is_some() {
                return Err(de::Error::custom(format_args!(
                    "`{name}` is set twice in [containers]"
                )));
            }
            *slot = Some(map.next_value()?);
        }
        Ok(ContainersTable {
            labels: labels.unwrap_or_default(),
            names: names.unwrap_or_default(),
        })
    }
}

/// A key of the `[containers]` table.
enum ContainersKey {
    Labels,
    Names,
}

impl<'de> Deserialize<'de> for ContainersKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(ContainersKeyVisitor)
    }
}

struct ContainersKeyVisitor;

impl Visitor<'_> for ContainersKeyVisitor {
    type Value = ContainersKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`labels` or `names`")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<ContainersKey, E> {
        match key {
            "labels" => Ok(ContainersKey::Labels),
            "names" => Ok(ContainersKey::Names),
            _ => {
                let hint = closest(key, ["labels", "names"].into_iter())
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                Err(E::custom(format_args!(
                    "unknown key `{key}` in [containers]{hint}: it takes `labels` and `names`"
                )))
            }
        }
    }
}

/// Parses `NAME=VALUE` pairs such as the ones a CLI might take (`--set CONTAINERS=1`).
pub fn assignment(text: &str) -> Result<(Var, bool), EnvLineError> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| EnvLineError::Syntax(text.to_owned()))?;
    Ok(parse_assignment(name.trim(), value)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn on(policy: &Policy) -> Vec<&'static str> {
        Var::ALL
            .iter()
            .filter(|&&v| policy.get(v))
            .map(|v| v.name())
            .collect()
    }

    fn env_err(text: &str) -> (usize, EnvLineError) {
        match env_block(text) {
            Err(PolicyError::Env { line, error }) => (line, error),
            other => panic!("expected an env error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn reads_shell_env_file_lines_with_comments_and_export() {
        let policy = env_block(
            "# socket proxy\n\nCONTAINERS=1\nexport POST=0\nIMAGES=1 # pull\n  INFO = 1\n",
        )
        .unwrap();
        assert_eq!(
            on(&policy),
            ["PING", "VERSION", "EVENTS", "INFO", "CONTAINERS", "IMAGES"]
        );
        assert_eq!(policy.explicit(Var::Post), Some(false));
        assert_eq!(policy.explicit(Var::Exec), None);
    }

    #[test]
    fn reads_a_pasted_compose_list_environment() {
        let block = "    environment:\n      - CONTAINERS=1\n      - \"ALLOW_RESTARTS=1\"  # heal\n      - 'POST=0'\n      - EVENTS=0\n";
        let policy = env_block(block).unwrap();
        assert_eq!(
            on(&policy),
            ["PING", "VERSION", "CONTAINERS", "ALLOW_RESTARTS"]
        );
    }

    #[test]
    fn reads_a_pasted_compose_mapping_environment() {
        let block = "environment:\n  CONTAINERS: 1\n  IMAGES: \"1\"\n  POST: '0' # read-only\n  ALLOW_START: 1\n";
        let policy = env_block(block).unwrap();
        assert_eq!(
            on(&policy),
            [
                "PING",
                "VERSION",
                "EVENTS",
                "CONTAINERS",
                "IMAGES",
                "ALLOW_START"
            ]
        );
    }

    #[test]
    fn reads_quoted_values_and_crlf_line_ends() {
        let policy = env_block("CONTAINERS=\"1\"\r\nIMAGES='2'\r\nPOST=\" 0 \"\r\n").unwrap();
        assert_eq!(
            on(&policy),
            ["PING", "VERSION", "EVENTS", "CONTAINERS", "IMAGES"]
        );
    }

    #[test]
    fn lets_the_last_assignment_win_like_a_shell() {
        let policy = env_block("POST=1\nPOST=0\nCONTAINERS=0\nCONTAINERS=1\n").unwrap();
        assert!(!policy.get(Var::Post));
        assert!(policy.get(Var::Containers));
    }

    #[test]
    fn keeps_defaults_for_an_empty_block() {
        let policy = env_block("\n# nothing\n\n").unwrap();
        assert_eq!(on(&policy), ["PING", "VERSION", "EVENTS"]);
        assert!(policy.devices().is_empty());
        assert!(policy.containers().is_all());
    }

    #[test]
    fn rejects_non_integer_values_with_the_line_and_variable() {
        for (text, value) in [
            ("CONTAINERS=1\nPOST=true\n", "true"),
            ("CONTAINERS=1\nPOST: yes\n", "yes"),
            ("CONTAINERS=1\nPOST=1x\n", "1x"),
        ] {
            let (line, error) = env_err(text);
            assert_eq!(line, 2);
            assert_eq!(
                error,
                EnvLineError::Value(ValueError::InvalidValue {
                    var: Var::Post,
                    value: value.into()
                })
            );
        }
        let message = env_block("\nPOST=true").unwrap_err().to_string();
        assert!(
            message.starts_with("line 2: POST has value `true`"),
            "{message}"
        );
    }

    #[test]
    fn rejects_empty_values_naming_the_variable() {
        for text in ["POST=", "POST=  # off?", "POST:", "- POST", "POST=\"\""] {
            let (line, error) = env_err(text);
            assert_eq!(line, 1);
            assert_eq!(error, EnvLineError::MissingValue("POST".into()), "{text}");
        }
    }

    #[test]
    fn rejects_unknown_names_with_a_suggestion() {
        let (line, error) = env_err("CONTAINERS=1\n\nCONTAINER=1\n");
        assert_eq!(line, 3);
        assert_eq!(
            error.to_string(),
            "`CONTAINER` is not a policy variable (did you mean `CONTAINERS`?)"
        );
        let (_, error) = env_err("ALLOW_RESTART=1");
        assert!(error.to_string().contains("`ALLOW_RESTARTS`"), "{error}");
        let (_, error) = env_err("- PUID=1000");
        assert_eq!(
            error,
            EnvLineError::Value(ValueError::ProxySetting("PUID".into()))
        );
        let (_, error) = env_err("LIBPOD_PNG=1");
        assert!(error.to_string().contains("`LIBPOD_PING`"), "{error}");
    }

    #[test]
    fn accepts_linuxservers_libpod_and_process_variables_and_keeps_them_inert() {
        let block = "environment:\n  - CONTAINERS=1\n  - LOG_LEVEL=info #optional\n  \
                     - TZ=Etc/UTC\n  - LIBPOD_ALLOW_PAUSE=1\n  - LIBPOD_PING=1\n  \
                     - LIBPOD_CONTAINERS=1\n  - LIBPOD_PING=0\n  - DISABLE_IPV6=1\n";
        let policy = Policy::from_env_block(block).unwrap();
        let inert: Vec<(&str, &str)> = policy
            .inert()
            .iter()
            .map(|(v, value)| (v.name(), value.as_str()))
            .collect();
        assert_eq!(
            inert,
            [
                ("LOG_LEVEL", "info"),
                ("TZ", "Etc/UTC"),
                ("LIBPOD_ALLOW_PAUSE", "1"),
                ("LIBPOD_PING", "0"),
                ("LIBPOD_CONTAINERS", "1"),
                ("DISABLE_IPV6", "1"),
            ]
        );
        let (line, error) = env_err("CONTAINERS=1\nLIBPOD_PAUSE=1\n");
        assert_eq!(line, 2);
        assert!(
            error.to_string().contains("not a policy variable"),
            "{error}"
        );
        let (line, error) = env_err("LOG_LEVEL=loud");
        assert_eq!(line, 1);
        assert!(
            error.to_string().contains("LOG_LEVEL has value `loud`"),
            "{error}"
        );
        let toml = Policy::from_toml_str("CONTAINERS = 1\nLIBPOD_PING = 1\n").unwrap_err();
        assert!(
            toml.to_string().contains("decides nothing in Capstan"),
            "{toml}"
        );
    }

    #[test]
    fn rejects_lines_that_are_no_assignment() {
        for text in [
            "just words",
            "=1",
            "1POST=1",
            "POST 1",
            "- \"POST=1\" trailing",
        ] {
            let (_, error) = env_err(text);
            assert!(
                matches!(error, EnvLineError::Syntax(_)),
                "{text}: {error:?}"
            );
        }
        let (_, error) = env_err("POST=\"1");
        assert!(matches!(error, EnvLineError::UnterminatedQuote(_)));
        let (line, _) = env_err("CONTAINERS=1\nenvironment:\n");
        assert_eq!(line, 2, "`environment:` is only tolerated first");
    }

    #[test]
    fn reads_a_toml_policy_with_scopes() {
        let policy = toml_str(
            r#"
            CONTAINERS = 1
            ALLOW_RESTARTS = 1
            POST = 0
            EVENTS = "0"
            devices = ["prod-*", "local"]

            [containers]
            labels = ["autoheal=true", "com.example.tier"]
            names = ["web-*"]
            "#,
        )
        .unwrap();
        assert_eq!(
            on(&policy),
            ["PING", "VERSION", "CONTAINERS", "ALLOW_RESTARTS"]
        );
        assert_eq!(
            policy.devices().patterns().collect::<Vec<_>>(),
            ["prod-*", "local"]
        );
        assert!(policy.devices().allows("prod-1"));
        assert!(!policy.devices().allows("staging"));
        let labels: HashMap<String, String> = [
            ("autoheal".to_string(), "true".to_string()),
            ("com.example.tier".to_string(), "web".to_string()),
        ]
        .into();
        assert!(policy.containers().matches("/web-1", &labels));
        assert!(!policy.containers().matches("/db-1", &labels));
    }

    #[test]
    fn reads_a_policy_table_inside_a_larger_manifest() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Manifest {
            name: String,
            policy: Policy,
        }
        let manifest: Manifest = toml::from_str(
            "name = \"autoheal\"\n[policy]\nCONTAINERS = 1\ndevices = [\"*\"]\n[policy.containers]\nlabels = [\"autoheal\"]\n",
        )
        .unwrap();
        assert_eq!(manifest.name, "autoheal");
        assert!(manifest.policy.get(Var::Containers));
        assert!(manifest.policy.devices().allows("any"));
        assert_eq!(manifest.policy.containers().labels().len(), 1);
        let missing: Result<Manifest, _> = toml::from_str("name = \"x\"\n[policy]\n");
        assert!(!missing.unwrap().policy.get(Var::Containers));
    }

    #[test]
    fn rejects_unknown_toml_keys_with_a_suggestion() {
        let cases = [
            (
                "CONTAINER = 1",
                "unknown policy key `CONTAINER` (did you mean `CONTAINERS`?)",
            ),
            (
                "device = [\"x\"]",
                "unknown policy key `device` (did you mean `devices`?)",
            ),
            ("Containers = 1", "did you mean `CONTAINERS`?"),
            (
                "[containers]\nlabel = []",
                "unknown key `label` in [containers] (did you mean `labels`?)",
            ),
            ("FOO = 1", "`FOO` is not a policy variable"),
        ];
        for (text, expected) in cases {
            let message = toml_str(text).unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn points_toml_errors_at_the_offending_key_or_value() {
        let message = toml_str("CONTAINERS = 1\nCONTAINER = 1\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("line 2, column 1"), "{message}");
        let message = toml_str("CONTAINERS = 1\nPOST = \"on\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("line 2, column 8"), "{message}");
        let message = toml_str("devices = [\"a\"]\n[containers]\nnames = [\"\"]\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn reads_scopes_on_their_own() {
        #[derive(Deserialize)]
        struct Route {
            devices: DeviceScope,
            containers: ContainerScope,
        }
        let route: Route =
            toml::from_str("devices = [\"edge-?\"]\n[containers]\nlabels = [\"tier=web\"]\n")
                .unwrap();
        assert!(route.devices.allows("edge-1"));
        assert_eq!(route.containers.labels()[0].to_string(), "tier=web");
    }

    #[test]
    fn rejects_toml_values_that_are_not_integers() {
        for (text, shown) in [
            ("POST = true", "POST has value `true`"),
            ("POST = -1", "POST has value `-1`"),
            ("POST = \"yes\"", "POST has value `yes`"),
            ("POST = 1.0", "an integer for POST"),
            ("containers = 1", "`[containers]` table"),
            ("devices = \"x\"", "a sequence"),
            ("devices = [\"\"]", "empty device pattern"),
            ("[containers]\nlabels = [\"=x\"]", "label selector `=x`"),
        ] {
            let message = toml_str(text).unwrap_err().to_string();
            assert!(message.contains(shown), "{text}: {message}");
        }
    }

    #[test]
    fn rejects_duplicate_toml_keys() {
        assert!(toml_str("POST = 1\nPOST = 0").is_err());
        assert!(toml_str("POST = 1\nPOST = 1").is_err());
    }

    #[test]
    fn rejects_duplicate_keys_from_other_formats_too() {
        use serde::de::value::{Error, MapDeserializer};
        let entries = vec![("POST", 1u64), ("POST", 0u64)];
        let result = Policy::deserialize(MapDeserializer::<_, Error>::new(entries.into_iter()));
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("POST is set twice")
        );
    }

    #[test]
    fn reads_a_create_table_and_refuses_unknown_create_keys() {
        let policy = toml_str(
            "CONTAINERS = 1\n[create]\nprivileged = true\nbind_roots = [\"/srv/app\"]\nimages = [\"app:*\"]\n",
        )
        .unwrap();
        assert!(policy.create().allows_bind("/srv/app/x"));
        assert!(!policy.create().allows_image("other:1"));
        assert!(Policy::default().create().is_default());
        for (text, shown) in [
            ("[create]\nprivilged = true", "unknown field `privilged`"),
            ("[create]\nbind_roots = [\"rel\"]", "not an absolute path"),
            ("[create]\nprivileged = 1", "invalid type"),
            (
                "[create]\ncap_add = [\"SYS ADMIN\"]",
                "not a capability name",
            ),
        ] {
            let message = toml_str(text).unwrap_err().to_string();
            assert!(message.contains(shown), "{text}: {message}");
        }
    }

    #[test]
    fn reads_create_settings_in_an_environment_block() {
        let policy = env_block(
            "CONTAINERS=1\nCREATE_HOST_NAMESPACES=1\n- CREATE_BIND_ROOTS=\"/srv/app,/data\"\n",
        )
        .unwrap();
        assert!(policy.create().allows_bind("/data/db"));
        assert!(!policy.create().allows_bind("/etc"));
        assert!(policy.get(Var::Containers));
        let (line, error) = env_err("CONTAINERS=1\nCREATE_PRIVILEGD=1\n");
        assert_eq!(line, 2);
        assert_eq!(
            error,
            EnvLineError::UnknownCreate("CREATE_PRIVILEGD".into())
        );
        let (_, error) = env_err("CREATE_PRIVILEGED=yes");
        assert!(error.to_string().contains("not an integer"), "{error}");
        let (_, error) = env_err("CREATE_BIND_ROOTS=");
        assert_eq!(
            error,
            EnvLineError::MissingValue("CREATE_BIND_ROOTS".into())
        );
        let (_, error) = env_err("CREATE_IMAGES=a,,b");
        assert!(error.to_string().contains("empty item"), "{error}");
    }

    #[test]
    fn reads_single_assignments() {
        assert_eq!(assignment("CONTAINERS=1"), Ok((Var::Containers, true)));
        assert!(assignment("CONTAINERS").is_err());
        assert!(assignment("CONTAINER=1").is_err());
    }
}
