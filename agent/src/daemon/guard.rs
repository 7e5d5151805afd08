//! Self-protection, the daemon's part: which files are countersign's (the kernel refuses a
//! labelled task's changes to them, see `agent-ebpf/src/guard.rs`), and how the attempts the
//! kernel reports read in the records.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use countersign_ebpf as shared;
use shared::{FileKey, GUARD_ANCESTOR, GUARD_CGROUP, GUARD_DIR, GUARD_FILE, GUARD_SECRET};

use super::{
    config::{DaemonConfig, OnTamper},
    enrich::{self, FileId},
};
use crate::paths;

/// The daemon's systemd unit.
const UNIT_NAME: &str = "countersign.service";
/// Where systemd reads units from.
/// What says which resolvers the host asks (guarded where names are learnt).
const RESOLVER_FILES: [(&str, u32); 4] = [
    ("/etc/resolv.conf", GUARD_FILE),
    ("/etc/systemd/resolved.conf", GUARD_FILE),
    ("/etc/systemd/resolved.conf.d", GUARD_DIR),
    ("/run/systemd/resolved.conf.d", GUARD_DIR),
];

const SYSTEMD_UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Where the system finds programs it starts later, as root (or as the user who asked) and
/// unlabelled, from files a labelled task could write: the default of `run_later`. A file
/// dropped in one of these runs outside every hold — a minute later (cron), at the next
/// login, package run, device event or boot. Directories are guarded with the directories
/// directly inside them (`multi-user.target.wants`, `ssh.service.d`, cron's `crontabs`).
pub const RUN_LATER: [&str; 62] = [
    // Scheduled jobs: cron's tables and spools (`crontab` writes a user's there), `at`'s
    // spools, anacron.
    "/etc/crontab",
    "/etc/cron.d",
    "/etc/cron.hourly",
    "/etc/cron.daily",
    "/etc/cron.weekly",
    "/etc/cron.monthly",
    "/etc/cron.yearly",
    "/etc/anacrontab",
    "/var/spool/cron",
    "/var/spool/at",
    // The service manager: units (timers, paths, `*.wants`, drop-ins), for the system and
    // for every user's manager, and the generators it runs at each reload and boot.
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/etc/systemd/user",
    "/run/systemd/user",
    "/usr/lib/systemd/user",
    "/lib/systemd/user",
    "/etc/systemd/system-generators",
    "/usr/local/lib/systemd/system-generators",
    "/usr/lib/systemd/system-generators",
    "/lib/systemd/system-generators",
    "/etc/systemd/user-generators",
    "/usr/lib/systemd/user-generators",
    // Boot scripts.
    "/etc/init.d",
    "/etc/rc.local",
    // The dynamic linker: a library named there is loaded into every program started
    // afterwards, root's services included.
    "/etc/ld.so.preload",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.cache",
    // Device events: a udev rule's `RUN` runs as root.
    "/etc/udev/rules.d",
    "/run/udev/rules.d",
    "/usr/lib/udev/rules.d",
    "/lib/udev/rules.d",
    // Modules loaded at boot (`install` lines run commands).
    "/etc/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
    "/etc/modules-load.d",
    "/etc/modules",
    // Logins: PAM (`pam_exec` runs a program at every login and `sudo`), the login shells'
    // scripts, the message of the day's scripts.
    "/etc/pam.d",
    "/etc/environment",
    "/etc/security/pam_env.conf",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/update-motd.d",
    "/etc/xdg/autostart",
    // root's own: the next time a person logs in or opens a shell as root.
    "/root/.bashrc",
    "/root/.profile",
    "/root/.bash_profile",
    "/root/.bash_login",
    "/root/.config/systemd/user",
    // The service manager's environment for every service (`DefaultEnvironment=LD_PRELOAD`)
    // and every user's.
    "/etc/systemd/system.conf",
    "/etc/systemd/system.conf.d",
    "/etc/systemd/user.conf",
    "/etc/systemd/user.conf.d",
    "/etc/environment.d",
    // Programs other root jobs run: the package manager's hooks (run by the next `apt`,
    // unattended upgrades included), log rotation's scripts, network hooks.
    "/etc/apt/apt.conf.d",
    "/etc/logrotate.d",
    "/etc/network/if-up.d",
    "/etc/NetworkManager/dispatcher.d",
];

/// Local services that act as root for whoever reaches them and can stop countersign or run
/// anything unlabelled: systemd (its private socket and the system bus, through which
/// `systemctl stop countersign` goes) and the container runtimes. A labelled task's connect
/// to one is held for a human unless its label's policy names the socket (`unix:` rules).
pub const DEPUTY_SOCKETS: [&str; 7] = [
    "/run/systemd/private",
    "/run/dbus/system_bus_socket",
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/run/crio/crio.sock",
];

