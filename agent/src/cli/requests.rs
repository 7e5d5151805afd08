//! `countersign requests list|approve|deny|kill`.
use std::path::Path;

use crate::{
    cli::client,
    paths,
    proto::{ActionKind, Decision, ListFilter, MAX_LIST_PAGE, Request, RequestView, Response},
};

/// Which held requests a command means (all given conditions must hold); the daemon
/// selects them.
#[derive(Debug, Default, clap::Args)]
pub struct Filter {
    /// Only requests of this label.
    #[arg(long)]
    pub label: Option<String>,
    /// Only requests of this kind (exec, exec-loaded, connect, send, socket, unix).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only requests of this process.
    #[arg(long)]
    pub pid: Option<u32>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.label.is_none() && self.kind.is_none() && self.pid.is_none()
    }

    fn to_proto(&self) -> ListFilter {
        ListFilter {
            label: self.label.clone(),
            kind: self.kind.clone(),
            pid: self.pid,
            ..ListFilter::default()
        }
    }

    /// Filters select this host's held requests, not a remote approver's.
    pub fn only_here(&self) -> anyhow::Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "--label, --kind and --pid select this host's held requests; with --approver, name one request by its id"
            )
        }
    }
}

/// Where a list starts and how much of it is shown.
#[derive(Debug, Default, clap::Args)]
pub struct Page {
    /// Only requests with a larger id than this (the next page).
    #[arg(long)]
    pub after: Option<u64>,
    /// At most this many (default: every one, asked a page at a time).
    #[arg(long)]
    pub limit: Option<u32>,
}

impl Page {
    /// Paging is over this host's held requests.
    pub fn only_here(&self) -> anyhow::Result<()> {
        if self.after.is_none() && self.limit.is_none() {
            Ok(())
        } else {
            anyhow::bail!("--after and --limit page this host's held requests")
        }
    }
}

/// The one request id a remote command needs (filters and `--all` are this host's).
pub fn one_id(id: Option<u64>, filter: &Filter) -> anyhow::Result<u64> {
    filter.only_here()?;
    id.ok_or_else(|| anyhow::anyhow!("with --approver, name one request by its id"))
}

/// The held requests `filter` selects from `after` on: every one (page after page), or at most
/// `limit`.
fn held(
    socket_dir: &Path,
    mut filter: ListFilter,
    limit: Option<u32>,
) -> anyhow::Result<Vec<RequestView>> {
    let mut all = Vec::new();
    loop {
        let want = limit.map(|l| l.saturating_sub(all.len() as u32));
        if want == Some(0) {
            return Ok(all);
        }
        filter.limit = want.map(|w| w.min(MAX_LIST_PAGE));
        let Response::List { requests, more } = client::call(
            socket_dir,
            paths::CONTROL_SOCKET,
            &Request::List {
                filter: filter.clone(),
            },
        )?
        else {
            anyhow::bail!("unexpected answer to list");
        };
        filter.after = requests.last().map(|r| r.id).or(filter.after);
        all.extend(requests);
        if !more {
            return Ok(all);
        }
    }
}

pub fn list(socket_dir: &Path, json: bool, filter: &Filter, page: &Page) -> anyhow::Result<()> {
    let mut wanted = filter.to_proto();
    wanted.after = page.after;
    let requests = held(socket_dir, wanted, page.limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&requests)?);
        return Ok(());
    }
    if requests.is_empty() {
        println!("no held requests");
    }
    for r in &requests {
        print!("{}", render(r));
    }
    Ok(())
}

