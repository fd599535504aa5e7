//! The engine's metrics, served at `GET /metrics` for Prometheus.
//!
//! One [`Metrics`] per process (shared as `Arc<Metrics>`): the scheduler reports each
//! finished run and each host call, the webhook route each delivery, and [`Metrics::render`]
//! reads the Docker pool's SSH sessions and channels at scrape time. Built on the
//! Prometheus project's client (`prometheus-client`), rendered in the OpenMetrics text
//! format, which Prometheus scrapes natively ([`CONTENT_TYPE`]).
//!
//! Families (all prefixed `capstan_`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `capstan_runs_total` | counter | `plugin`, `status` |
//! | `capstan_run_duration_seconds` | histogram | `plugin` |
//! | `capstan_host_calls_total` | counter | `op`, `decision` |
//! | `capstan_ssh_sessions` | gauge | — |
//! | `capstan_ssh_channels` | gauge | — |
//! | `capstan_webhook_deliveries_total` | counter | `hook`, `result` |
//! | `capstan_notifications_total` | counter | `channel`, `result` |
//! | `capstan_outbound_requests_total` | counter | `plugin`, `decision`, `result` |
//! | `capstan_docker_event_stream_up` | gauge | `device` |
//! | `capstan_docker_event_stream_failures_total` | counter | `device` |
//! | `capstan_docker_events_total` | counter | `device` |
//! | `capstan_docker_event_runs_total` | counter | `plugin` |
//! | `capstan_cluster_runs_published_total` | counter | `node` |
//! | `capstan_cluster_runs_taken_total` | counter | `node` |
//! | `capstan_cluster_runs_redelivered_total` | counter | `node` |
//! | `capstan_cluster_history_published_total` | counter | `node` |
//! | `capstan_cluster_history_applied_total` | counter | `node` |
//! | `capstan_cluster_stream_pending` | gauge | `node` |
//! | `capstan_cluster_history_lag` | gauge | `node` |
//! | `capstan_cluster_nodes_alive` | gauge | `node` |
//!
//! The `capstan_cluster_*` families exist on a node of a cluster only (labelled with
//! the node's name; see [`ClusterSeries`]); their gauges are read at scrape time.
//!
//! A labelled family appears in the text once it has a series (the client leaves empty
//! families out, as Prometheus's own clients do); the SSH gauges are always there.
//!
//! Label values come from installed plugins, hooks and fixed vocabularies, so the number
//! of series stays bounded. The one label a stranger controls — the hook name of a
//! delivery to a hook that does not exist — is recorded as `hook=""`, so probing random
//! URLs cannot grow the series without end.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Run duration buckets, seconds: from a tiny plugin's few milliseconds to the longest
/// deadline a manifest is likely to set.
const RUN_DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The webhook result whose hook label is dropped (see the module docs).
const UNKNOWN_HOOK: &str = "unknown-hook";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    plugin: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostCallLabels {
    op: String,
    decision: String,
}

/// Outbound HTTP (`wasi:http`) requests: the plugin, the allow-list's decision and how
/// the request ended (a status class, or why it did not get one).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboundLabels {
    plugin: String,
    decision: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    hook: String,
    result: String,
}

/// Notifications (see [`crate::notify`]): one channel's sends and deliveries.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    channel: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// The cluster families, registered always but with a series only on a node of a
/// cluster ([`Metrics::cluster_series`]).
struct ClusterFamilies {
    published: Family<NodeLabel, Counter>,
    taken: Family<NodeLabel, Counter>,
    redelivered: Family<NodeLabel, Counter>,
    history_published: Family<NodeLabel, Counter>,
    history_applied: Family<NodeLabel, Counter>,
    stream_pending: Family<NodeLabel, Gauge>,
    history_lag: Family<NodeLabel, Gauge>,
    nodes_alive: Family<NodeLabel, Gauge>,
}

