//! The create guard: what a new container may ask of its host.
//!
//! No socket proxy has this. With `CONTAINERS=1 POST=1` a proxied client may create a
//! container, and a container created with `Privileged`, the host's PID namespace, a
//! bind mount of `/` or an added `SYS_ADMIN` owns the host: the path-based rules of the
//! proxies cannot see any of it, because it is in the request body. Capstan reads the
//! body ([`super::body`]) into the facts this module judges ([`CreateAsks`]) and refuses
//! whatever the policy does not allow.
//!
//! What a create may ask for, and the defaults (the safe ones; each widening is one
//! setting, named in the denial):
//!
//! | asks for | TOML `[create]` | environment block | default |
//! |---|---|---|---|
//! | `Privileged`, an exec with `Privileged`, `SecurityOpt` `…=unconfined` / `label=disable`, empty `MaskedPaths` / `ReadonlyPaths` | `privileged = true` | `CREATE_PRIVILEGED=1` | refused |
//! | the host's PID, network, IPC, UTS or user namespace (`…Mode: "host"`) | `host_namespaces = true` | `CREATE_HOST_NAMESPACES=1` | refused |
//! | `Devices`, `DeviceRequests`, `DeviceCgroupRules` | `devices = true` | `CREATE_DEVICES=1` | refused |
//! | `CapAdd` entries | `cap_add = ["NET_ADMIN"]` (`"ALL"` allows any) | `CREATE_CAP_ADD=NET_ADMIN,SYS_TIME` | none |
//! | bind mounts (`Binds`, `Mounts` of type bind, local volumes with a `device`) | `bind_roots = ["/srv/app"]` | `CREATE_BIND_ROOTS=/srv/app,/data` | none |
//! | the image | `images = ["registry.local/app:*"]` | `CREATE_IMAGES=registry.local/app:*` | every image |
//!
//! Bind sources are compared lexically after cleaning (`.`, `..`, repeated `/`), by whole
//! path components: `/srv/app` allows `/srv/app/data`, not `/srv/application`. The daemon
//! resolves symbolic links on its host, where Capstan cannot look; a root should hold no
//! link that leads out of it. Images are matched as written, with `:latest` added when
//! the reference has neither tag nor digest (`app` is matched as `app:latest`).

use std::fmt;

use serde::Deserialize;
use thiserror::Error;

use crate::scope::Glob;

/// Why a `[create]` setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CreateError {
    /// A bind root that is not an absolute path.
    #[error("bind root `{0}` is not an absolute path: write a host directory such as `/srv/app`")]
    RelativeRoot(String),
    /// A capability name with characters no capability has.
    #[error("capability `{0}` is not a capability name (letters, digits and `_`, e.g. NET_ADMIN)")]
    BadCapability(String),
    /// An image pattern that is empty or holds whitespace.
    #[error("image pattern `{0}` is empty or holds whitespace or a control character")]
    BadImage(String),
}

/// What the policy lets a container create (or re-create) ask for. The default refuses
/// everything beyond a plain container and allows every image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateGuard {
    privileged: bool,
    host_namespaces: bool,
    devices: bool,
    /// Capability names, upper case, without `CAP_`.
    cap_add: Vec<String>,
    /// Cleaned absolute paths.
    bind_roots: Vec<String>,
    /// `None`: every image.
    images: Option<Vec<Glob>>,
}

/// The `[create]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTable {
    /// Allow `Privileged` containers and execs, unconfined security options and unmasked
    /// paths.
    #[serde(default)]
    privileged: bool,
    /// Allow the host's PID, network, IPC, UTS and user namespaces.
    #[serde(default)]
    host_namespaces: bool,
    /// Allow host devices (`Devices`, `DeviceRequests`, `DeviceCgroupRules`).
    #[serde(default)]
    devices: bool,
    /// Capabilities a container may add (`"ALL"` for any).
    #[serde(default)]
    cap_add: Vec<String>,
    /// Host directories bind mounts may come from.
    #[serde(default)]
    bind_roots: Vec<String>,
    /// Image globs a container may run; absent means every image.
    #[serde(default)]
    images: Option<Vec<String>>,
}

impl TryFrom<CreateTable> for CreateGuard {
    type Error = CreateError;

    fn try_from(t: CreateTable) -> Result<Self, CreateError> {
        let mut guard = CreateGuard {
            privileged: t.privileged,
            host_namespaces: t.host_namespaces,
            devices: t.devices,
            ..CreateGuard::default()
        };
        guard.set_cap_add(&t.cap_add)?;
        guard.set_bind_roots(&t.bind_roots)?;
        if let Some(images) = t.images {
            guard.set_images(&images)?;
        }
        Ok(guard)
    }
}

