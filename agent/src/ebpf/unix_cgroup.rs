//! Fallback mode, kernels 6.7+: the cgroup programs the kernel runs before a local socket's
//! connect and before a datagram sent to one with an address (`BPF_CGROUP_UNIX_CONNECT`,
//! `BPF_CGROUP_UNIX_SENDMSG`), whatever path the call took (io_uring, the 32-bit entry).
//!
//! aya 0.14 (and its later releases) cannot load a program for these attach types: its
//! section names stop at IPv4 and IPv6. The two programs are built into the same object under
//! an IPv4 section name; this module relocates them with aya-obj, aya's own object parser,
//! against the maps aya created for the object (so they share every map with the other
//! programs), and loads and links them with the `bpf` system call. Nothing else in the
//! daemon loads programs this way.
use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::{bpf_attach_type, bpf_insn};
use countersign_ebpf as shared;

/// `bpf` commands and the program type used here (`include/uapi/linux/bpf.h`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// The programs, relocated and ready to load: (name, attach type, instructions).
pub struct Prepared {
    programs: Vec<(&'static str, u32, Vec<bpf_insn>)>,
    license: CString,
}

/// The maps aya created, by name (copies of their descriptors, open for as long as programs
/// may be relocated against them).
pub fn map_fds(ebpf: &Ebpf) -> Vec<(String, OwnedFd)> {
    ebpf.maps()
        .filter_map(|(name, map)| {
            let fd = map_fd(map)?.try_clone_to_owned().ok()?;
            Some((name.to_owned(), fd))
        })
        .collect()
}

/// Why the programs could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum UnixCgroupError {
    /// The kernel has no such attach type (before 6.7).
    #[error("the kernel has no cgroup programs for local sockets (Linux 6.7+)")]
    Unsupported,
    #[error("{0}")]
    Failed(String),
}

/// Relocates the two programs of `object` against `maps`, the maps aya created from it.
pub fn prepare(object: &[u8], maps: &[(String, OwnedFd)]) -> Result<Prepared, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing the object: {e}"))?;
    let mut fds = Vec::new();
    for (name, map) in obj.maps.clone() {
        let fd = maps
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, fd)| fd.as_raw_fd())
            .ok_or_else(|| format!("map {name} is not open"))?;
        fds.push((name, fd, map));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(
        fds.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .map_err(|e| format!("relocating maps: {e}"))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| format!("relocating calls: {e}"))?;
    let mut programs = Vec::new();
    let mut license = CString::default();
    for (name, attach) in [
        (
            shared::PROG_CG_UNIX_CONNECT,
            bpf_attach_type::BPF_CGROUP_UNIX_CONNECT,
        ),
        (
            shared::PROG_CG_UNIX_SENDMSG,
            bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG,
        ),
    ] {
        let program = obj
            .programs
            .get(name)
            .ok_or_else(|| format!("program {name} missing from the object"))?;
        license.clone_from(&program.license);
        let function = obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| format!("program {name}: function missing"))?;
        programs.push((name, attach as u32, function.instructions.clone()));
    }
    Ok(Prepared { programs, license })
}

/// The descriptor of an open map, whatever its type.
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    let data = match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::RingBuf(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::Stack(m)
        | Map::BloomFilter(m)
        | Map::SkStorage(m)
        | Map::InodeStorage(m)
        | Map::Unsupported(m) => m,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

/// Loads the programs and links them to the cgroup `cgroup`: (program, link).
pub fn attach(
    prepared: &Prepared,
    cgroup: BorrowedFd<'_>,
) -> Result<Vec<(&'static str, OwnedFd)>, UnixCgroupError> {
    let mut links = Vec::new();
    for (name, attach, insns) in &prepared.programs {
        let prog = load(name, *attach, insns, &prepared.license)?;
        let link = link_create(prog.as_fd(), cgroup, *attach)
            .map_err(|e| UnixCgroupError::Failed(format!("linking {name}: {e}")))?;
        links.push((*name, link));
    }
    Ok(links)
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf(cmd, attr)`: the new descriptor, or the error.
pub(crate) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a `bpf_attr` prefix of the command's layout, valid for the call; the
    // kernel reads (and for a load writes the log through) the pointers it holds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a descriptor the kernel just returned to us and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn load(
    name: &str,
    attach: u32,
    insns: &[bpf_insn],
    license: &CString,
) -> Result<OwnedFd, UnixCgroupError> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach,
        ..ProgLoadAttr::default()
    };
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        // Without the attach type the kernel refuses the load before verifying.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Load again with the verifier's log, to tell "unknown" from "rejected".
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            match sys_bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => Ok(owned(fd)),
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    if end == 0 {
                        return Err(UnixCgroupError::Unsupported);
                    }
                    let text = String::from_utf8_lossy(&log[..end]);
                    let tail: Vec<&str> = text.lines().rev().take(8).collect();
                    Err(UnixCgroupError::Failed(format!(
                        "the verifier refused {name}: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    )))
                }
            }
        }
        Err(e) => Err(UnixCgroupError::Failed(format!("loading {name}: {e}"))),
    }
}

fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach,
        flags: 0,
    };
    sys_bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Pins the link `link` at `path` (on the BPF file system).
pub fn pin(link: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map reference of the two programs is relocated to the descriptor given for its
    /// map, and a map the daemon did not open is an error, not a program that names fd 0.
    #[test]
    fn the_programs_name_the_maps_they_were_given() {
        let object = super::super::EBPF_OBJECT;
        let names: Vec<String> = aya_obj::Object::parse(object)
            .expect("the object parses")
            .maps
            .keys()
            .cloned()
            .collect();
        let maps: Vec<(String, OwnedFd)> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    std::fs::File::open("/dev/null")
                        .expect("a descriptor")
                        .into(),
                )
            })
            .collect();
        let fds: Vec<i32> = maps.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let prepared = prepare(object, &maps).expect("relocated");
        assert_eq!(prepared.programs.len(), 2);
        assert_eq!(prepared.license.to_str(), Ok("GPL"));
        for (name, attach, insns) in &prepared.programs {
            assert!(!insns.is_empty(), "{name}");
            assert!(
                *attach == bpf_attach_type::BPF_CGROUP_UNIX_CONNECT as u32
                    || *attach == bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG as u32
            );
            // `ld_imm64` with a map source (BPF_PSEUDO_MAP_FD 1, BPF_PSEUDO_MAP_VALUE 2).
            let mut maps_named = 0;
            for i in insns {
                if i.code == 0x18 && matches!(i.src_reg(), 1 | 2) {
                    assert!(fds.contains(&i.imm), "{name}: map fd {}", i.imm);
                    maps_named += 1;
                }
            }
            assert!(maps_named > 0, "{name} names no map");
        }
        let missing = &maps[1..];
        assert!(prepare(object, missing).is_err());
    }
}
