//! DSSE envelopes (Dead Simple Signing Envelope, as used by in-toto and Sigstore): a payload,
//! its type, and signatures over `PAE(type, payload)`.
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{SignError, key_id};

/// Largest payload accepted when verifying (a record or decision is a few KiB).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Most signatures an envelope may carry.
pub const MAX_SIGNATURES: usize = 8;

/// One DSSE envelope, in its standard JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// What the payload is, e.g. `application/vnd.countersign.record+json`.
    pub payload_type: String,
    /// The payload, standard base64.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// [`key_id`] of the signing key.
    pub keyid: String,
    /// Ed25519 signature over the PAE, standard base64.
    pub sig: String,
}

/// DSSE's pre-authentication encoding: `DSSEv1 LEN(type) type LEN(body) body`.
#[must_use]
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + payload_type.len() + payload.len());
    out.extend_from_slice(
        format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` (already canonical bytes) as `payload_type` with `key`.
    #[must_use]
    pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Self {
        let sig = key.sign(&pae(payload_type, payload));
        Self {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: vec![Signature {
                keyid: key_id(&key.verifying_key()).0,
                sig: B64.encode(sig.to_bytes()),
            }],
        }
    }

    /// Signs the canonical JSON of `value`.
    pub fn sign_json<T: Serialize + ?Sized>(
        payload_type: &str,
        value: &T,
        key: &SigningKey,
    ) -> Result<Self, SignError> {
        Ok(Self::sign(payload_type, &super::canonical(value)?, key))
    }

    /// The payload bytes, if the type is `payload_type` and a signature by `key` verifies
    /// (strict Ed25519: no malleable signatures, no weak keys).
    pub fn verify(&self, payload_type: &str, key: &VerifyingKey) -> Result<Vec<u8>, SignError> {
        if self.payload_type != payload_type {
            return Err(SignError::Envelope(format!(
                "payload type is {:?}, expected {payload_type:?}",
                self.payload_type
            )));
        }
        if self.signatures.is_empty() || self.signatures.len() > MAX_SIGNATURES {
            return Err(SignError::Envelope(format!(
                "{} signatures (1 to {MAX_SIGNATURES} expected)",
                self.signatures.len()
            )));
        }
        if self.payload.len() > MAX_PAYLOAD_BYTES * 4 / 3 + 4 {
            return Err(SignError::Envelope("payload too large".into()));
        }
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| SignError::Envelope(format!("payload is not base64: {e}")))?;
        let want = key_id(key);
        let sig = self
            .signatures
            .iter()
            .find(|s| s.keyid == want.0)
            .ok_or_else(|| SignError::Signature(format!("no signature by key {want}")))?;
        let bytes: [u8; 64] = B64
            .decode(&sig.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignError::Signature("not a 64-byte base64 signature".into()))?;
        key.verify_strict(
            &pae(payload_type, &payload),
            &ed25519_dalek::Signature::from_bytes(&bytes),
        )
        .map_err(|_| {
            SignError::Signature(format!("the signature by key {want} does not verify"))
        })?;
        Ok(payload)
    }

    /// Verifies like [`Envelope::verify`] and parses the payload as JSON.
    pub fn verify_json<T: serde::de::DeserializeOwned>(
        &self,
        payload_type: &str,
        key: &VerifyingKey,
    ) -> Result<T, SignError> {
        let bytes = self.verify(payload_type, key)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SignError::Envelope(format!("payload is not the expected JSON: {e}")))
    }

    /// The key id of the first signature (which key to look up), if any.
    #[must_use]
    pub fn first_keyid(&self) -> Option<&str> {
        self.signatures.first().map(|s| s.keyid.as_str())
    }

    /// The payload without verifying it (to read which key or host it claims to be from).
    pub fn unverified_payload(&self) -> Result<Vec<u8>, SignError> {
        B64.decode(&self.payload)
            .map_err(|e| SignError::Envelope(format!("payload is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn signed_envelope_verifies_and_round_trips_through_json() {
        let k = key(1);
        let env = Envelope::sign_json("t", &serde_json::json!({"a": 1}), &k).unwrap();
        let text = serde_json::to_string(&env).unwrap();
        assert!(text.contains("\"payloadType\":\"t\""), "{text}");
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.verify("t", &k.verifying_key()).unwrap(), br#"{"a":1}"#);
    }

    #[test]
    fn tampering_wrong_key_and_wrong_type_fail() {
        let k = key(1);
        let env = Envelope::sign("t", b"{\"a\":1}", &k);
        let mut edited = env.clone();
        edited.payload = B64.encode(b"{\"a\":2}");
        assert!(matches!(
            edited.verify("t", &k.verifying_key()),
            Err(SignError::Signature(_))
        ));
        assert!(env.verify("t", &key(2).verifying_key()).is_err());
        assert!(matches!(
            env.verify("other", &k.verifying_key()),
            Err(SignError::Envelope(_))
        ));
        // A signature by another key under the right key id does not verify either.
        let mut forged = env.clone();
        forged.signatures[0].sig = Envelope::sign("t", b"{\"a\":1}", &key(2)).signatures[0]
            .sig
            .clone();
        assert!(forged.verify("t", &k.verifying_key()).is_err());
    }
}
