//! Reading policy files: includes, merging several files with a clear precedence, and errors
//! that name the file, line and column, with a suggestion where one can be made.
//!
//! Precedence: files are read in the order given (a directory's `*.yaml`/`*.yml` files in
//! name order); a file's includes are read before the file itself. A label is defined once:
//! its `match`, `on_behalf_of` and `default` may be set in one file only, while rules for it
//! may come from several files and are tried in reading order, first match wins.
use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
};

use super::{
    Label, Policy, Source,
    schema::{ApiVersion, Decision, LabelSpec, Outcome, PolicyFile},
};

/// Bounds on what is read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
pub const MAX_FILES: usize = 256;
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// One problem in the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not tied to a place in the file.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        } else {
            write!(f, "{}: {}", self.file.display(), self.message)
        }
    }
}

/// All the problems found, in reading order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

struct Loader {
    files: Vec<(PathBuf, String, PolicyFile)>,
    errors: Vec<PolicyError>,
    seen: HashSet<PathBuf>,
}

/// Reads the policy from `paths` (files or directories).
pub fn load(paths: &[PathBuf]) -> Result<Policy, PolicyErrors> {
    let mut loader = Loader {
        files: Vec::new(),
        errors: Vec::new(),
        seen: HashSet::new(),
    };
    for p in paths {
        if p.is_dir() {
            match dir_files(p) {
                Ok(files) => {
                    for f in files {
                        loader.read(&f, 0, None);
                    }
                }
                Err(e) => loader.errors.push(PolicyError {
                    file: p.clone(),
                    line: 0,
                    column: 0,
                    message: e,
                }),
            }
        } else {
            loader.read(p, 0, None);
        }
    }
    let policy = loader.merge();
    if loader.errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors(loader.errors))
    }
}

fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

impl Loader {
    fn error(&mut self, file: &Path, line: usize, column: usize, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    fn read(&mut self, path: &Path, depth: usize, from: Option<(&Path, usize, usize)>) {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !self.seen.insert(key) {
            // Read already (included twice, or a cycle): once is enough.
            return;
        }
        let (blame, line, col) = from.unwrap_or((path, 0, 0));
        if self.files.len() >= MAX_FILES {
            self.error(
                blame,
                line,
                col,
                format!("more than {MAX_FILES} policy files"),
            );
            return;
        }
        let text = match read_bounded(path) {
            Ok(t) => t,
            Err(e) => {
                self.error(blame, line, col, format!("{}: {e}", path.display()));
                return;
            }
        };
        let file: PolicyFile = match serde_yaml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                let message = with_suggestion(&e.to_string());
                self.error(path, line, column, strip_location(&message));
                return;
            }
        };
        let ApiVersion::V1 = file.api_version;
        for inc in &file.include {
            let target = path.parent().unwrap_or(Path::new(".")).join(inc);
            if depth + 1 > MAX_INCLUDE_DEPTH {
                let (l, c) = locate(&text, &inc.to_string_lossy());
                self.error(
                    path,
                    l,
                    c,
                    format!("includes nested deeper than {MAX_INCLUDE_DEPTH}"),
                );
                continue;
            }
            let (l, c) = locate(&text, &inc.to_string_lossy());
            self.read(&target, depth + 1, Some((path, l, c)));
        }
        self.files.push((path.to_path_buf(), text, file));
    }

    fn merge(&mut self) -> Policy {
        let mut labels: Vec<Label> = Vec::new();
        let files = std::mem::take(&mut self.files);
        for (path, text, file) in &files {
            for spec in &file.labels {
                let LabelSpec {
                    name,
                    matches,
                    on_behalf_of,
                    default,
                    unix_default,
                    rules,
                } = spec;
                let (line, column) = locate(text, &format!("name: {}", name.0));
                let label = match labels.iter_mut().position(|l| l.name == name.0) {
                    Some(i) => &mut labels[i],
                    None => {
                        labels.push(Label::new(
                            &name.0,
                            Source {
                                file: path.clone(),
                                line,
                                rule: None,
                            },
                        ));
                        labels.last_mut().expect("just pushed")
                    }
                };
                let defined_here = !matches.cgroup.is_empty()
                    || !matches.systemd_unit.is_empty()
                    || !matches.executable.is_empty()
                    || on_behalf_of.is_some()
                    || default.is_some()
                    || unix_default.is_some();
                if defined_here {
                    if let Some(first) = &label.defined_in {
                        let msg = format!(
                            "label `{}`: `match`, `on_behalf_of` and `default` are already set in {}; set them in one file and only add rules elsewhere",
                            name.0,
                            first.display()
                        );
                        self.errors.push(PolicyError {
                            file: path.clone(),
                            line,
                            column,
                            message: msg,
                        });
                        continue;
                    }
                    label.defined_in = Some(path.clone());
                    label.matches = matches.clone();
                    for unit in &matches.systemd_unit {
                        if let Err(message) = super::cgroups::check_unit(unit) {
                            self.errors.push(PolicyError {
                                file: path.clone(),
                                line,
                                column,
                                message: format!("label `{}`: {message}", name.0),
                            });
                        }
                    }
                    label.on_behalf_of.clone_from(on_behalf_of);
                    if let Some(d) = default {
                        if let Err(e) = d.check() {
                            self.errors.push(PolicyError {
                                file: path.clone(),
                                line,
                                column,
                                message: format!("label `{}` default: {e}", name.0),
                            });
                        }
                        label.default = d.clone();
                    }
                    if let Some(d) = unix_default {
                        if let Err(e) = d.check() {
                            self.errors.push(PolicyError {
                                file: path.clone(),
                                line,
                                column,
                                message: format!("label `{}` unix_default: {e}", name.0),
                            });
                        }
                        label.unix_default = Some(d.clone());
                    }
                }
                for (i, rule) in rules.iter().enumerate() {
                    // A named rule is found by its name; an unnamed one points at its label.
                    let rule_line = rule
                        .name
                        .as_ref()
                        .map(|n| locate_after(text, line, &format!("name: {n}")))
                        .filter(|l| *l > 0)
                        .unwrap_or(line);
                    label.rules.push(super::CompiledRule::new(
                        rule,
                        Source {
                            file: path.clone(),
                            line: rule_line,
                            rule: Some(i + 1),
                        },
                    ));
                }
            }
        }
        Policy {
            labels,
            files: files.into_iter().map(|(p, ..)| p).collect(),
        }
    }
}

