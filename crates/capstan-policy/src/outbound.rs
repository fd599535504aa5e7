//! Outbound HTTP: which origins a plugin may reach (`[policy] outbound`), and which
//! addresses no wildcard may lead to.
//!
//! Why it is here: like the Docker decision, the allow-list is pure — an origin in, a
//! rule (or none) out — and is checked on the host for every request a plugin makes
//! through `wasi:http`. Keeping it beside the Docker policy keeps one crate of fast tests
//! for every decision the engine takes on a plugin's behalf.
//!
//! The rules, written down once:
//! - **Default deny.** An empty list reaches nothing.
//! - An entry is an origin as Spin's `allowed_outbound_hosts` writes it:
//!   `scheme://host[:port]`. The scheme is `http` or `https`; the host a DNS name, an IPv4
//!   address, a bracketed IPv6 address, `*.example.com` (any name *below*
//!   `example.com`, not `example.com` itself) or `*` (any host); the port a number, a
//!   range `8000..8010` (end exclusive, as Spin writes it), or `*`; without a port, the
//!   scheme's default (80, 443). No path, query, user or fragment.
//! - Host names compare case-insensitively, without a trailing dot.
//! - **Special addresses** ([`special_address`]): after DNS resolution, an address in
//!   loopback, private, link-local (with the cloud metadata address 169.254.169.254),
//!   shared (CGNAT), unique-local, unspecified, multicast, broadcast or documentation
//!   ranges — IPv4-mapped and NAT64 IPv6 forms included — is refused unless a matching
//!   entry names the request's host literally ([`OutboundList::names_literally`]): a
//!   wildcard never leads into the private network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use serde::de::{self, Deserializer};
use thiserror::Error;

/// Why an outbound entry or a request's origin is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutboundError {
    /// Not `scheme://host[:port]`.
    #[error(
        "`{entry}` is not an origin: {why} (write `scheme://host[:port]`, e.g. `https://ntfy.sh`, `https://*.example.com`, `http://127.0.0.1:*`)"
    )]
    Syntax {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        why: String,
    },
}

fn syntax(entry: &str, why: impl Into<String>) -> OutboundError {
    OutboundError::Syntax {
        entry: entry.to_owned(),
        why: why.into(),
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// The scheme's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// Reads `http` or `https` (any case).
    pub fn parse(text: &str) -> Option<Scheme> {
        match text.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

/// The host part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`.
    Any,
    /// `*.example.com`: names below `example.com` (stored without `*.`).
    Below(String),
    /// One name or address, normalised.
    Exact(String),
}

/// The port part of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Any,
    /// `start..end`, end exclusive; one port is `p..p+1`.
    Range(u16, u32),
}

/// One entry of `[policy] outbound`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    text: String,
    scheme: Scheme,
    host: HostPattern,
    port: PortPattern,
}

