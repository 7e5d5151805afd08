//! The decision log: one JSON line per decision, written and synced to disk before the
//! decision is applied (a decision that cannot be recorded is not applied).
//!
//! The shape is versioned (`v`) and extensible: signed records build on the same fields.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::proto::RequestView;

pub const LOG_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub v: u32,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: &'a str,
    /// `approved`, `denied`, `killed` (by a human), `auto-allowed`, `auto-denied`,
    /// `auto-killed` (by a policy rule), `expired-*` (the timeout outcome), `exec-verified`,
    /// `task-exited`, `superseded`.
    pub decision: &'a str,
    /// What was done to the task: `released`, `eperm`, `sigkill`, `none`.
    pub applied: &'a str,
    /// Who decided: `cli uid=0 pid=123`, `timeout`, `daemon`.
    pub by: &'a str,
    pub request: &'a RequestView,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RequestView;

    fn view(id: u64) -> RequestView {
        RequestView {
            id,
            kind: crate::proto::ActionKind::Connect,
            label: "l".into(),
            pid: 1,
            tid: 1,
            uid: 0,
            user: None,
            binary: None,
            argv: vec![],
            argv_truncated: false,
            cwd: None,
            parents: vec![],
            destination: Some("10.0.0.1:443".into()),
            protocol: None,
            socket: None,
            destination_names: vec![],
            age_ms: 0,
            expires_in_ms: 0,
            note: None,
            rule: None,
        }
    }

    #[test]
    fn entries_are_json_lines_and_ids_continue_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/decisions.jsonl");
        let mut log = DecisionLog::open(&path).unwrap();
        assert_eq!(log.last_request_id(), 0);
        log.write("approved", "released", "cli uid=0 pid=1", &view(7))
            .unwrap();
        log.write("denied", "eperm", "timeout", &view(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["v"], LOG_VERSION);
        assert_eq!(lines[0]["decision"], "approved");
        assert_eq!(lines[1]["by"], "timeout");
        assert_eq!(lines[1]["request"]["destination"], "10.0.0.1:443");
        drop(log);
        assert_eq!(DecisionLog::open(&path).unwrap().last_request_id(), 7);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("decision log {path}: {source}")]
pub struct LogError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct DecisionLog {
    path: PathBuf,
    file: File,
    host: String,
    /// Group commit: writes leave the flush to [`DecisionLog::commit`].
    group: bool,
    dirty: bool,
}

impl DecisionLog {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let err = |source| LogError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Self {
            path: path.to_path_buf(),
            file,
            host,
            group: false,
            dirty: false,
        })
    }

    /// Starts (or ends) a group commit (see `Spool::group_commit`).
    pub fn group_commit(&mut self, on: bool) {
        self.group = on;
    }

    /// Makes every entry written so far durable.
    pub fn commit(&mut self) -> Result<(), LogError> {
        if !self.dirty {
            return Ok(());
        }
        self.dirty = false;
        self.file.sync_data().map_err(|source| LogError {
            path: self.path.clone(),
            source,
        })
    }

    /// The highest request id in the log's last entries, so that a restarted daemon does not
    /// hand out the same ids again (0 for an empty log).
    pub fn last_request_id(&self) -> u64 {
        use std::io::{Read as _, Seek as _, SeekFrom};
        const TAIL: u64 = 256 * 1024;
        let Ok(mut f) = File::open(&self.path) else {
            return 0;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_err() {
            return 0;
        }
        let mut tail = Vec::new();
        if f.read_to_end(&mut tail).is_err() {
            return 0;
        }
        String::from_utf8_lossy(&tail)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["request"]["id"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Appends one entry and syncs it to disk.
    pub fn write(
        &mut self,
        decision: &str,
        applied: &str,
        by: &str,
        request: &RequestView,
    ) -> Result<(), LogError> {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let entry = Entry {
            v: LOG_VERSION,
            time,
            host: &self.host,
            decision,
            applied,
            by,
            request,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| LogError {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let err = |source| LogError {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&line).map_err(err)?;
        if self.group {
            self.dirty = true;
            return Ok(());
        }
        self.file.sync_data().map_err(err)
    }
}
