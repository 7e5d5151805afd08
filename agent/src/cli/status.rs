//! `countersign status`: which mode is enforcing and why, and the counters.
use std::path::Path;

use crate::{
    cli::client,
    proto::{Request, Response},
};

pub fn run(socket_dir: &Path, json: bool) -> anyhow::Result<()> {
    let Response::Status(s) = client::call(socket_dir, client::status_socket(), &Request::Status)?
    else {
        anyhow::bail!("unexpected answer to status");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "countersign daemon (pid {}) enforcing in {} mode",
        s.daemon_pid, s.mode
    );
    println!("  why:            {}", s.reason);
    if let Some(hooks) = &s.hooks {
        println!("  hooks:          {hooks}");
    }
    println!("  host id:        {}", s.host_id);
    println!("  uptime:         {}s", s.uptime_secs);
    println!(
        "  held requests:  {} (at most {})",
        s.pending, s.max_held_requests
    );
    if s.adopted > 0 {
        println!(
            "  adopted:        {} (taken over from an earlier daemon: stopped with on_stop: keep, or killed)",
            s.adopted
        );
    }
    println!(
        "  labels:         {}",
        if s.labels.is_empty() {
            "-".to_owned()
        } else {
            s.labels.join(", ")
        }
    );
    println!("  cgroup labels:  {}", s.cgroup_labels);
    if let Some(h) = &s.exec_hold {
        println!("  execs held:     {h}");
        if s.exec_notifiers > 0 {
            println!("  notifiers:      {} launched agent(s)", s.exec_notifiers);
        }
    }
    if let Some(l) = &s.local_sockets {
        println!("  local sockets:  {l}");
    }
    if let Some(l) = &s.other_listens {
        println!("  listens:        {l}");
    }
    if let Some(g) = &s.self_protection {
        match (&g.reason, g.contained) {
            (_, true) => println!(
                "  labelled root contained: yes ({} of countersign's files and directories guarded; on tamper: {})",
                g.protected_files, g.on_tamper
            ),
            (Some(why), false) => println!("  labelled root contained: no, because {why}"),
            (None, false) => println!("  labelled root contained: no"),
        }
        if g.contained {
            println!(
                "  run later:      {} places the system starts programs from later guarded (run_later)",
                g.run_later_guarded
            );
        }
        println!(
            "  daemon memory:  {}",
            if g.memory_locked {
                "locked (never in swap), not dumpable"
            } else {
                "NOT locked: the host key could be written to swap"
            }
        );
        if !g.refused.is_empty() {
            let refused: Vec<String> = g.refused.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  tamper refused: {}", refused.join(", "));
        }
    }
    if s.policy_files == 0 {
        println!("  policy:         none (every held action waits for a human)");
    } else {
        println!(
            "  policy:         {} rule(s) from {} file(s)",
            s.policy_rules, s.policy_files
        );
    }
    if let Some(e) = &s.policy_reload_error {
        println!("  ALARM: the last policy reload failed; the policy in force stays:\n{e}");
    }
    match s.records_receipted {
        Some(r) => println!(
            "  records:        {} written, {} receipted by the collector; spool {} bytes",
            s.records_written, r, s.spool_bytes
        ),
        None => println!(
            "  records:        {} written, none receipted; spool {} bytes",
            s.records_written, s.spool_bytes
        ),
    }
    if s.spool_alarm_bytes > 0 && s.spool_bytes > s.spool_alarm_bytes {
        println!(
            "  ALARM: the record spool holds {} bytes, above spool_alarm_bytes ({}): is the collector receipting? Nothing is dropped.",
            s.spool_bytes, s.spool_alarm_bytes
        );
    }
    if let Some(e) = &s.records_error {
        println!("  ALARM: signed records cannot be written; new requests are refused: {e}");
    }
    println!(
        "  timeout:        {}s, then {} (an escalate rule's own timeout and on_timeout come first)",
        s.request_timeout_secs, s.timeout_action
    );
    match &s.approver {
        None => println!("  approver:       none (decided on this host: `countersign requests`)"),
        Some(a) => {
            println!(
                "  approver:       {} ({}; {} sent, {} decisions received)",
                a.url,
                if a.enrolled {
                    "enrolled"
                } else {
                    "NOT enrolled"
                },
                a.sent,
                a.received
            );
            if let Some(e) = &a.last_error {
                println!("  approver error: {e}");
            }
        }
    }
    match &s.dns {
        None => {
            println!("  names:          off (dns.enabled: false; connects show addresses only)")
        }
        Some(d) => {
            println!(
                "  names:          {} address(es) named from DNS answers of {} ({} answers read; ignored: {} from other servers, {} to no query of this host)",
                d.addresses,
                d.resolvers.join(", "),
                d.answers,
                d.untrusted,
                d.unsolicited
            );
            if let Some(c) = &d.capture {
                println!("  DNS captured on: {c}");
            }
            if let Some(e) = &d.error {
                println!("  ALARM: destination names are unknown: {e}");
            }
            if d.dropped > 0 {
                println!(
                    "  warning: {} DNS packet(s) arrived faster than the daemon read them; their names are unknown",
                    d.dropped
                );
            }
        }
    }
    println!("  holds so far:   {}", s.holds);
    println!(
        "  allowed in kernel: {} connects, {} execs (policy fast path), {} by grants",
        s.fast_allowed, s.fast_allowed_execs, s.grant_allowed
    );
    println!(
        "  sends decided in kernel: {} (a decision their process already had)",
        s.send_decided
    );
    if s.unholdable_refused > 0 {
        println!(
            "  refused where no hold is possible (io_uring, 32-bit calls): {}",
            s.unholdable_refused
        );
    }
    if s.events_deferred > 0 {
        println!(
            "  held in a burst faster than the event ring: {} (taken from the kernel's task table; none lost)",
            s.events_deferred
        );
    }
    if s.refused_over_bound > 0 {
        println!(
            "  ALARM: {} requests refused because max_held_requests ({}) were held already (recorded)",
            s.refused_over_bound, s.max_held_requests
        );
    }
    if s.events_dropped > 0 || s.label_inherit_failed > 0 {
        println!(
            "  ALARM: {} events dropped (those actions were refused), {} children not labelled",
            s.events_dropped, s.label_inherit_failed
        );
    }
    Ok(())
}
