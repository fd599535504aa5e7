//! `capstan:plugin/docker`: Docker on the devices in the plugin's scope.
//!
//! Each function lists the Docker API requests it will make ([`Req`]) and hands them to
//! [`RunState::authorize`] — device scope, the policy's decision on every request,
//! container scope — before the first one is sent; then sends them over the device's
//! pooled connection ([`Api`]) and maps the answer. The audit log and the run's report
//! get one entry per call, allowed or denied.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::docker_api::{
    Answer, Api, MAX_BODY, MAX_OUTPUT, REQUEST_TIMEOUT, Req, Target, connect_error, container_ref,
    demux, encode_query, image_ref, labels_of, split_reference, str_of,
};
use super::docker_update::{self, short_repository};
use super::{HostError, RunState, docker_spec};
use crate::plugin::bindings::wit_docker::{
    CheckReport, ContainerDetails, ContainerFilter, ContainerPruneReport, ContainerSpec,
    ContainerSummary, Created, DaemonInfo, Device, ExecOptions, ExecResult, Host, ImageRemoval,
    ImageSummary, ImageUpdate, LogOptions, Logs, NetworkSummary, PruneFilter, PullResult,
    RecreateOptions, RecreateResult, ResourceUsage, UpdateTarget, VolumeSummary,
};
use crate::plugin::records::AuditRecord;
use crate::plugin::report::{CallDecision, Denial, HostCall};
use crate::policy::{ContainerScope, own_names};

/// One Docker host call under way.
pub struct Call {
    op: &'static str,
    device: String,
    request: String,
    started: Instant,
    /// The container's inspect output, when the scope check fetched it.
    inspected: Option<Value>,
}

