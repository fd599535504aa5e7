//! The `[cluster]` table and `serve --cluster`: which NATS servers, how to authenticate
//! to them, this node's name, and how runs are redelivered. Read by [`crate::config`]
//! (the one reader of the environment), checked here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// How long a node has to ack a run before JetStream gives it to another node, unless it
/// says it is still at it (it does, every third of this, while the run goes on).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries of one run before JetStream gives up on it.
pub const DEFAULT_MAX_DELIVER: i64 = 5;
/// How long a node's lease on a device lasts without renewal (see [`super::leases`]).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// The shortest and longest lease accepted.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
pub const MAX_LEASE: Duration = Duration::from_secs(600);

/// The `[cluster]` table. Each key may also come from `CAPSTAN_CLUSTER_<KEY>` (upper case),
/// which wins over the file; `urls` from `serve --cluster` (env `CAPSTAN_CLUSTER`), which
/// wins over both. Without `urls` anywhere the engine runs alone (the default).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The NATS servers (JetStream enabled), e.g. `["nats://10.0.0.1:4222",
    /// "nats://10.0.0.2:4222"]`; `tls://` for TLS from the first byte. Env
    /// `CAPSTAN_CLUSTER_URLS` (comma-separated).
    pub urls: Option<Vec<String>>,
    /// This node's name in the cluster; unique among the live nodes. Default: the host
    /// name. Env `CAPSTAN_CLUSTER_NODE_NAME`.
    pub node_name: Option<String>,
    /// The Capstan cluster's name, for several clusters on one NATS system: the runs
    /// stream and the node bucket get it as a suffix. Default: none (`CAPSTAN_RUNS`,
    /// `capstan_nodes`). Env `CAPSTAN_CLUSTER_NAME`.
    pub name: Option<String>,
    /// A NATS credentials file (`.creds`: user JWT and nkey seed). Env
    /// `CAPSTAN_CLUSTER_CREDENTIALS`.
    pub credentials: Option<PathBuf>,
    /// CA certificate (PEM) the NATS servers' certificates are checked against; TLS is
    /// then required. Env `CAPSTAN_CLUSTER_TLS_CA`.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that demand one; needs `tls_key`. Env
    /// `CAPSTAN_CLUSTER_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM). Env `CAPSTAN_CLUSTER_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// How long a node may hold a run without a sign of life before JetStream hands it
    /// to another node (e.g. `"30s"`). Default 30s. Env `CAPSTAN_CLUSTER_ACK_WAIT`.
    pub ack_wait: Option<String>,
    /// Deliveries of one run (the first and the retries) before it is given up. Default
    /// 5. Env `CAPSTAN_CLUSTER_MAX_DELIVER`.
    pub max_deliver: Option<i64>,
    /// How long a node's lease on a device lasts without renewal (e.g. `"15s"`, 3s to
    /// 10m): a dead node's devices are taken over after it. Default 15s. Env
    /// `CAPSTAN_CLUSTER_LEASE`.
    pub lease: Option<String>,
    /// Share the configuration (devices, plugins, tokens, notifiers, hook and device
    /// secrets as vault ciphertext) through JetStream KV, so a change on one node takes
    /// effect on every node (see [`crate::cluster::state`]). Every node then needs the
    /// same vault master key (passphrase or key file). Default true. Env
    /// `CAPSTAN_CLUSTER_SHARED_STATE` (`true`/`false`).
    pub shared_state: Option<bool>,
}

/// The cluster settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The NATS servers, each checked as a URL.
    pub urls: Vec<String>,
    pub node_name: String,
    /// Suffix of the stream and bucket names, upper-case for the stream (empty: none).
    pub name: Option<String>,
    pub credentials: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// How long a device lease lasts without renewal.
    pub lease: Duration,
    /// How long the cluster's run history keeps a run's end: the engine's
    /// `runs.max_age` (set by `serve`); `None` keeps them until removed.
    pub history_max_age: Option<Duration>,
    /// Whether the configuration is shared through the state bucket.
    pub shared_state: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Splits and checks NATS URLs as `--cluster` and `CAPSTAN_CLUSTER_URLS` take them:
/// comma-separated, each `nats://HOST[:PORT]` or `tls://HOST[:PORT]`.
pub fn parse_urls(text: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    check_urls(&urls)?;
    Ok(urls)
}

fn check_urls(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("name at least one NATS server, e.g. nats://127.0.0.1:4222".into());
    }
    for u in urls {
        let parsed = url::Url::parse(u).map_err(|e| {
            format!("{u:?} is not a NATS URL ({e}); write it like nats://10.0.0.1:4222")
        })?;
        if !matches!(parsed.scheme(), "nats" | "tls") {
            return Err(format!(
                "{u:?}: the scheme must be nats:// or tls://, not {}://",
                parsed.scheme()
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!(
                "{u:?} names no host; write it like nats://10.0.0.1:4222"
            ));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(format!("{u:?}: a NATS URL has no path or query"));
        }
    }
    Ok(())
}

