//! A plugin that sends the HTTP requests it is told to, for the engine's outbound tests:
//! the manual input is a JSON list of requests, `[{"method": "GET", "url": "http://…",
//! "headers": [["accept", "text/plain"]], "body": "…", "timeout_ms": 500}, …]` (only
//! `url` is required), and the outcome's details are a JSON list of their results
//! (`{"status": 200, "body": "…", "headers": [[k, v], …]}` or
//! `{"error": "kind: message"}`).

use capstan_sdk::http::Request;
use capstan_sdk::prelude::*;
use serde_json::{Value, json};

struct Fetcher;

fn request(r: &Value) -> Request {
    let mut req = Request::new(
        r["method"].as_str().unwrap_or("GET"),
        r["url"].as_str().unwrap_or_default(),
    );
    for h in r["headers"].as_array().into_iter().flatten() {
        req = req.header(
            h[0].as_str().unwrap_or_default(),
            h[1].as_str().unwrap_or_default(),
        );
    }
    if let Some(body) = r["body"].as_str() {
        req = req.body(body.as_bytes().to_vec());
    }
    if let Some(ms) = r["timeout_ms"].as_u64() {
        req = req.timeout_ms(ms as u32);
    }
    req
}

impl Plugin for Fetcher {
    fn run(event: Event) -> Result<Outcome, Error> {
        let requests: Vec<Value> =
            serde_json::from_str(&event.input()).map_err(|e| Error::Invalid(e.to_string()))?;
        let results: Vec<Value> = requests
            .iter()
            .map(|r| match http::send(request(r)) {
                Ok(resp) => {
                    json!({"status": resp.status, "body": resp.text(), "headers": resp.headers})
                }
                Err(e) => json!({"error": format!("{}: {}", e.kind(), e.message())}),
            })
            .collect();
        Ok(Outcome::new(format!("{} requests", results.len())).with_details(&results))
    }
}

capstan_sdk::export_plugin!(Fetcher);
