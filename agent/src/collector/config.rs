//! The collector's configuration file (YAML) and its defaults.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// TLS for the collector's listener (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    pub listen: SocketAddr,
    /// HTTPS when set; plain HTTP otherwise (records and receipts are signed either way, but
    /// only TLS keeps them confidential).
    pub tls: Option<Tls>,
    /// sqlx URL: `sqlite://PATH` (made if missing) or `postgres://…`.
    pub database: String,
    /// The collector's signing key (receipts, heads, digests); made at the first start.
    pub key: PathBuf,
    /// Enrolled hosts: their public key files (SPKI PEM, the daemon's `host.key.pub`). Records
    /// signed by any other key are refused; a host's new key is accepted only through a
    /// `key-rotated` record signed by its enrolled key.
    pub hosts: Vec<PathBuf>,
    /// Approver public keys: embedded approver decisions are checked against them.
    pub approver_keys: Vec<PathBuf>,
    /// SHA-256 (hex) of the bearer tokens that may read `GET /v1/export` (none: the export
    /// endpoint is off). Make one with `head -c 32 /dev/urandom | base64`, store its
    /// `sha256sum` here.
    pub export_tokens_sha256: Vec<String>,
    /// SHA-256 (hex) of the bearer tokens of readers: security teams and SIEMs. Every read
    /// endpoint (`/v1/heads`, `/v1/alerts`, `/v1/ocsf`, `/v1/export`) needs one (none: they
    /// answer 401 to everyone). Hosts need none: they are known by their signatures.
    pub reader_tokens_sha256: Vec<String>,
    /// What one client may hold: connections, timeouts, bodies in flight.
    pub limits: crate::serve::Limits,
    /// A chain whose last record is not a `daemon-stop` and that has not moved for this
    /// long raises a `silent` alert (hosts send a heartbeat every minute by default).
    pub silence_alert_secs: u64,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            // Loopback until an operator chooses where to listen.
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            tls: None,
            database: format!("sqlite://{}", crate::paths::DEFAULT_COLLECTOR_DB),
            key: PathBuf::from(crate::paths::DEFAULT_COLLECTOR_KEY),
            hosts: Vec::new(),
            approver_keys: Vec::new(),
            export_tokens_sha256: Vec::new(),
            reader_tokens_sha256: Vec::new(),
            limits: crate::serve::Limits::default(),
            // Five missed default heartbeats.
            silence_alert_secs: 300,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectorConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    /// A value is not acceptable.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl CollectorConfig {
    pub fn load(path: &Path) -> Result<Self, CollectorConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| CollectorConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(&text).map_err(|source| CollectorConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?
        };
        if !(c.database.starts_with("sqlite:") || c.database.starts_with("postgres")) {
            return Err(CollectorConfigError::Invalid {
                path: path.to_path_buf(),
                field: "database".into(),
                message: format!("`{}` is neither sqlite://PATH nor postgres://…", c.database),
            });
        }
        if let Err((field, message)) = c.limits.check() {
            return Err(CollectorConfigError::Invalid {
                path: path.to_path_buf(),
                field: field.into(),
                message,
            });
        }
        for (field, tokens) in [
            ("export_tokens_sha256", &c.export_tokens_sha256),
            ("reader_tokens_sha256", &c.reader_tokens_sha256),
        ] {
            if let Some(bad) = tokens
                .iter()
                .find(|t| t.trim().len() != 64 || !t.trim().bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(CollectorConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: field.into(),
                    message: format!("`{bad}` is not a SHA-256 in hex (64 digits)"),
                });
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_file_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("collector.yaml");
        std::fs::write(
            &p,
            "listen: 0.0.0.0:9000\ndatabase: sqlite:///tmp/x.db\nhosts: [/etc/h.pub]\n",
        )
        .unwrap();
        let c = CollectorConfig::load(&p).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.hosts, [PathBuf::from("/etc/h.pub")]);
        std::fs::write(&p, "database: mysql://x\n").unwrap();
        let e = CollectorConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("database"), "{e}");
        std::fs::write(&p, "listen: 1.2.3.4:1\nhost: []\n").unwrap();
        let e = CollectorConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `host`"), "{e}");
    }
}
