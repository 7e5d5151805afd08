//! `cargo xtask test`: the project's checks and tests, in the order CI runs them.
//!
//! 1. `cargo fmt --check` and `cargo clippy -D warnings`;
//! 2. the unit tests of every crate;
//! 3. the end-to-end scenarios (`tests/`): natively on this machine in fallback mode, the
//!    enforcing ones (holds, escapes) also against the release build; then in qemu VMs
//!    booting the Debian 12 and Debian 13 kernels: with BPF LSM enabled, where the daemon
//!    must run in LSM mode at BPF LSM's hooks; as Debian boots them (no `bpf` in `lsm=`),
//!    where it must choose LSM mode at the `security_*` functions itself; and told to run
//!    the fallback there. The VMs have one processor each and run two at a time, one per
//!    core.
//!
//! Every step has a timeout; the first failure stops the run (VM runs already under way
//! finish first).
use std::{
    collections::VecDeque,
    path::PathBuf,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    kernels::KernelId,
    paths,
    process::{run_ok, run_streaming},
    vm,
};

/// Where the end-to-end binaries are put inside the VM.
const GUEST_DIR: &str = "/opt/countersign";
/// Longest one VM run may take.
const VM_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Runs every check; stops at the first failure.
pub fn run_tests() -> Result<()> {
    cargo_step("cargo fmt", &["fmt", "--all", "--check"], 10 * 60)?;
    cargo_step(
        "cargo clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        60 * 60,
    )?;
    cargo_step(
        "unit tests",
        &["test", "--workspace", "--exclude", "countersign-tests"],
        60 * 60,
    )?;
    let bins = build_e2e()?;
    let mut summary = Vec::new();
    summary.push(format!("native (fallback): {}", run_native(&bins)?));
    summary.push(format!(
        "native, release build (fallback): {}",
        run_native_release(&bins)?
    ));
    summary.extend(run_vms(&bins)?);
    println!("xtask test: all passed");
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

/// The binaries the end-to-end suite needs.
struct E2eBins {
    countersign: PathBuf,
    probe: PathBuf,
    escape: PathBuf,
    fake_slack: PathBuf,
    fake_teams: PathBuf,
    suite: PathBuf,
    /// Scenarios that run natively only (the VMs carry no database server or browser):
    /// (test target, executable).
    native_only: Vec<(&'static str, PathBuf)>,
}

/// The test targets of `tests/` that run only natively: the approver on a real PostgreSQL
/// server, its web page in headless Chromium, and the services against hostile clients
/// (nothing in them depends on the kernel).
const NATIVE_ONLY: [&str; 3] = ["postgres", "web", "services"];

fn build_e2e() -> Result<E2eBins> {
    cargo_step(
        "build countersign and the test binaries",
        &[
            "build",
            "-p",
            "countersign",
            "-p",
            "countersign-tests",
            "--bins",
        ],
        60 * 60,
    )?;
    let out = run_ok(
        paths::cargo().args([
            "test",
            "-p",
            "countersign-tests",
            "--test",
            "e2e",
            "--test",
            "postgres",
            "--test",
            "web",
            "--test",
            "services",
            "--no-run",
            "--message-format=json",
        ]),
        Duration::from_secs(60 * 60),
        "building the end-to-end suite",
    )?;
    // Each suite's executable is named in the compiler-artifact message of its target.
    let executable = |name: &str| {
        out.lines()
            .filter(|l| {
                l.contains("\"reason\":\"compiler-artifact\"")
                    && l.contains(&format!("\"name\":\"{name}\""))
            })
            .find_map(|l| json_string(l, "executable"))
            .with_context(|| format!("cargo did not report the {name} test executable"))
    };
    let suite = executable("e2e")?;
    let native_only = NATIVE_ONLY
        .iter()
        .map(|n| Ok((*n, PathBuf::from(executable(n)?))))
        .collect::<Result<_>>()?;
    let debug = paths::target_dir().join("debug");
    Ok(E2eBins {
        countersign: debug.join("countersign"),
        probe: debug.join("cs-probe"),
        escape: debug.join("cs-escape"),
        fake_slack: debug.join("fake-slack"),
        fake_teams: debug.join("fake-teams"),
        suite: PathBuf::from(suite),
        native_only,
    })
}

/// The string value of `"key":"…"` in one line of cargo's JSON (paths have no escapes here).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

fn run_native(bins: &E2eBins) -> Result<String> {
    println!("xtask test: end-to-end, natively (fallback mode)");
    run_streaming(
        Command::new(&bins.suite)
            .args(["--test-threads", "2"])
            .env("COUNTERSIGN_E2E_MODE", "fallback")
            .env("COUNTERSIGN_BIN", &bins.countersign)
            .env("COUNTERSIGN_PROBE", &bins.probe)
            .env("COUNTERSIGN_ESCAPE", &bins.escape)
            .env("COUNTERSIGN_FAKE_SLACK", &bins.fake_slack)
            .env("COUNTERSIGN_FAKE_TEAMS", &bins.fake_teams)
            .env("RUST_BACKTRACE", "1"),
        Duration::from_secs(30 * 60),
        "the end-to-end suite (native, fallback mode)",
    )?;
    for (name, exe) in &bins.native_only {
        println!("xtask test: the {name} scenarios, natively");
        run_streaming(
            Command::new(exe)
                .args(["--test-threads", "1"])
                .env("COUNTERSIGN_E2E_MODE", "fallback")
                .env("COUNTERSIGN_BIN", &bins.countersign)
                .env("COUNTERSIGN_PROBE", &bins.probe)
                .env("COUNTERSIGN_FAKE_SLACK", &bins.fake_slack)
                .env("COUNTERSIGN_FAKE_TEAMS", &bins.fake_teams)
                .env("RUST_BACKTRACE", "1"),
            Duration::from_secs(10 * 60),
            &format!("the {name} scenarios"),
        )?;
    }
    Ok("passed".to_owned())
}

/// The scenarios that enforce (holds, escapes) against the release build too: the binary
/// users run, whose timing differs from the debug one.
const RELEASE_SCENARIOS: [&str; 7] = [
    "escape::",
    "tamper::",
    "load::",
    "labelled_",
    "spurious_sigcont",
    "changed_",
    "label_survives",
];

fn run_native_release(bins: &E2eBins) -> Result<String> {
    cargo_step(
        "build countersign (release)",
        &["build", "--release", "-p", "countersign"],
        60 * 60,
    )?;
    println!("xtask test: the enforcing scenarios against the release build, natively");
    run_streaming(
        Command::new(&bins.suite)
            .args(["--test-threads", "2"])
            .args(RELEASE_SCENARIOS)
            .env("COUNTERSIGN_E2E_MODE", "fallback")
            .env("COUNTERSIGN_BIN", Build::Release.countersign())
            .env("COUNTERSIGN_PROBE", &bins.probe)
            .env("COUNTERSIGN_ESCAPE", &bins.escape)
            .env("RUST_BACKTRACE", "1"),
        Duration::from_secs(15 * 60),
        "the enforcing scenarios (release build)",
    )?;
    Ok("passed".to_owned())
}

/// Scenarios whose code paths do not depend on the kernel or the mode (the approver and its
/// channels, the record chain and the collector, the display of learnt names): they run
/// natively only, where they take a tenth of the time they take under TCG. Everything that
/// holds, labels, decides in the kernel or captures names runs in the VMs too.
const MODE_INDEPENDENT: [&str; 3] = ["approver::", "records::", "names::the_"];

/// Which build of the daemon a VM run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    Debug,
    Release,
}

impl Build {
    fn name(self) -> &'static str {
        match self {
            Build::Debug => "debug",
            Build::Release => "release",
        }
    }

    /// The daemon binary of this build (cargo's profile directory is named like it).
    fn countersign(self) -> PathBuf {
        paths::target_dir().join(self.name()).join("countersign")
    }
}

