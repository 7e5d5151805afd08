//! `cargo xtask setup`: everything a fresh machine needs before the eBPF build and the VM
//! tests can run.
//!
//! The project's own files must install what it needs (a new machine has only the Rust
//! toolchains), so this step is idempotent and quick when there is nothing to do: each step
//! checks first and prints one line, `ok: ...` or `installing: ...`. `cargo xtask test` and
//! `cargo xtask vm-run` call [`setup`] before they start.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::kernels::{self, KernelId};
use crate::paths;
use crate::process::{run_captured, run_streaming};

/// The Debian packages the tests need: qemu for the guest, busybox for its userland, cpio for
/// anyone who wants to look into an initramfs by hand, the PostgreSQL server for the
/// database tests (each test runs a private server of its own), and Chromium with
/// chromedriver for the web page tests.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "cpio",
    "busybox-static",
    "postgresql",
    "chromium",
    "chromium-driver",
];

/// The bpf-linker series that works with the aya versions this workspace uses.
const BPF_LINKER_SERIES: &str = "0.13.";

/// Runs every setup step (see the module doc).
pub fn setup() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(&sysroot)?;
    ensure_debian_packages()?;
    for id in KernelId::ALL {
        let kernel = kernels::ensure_kernel(id)?;
        println!("ok: kernel {id}: {}", kernel.version);
    }
    Ok(())
}

/// `rustc +nightly --print sysroot`; the eBPF crate is built with nightly (`-Z build-std`).
pub fn nightly_sysroot() -> Result<PathBuf> {
    let out = run_captured(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
        Duration::from_secs(120),
        "nightly toolchain",
    )?;
    if !out.status.success() {
        bail!("no nightly Rust toolchain: run `rustup toolchain install nightly`");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.is_dir() {
        bail!(
            "nightly toolchain: sysroot {} does not exist: run `rustup toolchain install nightly`",
            sysroot.display()
        );
    }
    Ok(sysroot)
}

/// The nightly `rust-src` component, needed by `-Z build-std=core` for the bpf target.
fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        println!("ok: rust-src (nightly)");
        return Ok(());
    }
    println!("installing: rust-src (nightly)");
    run_streaming(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        Duration::from_secs(15 * 60),
        "rust-src",
    )?;
    if !core.is_dir() {
        bail!(
            "rust-src: installed, but {} is still missing",
            core.display()
        );
    }
    Ok(())
}

/// An LLVM "installation" made of symlinks to rustc's own libLLVM, for building bpf-linker.
pub struct LlvmPrefix {
    /// The folder to pass as `LLVM_PREFIX` (it holds `lib/`).
    pub prefix: PathBuf,
    /// LLVM's major version, e.g. 22, for bpf-linker's `llvm-<major>` feature.
    pub major: u32,
}

/// Makes `<cache>/llvm-prefix/lib/{libLLVM.so, <real name>}` point at the
/// `libLLVM.so.*` of the nightly sysroot.
///
/// bpf-linker is linked against these symlinks and finds the library through them at run
/// time (its rpath names this folder), so they are (re)made on every setup, even when
/// bpf-linker is already installed: that makes a `cargo clean` harmless.
pub fn ensure_llvm_prefix(sysroot: &Path) -> Result<LlvmPrefix> {
    let sys_lib = sysroot.join("lib");
    let mut found = None;
    for entry in fs::read_dir(&sys_lib)
        .with_context(|| format!("llvm prefix: reading {}", sys_lib.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            found = Some(name);
            break;
        }
    }
    let Some(real_name) = found else {
        bail!(
            "llvm prefix: no libLLVM.so.* in {} (is the nightly toolchain complete?)",
            sys_lib.display()
        );
    };
    let major = llvm_major(&real_name)
        .with_context(|| format!("llvm prefix: no LLVM version in file name {real_name}"))?;
    let real = sys_lib.join(&real_name);

    let prefix = paths::cache_dir().join("llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("llvm prefix: creating {}", lib.display()))?;
    for link_name in ["libLLVM.so", real_name.as_str()] {
        let link = lib.join(link_name);
        if fs::read_link(&link).ok().as_deref() == Some(real.as_path()) {
            continue;
        }
        // A stale link (older nightly) or a file: replace it.
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).with_context(|| {
            format!(
                "llvm prefix: linking {} to {}",
                link.display(),
                real.display()
            )
        })?;
    }
    Ok(LlvmPrefix { prefix, major })
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM.so.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `bpf-linker --version`, if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = run_captured(
        Command::new("bpf-linker").arg("--version"),
        Duration::from_secs(60),
        "bpf-linker",
    )
    .ok()?;
    if !out.status.success() {
        return None;
    }
    // "bpf-linker 0.13.0"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// bpf-linker 0.13, built against rustc's own libLLVM (no system LLVM is needed).
fn ensure_bpf_linker(sysroot: &Path) -> Result<()> {
    let llvm = ensure_llvm_prefix(sysroot)?;
    if let Some(version) = bpf_linker_version()
        && version.starts_with(BPF_LINKER_SERIES)
    {
        println!("ok: bpf-linker {version}");
        return Ok(());
    }
    println!(
        "installing: bpf-linker {BPF_LINKER_SERIES}x (llvm-{}, LLVM_PREFIX={})",
        llvm.major,
        llvm.prefix.display()
    );
    run_streaming(
        paths::cargo()
            .env("LLVM_PREFIX", &llvm.prefix)
            .args(["install", "bpf-linker", "--force", "--version"])
            .arg(format!("^{}", BPF_LINKER_SERIES.trim_end_matches('.')))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", llvm.major)),
        Duration::from_secs(45 * 60),
        "bpf-linker",
    )?;
    match bpf_linker_version() {
        Some(version) if version.starts_with(BPF_LINKER_SERIES) => Ok(()),
        Some(version) => bail!("bpf-linker: installed, but `bpf-linker --version` says {version}"),
        None => bail!(
            "bpf-linker: installed, but `bpf-linker --version` does not run (is cargo's bin folder on PATH?)"
        ),
    }
}

/// Whether dpkg says `package` is installed.
fn deb_installed(package: &str) -> Result<bool> {
    let out = run_captured(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", package]),
        Duration::from_secs(60),
        "Debian packages",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Whether this process runs as root (the owner of /proc/self is the effective uid).
pub fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `apt-get update` (root only), with a timeout on the whole run and on each connection.
pub fn apt_get_update_host() -> Result<()> {
    run_streaming(
        Command::new("apt-get")
            .args(APT_NETWORK_OPTIONS)
            .args(["-q", "update"]),
        Duration::from_secs(15 * 60),
        "apt-get update",
    )
}

/// apt options that bound each network connection.
pub const APT_NETWORK_OPTIONS: &[&str] = &[
    "-o",
    "Acquire::http::Timeout=60",
    "-o",
    "Acquire::https::Timeout=60",
    "-o",
    "Acquire::Retries=3",
];

/// The Debian packages in [`DEBIAN_PACKAGES`].
fn ensure_debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        if !deb_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        println!("ok: Debian packages {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!("missing Debian packages: run `sudo apt-get install -y {list}`");
    }
    println!("installing: Debian packages {list}");
    apt_get_update_host()?;
    run_streaming(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(APT_NETWORK_OPTIONS)
            .args(["-q", "install", "-y"])
            .args(&missing),
        Duration::from_secs(30 * 60),
        "apt-get install",
    )?;
    for package in &missing {
        if !deb_installed(package)? {
            bail!("Debian packages: {package} is still not installed after apt-get install");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19.1"), Some(19));
        assert_eq!(llvm_major("libLLVM.so."), None);
    }
}
