//! `cargo xtask <task>`: the command line over the tasks in the `xtask` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use xtask::kernels::KernelId;
use xtask::{setup, test, vm};

#[derive(Parser)]
#[command(name = "xtask", about = "countersign's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (nightly rust-src, bpf-linker, qemu,
    /// busybox, test kernels); quick when everything is there already.
    Setup,
    /// Boot a test kernel under qemu and run one command in it (runs setup first).
    VmRun(VmRunArgs),
    /// Run the project's checks and tests (runs setup first).
    Test,
    /// Run the benchmarks: exec, connect, send and open loops without the daemon, for
    /// unlabelled and for labelled-allowed processes, here and in the VMs (runs setup first).
    Bench {
        /// Only this environment: `native`, or a VM as its results file is named
        /// (`debian12-bpf-lsm-lsm`, `debian13-no-bpf-lsm-lsm`, `debian13-no-bpf-lsm-fallback`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Build countersign (release) and run it with ARGS, e.g. `cargo xtask run -- daemon`
    /// (runs setup first).
    Run {
        /// Arguments for countersign, after `--`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
struct VmRunArgs {
    /// The kernel to boot.
    #[arg(long, value_enum)]
    kernel: KernelId,
    /// Kill the VM and fail after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// A host file or folder to copy into the guest, with its shared libraries:
    /// HOST_PATH[:GUEST_PATH] (the guest path defaults to the absolute host path).
    #[arg(long = "file", value_name = "HOST_PATH[:GUEST_PATH]")]
    files: Vec<String>,
    /// An environment variable for the guest command.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// One processor whose clock counts instructions, as the benchmark runs (default: one
    /// processor on the host's clock, as the tests run).
    #[arg(long)]
    instruction_clock: bool,
    /// Boot without `bpf` among the LSMs, as most distributions do (countersign's LSM
    /// programs then run at the `security_*` functions).
    #[arg(long)]
    no_bpf_lsm: bool,
    /// The command to run in the guest, after `--`.
    #[arg(last = true, required = true, value_name = "GUEST_COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.task {
        Task::Setup => setup::setup()?,
        Task::VmRun(args) => return vm_run(args),
        Task::Test => {
            setup::setup()?;
            test::run_tests()?;
        }
        Task::Bench { only } => {
            setup::setup()?;
            xtask::bench::run_bench(only.as_deref())?;
        }
        Task::Run { args } => {
            setup::setup()?;
            return run_countersign(&args);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask vm-run`: exits with the guest command's exit code.
fn vm_run(args: VmRunArgs) -> Result<ExitCode> {
    let files: Vec<(PathBuf, String)> = args
        .files
        .iter()
        .map(|f| vm::parse_file_arg(f))
        .collect::<Result<_>>()?;
    let env: Vec<(String, String)> = args
        .env
        .iter()
        .map(|e| vm::parse_env_arg(e))
        .collect::<Result<_>>()?;
    setup::setup()?;
    let clock = if args.instruction_clock {
        vm::Clock::Instructions
    } else {
        vm::Clock::Host
    };
    let lsm = if args.no_bpf_lsm {
        vm::Lsm::NoBpf
    } else {
        vm::Lsm::Bpf
    };
    let outcome = vm::run_in_vm(
        args.kernel,
        lsm,
        clock,
        &files,
        &args.command,
        &env,
        Duration::from_secs(args.timeout_secs),
    )?;
    eprintln!(
        "xtask vm-run: kernel {} ({}), LSMs {}, exit code {}",
        args.kernel,
        outcome.kernel_release.as_deref().unwrap_or("?"),
        outcome.lsm.as_deref().unwrap_or("?"),
        outcome.exit_code
    );
    Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)))
}

/// `cargo xtask run -- ARGS`: builds the release binary and runs it in the foreground.
fn run_countersign(args: &[String]) -> Result<ExitCode> {
    let status = xtask::paths::cargo()
        .args(["build", "--release", "-p", "countersign"])
        .status()?;
    if !status.success() {
        bail!("building countersign failed");
    }
    let bin = xtask::paths::target_dir()
        .join("release")
        .join("countersign");
    let status = std::process::Command::new(&bin).args(args).status()?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}