impl RunState {
    /// Steps 1 and 2: device scope, the policy's decision on every request, the device
    /// and its connection, the container scope. A refusal is recorded and returned as
    /// `denied`; nothing of the call is sent.
    async fn authorize(
        &mut self,
        op: &'static str,
        device: &str,
        requests: &[Req],
        container: Option<&str>,
    ) -> Result<(Api, Call), HostError> {
        self.run.count_call().map_err(HostError::Trap)?;
        let mut call = Call {
            op,
            device: device.to_string(),
            request: requests
                .iter()
                .map(Req::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            started: Instant::now(),
            inspected: None,
        };
        let policy = &self.run.plugin.policy;
        if !policy.devices().allows(device) {
            let patterns: Vec<&str> = policy.devices().patterns().collect();
            let reason = if patterns.is_empty() {
                format!(
                    "device `{device}` is outside the plugin's device scope: its policy names no device (set `devices` in [policy])"
                )
            } else {
                format!(
                    "device `{device}` is outside the plugin's device scope (policy devices = {patterns:?})"
                )
            };
            return Err(self.deny(&call, reason));
        }
        for req in requests {
            let decision = policy.decide(req.method, &req.path);
            if !decision.is_allowed() {
                let reason = decision.reason();
                call.request = req.to_string();
                return Err(self.deny(&call, reason));
            }
        }
        let opened = open_device(self.run.services.clone(), device, self.run.deadline).await;
        let api = match opened {
            Ok(api) => api,
            Err(e) => return Err(self.finish_err(call, e)),
        };
        if let Some(container) = container {
            let scope = self.run.plugin.policy.containers().clone();
            if !scope.is_all() {
                let inspect = Req::get(format!("/containers/{container}/json"));
                let v = match api.json(&inspect, None).await {
                    Ok(v) => v,
                    Err(e) => return Err(self.finish_err(call, e)),
                };
                if !scope.admits_details(&v) {
                    let reason = format!(
                        "container `{}` is outside the plugin's container scope ({})",
                        v["Name"]
                            .as_str()
                            .unwrap_or_default()
                            .trim_start_matches('/'),
                        scope.describe()
                    );
                    return Err(self.deny(&call, reason));
                }
                call.inspected = Some(v);
            }
        }
        Ok((api, call))
    }

    fn deny(&mut self, call: &Call, reason: String) -> HostError {
        tracing::info!(plugin = %self.run.plugin.name, device = %bounded(&call.device), op = call.op, request = %bounded(&call.request), reason = %bounded(&reason), "plugin host call denied");
        self.record(call, CallDecision::Deny, "denied", &reason);
        self.run.keep_denial(Denial {
            op: call.op.to_string(),
            device: call.device.clone(),
            request: call.request.clone(),
            reason: reason.clone(),
        });
        HostError::denied(reason)
    }

    /// The call, recorded once: in the run's report and in the audit log.
    fn record(&mut self, call: &Call, decision: CallDecision, result: &str, reason: &str) {
        // The device, request and reason hold what the guest passed (a device name, a
        // container reference): bounded, so a hostile argument cannot bloat the run record
        // or the audit log.
        let recorded = HostCall {
            op: call.op.to_string(),
            device: bounded(&call.device),
            request: bounded(&call.request),
            decision,
            result: bounded(result),
            ms: crate::millis(call.started.elapsed()),
            reason: bounded(reason),
        };
        let rec = AuditRecord {
            time: chrono::Utc::now(),
            plugin: self.run.plugin.name.clone(),
            call: recorded.clone(),
        };
        self.run.keep_host_call(recorded);
        if let Err(e) = self.run.services.audit.record(&rec) {
            tracing::error!(error = %e, "cannot write the audit record");
        }
    }

    fn finish_err(&mut self, call: Call, e: HostError) -> HostError {
        let reason = match &e {
            HostError::Wit(w) => super::render_wit_error(w),
            HostError::Trap(t) => format!("host failure: {t}"),
        };
        self.record(&call, CallDecision::Allow, e.kind(), &reason);
        e
    }

    /// Step 4: record the result and pass it on.
    fn finish<T>(&mut self, call: Call, r: Result<T, HostError>) -> Result<T, HostError> {
        match r {
            Ok(v) => {
                self.record(
                    &call,
                    CallDecision::Allow,
                    "ok",
                    "allowed by the plugin's policy",
                );
                Ok(v)
            }
            Err(e) => Err(self.finish_err(call, e)),
        }
    }

    /// A container operation that sends one request and reads nothing back.
    async fn container_action(
        &mut self,
        op: &'static str,
        device: String,
        container: String,
        action: &str,
        query: String,
    ) -> Result<(), HostError> {
        let c = container_ref(&container)?;
        let req = Req::post(format!("/containers/{c}/{action}{query}"));
        let (api, call) = self
            .authorize(op, &device, std::slice::from_ref(&req), Some(&c))
            .await?;
        let r = api.call(&req, None).await;
        self.finish(call, r)
    }
}

/// The device's record and pooled connection; in cluster mode, for a device another
/// node owns, the way to that node.
async fn open_device(
    services: std::sync::Arc<super::Services>,
    device: &str,
    deadline: Instant,
) -> Result<Api, HostError> {
    let engine = &services.engine;
    let devices = engine
        .devices()
        .map_err(|e| HostError::trap(format!("cannot read devices: {e}")))?;
    let dev = match devices.get(device) {
        Ok(d) => d,
        Err(crate::device::DeviceError::NotFound(_)) => {
            return Err(HostError::not_found(format!("no device named `{device}`")));
        }
        Err(e) => return Err(HostError::trap(format!("cannot read device {device}: {e}"))),
    };
    if let Some(cluster) = services.cluster.get()
        && !cluster.holds(&dev.name)
    {
        return Ok(Api {
            target: owner_of(cluster, &dev.name).await?,
            device: dev.name,
            deadline,
        });
    }
    let client = engine.docker_client(&dev).map_err(|e| connect_error(&e))?;
    Ok(Api {
        target: Target::Local(client),
        device: dev.name,
        deadline,
    })
}

/// The node that owns `device` (this node does not act on it now).
async fn owner_of(
    cluster: &std::sync::Arc<crate::cluster::Cluster>,
    device: &str,
) -> Result<Target, HostError> {
    let lease = cluster
        .owner_elsewhere(device)
        .await
        .map_err(|e| HostError::unreachable(e.to_string()))?;
    Ok(Target::Owner {
        cluster: cluster.clone(),
        owner: lease.owner,
        instance: lease.instance,
    })
}

fn device_of(d: &crate::device::Device) -> Device {
    Device {
        name: d.name.clone(),
        kind: d.kind.to_string(),
        address: d.address(),
    }
}

const CONTAINER_STATES: [&str; 7] = [
    "created",
    "restarting",
    "running",
    "removing",
    "paused",
    "exited",
    "dead",
];
const HEALTH_STATES: [&str; 4] = ["starting", "healthy", "unhealthy", "none"];

fn summary_of(v: &Value) -> ContainerSummary {
    // Docker may list a legacy link alias (`/other/alias`) before the container's own
    // name; the summary carries the own name.
    let names: Vec<&str> = v["Names"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let name = own_names(&names)
        .next()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    let status = str_of(&v["Status"]);
    let health = v["Health"]["Status"]
        .as_str()
        .filter(|s| !s.is_empty() && *s != "none")
        .map(str::to_string)
        .or_else(|| {
            ["(healthy)", "(unhealthy)", "(health: starting)"]
                .iter()
                .zip(["healthy", "unhealthy", "starting"])
                .find(|(needle, _)| status.contains(*needle))
                .map(|(_, h)| h.to_string())
        });
    ContainerSummary {
        id: str_of(&v["Id"]),
        name,
        image: str_of(&v["Image"]),
        image_id: str_of(&v["ImageID"]),
        state: str_of(&v["State"]),
        status,
        health,
        labels: labels_of(&v["Labels"]),
        created: v["Created"].as_i64().unwrap_or(0) * 1000,
    }
}

fn details_of(v: &Value) -> ContainerDetails {
    let s = &v["State"];
    ContainerDetails {
        id: str_of(&v["Id"]),
        name: v["Name"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: str_of(&v["Config"]["Image"]),
        image_id: str_of(&v["Image"]),
        state: str_of(&s["Status"]),
        running: s["Running"].as_bool().unwrap_or(false),
        paused: s["Paused"].as_bool().unwrap_or(false),
        restarting: s["Restarting"].as_bool().unwrap_or(false),
        exit_code: s["ExitCode"].as_i64().unwrap_or(0),
        started_at: time_or_empty(&s["StartedAt"]),
        finished_at: time_or_empty(&s["FinishedAt"]),
        health: s["Health"]["Status"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string),
        failing_streak: s["Health"]["FailingStreak"].as_u64().unwrap_or(0) as u32,
        restart_count: v["RestartCount"].as_u64().unwrap_or(0) as u32,
        labels: labels_of(&v["Config"]["Labels"]),
        created: str_of(&v["Created"]),
    }
}

/// Docker writes `0001-01-01T00:00:00Z` for "never".
fn time_or_empty(v: &Value) -> String {
    let s = v.as_str().unwrap_or_default();
    if s.starts_with("0001-01-01") {
        String::new()
    } else {
        s.to_string()
    }
}

fn stats_of(v: &Value) -> ResourceUsage {
    let cpu = &v["cpu_stats"];
    let pre = &v["precpu_stats"];
    let cpu_delta = cpu["cpu_usage"]["total_usage"].as_f64().unwrap_or(0.0)
        - pre["cpu_usage"]["total_usage"].as_f64().unwrap_or(0.0);
    let sys_delta = cpu["system_cpu_usage"].as_f64().unwrap_or(0.0)
        - pre["system_cpu_usage"].as_f64().unwrap_or(0.0);
    let online = cpu["online_cpus"]
        .as_f64()
        .filter(|n| *n > 0.0)
        .unwrap_or_else(|| {
            cpu["cpu_usage"]["percpu_usage"]
                .as_array()
                .map(|a| a.len() as f64)
                .unwrap_or(1.0)
        });
    let cpu_percent = if cpu_delta > 0.0 && sys_delta > 0.0 {
        cpu_delta / sys_delta * online * 100.0
    } else {
        0.0
    };
    let mem = &v["memory_stats"];
    let cache = ["inactive_file", "total_inactive_file"]
        .iter()
        .find_map(|k| mem["stats"][*k].as_u64())
        .unwrap_or(0);
    let usage = mem["usage"].as_u64().unwrap_or(0).saturating_sub(cache);
    let (mut rx, mut tx) = (0, 0);
    if let Some(nets) = v["networks"].as_object() {
        for n in nets.values() {
            rx += n["rx_bytes"].as_u64().unwrap_or(0);
            tx += n["tx_bytes"].as_u64().unwrap_or(0);
        }
    }
    let (mut read, mut write) = (0, 0);
    if let Some(ios) = v["blkio_stats"]["io_service_bytes_recursive"].as_array() {
        for io in ios {
            let value = io["value"].as_u64().unwrap_or(0);
            match io["op"].as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("read") => read += value,
                Some("write") => write += value,
                _ => {}
            }
        }
    }
    ResourceUsage {
        cpu_percent,
        memory_usage: usage,
        memory_limit: mem["limit"].as_u64().unwrap_or(0),
        network_rx: rx,
        network_tx: tx,
        block_read: read,
        block_write: write,
        pids: v["pids_stats"]["current"].as_u64().unwrap_or(0),
    }
}

/// Whether a response body is Docker's multiplexed stream format.
fn multiplexed(a: &Answer, default: bool) -> bool {
    match a.headers.get("content-type").and_then(|v| v.to_str().ok()) {
        Some(t) if t.contains("multiplexed-stream") => true,
        Some(t) if t.contains("raw-stream") => default,
        _ => default,
    }
}

fn text_of(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Keeps at most `MAX_OUTPUT` bytes; reports whether it cut.
fn capped(mut bytes: Vec<u8>) -> (String, bool) {
    let cut = bytes.len() > MAX_OUTPUT;
    bytes.truncate(MAX_OUTPUT);
    (text_of(bytes), cut)
}

/// The `status` of the last line of a pull's progress stream, or its `error`.
fn pull_outcome(body: &[u8]) -> Result<String, String> {
    let mut last = String::new();
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if let Some(e) = v["error"]
            .as_str()
            .or_else(|| v["errorDetail"]["message"].as_str())
        {
            return Err(e.to_string());
        }
        if let Some(s) = v["status"].as_str() {
            last = s.to_string();
        }
    }
    Ok(last)
}

/// The fields of a container's configuration that came from its image, so a re-created
/// container picks up the new image's values instead of freezing the old ones (the
/// approach Watchtower takes).
fn strip_image_defaults(config: &mut Value, image_config: &Value) {
    let Some(cfg) = config.as_object_mut() else {
        return;
    };
    for key in [
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "Healthcheck",
        "StopSignal",
    ] {
        if cfg
            .get(key)
            .is_some_and(|v| !v.is_null() && *v == image_config[key])
        {
            cfg.remove(key);
        }
    }
    if let (Some(env), Some(img_env)) = (
        cfg.get_mut("Env").and_then(Value::as_array_mut),
        image_config["Env"].as_array(),
    ) {
        env.retain(|e| !img_env.contains(e));
    }
    for key in ["Labels", "ExposedPorts", "Volumes"] {
        if let (Some(mine), Some(theirs)) = (
            cfg.get_mut(key).and_then(Value::as_object_mut),
            image_config[key].as_object(),
        ) {
            mine.retain(|k, v| theirs.get(k) != Some(v));
        }
    }
}

/// The body of `POST /containers/create` that re-creates `old` (its inspect output) from
/// `image`.
fn create_body(old: &Value, image: &str, old_image_config: Option<&Value>) -> Value {
    let mut config = old["Config"].clone();
    if let Some(img) = old_image_config {
        strip_image_defaults(&mut config, img);
    }
    let short_id: String = str_of(&old["Id"]).chars().take(12).collect();
    if let Some(cfg) = config.as_object_mut() {
        cfg.insert("Image".into(), json!(image));
        // Docker's default host name is the short ID; the new container gets its own.
        if cfg.get("Hostname").and_then(Value::as_str) == Some(short_id.as_str()) {
            cfg.remove("Hostname");
        }
    }
    let host_config = old["HostConfig"].clone();
    let mode = host_config["NetworkMode"].as_str().unwrap_or_default();
    let mut endpoints = serde_json::Map::new();
    let own_network = !(mode == "host" || mode == "none" || mode.starts_with("container:"));
    if own_network && let Some(nets) = old["NetworkSettings"]["Networks"].as_object() {
        for (name, ep) in nets {
            let aliases: Vec<Value> = ep["Aliases"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|x| x.as_str() != Some(short_id.as_str()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            endpoints.insert(
                name.clone(),
                json!({
                    "IPAMConfig": ep["IPAMConfig"],
                    "Links": ep["Links"],
                    "Aliases": aliases,
                    "DriverOpts": ep["DriverOpts"],
                }),
            );
        }
    }
    let mut body = config;
    if let Some(b) = body.as_object_mut() {
        b.insert("HostConfig".into(), host_config);
        b.insert(
            "NetworkingConfig".into(),
            json!({ "EndpointsConfig": endpoints }),
        );
    }
    body
}

impl Host for RunState {
    async fn list_devices(&mut self) -> wasmtime::Result<Vec<Device>> {
        self.run.count_call()?;
        let policy = &self.run.plugin.policy;
        let devices = self
            .run
            .services
            .engine
            .devices()
            .and_then(|d| d.list())
            .map_err(|e| wasmtime::format_err!("cannot read devices: {e}"))?;
        Ok(devices
            .iter()
            .filter(|d| policy.devices().allows(&d.name))
            .map(device_of)
            .collect())
    }

    async fn connect(&mut self, device: String) -> Result<(), HostError> {
        let req = Req::get("/_ping");
        let (api, call) = self
            .authorize("connect", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.call(&req, None).await;
        self.finish(call, r)
    }

    async fn check(&mut self, device: String) -> Result<CheckReport, HostError> {
        let ping = Req::get("/_ping");
        let version = Req::get("/version");
        let (api, call) = self
            .authorize("check", &device, &[ping.clone(), version.clone()], None)
            .await?;
        let r = async {
            let t = Instant::now();
            api.call(&ping, None).await?;
            let latency_ms = crate::millis(t.elapsed());
            let v = api.json(&version, None).await?;
            Ok(CheckReport {
                server_version: str_of(&v["Version"]),
                api_version: str_of(&v["ApiVersion"]),
                os: str_of(&v["Os"]),
                arch: str_of(&v["Arch"]),
                latency_ms,
            })
        }
        .await;
        self.finish(call, r)
    }

    async fn list_containers(
        &mut self,
        device: String,
        filter: ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, HostError> {
        for s in &filter.status {
            if !CONTAINER_STATES.contains(&s.as_str()) {
                return Err(HostError::invalid(format!(
                    "status `{s}` is not one of {}",
                    CONTAINER_STATES.join(", ")
                )));
            }
        }
        for h in &filter.health {
            if !HEALTH_STATES.contains(&h.as_str()) {
                return Err(HostError::invalid(format!(
                    "health `{h}` is not one of {}",
                    HEALTH_STATES.join(", ")
                )));
            }
        }
        let names = ContainerScope::new([""; 0], &filter.names)
            .map_err(|e| HostError::invalid(format!("names: {e}")))?;
        let no_labels = std::collections::HashMap::new();
        let mut filters = serde_json::Map::new();
        if !filter.labels.is_empty() {
            filters.insert("label".into(), json!(filter.labels));
        }
        if !filter.status.is_empty() {
            filters.insert("status".into(), json!(filter.status));
        }
        if !filter.health.is_empty() {
            filters.insert("health".into(), json!(filter.health));
        }
        let mut path = format!("/containers/json?all={}", u8::from(filter.all));
        if !filters.is_empty() {
            path.push_str("&filters=");
            path.push_str(&encode_query(&Value::Object(filters).to_string()));
        }
        let req = Req::get(path);
        let (api, call) = self
            .authorize("list-containers", &device, std::slice::from_ref(&req), None)
            .await?;
        let scope = self.run.plugin.policy.containers().clone();
        let r = async {
            let v = api.json(&req, None).await?;
            let list = v.as_array().cloned().unwrap_or_default();
            Ok(list
                .iter()
                .filter(|c| scope.admits_summary(c))
                .map(summary_of)
                .filter(|s| names.matches(&s.name, &no_labels))
                .collect())
        }
        .await;
        self.finish(call, r)
    }

    async fn inspect_container(
        &mut self,
        device: String,
        container: String,
    ) -> Result<ContainerDetails, HostError> {
        let c = container_ref(&container)?;
        let req = Req::get(format!("/containers/{c}/json"));
        let (api, mut call) = self
            .authorize(
                "inspect-container",
                &device,
                std::slice::from_ref(&req),
                Some(&c),
            )
            .await?;
        let r = match call.inspected.take() {
            Some(v) => Ok(details_of(&v)),
            None => api.json(&req, None).await.map(|v| details_of(&v)),
        };
        self.finish(call, r)
    }

    async fn start_container(
        &mut self,
        device: String,
        container: String,
    ) -> Result<(), HostError> {
        self.container_action("start-container", device, container, "start", String::new())
            .await
    }

    async fn stop_container(
        &mut self,
        device: String,
        container: String,
        timeout_secs: Option<u32>,
    ) -> Result<(), HostError> {
        let q = timeout_secs.map(|t| format!("?t={t}")).unwrap_or_default();
        self.container_action("stop-container", device, container, "stop", q)
            .await
    }

    async fn restart_container(
        &mut self,
        device: String,
        container: String,
        timeout_secs: Option<u32>,
    ) -> Result<(), HostError> {
        let q = timeout_secs.map(|t| format!("?t={t}")).unwrap_or_default();
        self.container_action("restart-container", device, container, "restart", q)
            .await
    }

    async fn kill_container(
        &mut self,
        device: String,
        container: String,
        signal: Option<String>,
    ) -> Result<(), HostError> {
        let q = match signal {
            Some(s) => {
                let ok =
                    !s.is_empty() && s.len() <= 16 && s.chars().all(|c| c.is_ascii_alphanumeric());
                if !ok {
                    return Err(HostError::invalid(format!(
                        "`{s}` is not a signal (write SIGHUP, HUP or 1)"
                    )));
                }
                format!("?signal={s}")
            }
            None => String::new(),
        };
        self.container_action("kill-container", device, container, "kill", q)
            .await
    }

    async fn pause_container(
        &mut self,
        device: String,
        container: String,
    ) -> Result<(), HostError> {
        self.container_action("pause-container", device, container, "pause", String::new())
            .await
    }

    async fn unpause_container(
        &mut self,
        device: String,
        container: String,
    ) -> Result<(), HostError> {
        self.container_action(
            "unpause-container",
            device,
            container,
            "unpause",
            String::new(),
        )
        .await
    }

    async fn container_logs(
        &mut self,
        device: String,
        container: String,
        options: LogOptions,
    ) -> Result<Logs, HostError> {
        let c = container_ref(&container)?;
        let (out, err) = if !options.stdout && !options.stderr {
            (true, true)
        } else {
            (options.stdout, options.stderr)
        };
        let mut q = format!("?stdout={}&stderr={}", u8::from(out), u8::from(err));
        if let Some(t) = options.tail {
            q.push_str(&format!("&tail={t}"));
        }
        if let Some(since) = options.since {
            q.push_str(&format!("&since={}", since.div_euclid(1000)));
        }
        if options.timestamps {
            q.push_str("&timestamps=1");
        }
        let req = Req::get(format!("/containers/{c}/logs{q}"));
        let (api, call) = self
            .authorize(
                "container-logs",
                &device,
                std::slice::from_ref(&req),
                Some(&c),
            )
            .await?;
        let r = async {
            let a = api
                .send(&req, None, REQUEST_TIMEOUT, 2 * MAX_OUTPUT)
                .await?
                .check()?;
            let (o, e) = demux(&a.body, multiplexed(&a, true));
            let mut both = o;
            both.extend_from_slice(&e);
            let (text, cut) = capped(both);
            Ok(Logs {
                text,
                truncated: cut || a.truncated,
            })
        }
        .await;
        self.finish(call, r)
    }

    async fn container_stats(
        &mut self,
        device: String,
        container: String,
    ) -> Result<ResourceUsage, HostError> {
        let c = container_ref(&container)?;
        let req = Req::get(format!("/containers/{c}/stats?stream=false"));
        let (api, call) = self
            .authorize(
                "container-stats",
                &device,
                std::slice::from_ref(&req),
                Some(&c),
            )
            .await?;
        let r = api.json(&req, None).await.map(|v| stats_of(&v));
        self.finish(call, r)
    }

    async fn exec(
        &mut self,
        device: String,
        container: String,
        options: ExecOptions,
    ) -> Result<ExecResult, HostError> {
        let c = container_ref(&container)?;
        if options.cmd.is_empty() {
            return Err(HostError::invalid("exec needs a command (cmd is empty)"));
        }
        let create = Req::post(format!("/containers/{c}/exec"));
        // The exec ID is not known before the first request; the policy decides on the
        // endpoint, not the ID, so a placeholder stands in for it.
        let start_t = Req::post("/exec/EXEC_ID/start");
        let inspect_t = Req::get("/exec/EXEC_ID/json");
        let (api, call) = self
            .authorize(
                "exec",
                &device,
                &[create.clone(), start_t, inspect_t],
                Some(&c),
            )
            .await?;
        let limit = Duration::from_secs(u64::from(options.timeout_secs.unwrap_or(30).max(1)));
        let r = async {
            let mut body = json!({
                "AttachStdout": true,
                "AttachStderr": true,
                "Tty": false,
                "Cmd": options.cmd,
            });
            if !options.env.is_empty() {
                body["Env"] = json!(options.env);
            }
            if let Some(u) = &options.user {
                body["User"] = json!(u);
            }
            if let Some(w) = &options.working_dir {
                body["WorkingDir"] = json!(w);
            }
            let created = api.json(&create, Some(&body)).await?;
            let id = created["Id"]
                .as_str()
                .filter(|id| id.chars().all(|c| c.is_ascii_alphanumeric()))
                .ok_or_else(|| HostError::trap("the daemon's exec create answer has no usable Id"))?
                .to_string();
            let start = Req::post(format!("/exec/{id}/start"));
            let answer = api
                .send(&start, Some(&json!({"Detach": false, "Tty": false})), limit, 2 * MAX_OUTPUT + 64 * 1024)
                .await
                .map_err(|e| match e {
                    HostError::Wit(crate::plugin::bindings::WitError::Timeout(_)) => HostError::timeout(format!(
                        "the command did not finish within {} s (it may still be running: Docker cannot stop an exec'd process)",
                        limit.as_secs()
                    )),
                    other => other,
                })?
                .check()?;
            let (out, err) = demux(&answer.body, true);
            let (stdout, cut_out) = capped(out);
            let (stderr, cut_err) = capped(err);
            let status = api.json(&Req::get(format!("/exec/{id}/json")), None).await?;
            Ok(ExecResult {
                exit_code: status["ExitCode"].as_i64(),
                stdout,
                stderr,
                truncated: cut_out || cut_err || answer.truncated,
            })
        }
        .await;
        self.finish(call, r)
    }

    async fn recreate_container(
        &mut self,
        device: String,
        container: String,
        options: RecreateOptions,
    ) -> Result<RecreateResult, HostError> {
        let c = container_ref(&container)?;
        let image = options.image.as_deref().map(image_ref).transpose()?;
        // The image the new container runs is known only after the inspect; decide with
        // the one given, or with a placeholder (the decision does not depend on it).
        let decide_image = image.clone().unwrap_or_else(|| "IMAGE".to_string());
        let (from, tag) = split_reference(&decide_image);
        let mut requests = vec![Req::get(format!("/containers/{c}/json"))];
        if options.pull {
            requests.push(Req::post(format!(
                "/images/create?fromImage={}&tag={}",
                encode_query(&from),
                encode_query(&tag)
            )));
        }
        requests.extend([
            Req::get(format!("/images/{decide_image}/json")),
            Req::post(format!("/containers/{c}/stop")),
            Req::post(format!("/containers/{c}/rename?name=NAME")),
            Req::post("/containers/create?name=NAME"),
            Req::post(format!("/containers/{c}/start")),
            Req::delete(format!("/containers/{c}")),
        ]);
        let (api, mut call) = self
            .authorize("recreate-container", &device, &requests, Some(&c))
            .await?;
        let inspected = call.inspected.take();
        let policy = self.run.plugin.policy.clone();
        match recreate(&api, &policy, &c, inspected, image, &options).await {
            Err(Blocked::Denied(reason)) => Err(self.deny(&call, reason)),
            Err(Blocked::Failed(e)) => self.finish(call, Err(e)),
            Ok(r) => self.finish(call, Ok(r)),
        }
    }

    async fn create_container(
        &mut self,
        device: String,
        name: Option<String>,
        spec: ContainerSpec,
    ) -> Result<Created, HostError> {
        let name = name.as_deref().map(container_ref).transpose()?;
        let body = docker_spec::create_body(&spec)?;
        let query = name
            .as_deref()
            .map(|n| format!("name={}", encode_query(n)))
            .unwrap_or_default();
        let create = Req::post(if query.is_empty() {
            "/containers/create".to_string()
        } else {
            format!("/containers/create?{query}")
        });
        // The new container's ID is known only from the create's answer; the policy
        // decides on the endpoint, so a placeholder stands in for it.
        let inspect = Req::get("/containers/NEW_ID/json");
        let (api, call) = self
            .authorize(
                "create-container",
                &device,
                &[create.clone(), inspect],
                None,
            )
            .await?;
        let policy = self.run.plugin.policy.clone();
        match check_create(&api, &policy, &query, &body, true).await {
            Ok(()) => {}
            Err(Blocked::Denied(reason)) => return Err(self.deny(&call, reason)),
            Err(Blocked::Failed(e)) => return self.finish(call, Err(e)),
        }
        let r = async {
            let v = api.json(&create, Some(&body)).await?;
            let id = docker_id(&v["Id"])?;
            // The name Docker gave it; the create has happened, so a failed look-up
            // only leaves the name as asked.
            let name = match api
                .json(&Req::get(format!("/containers/{id}/json")), None)
                .await
            {
                Ok(d) => d["Name"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                Err(_) => name.unwrap_or_default(),
            };
            Ok(Created {
                id,
                name,
                warnings: strings(&v["Warnings"]),
            })
        }
        .await;
        self.finish(call, r)
    }

    async fn remove_container(
        &mut self,
        device: String,
        container: String,
        force: bool,
        remove_volumes: bool,
    ) -> Result<(), HostError> {
        let c = container_ref(&container)?;
        let req = Req::delete(format!(
            "/containers/{c}?force={}&v={}",
            u8::from(force),
            u8::from(remove_volumes)
        ));
        let (api, call) = self
            .authorize(
                "remove-container",
                &device,
                std::slice::from_ref(&req),
                Some(&c),
            )
            .await?;
        let r = api.call(&req, None).await;
        self.finish(call, r)
    }

    async fn prune_containers(
        &mut self,
        device: String,
        filter: PruneFilter,
    ) -> Result<ContainerPruneReport, HostError> {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        let prune = docker_spec::Prune::parse(&filter, now)?;
        // Only `label` is the list's own filter; `until` and `label!` are judged here.
        let mut filters = serde_json::Map::new();
        filters.insert("status".into(), json!(["created", "exited", "dead"]));
        if !filter.labels.is_empty() {
            filters.insert("label".into(), json!(filter.labels));
        }
        let list = Req::get(format!(
            "/containers/json?all=1&size=1&filters={}",
            encode_query(&Value::Object(filters).to_string())
        ));
        let remove = Req::delete("/containers/CONTAINER_ID");
        let (api, call) = self
            .authorize("prune-containers", &device, &[list.clone(), remove], None)
            .await?;
        let scope = self.run.plugin.policy.containers().clone();
        let r = async {
            let v = api.json(&list, None).await?;
            let mut report = ContainerPruneReport {
                removed: Vec::new(),
                space_reclaimed: 0,
                failed: Vec::new(),
            };
            for c in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                let labels: std::collections::HashMap<String, String> =
                    labels_of(&c["Labels"]).into_iter().collect();
                let created = c["Created"].as_f64().unwrap_or(f64::MAX);
                if !scope.admits_summary(c) || !prune.matches(created, &labels) {
                    continue;
                }
                let summary = summary_of(c);
                let id = docker_id(&c["Id"])?;
                // Without force: a container started since the list stays.
                match api
                    .call(&Req::delete(format!("/containers/{id}")), None)
                    .await
                {
                    Ok(()) => {
                        report.space_reclaimed += c["SizeRw"].as_u64().unwrap_or(0);
                        report.removed.push(summary);
                    }
                    Err(HostError::Wit(e)) => report.failed.push(format!(
                        "{}: {}",
                        summary.name,
                        super::render_wit_error(&e)
                    )),
                    Err(trap) => return Err(trap),
                }
            }
            Ok(report)
        }
        .await;
        self.finish(call, r)
    }

    async fn prune_images(
        &mut self,
        device: String,
        filter: PruneFilter,
        dangling_only: bool,
    ) -> Result<ImageRemoval, HostError> {
        docker_spec::Prune::parse(&filter, 0.0)?;
        let filters =
            docker_spec::filters_json(&filter, &[("dangling", vec![dangling_only.to_string()])]);
        let req = Req::post(format!(
            "/images/prune?filters={}",
            encode_query(&filters.to_string())
        ));
        let (api, call) = self
            .authorize("prune-images", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| {
            let mut removal = image_removal(&v["ImagesDeleted"]);
            removal.space_reclaimed = v["SpaceReclaimed"].as_u64().unwrap_or(0);
            removal
        });
        self.finish(call, r)
    }

    async fn remove_image(
        &mut self,
        device: String,
        image: String,
        force: bool,
        no_prune: bool,
    ) -> Result<ImageRemoval, HostError> {
        let reference = image_ref(&image)?;
        let req = Req::delete(format!(
            "/images/{reference}?force={}&noprune={}",
            u8::from(force),
            u8::from(no_prune)
        ));
        let (api, call) = self
            .authorize("remove-image", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| image_removal(&v));
        self.finish(call, r)
    }

    async fn list_images(
        &mut self,
        device: String,
        all: bool,
    ) -> Result<Vec<ImageSummary>, HostError> {
        let req = Req::get(format!("/images/json?all={}", u8::from(all)));
        let (api, call) = self
            .authorize("list-images", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| {
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|i| ImageSummary {
                    id: str_of(&i["Id"]),
                    tags: strings(&i["RepoTags"])
                        .into_iter()
                        .filter(|t| t != "<none>:<none>")
                        .collect(),
                    digests: strings(&i["RepoDigests"])
                        .into_iter()
                        .filter(|t| t != "<none>@<none>")
                        .collect(),
                    size: i["Size"].as_u64().unwrap_or(0),
                    created: i["Created"].as_i64().unwrap_or(0) * 1000,
                    labels: labels_of(&i["Labels"]),
                })
                .collect()
        });
        self.finish(call, r)
    }

    async fn pull_image(&mut self, device: String, image: String) -> Result<PullResult, HostError> {
        let reference = image_ref(&image)?;
        let (from, tag) = split_reference(&reference);
        let req = Req::post(format!(
            "/images/create?fromImage={}&tag={}",
            encode_query(&from),
            encode_query(&tag)
        ));
        let full = if tag.starts_with("sha256:") {
            format!("{from}@{tag}")
        } else {
            format!("{from}:{tag}")
        };
        let inspect = Req::get(format!("/images/{full}/json"));
        let (api, call) = self
            .authorize("pull-image", &device, &[req.clone(), inspect.clone()], None)
            .await?;
        let r = pull(&api, &req, &inspect, &full).await;
        self.finish(call, r)
    }

    async fn check_image_update(
        &mut self,
        device: String,
        target: UpdateTarget,
    ) -> Result<ImageUpdate, HostError> {
        // The image is known only after the container's inspect; decide with the one
        // given, or with a placeholder (the decision does not depend on it).
        let (mut requests, container, given) = match &target {
            UpdateTarget::Container(c) => {
                let c = container_ref(c)?;
                (
                    vec![Req::get(format!("/containers/{c}/json"))],
                    Some(c),
                    None,
                )
            }
            UpdateTarget::Image(i) => (Vec::new(), None, Some(image_ref(i)?)),
        };
        let decide_image = given.clone().unwrap_or_else(|| "IMAGE".to_string());
        requests.extend([
            Req::get(format!("/images/{decide_image}/json")),
            Req::get(format!("/distribution/{decide_image}/json")),
        ]);
        let (api, mut call) = self
            .authorize(
                "check-image-update",
                &device,
                &requests,
                container.as_deref(),
            )
            .await?;
        let inspected = call.inspected.take();
        let r = check_update(&api, container.as_deref(), inspected, given).await;
        self.finish(call, r)
    }

    async fn list_networks(&mut self, device: String) -> Result<Vec<NetworkSummary>, HostError> {
        let req = Req::get("/networks");
        let (api, call) = self
            .authorize("list-networks", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| {
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|n| NetworkSummary {
                    id: str_of(&n["Id"]),
                    name: str_of(&n["Name"]),
                    driver: str_of(&n["Driver"]),
                    scope: str_of(&n["Scope"]),
                    internal: n["Internal"].as_bool().unwrap_or(false),
                    labels: labels_of(&n["Labels"]),
                })
                .collect()
        });
        self.finish(call, r)
    }

    async fn list_volumes(&mut self, device: String) -> Result<Vec<VolumeSummary>, HostError> {
        let req = Req::get("/volumes");
        let (api, call) = self
            .authorize("list-volumes", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| {
            v["Volumes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|n| VolumeSummary {
                    name: str_of(&n["Name"]),
                    driver: str_of(&n["Driver"]),
                    mountpoint: str_of(&n["Mountpoint"]),
                    scope: str_of(&n["Scope"]),
                    labels: labels_of(&n["Labels"]),
                })
                .collect()
        });
        self.finish(call, r)
    }

    async fn system_info(&mut self, device: String) -> Result<DaemonInfo, HostError> {
        let req = Req::get("/info");
        let (api, call) = self
            .authorize("system-info", &device, std::slice::from_ref(&req), None)
            .await?;
        let r = api.json(&req, None).await.map(|v| DaemonInfo {
            name: str_of(&v["Name"]),
            server_version: str_of(&v["ServerVersion"]),
            operating_system: str_of(&v["OperatingSystem"]),
            kernel_version: str_of(&v["KernelVersion"]),
            architecture: str_of(&v["Architecture"]),
            cpus: v["NCPU"].as_u64().unwrap_or(0) as u32,
            memory: v["MemTotal"].as_u64().unwrap_or(0),
            containers: v["Containers"].as_u64().unwrap_or(0) as u32,
            containers_running: v["ContainersRunning"].as_u64().unwrap_or(0) as u32,
            containers_paused: v["ContainersPaused"].as_u64().unwrap_or(0) as u32,
            containers_stopped: v["ContainersStopped"].as_u64().unwrap_or(0) as u32,
            images: v["Images"].as_u64().unwrap_or(0) as u32,
        });
        self.finish(call, r)
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// An ID from the daemon's answer, checked before it goes into a path.
fn docker_id(v: &Value) -> Result<String, HostError> {
    v.as_str()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(str::to_string)
        .ok_or_else(|| HostError::trap("the daemon's answer has no usable container Id"))
}

/// `[{"Untagged": …}, {"Deleted": …}]`, as image removal and prune answer.
fn image_removal(v: &Value) -> ImageRemoval {
    let mut removal = ImageRemoval {
        deleted: Vec::new(),
        untagged: Vec::new(),
        space_reclaimed: 0,
    };
    for item in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(d) = item["Deleted"].as_str() {
            removal.deleted.push(d.to_string());
        }
        if let Some(u) = item["Untagged"].as_str() {
            removal.untagged.push(u.to_string());
        }
    }
    removal
}

/// Pulls `req` and returns the image now tagged `full`.
async fn pull(api: &Api, req: &Req, inspect: &Req, full: &str) -> Result<PullResult, HostError> {
    let a = api
        .send(req, None, REQUEST_TIMEOUT, MAX_BODY)
        .await?
        .check()?;
    let status = pull_outcome(&a.body).map_err(|e| HostError::docker(500, e))?;
    let img = api.json(inspect, None).await?;
    Ok(PullResult {
        image: full.to_string(),
        id: str_of(&img["Id"]),
        status,
    })
}

/// `check-image-update` after the policy's decision: the reference and local image (of
/// the container, or the one given), its digests in the tag's repository, and the
/// registry's digest for the tag as the daemon reads it (nothing pulled).
async fn check_update(
    api: &Api,
    container: Option<&str>,
    inspected: Option<Value>,
    given: Option<String>,
) -> Result<ImageUpdate, HostError> {
    let (reference, image_id, mut image) = match (container, given) {
        (_, Some(reference)) => {
            let v = api
                .json(&Req::get(format!("/images/{reference}/json")), None)
                .await
                .map_err(|e| match e {
                    HostError::Wit(crate::plugin::bindings::WitError::NotFound(_)) => {
                        HostError::not_found(format!(
                            "image {reference} is not present on device {}",
                            api.device
                        ))
                    }
                    e => e,
                })?;
            (reference, str_of(&v["Id"]), Some(v))
        }
        (Some(c), None) => {
            let v = match inspected {
                Some(v) => v,
                None => {
                    api.json(&Req::get(format!("/containers/{c}/json")), None)
                        .await?
                }
            };
            (str_of(&v["Config"]["Image"]), str_of(&v["Image"]), None)
        }
        (None, None) => return Err(HostError::trap("check-image-update without a target")),
    };
    let tag = match docker_update::followed_tag(&reference) {
        Ok(tag) => image_ref(&tag)?,
        Err(why) => {
            return Ok(docker_update::verdict(
                reference,
                image_id,
                Vec::new(),
                Err(why),
            ));
        }
    };
    if image.is_none() {
        // The image the container runs, by ID: its tag may have moved on since.
        let hex = image_id.strip_prefix("sha256:").unwrap_or(&image_id);
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(HostError::trap(
                "the daemon's answer has no usable image ID",
            ));
        }
        image = Some(
            api.json(&Req::get(format!("/images/sha256:{hex}/json")), None)
                .await?,
        );
    }
    let local = docker_update::local_digests(image.as_ref().unwrap_or(&Value::Null), &tag);
    let answer = api
        .send(
            &Req::get(format!("/distribution/{tag}/json")),
            None,
            REQUEST_TIMEOUT,
            MAX_BODY,
        )
        .await?;
    let remote = if answer.status.is_success() {
        docker_update::remote_digest(&answer.json()?)
            .ok_or_else(|| format!("the daemon's answer for {tag} names no digest"))
    } else {
        Err(docker_update::registry_failure(
            answer.status.as_u16(),
            &answer.message(),
            &tag,
        ))
    };
    Ok(docker_update::verdict(reference, image_id, local, remote))
}

/// Why a create or re-create did not happen.
enum Blocked {
    /// The policy refuses it (recorded as a denial; nothing was changed).
    Denied(String),
    /// A step failed.
    Failed(HostError),
}

impl From<HostError> for Blocked {
    fn from(e: HostError) -> Self {
        Blocked::Failed(e)
    }
}

/// A re-created container keeps its repository (only the tag or digest changes) unless
/// the policy's `[create] images` lists the new image.
fn keeps_repository(
    policy: &crate::policy::CompiledPolicy,
    current: &str,
    image: &str,
) -> Result<(), Blocked> {
    let guard = policy.create();
    if short_repository(current) == short_repository(image)
        || (guard.has_image_list() && guard.allows_image(image))
    {
        return Ok(());
    }
    Err(Blocked::Denied(format!(
        "recreate-container may only change the tag or digest of the container's repository ({}), not move it to {image}: list {image} in the policy's [create] images to allow it",
        short_repository(current)
    )))
}

/// What a create body must pass, as a proxied create would: the create guard, every
/// container it names (`VolumesFrom`, `Links`, `container:` modes) in scope, and — for
/// a new container (`query` holds its `name=`), not a re-created one, which keeps the
/// name and labels of a container already in scope — the new container's name and
/// labels in scope.
async fn check_create(
    api: &Api,
    policy: &crate::policy::CompiledPolicy,
    query: &str,
    body: &Value,
    new_container: bool,
) -> Result<(), Blocked> {
    use crate::docker::daemon;
    use crate::policy::{body as request_body, endpoints};
    let (create, _) = endpoints::find(endpoints::Method::Post, "/containers/create")
        .expect("the create endpoint is in the table");
    let bytes = serde_json::to_vec(body).expect("JSON values serialise");
    let named = request_body::inspect(create, query, &bytes)
        .map_err(|e| Blocked::Denied(format!("the create body cannot be checked: {e}")))?;
    if let Some(asks) = &named.asks {
        policy
            .create()
            .check(asks)
            .map_err(|d| Blocked::Denied(d.to_string()))?;
    }
    let scope = policy.containers();
    if new_container
        && let Some(new) = &named.new_container
        && !scope.is_all()
        && !scope.matches(new.name.as_deref().unwrap_or_default(), &new.labels)
    {
        return Err(Blocked::Denied(format!(
            "the new container {} would be outside the plugin's container scope ({}): give it a name and labels that match",
            new.name.as_deref().unwrap_or("(no name given)"),
            scope.describe()
        )));
    }
    let left = api.deadline.saturating_duration_since(Instant::now());
    let check = async {
        match api.local() {
            Some(client) => {
                daemon::check_named(client, policy.containers(), &named.containers).await
            }
            None => check_named_through(api, policy.containers(), &named.containers).await,
        }
    };
    match tokio::time::timeout(left.min(REQUEST_TIMEOUT), check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => Err(Blocked::Denied(refusal.to_string())),
        Err(_) => Err(Blocked::Failed(HostError::timeout(
            "checking the containers the re-created container names took too long",
        ))),
    }
}

/// [`crate::docker::daemon::check_named`] for a device reached through its owner node.
async fn check_named_through(
    api: &Api,
    scope: &ContainerScope,
    named: &[crate::policy::body::NamedContainer],
) -> Result<(), crate::docker::daemon::ScopeRefusal> {
    use crate::docker::daemon::{ScopeRefusal, encode_segment, judge};
    if scope.is_all() {
        return Ok(());
    }
    for c in named {
        let req = Req::get(format!("/containers/{}/json", encode_segment(&c.reference)));
        let answer = api
            .send(&req, None, REQUEST_TIMEOUT, MAX_BODY)
            .await
            .map_err(|e| ScopeRefusal::Unchecked {
                reference: c.reference.clone(),
                why: describe(&e),
            })?;
        if answer.status == hyper::StatusCode::NOT_FOUND {
            return Err(ScopeRefusal::NotFound {
                reference: c.reference.clone(),
                field: c.field.clone(),
            });
        }
        let details =
            answer
                .check()
                .and_then(|a| a.json())
                .map_err(|e| ScopeRefusal::Unchecked {
                    reference: c.reference.clone(),
                    why: describe(&e),
                })?;
        judge(scope, &details, &c.field)?;
    }
    Ok(())
}

/// The re-create procedure; see the WIT documentation of `recreate-container`.
async fn recreate(
    api: &Api,
    policy: &crate::policy::CompiledPolicy,
    c: &str,
    inspected: Option<Value>,
    image: Option<String>,
    options: &RecreateOptions,
) -> Result<RecreateResult, Blocked> {
    let old = match inspected {
        Some(v) => v,
        None => {
            api.json(&Req::get(format!("/containers/{c}/json")), None)
                .await?
        }
    };
    let old_id = str_of(&old["Id"]);
    let name = old["Name"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    let image = match image {
        Some(i) => i,
        None => image_ref(old["Config"]["Image"].as_str().unwrap_or_default())?,
    };
    let old_image_id = str_of(&old["Image"]);
    let was_running = old["State"]["Running"].as_bool().unwrap_or(false);
    // The repository rule first, before anything is pulled.
    keeps_repository(
        policy,
        old["Config"]["Image"].as_str().unwrap_or_default(),
        &image,
    )?;

    let (mut pulled, mut pull_error) = (false, None);
    if options.pull {
        let (from, tag) = split_reference(&image);
        let req = Req::post(format!(
            "/images/create?fromImage={}&tag={}",
            encode_query(&from),
            encode_query(&tag)
        ));
        match api
            .send(&req, None, REQUEST_TIMEOUT, MAX_BODY)
            .await
            .and_then(Answer::check)
        {
            Ok(a) => match pull_outcome(&a.body) {
                Ok(_) => pulled = true,
                Err(e) => pull_error = Some(e),
            },
            Err(HostError::Wit(e)) => pull_error = Some(super::render_wit_error(&e)),
            Err(trap) => return Err(trap.into()),
        }
    }
    let new_image = match api
        .json(&Req::get(format!("/images/{image}/json")), None)
        .await
    {
        Ok(v) => v,
        Err(HostError::Wit(crate::plugin::bindings::WitError::NotFound(_))) => {
            return Err(HostError::not_found(match &pull_error {
                Some(e) => {
                    format!("image {image} could not be pulled ({e}) and is not present locally")
                }
                None => format!("image {image} is not present on device {}", api.device),
            })
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let new_image_id = str_of(&new_image["Id"]);
    let old_image_config = api
        .json(&Req::get(format!("/images/{old_image_id}/json")), None)
        .await
        .ok()
        .map(|v| v["Config"].clone());
    let body = create_body(&old, &image, old_image_config.as_ref());
    check_create(api, policy, "", &body, false).await?;

    let stop_q = options
        .stop_timeout_secs
        .map(|t| format!("?t={t}"))
        .unwrap_or_default();
    api.call(
        &Req::post(format!("/containers/{old_id}/stop{stop_q}")),
        None,
    )
    .await?;
    let aside = format!("{name}-capstan-old-{}", &old_id[..old_id.len().min(12)]);
    api.call(
        &Req::post(format!(
            "/containers/{old_id}/rename?name={}",
            encode_query(&aside)
        )),
        None,
    )
    .await?;

    let rollback = |why: String| async {
        let mut notes = vec![why];
        let back = Req::post(format!(
            "/containers/{old_id}/rename?name={}",
            encode_query(&name)
        ));
        if let Err(e) = api.call(&back, None).await {
            notes.push(format!("renaming the old container back failed: {e:?}"));
        }
        if was_running
            && let Err(e) = api
                .call(&Req::post(format!("/containers/{old_id}/start")), None)
                .await
        {
            notes.push(format!("restarting the old container failed: {e:?}"));
        }
        notes.join("; ")
    };

    let created = api
        .json(
            &Req::post(format!("/containers/create?name={}", encode_query(&name))),
            Some(&body),
        )
        .await;
    let new_id = match created {
        Ok(v) => str_of(&v["Id"]),
        Err(e) => {
            let why = format!(
                "creating the new container failed ({}); rolled back",
                describe(&e)
            );
            return Err(with_message(e, rollback(why).await).into());
        }
    };
    let started = api
        .call(&Req::post(format!("/containers/{new_id}/start")), None)
        .await;
    let failure = match started {
        Err(e) => Some((
            format!("the new container failed to start ({})", describe(&e)),
            e,
        )),
        Ok(()) => {
            // A container that exits at once with an error has not really started.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let v = api
                .json(&Req::get(format!("/containers/{new_id}/json")), None)
                .await?;
            let s = &v["State"];
            let exited = !s["Running"].as_bool().unwrap_or(false);
            let code = s["ExitCode"].as_i64().unwrap_or(0);
            (exited && code != 0).then(|| {
                let msg = format!(
                    "the new container exited at once with code {code}{}",
                    s["Error"]
                        .as_str()
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                (msg.clone(), HostError::docker(500, msg))
            })
        }
    };
    if let Some((why, e)) = failure {
        let _ = api
            .call(&Req::delete(format!("/containers/{new_id}?force=1")), None)
            .await;
        return Err(with_message(e, rollback(format!("{why}; rolled back")).await).into());
    }
    // Anonymous volumes of the old container are kept (v=0): their data is not ours to
    // destroy.
    api.call(&Req::delete(format!("/containers/{old_id}")), None)
        .await?;
    Ok(RecreateResult {
        name,
        old_id,
        new_id,
        image,
        old_image_id,
        new_image_id,
        pulled,
        pull_error,
    })
}

fn describe(e: &HostError) -> String {
    match e {
        HostError::Wit(w) => super::render_wit_error(w),
        HostError::Trap(t) => t.to_string(),
    }
}

/// The same kind of error with a fuller message.
fn with_message(e: HostError, message: String) -> HostError {
    use crate::plugin::bindings::WitError;
    match e {
        HostError::Wit(WitError::Docker(d)) => HostError::docker(d.status, message),
        HostError::Wit(WitError::NotFound(_)) => HostError::not_found(message),
        HostError::Wit(WitError::Timeout(_)) => HostError::timeout(message),
        HostError::Wit(WitError::Unreachable(_)) => HostError::unreachable(message),
        HostError::Wit(WitError::Invalid(_)) => HostError::invalid(message),
        other => other,
    }
}

/// The longest text a host-call or audit record keeps of one field.
const MAX_RECORDED_FIELD: usize = 1024;

/// `text`, cut to [`MAX_RECORDED_FIELD`] bytes with a note of how much was left out.
pub(super) fn bounded(text: &str) -> String {
    if text.len() <= MAX_RECORDED_FIELD {
        return text.to_string();
    }
    let mut end = MAX_RECORDED_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes more)", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_fields_are_bounded_on_a_char_boundary() {
        assert_eq!(bounded("web-1"), "web-1");
        let long = "é".repeat(MAX_RECORDED_FIELD);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_RECORDED_FIELD + 32, "{}", cut.len());
        assert!(cut.starts_with("éé"));
        assert!(cut.ends_with(&format!("({} bytes more)", long.len() - MAX_RECORDED_FIELD)));
    }
}
