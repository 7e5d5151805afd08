//! The shipper: a background task of the daemon that sends the spool to the collector.
//!
//! It reads the records after the receipted cursor (never past a damaged frame), posts them
//! in order, and moves the cursor only on a receipt signed by the collector's key that names
//! a record of the batch with that record's hash. Failures are retried forever with
//! exponential backoff; nothing is deleted before it is receipted (segments wholly before the
//! cursor are removed, the last segment never). A collector that reports a gap makes the
//! shipper go back to what it expects, as long as the spool still holds it.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ed25519_dalek::VerifyingKey;

use super::spool::{self, Cursor, Stored};
use crate::collector::api::{
    Accepted, Batch, MAX_BATCH, PAYLOAD_RECEIPT, RECORDS_PATH, Receipt, Refused,
};

/// First retry delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often an idle shipper looks for new records.
pub const IDLE: Duration = Duration::from_millis(500);
/// Longest a single post may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Above this many unreceipted bytes the shipper raises an alarm (and drops nothing).
pub const BACKLOG_ALARM_BYTES: u64 = 256 * 1024 * 1024;

/// Why one round of shipping failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The spool or cursor cannot be read or written.
    #[error(transparent)]
    Spool(#[from] super::RecordError),
    /// The collector cannot be reached or did not answer.
    #[error("collector {url}: {message}")]
    Http { url: String, message: String },
    /// The collector refused a record.
    #[error("collector refused: {0}")]
    Refused(String),
    /// The receipt does not verify or does not match what was sent.
    #[error("receipt: {0}")]
    Receipt(String),
}

/// Where to ship to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The collector's base URL (`https://collector:7443`).
    pub url: String,
    pub key: VerifyingKey,
    /// A CA certificate (PEM) to trust for the collector's TLS certificate, besides the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// The HTTP client for `target` (rustls; the extra CA if one is configured).
pub fn client(target: &Target) -> Result<reqwest::Client, ShipError> {
    let err = |message: String| ShipError::Http {
        url: target.url.clone(),
        message,
    };
    let mut b = reqwest::Client::builder().timeout(POST_TIMEOUT);
    if let Some(pem) = &target.ca_pem {
        b = b.add_root_certificate(
            reqwest::Certificate::from_pem(pem).map_err(|e| err(format!("CA certificate: {e}")))?,
        );
    }
    b.build().map_err(|e| err(e.to_string()))
}

/// Ships forever (a task of the daemon).
pub async fn run(dir: PathBuf, target: Target) {
    let client = match client(&target) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make an HTTP client; records are not shipped");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    let mut alarmed = false;
    // The spool's size when everything in it was receipted: no need to read it again until
    // it grows.
    let mut idle_size = None;
    // Where the record after the receipted one begins: each round reads forward from there.
    let mut next = None;
    loop {
        if idle_size.is_some() && idle_size == Some(spool::size(&dir)) {
            tokio::time::sleep(IDLE).await;
            continue;
        }
        let size = spool::size(&dir);
        match round(&client, &dir, &target, &mut next).await {
            Ok(0) => {
                backoff = MIN_BACKOFF;
                idle_size = Some(size);
                tokio::time::sleep(IDLE).await;
            }
            Ok(n) => {
                backoff = MIN_BACKOFF;
                idle_size = None;
                tracing::debug!(records = n, "shipped");
            }
            Err(e) => {
                idle_size = None;
                let size = spool::size(&dir);
                if size > BACKLOG_ALARM_BYTES && !alarmed {
                    tracing::error!(
                        bytes = size,
                        "ALARM: the record spool is large and not shipping; nothing is dropped"
                    );
                }
                alarmed = size > BACKLOG_ALARM_BYTES;
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "shipping records failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::RecordError> + Send + 'static,
) -> Result<T, ShipError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ShipError::Spool(super::RecordError::Io {
                path: PathBuf::from("(spool task)"),
                source: std::io::Error::other(e.to_string()),
            })
        })?
        .map_err(ShipError::from)
}