impl OutboundRule {
    /// Parses one entry (see the module docs).
    pub fn parse(entry: &str) -> Result<OutboundRule, OutboundError> {
        let (scheme, rest) = entry
            .split_once("://")
            .ok_or_else(|| syntax(entry, "it has no `scheme://`"))?;
        let scheme = Scheme::parse(scheme).ok_or_else(|| {
            syntax(
                entry,
                format!("the scheme `{scheme}` is not `http` or `https`"),
            )
        })?;
        // A bare trailing slash is forgiven; anything after it is a path.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(syntax(
                entry,
                "an origin has no path, query or fragment: the allow-list names whole origins",
            ));
        }
        if rest.contains('@') {
            return Err(syntax(entry, "an origin has no user name or password"));
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| syntax(entry, "bad host"))?;
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(below) = host.strip_prefix("*.") {
            let below = normalise_host(below)
                .filter(|h| h.parse::<IpAddr>().is_err())
                .ok_or_else(|| syntax(entry, format!("`{below}` is not a DNS name")))?;
            HostPattern::Below(below)
        } else {
            if host.contains('*') {
                return Err(syntax(
                    entry,
                    "a wildcard host is `*` or `*.domain` (a whole leading label)",
                ));
            }
            HostPattern::Exact(
                normalise_host(host)
                    .ok_or_else(|| syntax(entry, format!("`{host}` is not a host name")))?,
            )
        };
        let port = match port {
            None => {
                let p = scheme.default_port();
                PortPattern::Range(p, u32::from(p) + 1)
            }
            Some("*") => PortPattern::Any,
            Some(p) => {
                let bad = || syntax(entry, format!("`{p}` is not a port, a range `a..b` or `*`"));
                if let Some((a, b)) = p.split_once("..") {
                    let a: u16 = a.parse().map_err(|_| bad())?;
                    let b: u32 = b.parse().map_err(|_| bad())?;
                    if b <= u32::from(a) || b > 65536 {
                        return Err(bad());
                    }
                    PortPattern::Range(a, b)
                } else {
                    let p: u16 = p.parse().map_err(|_| bad())?;
                    PortPattern::Range(p, u32::from(p) + 1)
                }
            }
        };
        Ok(OutboundRule {
            text: entry.to_owned(),
            scheme,
            host,
            port,
        })
    }

    /// The entry as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `origin` matches this entry.
    pub fn matches(&self, origin: &Origin) -> bool {
        if self.scheme != origin.scheme {
            return false;
        }
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Range(a, b) => origin.port >= a && u32::from(origin.port) < b,
        };
        port_ok
            && match &self.host {
                HostPattern::Any => true,
                HostPattern::Exact(h) => *h == origin.host,
                HostPattern::Below(d) => origin
                    .host
                    .strip_suffix(d.as_str())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            }
    }

    /// Whether the entry names `host` itself (no wildcard host).
    fn is_literal_for(&self, host: &str) -> bool {
        matches!(&self.host, HostPattern::Exact(h) if h == host)
    }
}

impl fmt::Display for OutboundRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `host[:port]`, with `[v6]` brackets kept on the host.
fn split_host_port(text: &str) -> Option<(&str, Option<&str>)> {
    if text.starts_with('[') {
        let end = text.find(']')?;
        let (host, rest) = text.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => Some((host, Some(rest.strip_prefix(':')?))),
        };
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((text, None)),
    }
}

