//! inventory: reports every device in scope — daemon version and latency, host facts,
//! containers by state and health, images — as one summary line per device and JSON
//! details.

use capstan_sdk::prelude::*;
use serde::Serialize;

struct Inventory;

#[derive(Serialize, Default)]
struct DeviceReport {
    device: String,
    kind: String,
    reachable: bool,
    error: Option<String>,
    server_version: String,
    latency_ms: f64,
    host: String,
    os: String,
    cpus: u32,
    memory_mib: u64,
    containers: usize,
    running: usize,
    unhealthy: Vec<String>,
    stopped: Vec<String>,
    images: usize,
    image_bytes: u64,
}

fn survey(device: &docker::Device) -> Result<DeviceReport, Error> {
    let check = docker::check(&device.name)?;
    let info = docker::system_info(&device.name)?;
    let containers = docker::list_containers(&device.name, &ContainerFilter::all())?;
    let images = docker::list_images(&device.name, false)?;
    Ok(DeviceReport {
        device: device.name.clone(),
        kind: device.kind.clone(),
        reachable: true,
        error: None,
        server_version: check.server_version,
        latency_ms: (check.latency_ms * 10.0).round() / 10.0,
        host: info.name,
        os: info.operating_system,
        cpus: info.cpus,
        memory_mib: info.memory / (1024 * 1024),
        containers: containers.len(),
        running: containers.iter().filter(|c| c.state == "running").count(),
        unhealthy: containers
            .iter()
            .filter(|c| c.health.as_deref() == Some("unhealthy"))
            .map(|c| c.name.clone())
            .collect(),
        stopped: containers
            .iter()
            .filter(|c| c.state == "exited" || c.state == "dead")
            .map(|c| c.name.clone())
            .collect(),
        images: images.len(),
        image_bytes: images.iter().map(|i| i.size).sum(),
    })
}

impl Plugin for Inventory {
    fn run(_event: Event) -> Result<Outcome, Error> {
        let mut reports = Vec::new();
        for device in docker::list_devices() {
            let report = survey(&device).unwrap_or_else(|e| DeviceReport {
                device: device.name.clone(),
                kind: device.kind.clone(),
                error: Some(e.message()),
                ..Default::default()
            });
            reports.push(report);
        }
        let lines: Vec<String> = reports
            .iter()
            .map(|r| match &r.error {
                Some(e) => format!("{}: {e}", r.device),
                None => format!(
                    "{}: Docker {} ({:.1} ms), {} containers ({} running, {} unhealthy, {} stopped), {} images",
                    r.device,
                    r.server_version,
                    r.latency_ms,
                    r.containers,
                    r.running,
                    r.unhealthy.len(),
                    r.stopped.len(),
                    r.images
                ),
            })
            .collect();
        let summary = if lines.is_empty() {
            "no device in scope".to_string()
        } else {
            format!("{} device(s): {}", lines.len(), lines.join("; "))
        };
        Ok(Outcome::new(summary).with_details(&reports))
    }
}

capstan_sdk::export_plugin!(Inventory);
