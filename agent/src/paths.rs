//! Every path countersign uses on disk, in one place.
use std::path::PathBuf;

/// Where the daemon's sockets live (`control.sock`, `launch.sock`).
pub const DEFAULT_SOCKET_DIR: &str = "/run/countersign";
/// countersign's own directories (see `protected_dirs`).
pub const DEFAULT_CONFIG_DIR: &str = "/etc/countersign";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/countersign";
pub const DEFAULT_LOG_DIR: &str = "/var/log/countersign";
/// The daemon's configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/countersign/daemon.yaml";
/// One JSON line per decision.
pub const DEFAULT_DECISION_LOG: &str = "/var/log/countersign/decisions.jsonl";
/// Policy files read when no `policy` is configured (if the directory exists).
pub const DEFAULT_POLICY_DIR: &str = "/etc/countersign/policies.d";
/// Where the maps and links are pinned (on bpffs), so that enforcement and held requests
/// outlive a daemon restart.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/countersign";
/// The host's Ed25519 key (PKCS#8 PEM, mode 0600; its public half beside it as `host.key.pub`):
/// it signs escalations and decision records. Made at the first start if missing.
pub const DEFAULT_HOST_KEY: &str = "/var/lib/countersign/host.key";
/// The host's enrollment with the remote approver (host id, the approver's pinned key).
pub const DEFAULT_APPROVER_STATE: &str = "/var/lib/countersign/approver.json";
/// The signed decision records' spool (segments and the receipted cursor), mode 0700.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/countersign/spool";
/// The collector's configuration file.
pub const DEFAULT_COLLECTOR_CONFIG: &str = "/etc/countersign/collector.yaml";
/// The collector's SQLite database (when `database` is not set).
pub const DEFAULT_COLLECTOR_DB: &str = "/var/lib/countersign/collector.db";
/// The collector's Ed25519 key (receipts, heads statements, digests).
pub const DEFAULT_COLLECTOR_KEY: &str = "/var/lib/countersign/collector.key";
/// Held by the running daemon (flock) in the socket directory.
pub const LOCK_FILE: &str = "daemon.lock";
/// Environment variable that overrides the socket directory for every subcommand.
pub const ENV_SOCKET_DIR: &str = "COUNTERSIGN_SOCKET_DIR";

/// Root-only socket: deciding requests, listing them, status.
pub const CONTROL_SOCKET: &str = "control.sock";
/// World-connectable socket: `countersign exec` labels itself here; status.
pub const LAUNCH_SOCKET: &str = "launch.sock";

/// Where tracepoint formats are read from (tracefs, or the debugfs copy on older hosts).
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The socket directory: the flag, else `$COUNTERSIGN_SOCKET_DIR`, else the default.
#[must_use]
pub fn socket_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(ENV_SOCKET_DIR).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR))
}