/// A host as compared: lower case, no trailing dot, IPv6 without brackets (and in its
/// canonical form); `None` when it is not a DNS name or an address.
fn normalise_host(host: &str) -> Option<String> {
    if let Some(v6) = host.strip_prefix('[') {
        let v6: Ipv6Addr = v6.strip_suffix(']')?.parse().ok()?;
        return Some(v6.to_string());
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.parse::<Ipv4Addr>().is_ok() {
        return Some(host);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (!host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok)).then_some(host)
}

/// Where a request goes: scheme, host, port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin of a request to `host` (a name, an IPv4 address, or an IPv6 address
    /// with or without brackets) on `port` (the scheme's default when `None`).
    pub fn new(scheme: Scheme, host: &str, port: Option<u16>) -> Result<Origin, OutboundError> {
        let bracketed;
        let host_in = if host.contains(':') && !host.starts_with('[') {
            bracketed = format!("[{host}]");
            bracketed.as_str()
        } else {
            host
        };
        let host = normalise_host(host_in)
            .ok_or_else(|| syntax(host, "the request's host is not a host name or address"))?;
        Ok(Origin {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host, normalised (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the host is, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// `https://host`, with `:port` when it is not the scheme's default: the entry that
/// would allow exactly this origin.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// `[policy] outbound`: the origins a plugin may reach. Empty by default: nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundList {
    rules: Vec<OutboundRule>,
}

impl OutboundList {
    /// Parses every entry; the first bad one is the error.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<OutboundList, OutboundError> {
        let rules = entries
            .iter()
            .map(|e| OutboundRule::parse(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(OutboundList { rules })
    }

    /// Whether the list allows nothing.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The entries.
    pub fn rules(&self) -> &[OutboundRule] {
        &self.rules
    }

    /// The first entry that allows `origin`, if one does.
    pub fn allows(&self, origin: &Origin) -> Option<&OutboundRule> {
        self.rules.iter().find(|r| r.matches(origin))
    }

    /// Whether an entry that allows `origin` names its host literally (no wildcard host):
    /// then its host may resolve to a [special address](special_address).
    pub fn names_literally(&self, origin: &Origin) -> bool {
        self.rules
            .iter()
            .any(|r| r.matches(origin) && r.is_literal_for(&origin.host))
    }
}

/// A list of origins, validated as it is read.
impl<'de> Deserialize<'de> for OutboundList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        OutboundList::new(&entries).map_err(de::Error::custom)
    }
}

/// What kind of special address `ip` is — one a request may reach only when the
/// allow-list names its host literally — or `None` for a public address.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_v4(v4).map(|_| "IPv4-mapped special");
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::from(((u32::from(s[6])) << 16) | u32::from(s[7]));
                return special_v4(v4).map(|_| "NAT64 special");
            }
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible (deprecated) addresses.
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (CGNAT)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if ip.is_documentation() || (o[0] == 198 && (o[1] & 0xfe) == 18) {
        Some("documentation or benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(scheme: Scheme, host: &str, port: Option<u16>) -> Origin {
        Origin::new(scheme, host, port).unwrap()
    }

    fn list(entries: &[&str]) -> OutboundList {
        OutboundList::new(entries).unwrap()
    }

    use Scheme::{Http, Https};

    #[test]
    fn an_empty_list_allows_nothing() {
        assert!(list(&[]).allows(&origin(Https, "ntfy.sh", None)).is_none());
    }

    #[test]
    fn an_exact_origin_allows_its_scheme_host_and_default_port_only() {
        let l = list(&["https://ntfy.sh"]);
        assert!(l.allows(&origin(Https, "ntfy.sh", None)).is_some());
        assert!(l.allows(&origin(Https, "NTFY.sh.", Some(443))).is_some());
        assert!(l.allows(&origin(Http, "ntfy.sh", None)).is_none());
        assert!(l.allows(&origin(Https, "ntfy.sh", Some(8443))).is_none());
        assert!(l.allows(&origin(Https, "evil-ntfy.sh", None)).is_none());
        assert!(l.allows(&origin(Https, "ntfy.sh.evil.com", None)).is_none());
    }

    #[test]
    fn a_wildcard_subdomain_matches_names_below_it_but_not_the_domain_itself() {
        let l = list(&["https://*.example.com"]);
        assert!(l.allows(&origin(Https, "api.example.com", None)).is_some());
        assert!(l.allows(&origin(Https, "a.b.example.com", None)).is_some());
        assert!(l.allows(&origin(Https, "example.com", None)).is_none());
        assert!(l.allows(&origin(Https, "badexample.com", None)).is_none());
        assert!(!l.names_literally(&origin(Https, "api.example.com", None)));
    }

    #[test]
    fn wildcard_and_ranged_ports_match_as_spin_writes_them() {
        let l = list(&["http://127.0.0.1:*", "http://10.0.0.5:8000..8002"]);
        assert!(l.allows(&origin(Http, "127.0.0.1", Some(1))).is_some());
        assert!(l.allows(&origin(Http, "127.0.0.1", None)).is_some());
        assert!(l.allows(&origin(Http, "10.0.0.5", Some(8001))).is_some());
        assert!(l.allows(&origin(Http, "10.0.0.5", Some(8002))).is_none());
        assert!(l.names_literally(&origin(Http, "127.0.0.1", Some(9))));
    }

    #[test]
    fn ipv6_hosts_are_bracketed_in_entries_and_compared_canonically() {
        let l = list(&["http://[::1]:8080"]);
        assert!(l.allows(&origin(Http, "0:0::1", Some(8080))).is_some());
        assert!(l.allows(&origin(Http, "[::1]", Some(8080))).is_some());
        assert_eq!(
            origin(Http, "::1", Some(8080)).to_string(),
            "http://[::1]:8080"
        );
    }

    #[test]
    fn the_any_host_wildcard_never_names_a_host_literally() {
        let l = list(&["http://*:8080"]);
        let o = origin(Http, "localhost", Some(8080));
        assert!(l.allows(&o).is_some());
        assert!(!l.names_literally(&o));
        let l = list(&["http://*:8080", "http://localhost:8080"]);
        assert!(l.names_literally(&o));
    }

    #[test]
    fn the_origin_prints_as_the_entry_that_would_allow_it() {
        assert_eq!(
            origin(Https, "api.example.com", None).to_string(),
            "https://api.example.com"
        );
        assert_eq!(
            origin(Http, "10.0.0.5", Some(8080)).to_string(),
            "http://10.0.0.5:8080"
        );
        for o in [
            origin(Https, "api.example.com", None),
            origin(Http, "10.0.0.5", Some(8080)),
        ] {
            assert!(list(&[&o.to_string()]).names_literally(&o));
        }
    }

    #[test]
    fn refuses_entries_that_are_not_origins_saying_why() {
        for (entry, says) in [
            ("ntfy.sh", "scheme://"),
            ("ftp://ntfy.sh", "`ftp`"),
            ("https://ntfy.sh/topic", "no path"),
            ("https://user:pw@ntfy.sh", "user name"),
            ("https://ex*.com", "wildcard host"),
            ("https://*.10.0.0.1", "not a DNS name"),
            ("https://ntfy.sh:99999", "not a port"),
            ("https://ntfy.sh:9..3", "not a port"),
            ("https://bad host", "not a host name"),
            ("https://", "not a host name"),
        ] {
            let e = OutboundRule::parse(entry).unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
            assert!(e.contains(entry), "{entry}: {e}");
        }
        OutboundRule::parse("https://ntfy.sh/").unwrap();
    }

    #[test]
    fn special_addresses_are_named_and_public_ones_are_not() {
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("255.255.255.255", "broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "IPv4-mapped special"),
            ("::ffff:169.254.169.254", "IPv4-mapped special"),
            ("64:ff9b::a9fe:a9fe", "NAT64 special"),
            ("::127.0.0.1", "IPv4-compatible"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(special_address(ip), Some(kind), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(special_address(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn reads_from_toml_naming_the_bad_entry() {
        #[derive(Deserialize)]
        struct T {
            #[allow(dead_code)]
            outbound: OutboundList,
        }
        let e = toml::from_str::<T>("outbound = [\"https://ok.example\", \"nope\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`nope` is not an origin"), "{e}");
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn label() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
        }

        fn host() -> impl Strategy<Value = String> {
            prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
        }

        fn scheme() -> impl Strategy<Value = Scheme> {
            prop_oneof![Just(Scheme::Http), Just(Scheme::Https)]
        }

        proptest! {
            #![proptest_config(crate::strategies::config(2_000))]

            #[test]
            fn any_text_parses_or_fails_cleanly(entry in "\\PC{0,60}") {
                let _ = OutboundRule::parse(&entry);
            }

            #[test]
            fn an_origin_printed_is_the_entry_that_allows_exactly_it(
                scheme in scheme(), host in host(), port in 1u16.., other in 1u16..,
            ) {
                let o = Origin::new(scheme, &host, Some(port)).unwrap();
                let l = OutboundList::new(&[o.to_string()]).unwrap();
                prop_assert!(l.allows(&o).is_some());
                prop_assert!(l.names_literally(&o));
                let elsewhere = Origin::new(scheme, &host, Some(other)).unwrap();
                prop_assert_eq!(l.allows(&elsewhere).is_some(), other == port);
            }

            #[test]
            fn a_wildcard_domain_allows_only_names_below_it(
                domain in host(), below in label(), any in host(),
            ) {
                let l = OutboundList::new(&[format!("https://*.{domain}")]).unwrap();
                let inside = Origin::new(Scheme::Https, &format!("{below}.{domain}"), None).unwrap();
                prop_assert!(l.allows(&inside).is_some());
                prop_assert!(!l.names_literally(&inside));
                let o = Origin::new(Scheme::Https, &any, None).unwrap();
                prop_assert_eq!(
                    l.allows(&o).is_some(),
                    any.ends_with(&format!(".{domain}"))
                );
            }

            #[test]
            fn an_ipv4_address_and_its_mapped_ipv6_form_are_special_alike(bits in any::<u32>()) {
                let v4 = Ipv4Addr::from(bits);
                let mapped = IpAddr::V6(v4.to_ipv6_mapped());
                prop_assert_eq!(
                    special_address(IpAddr::V4(v4)).is_some(),
                    special_address(mapped).is_some()
                );
            }
        }
    }
}
