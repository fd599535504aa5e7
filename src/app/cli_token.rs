//! The CLI token file: how the CLI on this host reaches the engine that holds the data
//! directory.
//!
//! `DATA_DIR/cli.token` holds the API's address on the first line and a token on the
//! second; mode 0600, beside the vault key file. The engine writes it once it listens
//! (replacing any left over), removes it at a clean stop, and the CLI reads it when the
//! data directory is locked. `CAPSTAN_API_TOKEN` ([`crate::config::Settings::api_token`])
//! overrides the token read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::secret::Secret;
use crate::token::Tokens;

/// The file's name in the data directory.
pub const FILE: &str = "cli.token";
/// The name of the token in that file.
pub const TOKEN_NAME: &str = "local-cli";

/// Where the file of the data directory `data_dir` is.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// A fresh token for the file; the one of an earlier start is revoked.
pub fn mint(tokens: &Tokens) -> anyhow::Result<Secret> {
    tokens.revoke(TOKEN_NAME)?;
    Ok(tokens.create(TOKEN_NAME)?.0)
}

/// Writes the file: `addr` and `token`, mode 0600, replacing any earlier one.
pub fn write(data_dir: &Path, addr: SocketAddr, token: &Secret) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path(data_dir);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut text = zeroize::Zeroizing::new(format!("{addr}\n").into_bytes());
    text.extend_from_slice(token.expose());
    text.push(b'\n');
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads the file: the API's address (a wildcard address is reached over loopback) and
/// the token, or `token` instead of the file's when one is given.
pub fn read(data_dir: &Path, token: Option<&Secret>) -> anyhow::Result<(SocketAddr, Secret)> {
    let path = path(data_dir);
    let file = Secret::from_file(&path).with_context(|| {
        format!(
            "the data directory is held by a running engine, but its CLI token file {} cannot be read (run as the engine's user, or wait until it listens)",
            path.display()
        )
    })?;
    let text = file
        .expose_str()
        .context("the CLI token file is not text")?;
    let mut lines = text.lines();
    let addr_line = lines.next().unwrap_or_default();
    let mut addr: SocketAddr = addr_line
        .trim()
        .parse()
        .with_context(|| format!("{} does not start with the API's address", path.display()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let token = match token {
        Some(t) => Secret::new(t.expose().to_vec()),
        None => Secret::from_str_owned(lines.next().unwrap_or_default().trim().to_string()),
    };
    Ok((addr, token))
}

/// Removes the file (at a clean stop).
pub fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(path(data_dir));
}
