//! Labels by cgroup v2 path glob and systemd unit (`match: {cgroup: [...], systemd_unit:
//! [...]}`): which label a cgroup path gets, and which existing cgroups a policy names.
//!
//! The rule: a cgroup path is written as `/proc/PID/cgroup` shows it (relative to the cgroup v2
//! root, starting with `/`). A `cgroup` glob matches the whole path (`*` also crosses `/`). A
//! `systemd_unit` `foo.service` matches every cgroup whose last path component is exactly
//! `foo.service`, under any slice (`/system.slice/foo.service`,
//! `/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service`). Labels are tried in
//! the policy's order; the first that matches gives the label. Everything below a labelled
//! cgroup carries its label (the kernel takes the nearest labelled ancestor).
//!
//! The daemon applies these labels (`daemon::cgroups`): to the existing cgroups at start and
//! every reload, and to each new cgroup, whose tasks the kernel holds until it is classified.
//! `countersign policy check --cgroups` shows what they label on this host now.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::Policy;

/// Deepest cgroup level walked (as deep as the kernel's ancestor search).
pub const MAX_DEPTH: usize = countersign_ebpf::MAX_CGROUP_DEPTH as usize;
/// Most cgroup directories walked; a larger hierarchy is an error, not a partial answer.
pub const MAX_CGROUPS: usize = 100_000;

/// Why the cgroup hierarchy could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("reading cgroup directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("more than {MAX_CGROUPS} cgroups under {}", root.display())]
    TooMany { root: PathBuf },
}

/// An existing cgroup that a policy labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMatch {
    /// As in `/proc/PID/cgroup`.
    pub path: String,
    /// The cgroup v2 id (the directory's inode number).
    pub id: u64,
    pub label: String,
}

/// Whether a systemd unit name names the cgroup at `path`: its last component, any slice.
#[must_use]
pub fn unit_matches(unit: &str, path: &str) -> bool {
    !unit.is_empty() && path.rsplit('/').next() == Some(unit)
}

/// The unit types that own a cgroup; a `systemd_unit` must name one of them.
pub const UNIT_SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];

/// Checks a `systemd_unit` value: one path component with its unit type, at most 255 bytes
/// (a name that could never be a cgroup's last component is an error, not a silent no-match).
pub fn check_unit(unit: &str) -> Result<(), String> {
    if unit.is_empty() || unit.len() > 255 || unit.contains(['/', '\0']) {
        return Err(format!(
            "systemd_unit `{unit}`: a unit name (1 to 255 bytes, no `/`)"
        ));
    }
    if !UNIT_SUFFIXES
        .iter()
        .any(|s| unit.len() > s.len() && unit.ends_with(s))
    {
        return Err(format!(
            "systemd_unit `{unit}`: name the unit with its type (`{unit}.service`; .service, .scope or .slice own cgroups)"
        ));
    }
    Ok(())
}

/// Whether any label of the policy is matched by cgroup glob or systemd unit.
#[must_use]
pub fn uses_cgroup_match(policy: &Policy) -> bool {
    policy
        .labels
        .iter()
        .any(|l| !l.matches.cgroup.is_empty() || !l.matches.systemd_unit.is_empty())
}

/// The label the policy gives the cgroup at `path` itself (first matching label), if any.
#[must_use]
pub fn label_for<'a>(policy: &'a Policy, path: &str) -> Option<&'a str> {
    policy
        .labels
        .iter()
        .find(|l| {
            l.matches.cgroup.iter().any(|g| g.matches(path))
                || l.matches.systemd_unit.iter().any(|u| unit_matches(u, path))
        })
        .map(|l| l.name.as_str())
}

