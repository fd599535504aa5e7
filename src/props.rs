//! Property tests at scale for the manifests an outsider feeds the engine.
//!
//! Why it exists: the hand-written tests pin the cases someone thought of; this generates
//! manifests from the manifest vocabulary with hostile values (limits, cron and webhook
//! triggers, an embedded `[policy]` table, keys that do not belong, raw random text) and
//! asserts the promises that must hold for every input: no input panics the parser, and a
//! manifest that validates has limits inside the engine's maxima.
//!
//! The request decision, body inspection and policy parser properties are the policy
//! crate's (`crates/capstan-policy/src/props.rs`); the policy tables embedded here are its
//! generator, so both parse the same hostile policies.
//!
//! The suite runs a bounded number of cases (a few seconds in release). Longer runs set
//! `PROPTEST_CASES` (per property), e.g.
//! `PROPTEST_CASES=1000000 cargo test --release --lib props::`; a failure prints the
//! shrunk input, which belongs beside the manifest's tests in `src/plugin/manifest.rs` as a
//! regression test named after it.

use proptest::prelude::*;
use proptest::sample::select;

use crate::plugin::manifest::{Limits, Manifest};
use crate::policy::strategies::{config, toml_policy};

const LONG_80: &str =
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const LONG_200: &str = concat!(
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
);

/// Manifests built from the manifest vocabulary with hostile values.
fn manifest() -> impl Strategy<Value = String> {
    let number = select(
        &[
            "0",
            "1",
            "64",
            "4096",
            "4294967295",
            "4294967296",
            "-1",
            "1.5",
            "\"64\"",
            "99999999999",
        ][..],
    );
    let limits = prop::collection::vec(
        (
            select(
                &[
                    "memory_mib",
                    "timeout_secs",
                    "max_log_bytes",
                    "max_output_bytes",
                    "max_state_bytes",
                    "max_host_calls",
                    "max_http_requests",
                    "http_timeout_ms",
                    "max_http_response_bytes",
                    "fuel",
                ][..],
            ),
            number,
        ),
        0..4,
    )
    .prop_map(|entries| {
        let mut text = String::from("[limits]\n");
        for (key, value) in entries {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text
    });
    let cron = (
        select(
            &[
                "*/5 * * * *",
                "* * * * * *",
                "@daily",
                "@every 90s",
                "@every 0s",
                "",
                "60 * * * *",
                "* * * * * * *",
                "0 0 31 2 *",
                "@reboot",
                "*/0 * * * *",
            ][..],
        ),
        select(&["UTC", "Europe/Paris", "Mars/Olympus", ""][..]),
        select(&["skip", "queue", "allow", "never"][..]),
        select(&["30s", "0s", "-1s", "1y", "", "99999999999h"][..]),
    )
        .prop_map(|(schedule, zone, overlap, jitter)| {
            format!(
                "[[triggers.cron]]\nschedule = \"{schedule}\"\ntimezone = \"{zone}\"\n\
                 overlap = \"{overlap}\"\njitter = \"{jitter}\"\n"
            )
        });
    let webhook = (
        select(vec![
            "redeploy", "", "a/b", "UPPER", LONG_80, "..", "hook-1",
        ]),
        select(&["hmac-sha256", "bearer", "none", ""][..]),
        select(
            &[
                "1MiB",
                "0",
                "1TiB",
                "-1",
                "1.5KiB",
                "",
                "64 KiB",
                "18446744073709551616",
            ][..],
        ),
        select(
            &[
                "",
                "rate_limit = { requests = 0, per = \"1m\" }\n",
                "rate_limit = { requests = 60, per = \"0s\" }\n",
                "delivery_header = \"\"\n",
                "delivery_header = \"X-GitHub-Delivery\"\n",
            ][..],
        ),
    )
        .prop_map(|(name, auth, max_body, extra)| {
            format!(
                "[[triggers.webhook]]\nname = \"{name}\"\nauth = \"{auth}\"\n\
                 max_body = \"{max_body}\"\n{extra}"
            )
        });
    (
        select(vec!["probe", "", "Bad Name", "a", "-x", LONG_200]),
        select(&["0.1.0", "", "x", "1"][..]),
        prop::option::of(limits),
        prop::collection::vec(cron, 0..2),
        prop::collection::vec(webhook, 0..2),
        prop::option::of(toml_policy()),
        prop::option::of(select(
            &[
                "[config]\na = 1\n",
                "[config]\n\"\" = \"\"\n",
                "bogus = 1\n",
            ][..],
        )),
    )
        .prop_map(|(name, version, limits, cron, webhook, policy, extra)| {
            let mut text = format!("name = \"{name}\"\nversion = \"{version}\"\n");
            text.push_str(extra.unwrap_or_default());
            text.push_str(&limits.unwrap_or_default());
            text.push_str(&cron.concat());
            text.push_str(&webhook.concat());
            if let Some(policy) = policy {
                // Nest the policy's tables under [policy].
                text.push_str("[policy]\n");
                text.push_str(&policy.replace("[containers]", "[policy.containers]"));
            }
            text
        })
}

proptest! {
    #![proptest_config(config(4_000))]

    #[test]
    fn a_manifest_parses_or_fails_cleanly_and_a_valid_one_stays_within_the_engine_maxima(
        text in prop_oneof![6 => manifest(), 1 => "\\PC{0,120}"],
    ) {
        if let Ok(manifest) = Manifest::parse(&text, "plugin.toml")
            && manifest.validate("plugin.toml", &["local".to_owned()]).is_ok()
        {
            let limits = Limits::resolve(&manifest.limits, &Limits::DEFAULT);
            prop_assert!(limits.memory_mib <= Limits::MAX.memory_mib);
            prop_assert!(limits.timeout_secs <= Limits::MAX.timeout_secs);
            prop_assert!(limits.max_log_bytes <= Limits::MAX.max_log_bytes);
            prop_assert!(limits.max_output_bytes <= Limits::MAX.max_output_bytes);
            prop_assert!(limits.max_state_bytes <= Limits::MAX.max_state_bytes);
            prop_assert!(limits.max_host_calls <= Limits::MAX.max_host_calls);
            prop_assert!(limits.max_http_requests <= Limits::MAX.max_http_requests);
            prop_assert!((1..=Limits::MAX.http_timeout_ms).contains(&limits.http_timeout_ms));
            prop_assert!(limits.max_http_response_bytes <= Limits::MAX.max_http_response_bytes);
        }
    }
}
