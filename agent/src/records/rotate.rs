//! Host key rotation: the chain is handed to a new key by a `key-rotated` record signed by
//! the old one, so a verifier that trusts the old key follows the chain to the new.
//!
//! Crash safety: the new key is written beside the old as `KEY.next` (0600) first; the
//! record is appended (synced); only then is `KEY.next` renamed over the key and `KEY.pub`
//! rewritten. At start, [`finish_interrupted`] completes a rotation whose record is the
//! spool's last one, and drops a `KEY.next` whose record was never written.
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::{Body, RecordError, spool::Spool};
use crate::sign::{self, keys};

fn key_err(e: sign::SignError) -> RecordError {
    RecordError::Sign(e)
}

/// Where the next key waits while a rotation is in progress.
#[must_use]
pub fn next_path(key_path: &Path) -> PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(".next");
    p.into()
}

/// Rotates the key at `key_path` that signs `spool`; the new key and the record's seq.
pub fn rotate(spool: &mut Spool, key_path: &Path) -> Result<(SigningKey, u64), RecordError> {
    let new = keys::generate().map_err(key_err)?;
    let next = next_path(key_path);
    keys::write_private(&next, &new).map_err(key_err)?;
    let seq = match spool.rotate(new.clone()) {
        Ok(seq) => seq,
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
    };
    install(&next, key_path, &new)?;
    Ok((new, seq))
}

fn install(next: &Path, key_path: &Path, key: &SigningKey) -> Result<(), RecordError> {
    std::fs::rename(next, key_path).map_err(|source| RecordError::Io {
        path: key_path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    keys::write_public(&keys::public_path(key_path), &key.verifying_key()).map_err(key_err)
}

/// What [`finish_interrupted`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Interrupted {
    /// No rotation was in progress.
    None,
    /// The record was written: the new key is now the key.
    Finished,
    /// The record was never written: the old key stays.
    Abandoned,
}

/// Completes or abandons a rotation interrupted by a crash (call before loading the key).
pub fn finish_interrupted(key_path: &Path, spool_dir: &Path) -> Result<Interrupted, RecordError> {
    let next = next_path(key_path);
    if !next.exists() {
        return Ok(Interrupted::None);
    }
    let new = keys::load_private(&next).map_err(key_err)?;
    let new_id = sign::key_id(&new.verifying_key()).0;
    let head = if spool_dir.is_dir() {
        super::spool::read(spool_dir)?
            .records
            .pop()
            .and_then(|s| super::peek(&s.envelope).ok())
    } else {
        None
    };
    if matches!(head.map(|r| r.body), Some(Body::KeyRotated { new_key_id, .. }) if new_key_id == new_id)
    {
        install(&next, key_path, &new)?;
        Ok(Interrupted::Finished)
    } else {
        std::fs::remove_file(&next).map_err(|source| RecordError::Io {
            path: next.clone(),
            source,
        })?;
        Ok(Interrupted::Abandoned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{
        spool,
        verify::{Keys, Verifier},
    };

    fn heartbeat() -> Body {
        Body::Heartbeat {
            pending: 0,
            interval_secs: 1,
        }
    }

    #[test]
    fn rotation_replaces_the_key_and_the_old_key_verifies_the_whole_chain() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("host.key");
        let (old, _) = keys::load_or_create(&key_path).unwrap();
        let mut s = Spool::open(&dir.path().join("spool"), old.clone(), "h").unwrap();
        s.append(heartbeat()).unwrap();
        let (new, seq) = rotate(&mut s, &key_path).unwrap();
        assert_eq!(seq, 2);
        s.append(heartbeat()).unwrap();
        assert_eq!(
            keys::load_private(&key_path).unwrap().to_bytes(),
            new.to_bytes()
        );
        assert_eq!(
            keys::load_public(&keys::public_path(&key_path)).unwrap(),
            new.verifying_key()
        );
        assert!(!next_path(&key_path).exists());
        let mut k = Keys::default();
        k.add_host(old.verifying_key());
        let mut v = Verifier::new(k);
        for r in spool::read(&dir.path().join("spool")).unwrap().records {
            v.feed(&r.envelope, "spool");
        }
        let report = v.finish(&[]);
        assert!(report.ok(), "{:?}", report.failures);
        assert_eq!(report.valid, 3);
    }

    #[test]
    fn an_interrupted_rotation_is_finished_or_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("host.key");
        let spool_dir = dir.path().join("spool");
        let (old, _) = keys::load_or_create(&key_path).unwrap();
        let mut s = Spool::open(&spool_dir, old.clone(), "h").unwrap();
        s.append(heartbeat()).unwrap();
        // Crash after the next key was written, before the record: abandoned.
        let next = keys::generate().unwrap();
        keys::write_private(&next_path(&key_path), &next).unwrap();
        assert_eq!(
            finish_interrupted(&key_path, &spool_dir).unwrap(),
            Interrupted::Abandoned
        );
        assert_eq!(
            keys::load_private(&key_path).unwrap().to_bytes(),
            old.to_bytes()
        );
        // Crash after the record, before the rename: finished.
        keys::write_private(&next_path(&key_path), &next).unwrap();
        s.rotate(next.clone()).unwrap();
        drop(s);
        assert_eq!(
            finish_interrupted(&key_path, &spool_dir).unwrap(),
            Interrupted::Finished
        );
        assert_eq!(
            keys::load_private(&key_path).unwrap().to_bytes(),
            next.to_bytes()
        );
        let s = Spool::open(&spool_dir, next, "h").unwrap();
        assert_eq!(s.next_seq(), 3, "the chain goes on under the new key");
        assert_eq!(
            finish_interrupted(&key_path, &spool_dir).unwrap(),
            Interrupted::None
        );
    }
}
