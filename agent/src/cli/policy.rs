//! `countersign policy check FILE...` and `countersign policy test FILE... --label L --exec
//! CMD | --connect HOST:PORT`: for ops teams' CI, before a policy reaches a host.
use std::{
    net::{IpAddr, ToSocketAddrs as _},
    path::PathBuf,
};

use anyhow::{Context as _, bail};

use crate::{
    daemon::enrich::{file_id, shebang},
    policy::{self, Action, schema::Protocol},
};

/// Prints every error (file:line:column: message); the exit status says valid or not.
/// With `cgroups`, also lists the existing cgroups `match: cgroup`/`systemd_unit` name.
pub fn check(files: &[PathBuf], cgroups: bool) -> i32 {
    match policy::load(files) {
        Ok(p) => {
            println!(
                "ok: {} file(s), {} label(s), {} rule(s)",
                p.files.len(),
                p.labels.len(),
                p.rule_count()
            );
            for l in &p.labels {
                for (path, _) in missing_binaries(l) {
                    println!(
                        "warning: label `{}`: {} does not exist here (matched by path only)",
                        l.name,
                        path.display()
                    );
                }
            }
            for w in host_refusal_warnings(&p) {
                println!("warning: {w}");
            }
            for line in escalation_timeouts(&p) {
                println!("{line}");
            }
            for (label, what) in policy::cgroups::summary(&p) {
                println!(
                    "label `{label}`: {what}; the daemon holds tasks of a new cgroup until it has classified it"
                );
            }
            if cgroups {
                return list_cgroups(&p);
            }
            0
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", errors.0.len());
            1
        }
    }
}

