//! Builds the eBPF programs (agent-ebpf, bpf target, nightly) into OUT_DIR.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&metadata)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("agent-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "countersign-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