/// Where each user's service manager listens, under `/run/user/UID`: its private socket and
/// the user's bus. `systemd-run --user` and `systemctl --user` go there and start anything
/// as that user, unlabelled; an unprivileged agent needs no root for that.
const USER_DEPUTY_SOCKETS: [&str; 2] = ["systemd/private", "bus"];

/// Users' runtime directories read, at most.
const MAX_USER_RUNTIME_DIRS: usize = 256;

/// The deputy sockets' paths: [`DEPUTY_SOCKETS`] and, for every user with a runtime
/// directory now, [`USER_DEPUTY_SOCKETS`] (whether they exist or not).
#[must_use]
pub fn deputy_paths() -> Vec<PathBuf> {
    deputy_paths_in(Path::new("/run/user"))
}

fn deputy_paths_in(run_user: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = DEPUTY_SOCKETS.iter().map(PathBuf::from).collect();
    let users = std::fs::read_dir(run_user).into_iter().flatten().flatten();
    let users = users.filter(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
    });
    for user in users.take(MAX_USER_RUNTIME_DIRS) {
        out.extend(USER_DEPUTY_SOCKETS.iter().map(|s| user.path().join(s)));
    }
    out
}

/// The deputy sockets that exist now, as the kernel knows them: (device, inode).
#[must_use]
pub fn deputies() -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = deputy_paths()
        .iter()
        .filter_map(|p| enrich::file_id(p))
        .map(|f| (f.kernel_dev(), f.ino))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What the kernel is given at load.
#[must_use]
pub fn settings(config: &DaemonConfig) -> shared::GuardSettings {
    let exe = enrich::file_id(Path::new("/proc/self/exe"));
    shared::GuardSettings {
        kill: u32::from(config.on_tamper == OnTamper::Kill),
        _pad: 0,
        self_dev: exe.map_or(0, FileId::kernel_dev),
        self_ino: exe.map_or(0, |f| f.ino),
        raw_majors: raw_majors(&std::fs::read_to_string("/proc/devices").unwrap_or_default()),
    }
}

/// The character devices through which a disk is read or written beneath its file systems
/// (as `/proc/devices` names them): SCSI generic, block SCSI generic, NVMe controllers and
/// their generic namespaces, raw flash. A labelled task opens none (nor any block device).
const RAW_DISK_DRIVERS: [&str; 6] = ["sg", "bsg", "nvme", "nvme-generic", "mtd", "ubi"];

/// The first [`shared::RAW_MAJORS`] of [`raw_major_list`], for the kernel's settings at load.
#[must_use]
pub fn raw_majors(devices: &str) -> [u32; shared::RAW_MAJORS] {
    let mut out = [0; shared::RAW_MAJORS];
    for (slot, major) in out.iter_mut().zip(raw_major_list(devices)) {
        *slot = major;
    }
    out
}

/// The majors of [`RAW_DISK_DRIVERS`] in `/proc/devices` text (its character devices).
#[must_use]
pub fn raw_major_list(devices: &str) -> Vec<u32> {
    let chars = devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Block devices"));
    let found = chars.filter_map(|l| {
        let mut f = l.split_whitespace();
        let major = f.next()?.parse::<u32>().ok()?;
        RAW_DISK_DRIVERS
            .contains(&f.next()?)
            .then_some(major)
            .filter(|&m| m != 0)
    });
    found.collect()
}

/// [`raw_major_list`] of the running kernel.
fn raw_majors_now() -> Vec<u32> {
    raw_major_list(&std::fs::read_to_string("/proc/devices").unwrap_or_default())
}

/// A capability's name (`CAP_SYS_RAWIO`), for the records.
#[must_use]
pub fn capability_name(cap: u16) -> String {
    let name = match cap {
        9 => "CAP_LINUX_IMMUTABLE",
        16 => "CAP_SYS_MODULE",
        17 => "CAP_SYS_RAWIO",
        22 => "CAP_SYS_BOOT",
        25 => "CAP_SYS_TIME",
        27 => "CAP_MKNOD",
        33 => "CAP_MAC_ADMIN",
        n => return format!("capability {n}"),
    };
    name.to_owned()
}

/// countersign's own files and directories as the kernel knows them, and their paths (for
/// the records).
#[derive(Debug, Default)]
pub struct Guarded {
    flags: HashMap<FileKey, u32>,
    paths: HashMap<FileKey, PathBuf>,
    /// The raw disk majors given to the kernel (see [`raw_majors`]).
    raw_majors: Vec<u32>,
    /// The entries that are there only as `run_later` places (not countersign's own).
    later: HashSet<FileKey>,
    /// The `run_later` places that did not exist when last looked at.
    missing: Vec<PathBuf>,
}

