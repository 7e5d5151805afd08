//! Signatures shared by everything countersign signs: the daemon's escalations, the
//! approver's decisions and the host's decision records.
//!
//! - payloads are JSON in RFC 8785 canonical form ([`canonical`]), so the bytes signed are
//!   the same whoever re-serialises the value;
//! - signatures are Ed25519 inside DSSE envelopes ([`dsse`]): the signature covers the payload
//!   type too, so a decision can never be replayed as a record or the reverse;
//! - keys are PKCS#8 / SPKI PEM files ([`keys`]), readable with standard tools (`openssl pkey`).
pub mod dsse;
pub mod keys;
pub mod statement;

pub use keys::key_id;

/// Why signing or verifying failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The value cannot be written as canonical JSON (e.g. a float that is not finite).
    #[error("canonical JSON: {0}")]
    Canonical(String),
    /// The envelope is not of the expected form.
    #[error("envelope: {0}")]
    Envelope(String),
    /// No signature by the expected key verifies.
    #[error("signature: {0}")]
    Signature(String),
    /// A key file cannot be read, written or parsed.
    #[error("key {path}: {message}")]
    Key { path: String, message: String },
}

/// `value` as RFC 8785 (JCS) canonical JSON.
pub fn canonical<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, SignError> {
    serde_jcs::to_vec(value).map_err(|e| SignError::Canonical(e.to_string()))
}

/// Lowercase hex SHA-256 of `bytes`.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lowercase hex.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_and_has_no_whitespace() {
        let v = serde_json::json!({"b": 1, "a": [true, null, "x\u{1}"], "c": {"z": 0, "y": -3}});
        assert_eq!(
            String::from_utf8(canonical(&v).unwrap()).unwrap(),
            r#"{"a":[true,null,"x\u0001"],"b":1,"c":{"y":-3,"z":0}}"#
        );
    }

    #[test]
    fn canonical_matches_rfc8785_number_and_string_examples() {
        // From RFC 8785 section 3.2.2: numbers in their shortest ES6 form, strings with only
        // the mandatory escapes.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"string":"\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/"}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(canonical(&v).unwrap()).unwrap(),
            "{\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"€$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}"
        );
    }

    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
