//! The semantics of `docs/POLICY-SEMANTICS.md`, one test per row and consequence, and
//! the promise behind them: never more permissive than linuxserver's socket proxy.

use crate::endpoints::{self, Endpoint};
use crate::*;

fn policy(env: &str) -> CompiledPolicy {
    Policy::from_env_block(env)
        .unwrap_or_else(|e| panic!("{env}: {e}"))
        .compile()
}

fn vars(list: &[Var]) -> CompiledPolicy {
    let mut set = VarSet::EMPTY;
    for &var in list {
        set.insert(var);
    }
    CompiledPolicy::from_vars(set)
}

#[track_caller]
fn assert_decides(policy: &CompiledPolicy, method: &str, path: &str, expected: Rule) {
    let decision = policy.decide(method, path);
    assert_eq!(
        decision.rule(),
        expected,
        "{method} {path}: {}",
        decision.reason()
    );
    assert_eq!(decision.is_allowed(), expected.allows());
}

#[track_caller]
fn assert_allows(policy: &CompiledPolicy, method: &str, path: &str) {
    let decision = policy.decide(method, path);
    assert!(
        decision.is_allowed(),
        "{method} {path}: {}",
        decision.reason()
    );
}

#[track_caller]
fn assert_denies(policy: &CompiledPolicy, method: &str, path: &str) {
    let decision = policy.decide(method, path);
    assert!(
        !decision.is_allowed(),
        "{method} {path}: {}",
        decision.reason()
    );
}

/// A concrete request path for an endpoint.
fn example_path(endpoint: &Endpoint) -> String {
    let reference = matches!(
        endpoint.target,
        Some(TargetKind::Image | TargetKind::Plugin)
    );
    let mut path = String::new();
    for segment in endpoint.segments() {
        path.push('/');
        path.push_str(match *segment {
            s if s.starts_with('{') && reference => "library/busybox:latest",
            s if s.starts_with('{') => "abc123",
            s => s,
        });
    }
    path
}

/// One representative request per section variable.
const SECTIONS: &[(Var, &str, &str)] = &[
    (Var::Ping, "GET", "/_ping"),
    (Var::Version, "GET", "/version"),
    (Var::Events, "GET", "/events"),
    (Var::Info, "GET", "/info"),
    (Var::Containers, "GET", "/containers/json"),
    (Var::Images, "GET", "/images/json"),
    (Var::Networks, "GET", "/networks"),
    (Var::Volumes, "GET", "/volumes"),
    (Var::Exec, "GET", "/exec/abc/json"),
    (Var::System, "GET", "/system/df"),
    (Var::Auth, "POST", "/auth"),
    (Var::Build, "POST", "/build"),
    (Var::Commit, "POST", "/commit"),
    (Var::Configs, "GET", "/configs"),
    (Var::Secrets, "GET", "/secrets"),
    (Var::Nodes, "GET", "/nodes"),
    (Var::Services, "GET", "/services"),
    (Var::Tasks, "GET", "/tasks"),
    (Var::Swarm, "GET", "/swarm"),
    (Var::Plugins, "GET", "/plugins"),
    (Var::Distribution, "GET", "/distribution/busybox/json"),
    (Var::Session, "POST", "/session"),
    (Var::Grpc, "POST", "/grpc"),
];

#[test]
fn names_a_representative_request_for_every_section_variable() {
    let sections: Vec<Var> = Var::ALL
        .iter()
        .copied()
        .filter(|v| v.kind() == VarKind::Section)
        .collect();
    assert_eq!(sections, SECTIONS.iter().map(|s| s.0).collect::<Vec<_>>());
}

#[test]
fn allows_each_section_only_when_its_own_variable_is_on() {
    for &(var, method, path) in SECTIONS {
        assert_decides(&vars(&[var, Var::Post]), method, path, Rule::Section(var));
        let mut others: Vec<Var> = Var::ALL.iter().copied().filter(|&v| v != var).collect();
        others.push(Var::Post);
        assert_decides(&vars(&others), method, path, Rule::SectionOff(var));
    }
}

#[test]
fn allows_ping_version_and_events_by_default() {
    let defaults = policy("");
    assert_decides(&defaults, "GET", "/_ping", Rule::Section(Var::Ping));
    assert_decides(&defaults, "HEAD", "/_ping", Rule::Section(Var::Ping));
    assert_decides(&defaults, "GET", "/version", Rule::Section(Var::Version));
    assert_decides(
        &defaults,
        "GET",
        "/events?since=1",
        Rule::Section(Var::Events),
    );
}

#[test]
fn denies_every_other_section_by_default() {
    let defaults = policy("");
    for &(var, method, path) in SECTIONS {
        if var.default_on() {
            continue;
        }
        let decision = defaults.decide(method, path);
        assert!(!decision.is_allowed(), "{method} {path}");
        let expected = if method == "GET" {
            Rule::SectionOff(var)
        } else {
            Rule::WriteGate
        };
        assert_eq!(decision.rule(), expected, "{method} {path}");
    }
}

#[test]
fn lets_defaults_be_turned_off() {
    let quiet = policy("PING=0\nVERSION=0\nEVENTS=0");
    assert_decides(&quiet, "GET", "/_ping", Rule::SectionOff(Var::Ping));
    assert_decides(&quiet, "GET", "/version", Rule::SectionOff(Var::Version));
    assert_decides(&quiet, "GET", "/events", Rule::SectionOff(Var::Events));
}

#[test]
fn gives_every_endpoint_exactly_to_its_section_guard_and_write_gate() {
    for endpoint in endpoints::all() {
        let method = endpoint.method.as_str();
        let path = example_path(endpoint);
        let mut needs = vec![endpoint.section];
        if endpoint.effect.writes() {
            needs.push(Var::Post);
        }
        needs.extend(endpoint.effect.guard());
        assert_decides(
            &vars(&needs),
            method,
            &path,
            Rule::Section(endpoint.section),
        );
        for &missing in &needs {
            let fewer: Vec<Var> = needs.iter().copied().filter(|&v| v != missing).collect();
            assert_denies(&vars(&fewer), method, &path);
        }
        let everything: Vec<Var> = Var::ALL.to_vec();
        assert_allows(&vars(&everything), method, &path);
        let decision = vars(&everything).decide(method, &path);
        assert_eq!(decision.endpoint(), Some(endpoint));
    }
}

#[test]
fn allows_requests_behind_an_api_version_prefix() {
    let p = policy("CONTAINERS=1");
    for path in [
        "/v1.41/containers/json",
        "/v1.24/containers/json",
        "/v10.0/containers/json",
    ] {
        let decision = p.decide("GET", path);
        assert_eq!(decision.rule(), Rule::Section(Var::Containers), "{path}");
        assert_eq!(decision.path(), path, "the prefix is forwarded");
        assert_eq!(decision.api_path(), "/containers/json");
    }
    assert_decides(
        &p,
        "GET",
        "/v1.47/containers/web/json?size=1",
        Rule::Section(Var::Containers),
    );
    assert_decides(&p, "GET", "/v1.41/_ping", Rule::Section(Var::Ping));
}

