//! OCSF (Open Cybersecurity Schema Framework 1.1.0) events for SIEM ingestion: a decision
//! about an exec is a Process Activity (class 1007, Launch), about a connect a Network
//! Activity (class 4001, Open), both with the `security_control` profile (`action_id`,
//! `disposition_id`) and the `host` profile (`device`). What OCSF has no attribute for
//! (the decision word, who decided, the rule, the chain position, the approvals) is kept in
//! `unmapped`. A refused tamper attempt is a Detection Finding (class 2004). Other records
//! (heartbeats, starts, policy loads) are not security control events and are not mapped.
use serde_json::{Value, json};

use super::{Body, Record};

/// The OCSF schema version these events follow.
pub const OCSF_VERSION: &str = "1.1.0";

/// The address and port of a request's `destination` (`ip:port`, `[v6]:port`); empty and 0
/// where there is none.
fn endpoint(q: &crate::proto::RequestView) -> (String, u16) {
    q.destination
        .as_deref()
        .and_then(|d| d.rsplit_once(':'))
        .map_or((String::new(), 0), |(ip, port)| {
            (
                ip.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port.parse::<u16>().unwrap_or(0),
            )
        })
}

/// The OCSF event for `record`, if it is a decision.
#[must_use]
pub fn event(record: &Record) -> Option<Value> {
    if let Body::Tamper(t) = &record.body {
        return Some(tamper(record, t));
    }
    let Body::Decision(d) = &record.body else {
        return None;
    };
    let q = &d.request;
    let allowed = matches!(
        d.decision.as_str(),
        "approved" | "auto-allowed" | "expired-approved"
    );
    let (action_id, action, disposition_id, disposition) = if allowed {
        (1, "Allowed", 1, "Allowed")
    } else {
        (2, "Denied", 2, "Blocked")
    };
    let time = crate::collector::time_ms(&record.time).unwrap_or(0);
    let user = json!({"uid": q.uid.to_string(), "name": q.user});
    let process = process_json(
        (q.pid, q.tid),
        &q.argv,
        q.binary.as_deref(),
        &user,
        &q.parents,
    );
    let approvals: Vec<Value> = d
        .approver_decision
        .as_ref()
        .and_then(|e| e.unverified_payload().ok())
        .and_then(|b| serde_json::from_slice::<crate::sign::statement::DecisionStatement>(&b).ok())
        .map(|st| {
            st.approvals
                .iter()
                .map(|a| json!({"approver": a.approver, "identity": a.identity, "channel": a.channel, "decision": a.decision.to_string(), "at": a.at}))
                .collect()
        })
        .unwrap_or_default();
    let mut ev = json!({
        "time": time,
        "severity_id": 1,
        "severity": "Informational",
        "status_id": 1,
        "status": "Success",
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "message": format!("{} {} {} ({}) by {}", q.kind, target(q), d.decision, d.applied, d.by),
        "metadata": metadata(record),
        "device": device(record),
        "actor": {"user": user, "process": process},
        "unmapped": {
            "decision": d.decision,
            "applied": d.applied,
            "decided_by": d.by,
            "rule": q.rule,
            "label": q.label,
            "request_id": q.id,
            "action_hash": d.action_hash,
            "on_behalf_of": d.on_behalf_of,
            "approvals": approvals,
            "host_id": record.host_id,
            "chain_id": record.chain_id,
            "seq": record.seq,
        },
    });
    let obj = ev.as_object_mut().expect("an object");
    if q.kind.has_destination() {
        let (ip, port) = endpoint(q);
        obj.insert("class_uid".into(), 4001.into());
        obj.insert("class_name".into(), "Network Activity".into());
        obj.insert("category_uid".into(), 4.into());
        obj.insert("category_name".into(), "Network Activity".into());
        // A connect opens a connection; a send without one is traffic.
        let (activity, name) = if q.kind == crate::proto::ActionKind::Send {
            (6, "Traffic")
        } else {
            (1, "Open")
        };
        obj.insert("activity_id".into(), activity.into());
        obj.insert("activity_name".into(), name.into());
        obj.insert("type_uid".into(), (400_100 + activity).into());
        let mut dst = json!({"ip": ip, "port": port});
        // The most recent name the host's resolver gave for the address (context only).
        if let Some(name) = q.destination_names.first() {
            dst["hostname"] = name.clone().into();
        }
        obj.insert("dst_endpoint".into(), dst);
        obj.insert(
            "connection_info".into(),
            json!({"protocol_name": q.protocol, "direction_id": 2, "direction": "Outbound"}),
        );
    } else if q.kind == crate::proto::ActionKind::Listen {
        // Listening for connections: the host's own endpoint, inbound.
        let (ip, port) = endpoint(q);
        obj.insert("class_uid".into(), 4001.into());
        obj.insert("class_name".into(), "Network Activity".into());
        obj.insert("category_uid".into(), 4.into());
        obj.insert("category_name".into(), "Network Activity".into());
        obj.insert("activity_id".into(), 7.into());
        obj.insert("activity_name".into(), "Listen".into());
        obj.insert("type_uid".into(), 400_107.into());
        obj.insert("src_endpoint".into(), json!({"ip": ip, "port": port}));
        obj.insert(
            "connection_info".into(),
            json!({"protocol_name": q.protocol, "direction_id": 1, "direction": "Inbound"}),
        );
    } else if let Some(socket) = q.socket.as_ref().or(q
        .destination
        .as_ref()
        .filter(|_| q.kind == crate::proto::ActionKind::Unix))
    {
        // Creating a raw, packet or other unusual socket, or reaching a local service:
        // network activity of no other kind.
        obj.insert("class_uid".into(), 4001.into());
        obj.insert("class_name".into(), "Network Activity".into());
        obj.insert("category_uid".into(), 4.into());
        obj.insert("category_name".into(), "Network Activity".into());
        obj.insert("activity_id".into(), 99.into());
        obj.insert("activity_name".into(), "Other".into());
        obj.insert("type_uid".into(), 400_199.into());
        obj.insert(
            "connection_info".into(),
            json!({"protocol_name": socket, "direction_id": 2, "direction": "Outbound"}),
        );
    } else {
        obj.insert("class_uid".into(), 1007.into());
        obj.insert("class_name".into(), "Process Activity".into());
        obj.insert("category_uid".into(), 1.into());
        obj.insert("category_name".into(), "System Activity".into());
        obj.insert("activity_id".into(), 1.into());
        obj.insert("activity_name".into(), "Launch".into());
        obj.insert("type_uid".into(), 100_701.into());
        obj.insert("process".into(), process);
    }
    Some(ev)
}

