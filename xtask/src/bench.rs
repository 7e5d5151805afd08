//! `cargo xtask bench`: the benchmarks (not tests). `cs-bench suite` (tests/src/bin) times an
//! exec loop, a connect loop, a UDP send loop and a file open+read loop without the daemon, with the daemon for an unlabelled
//! process, and for a labelled process whose actions the policy allows, in rounds interleaved
//! in one run; this task runs it on this machine (the mode the daemon picks here), in the
//! Debian 12 VM in LSM mode and in the Debian 13 VM booted without `bpf` in `lsm=` (the
//! fallback, as most hosts run it), prints medians and ratios to the baseline judged by
//! each mode's targets, and writes them as JSON under `target/bench/`. The VMs have one
//! processor on an instruction clock ([`vm::Clock::Instructions`]): their times are work
//! done, not the emulating host's speed.
//!
//! The ratios are paired: each round's setting is divided by the same round's baseline, so
//! that slow drift of a shared machine cancels, and the median of those ratios is reported
//! with a distribution-free 95% interval (order statistics of the binomial). A target counts
//! as met only when the whole interval is at or under it, as missed when the whole interval
//! is over it, and otherwise as not established by the run. Both costs the loops report are
//! judged: wall-clock time and CPU time (see `cs-bench`).
use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{kernels::KernelId, paths, process::run_ok, process::run_streaming, vm};

/// Targets from the issues: ratio to the no-daemon baseline, per mode (unlabelled,
/// labelled allowed). The fallback holds without BPF LSM (syscall tracepoints, cgroup
/// programs), and its targets are looser.
#[derive(Clone, Copy, Debug)]
struct Targets {
    unlabelled: f64,
    labelled: f64,
}

const LSM_TARGETS: Targets = Targets {
    unlabelled: 1.01,
    labelled: 1.03,
};
const FALLBACK_TARGETS: Targets = Targets {
    unlabelled: 1.03,
    labelled: 1.05,
};

/// The VM runs of the benchmark: each kernel, boot and daemon mode whose figures the README
/// carries. Booted without BPF LSM, `lsm` runs the LSM programs at the `security_*`
/// functions.
const VM_BENCHES: [(KernelId, vm::Lsm, &str); 3] = [
    (KernelId::Debian12, vm::Lsm::Bpf, "lsm"),
    (KernelId::Debian13, vm::Lsm::NoBpf, "lsm"),
    (KernelId::Debian13, vm::Lsm::NoBpf, "fallback"),
];