/// What enforces in a VM run: how the kernel boots and where the daemon must hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Enforcement {
    /// BPF LSM enabled; the daemon is told `--mode lsm` and its programs run at BPF LSM's
    /// hooks.
    BpfLsm,
    /// Booted as Debian boots (BPF LSM built in, not enabled); the daemon picks its mode
    /// itself (`--mode auto`) and must land in LSM mode at the `security_*` functions.
    SecurityFunctions,
    /// Booted as Debian boots; the daemon is told `--mode fallback` (what runs where the
    /// kernel has no trampolines or no BPF LSM built in).
    Fallback,
}

impl Enforcement {
    fn lsm(self) -> vm::Lsm {
        match self {
            Enforcement::BpfLsm => vm::Lsm::Bpf,
            Enforcement::SecurityFunctions | Enforcement::Fallback => vm::Lsm::NoBpf,
        }
    }

    /// `COUNTERSIGN_E2E_MODE`.
    fn mode(self) -> &'static str {
        match self {
            Enforcement::Fallback => "fallback",
            _ => "lsm",
        }
    }

    /// `COUNTERSIGN_E2E_HOOKS` (as `status` says; empty: not checked).
    fn hooks(self) -> &'static str {
        match self {
            Enforcement::BpfLsm => "bpf-lsm",
            Enforcement::SecurityFunctions => "security-functions",
            Enforcement::Fallback => "",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Enforcement::BpfLsm => "LSM mode at BPF LSM",
            Enforcement::SecurityFunctions => "LSM mode at the security functions",
            Enforcement::Fallback => "fallback",
        }
    }
}

