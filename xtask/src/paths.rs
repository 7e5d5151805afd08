//! Where xtask keeps things: the workspace root and the cargo target folder.
//!
//! Everything xtask downloads or builds (LLVM prefix for bpf-linker, test kernels, VM
//! scratch folders) lives under the target folder, so `cargo clean` resets it and nothing
//! escapes the work tree.

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest folder has a parent")
        .to_path_buf()
}

/// The cargo target folder: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// `<target>/vm`: kernels, private apt state and per-run scratch folders.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}