/// Runs the benchmark everywhere, or only in `only` (`native`, or a VM environment named as
/// its results file is, without `.json`).
pub fn run_bench(only: Option<&str>) -> Result<()> {
    let names: Vec<String> = ["native".to_owned(), "decisions".to_owned()]
        .into_iter()
        .chain(
            VM_BENCHES
                .iter()
                .map(|(kernel, lsm, mode)| vm_bench_name(*kernel, *lsm, mode)),
        )
        .collect();
    if let Some(only) = only
        && !names.iter().any(|n| n == only)
    {
        bail!(
            "--only {only}: no such environment (one of: {})",
            names.join(", ")
        );
    }
    let wanted = |name: &str| only.is_none_or(|o| o == name);
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

    let mut results = Vec::new();
    if wanted("native") {
        println!("xtask bench: on this machine ({NATIVE_ROUNDS} rounds)");
        let native = run_ok(
            Command::new(release.join("cs-bench"))
                .arg("suite")
                .arg(release.join("countersign"))
                .arg(out_dir.join("work"))
                .args([NATIVE_ROUNDS, "200", "2000", "20000", "50000"]),
            Duration::from_secs(60 * 60),
            "the benchmark on this machine",
        )?;
        let native = last_json(&native)?;
        std::fs::write(out_dir.join("native.json"), native.to_string())?;

        // This machine's daemon runs in the mode its kernel allows, judged by that mode's
        // targets.
        let native_targets = if host_has_bpf_lsm() {
            LSM_TARGETS
        } else {
            FALLBACK_TARGETS
        };
        results.push((
            "this machine".to_owned(),
            native,
            "native.json".to_owned(),
            native_targets,
        ));
    }
    if wanted("decisions") {
        decisions(&release, &out_dir)?;
    }
    for (kernel, lsm, mode) in VM_BENCHES {
        let name = vm_bench_name(kernel, lsm, mode);
        if !wanted(&name) {
            continue;
        }
        let j = bench_in_vm(kernel, lsm, mode)?;
        let targets = if mode == "lsm" {
            LSM_TARGETS
        } else {
            FALLBACK_TARGETS
        };
        results.push((
            format!("{kernel} VM ({}, {mode} mode)", lsm.name()),
            j,
            format!("{name}.json"),
            targets,
        ));
    }

    let mut rows = Vec::new();
    for (env, j, file, targets) in &results {
        let summary = summarise(j, *targets).with_context(|| format!("the results of {env}"))?;
        let mut all = j.clone();
        all["summary"] = serde_json::to_value(&summary)?;
        std::fs::write(out_dir.join(file), serde_json::to_string_pretty(&all)?)?;
        rows.extend(summary.into_iter().map(|r| (env.as_str(), r)));
    }
    if rows.is_empty() {
        println!("results: {}", out_dir.display());
        return Ok(());
    }
    println!();
    println!(
        "{:<30} {:>11} {:>11} {:>24} {:>24}",
        "median per operation", "baseline", "setting", "wall ratio [95%]", "CPU ratio [95%]"
    );
    for (env, r) in &rows {
        let cell = |j: &Judged| {
            format!(
                "{:.3} [{:.3}-{:.3}] {}",
                j.median,
                j.low,
                j.high,
                j.verdict.mark()
            )
        };
        println!(
            "{:<30} {:>11} {:>11} {:>24} {:>24}",
            format!("{env}: {} {}", r.op, r.setting),
            human_ns(r.baseline_ns),
            human_ns(r.setting_ns),
            cell(&r.wall),
            cell(&r.cpu),
        );
    }
    println!(
        "targets: LSM mode unlabelled <= {}x, labelled-allowed <= {}x; fallback unlabelled <= {}x, \
         labelled-allowed <= {}x (each row's is in its JSON); met = the whole interval is at or \
         under the target, missed = the whole interval is over it, ? = not established by this run",
        LSM_TARGETS.unlabelled,
        LSM_TARGETS.labelled,
        FALLBACK_TARGETS.unlabelled,
        FALLBACK_TARGETS.labelled,
    );
    println!("results: {}", out_dir.display());
    Ok(())
}

/// Daemon-made decisions on this machine (`cs-bench decisions`): one labelled process at a
/// time (the hold → release latency of a decision the policy makes in the daemon, its record
/// durable first), then many at once (decisions per second, with group commit). Printed, and
/// written to `decisions.json`. Targets (issue: the daemon under load): at least 20 000
/// decisions/s, p99 at most 250 µs.
fn decisions(release: &std::path::Path, out_dir: &std::path::Path) -> Result<()> {
    let mut runs = Vec::new();
    for (workers, each) in [(1, 2000), (64, 50)] {
        let out = run_ok(
            Command::new(release.join("cs-bench"))
                .arg("decisions")
                .arg(release.join("countersign"))
                .arg(out_dir.join("work"))
                .args([workers.to_string(), each.to_string()]),
            Duration::from_secs(10 * 60),
            "the decisions benchmark",
        )?;
        let mut j = last_json(&out)?;
        j["workers"] = workers.into();
        runs.push(j);
    }
    println!();
    println!("daemon-made decisions (a deny rule; each held, recorded durably, released):");
    for j in &runs {
        println!(
            "  {:>3} process(es) at once: {:>7.0} decisions/s, hold -> release p50 {} us, p99 {} us",
            j["workers"],
            j["per_sec"].as_f64().unwrap_or(0.0),
            j["p50_us"],
            j["p99_us"]
        );
    }
    println!("  targets: >= 20000 decisions/s, p99 <= 250 us");
    std::fs::write(
        out_dir.join("decisions.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    Ok(())
}

/// A VM environment's name (`--only`) and results file's stem.
fn vm_bench_name(kernel: KernelId, lsm: vm::Lsm, mode: &str) -> String {
    format!("{kernel}-{}-{mode}", lsm.name())
}

const NATIVE_ROUNDS: &str = "21";
const VM_ROUNDS: &str = "21";

/// Whether this machine's kernel runs BPF LSM programs (`bpf` among its active LSMs); the
/// daemon's `auto` mode also tries to load one.
fn host_has_bpf_lsm() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"))
}

/// Runs `cs-bench suite` in a VM booting `kernel` on the instruction clock; its JSON.
fn bench_in_vm(kernel: KernelId, lsm: vm::Lsm, mode: &str) -> Result<serde_json::Value> {
    let boot = lsm.name();
    println!(
        "xtask bench: in a VM booting {kernel} ({boot}, {mode} mode, {VM_ROUNDS} rounds, one processor, instruction clock)"
    );
    let release = paths::target_dir().join("release");
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
        VM_ROUNDS.into(),
        "100".into(),
        "2000".into(),
        "5000".into(),
        "10000".into(),
    ];
    let outcome = vm::run_in_vm(
        kernel,
        lsm,
        vm::Clock::Instructions,
        &files,
        &command,
        &[("CS_BENCH_MODE".to_owned(), mode.to_owned())],
        Duration::from_secs(40 * 60),
    )?;
    if outcome.exit_code != 0 {
        bail!(
            "the benchmark failed in the {kernel} VM, {mode} mode (exit code {}):\n{}",
            outcome.exit_code,
            outcome.output
        );
    }
    last_json(&outcome.output)
}