impl ClusterFamilies {
    fn register(registry: &mut Registry) -> ClusterFamilies {
        let mut counter = |name: &str, help: &str| {
            let f = Family::<NodeLabel, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let published = counter(
            "cluster_runs_published",
            "Runs this node's triggers handed to the cluster (duplicates of a run the cluster already had not counted)",
        );
        let taken = counter(
            "cluster_runs_taken",
            "Runs this node took from the cluster's runs stream",
        );
        let redelivered = counter(
            "cluster_runs_redelivered",
            "Runs this node took that had been delivered before (their node did not finish them in time)",
        );
        let history_published = counter(
            "cluster_history_published",
            "Final run records this node published to the cluster's history stream",
        );
        let history_applied = counter(
            "cluster_history_applied",
            "Run records from the cluster's history stream this node stored in its own history",
        );
        let mut gauge = |name: &str, help: &str| {
            let f = Family::<NodeLabel, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        ClusterFamilies {
            published,
            taken,
            redelivered,
            history_published,
            history_applied,
            stream_pending: gauge(
                "cluster_stream_pending",
                "Runs in the cluster's runs stream no node has taken yet (read at scrape time)",
            ),
            history_lag: gauge(
                "cluster_history_lag",
                "Records in the cluster's history stream this node has not applied yet (read at scrape time)",
            ),
            nodes_alive: gauge(
                "cluster_nodes_alive",
                "Nodes of the cluster seen within the node TTL (read at scrape time)",
            ),
        }
    }
}

/// One node's cluster series: counted where things happen, set at scrape time for the
/// gauges. Cheap to clone (the series are shared).
#[derive(Clone, Debug, Default)]
pub struct ClusterSeries {
    pub published: Counter,
    pub taken: Counter,
    pub redelivered: Counter,
    pub history_published: Counter,
    pub history_applied: Counter,
    pub stream_pending: Gauge,
    pub history_lag: Gauge,
    pub nodes_alive: Gauge,
}

fn run_duration_histogram() -> Histogram {
    Histogram::new(RUN_DURATION_BUCKETS)
}

/// The engine's counters and gauges, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    run_duration: Family<PluginLabel, Histogram, fn() -> Histogram>,
    host_calls: Family<HostCallLabels, Counter>,
    ssh_sessions: Gauge,
    ssh_channels: Gauge,
    webhook_deliveries: Family<DeliveryLabels, Counter>,
    notifications: Family<NotificationLabels, Counter>,
    outbound_requests: Family<OutboundLabels, Counter>,
    docker_events: DockerEventMetrics,
    cluster: ClusterFamilies,
}

/// The Docker event streams' families ([`crate::trigger::docker::watch`]).
struct DockerEventMetrics {
    up: Family<DeviceLabel, Gauge>,
    failures: Family<DeviceLabel, Counter>,
    events: Family<DeviceLabel, Counter>,
    runs: Family<PluginLabel, Counter>,
}

impl DockerEventMetrics {
    fn register(registry: &mut Registry) -> DockerEventMetrics {
        let m = DockerEventMetrics {
            up: Family::default(),
            failures: Family::default(),
            events: Family::default(),
            runs: Family::default(),
        };
        registry.register(
            "docker_event_stream_up",
            "Docker event streams by device: 1 while open, 0 while being retried",
            m.up.clone(),
        );
        registry.register(
            "docker_event_stream_failures",
            "Docker event streams that failed or ended and are retried, by device",
            m.failures.clone(),
        );
        registry.register(
            "docker_events",
            "Docker events received on the engine's event streams, by device",
            m.events.clone(),
        );
        registry.register(
            "docker_event_runs",
            "Runs submitted for Docker events (after debounce), by plugin",
            m.runs.clone(),
        );
        m
    }

    fn device(device: &str) -> DeviceLabel {
        DeviceLabel {
            device: device.to_string(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("capstan");
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Plugin runs that reached a final status, by plugin and status",
            runs.clone(),
        );
        let run_duration =
            Family::<PluginLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                run_duration_histogram,
            );
        registry.register(
            "run_duration_seconds",
            "How long finished plugin runs took, from start to finish, by plugin",
            run_duration.clone(),
        );
        let host_calls = Family::<HostCallLabels, Counter>::default();
        registry.register(
            "host_calls",
            "Host function calls plugins made, by operation and the policy's decision",
            host_calls.clone(),
        );
        let ssh_sessions = Gauge::default();
        registry.register(
            "ssh_sessions",
            "SSH sessions open to Docker hosts now",
            ssh_sessions.clone(),
        );
        let ssh_channels = Gauge::default();
        registry.register(
            "ssh_channels",
            "SSH channels open now: one per Docker connection (streamlocal or dial-stdio)",
            ssh_channels.clone(),
        );
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries, by hook and how they were answered",
            webhook_deliveries.clone(),
        );
        // Notifications: labelled by channels the operator configured (never a name a
        // plugin made up), so the series stay bounded.
        let notifications = Family::<NotificationLabels, Counter>::default();
        registry.register(
            "notifications",
            "Notifications by channel and what became of them: queued, duplicate, rate-limited, queue-full (sends); retried, delivered, failed (deliveries)",
            notifications.clone(),
        );
        let outbound_requests = Family::<OutboundLabels, Counter>::default();
        registry.register(
            "outbound_requests",
            "Outbound HTTP requests plugins made, by plugin, the allow-list's decision and result (a status class, denied, timeout, unreachable, too-large)",
            outbound_requests.clone(),
        );
        let docker_events = DockerEventMetrics::register(&mut registry);
        let cluster = ClusterFamilies::register(&mut registry);
        Metrics {
            cluster,
            docker_events,
            outbound_requests,
            notifications,
            registry,
            runs,
            run_duration,
            host_calls,
            ssh_sessions,
            ssh_channels,
            webhook_deliveries,
        }
    }

