//! A plugin that calls the `docker` functions it is told to, for the engine's tests: the
//! manual input is a JSON list of calls, `[{"op": "exec", "device": "local",
//! "container": "web", "cmd": ["echo", "hi"]}, …]`, and the outcome's details are a JSON
//! list of their results (`{"ok": …}` or `{"error": "kind: message"}`). `create` takes
//! a `spec` object (`image`, `command`, `env`, `labels`, `ports`, `mounts`, `restart`,
//! `network`, `memory`, `cap_add`, `privileged`) and an optional `name`. `state-set`,
//! `state-get` and `count` (add one to the number under `key`) use the plugin's state.

use capstan_sdk::docker::{
    self, ContainerSpec, ExecOptions, LogOptions, PruneFilter, RecreateOptions,
};
use capstan_sdk::prelude::*;
use serde_json::{Value, json};

struct Probe;

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn call(c: &Value) -> Result<Value, Error> {
    let d = s(c, "device");
    let ct = s(c, "container");
    Ok(match s(c, "op").as_str() {
        // The plugin's key-value state (`key`, `value` as text).
        "state-set" => {
            state::set(&s(c, "key"), s(c, "value").as_bytes())?;
            json!(null)
        }
        "state-get" => json!(state::get(&s(c, "key")).map(|v| String::from_utf8_lossy(&v).into_owned())),
        // Adds one to the number under `key` (0 when absent) and returns it.
        "count" => {
            let key = s(c, "key");
            let n = state::get(&key)
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            state::set(&key, n.to_string().as_bytes())?;
            json!(n)
        }
        "list-devices" => json!(
            docker::list_devices()
                .iter()
                .map(|d| json!({"name": d.name, "kind": d.kind}))
                .collect::<Vec<_>>()
        ),
        "connect" => {
            docker::connect(&d)?;
            json!(null)
        }
        "check" => {
            let r = docker::check(&d)?;
            json!({"server_version": r.server_version, "api_version": r.api_version, "os": r.os, "latency_ms": r.latency_ms})
        }
        "list-containers" => {
            let mut f = ContainerFilter::all();
            for l in c["labels"].as_array().into_iter().flatten() {
                f = f.label(l.as_str().unwrap_or_default());
            }
            for n in c["names"].as_array().into_iter().flatten() {
                f = f.name(n.as_str().unwrap_or_default());
            }
            for h in c["health"].as_array().into_iter().flatten() {
                f = f.health(h.as_str().unwrap_or_default());
            }
            let list = docker::list_containers(&d, &f)?;
            json!(list.iter().map(|c| json!({"id": c.id, "name": c.name, "state": c.state, "health": c.health})).collect::<Vec<_>>())
        }
        "inspect" => {
            let r = docker::inspect_container(&d, &ct)?;
            json!({"id": r.id, "name": r.name, "state": r.state, "running": r.running, "paused": r.paused, "health": r.health, "image": r.image, "started_at": r.started_at, "labels": r.labels})
        }
        "start" => json!(docker::start_container(&d, &ct)?),
        "stop" => json!(docker::stop_container(&d, &ct, Some(1))?),
        "restart" => json!(docker::restart_container(&d, &ct, Some(1))?),
        "kill" => json!(docker::kill_container(&d, &ct, c["signal"].as_str())?),
        "pause" => json!(docker::pause_container(&d, &ct)?),
        "unpause" => json!(docker::unpause_container(&d, &ct)?),
        "logs" => {
            let r = docker::container_logs(
                &d,
                &ct,
                LogOptions::tail(c["tail"].as_u64().unwrap_or(10) as u32),
            )?;
            json!({"text": r.text, "truncated": r.truncated})
        }
        "stats" => {
            let r = docker::container_stats(&d, &ct)?;
            json!({"memory_usage": r.memory_usage, "memory_limit": r.memory_limit, "pids": r.pids, "cpu_percent": r.cpu_percent})
        }
        "exec" => {
            let cmd: Vec<String> = c["cmd"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            let mut o = ExecOptions::cmd(cmd);
            o.timeout_secs = c["timeout"].as_u64().map(|t| t as u32);
            let r = docker::exec(&d, &ct, &o)?;
            json!({"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr})
        }
        "recreate" => {
            let mut o = if c["pull"].as_bool().unwrap_or(false) {
                RecreateOptions::pull()
            } else {
                RecreateOptions::local()
            };
            o.image = c["image"].as_str().map(str::to_string);
            o.stop_timeout_secs = Some(1);
            let r = docker::recreate_container(&d, &ct, &o)?;
            json!({"name": r.name, "old_id": r.old_id, "new_id": r.new_id, "image": r.image, "pulled": r.pulled, "pull_error": r.pull_error, "old_image_id": r.old_image_id, "new_image_id": r.new_image_id})
        }
        "create" => {
            let sp = &c["spec"];
            let strs = |k: &str| -> Vec<String> {
                sp[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            };
            let mut spec = ContainerSpec::new(s(sp, "image"));
            spec.command = strs("command");
            spec.env = strs("env");
            spec.cap_add = strs("cap_add");
            spec.labels = sp["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            spec.ports = sp["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| docker::PortBinding {
                    container_port: p["container"].as_u64().unwrap_or(0) as u16,
                    protocol: s(p, "protocol"),
                    host_port: p["host"].as_u64().map(|h| h as u16),
                    host_ip: p["ip"].as_str().map(str::to_string),
                })
                .collect();
            spec.mounts = sp["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| docker::Mount {
                    kind: s(m, "kind"),
                    source: s(m, "source"),
                    target: s(m, "target"),
                    read_only: m["read_only"].as_bool().unwrap_or(false),
                })
                .collect();
            spec.restart_policy = sp["restart"].as_str().map(str::to_string);
            spec.network = sp["network"].as_str().map(str::to_string);
            spec.memory_bytes = sp["memory"].as_u64();
            spec.privileged = sp["privileged"].as_bool().unwrap_or(false);
            let r = docker::create_container(&d, c["name"].as_str(), &spec)?;
            json!({"id": r.id, "name": r.name, "warnings": r.warnings})
        }
        "remove" => json!(docker::remove_container(
            &d,
            &ct,
            c["force"].as_bool().unwrap_or(false),
            c["volumes"].as_bool().unwrap_or(false)
        )?),
        "prune-containers" | "prune-images" => {
            let mut f = PruneFilter::any();
            f.until = c["until"].as_str().map(str::to_string);
            for l in c["labels"].as_array().into_iter().flatten() {
                f = f.label(l.as_str().unwrap_or_default());
            }
            for l in c["not_labels"].as_array().into_iter().flatten() {
                f = f.not_label(l.as_str().unwrap_or_default());
            }
            if s(c, "op") == "prune-containers" {
                let r = docker::prune_containers(&d, &f)?;
                json!({"removed": r.removed.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), "space_reclaimed": r.space_reclaimed, "failed": r.failed})
            } else {
                let r = docker::prune_images(&d, &f, c["dangling"].as_bool().unwrap_or(true))?;
                json!({"deleted": r.deleted, "untagged": r.untagged, "space_reclaimed": r.space_reclaimed})
            }
        }
        "remove-image" => {
            let r = docker::remove_image(
                &d,
                &s(c, "image"),
                c["force"].as_bool().unwrap_or(false),
                c["no_prune"].as_bool().unwrap_or(false),
            )?;
            json!({"deleted": r.deleted, "untagged": r.untagged})
        }
        "list-images" => json!(
            docker::list_images(&d, false)?
                .iter()
                .map(|i| json!({"id": i.id, "tags": i.tags}))
                .collect::<Vec<_>>()
        ),
        "pull" => {
            let r = docker::pull_image(&d, &s(c, "image"))?;
            json!({"image": r.image, "id": r.id, "status": r.status})
        }
        "check-update" => {
            let target = match c["image"].as_str() {
                Some(image) => docker::UpdateTarget::Image(image.to_string()),
                None => docker::UpdateTarget::Container(ct.clone()),
            };
            let u = docker::check_image_update(&d, &target)?;
            let reason = match &u.status {
                docker::UpdateStatus::Unknown(why) => json!(why),
                _ => json!(null),
            };
            json!({"image": u.image, "image_id": u.image_id, "local_digests": u.local_digests,
                   "remote_digest": u.remote_digest, "status": u.status.name(), "reason": reason})
        }
        "list-networks" => json!(
            docker::list_networks(&d)?
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        ),
        "list-volumes" => json!(
            docker::list_volumes(&d)?
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        ),
        "system-info" => {
            let r = docker::system_info(&d)?;
            json!({"name": r.name, "server_version": r.server_version, "cpus": r.cpus, "containers": r.containers})
        }
        other => return Err(Error::Invalid(format!("unknown op {other}"))),
    })
}

impl Plugin for Probe {
    fn run(event: Event) -> Result<Outcome, Error> {
        let calls: Vec<Value> =
            serde_json::from_str(&event.input()).map_err(|e| Error::Invalid(e.to_string()))?;
        let results: Vec<Value> = calls
            .iter()
            .map(|c| match call(c) {
                Ok(v) => json!({"ok": v}),
                Err(e) => json!({"error": format!("{}: {}", e.kind(), e.message())}),
            })
            .collect();
        Ok(Outcome::new(format!("{} calls", results.len())).with_details(&results))
    }
}

capstan_sdk::export_plugin!(Probe);