/// A refused attempt on countersign itself: a Detection Finding (class 2004) of high
/// severity, blocked, with the process that tried as the actor.
fn tamper(record: &Record, t: &super::TamperRecord) -> Value {
    let time = crate::collector::time_ms(&record.time).unwrap_or(0);
    let user = json!({"uid": t.uid.to_string(), "name": t.user});
    let mut process = process_json(
        (t.pid, t.tid),
        &t.argv,
        t.binary.as_deref(),
        &user,
        &t.parents,
    );
    process["name"] = t.comm.clone().into();
    let uid = format!("{}:{}", record.chain_id, record.seq);
    json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": 200_401,
        "time": time,
        "severity_id": 4,
        "severity": "High",
        "status_id": 1,
        "status": "New",
        "action_id": 2,
        "action": "Denied",
        "disposition_id": 2,
        "disposition": "Blocked",
        "message": format!("a labelled process tried to tamper with countersign ({}: {}); refused ({}) by {}", t.attempt, t.target, t.applied, t.by),
        "finding_info": {
            "uid": uid,
            "title": format!("countersign tamper attempt: {}", t.attempt),
            "types": ["countersign-tamper", t.attempt],
        },
        "metadata": metadata(record),
        "device": device(record),
        "actor": {"user": user, "process": process},
        "unmapped": {
            "attempt": t.attempt,
            "target": t.target,
            "applied": t.applied,
            "refused_by": t.by,
            "label": t.label,
            "on_behalf_of": t.on_behalf_of,
            "host_id": record.host_id,
            "chain_id": record.chain_id,
            "seq": record.seq,
        },
    })
}

/// The `metadata` of every event: the schema, the record's place in its chain, the product.
fn metadata(record: &Record) -> Value {
    json!({
        "version": OCSF_VERSION,
        "uid": format!("{}:{}", record.chain_id, record.seq),
        "original_time": record.time,
        "profiles": ["security_control", "host"],
        "product": {"name": "countersign", "vendor_name": "countersign", "version": env!("CARGO_PKG_VERSION")},
    })
}

/// The `device` (the `host` profile): the host that wrote the record.
fn device(record: &Record) -> Value {
    json!({"hostname": record.host_name, "uid": record.host_id, "type_id": 0})
}

/// An OCSF Process object: (pid, tid), command line, executable, user, parent.
fn process_json(
    (pid, tid): (u32, u32),
    argv: &[String],
    binary: Option<&str>,
    user: &Value,
    parents: &[crate::proto::ProcInfo],
) -> Value {
    json!({
        "pid": pid,
        "tid": tid,
        "cmd_line": argv.join(" "),
        "file": binary.map(|b| json!({
            "path": b,
            "name": b.rsplit('/').next().unwrap_or(b),
            "type_id": 1,
        })),
        "user": user,
        "parent_process": parents.first().map(|p| json!({"pid": p.pid, "name": p.comm})),
    })
}

