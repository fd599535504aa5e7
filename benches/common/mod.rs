//! What more than one benchmark needs.

use std::path::{Path, PathBuf};

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
