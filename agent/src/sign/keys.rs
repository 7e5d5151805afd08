//! Ed25519 key files: the private key as PKCS#8 PEM (mode 0600, made once), the public key as
//! SPKI PEM, and key ids.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{
        DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
        spki::der::pem::LineEnding,
    },
};

use super::SignError;

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// A key's id: the first 16 bytes of SHA-256 over the raw public key, in hex.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of `key`.
#[must_use]
pub fn key_id(key: &VerifyingKey) -> KeyId {
    KeyId(super::sha256_hex(key.as_bytes())[..32].to_owned())
}

fn err(path: &Path, message: impl std::fmt::Display) -> SignError {
    SignError::Key {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_small(path: &Path) -> Result<String, SignError> {
    let meta = fs::metadata(path).map_err(|e| err(path, e))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(err(path, "too large for a key file"));
    }
    fs::read_to_string(path).map_err(|e| err(path, e))
}

/// A fresh key from the operating system's random source.
pub fn generate() -> Result<SigningKey, SignError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| err(Path::new("(random source)"), e))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a private key; refuses one that others can read.
pub fn load_private(path: &Path) -> Result<SigningKey, SignError> {
    let meta = fs::metadata(path).map_err(|e| err(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(err(
            path,
            format!(
                "mode {:o}: a private key must be readable by its owner only (chmod 600)",
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    SigningKey::from_pkcs8_pem(&read_small(path)?)
        .map_err(|e| err(path, format!("not a PKCS#8 PEM Ed25519 private key: {e}")))
}

/// Reads the private key at `path`, making one (mode 0600, and `path.pub` beside it) if there
/// is none. Returns the key and whether it was made now.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), SignError> {
    if path.exists() {
        return Ok((load_private(path)?, false));
    }
    let key = generate()?;
    write_private(path, &key)?;
    write_public(&public_path(path), &key.verifying_key())?;
    Ok((key, true))
}

/// Where the public half of the key at `path` is written: `path` + `.pub`.
#[must_use]
pub fn public_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    p.into()
}

/// Writes a private key with mode 0600, atomically (a crash leaves the old file or none).
pub fn write_private(path: &Path, key: &SigningKey) -> Result<(), SignError> {
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| err(path, e))?;
    write_atomic(path, pem.as_bytes(), 0o600)
}

/// Writes a public key (SPKI PEM, mode 0644).
pub fn write_public(path: &Path, key: &VerifyingKey) -> Result<(), SignError> {
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| err(path, e))?;
    write_atomic(path, pem.as_bytes(), 0o644)
}

/// Reads an SPKI PEM public key.
pub fn load_public(path: &Path) -> Result<VerifyingKey, SignError> {
    parse_public(&read_small(path)?).map_err(|m| err(path, m))
}

/// Parses an SPKI PEM public key.
pub fn parse_public(pem: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|e| format!("not an SPKI PEM Ed25519 public key: {e}"))
}

/// `key` as SPKI PEM text.
#[must_use]
pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an Ed25519 public key always encodes")
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SignError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| err(&tmp, e))?;
    f.sync_all().map_err(|e| err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_only_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/host.key");
        let (k1, made) = load_or_create(&path).unwrap();
        assert!(made);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (k2, made) = load_or_create(&path).unwrap();
        assert!(!made);
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        let public = load_public(&public_path(&path)).unwrap();
        assert_eq!(public, k1.verifying_key());
        assert_eq!(key_id(&public).0.len(), 32);
    }

    #[test]
    fn a_private_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_private(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pub");
        fs::write(&path, "hello").unwrap();
        let e = load_public(&path).unwrap_err().to_string();
        assert!(e.contains("x.pub") && e.contains("SPKI"), "{e}");
    }
}