/// Directories read inside one `run_later` directory, at most (the map holds 1,024 entries
/// in all).
const MAX_RUN_LATER_SUBDIRS: usize = 128;

impl Guarded {
    /// Everything of `config`'s that exists now: the configuration and policy files, the
    /// host key (a secret) and its public half, the decision log, the spool, the pins, the
    /// sockets and lock, the approver's and collector's keys and tokens (secrets), the
    /// executable, the systemd unit and its drop-ins, the `protected_dirs`, and every
    /// directory on the way to them.
    #[must_use]
    pub fn of(config: &DaemonConfig, policy_paths: &[PathBuf]) -> Self {
        let mut g = Self::default();
        if let Some(f) = &config.config_file {
            g.add(f, GUARD_FILE);
        }
        for p in policy_paths {
            let flag = if p.is_dir() { GUARD_DIR } else { GUARD_FILE };
            g.add(p, flag);
        }
        g.add(&config.host_key, GUARD_SECRET);
        g.add(&pub_key_path(&config.host_key), GUARD_FILE);
        g.add(&config.decision_log, GUARD_FILE);
        g.add(&config.spool_dir, GUARD_DIR);
        g.add(&config.bpf_pin_dir, GUARD_DIR);
        for name in [
            paths::CONTROL_SOCKET,
            paths::LAUNCH_SOCKET,
            paths::LOCK_FILE,
        ] {
            g.add(&config.socket_dir.join(name), GUARD_FILE);
        }
        if let Some(a) = &config.approver {
            if let Some(t) = &a.enroll_token_file {
                g.add(t, GUARD_SECRET);
            }
            g.add(&a.state, GUARD_SECRET);
            for f in [&a.ca_file, &a.public_key].into_iter().flatten() {
                g.add(f, GUARD_FILE);
            }
        }
        if let Some(c) = &config.collector {
            g.add(&c.public_key, GUARD_FILE);
            if let Some(f) = &c.ca_file {
                g.add(f, GUARD_FILE);
            }
        }
        if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
            g.add(&exe, GUARD_FILE);
        }
        // The unit that starts the daemon, and its drop-ins, wherever systemd looks.
        for dir in SYSTEMD_UNIT_DIRS {
            let unit = Path::new(dir).join(UNIT_NAME);
            g.add(&unit, GUARD_FILE);
            let mut dropins = unit.into_os_string();
            dropins.push(".d");
            g.add(Path::new(&dropins), GUARD_DIR);
        }
        for d in &config.protected_dirs {
            g.add(d, GUARD_DIR);
        }
        g.add_run_later(&config.run_later);
        // Where destination names are learnt, the answers of the host's resolvers are
        // trusted: the files that say which resolvers those are may not change either (a
        // labelled root could point the host at a resolver of its own). A symlink is guarded
        // as itself and as what it names.
        if config.dns.enabled {
            for (path, flag) in RESOLVER_FILES {
                g.add_link(Path::new(path), flag);
                g.add(Path::new(path), flag);
            }
        }
        // The daemon's own cgroup and those above it (not the root, which is everyone's):
        // `cgroup.kill`, `cgroup.freeze` and the limits there would stop it without a signal.
        // The disks' raw character devices by major, as registered now (see `raw_majors`).
        g.raw_majors = raw_majors_now();
        for &major in &g.raw_majors {
            let key = FileKey {
                dev: shared::RAW_MAJOR_KEY_DEV,
                ino: u64::from(major),
            };
            g.flags.insert(key, shared::GUARD_RAW_MAJOR);
        }
        // In every hierarchy it is in (cgroup v1's too, where the host mounts them).
        for (root, home) in home_cgroups() {
            let mut dir = home.clone();
            let mut flag = GUARD_DIR | GUARD_CGROUP;
            while dir != *root && dir.starts_with(root) {
                g.add(&dir, flag);
                flag = GUARD_CGROUP;
                dir.pop();
            }
        }
        g
    }

    /// The places of `run_later` that exist: a file as a file, a directory with the
    /// directories directly inside it (not those a symlink names). Counted apart, and given
    /// to the kernel after countersign's own files when the map cannot hold every entry.
    fn add_run_later(&mut self, places: &[PathBuf]) {
        for place in places {
            let Ok(m) = std::fs::metadata(place) else {
                self.add_name(place);
                self.missing.push(place.clone());
                continue;
            };
            let add = |g: &mut Self, path: &Path, flag: u32| {
                if let Some(id) = enrich::file_id(path) {
                    let key = FileKey {
                        dev: id.kernel_dev(),
                        ino: id.ino,
                    };
                    if !g.flags.contains_key(&key) {
                        g.later.insert(key);
                    }
                    g.add_id(path, id, flag);
                }
            };
            if !m.is_dir() {
                add(self, place, GUARD_FILE);
                continue;
            }
            add(self, place, GUARD_DIR);
            let inside = std::fs::read_dir(place).into_iter().flatten().flatten();
            for entry in inside.take(MAX_RUN_LATER_SUBDIRS) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    add(self, &entry.path(), GUARD_DIR);
                }
            }
        }
    }

    /// A `run_later` file that does not exist (yet): its name may not be made in its
    /// directory (the directory gets [`GUARD_NAMES`], and a name entry). Names longer than
    /// [`shared::GUARD_NAME_LEN`] bytes, and files whose directory is missing too, are not
    /// guarded.
    fn add_name(&mut self, path: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let name = name.as_bytes();
        let Some(dir_id) = enrich::file_id(dir) else {
            return;
        };
        if name.len() > shared::GUARD_NAME_LEN || name.contains(&0) {
            tracing::warn!(path = %path.display(), "a run_later name longer than 31 bytes is guarded only once it exists");
            return;
        }
        let mut padded = [0_u8; shared::GUARD_NAME_LEN + 1];
        padded[..name.len()].copy_from_slice(name);
        let key = FileKey {
            dev: shared::NAME_KEY_DEV,
            ino: shared::name_key(dir_id.kernel_dev(), dir_id.ino, &padded),
        };
        self.flags.insert(key, GUARD_FILE);
        self.paths.insert(key, path.to_path_buf());
        self.later.insert(key);
        let dir_key = FileKey {
            dev: dir_id.kernel_dev(),
            ino: dir_id.ino,
        };
        if !self.flags.contains_key(&dir_key) {
            self.later.insert(dir_key);
        }
        self.add_id(dir, dir_id, shared::GUARD_NAMES);
    }

    /// Whether a `run_later` place that did not exist does now (it is to be guarded as
    /// itself).
    #[must_use]
    pub fn run_later_appeared(&self) -> bool {
        self.missing.iter().any(|p| p.metadata().is_ok())
    }

    /// How many of the `run_later` places (and the directories in them) are guarded.
    #[must_use]
    pub fn run_later_len(&self) -> usize {
        self.later.len()
    }

    /// Adds `path` itself (a symlink, not what it names) with `flag`, and its ancestors.
    fn add_link(&mut self, path: &Path, flag: u32) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(m) = std::fs::symlink_metadata(path) else {
            return;
        };
        if m.file_type().is_symlink() {
            self.add_id(
                path,
                FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                },
                flag,
            );
        }
    }

    /// Adds `path` (if it exists) with `flag`, and its ancestors as such.
    fn add(&mut self, path: &Path, flag: u32) {
        let Some(id) = enrich::file_id(path) else {
            return;
        };
        self.add_id(path, id, flag);
    }

    fn add_id(&mut self, path: &Path, id: FileId, flag: u32) {
        let key = FileKey {
            dev: id.kernel_dev(),
            ino: id.ino,
        };
        *self.flags.entry(key).or_default() |= flag;
        self.paths.entry(key).or_insert_with(|| path.to_path_buf());
        let mut at = path.parent();
        while let Some(dir) = at {
            if let Some(id) = enrich::file_id(dir) {
                let key = FileKey {
                    dev: id.kernel_dev(),
                    ino: id.ino,
                };
                *self.flags.entry(key).or_default() |= GUARD_ANCESTOR;
                self.paths.entry(key).or_insert_with(|| dir.to_path_buf());
            }
            at = dir.parent();
        }
    }

    /// The entries for the kernel, at most `MAX_GUARD_FILES` (the guarded files first, then
    /// the ancestors), and how many did not fit.
    #[must_use]
    pub fn entries(&self) -> (Vec<(FileKey, u32)>, usize) {
        let mut all: Vec<(FileKey, u32)> = self.flags.iter().map(|(k, f)| (*k, *f)).collect();
        // countersign's own files first, then the places programs are started from later,
        // then the directories on the way.
        all.sort_by_key(|(k, f)| (*f == GUARD_ANCESTOR, self.later.contains(k), k.dev, k.ino));
        let max = shared::MAX_GUARD_FILES as usize;
        let dropped = all.len().saturating_sub(max);
        all.truncate(max);
        (all, dropped)
    }

    /// Whether the raw disk majors `/proc/devices` names now differ from those given to the
    /// kernel (a driver was registered since: the entries must be given again).
    #[must_use]
    pub fn raw_majors_changed(&self) -> bool {
        raw_majors_now() != self.raw_majors
    }

    /// The path a guarded file was registered under.
    #[must_use]
    pub fn path_of(&self, dev: u64, ino: u64) -> Option<&Path> {
        self.paths.get(&FileKey { dev, ino }).map(PathBuf::as_path)
    }

    /// How many files and directories are guarded (the raw disk majors are not counted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.flags.len() - self.raw_majors.len() - self.later.len()
    }
}