/// One VM run of the end-to-end suite.
#[derive(Clone, Copy, Debug)]
struct VmRun {
    kernel: KernelId,
    enforcement: Enforcement,
    build: Build,
    /// Which scenarios: libtest filters (none: the whole suite) and names skipped, besides
    /// [`MODE_INDEPENDENT`].
    filters: &'static [&'static str],
    skips: &'static [&'static str],
    /// What the summary calls this part of the suite.
    part: &'static str,
}

/// The daemon's choice of mode, the labelled holds, tamper, names (with `fentry` there), and
/// what depends on the hooks' links surviving the daemon (a crash, a restart taking held
/// requests over).
const HOLDS: &[&str] = &[
    "labelled_",
    "tamper::",
    "names::",
    "daemon_crash",
    "spurious_sigcont",
    "changed_",
];

/// The same in the fallback, with the escape attempts whose names begin `a_` (those of a
/// held exec and a held send: tracing, signals, the daemon's death) and the burst.
const FALLBACK_HOLDS: &[&str] = &[
    "escape::a_",
    "load::",
    "labelled_",
    "spurious_sigcont",
    "changed_",
    "label_survives",
    "tamper::",
    "names::",
];

/// Many holds at once (a burst of processes, threads of one process): in the fallback on
/// Debian unstable's kernel some of them fail (a connect refused as made where it cannot be
/// held; a process left stopped), a known defect of the fallback there (README, Modes and
/// their limits), so they are not run there until it is fixed.
const FALLBACK_CONCURRENT: &str = "load::";

/// `escape::a_file_system_that_never_answers…` mounts FUSE, a module on Debian's cloud
/// kernels, and the VMs load no modules; it runs natively.
const NEEDS_MODULES: &str = "escape::a_file_system_that_never_answers";