/// The human-readable form of one request.
#[must_use]
pub fn render(r: &RequestView) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let user = r.user.as_deref().unwrap_or("?");
    let _ = writeln!(
        s,
        "#{:<5} {:<11} label={} pid={} user={}({}) held {}s, {}s left",
        r.id,
        r.kind,
        r.label,
        r.pid,
        user,
        r.uid,
        r.age_ms / 1000,
        r.expires_in_ms / 1000
    );
    if let Some(d) = r.destination_text() {
        let _ = writeln!(s, "       destination: {d}");
    }
    if let Some(b) = &r.binary {
        let _ = writeln!(s, "       binary:      {b}");
    }
    let _ = writeln!(
        s,
        "       argv:        {}{}",
        quote_argv(&r.argv),
        if r.argv_truncated {
            " …(truncated)"
        } else {
            ""
        }
    );
    if let Some(c) = &r.cwd {
        let _ = writeln!(s, "       cwd:         {c}");
    }
    if !r.parents.is_empty() {
        let chain: Vec<String> = r
            .parents
            .iter()
            .map(|p| format!("{}({})", p.comm, p.pid))
            .collect();
        let _ = writeln!(s, "       parents:     {}", chain.join(" <- "));
    }
    if let Some(rule) = &r.rule {
        let _ = writeln!(s, "       rule:        {rule}");
    }
    if let Some(n) = &r.note {
        let _ = writeln!(s, "       note:        {n}");
    }
    if r.kind == ActionKind::ExecLoaded {
        let _ = writeln!(s, "       (held after loading: deny kills the process)");
    }
    s
}

/// argv quoted so that what is shown is unambiguous (spaces, quotes, control characters).
pub fn quote_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("{a:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `deny`/`kill` of one request (`id`), or of every held request `filter` selects (`--all`
/// without a filter: every one), each by its own decision over the control socket. Approvals
/// take one id only: a person approves an action they have seen in full.
pub fn decide_some(
    socket_dir: &Path,
    id: Option<u64>,
    filter: &Filter,
    decision: Decision,
) -> anyhow::Result<()> {
    if let Some(id) = id {
        return decide(socket_dir, id, decision);
    }
    let selected = held(socket_dir, filter.to_proto(), None)?;
    if selected.is_empty() {
        println!("no held request selected");
        return Ok(());
    }
    let mut failed = 0;
    for r in &selected {
        // One that was decided or expired meanwhile is reported, and the rest go on.
        if let Err(e) = decide(socket_dir, r.id, decision) {
            eprintln!("request #{}: {e:#}", r.id);
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} selected request(s) not decided",
            selected.len()
        );
    }
    Ok(())
}

pub fn decide(socket_dir: &Path, id: u64, decision: Decision) -> anyhow::Result<()> {
    let Response::Decided { id, outcome } = client::call(
        socket_dir,
        paths::CONTROL_SOCKET,
        &Request::Decide { id, decision },
    )?
    else {
        anyhow::bail!("unexpected answer to {decision}");
    };
    println!("request #{id}: {outcome}");
    Ok(())
}

/// `countersign grants list` on this host.
pub fn grants(socket_dir: &Path, json: bool) -> anyhow::Result<()> {
    let Response::Grants { grants } =
        client::call(socket_dir, paths::CONTROL_SOCKET, &Request::Grants)?
    else {
        anyhow::bail!("unexpected answer to grants");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&grants)?);
        return Ok(());
    }
    if grants.is_empty() {
        println!("no grants in force");
    }
    for g in grants {
        println!(
            "{:<10} label={} {} until {} (by {}) {}",
            g.id,
            g.label,
            g.covers,
            g.expires,
            g.by,
            if g.in_kernel { "[kernel]" } else { "[daemon]" }
        );
    }
    Ok(())
}

/// `countersign grants revoke ID` on this host.
pub fn revoke(socket_dir: &Path, id: &str) -> anyhow::Result<()> {
    let Response::Revoked { id } = client::call(
        socket_dir,
        paths::CONTROL_SOCKET,
        &Request::RevokeGrant { id: id.to_owned() },
    )?
    else {
        anyhow::bail!("unexpected answer to revoke");
    };
    println!("grant {id}: revoked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quote_argv;

    #[test]
    fn quotes_what_could_mislead() {
        assert_eq!(quote_argv(&["ls".into(), "-la".into()]), "ls -la");
        assert_eq!(quote_argv(&["echo".into(), "a b".into()]), "echo \"a b\"");
        assert_eq!(quote_argv(&["x\u{1b}[2K".into()]), "\"x\\u{1b}[2K\"");
        assert_eq!(quote_argv(&[String::new()]), "\"\"");
    }
}
