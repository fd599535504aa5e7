//! The local daemon: a unix socket, or a plain `tcp://` address, as the docker CLI reads
//! `DOCKER_HOST`.
//!
//! The address is the device's `docker_host`, else `DOCKER_HOST`, else
//! `unix:///var/run/docker.sock`. `tcp://` here is plain HTTP (a daemon on loopback or a
//! trusted network); a daemon that wants TLS is a `tls` device.

use std::path::PathBuf;

use super::{ConnectError, ConnectOptions, Io, Steps, connect_tcp, resolve, within};
use crate::device::{Device, IpFamily};

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

pub(crate) struct LocalTransport {
    device: String,
    endpoint: Endpoint,
    connect_timeout: std::time::Duration,
}

enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl LocalTransport {
    pub(crate) fn new(device: &Device, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let (url, from) = match (&device.docker_host, &opts.docker_host_env) {
            (Some(h), _) => (h.clone(), "the device's --docker-host"),
            (None, Some(env)) => (env.clone(), "DOCKER_HOST"),
            (None, None) => (format!("unix://{DEFAULT_SOCKET}"), "the default"),
        };
        let endpoint = parse_endpoint(&url).ok_or_else(|| ConnectError::Invalid {
            device: device.name.clone(),
            detail: format!(
                "{from} is {url:?}; a local device needs unix:///path or tcp://host:port (a daemon with TLS is a `--kind tls` device, a remote one over SSH a `--kind ssh` device)"
            ),
        })?;
        Ok(LocalTransport {
            device: device.name.clone(),
            endpoint,
            connect_timeout: opts.connect_timeout,
        })
    }

    pub(crate) async fn connect(&self, steps: &Steps) -> Result<Io, ConnectError> {
        let device = self.device.as_str();
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let fut = steps.run("connect", async {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(|e| unix_error(device, path, e))
                });
                let s = within(device, self.connect_timeout, steps, fut).await?;
                Ok(Box::new(s))
            }
            Endpoint::Tcp { host, port } => {
                let fut = async {
                    let addrs = steps
                        .run("resolve", resolve(device, host, *port, IpFamily::Any))
                        .await?;
                    steps
                        .run("tcp-connect", connect_tcp(device, &addrs, "Docker daemon"))
                        .await
                };
                let s = within(device, self.connect_timeout, steps, fut).await?;
                Ok(Box::new(s))
            }
        }
    }
}

fn parse_endpoint(url: &str) -> Option<Endpoint> {
    if let Some(p) = url.strip_prefix("unix://") {
        return p.starts_with('/').then(|| Endpoint::Unix(PathBuf::from(p)));
    }
    let rest = url.strip_prefix("tcp://")?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Endpoint::Tcp {
        host: host.to_string(),
        port,
    })
}

fn unix_error(device: &str, path: &std::path::Path, e: std::io::Error) -> ConnectError {
    use std::io::ErrorKind;
    let socket = path.display().to_string();
    match e.kind() {
        ErrorKind::PermissionDenied => ConnectError::PermissionDenied {
            device: device.to_string(),
            socket,
            detail: e.to_string(),
        },
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => ConnectError::DaemonNotRunning {
            device: device.to_string(),
            socket,
            detail: e.to_string(),
        },
        _ => ConnectError::Transport {
            device: device.to_string(),
            detail: format!("cannot connect to {socket}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn docker_host_urls_parse_like_the_docker_cli_reads_them() {
        assert!(
            matches!(parse_endpoint("unix:///var/run/docker.sock"), Some(Endpoint::Unix(p)) if p == Path::new("/var/run/docker.sock"))
        );
        assert!(
            matches!(parse_endpoint("tcp://127.0.0.1:2375"), Some(Endpoint::Tcp { host, port: 2375 }) if host == "127.0.0.1")
        );
        assert!(
            matches!(parse_endpoint("tcp://[::1]:2375"), Some(Endpoint::Tcp { host, .. }) if host == "::1")
        );
        for bad in [
            "ssh://me@host",
            "unix://relative",
            "tcp://host",
            "npipe:////./pipe/x",
        ] {
            assert!(parse_endpoint(bad).is_none(), "{bad}");
        }
    }
}