/// The VM runs, in the order that balances the two slots (the two long runs first). At BPF
/// LSM: the whole suite on Debian 13 but the tamper attempts (which run at BPF LSM on Debian
/// 12, and in the release build at the security functions on Debian 13 and unstable), and on
/// Debian 12 all but the escape attempts (which run there at the security functions, and in
/// the debug build natively). At the security functions, as Debian boots: the
/// enforcing scenarios on Debian 12 (the kernel whose fallback sees least), the holds,
/// labels, tamper and names on both. The fallback, told to run on Debian 13: the enforcing
/// scenarios and the holds (the whole fallback suite also runs natively). The newest kernel
/// of the Debian archive (sid), as Debian boots it: the holds at the security functions and
/// in the fallback (its escape attempts take longer than the hour allows). Each build of
/// the daemon runs in each mode: the release build is the binary users run, the debug one
/// checks overflow and debug assertions, and their races differ.
const VM_RUNS: [VmRun; 9] = [
    VmRun {
        kernel: KernelId::Debian12,
        enforcement: Enforcement::BpfLsm,
        build: Build::Debug,
        filters: &[],
        skips: &["escape::"],
        part: "whole suite but the escapes",
    },
    VmRun {
        kernel: KernelId::Debian13,
        enforcement: Enforcement::BpfLsm,
        build: Build::Release,
        filters: &[],
        skips: &["tamper::"],
        part: "whole suite but the tamper attempts",
    },
    VmRun {
        kernel: KernelId::Debian12,
        enforcement: Enforcement::SecurityFunctions,
        build: Build::Release,
        filters: &["escape::"],
        skips: &[NEEDS_MODULES],
        part: "escapes",
    },
    VmRun {
        kernel: KernelId::Debian13,
        enforcement: Enforcement::Fallback,
        build: Build::Release,
        filters: &["escape::"],
        skips: &["escape::a_"],
        part: "escapes (1 of 2)",
    },
    VmRun {
        kernel: KernelId::Debian13,
        enforcement: Enforcement::Fallback,
        build: Build::Release,
        filters: FALLBACK_HOLDS,
        skips: &[NEEDS_MODULES],
        part: "holds and escapes (2 of 2)",
    },
    VmRun {
        kernel: KernelId::Debian12,
        enforcement: Enforcement::SecurityFunctions,
        build: Build::Debug,
        filters: HOLDS,
        skips: &[],
        part: "holds",
    },
    VmRun {
        kernel: KernelId::Debian13,
        enforcement: Enforcement::SecurityFunctions,
        build: Build::Release,
        filters: HOLDS,
        skips: &[],
        part: "holds",
    },
    VmRun {
        kernel: KernelId::DebianSid,
        enforcement: Enforcement::SecurityFunctions,
        build: Build::Release,
        filters: HOLDS,
        skips: &[],
        part: "holds",
    },
    VmRun {
        kernel: KernelId::DebianSid,
        enforcement: Enforcement::Fallback,
        build: Build::Release,
        filters: FALLBACK_HOLDS,
        skips: &[NEEDS_MODULES, FALLBACK_CONCURRENT],
        part: "holds and escapes (2 of 2), not the concurrent holds",
    },
];

impl VmRun {
    fn name(self) -> String {
        format!(
            "{} ({}, {} build, {})",
            self.kernel,
            self.enforcement.name(),
            self.build.name(),
            self.part
        )
    }
}

