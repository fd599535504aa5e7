//! What more than one benchmark needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use capstan::config::{ConfigFile, Settings};
use capstan::engine::{Engine, PassphraseInput};

/// An engine on a fresh data directory `dir` (created with its vault), default settings.
#[allow(dead_code)] // not every benchmark opens an engine
pub fn engine_in(dir: &Path) -> Arc<Engine> {
    let settings =
        Settings::resolve(&ConfigFile::default(), Some(dir.to_path_buf()), None, None).unwrap();
    Arc::new(
        Engine::open_or_init(settings, &PassphraseInput::default())
            .unwrap()
            .0,
    )
}

/// The `.wasm` of a plugin crate in `plugins/`, or a panic saying how to build it.
pub fn wasm_path(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release",
        p.display()
    );
    p
}
