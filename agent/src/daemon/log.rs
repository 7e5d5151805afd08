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
    /// `approved`, `denied`, `killed`, `expired` (with `applied`), `exec-verified`,
    /// `task-exited`, `superseded`, `shutdown`.
    pub decision: &'a str,
    /// What was done to the task: `released`, `eperm`, `sigkill`, `none`.
    pub applied: &'a str,
    /// Who decided: `cli uid=0 pid=123`, `timeout`, `daemon`.
    pub by: &'a str,
    pub request: &'a RequestView,
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
        })
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
        self.file.sync_data().map_err(err)
    }
}