#[test]
fn denies_version_prefixes_that_are_not_digits_dot_digits() {
    let p = policy("CONTAINERS=1");
    for path in [
        "/v1/containers/json",
        "/V1.41/containers/json",
        "/v1.41/v1.41/containers/json",
        "/vx/containers/json",
        "/v1.41",
    ] {
        assert_decides(&p, "GET", path, Rule::Unknown);
    }
}

#[test]
fn forwards_the_query_and_lets_it_decide_nothing_but_attach() {
    let p = policy("CONTAINERS=1");
    let target = "/containers/json?all=1&filters=%7B%22label%22%3A%5B%22a%3Db%22%5D%7D";
    let decision = p.decide("GET", target);
    assert!(decision.is_allowed());
    assert_eq!(decision.path(), target);
    assert_decides(
        &p,
        "GET",
        "/containers/json?/../../images/create",
        Rule::Section(Var::Containers),
    );
}

#[test]
fn denies_restart_when_post_is_off() {
    assert_decides(
        &policy("CONTAINERS=1"),
        "POST",
        "/containers/abc/restart",
        Rule::WriteGate,
    );
}

#[test]
fn denies_writes_when_post_is_off() {
    let p = policy("CONTAINERS=1\nIMAGES=1\nVOLUMES=1\nPOST=0");
    assert_decides(&p, "POST", "/containers/create", Rule::WriteGate);
    assert_decides(&p, "DELETE", "/containers/abc", Rule::WriteGate);
    assert_decides(&p, "PUT", "/volumes/data", Rule::WriteGate);
    assert_decides(
        &p,
        "POST",
        "/images/create?fromImage=busybox",
        Rule::WriteGate,
    );
    assert_decides(
        &p,
        "GET",
        "/containers/json",
        Rule::Section(Var::Containers),
    );
}

#[test]
fn allows_writes_when_post_and_the_section_are_on() {
    let p = policy("CONTAINERS=1\nVOLUMES=1\nPOST=1");
    assert_decides(
        &p,
        "POST",
        "/containers/create?name=web",
        Rule::Section(Var::Containers),
    );
    assert_decides(
        &p,
        "DELETE",
        "/containers/abc?force=1",
        Rule::Section(Var::Containers),
    );
    assert_decides(&p, "PUT", "/volumes/data", Rule::Section(Var::Volumes));
}

#[test]
fn lets_post_alone_allow_nothing() {
    let p = policy("POST=1\nPING=0\nVERSION=0\nEVENTS=0");
    for endpoint in endpoints::all() {
        assert_denies(&p, endpoint.method.as_str(), &example_path(endpoint));
    }
}

#[test]
fn passes_head_through_the_write_gate() {
    assert_decides(
        &policy("POST=0"),
        "HEAD",
        "/_ping",
        Rule::Section(Var::Ping),
    );
    let p = policy("CONTAINERS=1\nALLOW_ARCHIVE=1\nPOST=0");
    assert_decides(
        &p,
        "HEAD",
        "/containers/abc/archive?path=/etc",
        Rule::Section(Var::Containers),
    );
    assert_decides(
        &p,
        "GET",
        "/containers/abc/archive?path=/etc",
        Rule::Section(Var::Containers),
    );
    assert_decides(
        &p,
        "PUT",
        "/containers/abc/archive?path=/etc",
        Rule::WriteGate,
    );
}

#[test]
fn allows_each_lifecycle_toggle_even_with_post_off() {
    let cases = [
        ("ALLOW_START", "start", Var::AllowStart),
        ("ALLOW_STOP", "stop", Var::AllowStop),
        ("ALLOW_RESTARTS", "restart", Var::AllowRestarts),
        ("ALLOW_PAUSE", "pause", Var::AllowPause),
        ("ALLOW_UNPAUSE", "unpause", Var::AllowUnpause),
    ];
    for (name, action, var) in cases {
        let p = policy(&format!("{name}=1\nPOST=0\nCONTAINERS=0"));
        assert_decides(
            &p,
            "POST",
            &format!("/containers/abc/{action}"),
            Rule::Toggle(var),
        );
        assert_decides(
            &p,
            "POST",
            &format!("/v1.41/containers/web-1/{action}?t=10"),
            Rule::Toggle(var),
        );
    }
}

#[test]
fn lets_allow_restarts_cover_stop_restart_and_kill() {
    let p = policy("ALLOW_RESTARTS=1");
    for action in ["stop", "restart", "kill"] {
        let path = format!("/containers/abc/{action}");
        assert_decides(&p, "POST", &path, Rule::Toggle(Var::AllowRestarts));
    }
    for action in ["start", "pause", "unpause"] {
        assert_decides(
            &p,
            "POST",
            &format!("/containers/abc/{action}"),
            Rule::WriteGate,
        );
    }
}

#[test]
fn lets_allow_stop_cover_stop_only() {
    let p = policy("ALLOW_STOP=1");
    assert_decides(
        &p,
        "POST",
        "/containers/abc/stop",
        Rule::Toggle(Var::AllowStop),
    );
    assert_decides(&p, "POST", "/containers/abc/restart", Rule::WriteGate);
    assert_decides(&p, "POST", "/containers/abc/kill", Rule::WriteGate);
}

#[test]
fn allows_lifecycle_actions_only_for_the_post_endpoint() {
    let p = policy("ALLOW_START=1\nALLOW_RESTARTS=1");
    assert_decides(&p, "GET", "/containers/abc/start", Rule::Unknown);
    assert_decides(&p, "DELETE", "/containers/abc/kill", Rule::Unknown);
    assert_decides(&p, "post", "/containers/abc/restart", Rule::Unknown);
}

#[test]
fn lets_toggles_only_add_to_containers_with_post() {
    let p = policy(
        "CONTAINERS=1\nPOST=1\nALLOW_START=0\nALLOW_STOP=0\nALLOW_RESTARTS=0\nALLOW_PAUSE=0\nALLOW_UNPAUSE=0",
    );
    for action in ["start", "stop", "restart", "kill", "pause", "unpause"] {
        let path = format!("/containers/abc/{action}");
        assert_decides(&p, "POST", &path, Rule::Section(Var::Containers));
    }
}

#[test]
fn denies_guarded_sub_resources_even_with_containers_and_post_on() {
    let p = policy("CONTAINERS=1\nPOST=1");
    let cases = [
        ("GET", "logs", Var::AllowLogs),
        ("GET", "top", Var::AllowTop),
        ("GET", "changes", Var::AllowChanges),
        ("GET", "export", Var::AllowExport),
        ("HEAD", "archive", Var::AllowArchive),
        ("GET", "archive", Var::AllowArchive),
        ("PUT", "archive", Var::AllowArchive),
    ];
    for (method, resource, guard) in cases {
        let path = format!("/containers/abc/{resource}");
        assert_decides(&p, method, &path, Rule::Guard(guard));
        let opened = policy(&format!("CONTAINERS=1\nPOST=1\n{guard}=1"));
        assert_decides(&opened, method, &path, Rule::Section(Var::Containers));
    }
}

