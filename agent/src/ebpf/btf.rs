//! Byte offsets of the few kernel struct fields the exec fast path reads, taken from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`) when the programs are loaded.
//!
//! The layouts of `struct file`, `inode`, `mm_struct`, … change between kernel versions and
//! builds, so nothing here is hard-coded. aya parses BTF but does not expose struct members,
//! so this is a small reader of the BTF format (header, type section, string section) that
//! indexes named structs and looks members up by name, through anonymous structs and unions.
use std::{collections::HashMap, path::Path};

use countersign_ebpf::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Errors reading BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// The data is not BTF this reader understands.
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// A struct or member the fast path needs is not there.
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
/// Deepest nesting of anonymous structs/unions followed (the kernel uses two or three).
const MAX_NESTING: usize = 8;

/// One member of a struct or union.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset from the start of its struct, in bits.
    bit_offset: u32,
}

/// The types of one BTF blob, as far as this reader needs them.
#[derive(Debug, Default)]
pub struct Btf {
    /// Kind and (for modifiers and typedefs) the referenced type, by type id.
    kinds: Vec<(u32, u32)>,
    /// Members of structs and unions, by type id.
    members: HashMap<u32, Vec<Member>>,
    /// Named structs by name (the first one of each name).
    structs: HashMap<String, u32>,
    /// The parameter types of the `security_*` and `bpf_lsm_*` functions, by name.
    hook_functions: HashMap<String, Vec<u32>>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|error| BtfError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the only byte order of the kernels countersign supports).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("no little-endian BTF header".into()));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| BtfError::Malformed("type section out of bounds".into()))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| BtfError::Malformed("string section out of bounds".into()))?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or(&[]);
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut btf = Btf {
            // Type id 0 is `void`.
            kinds: vec![(0, 0)],
            ..Btf::default()
        };
        // Functions by name → prototype id, prototypes by id → where their parameters are.
        let mut functions: Vec<(String, u32)> = Vec::new();
        let mut prototypes: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut at = 0;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let id = btf.kinds.len() as u32;
            btf.kinds.push((kind, size_or_type));
            if kind == KIND_FUNC {
                let name = name(name_off);
                if name.starts_with("security_") || name.starts_with("bpf_lsm_") {
                    functions.push((name, size_or_type));
                }
            } else if kind == KIND_FUNC_PROTO {
                prototypes.insert(id, (at, vlen));
            }
            let extra = match kind {
                // int, var, decl_tag: one u32.
                1 | 14 | 17 => 4,
                // array
                3 => 12,
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(types, m + 8)?;
                        members.push(Member {
                            name: name(u32_at(types, m)?),
                            type_id: u32_at(types, m + 4)?,
                            // With kind_flag the top 8 bits are a bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    if kind == KIND_STRUCT && name_off != 0 {
                        btf.structs.entry(name(name_off)).or_insert(id);
                    }
                    btf.members.insert(id, members);
                    vlen * 12
                }
                // enum, func_proto: 8 bytes per entry.
                6 | 13 => vlen * 8,
                // datasec, enum64: 12 bytes per entry.
                15 | 19 => vlen * 12,
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag.
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                k => return Err(BtfError::Malformed(format!("unknown type kind {k}"))),
            };
            at += extra;
        }
        for (name, proto) in functions {
            let Some(&(start, count)) = prototypes.get(&proto) else {
                continue;
            };
            // Each parameter: name offset, type id.
            let params = (0..count)
                .map(|i| u32_at(types, start + i * 8 + 4))
                .collect::<Result<Vec<_>, _>>()?;
            btf.hook_functions.insert(name, params);
        }
        Ok(btf)
    }

    /// The `security_*` function that calls the LSM hook `hook`, if this kernel has it and
    /// its arguments begin with the hook's, and how many it takes besides (a program written
    /// for the hook reads the earlier program's answer after the hook's arguments: it runs
    /// there unchanged only where that is 0).
    pub fn security_function(&self, hook: &str) -> Result<(String, usize), BtfError> {
        let function = match hook {
            "bprm_check_security" => "security_bprm_check".to_owned(),
            _ => format!("security_{hook}"),
        };
        let stub = format!("bpf_lsm_{hook}");
        let hook_params = self
            .hook_functions
            .get(&stub)
            .ok_or_else(|| BtfError::Missing(format!("function {stub}")))?;
        let params = self
            .hook_functions
            .get(&function)
            .ok_or_else(|| BtfError::Missing(format!("function {function}")))?;
        let begins_alike = params.len() >= hook_params.len()
            && params
                .iter()
                .zip(hook_params)
                .all(|(&a, &b)| a == b || self.resolve(a) == self.resolve(b));
        if begins_alike {
            Ok((function, params.len() - hook_params.len()))
        } else {
            Err(BtfError::Missing(format!(
                "{function} with the arguments of {stub} ({} and {} parameters)",
                params.len(),
                hook_params.len()
            )))
        }
    }

    /// The type behind typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.kinds.get(id as usize) {
                Some(&(
                    KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG,
                    next,
                )) => id = next,
                _ => break,
            }
        }
        id
    }

    /// The byte offset of `member` in `struct name`, looking into anonymous members.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        let bits = self
            .find(id, member, 0)
            .ok_or_else(|| BtfError::Missing(format!("member {name}.{member}")))?;
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!(
                "byte-aligned member {name}.{member}"
            )));
        }
        Ok(bits / 8)
    }

    fn find(&self, id: u32, member: &str, depth: usize) -> Option<u32> {
        if depth > MAX_NESTING {
            return None;
        }
        let members = self.members.get(&id)?;
        if let Some(m) = members.iter().find(|m| m.name == member) {
            return Some(m.bit_offset);
        }
        members.iter().filter(|m| m.name.is_empty()).find_map(|m| {
            let inner = self.resolve(m.type_id);
            self.find(inner, member, depth + 1)
                .map(|off| m.bit_offset + off)
        })
    }

    /// Every offset the exec fast path needs.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            valid: 1,
            bprm_file: self.member_offset("linux_binprm", "file")?,
            file_inode: self.member_offset("file", "f_inode")?,
            inode_ino: self.member_offset("inode", "i_ino")?,
            inode_sb: self.member_offset("inode", "i_sb")?,
            sb_dev: self.member_offset("super_block", "s_dev")?,
            task_mm: self.member_offset("task_struct", "mm")?,
            mm_exe_file: self.member_offset("mm_struct", "exe_file")?,
            mm_arg_start: self.member_offset("mm_struct", "arg_start")?,
            mm_arg_end: self.member_offset("mm_struct", "arg_end")?,
            ..KernelOffsets::default()
        })
    }

    /// Adds what the network hooks read of the calling task and of a send: `task_struct`'s
    /// `flags` (io_uring threads), `group_leader` and `start_time` (a process's identity
    /// beside its pid), `msghdr.msg_name`, and the system calls a network hold can restart.
    pub fn task_offsets(&self, o: &mut KernelOffsets) -> Result<(), BtfError> {
        o.task_flags = self.member_offset("task_struct", "flags")?;
        o.task_ptrace = self.member_offset("task_struct", "ptrace")?;
        o.task_group_leader = self.member_offset("task_struct", "group_leader")?;
        o.task_start_time = self.member_offset("task_struct", "start_time")?;
        o.msghdr_name = self.member_offset("msghdr", "msg_name")?;
        o.socket_ops = self.member_offset("socket", "ops")?;
        o.proto_ops_family = self.member_offset("proto_ops", "family")?;
        o.socket_sk = self.member_offset("socket", "sk")?;
        o.unix_addr = self.member_offset("unix_sock", "addr")?;
        o.unix_path_dentry =
            self.member_offset("unix_sock", "path")? + self.member_offset("path", "dentry")?;
        o.dentry_inode = self.member_offset("dentry", "d_inode")?;
        o.unix_address_len = self.member_offset("unix_address", "len")?;
        o.unix_address_name = self.member_offset("unix_address", "name")?;
        o.unix_valid = 1;
        o.nr_net = net_syscalls();
        o.task_valid = 1;
        Ok(())
    }

    /// Adds what the self-protection hooks read: a target task's `pid` and `tgid`, an opened
    /// file's mode and dentry, a dentry's parent and name, a path's dentry, a super block's
    /// magic, an inode's type and device number.
    pub fn guard_offsets(&self, o: &mut KernelOffsets) -> Result<(), BtfError> {
        o.task_pid = self.member_offset("task_struct", "pid")?;
        o.task_tgid = self.member_offset("task_struct", "tgid")?;
        o.file_mode = self.member_offset("file", "f_mode")?;
        o.path_dentry = self.member_offset("path", "dentry")?;
        o.file_dentry = self.member_offset("file", "f_path")? + o.path_dentry;
        o.dentry_parent = self.member_offset("dentry", "d_parent")?;
        o.dentry_name =
            self.member_offset("dentry", "d_name")? + self.member_offset("qstr", "name")?;
        o.sb_magic = self.member_offset("super_block", "s_magic")?;
        o.inode_mode = self.member_offset("inode", "i_mode")?;
        o.inode_rdev = self.member_offset("inode", "i_rdev")?;
        if o.dentry_inode == 0 {
            o.dentry_inode = self.member_offset("dentry", "d_inode")?;
        }
        o.userns_level = self.member_offset("user_namespace", "level")?;
        o.guard_valid = 1;
        Ok(())
    }

    /// Adds what the listen hook reads: the address a socket is bound to.
    pub fn listen_offsets(&self, o: &mut KernelOffsets) -> Result<(), BtfError> {
        let common = self.member_offset("sock", "__sk_common")?;
        o.skc_family = common + self.member_offset("sock_common", "skc_family")?;
        o.skc_rcv_saddr = common + self.member_offset("sock_common", "skc_rcv_saddr")?;
        o.skc_num = common + self.member_offset("sock_common", "skc_num")?;
        o.skc_v6_rcv_saddr = common + self.member_offset("sock_common", "skc_v6_rcv_saddr")?;
        if o.socket_sk == 0 {
            o.socket_sk = self.member_offset("socket", "sk")?;
        }
        o.listen_valid = 1;
        Ok(())
    }

    /// Adds what fallback mode reads to find the peer of a local socket by its descriptor
    /// after a connect: the task's descriptor table, a file's socket, a `unix_sock`'s peer.
    pub fn fd_offsets(&self, o: &mut KernelOffsets) -> Result<(), BtfError> {
        o.task_files = self.member_offset("task_struct", "files")?;
        o.files_fdt = self.member_offset("files_struct", "fdt")?;
        o.fdtable_max_fds = self.member_offset("fdtable", "max_fds")?;
        o.fdtable_fd = self.member_offset("fdtable", "fd")?;
        o.file_private_data = self.member_offset("file", "private_data")?;
        o.unix_peer = self.member_offset("unix_sock", "peer")?;
        if o.inode_mode == 0 {
            o.inode_mode = self.member_offset("inode", "i_mode")?;
        }
        o.fd_valid = 1;
        Ok(())
    }

    /// What the `fentry` DNS capture reads (`host_netns_inum` is the caller's to fill in).
    pub fn dns_offsets(&self) -> Result<countersign_ebpf::DnsOffsets, BtfError> {
        Ok(countersign_ebpf::DnsOffsets {
            valid: 1,
            host_netns_inum: 0,
            skb_sk: self.member_offset("sk_buff", "sk")?,
            skb_head: self.member_offset("sk_buff", "head")?,
            skb_network_header: self.member_offset("sk_buff", "network_header")?,
            skb_len: self.member_offset("sk_buff", "len")?,
            skb_data_len: self.member_offset("sk_buff", "data_len")?,
            // `possible_net_t` holds just the `struct net *`.
            sk_net: self.member_offset("sock", "__sk_common")?
                + self.member_offset("sock_common", "skc_net")?,
            net_inum: self.member_offset("net", "ns")? + self.member_offset("ns_common", "inum")?,
        })
    }

    /// Adds the `struct pt_regs` offsets the LSM exec hook reads the syscall arguments with
    /// (x86-64 only; elsewhere the syscall tracepoints record them).
    pub fn exec_arg_regs(&self, o: &mut KernelOffsets) -> Result<(), BtfError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(BtfError::Missing(
                "a known syscall register layout on this architecture".into(),
            ));
        }
        o.regs_nr = self.member_offset("pt_regs", "orig_ax")?;
        o.regs_arg0 = self.member_offset("pt_regs", "di")?;
        o.regs_arg1 = self.member_offset("pt_regs", "si")?;
        o.regs_arg2 = self.member_offset("pt_regs", "dx")?;
        o.nr_execve = libc::SYS_execve as u32;
        o.nr_execveat = libc::SYS_execveat as u32;
        o.regs_valid = 1;
        Ok(())
    }
}