/// Keeps the daemon's memory, and the host key in it, out of reach beneath the file system's
/// checks: locked in memory (never written to swap, where a swap file is a file root may
/// read) and not dumpable (no core file of it, and its `/proc` files stay root's). Pages are
/// locked as they are first touched (`MCL_ONFAULT`), so locking costs no memory up front.
/// Only with `CAP_IPC_LOCK`: without it the locked total is bounded by `RLIMIT_MEMLOCK` and a
/// later allocation past it would fail. `Err`: why the memory is not locked.
pub fn protect_memory() -> Result<(), String> {
    // SAFETY: plain calls on this process, no pointers.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    if !ipc_lock {
        return Err("the daemon lacks CAP_IPC_LOCK".into());
    }
    // SAFETY: as above.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
        return Err(format!("mlockall: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `CAP_IPC_LOCK`.
const CAP_IPC_LOCK: u32 = 14;

/// The cgroups the daemon started in, one per hierarchy mounted here (cgroup v2, and each
/// cgroup v1 hierarchy a host still mounts): (the hierarchy's mount point, the daemon's
/// directory there), as `/proc/self/cgroup` said at the first call, which the daemon makes as
/// it starts. Where it moves itself back to when it finds itself moved.
fn home_cgroups() -> &'static [(PathBuf, PathBuf)] {
    &home().1
}

/// `/proc/self/cgroup` as the daemon started, and [`home_cgroups`].
fn home() -> &'static (String, Vec<(PathBuf, PathBuf)>) {
    static HOME: std::sync::OnceLock<(String, Vec<(PathBuf, PathBuf)>)> =
        std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let (Ok(own), Ok(mounts)) = (
            std::fs::read_to_string("/proc/self/cgroup"),
            std::fs::read_to_string("/proc/self/mounts"),
        ) else {
            return (String::new(), Vec::new());
        };
        let homes = cgroup_homes(&own, &mounts);
        (own, homes)
    })
}