#[test]
fn lets_guards_never_grant_on_their_own() {
    let p = policy(
        "ALLOW_LOGS=1\nALLOW_TOP=1\nALLOW_CHANGES=1\nALLOW_EXPORT=1\nALLOW_ARCHIVE=1\nPOST=1",
    );
    for resource in ["logs", "top", "changes", "export", "archive"] {
        let path = format!("/containers/abc/{resource}");
        assert_decides(&p, "GET", &path, Rule::SectionOff(Var::Containers));
    }
}

/// Dockman's documented minimum set for the linuxserver proxy, as its docs print it.
const DOCKMAN_MINIMUM: &str = "\
# Base
PING: 1
VERSION: 1
INFO: 1
EVENTS: 1

# Resources
CONTAINERS: 1
IMAGES: 1
NETWORKS: 1
VOLUMES: 1
EXEC: 1

# Operations
POST: 1
SYSTEM: 1

# Lifecycle
ALLOW_START: 1
ALLOW_STOP: 1
ALLOW_RESTARTS: 1
";

#[test]
fn denies_logs_to_the_dockman_minimum_set_unless_allow_logs_is_on() {
    let p = policy(DOCKMAN_MINIMUM);
    assert_decides(
        &p,
        "GET",
        "/v1.47/containers/abc/logs?tail=100",
        Rule::Guard(Var::AllowLogs),
    );
    let with_logs = policy(&format!("{DOCKMAN_MINIMUM}ALLOW_LOGS: 1\n"));
    assert_decides(
        &with_logs,
        "GET",
        "/v1.47/containers/abc/logs?tail=100",
        Rule::Section(Var::Containers),
    );
}

#[test]
fn gives_the_dockman_minimum_set_what_dockman_uses() {
    let p = policy(DOCKMAN_MINIMUM);
    for (method, path) in [
        ("GET", "/_ping"),
        ("GET", "/v1.47/version"),
        ("GET", "/v1.47/info"),
        ("GET", "/v1.47/events?filters=%7B%7D"),
        ("GET", "/v1.47/containers/json?all=1"),
        ("POST", "/v1.47/containers/create?name=web"),
        ("POST", "/v1.47/containers/web/start"),
        ("POST", "/v1.47/containers/web/stop"),
        ("POST", "/v1.47/containers/abc/exec"),
        ("POST", "/v1.47/exec/e1/start"),
        ("POST", "/v1.47/images/create?fromImage=busybox&tag=latest"),
        ("GET", "/v1.47/networks"),
        ("GET", "/v1.47/volumes"),
        ("GET", "/v1.47/system/df"),
        ("POST", "/v1.47/images/prune"),
    ] {
        assert_allows(&p, method, path);
    }
    for (method, path) in [
        ("POST", "/v1.47/build"),
        ("POST", "/v1.47/commit?container=abc"),
        ("GET", "/v1.47/swarm"),
        ("GET", "/v1.47/containers/abc/top"),
        ("GET", "/v1.47/containers/abc/export"),
    ] {
        assert_denies(&p, method, path);
    }
}

#[test]
fn puts_exec_create_under_containers_and_exec_start_under_exec() {
    let containers = policy("CONTAINERS=1\nPOST=1");
    assert_decides(
        &containers,
        "POST",
        "/containers/abc/exec",
        Rule::Section(Var::Containers),
    );
    assert_decides(
        &containers,
        "POST",
        "/exec/e1/start",
        Rule::SectionOff(Var::Exec),
    );
    let exec = policy("EXEC=1\nPOST=1");
    assert_decides(
        &exec,
        "POST",
        "/containers/abc/exec",
        Rule::SectionOff(Var::Containers),
    );
    assert_decides(&exec, "POST", "/exec/e1/start", Rule::Section(Var::Exec));
    assert_decides(
        &exec,
        "POST",
        "/exec/e1/resize?h=24&w=80",
        Rule::Section(Var::Exec),
    );
    assert_decides(&exec, "GET", "/exec/e1/json", Rule::Section(Var::Exec));
}

#[test]
fn treats_pull_as_images_with_post() {
    assert_decides(
        &policy("IMAGES=1"),
        "POST",
        "/images/create?fromImage=busybox",
        Rule::WriteGate,
    );
    assert_decides(
        &policy("POST=1"),
        "POST",
        "/images/create?fromImage=busybox",
        Rule::SectionOff(Var::Images),
    );
    assert_decides(
        &policy("IMAGES=1\nPOST=1"),
        "POST",
        "/images/create?fromImage=busybox",
        Rule::Section(Var::Images),
    );
}

#[test]
fn keeps_prune_endpoints_in_their_sections() {
    let everything_but = |var: Var| {
        let list: Vec<Var> = Var::ALL.iter().copied().filter(|&v| v != var).collect();
        vars(&list)
    };
    for (path, var) in [
        ("/containers/prune", Var::Containers),
        ("/images/prune", Var::Images),
        ("/networks/prune", Var::Networks),
        ("/volumes/prune", Var::Volumes),
        ("/build/prune", Var::Build),
    ] {
        assert_decides(&vars(&[var, Var::Post]), "POST", path, Rule::Section(var));
        assert_decides(&everything_but(var), "POST", path, Rule::SectionOff(var));
    }
}

#[test]
fn puts_system_df_under_system_and_info_under_info() {
    assert_decides(
        &policy("SYSTEM=1"),
        "GET",
        "/system/df",
        Rule::Section(Var::System),
    );
    assert_decides(
        &policy("INFO=1"),
        "GET",
        "/system/df",
        Rule::SectionOff(Var::System),
    );
    assert_decides(&policy("INFO=1"), "GET", "/info", Rule::Section(Var::Info));
    assert_decides(
        &policy("SYSTEM=1"),
        "GET",
        "/info",
        Rule::SectionOff(Var::Info),
    );
}

#[test]
fn denies_every_weakness_of_the_proxies() {
    let defaults = policy("");
    assert_decides(
        &defaults,
        "GET",
        "/version/../containers/json",
        Rule::Malformed(Malformed::DotSegment),
    );
    assert_decides(
        &policy("ALLOW_START=1"),
        "POST",
        "/containers/abc/start/../../../images/create",
        Rule::Malformed(Malformed::DotSegment),
    );
    assert_decides(
        &policy("CONTAINERS=1"),
        "GET",
        "/containersX/json",
        Rule::Unknown,
    );
    assert_decides(&policy("INFO=1"), "GET", "/infox", Rule::Unknown);
    assert_decides(&defaults, "GET", "/versions", Rule::Unknown);
    assert_decides(&policy("SYSTEM=1"), "GET", "/systemd", Rule::Unknown);
    assert_decides(&policy("EXEC=1\nPOST=1"), "POST", "/execute", Rule::Unknown);
    assert_decides(
        &policy("ALLOW_START=1"),
        "POST",
        "/containers/abc/startx",
        Rule::Unknown,
    );
    assert_decides(
        &policy("ALLOW_STOP=1"),
        "POST",
        "/containers/abc/stopped",
        Rule::Unknown,
    );
    let containers = policy("CONTAINERS=1");
    assert_decides(
        &containers,
        "GET",
        "/containers/abc//logs",
        Rule::Malformed(Malformed::EmptySegment),
    );
    assert_decides(
        &containers,
        "GET",
        "/containers/abc/./logs",
        Rule::Malformed(Malformed::DotSegment),
    );
    assert_decides(
        &containers,
        "GET",
        "/containers%2Fjson",
        Rule::Malformed(Malformed::EncodedSlash),
    );
    assert_decides(&containers, "GET", "/CONTAINERS/json", Rule::Unknown);
}

