//! Property tests at scale for what an outsider feeds the policy engine: the request
//! decision, body inspection and the policy parsers.
//!
//! Why it exists: the hand-written tests pin the cases someone thought of; these generate
//! requests, bodies and documents from the same vocabulary an attacker would use (endpoint templates
//! with hostile parameters, version prefixes, encodings, dot segments, junk at any byte, the
//! query parameters that change an endpoint's effect, and raw random text), and assert the
//! promises that must hold for every input:
//! - no input panics a parser or the decision;
//! - an allowed request is allowed by the linuxserver proxy's own prefix matcher (Capstan is
//!   never more permissive than it), and what is forwarded is clean (no escape, empty or dot
//!   segment) and decides the same again;
//! - under `examples/policies/readonly.env` nothing allowed writes, attaches, execs or
//!   returns a guarded resource, whatever the framing (upgrade, form body);
//! - a create body the default create guard passes asks nothing of the host as Docker would
//!   read it (Go's `encoding/json`: the last key that folds to a field wins), and every
//!   container it names (`VolumesFrom`, `Links`, `container:NAME` modes) is one the scope
//!   check sees;
//! - a policy that parses prints back to an environment block that parses to the same
//!   policy.
//!
//! The manifest properties (a manifest that validates has limits inside the engine's
//! maxima) are the engine's, in its `src/props.rs`, with the policy tables of
//! [`strategies`](crate::strategies).
//!
//! The suite runs a bounded number of cases (a few seconds in release). Longer runs set
//! `PROPTEST_CASES` (per property), e.g.
//! `PROPTEST_CASES=1000000 cargo test --release -p capstan-policy --lib props::`; a failure
//! prints the shrunk input, which belongs in `crates/capstan-policy/src/tests.rs` as a
//! regression test named after it.

use proptest::prelude::*;
use proptest::sample::{Index, select};

use crate::endpoints::{self, Endpoint};
use crate::strategies::{config, toml_policy};
use crate::tests::never_more_permissive::{JUNK, METHODS, PARAMS, PREFIXES, linuxserver_allows};
use crate::{CompiledPolicy, Effect, Effects, Framing, Policy, Var, VarSet};

const READONLY: &str = include_str!("../../../examples/policies/readonly.env");
const DOCKMAN: &str = include_str!("../../../examples/policies/dockman.env");
const WATCHTOWER: &str = include_str!("../../../examples/policies/watchtower.env");

/// Queries, among them the parameters that turn a read into a write or a guarded read.
const QUERIES: &[&str] = &[
    "",
    "?all=1",
    "?t=10",
    "?a=%2F..%2F",
    "?x=a b",
    "?",
    "?stream=1&stdin=1&stdout=1",
    "?stdin=1",
    "?stdin=true",
    "?stdin=True",
    "?stdin=0&stdin=1",
    "?stdin=1&stdin=0",
    "?STDIN=1",
    "?stdin=%31",
    "?std%69n=1",
    "?stdin",
    "?stdin=",
    "?stdin=yes",
    "?logs=1&stream=0&stdout=1",
    "?logs=true",
    "?logs=1",
    "?LOGS=1",
    "?lo%67s=1",
    "?stream=1",
    "?detachKeys=ctrl-p",
    "?container=rt-out",
    "?follow=1",
    "?h=24&w=80",
    "?stdin=1#frag",
    "?stdin=1;logs=1",
];

fn endpoint_target() -> impl Strategy<Value = (Option<&'static str>, String)> {
    let all: Vec<&'static Endpoint> = endpoints::all().collect();
    (
        select(all),
        prop::collection::vec(
            prop_oneof![
                7 => Just("abc".to_owned()),
                3 => select(PARAMS).prop_map(str::to_owned),
                1 => "[A-Za-z0-9_.:@%-]{1,12}",
            ],
            8,
        ),
    )
        .prop_map(|(endpoint, params)| {
            let mut path = String::new();
            let mut params = params.into_iter();
            for segment in endpoint.segments() {
                path.push('/');
                if segment.starts_with('{') {
                    path.push_str(&params.next().unwrap_or_default());
                } else {
                    path.push_str(segment);
                }
            }
            (Some(endpoint.method.as_str()), path)
        })
}

