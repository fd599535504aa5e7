//! Shared helpers for the integration tests: the test infrastructure's facts, the
//! capstan binary, scratch data directories.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Facts written by `scripts/testinfra up` to `target/testinfra/infra.env`.
pub struct Infra {
    vars: HashMap<String, String>,
}

impl Infra {
    /// The running test infrastructure. Panics with what to do when it is not up: a test
    /// that needs sshd or the TLS endpoint must fail, never skip, when they are missing.
    pub fn get() -> &'static Infra {
        static INFRA: OnceLock<Infra> = OnceLock::new();
        INFRA.get_or_init(|| {
            let dir = std::env::var_os("CAPSTAN_TESTINFRA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra"));
            let path = dir.join("infra.env");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "test infrastructure is not set up ({}: {e}): run `scripts/testinfra up` (the README's test command does)",
                    path.display()
                )
            });
            let vars = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            Infra { vars }
        })
    }

    /// One fact; panics naming the key when the infrastructure did not write it.
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("infra.env has no {key}: re-run `scripts/testinfra up`"))
    }

    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.var(key))
    }
}

/// The `capstan` binary built for these tests.
pub fn capstan_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capstan"))
}

/// A scratch data directory with a key-file vault.
pub struct DataDir {
    pub dir: tempfile::TempDir,
}

impl DataDir {
    /// An empty directory (no vault yet).
    pub fn empty() -> DataDir {
        DataDir {
            dir: tempfile::tempdir().expect("create a temp dir"),
        }
    }

    /// A directory with a key-file vault created by `capstan vault init`.
    pub fn with_vault() -> DataDir {
        let d = DataDir::empty();
        let out = d.capstan(&["vault", "init"]);
        assert_success(&out, "vault init");
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A `capstan` command pointed at this data directory, with a clean environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(capstan_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CAPSTAN_DATA_DIR", self.data())
            .env("CAPSTAN_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    pub fn capstan(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run capstan")
    }

    /// Runs capstan with `input` on stdin.
    pub fn capstan_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capstan");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().expect("wait for capstan")
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

#[track_caller]
pub fn assert_failure_says(o: &Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success:\n{}",
        stdout(o)
    );
    let err = stderr(o);
    assert!(
        err.contains(needle),
        "expected stderr to contain {needle:?}, got:\n{err}"
    );
}