#[test]
fn decides_and_forwards_the_decoded_path() {
    let p = policy("CONTAINERS=1");
    let decision = p.decide("GET", "/%63ontainers/json?all=1");
    assert_eq!(decision.rule(), Rule::Section(Var::Containers));
    assert_eq!(decision.path(), "/containers/json?all=1");
    let decision = p.decide("GET", "/v1.41/containers/w%65b/json");
    assert_eq!(decision.path(), "/v1.41/containers/web/json");
    assert_eq!(decision.container(), Some("web"));
    assert_decides(
        &p,
        "GET",
        "/containers/%2E%2E/json",
        Rule::Malformed(Malformed::DotSegment),
    );
    assert_decides(
        &p,
        "GET",
        "/containers/abc/%6Cogs",
        Rule::Guard(Var::AllowLogs),
    );
}

#[test]
fn denies_malformed_escapes_with_a_reason() {
    let p = policy("CONTAINERS=1");
    for path in [
        "/containers/%zz/json",
        "/containers/json%4",
        "/containers/json%",
    ] {
        let decision = p.decide("GET", path);
        assert_eq!(
            decision.rule(),
            Rule::Malformed(Malformed::BadEscape),
            "{path}"
        );
        assert_eq!(decision.path(), path);
        assert!(decision.reason().contains("malformed percent-escape"));
    }
}

#[test]
fn denies_methods_in_other_cases_or_unknown_to_docker() {
    let p = policy("CONTAINERS=1\nPOST=1");
    for method in [
        "get", "Get", "PATCH", "OPTIONS", "CONNECT", "TRACE", "", "GET ",
    ] {
        assert_decides(&p, method, "/containers/json", Rule::Unknown);
    }
}

#[test]
fn exposes_the_container_or_image_a_request_targets() {
    let p = policy("CONTAINERS=1\nIMAGES=1\nPOST=1\nDISTRIBUTION=1\nNETWORKS=1");
    let decision = p.decide("POST", "/v1.41/containers/web-1/restart?t=5");
    assert_eq!(decision.container(), Some("web-1"));
    assert_eq!(decision.image(), None);
    let decision = p.decide("GET", "/images/registry:5000/a/b:1.2/json");
    assert_eq!(decision.image(), Some("registry:5000/a/b:1.2"));
    assert_eq!(decision.container(), None);
    let decision = p.decide("GET", "/distribution/library/busybox:latest/json");
    assert_eq!(decision.image(), Some("library/busybox:latest"));
    let decision = p.decide("POST", "/networks/front/connect");
    assert_eq!(
        decision.target(),
        Some(Target {
            kind: TargetKind::Network,
            name: "front"
        })
    );
    assert_eq!(p.decide("GET", "/containers/json").target(), None);
    let denied = policy("").decide("GET", "/containers/abc/json");
    assert_eq!(denied.container(), Some("abc"), "known even when denied");
}

#[test]
fn explains_denials_by_naming_the_variables_that_would_allow_them() {
    let cases = [
        (
            "",
            "POST",
            "/containers/abc/stop",
            "POST /containers/abc/stop is denied: set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or \
             POST=1 with CONTAINERS=1) to allow it",
        ),
        (
            "CONTAINERS=1",
            "POST",
            "/containers/abc/stop",
            "POST /containers/abc/stop is denied: set ALLOW_STOP=1 (or ALLOW_RESTARTS=1, or \
             POST=1) to allow it",
        ),
        (
            "POST=1",
            "POST",
            "/containers/abc/restart",
            "POST /containers/abc/restart is denied: set ALLOW_RESTARTS=1 (or CONTAINERS=1) to \
             allow it",
        ),
        (
            "CONTAINERS=1",
            "GET",
            "/containers/abc/logs",
            "GET /containers/abc/logs is denied: set ALLOW_LOGS=1 to allow it",
        ),
        (
            "",
            "GET",
            "/containers/abc/logs",
            "GET /containers/abc/logs is denied: set ALLOW_LOGS=1 and CONTAINERS=1 to allow it",
        ),
        (
            "",
            "PUT",
            "/containers/abc/archive",
            "PUT /containers/abc/archive is denied: set ALLOW_ARCHIVE=1 and POST=1 and \
             CONTAINERS=1 to allow it",
        ),
        (
            "CONTAINERS=1\nALLOW_ARCHIVE=1",
            "PUT",
            "/containers/abc/archive",
            "PUT /containers/abc/archive is denied: set POST=1 to allow it",
        ),
        (
            "",
            "POST",
            "/images/create?fromImage=busybox",
            "POST /images/create?fromImage=busybox is denied: set POST=1 and IMAGES=1 to allow it",
        ),
        (
            "",
            "GET",
            "/images/json",
            "GET /images/json is denied: set IMAGES=1 to allow it",
        ),
    ];
    for (env, method, path, expected) in cases {
        assert_eq!(policy(env).decide(method, path).reason(), expected);
    }
}

#[test]
fn explains_what_allowed_a_request() {
    let p = policy("CONTAINERS=1\nPOST=1\nALLOW_RESTARTS=1\nALLOW_LOGS=1");
    assert_eq!(
        p.decide("GET", "/containers/json").reason(),
        "GET /containers/json is allowed by CONTAINERS=1"
    );
    assert_eq!(
        p.decide("POST", "/containers/create").reason(),
        "POST /containers/create is allowed by POST=1 and CONTAINERS=1"
    );
    assert_eq!(
        p.decide("POST", "/containers/abc/kill").reason(),
        "POST /containers/abc/kill is allowed by ALLOW_RESTARTS=1"
    );
    assert_eq!(
        p.decide("GET", "/containers/abc/logs").reason(),
        "GET /containers/abc/logs is allowed by ALLOW_LOGS=1 and CONTAINERS=1"
    );
}

#[test]
fn explains_unknown_and_malformed_requests() {
    let p = policy("CONTAINERS=1");
    assert_eq!(
        p.decide("get", "/containers/json").reason(),
        "get /containers/json is denied: it is not a Docker Engine API endpoint (methods are \
         case-sensitive: write GET), so no variable allows it"
    );
    assert_eq!(
        p.decide("GET", "/containers/abc/start").reason(),
        "GET /containers/abc/start is denied: it is not a Docker Engine API endpoint \
         (/containers/abc/start takes POST only), so no variable allows it"
    );
    assert_eq!(
        p.decide("GET", "/containersX/json").reason(),
        "GET /containersX/json is denied: it is not a Docker Engine API endpoint, so no \
         variable allows it"
    );
    assert_eq!(
        p.decide("GET", "/containers/abc//logs").reason(),
        "GET /containers/abc//logs is denied: the path holds an empty segment (`//`); no \
         variable allows it"
    );
    assert_eq!(
        p.decide("GET", "/containers/abc/archive").to_string(),
        "GET /containers/abc/archive is denied: set ALLOW_ARCHIVE=1 to allow it"
    );
}