/// Prints `cgroup PATH (id N): label L` for each existing cgroup the policy names.
fn list_cgroups(p: &policy::Policy) -> i32 {
    let Some(root) = crate::ebpf::cgroup2_root() else {
        eprintln!("error: no cgroup v2 mount in /proc/mounts");
        return 1;
    };
    match policy::cgroups::existing(p, &root) {
        Ok(found) => {
            for m in &found {
                println!("cgroup {} (id {}): label {}", m.path, m.id, m.label);
            }
            println!("{} cgroup(s) named by the policy", found.len());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// How long each escalation waits and what it applies then, with where that comes from: a
/// rule's own `timeout`/`on_timeout` come first, else the daemon's `request_timeout_secs` /
/// `timeout_action` apply (which the policy cannot know).
fn escalation_timeouts(p: &policy::Policy) -> Vec<String> {
    let mut out = Vec::new();
    for l in &p.labels {
        let rules = l
            .rules
            .iter()
            .map(|r| (r.describe(), &r.decision))
            .chain([("its default".to_owned(), &l.default)]);
        for (what, decision) in rules {
            let Some(e) = decision.escalation() else {
                continue;
            };
            let wait = e.timeout.map_or_else(
                || "the daemon's request_timeout_secs".to_owned(),
                |t| format!("{} (set there)", humantime::format_duration(t)),
            );
            let then = e.on_timeout.map_or_else(
                || "the daemon's timeout_action".to_owned(),
                |o| format!("{o} (set there)"),
            );
            out.push(format!(
                "label `{}`: {what} escalates: waits {wait}, then {then}",
                l.name
            ));
        }
    }
    out
}

/// `deny`/`kill` rules that match by `host:`: they refuse only connects whose address has a
/// name learnt from DNS, so a program that connects to the address directly (or resolves it
/// where the daemon cannot see: DNS over TCP/TLS/HTTPS, /etc/hosts) is not refused by them.
fn host_refusal_warnings(p: &policy::Policy) -> Vec<String> {
    use crate::policy::schema::Outcome;
    let mut out = Vec::new();
    for l in &p.labels {
        for r in &l.rules {
            let policy::CompiledMatcher::Connect(m) = &r.matcher else {
                continue;
            };
            if m.host.is_empty() || !matches!(r.decision.outcome, Outcome::Deny | Outcome::Kill) {
                continue;
            }
            out.push(format!(
                "label `{}`: {} refuses by `host:`, which matches only names learnt from the host resolvers' DNS answers; a connect to the address directly is not refused by it: add a rule with `cidr:` for the addresses, or make the label's default refuse",
                l.name,
                r.describe()
            ));
        }
    }
    out
}

fn missing_binaries(l: &policy::Label) -> Vec<(PathBuf, ())> {
    l.rules
        .iter()
        .filter_map(|r| match &r.matcher {
            policy::CompiledMatcher::Exec {
                binaries, scripts, ..
            } => Some(binaries.iter().chain(scripts)),
            policy::CompiledMatcher::Connect(_)
            | policy::CompiledMatcher::Socket(_)
            | policy::CompiledMatcher::Listen(_)
            | policy::CompiledMatcher::Unix { .. } => None,
        })
        .flatten()
        .filter(|(_, f)| f.is_none())
        .map(|(p, _)| (p.clone(), ()))
        .collect()
}

/// What `policy test` is asked about.
pub enum TestAction {
    Exec(String),
    Connect {
        target: String,
        protocol: Protocol,
        /// Names known for the address (`--host`), as if learnt from DNS.
        hosts: Vec<String>,
        /// A send without connect (`--send`), decided by the same rules.
        send: bool,
    },
    /// `FAMILY/TYPE`.
    Socket(String),
    /// A path or `@abstract` name.
    Unix(String),
    /// `ADDR:PORT` listened on.
    Listen(String),
}

pub fn test(files: &[PathBuf], label: &str, what: &TestAction) -> anyhow::Result<()> {
    let p = policy::load(files).map_err(|e| anyhow::anyhow!("{e}"))?;
    let action = match what {
        TestAction::Exec(cmd) => exec_action(cmd)?,
        TestAction::Connect {
            target,
            protocol,
            hosts,
            ..
        } => connect_action(target, *protocol, hosts)?,
        TestAction::Socket(s) => socket_action(s)?,
        TestAction::Unix(u) => unix_action(u)?,
        TestAction::Listen(l) => listen_action(l)?,
    };
    let verb = match what {
        TestAction::Connect { send: true, .. } => "send",
        _ => "connect",
    };
    let Some(v) = p.evaluate(label, &action) else {
        let known: Vec<&str> = p.labels.iter().map(|l| l.name.as_str()).collect();
        bail!(
            "no label `{label}` in the policy (labels: {})",
            known.join(", ")
        );
    };
    println!(
        "label {label} ({}): {}",
        v.label.source,
        describe(&action, verb)
    );
    println!("  matches {}", v.describe_rule());
    match v.decision.escalation() {
        None => println!("  outcome: {}", v.decision.outcome),
        Some(e) => {
            let approvers = if e.approvers.is_empty() {
                "any approver".to_owned()
            } else {
                e.approvers.join(", ")
            };
            println!(
                "  outcome: escalate to {approvers} (quorum {}{}{}), timeout {}, then {}",
                e.quorum,
                if e.quorum_from == crate::policy::schema::QuorumFrom::Each {
                    ", one from each group"
                } else {
                    ""
                },
                if e.justification {
                    ", justification required"
                } else {
                    ""
                },
                e.timeout.map_or_else(
                    || "the daemon's (request_timeout_secs)".to_owned(),
                    |t| format!("{} (the rule's)", humantime::format_duration(t))
                ),
                e.on_timeout.map_or_else(
                    || "the daemon's timeout_action".to_owned(),
                    |o| o.to_string()
                )
            );
            if let Some(r) = e.remind {
                println!("  reminders every {}", humantime::format_duration(r));
            }
            for step in &e.ladder {
                println!(
                    "  after {} undecided: also {}",
                    humantime::format_duration(step.after),
                    step.approvers.join(", ")
                );
            }
            for g in &e.grants {
                match g.duration {
                    Some(d) => println!(
                        "  grant offered: {:?} for {}",
                        g.scope,
                        humantime::format_duration(d)
                    ),
                    None => println!("  grant offered: {:?}", g.scope),
                }
            }
        }
    }
    if let Some(owner) = &v.label.on_behalf_of {
        println!("  on behalf of {owner} (who may not approve it)");
    }
    Ok(())
}

/// `verb`: how a destination is reached (`connect`, `send`).
fn describe(a: &Action, verb: &str) -> String {
    match a {
        Action::Exec {
            binary,
            argv,
            script,
            ..
        } => {
            let mut s = format!("exec {} [{}]", binary.display(), argv.join(" "));
            if let Some(sc) = script {
                s.push_str(&format!(" script {}", sc.display()));
            }
            s
        }
        Action::Connect {
            addr,
            port,
            protocol,
            hosts,
        } => {
            format!(
                "{verb} {addr} port {port}/{protocol}{}",
                if hosts.is_empty() {
                    String::new()
                } else {
                    format!(" host {}", hosts.join(", "))
                }
            )
        }
        Action::Unix { name, .. } => format!("unix {name}"),
        Action::Listen { addr, port } => format!("listen on {addr} port {port}/tcp"),
        Action::Socket { family, sock_type } => format!(
            "socket {}/{}",
            crate::policy::schema::SocketFamily(*family),
            crate::policy::schema::SocketType(*sock_type)
        ),
    }
}

/// `--unix PATH|@NAME`: a path is identified by the file it is now (as the kernel would).
fn unix_action(s: &str) -> anyhow::Result<Action> {
    use crate::policy::schema::UnixName;
    let name: UnixName = s.parse().map_err(|e| anyhow::anyhow!("--unix {e}"))?;
    Ok(match name {
        UnixName::Abstract(a) => Action::Unix {
            file: None,
            abstract_name: Some(a),
            name: s.to_owned(),
        },
        UnixName::Path(p) => Action::Unix {
            file: crate::daemon::enrich::file_id(&p),
            abstract_name: None,
            name: s.to_owned(),
        },
    })
}

/// `--socket FAMILY/TYPE`. An ordinary socket is no action: said so, not evaluated.
fn socket_action(s: &str) -> anyhow::Result<Action> {
    use crate::policy::schema::{SocketFamily, SocketType};
    let (family, ty) = s
        .split_once('/')
        .with_context(|| format!("--socket `{s}`: expected FAMILY/TYPE, e.g. packet/raw"))?;
    let family: SocketFamily = family
        .parse()
        .map_err(|e| anyhow::anyhow!("--socket `{s}`: {e}"))?;
    let ty: SocketType = ty
        .parse()
        .map_err(|e| anyhow::anyhow!("--socket `{s}`: {e}"))?;
    // The protocol an ordinary socket of this type would use (0), so that TCP/UDP are told
    // apart from the rest as the kernel does.
    if countersign_ebpf::ordinary_socket(family.0, ty.0, 0) {
        bail!(
            "--socket `{s}`: an ordinary socket (TCP, UDP, local, netlink) is not an action; its connects and sends are"
        );
    }
    Ok(Action::Socket {
        family: family.0,
        sock_type: ty.0,
    })
}

/// The binary `name` would run: a path as given, else the first match on `$PATH`.
fn resolve(name: &str) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

fn exec_action(cmd: &str) -> anyhow::Result<Action> {
    let argv = shlex::split(cmd)
        .with_context(|| format!("cannot split `{cmd}` into words (unbalanced quotes?)"))?;
    let first = argv.first().context("--exec needs a command")?;
    let path = resolve(first);
    // A script run directly: its interpreter runs, the script is matched too.
    if let Some((interp, _)) = shebang(&path) {
        let interp = PathBuf::from(interp);
        return Ok(Action::Exec {
            binary_file: file_id(&interp),
            binary: interp,
            script_file: file_id(&path),
            script: Some(path),
            argv,
        });
    }
    // An interpreter given a script: `python3 /opt/x.py`.
    let script = argv
        .get(1)
        .filter(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    Ok(Action::Exec {
        binary_file: file_id(&path),
        binary: path,
        script_file: script.as_deref().and_then(file_id),
        script,
        argv,
    })
}

/// `hosts`: names the daemon would have learnt for the address (`--host`).
/// `--listen ADDR:PORT` (IPv6 as `[addr]:port`).
fn listen_action(target: &str) -> anyhow::Result<Action> {
    let (host, port) = target.rsplit_once(':').with_context(|| {
        format!("--listen `{target}`: expected ADDR:PORT (IPv6 as [addr]:port)")
    })?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--listen `{target}`: `{port}` is not a port"))?;
    let addr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .with_context(|| format!("--listen `{target}`: `{host}` is not an address"))?;
    Ok(Action::Listen { addr, port })
}

fn connect_action(target: &str, protocol: Protocol, hosts: &[String]) -> anyhow::Result<Action> {
    let (host, port) = target.rsplit_once(':').with_context(|| {
        format!("--connect `{target}`: expected HOST:PORT (IPv6 as [addr]:port)")
    })?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--connect `{target}`: `{port}` is not a port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let (addr, name) = match bare.parse::<IpAddr>() {
        Ok(a) => (a, None),
        Err(_) => {
            let addr = (bare, port)
                .to_socket_addrs()
                .with_context(|| format!("--connect `{target}`: cannot resolve `{bare}`"))?
                .next()
                .with_context(|| format!("--connect `{target}`: `{bare}` has no address"))?
                .ip();
            (addr, Some(bare.to_owned()))
        }
    };
    Ok(Action::Connect {
        addr,
        port,
        protocol: if protocol == Protocol::Any {
            Protocol::Tcp
        } else {
            protocol
        },
        hosts: name.into_iter().chain(hosts.iter().cloned()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn exec_words_and_scripts() {
        let Action::Exec { argv, .. } = exec_action("/usr/bin/git commit -m 'two words'").unwrap()
        else {
            panic!()
        };
        assert_eq!(argv, ["/usr/bin/git", "commit", "-m", "two words"]);
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s.sh");
        std::fs::write(&s, "#!/bin/sh\n").unwrap();
        let Action::Exec { binary, script, .. } =
            exec_action(&format!("{} a", s.display())).unwrap()
        else {
            panic!()
        };
        assert_eq!(binary, Path::new("/bin/sh"));
        assert_eq!(script.as_deref(), Some(s.as_path()));
        assert!(exec_action("'unbalanced").is_err());
    }

    #[test]
    fn refusing_by_host_name_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(
            &f,
            "apiVersion: countersign.dev/v1\nlabels:\n  - name: a\n    rules:\n      - {name: paste, connect: {host: ['*.paste.test']}, outcome: deny}\n      - {name: ok, connect: {host: [api.test]}, outcome: allow}\n      - {name: net, connect: {cidr: [10.0.0.0/8]}, outcome: kill}\n",
        )
        .unwrap();
        let p = policy::load(&[f]).unwrap();
        let w = host_refusal_warnings(&p);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("rule `paste`") && w[0].contains("cidr"),
            "{w:?}"
        );
    }

    #[test]
    fn connect_targets() {
        let Action::Connect { addr, port, .. } =
            connect_action("10.1.2.3:443", Protocol::Any, &[]).unwrap()
        else {
            panic!()
        };
        assert_eq!((addr.to_string(), port), ("10.1.2.3".into(), 443));
        let Action::Connect { addr, .. } = connect_action("[::1]:80", Protocol::Udp, &[]).unwrap()
        else {
            panic!()
        };
        assert!(addr.is_loopback());
        assert!(connect_action("10.1.2.3", Protocol::Any, &[]).is_err());
        assert!(connect_action("10.1.2.3:http", Protocol::Any, &[]).is_err());
        let Action::Connect { hosts, .. } =
            connect_action("10.1.2.3:443", Protocol::Tcp, &["api.example.com".into()]).unwrap()
        else {
            panic!()
        };
        assert_eq!(hosts, ["api.example.com"]);
    }
}
