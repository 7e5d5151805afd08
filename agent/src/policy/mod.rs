//! Policies: which processes are agents, and which of their actions run freely, are refused,
//! or need a human. `schema` is the YAML language, `load` reads and merges files, and this
//! module evaluates an action against the merged policy (first matching rule wins, then the
//! label's default).
pub mod cgroups;
pub mod compile;
pub mod load;
pub mod schema;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use load::load;
use schema::{
    ConnectMatch, Decision, ExecMatch, Glob, ListenMatch, MatchSpec, Matcher, Outcome, Protocol,
    Rule, SocketMatch, UnixName,
};

use crate::daemon::enrich::{FileId, file_id};

/// The merged policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub labels: Vec<Label>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// Where a rule or label was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
    /// 1-based index of the rule within its label in that file.
    pub rule: Option<usize>,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(r) = self.rule {
            write!(f, ", rule {r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Label {
    pub name: String,
    pub matches: MatchSpec,
    pub on_behalf_of: Option<String>,
    pub default: Decision,
    /// For local sockets no rule names (`None`: let through).
    pub unix_default: Option<Decision>,
    pub rules: Vec<CompiledRule>,
    pub source: Source,
    /// The file that set `match`/`on_behalf_of`/`default`, if any did.
    pub defined_in: Option<PathBuf>,
}

impl Label {
    fn new(name: &str, source: Source) -> Self {
        Self {
            name: name.to_owned(),
            matches: MatchSpec::default(),
            on_behalf_of: None,
            default: Decision::default(),
            unix_default: None,
            rules: Vec::new(),
            source,
            defined_in: None,
        }
    }
}

/// A rule with its paths resolved to files.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub name: Option<String>,
    pub source: Source,
    pub matcher: CompiledMatcher,
    pub decision: Decision,
}

#[derive(Debug, Clone)]
pub enum CompiledMatcher {
    Exec {
        binaries: Vec<(PathBuf, Option<FileId>)>,
        scripts: Vec<(PathBuf, Option<FileId>)>,
        args: Vec<Glob>,
    },
    Connect(ConnectMatch),
    Socket(SocketMatch),
    Listen(ListenMatch),
    /// Paths resolved to files when the policy was loaded, and abstract names.
    Unix {
        paths: Vec<(PathBuf, Option<FileId>)>,
        abstracts: Vec<String>,
    },
}

impl CompiledRule {
    fn new(rule: &Rule, source: Source) -> Self {
        let resolve = |paths: &[PathBuf]| paths.iter().map(|p| (p.clone(), file_id(p))).collect();
        let matcher = match &rule.matcher {
            Matcher::Exec(ExecMatch {
                binary,
                script,
                args,
            }) => CompiledMatcher::Exec {
                binaries: resolve(binary),
                scripts: resolve(script),
                args: args.clone(),
            },
            Matcher::Connect(c) => CompiledMatcher::Connect(c.clone()),
            Matcher::Socket(s) => CompiledMatcher::Socket(s.clone()),
            Matcher::Listen(l) => CompiledMatcher::Listen(l.clone()),
            Matcher::Unix(names) => CompiledMatcher::Unix {
                paths: names
                    .iter()
                    .filter_map(|n| match n {
                        UnixName::Path(p) => Some((p.clone(), file_id(p))),
                        UnixName::Abstract(_) => None,
                    })
                    .collect(),
                abstracts: names
                    .iter()
                    .filter_map(|n| match n {
                        UnixName::Abstract(a) => Some(a.clone()),
                        UnixName::Path(_) => None,
                    })
                    .collect(),
            },
        };
        Self {
            name: rule.name.clone(),
            source,
            matcher,
            decision: rule.decision.clone(),
        }
    }

    /// How the rule is named in output: its name, else its place.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("rule `{n}` ({})", self.source),
            None => format!("unnamed rule ({})", self.source),
        }
    }
}

/// An action to evaluate.
#[derive(Debug, Clone)]
pub enum Action {
    Exec {
        /// The binary that runs (the interpreter, for a script).
        binary: PathBuf,
        binary_file: Option<FileId>,
        /// The script an interpreter runs, if any.
        script: Option<PathBuf>,
        script_file: Option<FileId>,
        argv: Vec<String>,
    },
    /// A connect, or a send to a destination (connect rules decide both).
    Connect {
        addr: IpAddr,
        port: u16,
        protocol: Protocol,
        /// The names known for `addr` (learnt from DNS answers; empty: none known).
        hosts: Vec<String>,
    },
    /// Creating a socket that is not an ordinary TCP/UDP/local one.
    Socket { family: u16, sock_type: u16 },
    /// Listening for connections from the network on `addr` (unspecified: every address).
    Listen { addr: IpAddr, port: u16 },
    /// A connect or datagram to a local socket: the file it is bound to (`stat` numbers), or
    /// for an abstract one its name; `name` is the path or `@name` it was bound with.
    Unix {
        file: Option<FileId>,
        abstract_name: Option<String>,
        name: String,
    },
}

