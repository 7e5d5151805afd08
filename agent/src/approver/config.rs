//! `approver.yaml`: where the service listens, its store and key, the humans who may decide
//! and their identities per channel, groups, and the channels.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Default place of the approver's configuration.
pub const DEFAULT_CONFIG: &str = "/etc/countersign/approver.yaml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS certificate chain and key (PEM). Without it the service speaks plain HTTP, which
    /// is only accepted on a loopback address (behind a TLS-terminating proxy).
    pub tls: Option<TlsConfig>,
    /// `sqlite:///path/approver.db` (default) or `postgres://user@host/db` (several replicas).
    #[serde(default = "default_database")]
    pub database: String,
    /// The service's Ed25519 key: it signs every decision (made at the first start).
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// The URL people and hosts reach the service at (links in chat messages).
    pub public_url: Option<String>,
    /// One-time enrollment tokens for hosts, as lowercase hex SHA-256 of the token.
    #[serde(default)]
    pub enrollment_tokens: Vec<String>,
    /// The people who may decide.
    #[serde(default)]
    pub approvers: Vec<Approver>,
    /// Group name → approver names.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// The group asked when an escalation names none.
    pub default_group: Option<String>,
    pub slack: Option<crate::approver::channels::slack::SlackConfig>,
    pub teams: Option<crate::approver::channels::teams::TeamsConfig>,
    pub teams_webhook: Option<crate::approver::channels::teams::TeamsWebhookConfig>,
    pub webhook: Option<crate::approver::channels::webhook::WebhookConfig>,
    /// What one client may hold: connections, timeouts, bodies in flight.
    #[serde(default)]
    pub limits: crate::serve::Limits,
}