/// Every cgroup under `root` (the cgroup v2 mount) that the policy labels, in walk order
/// (parents before children). Bounded by [`MAX_DEPTH`] and [`MAX_CGROUPS`]; symlinks are not
/// followed. A cgroup removed during the walk is skipped.
pub fn existing(policy: &Policy, root: &Path) -> Result<Vec<CgroupMatch>, WalkError> {
    let mut out = Vec::new();
    if !uses_cgroup_match(policy) {
        return Ok(out);
    }
    let mut seen = 0usize;
    // (directory, path as in /proc/PID/cgroup, depth)
    let mut stack = vec![(root.to_path_buf(), String::from("/"), 0usize)];
    while let Some((dir, path, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_CGROUPS {
            return Err(WalkError::TooMany {
                root: root.to_path_buf(),
            });
        }
        let label = if depth > 0 {
            label_for(policy, &path)
        } else {
            None
        };
        if let Some(label) = label {
            match std::fs::symlink_metadata(&dir) {
                Ok(m) => out.push(CgroupMatch {
                    path: path.clone(),
                    id: m.ino(),
                    label: label.to_owned(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(WalkError::Io { path: dir, source }),
            }
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(WalkError::Io { path: dir, source }),
        };
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| WalkError::Io {
                path: dir.clone(),
                source,
            })?;
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if !kind.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if path == "/" {
                format!("/{name}")
            } else {
                format!("{path}/{name}")
            };
            children.push((entry.path(), child, depth + 1));
        }
        // Depth first, in name order: stable output.
        children.sort_by(|a, b| b.1.cmp(&a.1));
        stack.extend(children);
    }
    Ok(out)
}

/// The labels matched by `cgroup`/`systemd_unit`, with what they name (for `policy check`).
#[must_use]
pub fn summary(policy: &Policy) -> Vec<(String, String)> {
    policy
        .labels
        .iter()
        .filter(|l| !l.matches.cgroup.is_empty() || !l.matches.systemd_unit.is_empty())
        .map(|l| {
            let mut what = Vec::new();
            if !l.matches.cgroup.is_empty() {
                what.push(format!("{} cgroup glob(s)", l.matches.cgroup.len()));
            }
            if !l.matches.systemd_unit.is_empty() {
                what.push(format!(
                    "systemd unit(s) {}",
                    l.matches.systemd_unit.join(", ")
                ));
            }
            (l.name.clone(), what.join(" and "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path, yaml: &str) -> Policy {
        let file = dir.join("p.yaml");
        std::fs::write(&file, yaml).unwrap();
        crate::policy::load(&[file]).unwrap()
    }

    const YAML: &str = "apiVersion: countersign.dev/v1\nlabels:\n  - name: agents\n    match: {cgroup: ['/agents/*']}\n  - name: svc\n    match: {systemd_unit: [foo.service]}\n  - name: late\n    match: {cgroup: ['/agents/first']}\n";

    #[test]
    fn globs_and_units_match_as_documented() {
        let d = tempfile::tempdir().unwrap();
        let p = policy(d.path(), YAML);
        assert!(uses_cgroup_match(&p));
        assert_eq!(label_for(&p, "/agents/a"), Some("agents"));
        // `*` crosses `/` (the policy's glob type); the first label in order wins.
        assert_eq!(label_for(&p, "/agents/a/b"), Some("agents"));
        assert_eq!(label_for(&p, "/agents/first"), Some("agents"));
        assert_eq!(label_for(&p, "/agents"), None);
        assert_eq!(label_for(&p, "/other/agents/a"), None);
        assert_eq!(label_for(&p, "/system.slice/foo.service"), Some("svc"));
        assert_eq!(
            label_for(
                &p,
                "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"
            ),
            Some("svc")
        );
        // The unit's own cgroup only; its children inherit in the kernel.
        assert_eq!(label_for(&p, "/system.slice/foo.service/sub"), None);
        assert_eq!(label_for(&p, "/system.slice/xfoo.service"), None);
        assert_eq!(label_for(&p, "/system.slice/foo.service.d"), None);
        assert!(!unit_matches("", "/"));
        for ok in ["foo.service", "a-b@1.scope", "x.slice"] {
            assert_eq!(check_unit(ok), Ok(()), "{ok}");
        }
        for bad in ["", "foo", ".service", "a/foo.service", "foo.socket"] {
            assert!(check_unit(bad).is_err(), "{bad}");
        }
        let e = crate::policy::load(&[{
            let f = d.path().join("bad.yaml");
            std::fs::write(
                &f,
                "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    match: {systemd_unit: [coding-agent]}\n",
            )
            .unwrap();
            f
        }])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("bad.yaml:3:") && e.contains("`coding-agent.service`"),
            "{e}"
        );
        let un = summary(&p);
        assert_eq!(un.len(), 3);
        assert_eq!(un[1], ("svc".into(), "systemd unit(s) foo.service".into()));
    }

    #[test]
    fn walk_finds_existing_cgroups_by_inode_bounded_in_depth() {
        let d = tempfile::tempdir().unwrap();
        let p = policy(d.path(), YAML);
        let root = d.path().join("cg");
        for dir in [
            "agents/a",
            "agents/b/c",
            "system.slice/foo.service",
            "user.slice/u.slice/foo.service",
            "other",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        // A file named like a unit is not a cgroup.
        std::fs::write(root.join("other/foo.service"), "").unwrap();
        let found = existing(&p, &root).unwrap();
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|m| (m.path.as_str(), m.label.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("/agents/a", "agents"),
                ("/agents/b", "agents"),
                ("/agents/b/c", "agents"),
                ("/system.slice/foo.service", "svc"),
                ("/user.slice/u.slice/foo.service", "svc"),
            ]
        );
        let ino = std::fs::metadata(root.join("agents/a")).unwrap().ino();
        assert_eq!(found[0].id, ino);

        // Deeper than the kernel searches: not walked.
        let mut deep = root.join("deep");
        for _ in 0..MAX_DEPTH {
            deep = deep.join("d");
        }
        std::fs::create_dir_all(deep.join("foo.service")).unwrap();
        let found = existing(&p, &root).unwrap();
        assert!(
            !found.iter().any(|m| m.path.starts_with("/deep")),
            "{found:?}"
        );

        // A policy without cgroup matching walks nothing.
        let none = policy(
            d.path(),
            "apiVersion: countersign.dev/v1\nlabels:\n  - name: x\n",
        );
        assert!(!uses_cgroup_match(&none));
        assert!(
            existing(&none, Path::new("/nonexistent"))
                .unwrap()
                .is_empty()
        );
    }
}