#[test]
fn denies_trailing_slashes_and_the_root() {
    let p = policy("CONTAINERS=1\nNETWORKS=1");
    assert_decides(
        &p,
        "GET",
        "/containers/json/",
        Rule::Malformed(Malformed::TrailingSlash),
    );
    assert_decides(
        &p,
        "GET",
        "/networks/",
        Rule::Malformed(Malformed::TrailingSlash),
    );
    assert_decides(&p, "GET", "/", Rule::Unknown);
    assert_decides(&p, "GET", "", Rule::Malformed(Malformed::NotOriginForm));
}

#[test]
fn borrows_the_forwarded_path_when_nothing_was_decoded() {
    let p = policy("CONTAINERS=1");
    let decision = p.decide("GET", "/v1.41/containers/json?all=1");
    assert!(matches!(
        decision.into_path(),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn keeps_the_scopes_of_the_policy_in_the_compiled_form() {
    let p = Policy::from_toml_str(
        "CONTAINERS = 1\ndevices = [\"prod-*\"]\n[containers]\nnames = [\"web-*\"]\n",
    )
    .unwrap()
    .compile();
    assert!(p.devices().allows("prod-eu"));
    assert!(!p.devices().allows("dev"));
    assert!(p.containers().matches("/web-1", &Default::default()));
    assert!(!p.containers().matches("/db", &Default::default()));
    assert!(p.is_on(Var::Containers));
    assert!(
        Policy::from_env_block("CONTAINERS=1")
            .unwrap()
            .compile()
            .devices()
            .is_empty()
    );
}

#[test]
fn writes_one_verdict_per_request_line() {
    let input = "# requests\n\nGET /containers/json\nPOST /containers/abc/restart\nGET\nGET /a b\n  HEAD /_ping  \n";
    let mut out = Vec::new();
    let counts = decide_stream(&policy("CONTAINERS=1"), input.as_bytes(), &mut out, false).unwrap();
    assert_eq!(counts, (2, 3));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "allow\ndeny\ndeny\tmalformed input line\ndeny\tmalformed input line\nallow\n"
    );
}

#[test]
fn writes_reasons_when_asked() {
    let input = b"GET /containers/json\r\nPOST /containers/abc/restart\n\xff\xfe\nGET /version";
    let mut out = Vec::new();
    let counts = decide_stream(&policy("CONTAINERS=1"), &input[..], &mut out, true).unwrap();
    assert_eq!(counts, (2, 2));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "allow\tGET /containers/json is allowed by CONTAINERS=1\n\
         deny\tPOST /containers/abc/restart is denied: set ALLOW_RESTARTS=1 (or POST=1) to allow it\n\
         deny\tmalformed input line\n\
         allow\tGET /version is allowed by VERSION=1\n"
    );
}

#[test]
fn compiles_the_effective_values_of_a_policy() {
    let mut written = Policy::default();
    written.set(Var::Ping, false);
    written.set(Var::Containers, true);
    let compiled = written.compile();
    assert!(!compiled.is_on(Var::Ping));
    assert!(compiled.is_on(Var::Version));
    assert!(compiled.is_on(Var::Containers));
    written.unset(Var::Ping);
    assert!(written.compile().is_on(Var::Ping));
    assert_eq!(written.explicit(Var::Ping), None);
}

/// The read-only example policy, as shipped.
const READONLY_ENV: &str = include_str!("../../../examples/policies/readonly.env");

/// Queries that change what an attach does, and framings a proxy sees.
const ATTACK_QUERIES: &[&str] = &[
    "",
    "?stream=1&stdin=1&stdout=1&stderr=1",
    "?logs=1&stream=0&stdout=1",
    "?stdin=0&logs=0&stream=1&stdout=1",
    "?stdin=true&logs=True",
];

fn framings() -> [Framing; 4] {
    let upgrade = Framing {
        upgrade: true,
        ..Framing::default()
    };
    let form = Framing {
        form_body: true,
        ..Framing::default()
    };
    [
        Framing::default(),
        upgrade,
        form,
        Framing {
            upgrade: true,
            form_body: true,
        },
    ]
}

/// Operations that write, attach, exec or return a guarded resource, by name: a check on
/// the table's effects that does not trust the table.
fn sounds_unsafe(operation: &str) -> bool {
    [
        "Attach", "Exec", "Logs", "Export", "Archive", "Top", "Changes", "Create", "Delete",
        "Update", "Prune", "Start", "Stop", "Kill", "Restart", "Pause", "Remove", "Push", "Pull",
        "Load", "Get", "Unlock", "Init", "Join", "Leave", "Set", "Enable", "Disable", "Upgrade",
        "Session", "Grpc", "Commit", "Build", "Tag", "Connect", "Resize", "Wait", "Rename", "Auth",
    ]
    .iter()
    .any(|word| operation.contains(word))
}

#[test]
fn readonly_env_allows_no_endpoint_that_writes_attaches_execs_or_returns_guarded_data() {
    let p = policy(READONLY_ENV);
    let mut allowed = std::collections::BTreeSet::new();
    for endpoint in endpoints::all() {
        for query in ATTACK_QUERIES {
            for framing in framings() {
                let target = format!("/v1.47{}{query}", example_path(endpoint));
                let method = endpoint.method.as_str();
                let decision = p.decide_framed(method, &target, framing);
                if !decision.is_allowed() {
                    continue;
                }
                let what = format!("{method} {target} ({framing:?}): {}", decision.reason());
                assert!(endpoint.method.is_read(), "{what}");
                assert_eq!(endpoint.effect, Effect::Read, "{what}");
                assert_eq!(decision.effects(), Effects::NONE, "{what}");
                assert!(
                    !framing.upgrade,
                    "an upgrade under a read-only policy: {what}"
                );
                assert_ne!(endpoint.section, Var::Exec, "{what}");
                assert!(!sounds_unsafe(endpoint.operation), "{what}");
                allowed.insert(endpoint.operation);
            }
        }
    }
    // What a read-only `docker ps`, `inspect`, `images`, `network ls`, `volume ls` and
    // `info` need is still there.
    for operation in [
        "ContainerList",
        "ContainerInspect",
        "ImageList",
        "ImageInspect",
        "NetworkList",
        "VolumeList",
        "SystemInfo",
        "SystemPing",
    ] {
        assert!(allowed.contains(operation), "{operation}: {allowed:?}");
    }
}

#[test]
fn denies_both_attach_forms_to_readonly_env_saying_attach_needs_post() {
    let p = policy(READONLY_ENV);
    for (method, path) in [
        (
            "GET",
            "/v1.47/containers/web/attach/ws?stream=1&stdin=1&stdout=1",
        ),
        ("GET", "/containers/web/attach/ws?stream=1&stdout=1"),
        ("GET", "/containers/web/attach/ws"),
        ("POST", "/containers/web/attach?stream=1&stdin=1&stdout=1"),
    ] {
        let decision = p.decide_framed(
            method,
            path,
            Framing {
                upgrade: true,
                ..Framing::default()
            },
        );
        assert_eq!(decision.rule(), Rule::WriteGate, "{method} {path}");
        let reason = decision.reason();
        assert!(
            reason.contains("set POST=1 to allow it")
                && reason.contains("attaching to a container is a write whatever the method")
                && reason.contains("ALLOW_LOGS=1"),
            "{reason}"
        );
        // Without the upgrade headers too.
        assert_eq!(p.decide(method, path).rule(), Rule::WriteGate);
    }
    // The logs read of the audit: the guard speaks first, and both variables are named.
    let decision = p.decide("GET", "/containers/web/attach/ws?logs=1&stream=0&stdout=1");
    assert_eq!(decision.rule(), Rule::Guard(Var::AllowLogs));
    assert!(
        decision
            .reason()
            .starts_with("GET /containers/web/attach/ws?logs=1&stream=0&stdout=1 is denied: set ALLOW_LOGS=1 and POST=1 to allow it"),
        "{}",
        decision.reason()
    );
}

#[test]
fn allows_attach_with_post_and_asks_for_allow_logs_when_it_may_return_logs() {
    let p = policy("CONTAINERS=1\nPOST=1");
    let logs = policy("CONTAINERS=1\nPOST=1\nALLOW_LOGS=1");
    let truthy = [
        "?logs=1",
        "?logs=true",
        "?logs=True",
        "?logs=TRUE",
        "?logs=yes",
        "?logs=2",
        "?logs=on",
        "?logs=+1",
        "?logs=%31",
        "?%6Cogs=1",
        "?%6c%6f%67%73=1",
        "?LOGS=1",
        "?Logs=1",
        "?logs+=1",
        "?stream=1&logs=0&logs=1",
        "?logs=1&logs=0",
        "?logs=0;logs=1",
        "?x=1;logs=1",
        "?logs=%zz",
        "?%zz=1&logs=0",
        "?logs=%",
        "?logs=0x",
        "?logs=%0B0",
    ];
    for query in truthy {
        for (method, path) in [
            ("GET", "/containers/web/attach/ws"),
            ("POST", "/containers/web/attach"),
        ] {
            let target = format!("{path}{query}");
            assert_decides(&p, method, &target, Rule::Guard(Var::AllowLogs));
            assert_decides(&logs, method, &target, Rule::Section(Var::Containers));
        }
    }
    let falsy = [
        "",
        "?",
        "?logs",
        "?logs=",
        "?logs=0",
        "?logs=false",
        "?logs=FALSE",
        "?logs=no",
        "?logs=none",
        "?logs=+0+",
        "?logs=%30",
        "?stream=1&stdin=1&stdout=1&stderr=1&detachKeys=ctrl-p,ctrl-q",
        "?logsx=1",
        "?xlogs=1",
        "?x=logs%3D1",
    ];
    for query in falsy {
        for (method, path) in [
            ("GET", "/containers/web/attach/ws"),
            ("POST", "/containers/web/attach"),
        ] {
            let target = format!("{path}{query}");
            assert_decides(&p, method, &target, Rule::Section(Var::Containers));
        }
    }
    // A form body may carry `logs=1` where the policy cannot see it.
    let form = Framing {
        form_body: true,
        ..Framing::default()
    };
    assert_eq!(
        p.decide_framed("POST", "/containers/web/attach?stream=1&stdout=1", form)
            .rule(),
        Rule::Guard(Var::AllowLogs)
    );
    assert!(
        logs.decide_framed("POST", "/containers/web/attach?stream=1&stdout=1", form)
            .is_allowed()
    );
}

#[test]
fn makes_an_upgrade_a_write_whatever_the_endpoint_and_keeps_toggles_out_of_it() {
    let upgrade = Framing {
        upgrade: true,
        ..Framing::default()
    };
    let p = policy("CONTAINERS=1\nALLOW_START=1");
    let decision = p.decide_framed("GET", "/containers/json", upgrade);
    assert_eq!(decision.rule(), Rule::WriteGate);
    assert_eq!(decision.effects().write, Some(WriteCause::Upgrade));
    assert_eq!(
        decision.reason(),
        "GET /containers/json is denied: set POST=1 to allow it (it asks to upgrade the \
         connection to a two-way stream the policy cannot see into, which is a write whatever \
         the method)"
    );
    assert_decides(
        &p,
        "POST",
        "/containers/abc/start",
        Rule::Toggle(Var::AllowStart),
    );
    let decision = p.decide_framed("POST", "/containers/abc/start", upgrade);
    assert_eq!(decision.rule(), Rule::WriteGate);
    assert_eq!(
        decision.reason(),
        "POST /containers/abc/start is denied: set POST=1 to allow it"
    );
    let open = policy("CONTAINERS=1\nPOST=1");
    assert!(
        open.decide_framed("GET", "/containers/json", upgrade)
            .is_allowed()
    );
}

#[test]
fn guards_image_export_and_service_and_task_logs_as_the_proxies_guard_containers() {
    let p = policy("IMAGES=1\nSERVICES=1\nTASKS=1\nPOST=1");
    for (path, guard) in [
        ("/images/get?names=busybox", Var::AllowExport),
        ("/images/library/busybox:latest/get", Var::AllowExport),
        ("/services/web/logs?stdout=1", Var::AllowLogs),
        ("/tasks/abc/logs?stdout=1", Var::AllowLogs),
    ] {
        assert_decides(&p, "GET", path, Rule::Guard(guard));
        let opened = policy(&format!("IMAGES=1\nSERVICES=1\nTASKS=1\n{guard}=1"));
        assert_allows(&opened, "GET", path);
    }
}

#[test]
fn holds_the_swarm_unlock_key_to_the_write_gate() {
    assert_decides(
        &policy("SWARM=1"),
        "GET",
        "/swarm/unlockkey",
        Rule::WriteGate,
    );
    assert_eq!(
        policy("SWARM=1").decide("GET", "/swarm/unlockkey").reason(),
        "GET /swarm/unlockkey is denied: set POST=1 to allow it (its effect is a write \
         whatever the method)"
    );
    assert_allows(&policy("SWARM=1\nPOST=1"), "GET", "/swarm/unlockkey");
    assert_allows(&policy("SWARM=1"), "GET", "/swarm");
}

#[test]
fn names_the_rule_and_variable_that_decided() {
    let p = policy("CONTAINERS=1");
    let cases = [
        ("GET", "/containers/json", "section", Some(Var::Containers)),
        ("GET", "/containers/a/logs", "guard", Some(Var::AllowLogs)),
        ("POST", "/containers/a/stop", "write-gate", Some(Var::Post)),
        ("GET", "/images/json", "section-off", Some(Var::Images)),
        ("GET", "/nothing", "unknown", None),
        ("GET", "/a//b", "malformed", None),
    ];
    for (method, path, kind, var) in cases {
        let rule = p.decide(method, path).rule();
        assert_eq!((rule.kind(), rule.var()), (kind, var), "{method} {path}");
    }
}

/// Never more permissive than linuxserver: a model of its prefix matcher, as
/// docs/POLICY-SEMANTICS.md describes it, must allow whatever Capstan allows.
pub(crate) mod never_more_permissive {
    use super::*;

    /// splitmix64: small, deterministic, good enough to spread test cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }
    }

    /// linuxserver's sections: `(/v[\d.]+)?/<name>` prefix, case-insensitive.
    const PROXY_SECTIONS: &[(Var, &str)] = &[
        (Var::Auth, "/auth"),
        (Var::Build, "/build"),
        (Var::Commit, "/commit"),
        (Var::Configs, "/configs"),
        (Var::Containers, "/containers"),
        (Var::Distribution, "/distribution"),
        (Var::Events, "/events"),
        (Var::Exec, "/exec"),
        (Var::Grpc, "/grpc"),
        (Var::Images, "/images"),
        (Var::Info, "/info"),
        (Var::Networks, "/networks"),
        (Var::Nodes, "/nodes"),
        (Var::Ping, "/_ping"),
        (Var::Plugins, "/plugins"),
        (Var::Secrets, "/secrets"),
        (Var::Services, "/services"),
        (Var::Session, "/session"),
        (Var::Swarm, "/swarm"),
        (Var::System, "/system"),
        (Var::Tasks, "/tasks"),
        (Var::Version, "/version"),
        (Var::Volumes, "/volumes"),
    ];

    const PROXY_GUARDS: &[(Var, &str)] = &[
        (Var::AllowLogs, "logs"),
        (Var::AllowTop, "top"),
        (Var::AllowChanges, "changes"),
        (Var::AllowExport, "export"),
        (Var::AllowArchive, "archive"),
    ];

    const PROXY_TOGGLES: &[(Var, &[&str])] = &[
        (Var::AllowRestarts, &["stop", "restart", "kill"]),
        (Var::AllowStart, &["start"]),
        (Var::AllowStop, &["stop"]),
        (Var::AllowPause, &["pause"]),
        (Var::AllowUnpause, &["unpause"]),
    ];

    /// HAProxy's `url_dec` on the path: one pass; a malformed escape fails the converter,
    /// so no path rule matches.
    fn url_dec(path: &str) -> Option<Vec<u8>> {
        let b = path.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Some(out)
    }

    /// `^(/v[\d\.]+)?/containers/[a-zA-Z0-9_.-]+/<word>` (a prefix match).
    fn container_action(path: &[u8], word: &str) -> bool {
        let Some(rest) = path.strip_prefix(b"/containers/") else {
            return false;
        };
        let id = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b))
            .count();
        id > 0 && rest[id..].starts_with(b"/") && rest[id + 1..].starts_with(word.as_bytes())
    }

    /// The model: guards, toggles, write gate, sections, deny — on the decoded,
    /// lower-cased path, with and without a version prefix.
    pub(crate) fn linuxserver_allows(vars: VarSet, method: &str, target: &str) -> bool {
        let path = target.split('?').next().unwrap_or_default();
        let decoded = url_dec(path).map(|p| p.to_ascii_lowercase());
        let mut candidates: Vec<&[u8]> = Vec::new();
        if let Some(decoded) = &decoded {
            candidates.push(decoded);
            if let Some(rest) = decoded.strip_prefix(b"/v") {
                let n = rest
                    .iter()
                    .take_while(|b| b.is_ascii_digit() || **b == b'.')
                    .count();
                if n > 0 {
                    candidates.push(&rest[n..]);
                }
            }
        }
        let any = |rule: &dyn Fn(&[u8]) -> bool| candidates.iter().any(|c| rule(c));
        for &(var, word) in PROXY_GUARDS {
            if !vars.contains(var) && any(&|c| container_action(c, word)) {
                return false;
            }
        }
        for &(var, words) in PROXY_TOGGLES {
            if vars.contains(var) && words.iter().any(|w| any(&|c| container_action(c, w))) {
                return true;
            }
        }
        if method != "GET" && method != "HEAD" && !vars.contains(Var::Post) {
            return false;
        }
        PROXY_SECTIONS
            .iter()
            .any(|&(var, prefix)| vars.contains(var) && any(&|c| c.starts_with(prefix.as_bytes())))
    }

    /// Methods, as sent and misspelt (shared with `crate::props`).
    pub(crate) const METHODS: &[&str] = &[
        "GET", "GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE", "get", "post", "Head",
        "PATCH", "OPTIONS", "CONNECT", "TRACE", "", "GET ",
    ];

    /// Path parameters an attacker would try (shared with `crate::props`).
    pub(crate) const PARAMS: &[&str] = &[
        "abc",
        "web-1",
        "a.b_c",
        "A",
        "json",
        "library/busybox:latest",
        "registry:5000/a/b",
        "sha256:abc",
        "a b",
        "a%20b",
        "-x",
        ".x",
        ".",
        "..",
        "",
        "%2e%2e",
        "a%2Fb",
        "%61bc",
        "x%zz",
        "é",
        "%C3%A9",
        "a%3Fb",
        "a?b",
        "a#b",
        "a/../b",
        "start",
        "logs",
        "%",
        "a%25b",
        "%2E",
        "attach",
        "ws",
        "%00",
        "a;b",
    ];

    /// Pieces inserted anywhere in a target (shared with `crate::props`).
    pub(crate) const JUNK: &[&str] = &[
        "/x",
        "/..",
        "/.",
        "/",
        "//",
        "x",
        "X",
        "%2F",
        "%2f",
        "/../../../images/create",
        "/../containers/json",
        "?a=b",
        "?x=/../y",
        "/start",
        "/logs",
        "%00",
        " ",
        "\t",
        "#f",
        "/%2e%2e",
        "s",
        "%5C",
        "\\",
        "?",
        "#",
        "/attach",
        "/attach/ws",
        "\r\n",
        ";",
        "%2e%2e/",
    ];

    /// API version prefixes, good and bad (shared with `crate::props`).
    pub(crate) const PREFIXES: &[&str] = &[
        "/v1.41",
        "/V1.41",
        "/v1",
        "/v1.41/v1.41",
        "/v.",
        "/v1.",
        "/x",
    ];

    const EXTRA_PATHS: &[&str] = &[
        "/containersX/json",
        "/infox",
        "/versions",
        "/systemd",
        "/execute",
        "/_pingx",
        "/containers/abc/startx",
        "/containers/abc/stopped",
        "/containers/abc/killall",
        "/version/../containers/json",
        "/containers/abc/start/../../../images/create",
        "/containers/abc//logs",
        "/containers/abc/./logs",
        "/%63ontainers/json",
        "/containers%2Fjson",
        "/CONTAINERS/json",
        "/Containers/abc/Start",
        "/",
        "",
        "containers/json",
        "/containers/abc/logs/x",
        "/containers/abc/archive/x",
    ];

    fn request(rng: &mut Rng) -> (String, String) {
        let mut method = rng.pick(METHODS).to_owned();
        let mut path = if rng.chance(15) {
            rng.pick(EXTRA_PATHS).to_owned()
        } else {
            let endpoints: Vec<&Endpoint> = endpoints::all().collect();
            let endpoint = rng.pick(&endpoints);
            if rng.chance(70) {
                method = endpoint.method.as_str().to_owned();
            }
            let mut path = String::new();
            for segment in endpoint.segments() {
                path.push('/');
                if segment.starts_with('{') {
                    path.push_str(if rng.chance(70) {
                        "abc"
                    } else {
                        rng.pick(PARAMS)
                    });
                } else {
                    path.push_str(segment);
                }
            }
            path
        };
        if rng.chance(25) {
            path.insert_str(0, rng.pick(PREFIXES));
        }
        if rng.chance(20) {
            // Junk at a random char boundary.
            let at = rng.below(path.len() + 1);
            if path.is_char_boundary(at) {
                path.insert_str(at, rng.pick(JUNK));
            }
        }
        if rng.chance(10) {
            // Percent-encode one ASCII character.
            let at = rng.below(path.len().max(1));
            if let Some(c) = path.get(at..at + 1) {
                let c = c.as_bytes()[0];
                path.replace_range(at..at + 1, &format!("%{c:02X}"));
            }
        }
        if rng.chance(5) {
            path = path.to_ascii_uppercase();
        }
        if rng.chance(20) {
            path.push_str(rng.pick(&[
                "?all=1",
                "?t=10",
                "?a=%2F..%2F",
                "?x=a b",
                "?",
                "?stream=1&stdin=1",
                "?logs=1",
                "?logs=%zz",
            ]));
        }
        if rng.chance(5) && path.len() > 1 {
            path = path.replacen(if method == "GET" { "json" } else { "/start" }, "", 1);
        }
        (method, path)
    }

    fn random_vars(rng: &mut Rng) -> VarSet {
        let mut set = VarSet::EMPTY;
        let density = 40 + rng.below(56) as u64;
        for &var in Var::ALL {
            set.set(var, rng.chance(density));
        }
        set
    }

    #[test]
    fn never_allows_what_the_linuxserver_prefix_matcher_denies() {
        let mut rng = Rng(0x5EED_CA95_7A11);
        let (mut allowed, mut total) = (0, 0);
        for _ in 0..40 {
            let vars = random_vars(&mut rng);
            let policy = CompiledPolicy::from_vars(vars);
            for _ in 0..200 {
                let (method, path) = request(&mut rng);
                let decision = policy.decide(&method, &path);
                total += 1;
                if decision.is_allowed() {
                    allowed += 1;
                    assert!(
                        linuxserver_allows(vars, &method, &path),
                        "Capstan allows what linuxserver denies: {method} {path:?} under {vars} \
                         ({})",
                        decision.reason()
                    );
                    // And what is forwarded is what was decided on: clean and stable.
                    let forwarded = decision.path();
                    let again = policy.decide(&method, forwarded);
                    assert!(again.is_allowed(), "{method} {forwarded}");
                    assert_eq!(again.path(), forwarded);
                    assert_eq!(again.rule(), decision.rule());
                    assert!(linuxserver_allows(vars, &method, forwarded));
                    let path_only = forwarded.split('?').next().unwrap();
                    assert!(!path_only.contains('%'), "{forwarded}");
                    assert!(!path_only.contains("//"), "{forwarded}");
                    assert!(!path_only.split('/').any(|s| s == "." || s == ".."));
                }
            }
        }
        assert_eq!(total, 8000);
        assert!(
            allowed > total / 10,
            "too few allowed cases to mean anything: {allowed}"
        );
    }

    #[test]
    fn agrees_with_the_model_on_the_documented_weaknesses() {
        // The model reproduces the weaknesses docs/POLICY-SEMANTICS.md lists …
        let defaults = VarSet::defaults();
        let mut start = VarSet::EMPTY;
        start.insert(Var::AllowStart);
        let mut containers = VarSet::EMPTY;
        containers.insert(Var::Containers);
        assert!(linuxserver_allows(
            defaults,
            "GET",
            "/version/../containers/json"
        ));
        assert!(linuxserver_allows(
            start,
            "POST",
            "/containers/abc/start/../../../images/create"
        ));
        assert!(linuxserver_allows(containers, "GET", "/containersX/json"));
        assert!(linuxserver_allows(defaults, "GET", "/versions"));
        assert!(linuxserver_allows(start, "POST", "/containers/abc/startx"));
        assert!(linuxserver_allows(
            containers,
            "GET",
            "/containers/abc//logs"
        ));
        assert!(linuxserver_allows(
            containers,
            "GET",
            "/containers/abc/./logs"
        ));
        assert!(linuxserver_allows(containers, "GET", "/%63ontainers/json"));
        assert!(linuxserver_allows(containers, "GET", "/containers%2Fjson"));
        assert!(!linuxserver_allows(
            containers,
            "GET",
            "/containers/abc/logs"
        ));
        // … and Capstan refuses every one of them.
        for (vars, method, path) in [
            (defaults, "GET", "/version/../containers/json"),
            (
                start,
                "POST",
                "/containers/abc/start/../../../images/create",
            ),
            (containers, "GET", "/containersX/json"),
            (defaults, "GET", "/versions"),
            (start, "POST", "/containers/abc/startx"),
            (containers, "GET", "/containers/abc//logs"),
            (containers, "GET", "/containers/abc/./logs"),
            (containers, "GET", "/containers%2Fjson"),
        ] {
            assert_denies(&CompiledPolicy::from_vars(vars), method, path);
        }
    }
}