impl Default for Decision {
    fn default() -> Self {
        // countersign's purpose: what no rule names, a human decides.
        Decision {
            outcome: Outcome::Escalate,
            escalate: None,
        }
    }
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// serde_yaml appends " at line L column C"; the location is printed in front instead.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Adds "did you mean `x`?" to serde's "unknown field/variant `y`, expected one of ...".
fn with_suggestion(message: &str) -> String {
    let Some(rest) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|k| message.split_once(k).map(|(_, r)| r))
    else {
        return message.to_owned();
    };
    let Some((wrong, tail)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let candidates: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::levenshtein(wrong, c), *c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3))
        .min();
    match best {
        Some((_, c)) => {
            let base = strip_location(message);
            format!(
                "{base}; did you mean `{c}`?{}",
                message.strip_prefix(&base).unwrap_or("")
            )
        }
        None => message.to_owned(),
    }
}

/// 1-based line of the first occurrence of `needle` at or after line `from` (0 if absent).
fn locate_after(text: &str, from: usize, needle: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map_or(0, |(i, _)| i + 1)
}

/// 1-based line and column of the first occurrence of `needle` (0, 0 if absent).
fn locate(text: &str, needle: &str) -> (usize, usize) {
    text.find(needle).map_or((0, 0), |at| {
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_field() {
        let m = with_suggestion(
            "unknown field `outcom`, expected one of `name`, `exec`, `connect`, `outcome`, `escalate` at line 3 column 5",
        );
        assert!(m.contains("did you mean `outcome`?"), "{m}");
        let m = with_suggestion(
            "labels[0].rules[0].outcome: unknown variant `alow`, expected one of `allow`, `deny`, `kill`, `escalate`",
        );
        assert!(m.contains("did you mean `allow`?"), "{m}");
        let m = with_suggestion("unknown field `zzzzzzzz`, expected one of `name`, `exec`");
        assert!(!m.contains("did you mean"), "{m}");
    }

    #[test]
    fn locates_text() {
        assert_eq!(locate("a\n  name: x\n", "name: x"), (2, 3));
        assert_eq!(locate("abc", "zz"), (0, 0));
    }
}