/// A request: mostly endpoint templates mangled the ways attackers mangle them, some raw text.
fn request() -> impl Strategy<Value = (String, String)> {
    let mangled = (
        endpoint_target(),
        prop::option::weighted(0.7, Just(())),
        select(METHODS),
        prop::option::weighted(0.25, select(PREFIXES)),
        prop::collection::vec((any::<Index>(), select(JUNK)), 0..3),
        prop::option::weighted(0.1, any::<Index>()),
        prop::bool::weighted(0.05),
        select(QUERIES),
    )
        .prop_map(
            |((own_method, mut path), keep_method, method, prefix, junk, encode, upper, query)| {
                let method = match (keep_method, own_method) {
                    (Some(()), Some(own)) => own.to_owned(),
                    _ => method.to_owned(),
                };
                if let Some(prefix) = prefix {
                    path.insert_str(0, prefix);
                }
                for (at, piece) in junk {
                    let at = at.index(path.len() + 1);
                    if path.is_char_boundary(at) {
                        path.insert_str(at, piece);
                    }
                }
                if let Some(at) = encode {
                    let at = at.index(path.len().max(1));
                    if let Some(c) = path.get(at..at + 1) {
                        let byte = c.as_bytes()[0];
                        path.replace_range(at..at + 1, &format!("%{byte:02X}"));
                    }
                }
                if upper {
                    path = path.to_ascii_uppercase();
                }
                path.push_str(query);
                (method, path)
            },
        );
    prop_oneof![
        9 => mangled,
        1 => (select(METHODS).prop_map(str::to_owned), "\\PC{0,48}"),
        1 => (select(METHODS).prop_map(str::to_owned), "/[ -~]{0,64}"),
    ]
}

fn random_vars() -> impl Strategy<Value = VarSet> {
    any::<u64>().prop_map(|bits| {
        let mut set = VarSet::EMPTY;
        for (i, &var) in Var::ALL.iter().enumerate() {
            set.set(var, bits >> (i % 64) & 1 == 1);
        }
        set
    })
}

fn env_policy(text: &str) -> CompiledPolicy {
    Policy::from_env_block(text)
        .unwrap_or_else(|e| panic!("example policy: {e}"))
        .compile()
}

/// The promises every decision keeps, whatever the policy.
fn check_decision(policy: &CompiledPolicy, method: &str, target: &str) {
    let decision = policy.decide(method, target);
    if !decision.is_allowed() {
        // A denial always explains itself.
        assert!(!decision.reason().is_empty());
        return;
    }
    assert!(
        linuxserver_allows(policy.vars(), method, target),
        "Capstan allows what linuxserver denies: {method} {target:?} under {} ({})",
        policy.vars(),
        decision.reason()
    );
    let forwarded = decision.path().to_owned();
    let path_only = forwarded.split('?').next().unwrap_or_default();
    assert!(!path_only.contains('%'), "forwarded {forwarded:?}");
    assert!(!path_only.contains("//"), "forwarded {forwarded:?}");
    assert!(
        !path_only.split('/').any(|s| s == "." || s == ".."),
        "forwarded {forwarded:?}"
    );
    let again = policy.decide(method, &forwarded);
    assert!(
        again.is_allowed(),
        "{method} {forwarded:?} no longer allowed"
    );
    assert_eq!(again.rule(), decision.rule(), "{method} {forwarded:?}");
    assert_eq!(again.path(), forwarded, "{method} {forwarded:?}");
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn every_decision_is_never_more_permissive_than_linuxserver_and_forwards_clean_paths(
        (method, target) in request(),
        vars in random_vars(),
    ) {
        check_decision(&CompiledPolicy::from_vars(vars), &method, &target);
        check_decision(&CompiledPolicy::from_vars(VarSet::defaults()), &method, &target);
        check_decision(&env_policy(DOCKMAN), &method, &target);
        check_decision(&env_policy(WATCHTOWER), &method, &target);
    }

    #[test]
    fn readonly_env_allows_nothing_that_writes_attaches_execs_or_reads_guarded_data(
        (method, target) in request(),
        upgrade in prop::bool::weighted(0.1),
        form_body in prop::bool::weighted(0.1),
    ) {
        let policy = env_policy(READONLY);
        check_decision(&policy, &method, &target);
        let decision = policy.decide_framed(&method, &target, Framing { upgrade, form_body });
        if decision.is_allowed() {
            prop_assert!(
                method == "GET" || method == "HEAD",
                "{method} {target:?} allowed under readonly.env"
            );
            prop_assert!(!upgrade, "an upgrade of {target:?} allowed under readonly.env");
            prop_assert_eq!(decision.effects(), Effects::NONE, "{} {:?}", method, target);
            let endpoint = decision.endpoint().expect("an allowed request matched an endpoint");
            prop_assert_eq!(endpoint.effect, Effect::Read, "{} {:?}", method, target);
            for word in ["attach", "exec", "logs", "export", "archive", "top", "changes"] {
                prop_assert!(
                    !endpoint.segments().contains(&word),
                    "{method} {target:?} ({}) allowed under readonly.env",
                    decision.reason()
                );
            }
        }
    }
}