/// The system calls under which a network hook may hold (the syscall restarts after the
/// stop): `socket`, `connect`, `sendto`, `sendmsg`, `sendmmsg`, `write` and `writev` (on a
/// connected local datagram socket), `listen`, and on x86-64 their 32-bit numbers (`socketcall`, and
/// the direct ones), which any process may use through `int $0x80`.
fn net_syscalls() -> [u32; countersign_ebpf::NR_NET_SYSCALLS] {
    let mut nr = [0; countersign_ebpf::NR_NET_SYSCALLS];
    let native = [
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_sendmmsg,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_listen,
    ];
    // i386: socketcall, socket, connect, sendto, sendmsg, sendmmsg, write, writev, listen.
    let compat: &[u32] = if cfg!(target_arch = "x86_64") {
        &[102, 359, 362, 369, 370, 345, 4, 146, 363]
    } else {
        &[]
    };
    for (slot, n) in nr.iter_mut().zip(
        native
            .iter()
            .map(|&n| n as u32)
            .chain(compat.iter().copied()),
    ) {
        *slot = n;
    }
    nr
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian BTF of `strings` and the type section `types` writes (its words; it is
    /// given a name's offset in `strings`).
    fn blob(strings: &[u8], types: impl FnOnce(&dyn Fn(&str) -> u32, &mut Vec<u32>)) -> Vec<u8> {
        let name = |n: &str| {
            let pos = strings
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n.as_bytes() && w[n.len() + 1] == 0)
                .unwrap();
            (pos + 1) as u32
        };
        let mut words = Vec::new();
        types(&name, &mut words);
        let types: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    /// Builds BTF with `struct outer { int a; union { int b; struct { int c; int d; }; }; }`.
    fn synthetic() -> Vec<u8> {
        blob(b"\0int\0outer\0a\0b\0c\0d\0", |s, t| {
            // 1: int (4 bytes, 32 bits)
            t.extend([s("int"), 1 << 24, 4, 32]);
            // 2: anonymous struct { int c; int d; }
            t.extend([0, (KIND_STRUCT << 24) | 2, 8]);
            t.extend([s("c"), 1, 0]);
            t.extend([s("d"), 1, 32]);
            // 3: anonymous union { int b; struct 2; }
            t.extend([0, (KIND_UNION << 24) | 2, 8]);
            t.extend([s("b"), 1, 0]);
            t.extend([0, 2, 0]);
            // 4: typedef to the union, to check resolution through typedefs
            t.extend([0, KIND_TYPEDEF << 24, 3]);
            // 5: struct outer { int a; <typedef 4> at 8 bytes; }
            t.extend([s("outer"), (KIND_STRUCT << 24) | 2, 16]);
            t.extend([s("a"), 1, 0]);
            t.extend([0, 4, 64]);
        })
    }

    #[test]
    fn finds_members_through_anonymous_structs_and_unions() {
        let btf = Btf::parse(&synthetic()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "d").unwrap(), 12);
        assert!(matches!(
            btf.member_offset("outer", "e"),
            Err(BtfError::Missing(_))
        ));
        assert!(matches!(
            btf.member_offset("inner", "a"),
            Err(BtfError::Missing(_))
        ));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"not btf at all, not at all"),
            Err(BtfError::Malformed(_))
        ));
        let mut cut = synthetic();
        cut.truncate(40);
        assert!(Btf::parse(&cut).is_err());
    }

    /// BTF of `int`, a `const int` and six functions: `bpf_lsm_same(int, int)` and
    /// `security_same(int, const int)`, `bpf_lsm_other(int)` and `security_other(int, int)`,
    /// `bpf_lsm_fewer(int, int)` and `security_fewer(int)`.
    fn functions() -> Vec<u8> {
        let strings = b"\0int\0bpf_lsm_same\0security_same\0bpf_lsm_other\0security_other\0bpf_lsm_fewer\0security_fewer\0";
        blob(strings, |s, t| {
            // 1: int; 2: const int
            t.extend([s("int"), 1 << 24, 4, 32]);
            t.extend([0, KIND_CONST << 24, 1]);
            // 3: int (int, int); 4: int (int, const int); 5: int (int)
            t.extend([0, (KIND_FUNC_PROTO << 24) | 2, 1, 0, 1, 0, 1]);
            t.extend([0, (KIND_FUNC_PROTO << 24) | 2, 1, 0, 1, 0, 2]);
            t.extend([0, (KIND_FUNC_PROTO << 24) | 1, 1, 0, 1]);
            // 6..11: the functions
            t.extend([s("bpf_lsm_same"), KIND_FUNC << 24, 3]);
            t.extend([s("security_same"), KIND_FUNC << 24, 4]);
            t.extend([s("bpf_lsm_other"), KIND_FUNC << 24, 5]);
            t.extend([s("security_other"), KIND_FUNC << 24, 3]);
            t.extend([s("bpf_lsm_fewer"), KIND_FUNC << 24, 3]);
            t.extend([s("security_fewer"), KIND_FUNC << 24, 5]);
        })
    }

    /// A hook's `security_*` function is used only where it begins with the hook's
    /// arguments (qualifiers aside), and says how many more it takes.
    #[test]
    fn security_functions_must_take_the_hooks_arguments() {
        let btf = Btf::parse(&functions()).unwrap();
        assert_eq!(
            btf.security_function("same").unwrap(),
            ("security_same".to_owned(), 0)
        );
        assert_eq!(
            btf.security_function("other").unwrap(),
            ("security_other".to_owned(), 1)
        );
        let fewer = btf.security_function("fewer").unwrap_err().to_string();
        assert!(fewer.contains("1 and 2 parameters"), "{fewer}");
        assert!(matches!(
            btf.security_function("absent"),
            Err(BtfError::Missing(_))
        ));
    }

    /// On the running kernel (built with BPF LSM), the hooks countersign holds at have their
    /// `security_*` functions.
    #[test]
    fn running_kernel_security_functions() {
        let btf = Btf::from_sys_fs().expect("the running kernel's BTF");
        assert_eq!(
            btf.security_function("bprm_check_security").unwrap(),
            ("security_bprm_check".to_owned(), 0)
        );
        for hook in [
            "socket_connect",
            "socket_sendmsg",
            "unix_may_send",
            "file_open",
        ] {
            assert_eq!(
                btf.security_function(hook).unwrap(),
                (format!("security_{hook}"), 0)
            );
        }
    }

    /// The running kernel's BTF has every field the `fentry` DNS capture reads.
    #[test]
    fn running_kernel_dns_offsets() {
        let btf = Btf::from_sys_fs().expect("the running kernel's BTF");
        let o = btf.dns_offsets().expect("sk_buff, sock and net members");
        assert_eq!(o.valid, 1);
        assert!(o.skb_head > o.skb_sk && o.net_inum > 0, "{o:?}");
    }

    /// The running kernel's BTF has every field the fast path reads, at plausible places.
    #[test]
    fn running_kernel_offsets() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("no {VMLINUX_BTF}: nothing to check on this machine");
            return;
        }
        let o = Btf::from_sys_fs().unwrap().kernel_offsets().unwrap();
        assert_eq!(o.valid, 1);
        // `mm` follows a long run of scheduler state in task_struct; `s_dev` leads
        // super_block after its list head.
        assert!(o.task_mm > 256, "{o:?}");
        assert_eq!(o.sb_dev, 16, "{o:?}");
        assert!(
            o.file_inode > 0 && o.inode_sb > 0 && o.inode_ino > 0,
            "{o:?}"
        );
    }
}