/// The environment-block names of the create guard; see [`CreateGuard::set_env`].
pub const ENV_NAMES: [&str; 6] = [
    "CREATE_PRIVILEGED",
    "CREATE_HOST_NAMESPACES",
    "CREATE_DEVICES",
    "CREATE_CAP_ADD",
    "CREATE_BIND_ROOTS",
    "CREATE_IMAGES",
];

impl CreateGuard {
    /// Whether nothing beyond a plain container, and every image, is allowed (the
    /// default).
    pub fn is_default(&self) -> bool {
        *self == CreateGuard::default()
    }

    /// Sets one environment-block entry (`CREATE_PRIVILEGED=1`,
    /// `CREATE_BIND_ROOTS=/srv/app,/data`). The switches take integers as the proxies'
    /// variables do; the lists take comma-separated items (no item may be empty). Returns
    /// `None` when `name` is no create-guard name, `Some(Err(why))` for a bad value.
    pub fn set_env(&mut self, name: &str, value: &str) -> Option<Result<(), String>> {
        let switch = |value: &str| -> Result<bool, String> {
            value.trim().parse::<u64>().map(|n| n != 0).map_err(|_| {
                format!("{name} has value `{value}`, which is not an integer: write {name}=1 to allow it or {name}=0 to refuse it")
            })
        };
        let list = |value: &str| -> Result<Vec<String>, String> {
            let items: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
            if items.iter().any(String::is_empty) {
                return Err(format!(
                    "{name} has an empty item in `{value}`: write a comma-separated list such as {name}=a,b"
                ));
            }
            Ok(items)
        };
        let result = match name {
            "CREATE_PRIVILEGED" => switch(value).map(|on| self.privileged = on),
            "CREATE_HOST_NAMESPACES" => switch(value).map(|on| self.host_namespaces = on),
            "CREATE_DEVICES" => switch(value).map(|on| self.devices = on),
            "CREATE_CAP_ADD" => {
                list(value).and_then(|l| self.set_cap_add(&l).map_err(|e| e.to_string()))
            }
            "CREATE_BIND_ROOTS" => {
                list(value).and_then(|l| self.set_bind_roots(&l).map_err(|e| e.to_string()))
            }
            "CREATE_IMAGES" => {
                list(value).and_then(|l| self.set_images(&l).map_err(|e| e.to_string()))
            }
            _ => return None,
        };
        Some(result)
    }