/// A line of an environment block, from the proxies' vocabulary and its misspellings.
fn env_line() -> impl Strategy<Value = String> {
    let names: Vec<String> = Var::ALL
        .iter()
        .map(|v| v.name().to_owned())
        .chain(
            [
                "LOG_LEVEL",
                "LIBPOD_PING",
                "LIBPOD_ALLOW_POD_RESTARTS",
                "LIBPOD_PNG",
                "PUID",
                "post",
                "Containers",
                "ALLOW_RESTART",
                "DISABLE_IPV6",
                "",
                "X",
                "CONTAINERS ",
                "_PING",
            ]
            .map(str::to_owned),
        )
        .collect();
    let assignment = (
        select(&["", "export ", "- ", "  ", "\t", "export\t"][..]),
        select(names),
        select(&["=", ": ", " = ", "=", ":", "=="][..]),
        select(
            &[
                "0",
                "1",
                "2",
                "-1",
                "true",
                "",
                "\"1\"",
                "'0'",
                " 1",
                "01",
                "1x",
                "99999999999999999999",
                "1 # on",
                "\"1",
                "0x1",
                "+1",
                "１",
            ][..],
        ),
    )
        .prop_map(|(lead, name, sep, value)| format!("{lead}{name}{sep}{value}"));
    prop_oneof![
        8 => assignment,
        1 => select(&["# comment", "", "environment:", "  environment:", "---"][..])
            .prop_map(str::to_owned),
        1 => "\\PC{0,24}",
    ]
}

/// Prints a policy's explicit variables as an environment block.
fn as_env_block(policy: &Policy) -> String {
    let vars = Var::ALL.iter().filter_map(|&var| {
        policy
            .explicit(var)
            .map(|on| format!("{}={}\n", var.name(), u8::from(on)))
    });
    let inert = policy
        .inert()
        .iter()
        .map(|(var, value)| format!("{}={value}\n", var.name()));
    vars.chain(inert).collect()
}

proptest! {
    #![proptest_config(config(4_000))]

    #[test]
    fn an_environment_block_that_parses_prints_back_to_the_same_policy(
        lines in prop::collection::vec(env_line(), 0..12),
    ) {
        let text = lines.join("\n");
        if let Ok(policy) = Policy::from_env_block(&text) {
            let printed = as_env_block(&policy);
            let again = Policy::from_env_block(&printed)
                .unwrap_or_else(|e| panic!("{printed:?} from {text:?}: {e}"));
            prop_assert_eq!(&again, &policy, "{:?} printed as {:?}", text, printed);
        }
    }

    #[test]
    fn a_toml_policy_parses_or_fails_cleanly_and_decides_without_panicking(
        text in prop_oneof![4 => toml_policy(), 1 => "\\PC{0,80}"],
        (method, target) in request(),
    ) {
        if let Ok(policy) = Policy::from_toml_str(&text) {
            check_decision(&policy.compile(), &method, &target);
        }
    }

}

/// A JSON value for a create body's field, among them the ones that reach the host.
const FIELD_VALUES: &[(&str, &[&str])] = &[
    ("Privileged", &["true", "false", "null", "\"true\"", "1"]),
    (
        "PidMode",
        &[
            "\"host\"",
            "\"\"",
            "\"container:rt-out\"",
            "\"container:rt-in-1\"",
            "\"HOST\"",
            "\"private\"",
        ],
    ),
    (
        "NetworkMode",
        &["\"host\"", "\"bridge\"", "\"container:rt-out\"", "\"none\""],
    ),
    (
        "IpcMode",
        &[
            "\"host\"",
            "\"container:rt-out\"",
            "\"private\"",
            "\"shareable\"",
        ],
    ),
    ("UTSMode", &["\"host\"", "\"\""]),
    ("UsernsMode", &["\"host\"", "\"\""]),
    (
        "CapAdd",
        &[
            "[]",
            "null",
            "[\"NET_ADMIN\"]",
            "[\"ALL\"]",
            "[\"cap_sys_admin\"]",
        ],
    ),
    (
        "Devices",
        &[
            "[]",
            "null",
            "[{\"PathOnHost\": \"/dev/sda\", \"PathInContainer\": \"/dev/sda\"}]",
        ],
    ),
    (
        "Binds",
        &[
            "[]",
            "null",
            "[\"/:/host\"]",
            "[\"vol:/data\"]",
            "[\"/srv/app/../../etc:/etc\"]",
        ],
    ),
    (
        "VolumesFrom",
        &[
            "[]",
            "null",
            "[\"rt-out\"]",
            "[\"rt-in-1:ro\"]",
            "[\"/rt-out:rw\"]",
        ],
    ),
    (
        "Links",
        &["[]", "null", "[\"rt-out:db\"]", "[\"/rt-out:/me/db\"]"],
    ),
];

