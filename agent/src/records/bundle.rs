//! The evidence bundle an auditor is given (`countersign records export`), and reading it
//! back (`countersign records verify BUNDLE`).
//!
//! ```text
//! records.jsonl         the raw signed records (DSSE envelopes), one per line, chain order
//! population.csv        one row per record: who asked, what, which rule, who decided, when
//! heads.json            the collector's signed statement of how far each chain reaches
//! keys/hosts/ID.pub     host public keys (SPKI PEM), named by key id
//! keys/approvers/ID.pub approver public keys
//! keys/collector.pub    the collector's public key (signs heads.json and receipts)
//! ocsf.jsonl            the decisions as OCSF events (for a SIEM)
//! verification.txt      the verifier's report when the bundle was made
//! ```
use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::{
    Body, Record,
    spool::MAX_RECORD_BYTES,
    verify::{Head, Keys},
};
use crate::sign::{self, dsse::Envelope, keys};

pub const RECORDS_FILE: &str = "records.jsonl";
pub const POPULATION_FILE: &str = "population.csv";
pub const HEADS_FILE: &str = "heads.json";
pub const REPORT_FILE: &str = "verification.txt";
pub const OCSF_FILE: &str = "ocsf.jsonl";
pub const KEYS_DIR: &str = "keys";
pub const COLLECTOR_KEY_FILE: &str = "collector.pub";
/// DSSE payload type of the collector's heads statement.
pub const PAYLOAD_HEADS: &str = "application/vnd.countersign.heads+json";
/// Most records a bundle may hold.
pub const MAX_RECORDS: usize = 10_000_000;
/// Most keys of one kind a bundle may hold.
const MAX_KEYS: usize = 10_000;

/// The collector's statement of what a bundle covers (payload of [`PAYLOAD_HEADS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadsStatement {
    pub v: u32,
    /// Key id of the collector's key.
    pub collector_key: String,
    /// RFC 3339.
    pub generated_at: String,
    /// The period (RFC 3339, record times), as asked.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Per chain: the first and last seq of the period the collector holds.
    pub heads: Vec<Head>,
}

/// Why a bundle cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A bundle as read.
#[derive(Debug)]
pub struct Bundle {
    /// Raw lines of `records.jsonl`.
    pub records: Vec<String>,
    pub keys: Keys,
    /// From `heads.json`, verified with the collector key (empty without the file).
    pub heads: Vec<Head>,
}

/// Reads the bundle in `dir`. `heads.json`, when present, must verify with
/// `keys/collector.pub`.
pub fn read(dir: &Path) -> Result<Bundle, BundleError> {
    let path = dir.join(RECORDS_FILE);
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    let mut records = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut reader, MAX_RECORD_BYTES as u64 * 2)
            .read_line(&mut line)
            .map_err(io(&path))?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') && n as u64 >= MAX_RECORD_BYTES as u64 * 2 {
            return Err(BundleError::Invalid {
                path,
                message: format!("line {} is too long for a record", records.len() + 1),
            });
        }
        let l = line.trim_end();
        if l.is_empty() {
            continue;
        }
        if records.len() >= MAX_RECORDS {
            return Err(BundleError::Invalid {
                path,
                message: format!("more than {MAX_RECORDS} records"),
            });
        }
        records.push(l.to_owned());
    }
    let mut k = Keys::default();
    for key in read_keys(&dir.join(KEYS_DIR).join("hosts"))? {
        k.add_host(key);
    }
    for key in read_keys(&dir.join(KEYS_DIR).join("approvers"))? {
        k.add_approver(key);
    }
    let heads_path = dir.join(HEADS_FILE);
    let heads =
        if heads_path.is_file() {
            let collector = keys::load_public(&dir.join(KEYS_DIR).join(COLLECTOR_KEY_FILE))
                .map_err(|e| BundleError::Invalid {
                    path: heads_path.clone(),
                    message: format!("cannot be checked without the collector key: {e}"),
                })?;
            read_heads(&heads_path, &collector)?.heads
        } else {
            Vec::new()
        };
    Ok(Bundle {
        records,
        keys: k,
        heads,
    })
}

/// The heads statement at `path`, verified with `collector`.
pub fn read_heads(path: &Path, collector: &VerifyingKey) -> Result<HeadsStatement, BundleError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let env: Envelope = serde_json::from_str(&text).map_err(|e| BundleError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a DSSE envelope: {e}"),
    })?;
    env.verify_json(PAYLOAD_HEADS, collector)
        .map_err(|e| BundleError::Invalid {
            path: path.to_path_buf(),
            message: format!("collector signature: {e}"),
        })
}

fn read_keys(dir: &Path) -> Result<Vec<VerifyingKey>, BundleError> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pub") {
            if out.len() >= MAX_KEYS {
                return Err(BundleError::Invalid {
                    path: dir.to_path_buf(),
                    message: format!("more than {MAX_KEYS} keys"),
                });
            }
            out.push(keys::load_public(&p).map_err(|e| BundleError::Invalid {
                path: p.clone(),
                message: e.to_string(),
            })?);
        }
    }
    Ok(out)
}

/// Verifies the bundle in `dir` with `keys`, or the bundle's own `keys/` for whichever kind
/// `keys` has none of.
pub fn verify(dir: &Path, mut keys: Keys) -> Result<super::verify::Report, BundleError> {
    let b = read(dir)?;
    if keys.hosts.is_empty() {
        keys.hosts = b.keys.hosts;
    }
    if keys.approvers.is_empty() {
        keys.approvers = b.keys.approvers;
    }
    let mut v = super::verify::Verifier::new(keys);
    for (i, line) in b.records.iter().enumerate() {
        let place = format!("{RECORDS_FILE} line {}", i + 1);
        match serde_json::from_str(line) {
            Ok(env) => v.feed(&env, &place),
            Err(e) => v.unreadable(place, format!("not a DSSE envelope: {e}")),
        }
    }
    Ok(v.finish(&b.heads))
}