    fn set_cap_add(&mut self, caps: &[String]) -> Result<(), CreateError> {
        self.cap_add = caps
            .iter()
            .map(|c| {
                let n = normal_cap(c);
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    Err(CreateError::BadCapability(c.clone()))
                } else {
                    Ok(n)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    fn set_bind_roots(&mut self, roots: &[String]) -> Result<(), CreateError> {
        self.bind_roots = roots
            .iter()
            .map(|r| clean_path(r).ok_or_else(|| CreateError::RelativeRoot(r.clone())))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    fn set_images(&mut self, images: &[String]) -> Result<(), CreateError> {
        self.images = Some(
            images
                .iter()
                .map(|i| Glob::new(i, "image").map_err(|_| CreateError::BadImage(i.clone())))
                .collect::<Result<_, _>>()?,
        );
        Ok(())
    }

    /// Whether the image allow-list was set (recreate may then move to another
    /// repository the list allows).
    pub fn has_image_list(&self) -> bool {
        self.images.is_some()
    }

    /// Whether `image` may run.
    pub fn allows_image(&self, image: &str) -> bool {
        let Some(globs) = &self.images else {
            return true;
        };
        let normal = with_default_tag(image);
        globs.iter().any(|g| g.matches(image) || g.matches(&normal))
    }

    /// Whether a bind mount from the host path `source` is allowed.
    pub fn allows_bind(&self, source: &str) -> bool {
        let Some(path) = clean_path(source) else {
            return false;
        };
        self.bind_roots.iter().any(|root| {
            root == "/"
                || path == *root
                || path
                    .strip_prefix(root.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Judges what a create asks for; the first refusal names the setting that would
    /// allow it.
    pub fn check(&self, asks: &CreateAsks) -> Result<(), CreateDenial> {
        let deny = |what: &str, setting: Setting| {
            Err(CreateDenial {
                what: what.to_string(),
                setting,
            })
        };
        if !self.privileged
            && let Some(what) = asks.privileged.first()
        {
            return deny(what, Setting::Privileged);
        }
        if !self.host_namespaces
            && let Some(what) = asks.host_namespaces.first()
        {
            return deny(what, Setting::HostNamespaces);
        }
        if !self.devices
            && let Some(what) = asks.devices.first()
        {
            return deny(what, Setting::Devices);
        }
        let any_cap = self.cap_add.iter().any(|c| c == "ALL");
        for cap in &asks.cap_add {
            let n = normal_cap(cap);
            if !any_cap && !self.cap_add.contains(&n) {
                return deny(&format!("HostConfig.CapAdd {cap}"), Setting::CapAdd(n));
            }
        }
        for (field, source) in &asks.binds {
            if !self.allows_bind(source) {
                return deny(
                    &format!("a bind mount of {source} ({field})"),
                    Setting::BindRoots(source.clone()),
                );
            }
        }
        if let Some(image) = &asks.image
            && !self.allows_image(image)
        {
            return deny(&format!("image {image}"), Setting::Images(image.clone()));
        }
        Ok(())
    }

    /// One line per setting, for `capstan policy show`-style output.
    pub fn describe(&self) -> Vec<String> {
        let list = |l: &[String]| {
            if l.is_empty() {
                "none".to_string()
            } else {
                l.join(", ")
            }
        };
        vec![
            format!("privileged = {}", self.privileged),
            format!("host_namespaces = {}", self.host_namespaces),
            format!("devices = {}", self.devices),
            format!("cap_add = {}", list(&self.cap_add)),
            format!("bind_roots = {}", list(&self.bind_roots)),
            format!(
                "images = {}",
                match &self.images {
                    None => "every image".to_string(),
                    Some(g) => list(&g.iter().map(|g| g.to_string()).collect::<Vec<_>>()),
                }
            ),
        ]
    }
}

/// What one create (or exec, update, volume create) body asks for, as read by
/// [`super::body`]. Each entry says where it was found (`HostConfig.PidMode=host`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateAsks {
    /// Privilege: `Privileged`, unconfined security options, unmasked paths.
    pub privileged: Vec<String>,
    /// Host namespaces.
    pub host_namespaces: Vec<String>,
    /// Host devices.
    pub devices: Vec<String>,
    /// Added capabilities, as written.
    pub cap_add: Vec<String>,
    /// Bind mounts: (field, host path).
    pub binds: Vec<(String, String)>,
    /// The image the container runs.
    pub image: Option<String>,
}

/// The setting a refused create needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    Privileged,
    HostNamespaces,
    Devices,
    CapAdd(String),
    BindRoots(String),
    Images(String),
}

/// A create the guard refuses: what it asked for and the setting that would allow it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the create guard refuses {what}: {setting}")]
pub struct CreateDenial {
    /// What the request asked for, and where.
    pub what: String,
    /// The setting that would allow it.
    pub setting: Setting,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Privileged => f.write_str(
                "set `privileged = true` in the policy's [create] table (CREATE_PRIVILEGED=1 in an environment block) to allow it",
            ),
            Setting::HostNamespaces => f.write_str(
                "set `host_namespaces = true` in the policy's [create] table (CREATE_HOST_NAMESPACES=1 in an environment block) to allow it",
            ),
            Setting::Devices => f.write_str(
                "set `devices = true` in the policy's [create] table (CREATE_DEVICES=1 in an environment block) to allow it",
            ),
            Setting::CapAdd(cap) => write!(
                f,
                "add \"{cap}\" to `cap_add` in the policy's [create] table (CREATE_CAP_ADD={cap} in an environment block) to allow it"
            ),
            Setting::BindRoots(path) => write!(
                f,
                "add a directory holding {path} to `bind_roots` in the policy's [create] table (CREATE_BIND_ROOTS=… in an environment block) to allow it"
            ),
            Setting::Images(image) => write!(
                f,
                "add a pattern matching {image} to `images` in the policy's [create] table (CREATE_IMAGES=… in an environment block) to allow it"
            ),
        }
    }
}

/// `cap_sys_admin` → `SYS_ADMIN`.
fn normal_cap(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

/// `app` → `app:latest`; a reference with a tag or digest is kept.
fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Cleans an absolute path lexically (`.`, `..`, repeated and trailing `/`); `None` for
/// a relative path.
pub fn clean_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(toml_text: &str) -> CreateGuard {
        let table: CreateTable = toml::from_str(toml_text).unwrap();
        CreateGuard::try_from(table).unwrap()
    }

    fn asks() -> CreateAsks {
        CreateAsks::default()
    }

    #[test]
    fn the_default_guard_allows_a_plain_container_of_any_image() {
        let g = CreateGuard::default();
        assert!(g.is_default());
        let plain = CreateAsks {
            image: Some("busybox".into()),
            ..asks()
        };
        g.check(&plain).unwrap();
    }

    #[test]
    fn the_default_guard_refuses_each_host_privilege_naming_its_setting() {
        let g = CreateGuard::default();
        let cases = [
            (
                CreateAsks {
                    privileged: vec!["HostConfig.Privileged".into()],
                    ..asks()
                },
                "privileged = true",
            ),
            (
                CreateAsks {
                    host_namespaces: vec!["HostConfig.PidMode=host".into()],
                    ..asks()
                },
                "CREATE_HOST_NAMESPACES=1",
            ),
            (
                CreateAsks {
                    devices: vec!["HostConfig.Devices /dev/sda".into()],
                    ..asks()
                },
                "devices = true",
            ),
            (
                CreateAsks {
                    cap_add: vec!["cap_sys_admin".into()],
                    ..asks()
                },
                "add \"SYS_ADMIN\" to `cap_add`",
            ),
            (
                CreateAsks {
                    binds: vec![("HostConfig.Binds".into(), "/".into())],
                    ..asks()
                },
                "bind_roots",
            ),
        ];
        for (a, needle) in cases {
            let message = g.check(&a).unwrap_err().to_string();
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn bind_roots_allow_whole_components_only_after_cleaning() {
        let g = guard("bind_roots = [\"/srv/app/\"]");
        assert!(g.allows_bind("/srv/app"));
        assert!(g.allows_bind("/srv/app/data"));
        assert!(g.allows_bind("/srv//app/./data"));
        assert!(!g.allows_bind("/srv/application"));
        assert!(!g.allows_bind("/srv/app/../../etc"));
        assert!(!g.allows_bind("srv/app"));
        assert!(guard("bind_roots = [\"/\"]").allows_bind("/etc"));
        assert_eq!(
            CreateGuard::try_from(toml::from_str::<CreateTable>("bind_roots = [\"srv\"]").unwrap()),
            Err(CreateError::RelativeRoot("srv".into()))
        );
    }

    #[test]
    fn images_match_the_allow_list_with_an_implicit_latest_tag() {
        let g = guard("images = [\"registry.local/app:*\", \"busybox:latest\"]");
        assert!(g.allows_image("registry.local/app:1.2"));
        assert!(g.allows_image("busybox"));
        assert!(!g.allows_image("registry.local/app-evil:1"));
        assert!(!g.allows_image("alpine"));
        let refused = g
            .check(&CreateAsks {
                image: Some("alpine".into()),
                ..asks()
            })
            .unwrap_err();
        assert_eq!(refused.setting, Setting::Images("alpine".into()));
    }

    #[test]
    fn capabilities_are_compared_without_case_or_cap_prefix() {
        let g = guard("cap_add = [\"NET_ADMIN\"]");
        let a = |c: &str| CreateAsks {
            cap_add: vec![c.into()],
            ..asks()
        };
        g.check(&a("net_admin")).unwrap();
        g.check(&a("CAP_NET_ADMIN")).unwrap();
        assert!(g.check(&a("ALL")).is_err());
        guard("cap_add = [\"all\"]").check(&a("SYS_ADMIN")).unwrap();
    }

    #[test]
    fn environment_names_widen_the_guard_and_refuse_bad_values() {
        let mut g = CreateGuard::default();
        g.set_env("CREATE_PRIVILEGED", "1").unwrap().unwrap();
        g.set_env("CREATE_BIND_ROOTS", "/srv/app,/data")
            .unwrap()
            .unwrap();
        assert!(g.allows_bind("/data/x"));
        assert!(g.privileged);
        assert!(g.set_env("CREATE_PRIVILEGED", "yes").unwrap().is_err());
        assert!(g.set_env("CREATE_BIND_ROOTS", "/a,,/b").unwrap().is_err());
        assert!(g.set_env("CREATE_BIND_ROOTS", "rel").unwrap().is_err());
        assert!(g.set_env("CREATE_ANYTHING", "1").is_none());
    }

    #[test]
    fn unknown_create_keys_are_refused() {
        assert!(toml::from_str::<CreateTable>("privilged = true").is_err());
    }
}
