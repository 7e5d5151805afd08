//! `cargo xtask bench`: the benchmarks (not tests). `cs-bench suite` (tests/src/bin) times an
//! exec loop and a connect loop without the daemon, with the daemon for an unlabelled
//! process, and for a labelled process whose actions the policy allows, in rounds interleaved
//! in one run; this task runs it on this machine (the mode the daemon picks here) and in the
//! Debian 12 VM (LSM mode), prints medians and ratios to the baseline, and writes them as
//! JSON under `target/bench/`.
use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{kernels::KernelId, paths, process::run_ok, process::run_streaming, vm};

/// Targets from the issue: ratio to the no-daemon baseline.
const UNLABELLED_TARGET: f64 = 1.01;
const LABELLED_TARGET: f64 = 1.03;

pub fn run_bench() -> Result<()> {
    run_streaming(
        paths::cargo().args([
            "build",
            "--release",
            "-p",
            "countersign",
            "-p",
            "countersign-tests",
            "--bins",
        ]),
        Duration::from_secs(60 * 60),
        "building the release binaries",
    )?;
    let release = paths::target_dir().join("release");
    let out_dir = paths::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    println!("xtask bench: on this machine (7 rounds)");
    let native = run_ok(
        Command::new(release.join("cs-bench"))
            .arg("suite")
            .arg(release.join("countersign"))
            .arg(out_dir.join("work"))
            .args(["7", "300", "3000"]),
        Duration::from_secs(60 * 60),
        "the benchmark on this machine",
    )?;
    let native = last_json(&native)?;
    std::fs::write(out_dir.join("native.json"), native.to_string())?;

    println!(
        "xtask bench: in a VM booting {} (LSM mode, 3 rounds, emulated: slow)",
        KernelId::Debian12
    );
    let guest = |n: &str| format!("/opt/countersign/{n}");
    let files = [
        (release.join("countersign"), guest("countersign")),
        (release.join("cs-bench"), guest("cs-bench")),
    ];
    let command = [
        guest("cs-bench"),
        "suite".into(),
        guest("countersign"),
        "/tmp/bench".into(),
        "3".into(),
        "40".into(),
        "400".into(),
    ];
    let outcome = vm::run_in_vm(
        KernelId::Debian12,
        &files,
        &command,
        &[],
        Duration::from_secs(40 * 60),
    )?;
    if outcome.exit_code != 0 {
        bail!(
            "the benchmark failed in the VM (exit code {}):\n{}",
            outcome.exit_code,
            outcome.output
        );
    }
    let lsm = last_json(&outcome.output)?;
    std::fs::write(out_dir.join("debian12-lsm.json"), lsm.to_string())?;

    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "", "baseline", "unlabelled", "labelled", "ratio u", "ratio l"
    );
    for (env, j) in [("this machine", &native), ("debian12 VM (lsm)", &lsm)] {
        for op in ["exec", "connect"] {
            let ns = |k: &str| j[format!("{op}_{k}_ns")].as_u64().unwrap_or(0);
            let ratio = |k: &str| j[format!("{op}_{k}_ratio")].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<28} {:>10}ns {:>10}ns {:>10}ns {:>8.3}{} {:>8.3}{}",
                format!("{env}: {op}"),
                ns("baseline"),
                ns("unlabelled"),
                ns("labelled"),
                ratio("unlabelled"),
                mark(ratio("unlabelled") <= UNLABELLED_TARGET),
                ratio("labelled"),
                mark(ratio("labelled") <= LABELLED_TARGET),
            );
        }
    }
    println!(
        "targets: unlabelled <= {UNLABELLED_TARGET}x, labelled-allowed <= {LABELLED_TARGET}x (* = met)"
    );
    println!("results: {}", out_dir.display());
    Ok(())
}

fn mark(met: bool) -> &'static str {
    if met { "*" } else { " " }
}

/// The last line of `output` that parses as a JSON object.
fn last_json(output: &str) -> Result<serde_json::Value> {
    output
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l.trim())
                .ok()
                .filter(serde_json::Value::is_object)
        })
        .context("the benchmark printed no result")
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_result_line() {
        let j = super::last_json("round 1\n{\"exec_baseline_ns\":5}\ntrailing\n").unwrap();
        assert_eq!(j["exec_baseline_ns"], 5);
        assert!(super::last_json("nothing").is_err());
    }
}
