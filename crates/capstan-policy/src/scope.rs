//! Scopes: which devices and which containers a policy may act on.
//!
//! No socket proxy can express these: a proxy sits in front of one daemon and sees only
//! paths. Capstan holds many devices and knows the container a request targets, so a
//! plugin's manifest also says where it may act.
//!
//! The rules, written down once:
//! - **Devices: default deny.** A [`DeviceScope`] with no pattern allows no device. A
//!   plugin that declares no `devices` may touch none; `devices = ["*"]` allows all.
//! - **Containers: default all, narrowed by selectors.** A container is in a
//!   [`ContainerScope`] when *every* label selector matches its labels *and* (there are no
//!   name patterns *or* some name pattern matches its name). A scope with neither labels
//!   nor names therefore holds every container; the variables (CONTAINERS, ALLOW_*, …)
//!   still decide what may be done to them.
//! - Patterns are globs where `*` matches any run of characters (also none) and `?` one
//!   character; every other character, `[` included, stands for itself. Matching is
//!   case-sensitive, like Docker names.
//! - Docker reports container names with a leading `/` (`/web-1`); one leading `/` is
//!   ignored on both the name and the pattern, so `web-*` and `/web-*` are the same.
//! - A container is matched by its own name only: the list API's `Names` also carries
//!   legacy link aliases (`/in-scope/alias` on an out-of-scope container), and those
//!   never count.
//! - A label selector is `key=value` (the label is present with exactly that value; the
//!   value may be empty or contain `=`) or `key` (the label is present, any value).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Why a scope pattern or selector is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScopeError {
    /// An empty device or name pattern.
    #[error("empty {what} pattern: write a name or a glob such as `prod-*`")]
    EmptyPattern {
        /// `device` or `container name`.
        what: &'static str,
    },
    /// A pattern with whitespace or control characters, which no name has.
    #[error("{what} pattern `{pattern}` contains whitespace or a control character")]
    BadPattern {
        /// `device` or `container name`.
        what: &'static str,
        /// The pattern as written.
        pattern: String,
    },
    /// A label selector that is not `key` or `key=value`.
    #[error(
        "label selector `{0}` is not `key` or `key=value` (the key must be non-empty, without \
         whitespace)"
    )]
    BadLabel(String),
}

/// A `*`/`?` glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    literal: bool,
}

impl Glob {
    /// A glob from `pattern`; `what` names the pattern's kind in errors (`device`,
    /// `plugin`, …).
    pub fn new(pattern: &str, what: &'static str) -> Result<Glob, ScopeError> {
        if pattern.is_empty() {
            return Err(ScopeError::EmptyPattern { what });
        }
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ScopeError::BadPattern {
                what,
                pattern: pattern.to_owned(),
            });
        }
        Ok(Glob {
            pattern: pattern.to_owned(),
            literal: !pattern.contains(['*', '?']),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        if self.literal {
            self.pattern == text
        } else {
            glob_match(self.pattern.as_bytes(), text.as_bytes())
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// Length of the UTF-8 character that starts with `lead`.
fn char_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Iterative wildcard matching with one backtrack point (linear in practice, never
/// exponential). `?` consumes one UTF-8 character.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // After the last `*`: where the pattern resumes and where its match in text ends.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                p += 1;
                star = Some((p, t));
                continue;
            }
            Some(b'?') => {
                p += 1;
                t += char_len(text[t]);
                continue;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((resume, end)) => {
                let end = end + char_len(text[end]);
                star = Some((resume, end));
                p = resume;
                t = end;
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// The devices a policy may act on. Empty means none (default deny).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceScope {
    patterns: Vec<Glob>,
}

impl DeviceScope {
    /// A scope that allows no device.
    pub fn none() -> DeviceScope {
        DeviceScope::default()
    }

    /// A scope that allows every device (`["*"]`).
    pub fn all() -> DeviceScope {
        DeviceScope::new(["*"]).expect("`*` is a valid pattern")
    }

    /// A scope from device names and globs (`["prod-*", "local"]`).
    pub fn new<I>(patterns: I) -> Result<DeviceScope, ScopeError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| Glob::new(p.as_ref(), "device"))
            .collect::<Result<_, _>>()?;
        Ok(DeviceScope { patterns })
    }

    /// Whether the policy may act on the device called `device`.
    pub fn allows(&self, device: &str) -> bool {
        self.patterns.iter().any(|glob| glob.matches(device))
    }

    /// Whether the scope allows no device at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as written.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(Glob::as_str)
    }
}

/// One label selector: `key` (present) or `key=value` (present with that value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    key: String,
    value: Option<String>,
}

impl LabelSelector {
    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The required value, or `None` when any value will do.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// Whether a container with these labels satisfies the selector.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(actual), Some(wanted)) => actual == wanted,
        }
    }
}