/// Sends one batch; how many records the collector now holds from it. `next` is where the
/// record after the receipted one begins, if known (kept up to date here): the batch is read
/// from there, never from the spool's start again.
pub async fn round(
    client: &reqwest::Client,
    dir: &Path,
    target: &Target,
    next: &mut Option<spool::Position>,
) -> Result<usize, ShipError> {
    let d = dir.to_path_buf();
    let at = next.clone();
    let batch = blocking(move || {
        let cursor = spool::read_cursor(&d)?;
        let batch = spool::after_cursor_at(&d, cursor.as_ref(), at.as_ref(), MAX_BATCH)?;
        // Read forward, the batch must begin with the receipted record's successor (or a new
        // chain); anything else and the spool is read from its start.
        let follows = match (&cursor, batch.first()) {
            (Some(c), Some(first)) => super::peek(&first.envelope)
                .is_ok_and(|r| r.chain_id != c.chain_id || r.seq == c.seq + 1),
            _ => true,
        };
        if at.is_some() && !follows {
            return spool::after_cursor(&d, cursor.as_ref(), MAX_BATCH);
        }
        Ok(batch)
    })
    .await?;
    if batch.is_empty() {
        return Ok(0);
    }
    let url = format!("{}{RECORDS_PATH}", target.url.trim_end_matches('/'));
    let http = |message: String| ShipError::Http {
        url: url.clone(),
        message,
    };
    let body = Batch {
        records: batch.iter().map(|s| s.envelope.clone()).collect(),
    };
    let response = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| http(e.to_string()))?;
    if status.is_success() {
        let a: Accepted = serde_json::from_slice(&bytes)
            .map_err(|e| http(format!("not an answer to a batch: {e}")))?;
        let n = advance(dir, target, &batch, &a.receipt).await?;
        *next = Some(batch[n - 1].next());
        return Ok(n);
    }
    if status == reqwest::StatusCode::CONFLICT {
        let r: Refused = serde_json::from_slice(&bytes)
            .map_err(|e| http(format!("not an answer to a batch: {e}")))?;
        if let Some(receipt) = &r.receipt {
            let n = advance(dir, target, &batch, receipt).await?;
            *next = Some(batch[n - 1].next());
        }
        if let Some(expected) = r.expected {
            // The collector lacks records before the ones sent: go back to them.
            let d = dir.to_path_buf();
            let e = expected.clone();
            *next = None;
            let rewound = blocking(move || rewind(&d, &e.chain_id, e.seq)).await?;
            tracing::warn!(
                chain_id = expected.chain_id,
                seq = expected.seq,
                rewound,
                "the collector expects earlier records; sending again from there"
            );
        }
        return Err(ShipError::Refused(r.error));
    }
    Err(http(format!(
        "HTTP {status}: {}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    )))
}

/// Checks `receipt` against the batch and moves the cursor to the record it names.
async fn advance(
    dir: &Path,
    target: &Target,
    batch: &[Stored],
    receipt: &crate::sign::dsse::Envelope,
) -> Result<usize, ShipError> {
    let r: Receipt = receipt
        .verify_json(PAYLOAD_RECEIPT, &target.key)
        .map_err(|e| ShipError::Receipt(e.to_string()))?;
    let at = batch
        .iter()
        .position(|s| {
            super::peek(&s.envelope).is_ok_and(|rec| rec.chain_id == r.chain_id && rec.seq == r.seq)
        })
        .ok_or_else(|| {
            ShipError::Receipt(format!(
                "names chain {} seq {}, which was not sent",
                r.chain_id, r.seq
            ))
        })?;
    if batch[at].hash != r.hash {
        return Err(ShipError::Receipt(format!(
            "chain {} seq {}: the collector holds another record (hash {})",
            r.chain_id, r.seq, r.hash
        )));
    }
    let cursor = Cursor {
        chain_id: r.chain_id,
        seq: r.seq,
    };
    let d = dir.to_path_buf();
    // The segments before the receipted record's are receipted whole.
    let holder = batch[at].segment.clone();
    blocking(move || {
        spool::write_cursor(&d, &cursor)?;
        if let Err(e) = spool::prune_before(&d, &holder) {
            tracing::warn!(error = %e, "removing receipted segments failed");
        }
        Ok(())
    })
    .await?;
    Ok(at + 1)
}

/// Moves the cursor to just before record `seq` of `chain_id` (only if the spool holds it).
fn rewind(dir: &Path, chain_id: &str, seq: u64) -> Result<bool, super::RecordError> {
    let all = spool::read(dir)?.records;
    let Some(i) = all.iter().position(|s| {
        super::peek(&s.envelope).is_ok_and(|r| r.chain_id == chain_id && r.seq == seq)
    }) else {
        tracing::error!(
            chain_id,
            seq,
            "ALARM: the collector expects a record the spool no longer holds"
        );
        return Ok(false);
    };
    match i.checked_sub(1).map(|p| super::peek(&all[p].envelope)) {
        Some(Ok(before)) => spool::write_cursor(
            dir,
            &Cursor {
                chain_id: before.chain_id,
                seq: before.seq,
            },
        )?,
        Some(Err(_)) => return Ok(false),
        None => spool::remove_cursor(dir)?,
    }
    Ok(true)
}
