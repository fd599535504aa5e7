//! What a plugin gets from WASI, and the per-run limits enforced inside the store.
//!
//! Everything a run may use besides the `capstan:plugin` imports is decided here, once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Builds the WASI context of one run. **A plugin gets nothing by default:**
///
/// - **files:** no preopened directory, so every `wasi:filesystem` open fails (there is
///   no directory to open anything relative to);
/// - **environment and arguments:** none (`wasi:cli/environment` answers empty lists,
///   no initial working directory);
/// - **stdin:** closed (reads end at once);
/// - **stdout and stderr:** captured into the run's report, each capped at
///   `max_output_bytes`; writes past the cap succeed for the guest and are counted as
///   dropped;
/// - **network:** TCP, UDP and name lookup are turned off, and the socket address check
///   refuses every address, so a socket cannot be bound, connect or resolve anything
///   (the `wasi:sockets` interfaces are linked so that components importing them still
///   instantiate, and every call fails);
/// - **clocks and random:** the host's wall and monotonic clocks and a secure random
///   source — the only WASI capabilities that work.
///
/// Docker and the engine are reached through the `capstan:plugin` imports alone, each
/// call checked against the plugin's policy (see [`super::host`]).
pub fn wasi_context(stdout: CappedPipe, stderr: CappedPipe) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    b.stdout(stdout)
        .stderr(stderr)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    b.build()
}

/// An output stream that keeps the first `capacity` bytes and counts the rest.
///
/// Unlike wasmtime's `MemoryOutputPipe`, a full pipe does not fail the guest's write (a
/// Rust guest would panic on a failed `println!`): output past the cap is silently
/// dropped and counted, and the report says how much was lost.
#[derive(Clone)]
pub struct CappedPipe {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    capacity: usize,
    buffer: Vec<u8>,
    dropped: u64,
}

impl CappedPipe {
    pub fn new(capacity: usize) -> CappedPipe {
        CappedPipe {
            inner: Arc::new(Mutex::new(Captured {
                capacity,
                ..Default::default()
            })),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = c.capacity.saturating_sub(c.buffer.len());
        let keep = room.min(bytes.len());
        c.buffer.extend_from_slice(&bytes[..keep]);
        c.dropped += (bytes.len() - keep) as u64;
    }

    /// What was kept (lossy UTF-8) and how many bytes were dropped.
    pub fn take(&self) -> (String, u64) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&c.buffer).into_owned();
        c.buffer.clear();
        (text, std::mem::take(&mut c.dropped))
    }
}

/// How much one `write` may carry (what WASI streams usually grant).
const WRITE_PERMIT: usize = 64 * 1024;

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// The store's resource limiter: linear memory per plugin (from its manifest), and a
/// bound on tables and instances. Growing memory past the limit traps (rather than
/// returning -1 to `memory.grow`, which most languages turn into an abort with a less
/// clear message), and the limiter remembers it so the report can say "memory limit".
pub struct Limiter {
    memory_bytes: usize,
    /// The size asked for when the limit was hit.
    pub exceeded: Option<usize>,
}

/// Table elements a plugin may grow a table to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl Limiter {
    pub fn new(memory_mib: u32) -> Limiter {
        Limiter {
            memory_bytes: memory_mib as usize * 1024 * 1024,
            exceeded: None,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = Some(desired);
            wasmtime::bail!(
                "memory limit: the plugin tried to grow its memory to {} MiB, its limit is {} MiB",
                desired.div_ceil(1024 * 1024),
                self.memory_bytes / (1024 * 1024)
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_pipe_keeps_the_first_bytes_and_counts_the_rest() {
        let mut pipe = CappedPipe::new(5);
        pipe.write(Bytes::from_static(b"hello world")).unwrap();
        pipe.write(Bytes::from_static(b"!")).unwrap();
        assert_eq!(pipe.check_write().unwrap(), WRITE_PERMIT);
        assert_eq!(pipe.take(), ("hello".to_string(), 7));
    }
}