/// A node or cluster name: letters, digits, `-` and `_` (they become parts of NATS
/// subjects, keys and stream names).
fn check_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            field,
            format!("{name:?} must be 1-64 letters, digits, `-` or `_`"),
        ));
    }
    Ok(())
}

/// The host name, for the default node name (dots become `-`: a key holds no dots).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "capstan".into()
    } else {
        name
    }
}

/// The `[cluster]` table with its variables from `env` winning and `flag_urls`
/// (`serve --cluster`) over both; `None` when no URL is named anywhere.
pub fn resolve(
    file: &ClusterSection,
    flag_urls: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let urls = match flag_urls
        .map(String::from)
        .or_else(|| env("CAPSTAN_CLUSTER_URLS"))
    {
        Some(text) => Some(parse_urls(&text).map_err(|m| invalid("cluster.urls", m))?),
        None => match &file.urls {
            Some(list) => {
                check_urls(list).map_err(|m| invalid("cluster.urls", m))?;
                Some(list.clone())
            }
            None => None,
        },
    };
    let path = |var: &str, value: &Option<PathBuf>| env(var).map(PathBuf::from).or(value.clone());
    let credentials = path("CAPSTAN_CLUSTER_CREDENTIALS", &file.credentials);
    let tls_ca = path("CAPSTAN_CLUSTER_TLS_CA", &file.tls_ca);
    let tls_cert = path("CAPSTAN_CLUSTER_TLS_CERT", &file.tls_cert);
    let tls_key = path("CAPSTAN_CLUSTER_TLS_KEY", &file.tls_key);
    let Some(urls) = urls else {
        return Ok(None);
    };
    let node_name = env("CAPSTAN_CLUSTER_NODE_NAME")
        .or_else(|| file.node_name.clone())
        .unwrap_or_else(host_name);
    check_name("cluster.node_name", &node_name)?;
    let name = env("CAPSTAN_CLUSTER_NAME").or_else(|| file.name.clone());
    if let Some(n) = &name {
        check_name("cluster.name", n)?;
    }
    let tls_client = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "cluster.tls_cert",
                "tls_cert and tls_key go together",
            ));
        }
    };
    let ack_wait = match env("CAPSTAN_CLUSTER_ACK_WAIT").or_else(|| file.ack_wait.clone()) {
        Some(v) => {
            let d = crate::trigger::units::parse_duration(&v)
                .map_err(|m| invalid("cluster.ack_wait", format!("{m} (write e.g. \"30s\")")))?;
            if d < Duration::from_secs(1) {
                return Err(invalid("cluster.ack_wait", "must be at least 1s"));
            }
            d
        }
        None => DEFAULT_ACK_WAIT,
    };
    let max_deliver = match env("CAPSTAN_CLUSTER_MAX_DELIVER") {
        Some(v) => v.trim().parse().map_err(|_| {
            invalid(
                "cluster.max_deliver",
                format!("{v:?} is not a number of deliveries"),
            )
        })?,
        None => file.max_deliver.unwrap_or(DEFAULT_MAX_DELIVER),
    };
    if !(1..=100).contains(&max_deliver) {
        return Err(invalid(
            "cluster.max_deliver",
            format!("{max_deliver} is not between 1 and 100"),
        ));
    }
    let lease = match env("CAPSTAN_CLUSTER_LEASE").or_else(|| file.lease.clone()) {
        Some(v) => {
            let d = crate::trigger::units::parse_duration(&v)
                .map_err(|m| invalid("cluster.lease", format!("{m} (write e.g. \"15s\")")))?;
            if !(MIN_LEASE..=MAX_LEASE).contains(&d) {
                return Err(invalid("cluster.lease", "must be between 3s and 10m"));
            }
            d
        }
        None => DEFAULT_LEASE,
    };
    let shared_state = match env("CAPSTAN_CLUSTER_SHARED_STATE") {
        Some(v) => match v.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            other => {
                return Err(invalid(
                    "cluster.shared_state",
                    format!("{other:?} is not true or false"),
                ));
            }
        },
        None => file.shared_state.unwrap_or(true),
    };
    Ok(Some(ClusterSettings {
        shared_state,
        urls,
        node_name,
        name,
        credentials,
        tls_ca,
        tls_client,
        ack_wait,
        max_deliver,
        lease,
        history_max_age: crate::runs::RunStoreConfig::default().max_age,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn section(toml_text: &str) -> ClusterSection {
        #[derive(Deserialize)]
        struct File {
            cluster: ClusterSection,
        }
        toml::from_str::<File>(toml_text).unwrap().cluster
    }

    #[test]
    fn no_urls_anywhere_means_a_single_engine() {
        assert_eq!(
            resolve(&ClusterSection::default(), None, no_env).unwrap(),
            None
        );
        let s = section("[cluster]\nnode_name = \"a\"\n");
        assert_eq!(resolve(&s, None, no_env).unwrap(), None);
    }

    #[test]
    fn the_table_gives_urls_name_and_defaults() {
        let s = section(
            "[cluster]\nurls = [\"nats://10.0.0.1:4222\", \"tls://nats.example:4443\"]\nnode_name = \"n-1\"\n",
        );
        let c = resolve(&s, None, no_env).unwrap().unwrap();
        assert_eq!(c.urls, ["nats://10.0.0.1:4222", "tls://nats.example:4443"]);
        assert_eq!(c.node_name, "n-1");
        assert_eq!(c.ack_wait, DEFAULT_ACK_WAIT);
        assert_eq!(c.max_deliver, DEFAULT_MAX_DELIVER);
        assert_eq!(c.lease, DEFAULT_LEASE);
        assert_eq!(c.name, None);
        assert_eq!(c.tls_client, None);
    }

    #[test]
    fn the_flag_wins_over_the_environment_and_the_environment_over_the_file() {
        let s = section("[cluster]\nurls = [\"nats://file:4222\"]\nack_wait = \"10s\"\n");
        let env = |k: &str| match k {
            "CAPSTAN_CLUSTER_URLS" => Some("nats://env:4222".to_string()),
            "CAPSTAN_CLUSTER_ACK_WAIT" => Some("5s".to_string()),
            "CAPSTAN_CLUSTER_NODE_NAME" => Some("from-env".to_string()),
            _ => None,
        };
        let c = resolve(&s, None, env).unwrap().unwrap();
        assert_eq!(c.urls, ["nats://env:4222"]);
        assert_eq!(c.ack_wait, Duration::from_secs(5));
        assert_eq!(c.node_name, "from-env");
        let c = resolve(&s, Some("nats://a:1, nats://b:2"), env)
            .unwrap()
            .unwrap();
        assert_eq!(c.urls, ["nats://a:1", "nats://b:2"]);
    }

    #[test]
    fn malformed_urls_are_refused_with_the_form_to_use() {
        for (bad, says) in [
            ("", "at least one"),
            ("localhost:4222", "scheme"),
            ("http://a:4222", "nats:// or tls://"),
            ("nats://", "no host"),
            ("nats://a:4222/x", "no path"),
            ("nats://a:notaport", "not a NATS URL"),
        ] {
            let e = resolve(&ClusterSection::default(), Some(bad), no_env).unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with("cluster.urls"), "{bad}: {text}");
            assert!(text.contains(says), "{bad:?} should say {says:?}: {text}");
        }
    }

    #[test]
    fn names_certificates_and_limits_are_checked() {
        let urls = Some("nats://a:4222");
        let with =
            |k: &'static str, v: &'static str| move |key: &str| (key == k).then(|| v.to_string());
        let e = resolve(
            &ClusterSection::default(),
            urls,
            with("CAPSTAN_CLUSTER_NODE_NAME", "a.b"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cluster.node_name"), "{e}");
        let e = resolve(
            &ClusterSection::default(),
            urls,
            with("CAPSTAN_CLUSTER_TLS_CERT", "/c.pem"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        let e = resolve(
            &ClusterSection::default(),
            urls,
            with("CAPSTAN_CLUSTER_ACK_WAIT", "0s"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 1s"), "{e}");
        let e = resolve(
            &ClusterSection::default(),
            urls,
            with("CAPSTAN_CLUSTER_MAX_DELIVER", "0"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("between 1 and 100"), "{e}");
        for bad in ["2s", "11m", "soon"] {
            let e = resolve(
                &ClusterSection::default(),
                urls,
                with("CAPSTAN_CLUSTER_LEASE", bad),
            )
            .unwrap_err();
            assert!(e.to_string().contains("cluster.lease"), "{bad}: {e}");
        }
        let c = resolve(
            &ClusterSection::default(),
            urls,
            with("CAPSTAN_CLUSTER_LEASE", "6s"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.lease, Duration::from_secs(6));
    }

    #[test]
    fn an_unknown_key_in_the_table_is_an_error() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct File {
            cluster: ClusterSection,
        }
        let e = toml::from_str::<File>("[cluster]\nurl = \"nats://a\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `url`"), "{e}");
    }

    #[test]
    fn the_default_node_name_is_the_host_name_as_a_key() {
        let n = host_name();
        assert!(!n.is_empty());
        assert!(
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
