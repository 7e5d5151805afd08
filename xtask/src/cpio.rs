//! A writer for "newc" cpio archives, the format the kernel unpacks as an initramfs.
//!
//! Written here rather than by driving the `cpio` tool so that the archive can hold what a
//! staging folder could not without root: files owned by root, and the `/dev/console`
//! device node the kernel opens for `/init`'s standard streams. Entries are kept in a sorted
//! map, so every folder comes before its contents (the kernel needs that) and a later entry
//! at the same path replaces an earlier one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What one archive entry holds.
#[derive(Clone, Debug)]
enum Node {
    Dir {
        mode: u32,
    },
    /// A regular file whose content is read from the host when the archive is written.
    HostFile {
        source: PathBuf,
        size: u64,
        mode: u32,
    },
    /// A regular file with the given content.
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
    CharDev {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

/// An initramfs being assembled. Paths are absolute guest paths (`/bin/sh`); all entries
/// are owned by root.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

/// `/a/b/` → `a/b` (archive names carry no leading slash); rejects `..` and empty paths.
fn normalize(path: &str) -> Result<String> {
    if !path.starts_with('/') {
        bail!("initramfs path {path:?} is not absolute");
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        bail!("initramfs path {path:?} is not a plain absolute file path");
    }
    Ok(parts.join("/"))
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an entry exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Adds `node` at `path`, creating missing parent folders (mode 0755).
    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let name = normalize(path)?;
        let mut parent = String::new();
        let mut components = name.split('/').peekable();
        while let Some(component) = components.next() {
            if components.peek().is_none() {
                break;
            }
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("initramfs: cannot add {path}: /{parent} is not a folder"),
            }
        }
        if matches!(node, Node::Dir { .. })
            && matches!(self.entries.get(&name), Some(Node::Dir { .. }))
        {
            return Ok(());
        }
        self.entries.insert(name, node);
        Ok(())
    }

    /// A folder.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(path, Node::Dir { mode })
    }

    /// A file with the content of the host file `source` (followed through symlinks) and
    /// the host file's permission bits.
    pub fn host_file(&mut self, path: &str, source: &Path) -> Result<()> {
        let meta = std::fs::metadata(source)
            .with_context(|| format!("initramfs: reading {}", source.display()))?;
        if !meta.is_file() {
            bail!("initramfs: {} is not a regular file", source.display());
        }
        if meta.len() > u64::from(u32::MAX) {
            bail!("initramfs: {} is larger than 4 GiB", source.display());
        }
        use std::os::unix::fs::PermissionsExt;
        self.insert(
            path,
            Node::HostFile {
                source: source.to_path_buf(),
                size: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
            },
        )
    }

    /// A file with the given content.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        self.insert(
            path,
            Node::Bytes {
                data: data.into(),
                mode,
            },
        )
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<()> {
        self.insert(path, Node::CharDev { major, minor, mode })
    }

    /// Writes the archive (uncompressed newc) to `out`.
    pub fn write_to(&self, out: &Path) -> Result<()> {
        let file =
            File::create(out).with_context(|| format!("initramfs: creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        for (ino, (name, node)) in (1u32..).zip(&self.entries) {
            write_entry(&mut w, ino, name, node)
                .with_context(|| format!("initramfs: writing /{name} to {}", out.display()))?;
        }
        write_header(&mut w, 0, 0, 1, 0, 0, 0, "TRAILER!!!")
            .and_then(|()| w.flush())
            .with_context(|| format!("initramfs: writing {}", out.display()))
    }
}

/// Writes one entry: header, name, data, with the 4-byte alignment newc requires.
fn write_entry(w: &mut impl Write, ino: u32, name: &str, node: &Node) -> Result<()> {
    match node {
        Node::Dir { mode } => write_header(w, ino, S_IFDIR | mode, 2, 0, 0, 0, name)?,
        Node::Bytes { data, mode } => {
            write_header(w, ino, S_IFREG | mode, 1, data.len() as u32, 0, 0, name)?;
            w.write_all(data)?;
            pad(w, data.len() as u64)?;
        }
        Node::Symlink { target } => {
            write_header(w, ino, S_IFLNK | 0o777, 1, target.len() as u32, 0, 0, name)?;
            w.write_all(target.as_bytes())?;
            pad(w, target.len() as u64)?;
        }
        Node::CharDev { major, minor, mode } => {
            write_header(w, ino, S_IFCHR | mode, 1, 0, *major, *minor, name)?;
        }
        Node::HostFile { source, size, mode } => {
            write_header(w, ino, S_IFREG | mode, 1, *size as u32, 0, 0, name)?;
            let file =
                File::open(source).with_context(|| format!("opening {}", source.display()))?;
            let copied = io::copy(&mut file.take(*size), w)
                .with_context(|| format!("copying {}", source.display()))?;
            if copied != *size {
                bail!("{} shrank while it was being archived", source.display());
            }
            pad(w, *size)?;
        }
    }
    Ok(())
}

/// The 110-byte newc header followed by the NUL-terminated name, padded to 4 bytes.
#[allow(clippy::too_many_arguments)]
fn write_header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev_major: u32,
    rdev_minor: u32,
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() as u32 + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{filesize:08x}{:08x}{:08x}\
         {rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + u64::from(namesize))
}

/// Zero bytes up to the next multiple of 4 after `len` bytes.
fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..n as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_paths_are_checked() {
        let mut a = Archive::new();
        a.bytes("/etc/passwd", "root:x:0:0::/:/bin/sh\n", 0o644)
            .unwrap();
        a.symlink("/bin/sh", "/bin/busybox").unwrap();
        let names: Vec<&String> = a.entries.keys().collect();
        assert_eq!(names, ["bin", "bin/sh", "etc", "etc/passwd"]);
        assert!(a.bytes("relative", "", 0o644).is_err());
        assert!(a.bytes("/a/../b", "", 0o644).is_err());
        assert!(a.bytes("/bin/sh/x", "", 0o644).is_err());
    }

    #[test]
    fn entries_are_aligned() {
        let mut a = Archive::new();
        a.bytes("/x", "abc", 0o644).unwrap();
        let path = std::env::temp_dir().join(format!("xtask-cpio-test-{}", std::process::id()));
        a.write_to(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // header (110) + "x\0" → 112, + "abc" + 1 pad → 116, + trailer header + name.
        assert_eq!(&data[..6], b"070701");
        assert_eq!(&data[112..115], b"abc");
        assert_eq!(&data[116..122], b"070701");
        assert_eq!(data.len() % 4, 0);
    }
}
