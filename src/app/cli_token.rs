//! The CLI token file: how the CLI on this host reaches the engine that holds the data
//! directory.
//!
//! `DATA_DIR/cli.token` holds the API's address on the first line and a token on the
//! second, and when the API is served over TLS a third line `tls-sha256 HEX`: the
//! SHA-256 of the engine's certificate, which the CLI pins (it reaches the engine over
//! loopback, where no certificate name would match); mode 0600, beside the vault key
//! file. The engine writes it once it listens
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

/// The certificate a TLS listener presents, by the SHA-256 of its DER encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    /// The pin of the first certificate (the server's own) in the PEM file `cert`.
    pub fn of_certificate(cert: &Path) -> anyhow::Result<Pin> {
        use sha2::Digest;
        let pem = std::fs::read(cert)
            .with_context(|| format!("cannot read the certificate {}", cert.display()))?;
        let chain = crate::docker::tls::pem_certs(&pem)
            .map_err(|_| anyhow::anyhow!("{} holds no PEM certificate", cert.display()))?;
        let first = chain
            .first()
            .with_context(|| format!("{} holds no PEM certificate", cert.display()))?;
        Ok(Pin(sha2::Sha256::digest(first.as_ref()).into()))
    }

    /// Whether `der` is the pinned certificate.
    pub fn matches(&self, der: &[u8]) -> bool {
        use sha2::Digest;
        <[u8; 32]>::from(sha2::Sha256::digest(der)) == self.0
    }
}

/// Where and how the CLI reaches the running engine.
pub struct Endpoint {
    /// The API's address (a wildcard address replaced by loopback).
    pub addr: SocketAddr,
    pub token: Secret,
    /// The engine's certificate when it serves TLS.
    pub tls: Option<Pin>,
}

/// Writes the file: `addr`, `token` and the TLS certificate's pin, mode 0600,
/// replacing any earlier one.
pub fn write(
    data_dir: &Path,
    addr: SocketAddr,
    tls: Option<&Pin>,
    token: &Secret,
) -> anyhow::Result<()> {
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
    if let Some(pin) = tls {
        text.extend_from_slice(format!("{TLS_PREFIX}{}\n", hex::encode(pin.0)).as_bytes());
    }
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The third line's start.
const TLS_PREFIX: &str = "tls-sha256 ";

/// Reads the file: the API's address (a wildcard address is reached over loopback), the
/// token (or `token` instead of the file's when one is given) and the TLS pin.
pub fn read(data_dir: &Path, token: Option<&Secret>) -> anyhow::Result<Endpoint> {
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
    let file_token = lines.next().unwrap_or_default().trim();
    let token = match token {
        Some(t) => Secret::new(t.expose().to_vec()),
        None => Secret::from_str_owned(file_token.to_string()),
    };
    let tls = match lines.next().map(str::trim).filter(|l| !l.is_empty()) {
        None => None,
        Some(line) => {
            let bad = || {
                format!(
                    "{}: a third line that is no `{TLS_PREFIX}HEX`",
                    path.display()
                )
            };
            let hex_pin = line.strip_prefix(TLS_PREFIX).with_context(bad)?;
            let pin: [u8; 32] = hex::decode(hex_pin)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(bad)?;
            Some(Pin(pin))
        }
    };
    Ok(Endpoint { addr, token, tls })
}

/// Removes the file (at a clean stop).
pub fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(path(data_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_carries_the_certificate_pin_of_a_tls_engine() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "0.0.0.0:7878".parse().unwrap();
        let token = Secret::from_str_owned("cap_00000000_x".into());
        write(dir.path(), addr, None, &token).unwrap();
        let plain = read(dir.path(), None).unwrap();
        assert_eq!(plain.addr.to_string(), "127.0.0.1:7878");
        assert_eq!(plain.token.expose(), token.expose());
        assert_eq!(plain.tls, None);

        let pin = Pin([7; 32]);
        write(dir.path(), addr, Some(&pin), &token).unwrap();
        let tls = read(dir.path(), None).unwrap();
        assert_eq!(tls.tls, Some(pin));
        use sha2::Digest;
        let der = b"a certificate";
        let of_der = Pin(sha2::Sha256::digest(der).into());
        assert!(of_der.matches(der) && !of_der.matches(b"another certificate"));

        std::fs::write(path(dir.path()), "127.0.0.1:1\ncap_x\ntls-sha256 zz\n").unwrap();
        assert!(read(dir.path(), None).is_err());
    }
}