/// Runs [`VM_RUNS`], [`vm::VM_SLOTS`] at a time; after a failure no further run starts.
/// Returns a summary line per run (its pass count and how long it took).
fn run_vms(bins: &E2eBins) -> Result<Vec<String>> {
    let queue: Mutex<VecDeque<(usize, VmRun)>> =
        Mutex::new(VM_RUNS.iter().copied().enumerate().collect());
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(usize, Result<String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..vm::VM_SLOTS {
            scope.spawn(|| {
                loop {
                    if failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some((index, run)) = queue.lock().expect("queue").pop_front() else {
                        break;
                    };
                    let started = Instant::now();
                    let outcome = run_vm(bins, run).map(|line| {
                        format!(
                            "{}: {line} ({} min)",
                            run.name(),
                            started.elapsed().as_secs().div_ceil(60)
                        )
                    });
                    if outcome.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    results.lock().expect("results").push((index, outcome));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (_, outcome) in results {
        match outcome {
            Ok(line) => lines.push(line),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n\n"));
    }
    Ok(lines)
}

fn run_vm(bins: &E2eBins, run: VmRun) -> Result<String> {
    let VmRun {
        kernel,
        enforcement,
        ..
    } = run;
    println!("xtask test: end-to-end in a VM, {}", run.name());
    let guest = |name: &str| format!("{GUEST_DIR}/{name}");
    let files = [
        (run.build.countersign(), guest("countersign")),
        (bins.probe.clone(), guest("cs-probe")),
        (bins.escape.clone(), guest("cs-escape")),
        (bins.fake_slack.clone(), guest("fake-slack")),
        (bins.fake_teams.clone(), guest("fake-teams")),
        (bins.suite.clone(), guest("e2e")),
        // The suite checks the example policies (see COUNTERSIGN_POLICIES).
        (paths::workspace_root().join("policies"), guest("policies")),
    ];
    let env = [
        ("COUNTERSIGN_E2E_MODE", enforcement.mode().to_owned()),
        ("COUNTERSIGN_E2E_HOOKS", enforcement.hooks().to_owned()),
        // The Debian kernels run `fentry` programs in either mode (destination names).
        ("COUNTERSIGN_E2E_FENTRY", "1".to_owned()),
        // Without BPF LSM the daemon must find that out and pick the security functions
        // by itself.
        (
            "COUNTERSIGN_E2E_AUTO",
            if enforcement == Enforcement::SecurityFunctions {
                "1"
            } else {
                "0"
            }
            .to_owned(),
        ),
        ("COUNTERSIGN_BIN", guest("countersign")),
        ("COUNTERSIGN_PROBE", guest("cs-probe")),
        ("COUNTERSIGN_ESCAPE", guest("cs-escape")),
        ("COUNTERSIGN_FAKE_SLACK", guest("fake-slack")),
        ("COUNTERSIGN_FAKE_TEAMS", guest("fake-teams")),
        ("COUNTERSIGN_POLICIES", guest("policies")),
        ("RUST_BACKTRACE", "1".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let mut command = vec![guest("e2e"), "--test-threads".into(), "1".into()];
    command.extend(run.filters.iter().map(|f| (*f).to_owned()));
    for skip in MODE_INDEPENDENT.iter().chain(run.skips) {
        command.extend(["--skip".into(), (*skip).to_owned()]);
    }
    let outcome = vm::run_in_vm(
        kernel,
        enforcement.lsm(),
        vm::Clock::Host,
        &files,
        &command,
        &env,
        VM_TIMEOUT,
    )
    .with_context(|| format!("end-to-end suite in the VM, {}", run.name()))?;
    if outcome.exit_code != 0 {
        bail!(
            "end-to-end suite failed in the VM, {} (exit code {}); the guest printed:\n{}",
            run.name(),
            outcome.exit_code,
            outcome.output
        );
    }
    Ok(result_line(&outcome.output))
}

/// libtest's closing line, for the summary.
fn result_line(output: &str) -> String {
    output
        .lines()
        .rev()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("no result line")
        .trim()
        .to_owned()
}

/// Runs `cargo ARGS` at the workspace root, with its output on the terminal.
fn cargo_step(what: &str, args: &[&str], timeout_secs: u64) -> Result<()> {
    println!("xtask test: {what}");
    run_streaming(
        paths::cargo().args(args),
        Duration::from_secs(timeout_secs),
        what,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_cargo_json() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"e2e"},"executable":"/w/target/debug/deps/e2e-1234","fresh":true}"#;
        assert_eq!(
            json_string(line, "executable").as_deref(),
            Some("/w/target/debug/deps/e2e-1234")
        );
        assert_eq!(json_string(line, "nothing"), None);
    }

    #[test]
    fn picks_the_last_result_line() {
        let out = "test a ... ok\ntest result: ok. 1 passed; 0 failed\n";
        assert_eq!(result_line(out), "test result: ok. 1 passed; 0 failed");
        assert_eq!(result_line(""), "no result line");
    }

    #[test]
    fn guest_paths_are_absolute() {
        assert!(std::path::Path::new(GUEST_DIR).is_absolute());
    }
}
