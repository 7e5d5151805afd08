//! `countersign records verify`: checks a spool directory or an evidence bundle offline, with
//! nothing but public keys, and names every record that fails and why.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::{
    cli::client,
    paths,
    proto::{Request, Response},
    records::{
        bundle,
        spool::{self},
        verify::{Head, Keys, Report, Verifier},
    },
    sign::keys,
};

/// What `verify` was given.
pub struct VerifyArgs {
    pub path: PathBuf,
    /// Host public keys (SPKI PEM).
    pub host_keys: Vec<PathBuf>,
    /// Approver public keys (SPKI PEM).
    pub approver_keys: Vec<PathBuf>,
}

/// Verifies and prints the report; an error (exit status 1) when anything fails.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let report = run_verify(args)?;
    print!("{}", render(&report));
    if !report.ok() {
        bail!("verification failed: {}", report.summary());
    }
    Ok(())
}

/// The report as printed: failures, chains, the summary line last.
#[must_use]
pub fn render(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for f in &report.failures {
        let _ = writeln!(out, "FAIL {f}");
    }
    for ((host, chain), (first, last, n)) in &report.chains {
        let _ = writeln!(
            out,
            "chain: host {host} chain {chain}: seq {first}..{last}, {n} record(s)"
        );
    }
    let _ = writeln!(out, "{}", report.summary());
    out
}

fn run_verify(args: &VerifyArgs) -> anyhow::Result<Report> {
    let mut keys = Keys::default();
    for p in &args.host_keys {
        keys.add_host(keys::load_public(p)?);
    }
    for p in &args.approver_keys {
        keys.add_approver(keys::load_public(p)?);
    }
    let path = &args.path;
    if path.join(bundle::RECORDS_FILE).is_file() {
        verify_bundle(path, keys)
    } else if path.is_dir() && !spool::segments(path)?.is_empty() {
        verify_spool(path, keys)
    } else {
        bail!(
            "{}: neither an evidence bundle ({}) nor a spool directory (seg-*.log)",
            path.display(),
            bundle::RECORDS_FILE
        )
    }
}

fn verify_spool(dir: &Path, keys: Keys) -> anyhow::Result<Report> {
    if keys.hosts.is_empty() {
        bail!("give the host's public key (e.g. host.key.pub) with --key");
    }
    let contents = spool::read(dir)?;
    let mut v = Verifier::new(keys);
    for s in &contents.records {
        v.feed(
            &s.envelope,
            &format!("{} offset {}", s.segment.display(), s.offset),
        );
    }
    for (seg, offset, why) in contents.damaged {
        v.unreadable(format!("{} offset {offset}", seg.display()), why);
    }
    // What the collector receipted was in the spool: the chain reaches at least that far.
    let heads: Vec<Head> = spool::read_cursor(dir)?
        .map(|c| Head {
            host_id: String::new(),
            chain_id: c.chain_id,
            seq: c.seq,
            first: None,
        })
        .into_iter()
        .collect();
    Ok(v.finish(&heads))
}

fn verify_bundle(dir: &Path, keys: Keys) -> anyhow::Result<Report> {
    bundle::verify(dir, keys).with_context(|| format!("reading bundle {}", dir.display()))
}

/// `countersign records rotate-key`: the daemon hands its records chain to a new host key.
pub fn rotate_key(socket_dir: &Path) -> anyhow::Result<()> {
    let Response::KeyRotated { old, new, seq } =
        client::call(socket_dir, paths::CONTROL_SOCKET, &Request::RotateKey)?
    else {
        bail!("unexpected answer to rotate-key");
    };
    println!("host key rotated: {old} -> {new} (key-rotated record, seq {seq})");
    println!(
        "the chain goes on under the new key; verifiers and the collector follow it from the old key"
    );
    Ok(())
}