fn target(q: &crate::proto::RequestView) -> String {
    q.destination
        .clone()
        .or_else(|| q.socket.as_ref().map(|s| format!("socket {s}")))
        .or_else(|| q.binary.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DecisionRecord, tests::view};

    #[test]
    fn a_tamper_attempt_is_a_blocked_detection_finding() {
        let ev = event(&record(Body::Tamper(crate::records::TamperRecord {
            attempt: "bpf".into(),
            target: "bpf() command 7".into(),
            applied: "eperm".into(),
            by: "kernel".into(),
            label: "coder".into(),
            pid: 4242,
            tid: 4243,
            uid: 0,
            user: Some("root".into()),
            comm: "python3".into(),
            binary: Some("/usr/bin/python3".into()),
            argv: vec!["python3".into(), "x.py".into()],
            parents: Vec::new(),
            on_behalf_of: None,
        })))
        .expect("mapped");
        assert_eq!(ev["class_uid"], 2004);
        assert_eq!(ev["type_uid"], 200_401);
        assert_eq!(ev["disposition"], "Blocked");
        assert_eq!(ev["severity_id"], 4);
        assert_eq!(ev["actor"]["process"]["pid"], 4242);
        assert_eq!(ev["actor"]["process"]["name"], "python3");
        assert_eq!(ev["unmapped"]["attempt"], "bpf");
        assert_eq!(ev["finding_info"]["uid"], "c1:42");
    }

    fn record(body: Body) -> Record {
        Record {
            v: 1,
            host_id: "h1".into(),
            host_name: "build-7".into(),
            chain_id: "c1".into(),
            seq: 42,
            prev: None,
            time: "2026-11-24T15:51:27.5Z".into(),
            body,
        }
    }

    fn decision(decision: &str, mut request: crate::proto::RequestView) -> Body {
        request.rule = Some("coder: rule 2".into());
        Body::Decision(DecisionRecord {
            decision: decision.into(),
            applied: "released".into(),
            by: "cli uid=0 pid=1".into(),
            action_hash: "ab".into(),
            request,
            on_behalf_of: Some("alice".into()),
            approver_decision: None,
        })
    }

    #[test]
    fn an_approved_exec_is_an_allowed_process_launch() {
        let e = event(&record(decision("approved", view(7)))).unwrap();
        assert_eq!(e["class_uid"], 1007);
        assert_eq!(e["type_uid"], 100_701);
        assert_eq!(e["action_id"], 1);
        assert_eq!(e["disposition_id"], 1);
        assert_eq!(
            e["time"].as_i64(),
            crate::collector::time_ms("2026-11-24T15:51:27.5Z")
        );
        assert!(e["time"].as_i64().unwrap() > 1_700_000_000_000);
        assert_eq!(e["process"]["file"]["path"], "/usr/bin/curl");
        assert_eq!(e["process"]["cmd_line"], "curl https://x");
        assert_eq!(e["device"]["hostname"], "build-7");
        assert_eq!(e["metadata"]["uid"], "c1:42");
        assert_eq!(e["unmapped"]["rule"], "coder: rule 2");
        assert_eq!(e["unmapped"]["on_behalf_of"], "alice");
    }

    #[test]
    fn a_denied_connect_is_a_blocked_network_open() {
        let mut v = view(8);
        v.kind = crate::proto::ActionKind::Connect;
        v.destination = Some("[2001:db8::1]:443".into());
        v.protocol = Some("tcp".into());
        let e = event(&record(decision("denied", v))).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400_101);
        assert_eq!(e["action_id"], 2);
        assert_eq!(e["disposition"], "Blocked");
        assert_eq!(e["dst_endpoint"]["ip"], "2001:db8::1");
        assert_eq!(e["dst_endpoint"]["port"], 443);
        assert!(e["dst_endpoint"].get("hostname").is_none());
        let mut named = view(9);
        named.kind = crate::proto::ActionKind::Connect;
        named.destination = Some("93.184.216.34:443".into());
        named.destination_names = vec!["api.example.com".into(), "cdn.example.net".into()];
        let e = event(&record(decision("approved", named))).unwrap();
        assert_eq!(e["dst_endpoint"]["hostname"], "api.example.com");
        assert!(
            event(&record(Body::Heartbeat {
                pending: 0,
                interval_secs: 60
            }))
            .is_none()
        );
    }

    #[test]
    fn listens_are_inbound_network_activity() {
        let mut v = view(12);
        v.kind = crate::proto::ActionKind::Listen;
        v.destination = Some("0.0.0.0:8080".into());
        v.protocol = Some("tcp".into());
        let e = event(&record(decision("denied", v))).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400_107);
        assert_eq!(e["activity_name"], "Listen");
        assert_eq!(e["src_endpoint"]["ip"], "0.0.0.0");
        assert_eq!(e["src_endpoint"]["port"], 8080);
        assert_eq!(e["connection_info"]["direction"], "Inbound");
    }

    #[test]
    fn sends_are_traffic_and_sockets_other_network_activity() {
        let mut v = view(10);
        v.kind = crate::proto::ActionKind::Send;
        v.destination = Some("10.0.0.9:514".into());
        v.protocol = Some("udp".into());
        let e = event(&record(decision("denied", v))).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400_106);
        assert_eq!(e["activity_name"], "Traffic");
        assert_eq!(e["dst_endpoint"]["port"], 514);
        let mut v = view(11);
        v.kind = crate::proto::ActionKind::Socket;
        v.socket = Some("packet/raw protocol 768".into());
        let e = event(&record(decision("denied", v))).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400_199);
        assert_eq!(
            e["connection_info"]["protocol_name"],
            "packet/raw protocol 768"
        );
        assert!(
            e["message"].as_str().unwrap().contains("socket packet/raw"),
            "{e}"
        );
    }
}
