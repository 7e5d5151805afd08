//! The daemon's configuration file (YAML) and its defaults.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ebpf::ModeRequest, paths};

/// What happens to a request nobody decides in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    Deny,
    Kill,
    Allow,
}

impl std::fmt::Display for TimeoutAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutAction::Deny => "deny",
            TimeoutAction::Kill => "kill",
            TimeoutAction::Allow => "allow",
        })
    }
}

/// Fallback mode: how the execs of agents started by `countersign exec` are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum FallbackExecHold {
    /// Before they start, by a seccomp notifier the launcher hands to the daemon: nothing
    /// the agent does lets an exec run early, and an approved exec must load exactly what
    /// was approved. The notifier does not outlive the daemon: after a daemon restart the
    /// agent's execs fail (`ENOSYS`) until it is started again.
    #[default]
    Notify,
    /// After the new program has loaded, by a stop (and a ptrace stop against `SIGCONT`):
    /// held execs survive a daemon restart, but a process that traces itself or its
    /// children can run a held program early (README "Not held yet").
    Stop,
}

/// What a labelled task's attempt on countersign itself gets, besides being refused and
/// recorded (LSM mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTamper {
    /// The attempt fails with `EPERM`; the agent goes on.
    #[default]
    Deny,
    /// The task is killed as well.
    Kill,
}

/// What a stop (`SIGTERM`, `SIGINT`) leaves in the kernel once every held request is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStop {
    /// The hooks, labels and their state stay pinned, as after a crash: labelled processes
    /// stay labelled and their next actions wait for the next daemon, which takes them over
    /// (a restart for an upgrade is no way out). `countersign off` turns enforcement off.
    #[default]
    Keep,
    /// Enforcement is turned off and the pins removed: labelled processes go on unchecked.
    Off,
}

