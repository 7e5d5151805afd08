//! `countersign records export`: an evidence bundle for a period, straight from the
//! collector's database, verified as it is written.
use std::path::Path;

use super::{Collector, CollectorError, config::CollectorConfig, store::StoreError, time_ms};
use crate::{
    records::{
        bundle::{self, HeadsStatement, PAYLOAD_HEADS},
        verify::{Head, Keys, Report},
    },
    sign::{self, dsse::Envelope},
};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Open(#[from] CollectorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// `--from` / `--to` are not RFC 3339 times.
    #[error("{0}: not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z)")]
    Time(String),
}

/// The records of a period and the collector's signed heads statement for them.
pub struct Period {
    /// Raw envelopes, per chain from the period's first to last seq.
    pub records: Vec<String>,
    /// The signed [`HeadsStatement`].
    pub heads: Envelope,
}

/// Reads the records whose time is in `[from, to)` (RFC 3339; open ends without).
pub async fn period(
    c: &Collector,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Period, ExportError> {
    let parse = |t: Option<&str>, default: i64| match t {
        None => Ok(default),
        Some(t) => time_ms(t).ok_or_else(|| ExportError::Time(t.to_owned())),
    };
    let (from_ms, to_ms) = (parse(from, i64::MIN)?, parse(to, i64::MAX)?);
    let store = c.store();
    let mut records = Vec::new();
    let mut heads = Vec::new();
    for (chain_id, host_id, first, last) in store.period(from_ms, to_ms).await? {
        records.extend(store.envelopes(&chain_id, first, last).await?);
        heads.push(Head {
            host_id,
            chain_id,
            seq: last,
            first: Some(first),
        });
    }
    let statement = HeadsStatement {
        v: 1,
        collector_key: sign::key_id(&c.public_key()).0,
        generated_at: crate::records::now_rfc3339(),
        from: from.map(str::to_owned),
        to: to.map(str::to_owned),
        heads,
    };
    let heads = Envelope::sign_json(PAYLOAD_HEADS, &statement, c.signing_key())
        .expect("a heads statement is canonical JSON");
    Ok(Period { records, heads })
}

/// Writes the bundle of records whose time is in `[from, to)` into `out`, then verifies it
/// (the report is written into the bundle and returned).
pub async fn export(
    config: &CollectorConfig,
    from: Option<&str>,
    to: Option<&str>,
    out: &Path,
) -> Result<Report, ExportError> {
    let c = Collector::open(config).await?;
    let Period {
        records,
        heads: signed,
    } = period(&c, from, to).await?;
    let host_keys = c.host_keys();
    let approver_keys = c.approver_keys();
    bundle::write(
        out,
        &bundle::Contents {
            records: &records,
            host_keys: &host_keys,
            approver_keys: &approver_keys,
            collector_key: &c.public_key(),
            heads: &signed,
        },
    )?;
    // Verify what was written, exactly as an auditor will.
    let report = bundle::verify(out, Keys::default())?;
    let path = out.join(bundle::REPORT_FILE);
    std::fs::write(&path, crate::cli::records::render(&report)).map_err(|source| {
        bundle::BundleError::Io {
            path: path.clone(),
            source,
        }
    })?;
    Ok(report)
}
