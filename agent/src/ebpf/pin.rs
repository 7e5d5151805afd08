//! The pin directory on bpffs: maps pinned by name (aya does that at load), and the links,
//! so that the hooks and the held tasks' state outlive the daemon process. A daemon killed
//! with SIGKILL leaves enforcement in place and held tasks held; the next daemon adopts
//! them. Only a stop with `on_stop: off` (or `countersign off`) removes the pins.
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};

use super::KernelError;

/// Where bpffs is mounted when nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Makes sure `dir` exists on a bpf filesystem, mounting bpffs at its usual place if needed.
pub fn prepare(dir: &Path) -> Result<(), KernelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| KernelError::Io { path, error }
    };
    if dir.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
        std::fs::create_dir_all(BPFFS_MOUNT).map_err(io(Path::new(BPFFS_MOUNT)))?;
        nix::mount::mount(
            Some("bpffs"),
            BPFFS_MOUNT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| KernelError::Io {
            path: BPFFS_MOUNT.into(),
            error: e.into(),
        })?;
    }
    std::fs::create_dir_all(links_dir(dir)).map_err(io(dir))?;
    if !is_bpffs(dir) {
        return Err(KernelError::Io {
            path: dir.to_path_buf(),
            error: std::io::Error::other("the pin directory is not on a bpf filesystem (bpffs)"),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn links_dir(dir: &Path) -> PathBuf {
    dir.join("links")
}

/// Why the maps pinned in `dir` cannot be taken over by a daemon loading `object`: one that
/// exists there with another type, key or value size (an earlier version with another kernel
/// state layout). `None`: nothing pinned, or every pinned map fits.
#[must_use]
pub fn incompatible(dir: &Path, object: &[u8]) -> Option<String> {
    let obj = aya_obj::Object::parse(object).ok()?;
    for name in countersign_ebpf::PINNED_MAPS {
        let Ok(data) = aya::maps::MapData::from_pin(dir.join(name)) else {
            continue;
        };
        let (Ok(info), Some(want)) = (data.info(), obj.maps.get(name)) else {
            continue;
        };
        let (got_type, got_key, got_value) = (
            info.map_type().map_or(u32::MAX, |t| t as u32),
            info.key_size(),
            info.value_size(),
        );
        if (got_type, got_key, got_value) != (want.map_type(), want.key_size(), want.value_size()) {
            return Some(format!(
                "{name} is pinned with type {got_type}, {got_key}-byte keys and {got_value}-byte values; this version's has type {}, {}-byte keys and {}-byte values",
                want.map_type(),
                want.key_size(),
                want.value_size()
            ));
        }
    }
    None
}

/// Whether an earlier daemon left pinned links behind (`on_stop: keep`, or killed).
pub fn has_previous_links(dir: &Path) -> bool {
    std::fs::read_dir(links_dir(dir)).is_ok_and(|mut d| d.next().is_some())
}

/// Pins `links` (program name, link) in place of whatever an earlier daemon pinned.
pub fn pin_links(
    dir: &Path,
    links: Vec<(&'static str, FdLink)>,
) -> Result<Vec<PinnedLink>, KernelError> {
    let ldir = links_dir(dir);
    let mut pinned = Vec::new();
    for (name, link) in links {
        let path = ldir.join(name);
        unpin_earlier(&path, name)?;
        let link = link.pin(&path).map_err(|e| KernelError::Io {
            path: path.clone(),
            error: std::io::Error::other(e),
        })?;
        pinned.push(link);
    }
    Ok(pinned)
}

/// Removes an earlier daemon's pin of program `name` at `path`: that detaches its program
/// (this daemon's is attached already).
fn unpin_earlier(path: &Path, name: &str) -> Result<(), KernelError> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(program = name, "replaced the program of an earlier daemon"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(KernelError::Io {
                path: path.to_path_buf(),
                error,
            });
        }
    }
    Ok(())
}

/// Pins links this daemon made itself (program name, link descriptor) like [`pin_links`],
/// with `pin` (the `bpf` system call's `BPF_OBJ_PIN`).
pub fn pin_raw_links(
    dir: &Path,
    links: Vec<(&'static str, std::os::fd::OwnedFd)>,
    pin: impl Fn(std::os::fd::BorrowedFd<'_>, &Path) -> std::io::Result<()>,
) -> Result<Vec<PinnedLink>, KernelError> {
    use std::os::fd::AsFd as _;
    let ldir = links_dir(dir);
    let mut pinned = Vec::new();
    for (name, link) in links {
        let path = ldir.join(name);
        unpin_earlier(&path, name)?;
        let io = |error| KernelError::Io {
            path: path.clone(),
            error,
        };
        pin(link.as_fd(), &path).map_err(io)?;
        pinned.push(PinnedLink::from_pin(&path).map_err(|e| io(std::io::Error::other(e)))?);
    }
    Ok(pinned)
}

/// Removes pinned links whose program is not in `keep` (an earlier daemon's, in another mode).
pub fn remove_other_links(dir: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(links_dir(dir)) else {
        return;
    };
    for e in entries.flatten() {
        if !keep.iter().any(|k| e.file_name() == *k) {
            tracing::info!(link = %e.path().display(), "removing a program of an earlier daemon");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes what a daemon pinned in `dir` without its link handles (`countersign off`, no
/// daemon running): the links' pins (detaching the programs, which nothing else holds) and
/// the maps'.
pub fn remove_pins(dir: &Path) {
    remove_all(dir, Vec::new());
}

/// Removes every pin: the links (detaching the programs) and the maps (`on_stop: off`).
pub fn remove_all(dir: &Path, links: Vec<PinnedLink>) {
    for link in links {
        if let Ok(fd) = link.unpin() {
            drop(fd);
        }
    }
    let _ = std::fs::remove_dir_all(links_dir(dir));
    for name in countersign_ebpf::PINNED_MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}