    /// A run reached a final status (`ok`, `failed`, `denied`, `timed-out`, `interrupted`).
    pub fn run_finished(&self, plugin: &str, status: &str, duration: Duration) {
        self.runs
            .get_or_create(&RunLabels {
                plugin: plugin.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.run_duration
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// One host function call a plugin made and the policy's decision (`allow`/`deny`).
    pub fn host_call(&self, op: &str, decision: &str) {
        self.host_calls
            .get_or_create(&HostCallLabels {
                op: op.to_string(),
                decision: decision.to_string(),
            })
            .inc();
    }

    /// One webhook delivery and how it was answered: `accepted`, `duplicate`, `unauthorized`,
    /// `unknown-hook`, `too-large`, `invalid`, `rate-limited`, `unavailable`.
    ///
    /// For `unknown-hook` the hook name (chosen by whoever sent the request) is not kept.
    pub fn webhook_delivery(&self, hook: &str, result: &str) {
        let hook = if result == UNKNOWN_HOOK { "" } else { hook };
        self.webhook_deliveries
            .get_or_create(&DeliveryLabels {
                hook: hook.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// One notification to an existing channel: how its send ended (`queued`, `duplicate`,
    /// `rate-limited`, `queue-full`), a failed attempt to be retried (`retried`), or its
    /// delivery's final outcome (`delivered`, `failed`).
    pub fn notification(&self, channel: &str, result: &str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                channel: channel.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// One outbound HTTP request of `plugin`: `decision` (`allow`/`deny`) and its
    /// `result` as the host call records it (a status code such as `200`, or `denied`,
    /// `timeout`, `unreachable`, `too-large`); status codes are counted by class (`2xx`),
    /// anything else outside that vocabulary as `other`, so the series stay bounded.
    pub fn outbound_request(&self, plugin: &str, decision: &str, result: &str) {
        let result = match result.as_bytes() {
            [c @ b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => format!("{}xx", *c as char),
            _ if ["denied", "timeout", "unreachable", "too-large"].contains(&result) => {
                result.to_string()
            }
            _ => "other".to_string(),
        };
        self.outbound_requests
            .get_or_create(&OutboundLabels {
                plugin: plugin.to_string(),
                decision: decision.to_string(),
                result,
            })
            .inc();
    }

    /// A device's Docker event stream opened (`true`) or is being retried.
    pub fn docker_event_stream(&self, device: &str, up: bool) {
        let d = DockerEventMetrics::device(device);
        self.docker_events.up.get_or_create(&d).set(i64::from(up));
    }

    /// A device's Docker event stream failed or ended, and is retried.
    pub fn docker_event_stream_failed(&self, device: &str) {
        let d = DockerEventMetrics::device(device);
        self.docker_events.failures.get_or_create(&d).inc();
    }

    /// A device's Docker event stream was stopped (no plugin listens to it any more).
    pub fn docker_event_stream_gone(&self, device: &str) {
        self.docker_events
            .up
            .remove(&DockerEventMetrics::device(device));
    }

    /// One Docker event received on `device`'s stream.
    pub fn docker_event(&self, device: &str) {
        let d = DockerEventMetrics::device(device);
        self.docker_events.events.get_or_create(&d).inc();
    }

    /// One run submitted to `plugin` for Docker events.
    pub fn docker_event_run(&self, plugin: &str) {
        self.docker_events
            .runs
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// The cluster series of node `node` (created on the first call: the families
    /// appear in the text from then on).
    pub fn cluster_series(&self, node: &str) -> ClusterSeries {
        let l = NodeLabel {
            node: node.to_string(),
        };
        let c = &self.cluster;
        ClusterSeries {
            published: c.published.get_or_create(&l).clone(),
            taken: c.taken.get_or_create(&l).clone(),
            redelivered: c.redelivered.get_or_create(&l).clone(),
            history_published: c.history_published.get_or_create(&l).clone(),
            history_applied: c.history_applied.get_or_create(&l).clone(),
            stream_pending: c.stream_pending.get_or_create(&l).clone(),
            history_lag: c.history_lag.get_or_create(&l).clone(),
            nodes_alive: c.nodes_alive.get_or_create(&l).clone(),
        }
    }

    /// The Prometheus text exposition, with the Docker pool's SSH sessions and channels read now.
    pub fn render(&self, pool: &crate::docker::Pool) -> String {
        let stats = pool.stats();
        self.ssh_sessions.set(gauge_value(stats.ssh_sessions));
        self.ssh_channels.set(gauge_value(stats.ssh_channels));
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn renders_the_ssh_gauges_always_and_labelled_families_once_they_have_a_series() {
        let m = Metrics::new();
        let text = m.render(&crate::docker::Pool::default());
        assert_eq!(sample(&text, "capstan_ssh_sessions "), Some(0.0), "{text}");
        assert_eq!(sample(&text, "capstan_ssh_channels "), Some(0.0), "{text}");
        assert!(!text.contains("capstan_runs"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        m.run_finished("p", "ok", Duration::from_millis(1));
        m.host_call("docker.list-containers", "allow");
        m.webhook_delivery("h", "accepted");
        let text = m.render(&crate::docker::Pool::default());
        for family in [
            "capstan_runs counter",
            "capstan_run_duration_seconds histogram",
            "capstan_host_calls counter",
            "capstan_ssh_sessions gauge",
            "capstan_ssh_channels gauge",
            "capstan_webhook_deliveries counter",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family} missing:\n{text}"
            );
        }
    }

    #[test]
    fn counts_runs_by_plugin_and_status_and_observes_their_duration() {
        let m = Metrics::new();
        m.run_finished("restarter", "ok", Duration::from_millis(3));
        m.run_finished("restarter", "ok", Duration::from_millis(40));
        m.run_finished("restarter", "timed-out", Duration::from_secs(5));
        m.host_call("docker.restart-container", "deny");
        let text = m.render(&crate::docker::Pool::default());
        assert_eq!(
            sample(
                &text,
                r#"capstan_runs_total{plugin="restarter",status="ok"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"capstan_runs_total{plugin="restarter",status="timed-out"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"capstan_run_duration_seconds_count{plugin="restarter"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"capstan_run_duration_seconds_bucket{le="0.005",plugin="restarter"}"#
            )
            .or_else(|| sample(
                &text,
                r#"capstan_run_duration_seconds_bucket{plugin="restarter",le="0.005"}"#
            )),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"capstan_host_calls_total{op="docker.restart-container",decision="deny"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn deliveries_to_unknown_hooks_do_not_keep_the_requested_name() {
        let m = Metrics::new();
        m.webhook_delivery("deploy", "accepted");
        for i in 0..100 {
            m.webhook_delivery(&format!("probe-{i}"), "unknown-hook");
        }
        let text = m.render(&crate::docker::Pool::default());
        assert!(!text.contains("probe-"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"capstan_webhook_deliveries_total{hook="",result="unknown-hook"}"#
            ),
            Some(100.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"capstan_webhook_deliveries_total{hook="deploy",result="accepted"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn counts_outbound_requests_by_status_class_in_a_bounded_vocabulary() {
        let m = Metrics::new();
        m.outbound_request("probe", "allow", "200");
        m.outbound_request("probe", "allow", "204");
        m.outbound_request("probe", "deny", "denied");
        m.outbound_request("probe", "allow", "made-up");
        let text = m.render(&crate::docker::Pool::default());
        let two =
            r#"capstan_outbound_requests_total{plugin="probe",decision="allow",result="2xx"}"#;
        assert_eq!(sample(&text, two), Some(2.0), "{text}");
        let denied =
            r#"capstan_outbound_requests_total{plugin="probe",decision="deny",result="denied"}"#;
        assert_eq!(sample(&text, denied), Some(1.0), "{text}");
        assert!(text.contains(r#"result="other""#), "{text}");
    }

    #[test]
    fn cluster_series_appear_only_on_a_node_and_carry_its_name() {
        let m = Metrics::new();
        let text = m.render(&crate::docker::Pool::default());
        assert!(!text.contains("capstan_cluster_"), "{text}");
        let series = m.cluster_series("n2");
        series.taken.inc();
        series.taken.inc();
        series.redelivered.inc();
        series.stream_pending.set(7);
        series.nodes_alive.set(3);
        // The same node's series are shared, not made twice.
        m.cluster_series("n2").history_applied.inc();
        let text = m.render(&crate::docker::Pool::default());
        assert_eq!(
            sample(&text, "capstan_cluster_runs_taken_total{node=\"n2\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "capstan_cluster_runs_redelivered_total{node=\"n2\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "capstan_cluster_history_applied_total{node=\"n2\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "capstan_cluster_stream_pending{node=\"n2\"}"),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "capstan_cluster_nodes_alive{node=\"n2\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "capstan_cluster_runs_published_total{node=\"n2\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Metrics>();
    }
}