/// Spellings Go's `encoding/json` folds onto the same field.
fn spelling(name: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(name.to_owned()),
        1 => Just(name.to_ascii_lowercase()),
        1 => Just(name.to_ascii_uppercase()),
        1 => Just(name.replace('s', "ſ")),
    ]
}

/// One `"key": value` entry of `HostConfig` (or the body's top level).
fn create_entry() -> impl Strategy<Value = (String, String, &'static str)> {
    select(FIELD_VALUES).prop_flat_map(|(name, values)| {
        (spelling(name), select(values), Just(name))
            .prop_map(|(key, value, name)| (key, value.to_owned(), name))
    })
}

/// Go's reading of a field: the last key that folds to `name` wins.
fn go_field<'e>(entries: &'e [(String, String, &'static str)], name: &str) -> Option<&'e str> {
    entries
        .iter()
        .rev()
        .find(|(_, _, field)| *field == name)
        .map(|(_, value, _)| value.as_str())
}

proptest! {
    #![proptest_config(config(8_000))]

    #[test]
    fn a_create_body_that_passes_the_default_guard_asks_nothing_of_the_host_and_names_every_container(
        host_config in prop::collection::vec(create_entry(), 0..6),
        top in prop::collection::vec(create_entry(), 0..2),
        host_config_key in spelling("HostConfig"),
        image in select(&["\"busybox\"", "\"registry.local/app:1\"", "1", "null"][..]),
    ) {
        let render = |entries: &[(String, String, &'static str)]| {
            entries
                .iter()
                .map(|(key, value, _)| format!("{key:?}: {value}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut fields = vec![format!("\"Image\": {image}")];
        if !top.is_empty() {
            fields.push(render(&top));
        }
        fields.push(format!("{host_config_key:?}: {{{}}}", render(&host_config)));
        let body = format!("{{{}}}", fields.join(", "));
        let endpoint = endpoints::all()
            .find(|e| e.operation == "ContainerCreate")
            .expect("the create endpoint");
        let Ok(named) = crate::body::inspect(endpoint, "name=rt-in-new", body.as_bytes())
        else {
            return Ok(());
        };
        // Every container Go would read from the body is one the caller checks.
        let names: Vec<&str> = named.containers.iter().map(|c| c.reference.as_str()).collect();
        for entries in [&host_config, &top] {
            for field in ["VolumesFrom", "Links"] {
                if let Some(list) = go_field(entries, field)
                    && let Ok(items) = serde_json::from_str::<Vec<String>>(list)
                {
                    for item in items {
                        let container = item.trim_start_matches('/').split(':').next().unwrap_or_default();
                        prop_assert!(names.contains(&container), "{container} from {body} not checked: {names:?}");
                    }
                }
            }
            for field in ["PidMode", "NetworkMode", "IpcMode"] {
                if let Some(mode) = go_field(entries, field)
                    && let Ok(mode) = serde_json::from_str::<String>(mode)
                    && let Some(container) = mode.strip_prefix("container:")
                {
                    prop_assert!(names.contains(&container), "{container} from {body} not checked: {names:?}");
                }
            }
        }
        let guard = crate::CreateGuard::default();
        let Some(asks) = named.asks else {
            prop_assert!(false, "a create body gave no asks: {}", body);
            unreachable!();
        };
        if guard.check(&asks).is_ok() {
            for entries in [&host_config, &top] {
                prop_assert_ne!(go_field(entries, "Privileged"), Some("true"), "{}", body);
                for field in ["PidMode", "NetworkMode", "IpcMode", "UTSMode", "UsernsMode"] {
                    if let Some(mode) = go_field(entries, field) {
                        // Docker compares modes case-sensitively (`n == "host"`).
                        prop_assert!(
                            mode != "\"host\"",
                            "{field} host passed the default guard: {body}"
                        );
                    }
                }
                for field in ["CapAdd", "Devices", "Binds"] {
                    if let Some(list) = go_field(entries, field)
                        && let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(list)
                    {
                        prop_assert!(
                            items.is_empty() || (field == "Binds" && items.iter().all(|b| !b.as_str().unwrap_or("/").starts_with('/'))),
                            "{field} {list} passed the default guard: {body}"
                        );
                    }
                }
            }
        }
    }
}