/// One setting of one loop, judged against its target.
#[derive(Debug, serde::Serialize)]
struct Row {
    op: String,
    setting: String,
    target: f64,
    /// Median ns per operation (wall), baseline and this setting.
    baseline_ns: u64,
    setting_ns: u64,
    wall: Judged,
    cpu: Judged,
}

/// The median of the paired ratios, its interval, and what that says about the target.
#[derive(Debug, serde::Serialize)]
struct Judged {
    median: f64,
    low: f64,
    high: f64,
    /// How likely the interval is to hold the true median (≥ 0.95 from 6 rounds on).
    coverage: f64,
    verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Verdict {
    Met,
    Missed,
    NotEstablished,
}

impl Verdict {
    fn mark(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotEstablished => "?",
        }
    }
}

/// Judges every (loop, setting) of one `cs-bench suite` result.
fn summarise(j: &serde_json::Value, targets: Targets) -> Result<Vec<Row>> {
    let series = |op: &str, setting: &str, cost: &str| -> Result<Vec<u64>> {
        j["samples"][op][setting][cost]
            .as_array()
            .with_context(|| format!("no samples.{op}.{setting}.{cost}"))?
            .iter()
            .map(|v| v.as_u64().context("a sample that is not a number"))
            .collect()
    };
    let mut rows = Vec::new();
    for op in ["exec", "connect", "send", "open"] {
        for (setting, target) in [
            ("unlabelled", targets.unlabelled),
            ("labelled", targets.labelled),
        ] {
            let judge = |cost: &str| -> Result<Judged> {
                let ratios =
                    paired_ratios(&series(op, "baseline", cost)?, &series(op, setting, cost)?)
                        .with_context(|| format!("{op} {setting} ({cost})"))?;
                Ok(judge(&ratios, target))
            };
            rows.push(Row {
                op: op.into(),
                setting: setting.into(),
                target,
                baseline_ns: median_u64(&series(op, "baseline", "wall")?),
                setting_ns: median_u64(&series(op, setting, "wall")?),
                wall: judge("wall")?,
                cpu: judge("cpu")?,
            });
        }
    }
    Ok(rows)
}

/// Each round's setting over the same round's baseline.
fn paired_ratios(baseline: &[u64], setting: &[u64]) -> Result<Vec<f64>> {
    if baseline.len() != setting.len() || baseline.is_empty() {
        bail!(
            "{} baseline samples for {} samples of the setting",
            baseline.len(),
            setting.len()
        );
    }
    if baseline.contains(&0) {
        bail!("a baseline sample of 0 ns");
    }
    Ok(baseline
        .iter()
        .zip(setting)
        .map(|(b, s)| *s as f64 / *b as f64)
        .collect())
}

/// The median of `ratios` with a distribution-free interval: the k-th smallest and k-th
/// largest, with k the largest index whose coverage stays at least 95% (for fewer than six
/// samples no k reaches that, and the interval is the whole range).
fn judge(ratios: &[f64], target: f64) -> Judged {
    let mut r = ratios.to_vec();
    r.sort_by(f64::total_cmp);
    let n = r.len();
    let median = if n % 2 == 1 {
        r[n / 2]
    } else {
        (r[n / 2 - 1] + r[n / 2]) / 2.0
    };
    // coverage(k) = 1 - 2 P(Binomial(n, 1/2) <= k - 1).
    let coverage = |k: usize| 1.0 - 2.0 * binomial_cdf_half(n, k - 1);
    let mut k = 1;
    while k < n.div_ceil(2) && coverage(k + 1) >= 0.95 {
        k += 1;
    }
    let (low, high) = (r[k - 1], r[n - k]);
    let verdict = if high <= target {
        Verdict::Met
    } else if low > target {
        Verdict::Missed
    } else {
        Verdict::NotEstablished
    };
    Judged {
        median,
        low,
        high,
        coverage: coverage(k),
        verdict,
    }
}

