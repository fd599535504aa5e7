//! `capstan plugin new`: a plugin crate that builds and installs as it is.
//!
//! The crate depends on the SDK by path: the `plugins/sdk` of the Capstan checkout this
//! binary was built from, or the path given (`--sdk`, `CAPSTAN_SDK_PATH`). It is its own
//! workspace, so it builds wherever it is created.

use std::path::{Path, PathBuf};

use super::manifest::validate_name;

/// Where this binary's source tree keeps the SDK.
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk")
}

/// What `new` wrote.
#[derive(Debug)]
pub struct Scaffold {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
}

/// Creates `<parent>/<name>/` with `Cargo.toml`, `src/lib.rs`, `plugin.toml` and
/// `.gitignore`. Refuses to write into an existing directory.
pub fn create(name: &str, parent: &Path, sdk: &Path) -> Result<Scaffold, String> {
    validate_name(name)?;
    let sdk = sdk
        .canonicalize()
        .map_err(|e| format!("the plugin SDK is not at {} ({e}); pass --sdk PATH (the plugins/sdk directory of a Capstan checkout)", sdk.display()))?;
    if !sdk.join("Cargo.toml").is_file() {
        return Err(format!(
            "{} is not the plugin SDK (no Cargo.toml)",
            sdk.display()
        ));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(format!("{} already exists", dir.display()));
    }
    let sdk_text = sdk
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk_text)),
        ("src/lib.rs", lib_rs(name)),
        ("plugin.toml", plugin_toml(name)),
        (".gitignore", "/target\n".to_string()),
    ];
    let mut written = Vec::new();
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(Scaffold {
        dir,
        files: written,
    })
}

fn cargo_toml(name: &str, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# A Capstan plugin is a WASI p2 component:
#   cargo build --target wasm32-wasip2 --release
#   capstan plugin install .
[lib]
crate-type = ["cdylib"]

[dependencies]
capstan-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1

# Its own workspace, wherever it is created.
[workspace]
"#
    )
}

fn lib_rs(name: &str) -> String {
    let ty: String = name
        .split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!(
        r#"//! {name}: a Capstan plugin.
//!
//! `run` is called once per trigger (cron, webhook or by hand) on a fresh instance; keep
//! what must survive between runs with `state::set_json`.

use capstan_sdk::prelude::*;

struct {ty};

impl Plugin for {ty} {{
    fn run(event: Event) -> Result<Outcome, Error> {{
        let mut lines = Vec::new();
        for device in docker::list_devices() {{
            match docker::list_containers(&device.name, &ContainerFilter::running()) {{
                Ok(containers) => {{
                    log::info(&format!("{{}}: {{}} running", device.name, containers.len()));
                    lines.push(format!("{{}}: {{}} running", device.name, containers.len()));
                }}
                // Denials and Docker errors are values: report them and go on.
                Err(e) => lines.push(format!("{{}}: {{}}", device.name, e.message())),
            }}
        }}
        let input = event.input();
        if !input.is_empty() {{
            log::info(&format!("input: {{input}}"));
        }}
        Ok(Outcome::new(lines.join("; ")))
    }}
}}

capstan_sdk::export_plugin!({ty});
"#
    )
}

fn plugin_toml(name: &str) -> String {
    format!(
        r#"# The manifest: what the plugin is, when it runs, what it may touch.
name = "{name}"
version = "0.1.0"
description = "Counts running containers on every device in scope"

# When it runs besides `capstan plugin run {name}`:
# [[triggers.cron]]
# schedule = "*/5 * * * *"        # or 6 fields with seconds first, or @hourly
# [[triggers.webhook]]
# name = "{name}"                 # POST /hooks/{name}
# auth = "hmac-sha256"            # X-Hub-Signature-256 as GitHub sends it; or "bearer"
# [[triggers.docker]]             # a Docker event on a device in scope (needs EVENTS=1)
# events = ["container:die", "container:health_status: unhealthy"]
# debounce = "5s"                 # one run per container per 5 s, with a count
# [[triggers.run]]                # another plugin's run ended (the event says how)
# plugins = ["autoheal"]          # names or globs; a glob never matches this plugin
# status = ["failed", "timed-out"] # default: failed, denied, timed-out
# outcome = "gave up"             # optional: text its outcome or error must contain

# What it may touch: socket-proxy variables, devices and containers. It needs to list
# containers (CONTAINERS=1) and nothing else.
[policy]
CONTAINERS = 1
devices = ["*"]
# Origins it may reach over HTTP (capstan_sdk::http); none by default:
# outbound = ["https://ntfy.sh", "https://*.example.com", "http://10.0.0.5:8080"]

# A secret it sends without seeing it, as {{{{secret.ntfy}}}} in a URL or header, to these
# origins only (the value: `capstan plugin secret set {name} ntfy`):
# [secrets.ntfy]
# origins = ["https://ntfy.sh"]

[limits]
memory_mib = 16
timeout_secs = 30

# Tell people: host.notify may send to these notifier channels (`capstan notifier add`),
# and runs that end so notify them without any code.
# [notify]
# channels = ["ops"]
# on = ["failed", "timed-out"]

[config]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_crate_that_names_the_sdk_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let s = create("my-plugin", tmp.path(), &default_sdk_path()).unwrap();
        let cargo = std::fs::read_to_string(s.dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("plugins/sdk"), "{cargo}");
        let lib = std::fs::read_to_string(s.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("struct MyPlugin;"), "{lib}");
        let manifest = std::fs::read_to_string(s.dir.join("plugin.toml")).unwrap();
        crate::plugin::Manifest::parse(&manifest, "plugin.toml")
            .unwrap()
            .validate("plugin.toml", &[])
            .unwrap();
        assert!(create("my-plugin", tmp.path(), &default_sdk_path()).is_err());
        assert!(create("Bad Name", tmp.path(), &default_sdk_path()).is_err());
    }

    #[test]
    fn the_run_outcome_trigger_offered_in_comments_is_valid_once_uncommented() {
        let text = plugin_toml("watcher");
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("# [[triggers.run]]"))
            .take_while(|l| l.starts_with("# "))
            .map(|l| &l[2..])
            .collect();
        assert_eq!(block.len(), 4, "{text}");
        let manifest = format!(
            "name = \"watcher\"\nversion = \"1\"\n{}\n",
            block.join("\n")
        );
        let m = crate::plugin::Manifest::parse(&manifest, "plugin.toml").unwrap();
        m.validate("plugin.toml", &[]).unwrap();
        assert_eq!(m.triggers.run[0].plugins, ["autoheal"]);
        assert_eq!(m.triggers.run[0].outcome.as_deref(), Some("gave up"));
    }
}