/// Whether the daemon is no longer in the cgroups it started in (moved while its report of
/// the move was lost, or by a process that is not labelled).
#[must_use]
pub fn away_from_home() -> bool {
    let (started, homes) = home();
    // (A hierarchy mounted since adds a line: only the lines it started with count.)
    !homes.is_empty()
        && std::fs::read_to_string("/proc/self/cgroup")
            .is_ok_and(|now| started.lines().any(|l| !now.lines().any(|n| n == l)))
}

/// [`home_cgroups`] from the text of `/proc/self/cgroup` and `/proc/self/mounts`.
fn cgroup_homes(own: &str, mounts: &str) -> Vec<(PathBuf, PathBuf)> {
    let mut homes = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let rel = path.trim().trim_start_matches('/');
        // The hierarchy's mount: cgroup2 for id 0; for v1, the mount whose options name every
        // controller of the line (`cpu,cpuacct`, `name=systemd`).
        let root = mounts.lines().find_map(|m| {
            let f: Vec<&str> = m.split_whitespace().collect();
            let (dir, fstype, options) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let fits = if id == "0" {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup"
                    && !controllers.is_empty()
                    && controllers
                        .split(',')
                        .all(|c| options.split(',').any(|o| o == c))
            };
            fits.then(|| PathBuf::from(dir))
        });
        if let Some(root) = root {
            let home = root.join(rel);
            homes.push((root, home));
        }
    }
    homes
}

/// Moves the daemon back into the cgroups it started in (a labelled task moved it into another
/// one; the kernel killed the mover), in every hierarchy. The move takes every thread of the
/// daemon. Returns the cgroups written.
pub fn return_home() -> std::io::Result<Vec<PathBuf>> {
    let homes = home_cgroups();
    if homes.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the cgroups the daemon started in are unknown",
        ));
    }
    let mut written = Vec::new();
    let mut failed = None;
    for (_, home) in homes {
        // "0" is the writer's own process; writing where it already is changes nothing.
        match std::fs::write(home.join("cgroup.procs"), "0") {
            Ok(()) => written.push(home.clone()),
            Err(e) => {
                failed = Some(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", home.display()),
                ))
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(written),
    }
}