/// P(X <= k) for X ~ Binomial(n, 1/2).
fn binomial_cdf_half(n: usize, k: usize) -> f64 {
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut sum = term;
    for i in 1..=k.min(n) {
        term *= (n + 1 - i) as f64 / i as f64;
        sum += term;
    }
    sum
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `648 µs`, `8.87 µs`, `10.3 ms`.
fn human_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else {
        format!("{:.2} µs", ns / 1e3)
    }
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
    use super::*;

    #[test]
    fn the_interval_of_the_median_has_95_percent_coverage() {
        // n = 21: k = 6 (coverage 0.973; k = 7 would be 0.922).
        let ratios: Vec<f64> = (1..=21).map(f64::from).collect();
        let j = judge(&ratios, 100.0);
        assert_eq!((j.median, j.low, j.high), (11.0, 6.0, 16.0));
        assert!((j.coverage - 0.9734).abs() < 1e-3, "{}", j.coverage);
        // n = 7: only the whole range reaches 95% (0.984).
        let j = judge(&[7.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 100.0);
        assert_eq!((j.median, j.low, j.high), (4.0, 1.0, 7.0));
        assert!((j.coverage - 0.984).abs() < 1e-3);
        // n = 3: not even the whole range reaches it; it is reported as such.
        assert!(judge(&[1.0, 2.0, 3.0], 100.0).coverage < 0.95);
    }

    #[test]
    fn a_target_is_met_or_missed_only_by_the_whole_interval() {
        let around = |x: f64| vec![x - 0.02, x - 0.01, x, x + 0.01, x + 0.02, x, x];
        assert_eq!(judge(&around(1.0), 1.03).verdict, Verdict::Met);
        assert_eq!(judge(&around(1.1), 1.03).verdict, Verdict::Missed);
        assert_eq!(judge(&around(1.02), 1.03).verdict, Verdict::NotEstablished);
    }

    #[test]
    fn ratios_pair_rounds_and_refuse_bad_samples() {
        assert_eq!(
            paired_ratios(&[100, 200], &[110, 200]).unwrap(),
            vec![1.1, 1.0]
        );
        assert!(paired_ratios(&[100], &[1, 2]).is_err());
        assert!(paired_ratios(&[0], &[1]).is_err());
        assert!(paired_ratios(&[], &[]).is_err());
    }

    #[test]
    fn summarises_a_suite_result() {
        let s = |b: [u64; 6]| serde_json::json!({"wall": b, "cpu": b});
        let j = serde_json::json!({"samples": {
            "exec": {"baseline": s([100; 6]), "unlabelled": s([100; 6]), "labelled": s([200; 6])},
            "connect": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([10; 6])},
            "send": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([11; 6])},
            "open": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([10; 6])},
        }});
        let rows = summarise(&j, LSM_TARGETS).unwrap();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[7].op, "open");
        assert_eq!(rows[5].op, "send");
        assert_eq!(rows[5].wall.verdict, Verdict::Missed);
        assert_eq!(rows[0].wall.verdict, Verdict::Met);
        assert_eq!(rows[1].setting, "labelled");
        assert_eq!(rows[1].cpu.verdict, Verdict::Missed);
        assert!(summarise(&serde_json::json!({}), LSM_TARGETS).is_err());
        // 1.04 misses the LSM mode's labelled target and meets the fallback's.
        let j = serde_json::json!({"samples": {
            "exec": {"baseline": s([100; 6]), "unlabelled": s([100; 6]), "labelled": s([104; 6])},
            "connect": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([10; 6])},
            "send": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([10; 6])},
            "open": {"baseline": s([10; 6]), "unlabelled": s([10; 6]), "labelled": s([10; 6])},
        }});
        let lsm = summarise(&j, LSM_TARGETS).unwrap();
        let fallback = summarise(&j, FALLBACK_TARGETS).unwrap();
        assert_eq!(lsm[1].wall.verdict, Verdict::Missed);
        assert_eq!(fallback[1].wall.verdict, Verdict::Met);
        assert!((fallback[1].target - 1.05).abs() < 1e-9);
    }

    #[test]
    fn finds_the_result_line() {
        let j = super::last_json("round 1\n{\"exec_baseline_ns\":5}\ntrailing\n").unwrap();
        assert_eq!(j["exec_baseline_ns"], 5);
        assert!(super::last_json("nothing").is_err());
    }
}
