//! The last connection checks of each stored device, kept in memory: what the dashboard
//! shows as a device's reachability, latency and Docker version without calling the
//! device while a page renders, and the points of its latency chart.
//!
//! Every check of a stored device (API, CLI through the API, dashboard) is recorded here
//! by the one function that runs them ([`crate::api`]'s stored-device check). A device
//! keeps its last [`PER_DEVICE`] checks; the engine keeps at most [`MAX_DEVICES`]
//! devices' worth (the least recently checked go first). Nothing is persisted: after a
//! restart a device shows "not checked yet" until it is checked again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::CheckReport;

/// Checks kept per device.
pub const PER_DEVICE: usize = 60;
/// Devices whose checks are kept.
pub const MAX_DEVICES: usize = 10_000;

/// One recorded check.
#[derive(Debug, Clone)]
pub struct CheckedAt {
    pub at: DateTime<Utc>,
    pub report: Arc<CheckReport>,
}

/// Recent checks per device name. Cheap to share (`Arc` inside the pool).
#[derive(Debug, Default)]
pub struct CheckHistory {
    inner: Mutex<HashMap<String, VecDeque<CheckedAt>>>,
}

impl CheckHistory {
    /// Records `report` (of the stored device it names) as checked at `at`.
    pub fn record_at(&self, report: CheckReport, at: DateTime<Utc>) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&report.device) && map.len() >= MAX_DEVICES {
            // The device checked longest ago makes room.
            let oldest = map
                .iter()
                .min_by_key(|(_, v)| v.back().map(|c| c.at))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        let ring = map.entry(report.device.clone()).or_default();
        if ring.len() == PER_DEVICE {
            ring.pop_front();
        }
        ring.push_back(CheckedAt {
            at,
            report: Arc::new(report),
        });
    }

    /// Records `report` as checked now.
    pub fn record(&self, report: CheckReport) {
        self.record_at(report, Utc::now());
    }

    /// The device's last check.
    pub fn last(&self, device: &str) -> Option<CheckedAt> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(device).and_then(|r| r.back().cloned())
    }

    /// The device's recent checks, oldest first.
    pub fn recent(&self, device: &str) -> Vec<CheckedAt> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(device)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a removed or renamed device's checks.
    pub fn forget(&self, device: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceKind;

    fn report(device: &str, latency: f64) -> CheckReport {
        CheckReport {
            device: device.into(),
            device_id: None,
            kind: DeviceKind::Local,
            address: "unix:///var/run/docker.sock".into(),
            connected: true,
            docker: None,
            latency_ms: Some(latency),
            total_ms: latency,
            steps: Vec::new(),
            failed_step: None,
            error: None,
            host_key: None,
            pooled: false,
            owner: None,
        }
    }

    #[test]
    fn a_device_keeps_its_last_checks_oldest_first() {
        let h = CheckHistory::default();
        for i in 0..(PER_DEVICE + 5) {
            h.record(report("a", i as f64));
        }
        let recent = h.recent("a");
        assert_eq!(recent.len(), PER_DEVICE);
        assert_eq!(recent[0].report.latency_ms, Some(5.0));
        assert_eq!(
            h.last("a").unwrap().report.latency_ms,
            Some((PER_DEVICE + 4) as f64)
        );
        assert!(h.last("b").is_none());
        h.forget("a");
        assert!(h.recent("a").is_empty());
    }
}