/// The outcome of a local socket no rule names when the label sets no `unix_default`.
static LET_THROUGH: Decision = Decision {
    outcome: Outcome::Allow,
    escalate: None,
};

/// What the policy says about an action.
#[derive(Debug, Clone)]
pub struct Verdict<'p> {
    pub label: &'p Label,
    /// The matching rule; `None`: the label's default.
    pub rule: Option<&'p CompiledRule>,
    pub decision: &'p Decision,
}

impl Verdict<'_> {
    #[must_use]
    pub fn describe_rule(&self) -> String {
        self.rule.map_or_else(
            || format!("the default of label `{}`", self.label.name),
            CompiledRule::describe,
        )
    }
}

impl Policy {
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&Label> {
        self.labels.iter().find(|l| l.name == name)
    }

    /// The verdict for `action` by a process labelled `label`; `None` if the label is unknown.
    #[must_use]
    pub fn evaluate(&self, label: &str, action: &Action) -> Option<Verdict<'_>> {
        let label = self.label(label)?;
        let rule = label.rules.iter().find(|r| r.matches(action));
        let default = match action {
            Action::Unix { .. } => label.unix_default.as_ref().unwrap_or(&LET_THROUGH),
            _ => &label.default,
        };
        Some(Verdict {
            label,
            rule,
            decision: rule.map_or(default, |r| &r.decision),
        })
    }

    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.labels.iter().map(|l| l.rules.len()).sum()
    }
}

impl CompiledRule {
    fn matches(&self, action: &Action) -> bool {
        match (&self.matcher, action) {
            (
                CompiledMatcher::Exec {
                    binaries,
                    scripts,
                    args,
                },
                Action::Exec {
                    binary,
                    binary_file,
                    script,
                    script_file,
                    argv,
                },
            ) => {
                (binaries.is_empty() || binaries.iter().any(|b| same_file(b, binary, *binary_file)))
                    && (scripts.is_empty()
                        || script
                            .as_ref()
                            .is_some_and(|s| scripts.iter().any(|r| same_file(r, s, *script_file))))
                    && (args.is_empty() || {
                        let joined = argv.get(1..).unwrap_or(&[]).join(" ");
                        args.iter().any(|g| g.matches(&joined))
                    })
            }
            (
                CompiledMatcher::Connect(c),
                Action::Connect {
                    addr,
                    port,
                    protocol,
                    hosts,
                },
            ) => {
                (c.cidr.is_empty() || c.cidr.iter().any(|n| n.contains(*addr)))
                    && (c.ports.is_empty() || c.ports.iter().any(|p| p.contains(*port)))
                    && (c.protocol == Protocol::Any || c.protocol == *protocol)
                    // A `host` rule matches when any known name of the address matches; with
                    // no name known it does not match.
                    && (c.host.is_empty()
                        || hosts.iter().any(|h| c.host.iter().any(|g| g.matches(h))))
            }
            (CompiledMatcher::Socket(s), Action::Socket { family, sock_type }) => {
                s.matches(*family, *sock_type)
            }
            (CompiledMatcher::Listen(l), Action::Listen { addr, port }) => {
                (l.cidr.is_empty() || l.cidr.iter().any(|n| n.contains(*addr)))
                    && (l.ports.is_empty() || l.ports.iter().any(|p| p.contains(*port)))
            }
            (
                CompiledMatcher::Unix { paths, abstracts },
                Action::Unix {
                    file,
                    abstract_name,
                    name,
                },
            ) => match abstract_name {
                Some(a) => abstracts.iter().any(|x| x == a),
                None => paths
                    .iter()
                    .any(|p| same_file(p, std::path::Path::new(name), *file)),
            },
            _ => false,
        }
    }
}

/// A rule's path against an action's: the same file (device and inode) where both are known,
/// else the same path.
fn same_file(
    (rule_path, rule_file): &(PathBuf, Option<FileId>),
    path: &Path,
    file: Option<FileId>,
) -> bool {
    match (rule_file, file) {
        (Some(a), Some(b)) => *a == b,
        _ => rule_path == path,
    }
}

#[cfg(test)]
mod tests;