/// Where the host key's public half is kept (`host.key` → `host.key.pub`).
fn pub_key_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// A thread's process id and real uid, from `/proc/TID/status`.
#[must_use]
pub fn task_ids(tid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse::<u32>()
            .ok()
    };
    Some((field("Tgid:")?, field("Uid:")?))
}

/// The record's name for a `TAMPER_*` code.
#[must_use]
pub fn attempt_name(detail: i32) -> &'static str {
    match detail {
        shared::TAMPER_BPF => "bpf",
        shared::TAMPER_PTRACE => "ptrace",
        shared::TAMPER_SIGNAL => "signal",
        shared::TAMPER_MODULE => "module",
        shared::TAMPER_MOUNT => "mount",
        shared::TAMPER_FILE_WRITE => "file-write",
        shared::TAMPER_FILE_READ => "file-read",
        shared::TAMPER_SYSCTL => "sysctl",
        shared::TAMPER_CAPABILITY => "capability",
        shared::TAMPER_DEVICE => "device",
        shared::TAMPER_PERF => "perf",
        shared::TAMPER_DNS => "dns",
        shared::TAMPER_TTY => "tty",
        shared::TAMPER_FILE_PASSED => "file-passed",
        shared::TAMPER_FILE_GATE => "file-gate",
        shared::TAMPER_FILE_LOCK => "file-lock",
        shared::TAMPER_PROCESS => "process",
        shared::TAMPER_CGROUP => "cgroup",
        shared::TAMPER_CGROUP_MOVE => "cgroup-move",
        _ => "unknown",
    }
}

