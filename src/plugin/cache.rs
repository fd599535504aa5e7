//! The compile cache: each component is compiled once and kept on disk.
//!
//! Compiling a component with Cranelift takes 50–150 ms; loading the compiled form takes
//! a fraction of a millisecond. Entries live under `<data_dir>/plugin-cache/`, named
//! `<engine>-<wasm>.cwasm` where `<engine>` is a hash of
//! [`wasmtime::Engine::precompile_compatibility_hash`] (wasmtime version, target and
//! every setting that changes compiled code) and `<wasm>` the `.wasm`'s SHA-256. A
//! changed engine or plugin therefore misses the cache instead of loading stale code; an
//! entry wasmtime refuses anyway is compiled again and replaced.
//!
//! Loading compiled code skips validation, so the cache directory must be as private as
//! the rest of the data directory (mode 0700, see [`crate::store`]); entries are written
//! to a temporary file and renamed into place, so a crash never leaves half an entry.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Deserialised from the cache.
    Cached,
    /// Compiled now (and written to the cache).
    Compiled,
}

/// The on-disk compile cache.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

impl CompileCache {
    pub fn new(engine: &wasmtime::Engine, dir: PathBuf) -> CompileCache {
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        CompileCache {
            dir,
            engine_key: format!("{:016x}", h.finish()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{}-{sha256}.cwasm", self.engine_key))
    }

    /// The component for `wasm` (whose SHA-256 is `sha256`, hex), from the cache or
    /// compiled now.
    pub fn load(
        &self,
        engine: &wasmtime::Engine,
        wasm: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<(Component, Loaded)> {
        let path = self.entry(sha256);
        if path.exists() {
            // SAFETY: entries are written only by `store` below, from `Component::serialize`
            // of this engine's configuration (the file name carries its compatibility
            // hash), into the engine's private data directory.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok((c, Loaded::Cached)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compile cache entry refused; compiling again");
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the compile cache entry");
        }
        Ok((component, Loaded::Compiled))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Removes the entries of a `.wasm` (any engine).
    pub fn forget(&self, sha256: &str) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let suffix = format!("-{sha256}.cwasm");
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().ends_with(&suffix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
