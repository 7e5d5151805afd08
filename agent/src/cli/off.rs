//! `countersign off`: turns enforcement off after a daemon stopped with `on_stop: keep` (or
//! died), when no daemon is to take it over — uninstalling, say. Nothing held is let go: a
//! task still waiting for a decision is killed, before the hooks are removed and again after.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, MapData};
use countersign_ebpf::{self as shared, TaskState};

use crate::daemon::{config::DaemonConfig, control};

/// Removes the pins in the configured pin directory (the hooks detach with them) unless a
/// daemon runs; kills the processes of tasks whose action is still undecided.
pub fn run(config: &DaemonConfig) -> anyhow::Result<()> {
    let pins = &config.bpf_pin_dir;
    // A running daemon holds the lock; holding it here also keeps one from starting meanwhile.
    let _lock = control::lock(&config.socket_dir).context(
        "a daemon runs: stop it first (with `on_stop: off` it turns enforcement off itself)",
    )?;
    if !pins.join(shared::MAP_TASKS).exists() {
        println!(
            "enforcement is off already (nothing pinned in {})",
            pins.display()
        );
        return Ok(());
    }
    let killed = match open_tasks(pins) {
        Ok(tasks) => {
            let killed = kill_undecided(&tasks);
            crate::ebpf::pin::remove_pins(pins);
            // A task held before the hooks went away stays stopped until something continues
            // it: killed now too if it was still waiting.
            killed + kill_undecided(&tasks)
        }
        // Another version's layout: which tasks wait cannot be read, so every labelled one
        // is killed (none is let go).
        Err(e) => {
            eprintln!("{e:#}: every labelled process is killed");
            let data = MapData::from_pin(pins.join(shared::MAP_TASKS))
                .with_context(|| format!("opening {}", pins.join(shared::MAP_TASKS).display()))?;
            let tids = map_keys_u32(&data)?;
            let killed = tids.iter().filter(|&&tid| kill(tid)).count();
            crate::ebpf::pin::remove_pins(pins);
            killed + tids.iter().filter(|&&tid| kill(tid)).count()
        }
    };
    println!(
        "enforcement off: the hooks and their state are removed from {}{}",
        pins.display(),
        if killed == 0 {
            String::new()
        } else {
            format!("; {killed} process(es) waiting for a decision were killed")
        }
    );
    Ok(())
}

fn open_tasks(pins: &Path) -> anyhow::Result<HashMap<MapData, u32, TaskState>> {
    let path = pins.join(shared::MAP_TASKS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    HashMap::try_from(aya::maps::Map::HashMap(data))
        .with_context(|| format!("{}: not countersign's task map", path.display()))
}

/// `SIGKILL` to a thread's process; whether it was sent.
fn kill(tid: u32) -> bool {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

/// The 4-byte keys of a hash map, whatever its values (`BPF_MAP_GET_NEXT_KEY`), at most
/// 1,000,000.
fn map_keys_u32(map: &MapData) -> anyhow::Result<Vec<u32>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    /// `bpf_attr` for the map element commands.
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut keys = Vec::new();
    let mut next = 0_u32;
    while keys.len() < 1_000_000 {
        let key = *keys.last().unwrap_or(&0);
        let mut attr = Attr {
            map_fd: fd,
            _pad: 0,
            key: if keys.is_empty() {
                0
            } else {
                std::ptr::from_ref(&key) as u64
            },
            next_key: std::ptr::from_mut(&mut next) as u64,
            flags: 0,
        };
        // (`key`: 4 bytes, or none on the first call; `next_key`: 4 bytes written; both live
        // for the call.)
        match crate::ebpf::sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("listing the labelled tasks"),
        }
        keys.push(next);
    }
    Ok(keys)
}

/// Kills the process of every task whose action waits for a decision; how many.
fn kill_undecided(tasks: &HashMap<MapData, u32, TaskState>) -> usize {
    let mut killed = 0;
    for (tid, state) in tasks.iter().filter_map(Result::ok) {
        if state.state != shared::STATE_PENDING {
            continue;
        }
        // SIGKILL to a thread kills its whole process.
        if kill(tid) {
            eprintln!("killed the process of thread {tid}: its action was still undecided");
            killed += 1;
        }
    }
    killed
}
