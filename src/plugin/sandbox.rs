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

use super::budget::{HostBudget, LimitError};

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
/// call checked against the plugin's policy (see [`super::host`]). The one way out is
/// `wasi:http` (not part of this context): HTTP(S) to the origins of the manifest's
/// `[policy] outbound`, every request checked by the host (see [`super::host::http`]).
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
/// dropped and counted, and the report says how much was lost. What it keeps is charged
/// to the run's host memory ([`HostBudget`]); a write that does not fit there fails the
/// run.
#[derive(Clone)]
pub struct CappedPipe {
    inner: Arc<Mutex<Captured>>,
    budget: Arc<HostBudget>,
    /// `stdout` or `stderr`, for the limit's message.
    what: &'static str,
}

#[derive(Default)]
struct Captured {
    capacity: usize,
    buffer: Vec<u8>,
    dropped: u64,
}

impl CappedPipe {
    pub fn new(what: &'static str, capacity: usize, budget: Arc<HostBudget>) -> CappedPipe {
        CappedPipe {
            inner: Arc::new(Mutex::new(Captured {
                capacity,
                ..Default::default()
            })),
            budget,
            what,
        }
    }

    fn push(&self, bytes: &[u8]) -> Result<(), LimitError> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = c.capacity.saturating_sub(c.buffer.len());
        let mut keep = room.min(bytes.len());
        let charged = if keep > 0 {
            self.budget.keep(self.what, keep)
        } else {
            Ok(())
        };
        if charged.is_err() {
            keep = 0;
        }
        c.buffer.extend_from_slice(&bytes[..keep]);
        c.dropped += (bytes.len() - keep) as u64;
        charged
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
        self.push(&bytes)
            .map_err(|e| StreamError::Trap(wasmtime::Error::new(e)))
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
        Poll::Ready(
            self.push(buf)
                .map(|()| buf.len())
                .map_err(std::io::Error::other),
        )
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

/// The store's resource limiter: **one budget for the whole instance**, from the
/// plugin's `memory_mib`.
///
/// A component may hold several core instances, each with its own linear memories and
/// tables (the pooling allocator allows [`MAX_MEMORIES`] memories and [`MAX_TABLES`]
/// tables per component): a limit checked per memory would let each of them grow to
/// `memory_mib`. So every memory and table is summed — wasmtime asks the limiter for each
/// one's initial size when it is created and for each growth after — and the sum of all
/// memories' bytes and all tables' elements (at [`TABLE_ELEMENT_BYTES`] each) is held to
/// `memory_mib`. Growing past it traps (rather than returning -1 to `memory.grow`, which
/// most languages turn into an abort with a less clear message), and the limiter
/// remembers it so the report can say "memory limit".
pub struct Limiter {
    memory_bytes: usize,
    /// Bytes of every memory and table of the instance, as granted so far.
    used: usize,
    /// The last growth granted, taken back if wasmtime then fails to perform it.
    pending: usize,
    /// What the instance would have used when the limit was hit.
    pub exceeded: Option<usize>,
}

/// Table elements one table may grow to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// What the limiter charges for one table element (a function reference: a pointer).
pub const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();
/// Linear memories one component may hold, for the pooling allocator and the limiter.
pub const MAX_MEMORIES: usize = 4;
/// Tables one component may hold, for the pooling allocator and the limiter.
pub const MAX_TABLES: usize = 8;
/// Core instances one component may hold, for the pooling allocator and the limiter.
pub const MAX_CORE_INSTANCES: usize = 32;

impl Limiter {
    pub fn new(memory_mib: u32) -> Limiter {
        Limiter {
            memory_bytes: memory_mib as usize * 1024 * 1024,
            used: 0,
            pending: 0,
            exceeded: None,
        }
    }

    /// Bytes of linear memory and tables the instance holds.
    pub fn used(&self) -> usize {
        self.used
    }

    fn grow(&mut self, what: &str, delta: usize) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(delta);
        if total > self.memory_bytes {
            self.exceeded = Some(total);
            wasmtime::bail!(
                "memory limit: growing a {what} would bring the plugin's memories and tables to {} MiB, its limit is {} MiB",
                total.div_ceil(1024 * 1024),
                self.memory_bytes / (1024 * 1024)
            );
        }
        self.used = total;
        self.pending = delta;
        Ok(true)
    }

    fn grow_failed(&mut self) {
        self.used -= std::mem::take(&mut self.pending);
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow("memory", desired.saturating_sub(current))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.grow_failed();
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.grow(
            "table",
            desired.saturating_sub(current) * TABLE_ELEMENT_BYTES,
        )
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.grow_failed();
        Ok(())
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_pipe_keeps_the_first_bytes_and_counts_the_rest() {
        let budget = Arc::new(HostBudget::new(1024));
        let mut pipe = CappedPipe::new("stdout", 5, budget.clone());
        pipe.write(Bytes::from_static(b"hello world")).unwrap();
        pipe.write(Bytes::from_static(b"!")).unwrap();
        assert_eq!(pipe.check_write().unwrap(), WRITE_PERMIT);
        assert_eq!(pipe.take(), ("hello".to_string(), 7));
        assert_eq!(budget.kept(), 5, "what it keeps is charged to the run");
    }

    #[test]
    fn a_capped_pipe_fails_the_write_that_the_run_has_no_memory_for() {
        let budget = Arc::new(HostBudget::new(8));
        budget.keep("a log record", 6).unwrap();
        let mut pipe = CappedPipe::new("stderr", 64, budget.clone());
        let e = pipe.write(Bytes::from_static(b"hello")).unwrap_err();
        assert!(matches!(e, StreamError::Trap(_)));
        assert!(
            budget.exceeded().unwrap().to_string().contains("stderr"),
            "{:?}",
            budget.exceeded()
        );
        assert_eq!(pipe.take(), (String::new(), 5));
    }

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_memory_limit_holds_for_all_memories_and_tables_together() {
        let mut l = Limiter::new(64);
        // Three memories of 30 MiB each: every one under the limit, together over it.
        assert!(l.memory_growing(0, 30 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 30 * MIB, None).unwrap());
        let e = l.memory_growing(0, 30 * MIB, None).unwrap_err();
        assert!(e.to_string().contains("limit is 64 MiB"), "{e}");
        assert_eq!(l.exceeded, Some(90 * MIB));
        assert_eq!(l.used(), 60 * MIB);
        // Growth counts what is added, and tables count too.
        assert!(l.memory_growing(30 * MIB, 33 * MIB, None).unwrap());
        // 63 MiB of memories leave 1 MiB for table elements.
        let room = MIB / TABLE_ELEMENT_BYTES;
        assert!(l.table_growing(0, room, None).unwrap());
        assert!(l.table_growing(room, room + 1, None).is_err());
        assert_eq!(l.used(), 64 * MIB);
    }

    #[test]
    fn a_growth_wasmtime_could_not_perform_is_given_back() {
        let mut l = Limiter::new(16);
        assert!(l.memory_growing(0, 10 * MIB, None).unwrap());
        assert!(l.memory_growing(10 * MIB, 16 * MIB, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("no room"))
            .unwrap();
        assert_eq!(l.used(), 10 * MIB);
        assert!(!l.table_growing(0, MAX_TABLE_ELEMENTS + 1, None).unwrap());
    }
}
