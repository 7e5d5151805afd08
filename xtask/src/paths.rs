//! Where xtask keeps things: the workspace root and the cargo target folder.
//!
//! VM scratch folders live under the target folder. What must outlive a checkout lives in the
//! user's cache folder (`$XDG_CACHE_HOME/countersign`, else `~/.cache/countersign`): the test
//! kernels (downloaded once per machine, not once per clone) and the LLVM prefix that the
//! installed `bpf-linker` loads its libLLVM through.

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest folder has a parent")
        .to_path_buf()
}

/// A `cargo` command (the one running xtask) in the workspace root.
pub fn cargo() -> std::process::Command {
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
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

/// The per-user cache that outlives checkouts.
pub fn cache_dir() -> PathBuf {
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x),
        (_, Some(h)) if !h.is_empty() => Path::new(&h).join(".cache"),
        // No home: keep it in the work tree rather than fail.
        _ => target_dir().join("cache"),
    };
    base.join("countersign")
}