/// Where the daemon ships its records.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CollectorTarget {
    /// Base URL, e.g. `https://collector.example:7443`.
    pub url: String,
    /// The collector's public key (SPKI PEM): receipts must verify with it.
    pub public_key: PathBuf,
    /// A CA certificate (PEM) to trust for the collector's TLS certificate, besides the
    /// system's roots (e.g. a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A cgroup whose tasks, and everything below it, carry a label.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CgroupLabel {
    pub label: String,
    /// The cgroup as `/proc/PID/cgroup` shows it (e.g. `/agents.slice`), under the cgroup v2
    /// mount.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub socket_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub decision_log: PathBuf,
    /// The host's signing key (made at the first start if missing).
    pub host_key: PathBuf,
    /// Where signed decision records are spooled until the collector receipts them.
    pub spool_dir: PathBuf,
    /// Seconds between heartbeat records (silence between them is provable).
    pub heartbeat_secs: u64,
    /// Above this many bytes of unreceipted spool, `status` raises an alarm (records are
    /// never dropped to stay under it).
    pub spool_alarm_bytes: u64,
    /// The collector records are shipped to (none: they stay in the spool).
    pub collector: Option<CollectorTarget>,
    pub mode: ModeRequest,
    pub request_timeout_secs: u64,
    pub timeout_action: TimeoutAction,
    /// Held requests waiting for a decision at once; past it a new one is refused at once,
    /// recorded and counted. The kernel's event ring is sized from it.
    pub max_held_requests: usize,
    /// Fallback mode: how launched agents' execs are held.
    pub fallback_exec_hold: FallbackExecHold,
    pub cgroup_labels: Vec<CgroupLabel>,
    /// Policy files and directories (default: /etc/countersign/policies.d when it exists).
    pub policy: Vec<PathBuf>,
    /// What a labelled task's attempt on countersign itself gets besides a refusal.
    pub on_tamper: OnTamper,
    /// What a stop leaves in the kernel.
    pub on_stop: OnStop,
    /// Directories that are countersign's alone: labelled tasks create, remove, rename or
    /// write nothing in them (those that exist at start and at each reload).
    pub protected_dirs: Vec<PathBuf>,
    /// Where the system finds programs it starts later, as root and unlabelled: scheduled
    /// jobs (cron, `at`), service units and generators, boot scripts, udev rules, the dynamic
    /// linker's preload and search paths, login hooks. Labelled tasks create, remove, rename
    /// or write nothing in these directories (nor in the directories directly inside them:
    /// `*.wants`, drop-ins, a user's crontab) or files (those that exist at start and at each
    /// reload). Default: [`crate::daemon::guard::RUN_LATER`]; `[]` where agents install
    /// software as root (a package's unit or cron file is then refused).
    pub run_later: Vec<PathBuf>,
    /// The file this configuration was read from (not a setting: protected like the rest).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// The remote approver escalations go to (none: decisions are made on this host only).
    pub approver: Option<crate::daemon::remote::RemoteConfig>,
    /// Destination names learnt from the host resolvers' DNS answers (`daemon::names`).
    pub dns: crate::daemon::names::DnsConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket_dir: PathBuf::from(paths::DEFAULT_SOCKET_DIR),
            // On bpffs: holds and labels outlive a daemon restart.
            bpf_pin_dir: PathBuf::from(paths::DEFAULT_PIN_DIR),
            decision_log: PathBuf::from(paths::DEFAULT_DECISION_LOG),
            host_key: PathBuf::from(paths::DEFAULT_HOST_KEY),
            spool_dir: PathBuf::from(paths::DEFAULT_SPOOL_DIR),
            // A minute: an auditor can tell a quiet host from a dead one to the minute, for
            // about 1.5 MB of records a day.
            heartbeat_secs: 60,
            // 1 GiB: months of records for a busy host; reaching it means the collector has
            // not receipted anything for a long time.
            spool_alarm_bytes: 1 << 30,
            collector: None,
            // LSM mode where the kernel can run it (BPF LSM, else its security functions).
            mode: ModeRequest::Auto,
            // Long enough for a human to read a prompt; short enough that nothing hangs.
            request_timeout_secs: 120,
            // Fail closed.
            timeout_action: TimeoutAction::Deny,
            // A burst of ten thousand is taken in whole (about 2 MiB of event ring).
            max_held_requests: 10_000,
            // Nothing runs early.
            fallback_exec_hold: FallbackExecHold::Notify,
            cgroup_labels: Vec::new(),
            policy: Vec::new(),
            approver: None,
            on_tamper: OnTamper::Deny,
            // A stop is no way out for a labelled process.
            on_stop: OnStop::Keep,
            protected_dirs: [
                paths::DEFAULT_CONFIG_DIR,
                paths::DEFAULT_STATE_DIR,
                paths::DEFAULT_LOG_DIR,
                paths::DEFAULT_SOCKET_DIR,
            ]
            .map(PathBuf::from)
            .to_vec(),
            run_later: crate::daemon::guard::RUN_LATER
                .iter()
                .map(PathBuf::from)
                .collect(),
            config_file: None,
            dns: crate::daemon::names::DnsConfig::default(),
        }
    }
}