/// What goes into a bundle.
pub struct Contents<'a> {
    /// Raw envelopes in chain order (as stored by the collector).
    pub records: &'a [String],
    pub host_keys: &'a [VerifyingKey],
    pub approver_keys: &'a [VerifyingKey],
    pub collector_key: &'a VerifyingKey,
    /// The signed [`HeadsStatement`].
    pub heads: &'a Envelope,
}

/// Writes a bundle into `dir` (made if missing; it must hold no bundle yet).
pub fn write(dir: &Path, c: &Contents<'_>) -> Result<(), BundleError> {
    if dir.join(RECORDS_FILE).exists() {
        return Err(BundleError::Invalid {
            path: dir.to_path_buf(),
            message: "already holds a bundle".into(),
        });
    }
    for sub in ["hosts", "approvers"] {
        let d = dir.join(KEYS_DIR).join(sub);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let write = |name: &Path, bytes: &[u8]| -> Result<(), BundleError> {
        std::fs::write(name, bytes).map_err(io(name))
    };
    let mut text = String::new();
    for r in c.records {
        text.push_str(r);
        text.push('\n');
    }
    write(&dir.join(RECORDS_FILE), text.as_bytes())?;
    write(
        &dir.join(POPULATION_FILE),
        population_csv(c.records).as_bytes(),
    )?;
    write(&dir.join(OCSF_FILE), ocsf_lines(c.records).as_bytes())?;
    write(
        &dir.join(HEADS_FILE),
        serde_json::to_string_pretty(c.heads)
            .expect("an envelope serialises")
            .as_bytes(),
    )?;
    for (sub, list) in [("hosts", c.host_keys), ("approvers", c.approver_keys)] {
        for k in list {
            write(
                &dir.join(KEYS_DIR)
                    .join(sub)
                    .join(format!("{}.pub", sign::key_id(k))),
                keys::public_pem(k).as_bytes(),
            )?;
        }
    }
    write(
        &dir.join(KEYS_DIR).join(COLLECTOR_KEY_FILE),
        keys::public_pem(c.collector_key).as_bytes(),
    )
}

/// The decisions among `records` as OCSF events, one per line.
#[must_use]
pub fn ocsf_lines(records: &[String]) -> String {
    let mut out = String::new();
    for line in records {
        if let Some(ev) = serde_json::from_str::<Envelope>(line)
            .ok()
            .and_then(|e| super::peek(&e).ok())
            .as_ref()
            .and_then(super::ocsf::event)
        {
            out.push_str(&ev.to_string());
            out.push('\n');
        }
    }
    out
}

/// The CSV header of the population.
pub const CSV_HEADER: &str = "host_id,host_name,chain_id,seq,time,type,decision,applied,by,request_id,kind,label,user,uid,binary,argv,destination,rule,on_behalf_of,approved_by,approver_decision";

/// One CSV row per record (the records' own claims: verify them with the bundle).
#[must_use]
pub fn population_csv(records: &[String]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for line in records {
        let Ok(env) = serde_json::from_str::<Envelope>(line) else {
            continue;
        };
        let Ok(r) = super::peek(&env) else {
            continue;
        };
        out.push_str(&csv_row(&r));
        out.push('\n');
    }
    out
}

fn csv_row(r: &Record) -> String {
    let mut f: Vec<String> = vec![
        r.host_id.clone(),
        r.host_name.clone(),
        r.chain_id.clone(),
        r.seq.to_string(),
        r.time.clone(),
        r.body.kind().to_owned(),
    ];
    match &r.body {
        Body::Decision(d) | Body::Outcome(d) => {
            let approvers = d
                .approver_decision
                .as_ref()
                .and_then(|e| e.unverified_payload().ok())
                .and_then(|b| serde_json::from_slice::<sign::statement::DecisionStatement>(&b).ok())
                .map(|st| {
                    st.approvals
                        .iter()
                        .map(|a| format!("{} ({}) {}", a.approver, a.identity, a.decision))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            let q = &d.request;
            f.extend([
                d.decision.clone(),
                d.applied.clone(),
                d.by.clone(),
                q.id.to_string(),
                q.kind.to_string(),
                q.label.clone(),
                q.user.clone().unwrap_or_default(),
                q.uid.to_string(),
                q.binary.clone().unwrap_or_default(),
                q.argv.join(" "),
                q.destination.clone().unwrap_or_default(),
                q.rule.clone().unwrap_or_default(),
                d.on_behalf_of.clone().unwrap_or_default(),
                approvers,
                if d.approver_decision.is_some() {
                    "embedded"
                } else {
                    ""
                }
                .to_owned(),
            ]);
        }
        Body::Request(q) => {
            let v = &q.request;
            f.extend([
                String::new(),
                String::new(),
                String::new(),
                v.id.to_string(),
                v.kind.to_string(),
                v.label.clone(),
                v.user.clone().unwrap_or_default(),
                v.uid.to_string(),
                v.binary.clone().unwrap_or_default(),
                v.argv.join(" "),
                v.destination.clone().unwrap_or_default(),
                v.rule.clone().unwrap_or_default(),
                q.on_behalf_of.clone().unwrap_or_default(),
                String::new(),
                String::new(),
            ]);
        }
        _ => f.extend(std::iter::repeat_n(String::new(), 15)),
    }
    f.iter().map(|s| csv_field(s)).collect::<Vec<_>>().join(",")
}

/// A CSV field (RFC 4180 quoting). Fields that a spreadsheet would run as a formula are
/// prefixed with `'`.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("a"), "a");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-5"), "-5");
    }
}