impl FromStr for LabelSelector {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (key, value) = match text.split_once('=') {
            Some((key, value)) => (key, Some(value.to_owned())),
            None => (text, None),
        };
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ScopeError::BadLabel(text.to_owned()));
        }
        Ok(LabelSelector {
            key: key.to_owned(),
            value,
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{}={value}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// The containers a policy may act on. Empty means all containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerScope {
    labels: Vec<LabelSelector>,
    names: Vec<Glob>,
}

impl ContainerScope {
    /// A scope holding every container.
    pub fn all() -> ContainerScope {
        ContainerScope::default()
    }

    /// A scope from label selectors (`"autoheal=true"`, `"com.example.tier"`) and name
    /// globs (`"web-*"`).
    pub fn new<L, N>(labels: L, names: N) -> Result<ContainerScope, ScopeError>
    where
        L: IntoIterator,
        L::Item: AsRef<str>,
        N: IntoIterator,
        N::Item: AsRef<str>,
    {
        let labels = labels
            .into_iter()
            .map(|l| l.as_ref().parse())
            .collect::<Result<_, _>>()?;
        let names = names
            .into_iter()
            .map(|n| {
                let n = n.as_ref();
                Glob::new(n.strip_prefix('/').unwrap_or(n), "container name")
            })
            .collect::<Result<_, _>>()?;
        Ok(ContainerScope { labels, names })
    }

    /// Whether every container is in scope.
    pub fn is_all(&self) -> bool {
        self.labels.is_empty() && self.names.is_empty()
    }

    /// The label selectors.
    pub fn labels(&self) -> &[LabelSelector] {
        &self.labels
    }

    /// The name patterns as written (without a leading `/`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(Glob::as_str)
    }

    /// Whether the container called `name` (with or without Docker's leading `/`) with
    /// these labels is in scope: every label selector matches, and the name matches some
    /// name pattern when there are any.
    pub fn matches(&self, name: &str, labels: &HashMap<String, String>) -> bool {
        self.labels_match(labels) && self.name_matches(name)
    }

    /// Like [`ContainerScope::matches`] for an entry of the list API, whose `Names` also
    /// holds legacy link aliases (`/in-scope/alias` on the container `out`): only the
    /// container's own names (one leading `/`, no other) count, so an alias never brings
    /// a container into scope.
    pub fn matches_any_name<S: AsRef<str>>(
        &self,
        names: &[S],
        labels: &HashMap<String, String>,
    ) -> bool {
        self.labels_match(labels)
            && (self.names.is_empty() || own_names(names).any(|n| self.name_matches(n)))
    }

    /// Whether the container of this inspect output (`GET /containers/{id}/json`: `Name`,
    /// `Config.Labels`) is in scope.
    pub fn admits_details(&self, details: &serde_json::Value) -> bool {
        let name = details["Name"].as_str().unwrap_or_default();
        self.matches(name, &labels_of(&details["Config"]["Labels"]))
    }

    /// Whether the container of this list entry (`GET /containers/json`: `Names`,
    /// `Labels`) is in scope; see [`ContainerScope::matches_any_name`].
    pub fn admits_summary(&self, summary: &serde_json::Value) -> bool {
        let names: Vec<&str> = summary["Names"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        self.matches_any_name(&names, &labels_of(&summary["Labels"]))
    }

    /// The selectors, for a denial: `label autoheal=true, name web-*`.
    pub fn describe(&self) -> String {
        let mut selectors: Vec<String> = self.labels.iter().map(|l| format!("label {l}")).collect();
        selectors.extend(self.names().map(|n| format!("name {n}")));
        selectors.join(", ")
    }

    fn labels_match(&self, labels: &HashMap<String, String>) -> bool {
        self.labels.iter().all(|selector| selector.matches(labels))
    }

    fn name_matches(&self, name: &str) -> bool {
        let name = name.strip_prefix('/').unwrap_or(name);
        self.names.is_empty() || self.names.iter().any(|glob| glob.matches(name))
    }
}

/// The container's own names among Docker's `Names`: `/web`, not the legacy link alias
/// `/other/web-alias`.
pub fn own_names<S: AsRef<str>>(names: &[S]) -> impl Iterator<Item = &str> {
    names.iter().map(AsRef::as_ref).filter(|n| {
        let bare = n.strip_prefix('/').unwrap_or(n);
        !bare.contains('/')
    })
}

/// Docker's labels object as a map (a label whose value is not a string reads as empty).
pub fn labels_of(v: &serde_json::Value) -> HashMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn glob(pattern: &str) -> Glob {
        Glob::new(pattern, "test").unwrap()
    }

    #[test]
    fn matches_globs_with_star_and_question_mark() {
        assert!(glob("prod-*").matches("prod-1"));
        assert!(glob("prod-*").matches("prod-"));
        assert!(!glob("prod-*").matches("staging-1"));
        assert!(glob("*").matches(""));
        assert!(glob("*-db-?").matches("eu-west-db-1"));
        assert!(!glob("*-db-?").matches("eu-west-db-12"));
        assert!(glob("a*b*c").matches("aXXbYYc"));
        assert!(glob("a*b*c").matches("abcbc"));
        assert!(!glob("a*b*c").matches("abcb"));
        assert!(glob("h?st").matches("höst"));
        assert!(glob("*ö*").matches("böse"));
        assert!(glob("[x]").matches("[x]"));
        assert!(!glob("local").matches("local2"));
        assert!(!glob("Local").matches("local"));
    }

    #[test]
    fn allows_no_device_when_none_is_declared() {
        let scope = DeviceScope::none();
        assert!(scope.is_empty());
        assert!(!scope.allows("local"));
        assert!(!scope.allows(""));
    }

    #[test]
    fn allows_devices_by_name_or_glob() {
        let scope = DeviceScope::new(["prod-*", "local"]).unwrap();
        assert!(scope.allows("prod-eu-1"));
        assert!(scope.allows("local"));
        assert!(!scope.allows("localhost"));
        assert!(!scope.allows("staging"));
        assert!(DeviceScope::all().allows("anything"));
    }

    #[test]
    fn refuses_empty_or_blank_device_patterns() {
        assert_eq!(
            DeviceScope::new([""]),
            Err(ScopeError::EmptyPattern { what: "device" })
        );
        assert!(DeviceScope::new(["prod *"]).is_err());
    }

    #[test]
    fn holds_every_container_when_the_scope_is_empty() {
        let scope = ContainerScope::all();
        assert!(scope.is_all());
        assert!(scope.matches("/anything", &HashMap::new()));
    }

    #[test]
    fn requires_every_label_selector_to_match() {
        let scope = ContainerScope::new(["autoheal=true", "com.example.tier"], [""; 0]).unwrap();
        assert!(scope.matches(
            "/web",
            &labels(&[("autoheal", "true"), ("com.example.tier", "front")])
        ));
        assert!(!scope.matches("/web", &labels(&[("autoheal", "true")])));
        assert!(!scope.matches(
            "/web",
            &labels(&[("autoheal", "false"), ("com.example.tier", "front")])
        ));
        assert!(!scope.matches("/web", &HashMap::new()));
    }

    #[test]
    fn reads_label_selectors_with_empty_values_and_equals_signs() {
        let empty: LabelSelector = "k=".parse().unwrap();
        assert_eq!(empty.value(), Some(""));
        assert!(empty.matches(&labels(&[("k", "")])));
        assert!(!empty.matches(&labels(&[("k", "x")])));
        let eq: LabelSelector = "k=a=b".parse().unwrap();
        assert_eq!((eq.key(), eq.value()), ("k", Some("a=b")));
        assert_eq!(eq.to_string(), "k=a=b");
        for bad in ["", "=x", " k=v", "k k"] {
            assert!(bad.parse::<LabelSelector>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matches_names_with_or_without_dockers_leading_slash() {
        let scope = ContainerScope::new([""; 0], ["web-*", "/db"]).unwrap();
        assert!(scope.matches("/web-1", &HashMap::new()));
        assert!(scope.matches("web-1", &HashMap::new()));
        assert!(scope.matches("/db", &HashMap::new()));
        assert!(!scope.matches("/db-2", &HashMap::new()));
        assert_eq!(scope.names().collect::<Vec<_>>(), vec!["web-*", "db"]);
    }

    #[test]
    fn requires_labels_and_some_name_when_both_are_given() {
        let scope = ContainerScope::new(["autoheal=true"], ["web-*", "api-*"]).unwrap();
        let healable = labels(&[("autoheal", "true")]);
        assert!(scope.matches("/api-2", &healable));
        assert!(!scope.matches("/db-1", &healable));
        assert!(!scope.matches("/web-1", &HashMap::new()));
        assert!(scope.matches_any_name(&["/other", "/web-1"], &healable));
        assert!(!scope.matches_any_name(&["/other"], &healable));
    }

    #[test]
    fn a_legacy_link_alias_does_not_bring_a_container_into_scope() {
        let scope = ContainerScope::new([""; 0], ["rt-in-*"]).unwrap();
        // `rt-out` linked into `rt-in-1` as `rt-in-1-db` is listed with both names.
        let names = ["/rt-out", "/rt-in-1/rt-in-1-db"];
        assert!(!scope.matches_any_name(&names, &HashMap::new()));
        let listed = serde_json::json!({"Names": names, "Labels": {}});
        assert!(!scope.admits_summary(&listed));
        let own = serde_json::json!({"Names": ["/rt-in-2", "/x/rt-in-2"], "Labels": null});
        assert!(scope.admits_summary(&own));
        assert_eq!(
            own_names(&["/a", "/b/a", "c"]).collect::<Vec<_>>(),
            ["/a", "c"]
        );
    }

    #[test]
    fn admits_inspect_output_by_its_name_and_labels() {
        let scope = ContainerScope::new(["tier=web"], ["rt-in-*"]).unwrap();
        let d = |name: &str, tier: &str| serde_json::json!({"Name": name, "Config": {"Labels": {"tier": tier}}});
        assert!(scope.admits_details(&d("/rt-in-1", "web")));
        assert!(!scope.admits_details(&d("/rt-out", "web")));
        assert!(!scope.admits_details(&d("/rt-in-1", "db")));
        assert_eq!(scope.describe(), "label tier=web, name rt-in-*");
    }
}