/// Longest accepted request timeout: nothing is held for more than a day.
pub const MAX_REQUEST_TIMEOUT_SECS: u64 = 24 * 3600;
/// Most held requests at once: one per labelled task the kernel can track.
pub const MAX_HELD_REQUESTS: usize = countersign_ebpf::MAX_LABELLED_TASKS as usize;
/// Longest heartbeat interval: an hour.
pub const MAX_HEARTBEAT_SECS: u64 = 3600;
/// Label names: short, printable, safe in logs and chat messages.
pub const MAX_LABEL_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl DaemonConfig {
    /// Reads `path`; `None` uses the default file if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(paths::DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source,
            })?
        };
        config.validate(&path)?;
        config.config_file = Some(path);
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if self.request_timeout_secs == 0 || self.request_timeout_secs > MAX_REQUEST_TIMEOUT_SECS {
            return Err(invalid(
                "request_timeout_secs".into(),
                format!(
                    "must be between 1 and {MAX_REQUEST_TIMEOUT_SECS}, not {}",
                    self.request_timeout_secs
                ),
            ));
        }
        if !(1..=MAX_HELD_REQUESTS).contains(&self.max_held_requests) {
            return Err(invalid(
                "max_held_requests".into(),
                format!(
                    "must be between 1 and {MAX_HELD_REQUESTS}, not {}",
                    self.max_held_requests
                ),
            ));
        }
        if let Some(a) = &self.approver
            && !(a.url.starts_with("https://")
                || a.url.starts_with("http://127.")
                || a.url.starts_with("http://localhost")
                || a.url.starts_with("http://[::1]"))
        {
            return Err(invalid(
                "approver.url".into(),
                format!(
                    "`{}`: use https:// (plain http only to a loopback address)",
                    a.url
                ),
            ));
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs > MAX_HEARTBEAT_SECS {
            return Err(invalid(
                "heartbeat_secs".into(),
                format!(
                    "must be between 1 and {MAX_HEARTBEAT_SECS}, not {}",
                    self.heartbeat_secs
                ),
            ));
        }
        if let Some(c) = &self.collector
            && !(c.url.starts_with("https://") || c.url.starts_with("http://"))
        {
            return Err(invalid(
                "collector.url".into(),
                format!("`{}` must start with https:// (or http://)", c.url),
            ));
        }
        if let Err((field, message)) = self.dns.validate() {
            return Err(invalid(field, message));
        }
        for (i, c) in self.cgroup_labels.iter().enumerate() {
            if let Err(m) = validate_label(&c.label) {
                return Err(invalid(format!("cgroup_labels[{i}].label"), m));
            }
            if !c.path.is_absolute() {
                return Err(invalid(
                    format!("cgroup_labels[{i}].path"),
                    format!(
                        "`{}` must start with / (as in /proc/PID/cgroup)",
                        c.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A label name: 1 to 64 of `a-z A-Z 0-9 - _ .`.
pub fn validate_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return Err(format!("label must be 1 to {MAX_LABEL_LEN} characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "label `{label}` has the character {c:?}; use letters, digits, - _ ."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_fail_closed() {
        let c = DaemonConfig::default();
        assert_eq!(c.timeout_action, TimeoutAction::Deny);
        assert_eq!(c.mode, ModeRequest::Auto);
    }

    #[test]
    fn reads_a_full_file() {
        let (_d, p) = write(
            "socket_dir: /tmp/x\nmode: fallback\nrequest_timeout_secs: 5\ntimeout_action: kill\ncgroup_labels:\n  - label: ci\n    path: /ci.slice\n",
        );
        let c = DaemonConfig::load(Some(&p)).unwrap();
        assert_eq!(c.socket_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.mode, ModeRequest::Fallback);
        assert_eq!(c.request_timeout_secs, 5);
        assert_eq!(c.timeout_action, TimeoutAction::Kill);
        assert_eq!(c.cgroup_labels[0].label, "ci");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let (_d, p) = write("socket_dir: /tmp/x\ntimeout: 5\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("daemon.yaml"), "{e}");
        assert!(e.contains("unknown field `timeout`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let (_d, p) = write("heartbeat_secs: 0\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("heartbeat_secs"), "{e}");
        let (_d, p) = write("request_timeout_secs: 0\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("request_timeout_secs"), "{e}");
        for bad in ["0", "65537"] {
            let (_d, p) = write(&format!("max_held_requests: {bad}\n"));
            let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
            assert!(e.contains("max_held_requests"), "{e}");
        }
        let (_d, p) = write("cgroup_labels:\n  - label: 'a b'\n    path: /x\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("cgroup_labels[0].label"), "{e}");
        let (_d, p) = write("cgroup_labels:\n  - label: ok\n    path: rel\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("cgroup_labels[0].path"), "{e}");
    }

    #[test]
    fn dns_section_reads_and_checks_its_fields() {
        let (_d, p) = write(
            "dns:\n  resolvers: [127.0.0.53, 'fd00::53']\n  min_ttl_secs: 60\n  max_addresses: 100\n",
        );
        let c = DaemonConfig::load(Some(&p)).unwrap();
        assert!(c.dns.enabled);
        assert_eq!(c.dns.resolvers.len(), 2);
        assert_eq!(c.dns.min_ttl_secs, 60);
        assert_eq!(c.dns.max_ttl_secs, 24 * 3600);
        assert_eq!(c.dns.max_addresses, 100);
        let (_d, p) = write("dns:\n  resolver: [127.0.0.53]\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown field `resolver`"), "{e}");
        let (_d, p) = write("dns:\n  max_ttl_secs: 0\n");
        let e = DaemonConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("dns.max_ttl_secs"), "{e}");
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let e = DaemonConfig::load(Some(Path::new("/nonexistent/daemon.yaml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/daemon.yaml"), "{e}");
    }
}