/// What a kernel tamper event was aimed at, as a person reads it.
#[must_use]
pub fn target_text(ev: &shared::Event, guarded: &Guarded, daemon_pid: u32) -> String {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&ev.addr[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let tgid = u32::from_le_bytes([ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]]);
    let process = || {
        if tgid == daemon_pid {
            format!("the countersign daemon (pid {tgid})")
        } else if tgid == 0 {
            "a process that could not be identified".to_owned()
        } else {
            let exe = enrich::readlink(tgid, "exe").unwrap_or_else(|| "gone".into());
            format!("pid {tgid} ({exe})")
        }
    };
    let file = || {
        let (dev, ino) = (word(0), word(1));
        match guarded.path_of(dev, ino) {
            Some(p) => p.display().to_string(),
            None => {
                let id = FileId::from_kernel(dev, ino);
                format!(
                    "file {}:{} inode {ino}",
                    libc::major(id.dev),
                    libc::minor(id.dev)
                )
            }
        }
    };
    match ev.detail {
        shared::TAMPER_BPF => format!("bpf() command {}", ev.port),
        shared::TAMPER_PTRACE => format!("{} (access mode {:#x})", process(), ev.port),
        shared::TAMPER_SIGNAL => format!("signal {} to {}", ev.port, process()),
        shared::TAMPER_MODULE => match ev.port {
            2 => "a kernel module".into(),
            3 | 4 => "a kexec image".into(),
            5 => "a security policy".into(),
            6 => "an X.509 certificate".into(),
            n => format!("kernel data of kind {n}"),
        },
        shared::TAMPER_MOUNT => match ev.port {
            1 => "mount".into(),
            2 => "unmount".into(),
            3 => "move a mount".into(),
            4 => "remount".into(),
            5 => "pivot_root".into(),
            n => format!("mount operation {n}"),
        },
        shared::TAMPER_SYSCTL => {
            let (_, ino) = (word(0), word(1));
            format!("a kernel setting under /proc (inode {ino})")
        }
        shared::TAMPER_CAPABILITY => match ev.port {
            17 => "CAP_SYS_RAWIO (kernel memory, /proc/kcore, /dev/mem, I/O ports)".into(),
            22 => "CAP_SYS_BOOT (reboot)".into(),
            25 => "CAP_SYS_TIME (the clock)".into(),
            27 => "CAP_MKNOD (a device node)".into(),
            9 => "CAP_LINUX_IMMUTABLE (immutable or append-only files)".into(),
            12 => "CAP_NET_ADMIN over the host's network (firewall and NAT, routes, interfaces)"
                .into(),
            n => capability_name(n),
        },
        shared::TAMPER_DEVICE => format!(
            "a disk beneath its file systems: device major {} ({})",
            ev.port,
            file()
        ),
        shared::TAMPER_PERF => "performance monitoring of a whole processor".into(),
        shared::TAMPER_TTY => format!(
            "input pushed into a terminal ({}): the shell there would run it as typed",
            if ev.port == 0x5412 {
                "TIOCSTI"
            } else {
                "TIOCLINUX"
            }
        ),
        shared::TAMPER_DNS => format!(
            "the DNS port 53 ({}): the host's resolvers name destinations",
            if ev.port == 10 { "IPv6" } else { "IPv4" }
        ),
        shared::TAMPER_PROCESS => format!(
            "{} of {}",
            match ev.port {
                1 => "the resource limits",
                2 => "the priority",
                3 => "the I/O priority",
                4 => "the scheduling policy or processor affinity",
                5 => "the memory placement",
                _ => "how it runs",
            },
            process()
        ),
        shared::TAMPER_FILE_LOCK => format!("a lock or lease on {} (type {})", file(), ev.port),
        shared::TAMPER_CGROUP => format!(
            "a cgroup file that would kill, freeze or limit the daemon (inode {}: the daemon's cgroup or one above it, or a cgroup.kill or cgroup.freeze)",
            word(1)
        ),
        shared::TAMPER_CGROUP_MOVE => format!(
            "{} moved into another cgroup (the mover is killed, the daemon moves back)",
            process()
        ),
        shared::TAMPER_FILE_GATE => format!(
            "fanotify permission events (mask {:#x}): the asker would decide, or never answer, every open beneath its mark, the daemon's included",
            u64::from(ev.port) << 16
        ),
        shared::TAMPER_FILE_PASSED => format!(
            "{}, passed in by another process (opening it would be refused: {})",
            file(),
            attempt_name(i32::from(ev.port))
        ),
        _ => file(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_cgroups_are_found_in_every_hierarchy() {
        let own = "12:cpu,cpuacct:/system.slice/countersign.service\n\
                   1:name=systemd:/system.slice/countersign.service\n\
                   3:rdma:/\n\
                   0::/system.slice/countersign.service\n";
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/systemd cgroup rw,xattr,name=systemd 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                      cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n";
        let homes = cgroup_homes(own, mounts);
        let unit = "system.slice/countersign.service";
        assert_eq!(
            homes,
            [
                ("/sys/fs/cgroup/cpu,cpuacct", unit),
                ("/sys/fs/cgroup/systemd", unit),
                ("/sys/fs/cgroup/unified", unit),
            ]
            .map(|(r, h)| (PathBuf::from(r), Path::new(r).join(h)))
        );
    }

    #[test]
    fn raw_disk_majors_come_from_the_character_devices() {
        let devices = "Character devices:\n  1 mem\n 21 sg\n240 nvme-generic\n241 nvme\n\
                       254 bsgx\n\nBlock devices:\n  8 sd\n259 blkext\n 21 bsg\n";
        let majors = raw_majors(devices);
        assert_eq!(&majors[..4], &[21, 240, 241, 0]);
        assert!(majors.iter().skip(3).all(|&m| m == 0));
        assert_eq!(raw_majors(""), [0; shared::RAW_MAJORS]);
    }

    /// The majors of this host are given to the kernel as map entries too (where a driver
    /// registered later is found), not counted as files, and a change is noticed.
    #[test]
    fn raw_disk_majors_are_guard_entries() {
        let config = DaemonConfig::default();
        let mut g = Guarded::of(&config, &[]);
        let majors = raw_majors_now();
        let entries = g.entries().0;
        for m in &majors {
            assert!(
                entries
                    .iter()
                    .any(|(k, f)| k.dev == shared::RAW_MAJOR_KEY_DEV
                        && k.ino == u64::from(*m)
                        && *f == shared::GUARD_RAW_MAJOR),
                "major {m} is not an entry: {entries:?}"
            );
        }
        assert_eq!(g.len(), g.flags.len() - majors.len() - g.later.len());
        assert!(!g.raw_majors_changed());
        g.raw_majors.push(4095);
        assert!(g.raw_majors_changed(), "a changed set of majors is noticed");
    }

    /// A `run_later` directory is guarded with the directories in it (a user's crontab
    /// directory, a unit's `*.wants`), a file as a file; they come after countersign's own
    /// files when the map is short, and are not counted as countersign's.
    #[test]
    fn places_programs_are_started_from_later_are_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let cron = dir.path().join("cron");
        std::fs::create_dir_all(cron.join("crontabs")).unwrap();
        std::fs::write(cron.join("crontabs/alice"), b"* * * * * true\n").unwrap();
        let preload = dir.path().join("ld.so.preload");
        std::fs::write(&preload, b"").unwrap();
        let own = dir.path().join("own");
        std::fs::create_dir(&own).unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let config = DaemonConfig {
            socket_dir: dir.path().join("none"),
            protected_dirs: vec![own.clone()],
            run_later: vec![cron.clone(), preload.clone(), etc.join("missing")],
            ..DaemonConfig::default()
        };
        let g = Guarded::of(&config, &[]);
        let key = |p: &Path| {
            let id = enrich::file_id(p).unwrap();
            FileKey {
                dev: id.kernel_dev(),
                ino: id.ino,
            }
        };
        let flags = |p: &Path| g.flags.get(&key(p)).copied();
        assert!(flags(&cron).is_some_and(|f| f & GUARD_DIR != 0));
        assert_eq!(flags(&cron.join("crontabs")), Some(GUARD_DIR));
        assert_eq!(
            flags(&cron.join("crontabs/alice")),
            None,
            "its directory guards it"
        );
        assert_eq!(flags(&preload), Some(GUARD_FILE));
        // A missing file: its name may not be made in its directory.
        assert_eq!(flags(&etc), Some(shared::GUARD_NAMES));
        let etc_key = key(&etc);
        let mut name = [0_u8; shared::GUARD_NAME_LEN + 1];
        name[..7].copy_from_slice(b"missing");
        let name_key = FileKey {
            dev: shared::NAME_KEY_DEV,
            ino: shared::name_key(etc_key.dev, etc_key.ino, &name),
        };
        assert_eq!(g.flags.get(&name_key), Some(&GUARD_FILE));
        assert_eq!(
            g.run_later_len(),
            5,
            "cron, crontabs, the preload, etc and the name"
        );
        assert!(!g.run_later_appeared());
        std::fs::write(etc.join("missing"), b"").unwrap();
        assert!(
            g.run_later_appeared(),
            "a file guarded by name that appears is noticed"
        );
        std::fs::remove_file(etc.join("missing")).unwrap();
        let without = Guarded::of(
            &DaemonConfig {
                run_later: Vec::new(),
                ..config
            },
            &[],
        );
        assert_eq!(g.len(), without.len(), "not counted as countersign's");
        // countersign's own directory comes before the places, the places before ancestors.
        let entries = g.entries().0;
        let at = |p: &Path| entries.iter().position(|(k, _)| *k == key(p)).unwrap();
        assert!(
            at(&own) < at(&cron) && at(&cron) < at(dir.path()),
            "{entries:?}"
        );
        // The defaults name where cron, at, systemd and the dynamic linker look.
        let defaults = DaemonConfig::default().run_later;
        for p in [
            "/var/spool/cron",
            "/etc/cron.d",
            "/etc/systemd/system",
            "/etc/ld.so.preload",
        ] {
            assert!(
                defaults.contains(&PathBuf::from(p)),
                "{p} not in {defaults:?}"
            );
        }
    }

    /// Every user's service manager is a deputy (`systemd-run --user`), whoever the user.
    #[test]
    fn users_service_managers_are_deputies() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["1000", "0", "not-a-user"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let paths = deputy_paths_in(dir.path());
        for p in ["1000/bus", "1000/systemd/private", "0/bus"] {
            assert!(paths.contains(&dir.path().join(p)), "{p}: {paths:?}");
        }
        assert!(
            !paths
                .iter()
                .any(|p| p.starts_with(dir.path().join("not-a-user")))
        );
        assert!(paths.contains(&PathBuf::from("/run/dbus/system_bus_socket")));
    }

    #[test]
    fn files_and_their_directories_are_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("host.key");
        std::fs::write(&key, b"secret").unwrap();
        std::fs::write(dir.path().join("host.key.pub"), b"public").unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let config = DaemonConfig {
            host_key: key.clone(),
            spool_dir: spool.clone(),
            socket_dir: dir.path().join("none"),
            protected_dirs: Vec::new(),
            ..DaemonConfig::default()
        };
        let g = Guarded::of(&config, &[]);
        let flags = |p: &Path| {
            let id = enrich::file_id(p).unwrap();
            g.flags
                .get(&FileKey {
                    dev: id.kernel_dev(),
                    ino: id.ino,
                })
                .copied()
        };
        assert_eq!(flags(&key), Some(GUARD_SECRET));
        assert_eq!(flags(&dir.path().join("host.key.pub")), Some(GUARD_FILE));
        assert_eq!(flags(&spool), Some(GUARD_DIR));
        assert_eq!(flags(dir.path()), Some(GUARD_ANCESTOR));
        assert_eq!(flags(Path::new("/")), Some(GUARD_ANCESTOR));
        let id = enrich::file_id(&key).unwrap();
        assert_eq!(g.path_of(id.kernel_dev(), id.ino), Some(key.as_path()));
        // Guarded files go first when the map cannot take them all.
        let (entries, dropped) = g.entries();
        assert_eq!(dropped, 0);
        assert_ne!(entries[0].1, GUARD_ANCESTOR);
        assert_eq!(entries.last().unwrap().1, GUARD_ANCESTOR);
    }
}
