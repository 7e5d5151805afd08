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
    /// For a URL: the collector's public key (pinned), a file with the export token, a CA
    /// certificate to trust, and the period.
    pub collector_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub from: Option<String>,
    pub to: Option<String>,
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
    if let Some(url) = path
        .to_str()
        .filter(|p| p.starts_with("https://") || p.starts_with("http://"))
    {
        return verify_url(url, args, keys);
    }
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

/// Fetches a period from the collector's export endpoint and verifies it: the heads
/// statement with the collector key given (never one the server sends), the records with
/// the keys given (or, for a kind none were given of, the collector's enrolled keys).
fn verify_url(url: &str, args: &VerifyArgs, mut keys: Keys) -> anyhow::Result<Report> {
    use crate::{
        collector::api::{EXPORT_PATH, ExportAnswer},
        records::bundle::{HeadsStatement, PAYLOAD_HEADS},
    };
    let collector_key = keys::load_public(args.collector_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!("verifying a URL needs the collector's public key (--collector-key)")
    })?)?;
    let token = match &args.token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("the token file {}", p.display()))?
            .trim()
            .to_owned(),
        None => bail!("verifying a URL needs the export token (--token-file)"),
    };
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(300));
    if let Some(ca) = &args.ca_file {
        client = client.add_root_certificate(reqwest::Certificate::from_pem(
            &std::fs::read(ca).with_context(|| format!("the CA file {}", ca.display()))?,
        )?);
    }
    let client = client.build()?;
    let mut query = Vec::new();
    if let Some(f) = &args.from {
        query.push(("from", f.clone()));
    }
    if let Some(t) = &args.to {
        query.push(("to", t.clone()));
    }
    let endpoint = format!("{}{EXPORT_PATH}", url.trim_end_matches('/'));
    let answer: ExportAnswer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let r = client
                .get(&endpoint)
                .query(&query)
                .bearer_auth(&token)
                .send()
                .await?;
            let status = r.status();
            if !status.is_success() {
                bail!(
                    "{endpoint}: HTTP {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(r.json::<ExportAnswer>().await?)
        })
        .with_context(|| format!("fetching {endpoint}"))?;
    let statement: HeadsStatement = answer
        .heads
        .verify_json(PAYLOAD_HEADS, &collector_key)
        .map_err(|e| anyhow::anyhow!("the collector's heads statement: {e}"))?;
    if keys.hosts.is_empty() {
        for pem in &answer.host_keys {
            keys.add_host(keys::parse_public(pem).map_err(anyhow::Error::msg)?);
        }
    }
    if keys.approvers.is_empty() {
        for pem in &answer.approver_keys {
            keys.add_approver(keys::parse_public(pem).map_err(anyhow::Error::msg)?);
        }
    }
    let mut v = Verifier::new(keys);
    for (i, line) in answer.records.iter().enumerate() {
        let place = format!("{endpoint} record {}", i + 1);
        match serde_json::from_str(line) {
            Ok(env) => v.feed(&env, &place),
            Err(e) => v.unreadable(place, format!("not a DSSE envelope: {e}")),
        }
    }
    Ok(v.finish(&statement.heads))
}