/// linuxserver's proxy allows these with its LIBPOD_* variables (and ALLOW_* toggles that
/// also match `/libpod/…`); Capstan serves no Podman API, so each is denied whatever the
/// block says.
const LIBPOD_REQUESTS: &[(&str, &str)] = &[
    ("GET", "/libpod/_ping"),
    ("GET", "/v4.0.0/libpod/version"),
    ("GET", "/libpod/containers/json"),
    ("POST", "/libpod/containers/web/pause"),
    ("POST", "/v1.41/libpod/containers/web/restart"),
    ("POST", "/libpod/pods/p1/start"),
    ("POST", "/libpod/pods/p1/kill"),
    ("GET", "/libpod/images/json"),
    ("POST", "/libpod/play/kube"),
    ("GET", "/libpod/generate/web/systemd"),
    ("GET", "/libpod"),
];

#[test]
fn libpod_variables_are_accepted_and_never_allow_anything() {
    let everything_on: String = INERT
        .iter()
        .filter(|v| v.kind() == InertKind::Libpod)
        .map(|v| format!("{}=1\n", v.name()))
        .collect();
    let toggles = "POST=1\nCONTAINERS=1\nALLOW_START=1\nALLOW_STOP=1\nALLOW_RESTARTS=1\n\
                   ALLOW_PAUSE=1\nALLOW_UNPAUSE=1\n";
    for base in ["", toggles] {
        let with = policy(&format!("{base}{everything_on}"));
        let without = policy(base);
        for &(method, path) in LIBPOD_REQUESTS {
            let decision = with.decide(method, path);
            assert_eq!(decision.rule(), Rule::Unknown, "{method} {path}");
            assert!(
                decision
                    .reason()
                    .contains("Podman's libpod API, which Capstan does not serve"),
                "{}",
                decision.reason()
            );
        }
        // And on the Docker API they change nothing.
        for endpoint in endpoints::all() {
            let path = example_path(endpoint);
            let method = endpoint.method.as_str();
            assert_eq!(
                with.decide(method, &path).rule(),
                without.decide(method, &path).rule(),
                "{method} {path}"
            );
        }
    }
}
