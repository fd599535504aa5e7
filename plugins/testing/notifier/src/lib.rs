//! A plugin that sends the notifications it is told to, for the engine's tests: the
//! manual input is `{"send": [{"channel": "ops", "title": "…", "message": "…",
//! "priority": "high", "tags": ["a"], "dedup_key": "k"}, …], "fail": false}`; the
//! outcome's details are a JSON list of what became of each (`queued`, `duplicate`,
//! `rate-limited`, or `error: ` and the error's message, e.g. `error: denied: …`). With `"fail": true` the run then fails.

use capstan_sdk::notify::{self, Notification, Priority, Sent};
use capstan_sdk::prelude::*;
use serde_json::{Value, json};

struct Notifier;

fn priority(v: &Value) -> Priority {
    match v.as_str().unwrap_or("normal") {
        "low" => Priority::Low,
        "high" => Priority::High,
        "urgent" => Priority::Urgent,
        _ => Priority::Normal,
    }
}

impl Plugin for Notifier {
    fn run(event: Event) -> Result<Outcome, Error> {
        let input: Value =
            serde_json::from_str(&event.input()).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut results = Vec::new();
        for n in input["send"].as_array().into_iter().flatten() {
            let mut notification = Notification::new(
                n["title"].as_str().unwrap_or("test"),
                n["message"].as_str().unwrap_or_default(),
            )
            .priority(priority(&n["priority"]));
            for t in n["tags"].as_array().into_iter().flatten() {
                notification = notification.tag(t.as_str().unwrap_or_default());
            }
            if let Some(k) = n["dedup_key"].as_str() {
                notification = notification.dedup_key(k);
            }
            let channel = n["channel"].as_str().unwrap_or_default();
            results.push(match notify::send(channel, &notification) {
                Ok(Sent::Queued) => json!("queued"),
                Ok(Sent::Duplicate) => json!("duplicate"),
                Ok(Sent::RateLimited) => json!("rate-limited"),
                Err(e) => json!(format!("error: {}", e.message())),
            });
        }
        if input["fail"].as_bool() == Some(true) {
            return Err(Error::Failed("asked to fail".into()));
        }
        Ok(Outcome::new(format!("{} notifications", results.len())).with_details(&results))
    }
}

capstan_sdk::export_plugin!(Notifier);
