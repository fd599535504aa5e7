//! Generators and the case count for property tests, shared by this crate's properties
//! (`props`) and the engine's manifest properties, which embed a `[policy]` table.
//!
//! Why it exists: a manifest property must generate the same hostile policy tables as the
//! policy's own, and one generator keeps the two from drifting. Outside this crate's tests
//! it is compiled only with the `proptest` feature, which Capstan's tests turn on.

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config;

use crate::Var;

/// The case count: `PROPTEST_CASES` when set, else `default`.
pub fn config(default: u32) -> Config {
    #[allow(clippy::disallowed_methods)] // proptest's own knob, for test runs only
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        // Inputs are cheap; let shrinking work hard when something fails.
        max_shrink_iters: 20_000,
        // A failure prints its shrunk input; nothing is written into the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// TOML policies: variables, scopes, and keys that do not belong.
pub fn toml_policy() -> impl Strategy<Value = String> {
    let var_line = (
        select(Var::ALL.iter().map(|v| v.name()).collect::<Vec<_>>()),
        select(&["0", "1", "2", "true", "\"1\"", "-1", "1.0", "[1]"][..]),
    )
        .prop_map(|(name, value)| format!("{name} = {value}\n"));
    let glob = select(
        &[
            "\"*\"",
            "\"prod-*\"",
            "\"\"",
            "\"a**\"",
            "\"[\"",
            "\"local\"",
            "1",
            "\"\\u0000\"",
            "\"web-?\"",
            "\"a/b\"",
        ][..],
    );
    let devices = prop::collection::vec(glob.clone(), 0..3)
        .prop_map(|d| format!("devices = [{}]\n", d.join(", ")));
    let containers = (
        prop::collection::vec(
            select(
                &[
                    "\"a=b\"", "\"a\"", "\"=b\"", "\"\"", "\"a==b\"", "\"a=\"", "3",
                ][..],
            ),
            0..3,
        ),
        prop::collection::vec(glob, 0..3),
    )
        .prop_map(|(labels, names)| {
            format!(
                "[containers]\nlabels = [{}]\nnames = [{}]\n",
                labels.join(", "),
                names.join(", ")
            )
        });
    (
        prop::collection::vec(var_line, 0..6),
        prop::option::of(devices),
        prop::option::of(select(
            &["unknown = 1\n", "[other]\n", "POST = 1\n", "x\n"][..],
        )),
        prop::option::of(containers),
    )
        .prop_map(|(vars, devices, junk, containers)| {
            let mut text = vars.concat();
            text.push_str(&devices.unwrap_or_default());
            text.push_str(junk.unwrap_or_default());
            text.push_str(&containers.unwrap_or_default());
            text
        })
}