fn default_listen() -> SocketAddr {
    // Loopback by default: exposing the service is a decision, with TLS.
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_database() -> String {
    "sqlite:///var/lib/countersign/approver.db".into()
}
fn default_key() -> PathBuf {
    PathBuf::from("/var/lib/countersign/approver.key")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One human and the identities that prove them. Display names never count.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approver {
    /// Unique, as it appears in records.
    pub name: String,
    /// Compared with a label's `on_behalf_of` (separation of duties).
    pub email: Option<String>,
    pub slack: Option<SlackIdentity>,
    pub teams: Option<TeamsIdentity>,
    /// API/CLI bearer tokens, as lowercase hex SHA-256 (`countersign approver hash-token`).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Other identities of this person, compared for separation of duties: other email
    /// addresses, identity provider subjects (`okta:00u1abc`), Unix users (`unix:bob`).
    #[serde(default)]
    pub identities: Vec<String>,
}

impl Approver {
    /// Every identity known for this person: name, email, chat ids and `identities`.
    #[must_use]
    pub fn all_identities(&self) -> Vec<String> {
        let mut ids = vec![self.name.clone()];
        ids.extend(self.email.clone());
        if let Some(s) = &self.slack {
            ids.push(format!("slack:{}/{}", s.team, s.user));
            ids.push(s.user.clone());
        }
        if let Some(t) = &self.teams {
            ids.push(format!("teams:{}", t.aad_object_id));
            ids.push(t.aad_object_id.clone());
        }
        ids.extend(self.identities.iter().cloned());
        ids
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SlackIdentity {
    /// Workspace (team) id, e.g. `T0123ABC`.
    pub team: String,
    /// User id, e.g. `U0456DEF`.
    pub user: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TeamsIdentity {
    /// Microsoft Entra ID (AAD) object id of the user.
    pub aad_object_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid YAML of this shape (serde_yaml names line and column).
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ApproverConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "listen".into(),
                format!(
                    "{} is not a loopback address: give `tls` (cert and key), or listen on 127.0.0.1 behind a TLS proxy",
                    self.listen
                ),
            ));
        }
        if let Err((field, message)) = self.limits.check() {
            return Err(invalid(field.into(), message));
        }
        if !(self.database.starts_with("sqlite:") || self.database.starts_with("postgres")) {
            return Err(invalid(
                "database".into(),
                format!(
                    "`{}`: use sqlite:///path/file.db or postgres://…",
                    self.database
                ),
            ));
        }
        for (i, t) in self.enrollment_tokens.iter().enumerate() {
            if !is_sha256_hex(t) {
                return Err(invalid(
                    format!("enrollment_tokens[{i}]"),
                    "must be the lowercase hex SHA-256 of the token (`countersign approver hash-token`)".into(),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, a) in self.approvers.iter().enumerate() {
            if a.name.is_empty() || a.name.len() > 64 {
                return Err(invalid(
                    format!("approvers[{i}].name"),
                    "1 to 64 characters".into(),
                ));
            }
            if !names.insert(a.name.as_str()) {
                return Err(invalid(
                    format!("approvers[{i}].name"),
                    format!("`{}` appears twice", a.name),
                ));
            }
            for (j, t) in a.tokens.iter().enumerate() {
                if !is_sha256_hex(t) {
                    return Err(invalid(
                        format!("approvers[{i}].tokens[{j}]"),
                        "must be the lowercase hex SHA-256 of the token (`countersign approver hash-token`)".into(),
                    ));
                }
            }
        }
        for (g, members) in &self.groups {
            for m in members {
                if !names.contains(m.as_str()) {
                    return Err(invalid(
                        format!("groups.{g}"),
                        format!("`{m}` is not one of the approvers"),
                    ));
                }
            }
        }
        if let Some(sl) = &self.slack
            && sl.signing_secret.is_none()
            && sl.app_token.is_none()
        {
            return Err(invalid(
                "slack".into(),
                "give signing_secret (HTTP callbacks) or app_token (Socket Mode), or both".into(),
            ));
        }
        if let Some(g) = &self.default_group
            && !self.groups.contains_key(g)
        {
            return Err(invalid("default_group".into(), format!("no group `{g}`")));
        }
        Ok(())
    }

    /// The approver a channel identity proves, if any.
    #[must_use]
    pub fn by_slack(&self, team: &str, user: &str) -> Option<&Approver> {
        self.approvers.iter().find(|a| {
            a.slack
                .as_ref()
                .is_some_and(|s| s.team == team && s.user == user)
        })
    }

    #[must_use]
    pub fn by_aad(&self, object_id: &str) -> Option<&Approver> {
        self.approvers.iter().find(|a| {
            a.teams
                .as_ref()
                .is_some_and(|t| t.aad_object_id.eq_ignore_ascii_case(object_id))
        })
    }

    #[must_use]
    pub fn by_token_hash(&self, hash: &str) -> Option<&Approver> {
        self.approvers
            .iter()
            .find(|a| a.tokens.iter().any(|t| t == hash))
    }

    #[must_use]
    pub fn by_name(&self, name: &str) -> Option<&Approver> {
        self.approvers.iter().find(|a| a.name == name)
    }

    /// The groups `approver` belongs to.
    pub fn groups_of<'a>(&'a self, approver: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.groups
            .iter()
            .filter(move |(_, m)| m.iter().any(|n| n == approver))
            .map(|(g, _)| g.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ApproverConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("approver.yaml");
        std::fs::write(&p, text).unwrap();
        ApproverConfig::load(&p)
    }

    #[test]
    fn a_full_file_loads() {
        let c = load(
            "listen: 127.0.0.1:9000\ndatabase: sqlite:///tmp/a.db\napprovers:\n  - name: bob\n    email: bob@example.com\n    slack: {team: T1, user: U2}\ngroups:\n  dev: [bob]\ndefault_group: dev\n",
        )
        .unwrap();
        assert_eq!(c.by_slack("T1", "U2").unwrap().name, "bob");
        assert!(c.by_slack("T9", "U2").is_none());
        assert_eq!(c.groups_of("bob").collect::<Vec<_>>(), ["dev"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = load("listen: 0.0.0.0:9000\n").unwrap_err().to_string();
        assert!(e.contains("listen") && e.contains("tls"), "{e}");
        let e = load("groups:\n  dev: [nobody]\n").unwrap_err().to_string();
        assert!(e.contains("groups.dev") && e.contains("nobody"), "{e}");
        let e = load("approvers:\n  - name: a\n    tokens: [secret]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("approvers[0].tokens[0]"), "{e}");
        let e = load("listen: 127.0.0.1:1\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `bogus`") && e.contains("line 2"),
            "{e}"
        );
    }
}
