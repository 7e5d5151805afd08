//! What the daemon's shipper and the collector say to each other over HTTP(S).
//!
//! `POST /v1/records` with a [`Batch`]: the records in spool order. The collector answers
//! 200 with an [`Accepted`] whose receipt covers the batch's last record, or 409 with a
//! [`Refused`] naming the seq it expects (a gap), or why a record was refused. Receipts are
//! signed by the collector's key: the shipper moves its cursor only on a receipt that
//! verifies and names a record it holds, with that record's hash.
use serde::{Deserialize, Serialize};

use crate::sign::dsse::Envelope;

/// The path records are posted to.
pub const RECORDS_PATH: &str = "/v1/records";
/// DSSE payload type of a receipt (signed by the collector).
pub const PAYLOAD_RECEIPT: &str = "application/vnd.countersign.receipt+json";
/// Most records in one batch.
pub const MAX_BATCH: usize = 500;
/// Largest request body the collector reads.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub records: Vec<Envelope>,
}

/// The collector holds a chain up to (and including) this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub v: u32,
    /// Key id of the collector's key.
    pub collector_key: String,
    pub host_id: String,
    pub chain_id: String,
    pub seq: u64,
    /// [`crate::records::record_hash`] of that record.
    pub hash: String,
    /// RFC 3339.
    pub received_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    /// Records stored now.
    pub stored: usize,
    /// Records the collector already held (retries).
    pub duplicates: usize,
    /// Signed [`Receipt`] for the batch's last record.
    pub receipt: Envelope,
}

/// Where the collector stands on a chain it cannot take the next record of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub chain_id: String,
    /// The seq it needs next.
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    /// Which record (index in the batch, host, chain, seq) and why.
    pub error: String,
    /// For a gap: what to send next.
    pub expected: Option<Expected>,
    /// Records of the batch stored before the refused one.
    pub stored: usize,
    /// Signed [`Receipt`] for the last record stored from this batch, if any.
    pub receipt: Option<Envelope>,
    /// The refused record was not an enrolled host's (unreadable, unknown key, bad
    /// signature): anyone could have sent it. Not sent.
    #[serde(skip)]
    pub unauthenticated: bool,
}

/// The path of the authenticated export (`Authorization: Bearer TOKEN`).
pub const EXPORT_PATH: &str = "/v1/export";
/// Most records one export answer may carry (narrow the period beyond it).
pub const MAX_EXPORT_RECORDS: usize = 1_000_000;

/// The answer of [`EXPORT_PATH`]: what `countersign records verify URL` checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportAnswer {
    /// Raw envelopes (canonical JSON), per chain in seq order.
    pub records: Vec<String>,
    /// The collector's signed heads statement for the period.
    pub heads: Envelope,
    /// Enrolled host keys and approver keys (SPKI PEM): a verifier may use its own instead.
    pub host_keys: Vec<String>,
    pub approver_keys: Vec<String>,
}
