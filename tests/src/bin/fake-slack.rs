//! fake-slack: a local stand-in for Slack, for the end-to-end tests (no real Slack is
//! reachable from the test machines). It implements the parts of the Slack Web API that
//! countersign calls, with Slack's documented request and response shapes and errors —
//! `chat.postMessage`, `chat.update`, `views.open` (bearer token, `{"ok": …}` answers,
//! `invalid_auth`, `channel_not_found`, `message_not_found`, `expired_trigger_id`) — and
//! sends interactivity callbacks the way Slack does: a `block_actions` or `view_submission`
//! payload, form-encoded as `payload=…`, signed with the app's signing secret (v0: HMAC-SHA256
//! over `v0:timestamp:body`, headers `X-Slack-Request-Timestamp` and `X-Slack-Signature`).
//!
//! Socket Mode too: `apps.connections.open` (app-level token) gives a `ws://` URL; the
//! socket gets `hello`, then `interactive` envelopes that must be acknowledged with their
//! `envelope_id`; `POST /_test/disconnect` sends Slack's `disconnect` (refresh) message.
//!
//! Usage: `fake-slack TOKEN SIGNING_SECRET CHANNEL APP_TOKEN`; prints `listening on ADDR` and serves
//! `/api/<method>` plus a test-only control surface:
//! - `GET /_test/messages`: every message with its current blocks and its edit history;
//! - `POST /_test/click {request_url, ts, action_id, team, user, forge?, age_secs?, repeat?}`:
//!   a user clicks a button of message `ts` (`forge`: sign with a wrong secret; `age_secs`:
//!   a timestamp that old; `repeat`: deliver the same payload that many times, as Slack's
//!   retries do; `socket`: deliver it over the Socket Mode connection instead); answers with
//!   the request URL's status codes and bodies (Socket Mode: 200 and the acknowledgement);
//! - `POST /_test/submit {request_url, view_id, team, user, reason}`: submits an open modal.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{
        Path, State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::HeaderMap,
    response::Response,
    routing::{get, post},
};
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;

#[derive(Default)]
struct Slack {
    token: String,
    secret: String,
    channel: String,
    messages: Vec<Value>,
    triggers: HashMap<String, u64>,
    views: Vec<Value>,
    /// What apps posted to response URLs (ephemeral replies to the clicking user).
    responses: Vec<Value>,
    counter: u64,
    addr: String,
    app_token: String,
    /// The open Socket Mode connection: envelopes to send, each with where its ack goes.
    socket: Option<tokio::sync::mpsc::Sender<(Value, Option<tokio::sync::oneshot::Sender<Value>>)>>,
    /// Socket Mode connections opened so far.
    connections: u64,
}

type S = State<Arc<Mutex<Slack>>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authorised(s: &Slack, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", s.token))
}

async fn api(
    State(st): S,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Json<Value> {
    let mut s = st.lock().unwrap();
    if method == "apps.connections.open" {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", s.app_token));
        if !ok {
            return Json(json!({"ok": false, "error": "invalid_auth"}));
        }
        s.counter += 1;
        return Json(
            json!({"ok": true, "url": format!("ws://{}/socket/ticket-{}", s.addr, s.counter)}),
        );
    }
    if !authorised(&s, &headers) {
        return Json(json!({"ok": false, "error": "invalid_auth"}));
    }
    let Ok(b) = serde_json::from_str::<Value>(&body) else {
        return Json(json!({"ok": false, "error": "invalid_json"}));
    };
    match method.as_str() {
        "chat.postMessage" => {
            if b["channel"] != Value::String(s.channel.clone()) {
                return Json(json!({"ok": false, "error": "channel_not_found"}));
            }
            if b["text"].as_str().is_none_or(str::is_empty) && !b["blocks"].is_array() {
                return Json(json!({"ok": false, "error": "no_text"}));
            }
            if b["blocks"].as_array().is_some_and(|a| a.len() > 50) {
                return Json(json!({"ok": false, "error": "invalid_blocks"}));
            }
            if let Some(parent) = b["thread_ts"].as_str()
                && !s.messages.iter().any(|m| m["ts"] == parent)
            {
                return Json(json!({"ok": false, "error": "thread_not_found"}));
            }
            s.counter += 1;
            let ts = format!("{}.{:06}", now(), s.counter);
            let msg = json!({"channel": b["channel"], "ts": ts, "thread_ts": b["thread_ts"], "text": b["text"], "blocks": b["blocks"], "edits": []});
            s.messages.push(msg.clone());
            Json(
                json!({"ok": true, "channel": b["channel"], "ts": ts, "message": {"type": "message", "text": b["text"], "blocks": b["blocks"], "ts": ts}}),
            )
        }
        "chat.update" => {
            let Some(m) = s
                .messages
                .iter_mut()
                .find(|m| m["channel"] == b["channel"] && m["ts"] == b["ts"])
            else {
                return Json(json!({"ok": false, "error": "message_not_found"}));
            };
            let old = json!({"text": m["text"], "blocks": m["blocks"]});
            m["edits"].as_array_mut().unwrap().push(old);
            m["text"] = b["text"].clone();
            m["blocks"] = b["blocks"].clone();
            Json(json!({"ok": true, "channel": b["channel"], "ts": b["ts"], "text": b["text"]}))
        }
        "views.open" => {
            let trigger = b["trigger_id"].as_str().unwrap_or_default().to_owned();
            // Slack: a trigger id is valid for 3 seconds.
            match s.triggers.get(&trigger) {
                Some(t) if now() - t <= 3 => {}
                _ => return Json(json!({"ok": false, "error": "expired_trigger_id"})),
            }
            s.counter += 1;
            let mut view = b["view"].clone();
            view["id"] = json!(format!("V{:08}", s.counter));
            s.views.push(view.clone());
            Json(json!({"ok": true, "view": view}))
        }
        _ => Json(json!({"ok": false, "error": "unknown_method"})),
    }
}

/// A response URL: accepts one JSON message from the app, as Slack's do.
async fn response(State(st): S, Path((team, n)): Path<(String, u64)>, body: String) -> Json<Value> {
    let mut s = st.lock().unwrap();
    let Ok(b) = serde_json::from_str::<Value>(&body) else {
        return Json(json!({"ok": false, "error": "invalid_json"}));
    };
    s.responses
        .push(json!({"team": team, "n": n, "message": b}));
    Json(json!({"ok": true}))
}

async fn socket(State(st): S, Path(_ticket): Path<String>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |sock| serve_socket(st, sock))
}

async fn serve_socket(st: Arc<Mutex<Slack>>, mut sock: WebSocket) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    {
        let mut s = st.lock().unwrap();
        s.socket = Some(tx);
        s.connections += 1;
    }
    let hello = json!({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0000000001"}, "debug_info": {"host": "fake-slack"}});
    if sock
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut waiting: HashMap<String, tokio::sync::oneshot::Sender<Value>> = HashMap::new();
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some((frame, ack)) = out else { return };
                if let (Some(id), Some(ack)) = (frame["envelope_id"].as_str(), ack) {
                    waiting.insert(id.to_owned(), ack);
                }
                if sock.send(Message::Text(frame.to_string().into())).await.is_err() {
                    return;
                }
            }
            msg = sock.recv() => {
                let Some(Ok(Message::Text(t))) = msg else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&t)
                    && let Some(ack) = v["envelope_id"].as_str().and_then(|id| waiting.remove(id))
                {
                    let _ = ack.send(v);
                }
            }
        }
    }
}

/// Sends one envelope over the Socket Mode connection and waits for its acknowledgement.
async fn over_socket(st: &Arc<Mutex<Slack>>, payload: Value) -> Value {
    let (tx, id) = {
        let mut s = st.lock().unwrap();
        s.counter += 1;
        (s.socket.clone(), format!("env-{}", s.counter))
    };
    let Some(tx) = tx else {
        return json!({"answers": [{"status": 0, "body": "no Socket Mode connection"}]});
    };
    let envelope = json!({"envelope_id": id, "type": "interactive", "accepts_response_payload": true, "retry_attempt": 0, "retry_reason": "", "payload": payload});
    let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
    if tx.send((envelope, Some(ack_tx))).await.is_err() {
        return json!({"answers": [{"status": 0, "body": "Socket Mode connection gone"}]});
    }
    match tokio::time::timeout(std::time::Duration::from_secs(10), ack_rx).await {
        Ok(Ok(ack)) => json!({"answers": [{"status": 200, "body": ack.to_string()}]}),
        _ => json!({"answers": [{"status": 0, "body": "not acknowledged"}]}),
    }
}

async fn disconnect(State(st): S) -> Json<Value> {
    let tx = st.lock().unwrap().socket.take();
    if let Some(tx) = tx {
        let _ = tx.send((json!({"type": "disconnect", "reason": "refresh_requested", "debug_info": {"host": "fake-slack"}}), None)).await;
    }
    Json(json!({"ok": true}))
}

async fn messages(State(st): S) -> Json<Value> {
    let s = st.lock().unwrap();
    Json(
        json!({"messages": s.messages, "views": s.views, "responses": s.responses, "connections": s.connections}),
    )
}

/// Sends `payload` to the request URL the way Slack does.
async fn deliver(
    secret: &str,
    request_url: &str,
    payload: &Value,
    age_secs: u64,
    repeat: u64,
) -> Value {
    let body = format!(
        "payload={}",
        url::form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    );
    let ts = now() - age_secs;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for attempt in 0..repeat.max(1) {
        let mut req = client
            .post(request_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("X-Slack-Request-Timestamp", ts.to_string())
            .header("X-Slack-Signature", format!("v0={sig}"))
            .body(body.clone());
        if attempt > 0 {
            req = req
                .header("X-Slack-Retry-Num", attempt.to_string())
                .header("X-Slack-Retry-Reason", "http_timeout");
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                answers.push(json!({"status": status, "body": text}));
            }
            Err(e) => answers.push(json!({"status": 0, "body": e.to_string()})),
        }
    }
    json!({"answers": answers})
}

async fn click(State(st): S, Json(b): Json<Value>) -> Json<Value> {
    let (secret, payload) = {
        let mut s = st.lock().unwrap();
        let Some(m) = s.messages.iter().find(|m| m["ts"] == b["ts"]).cloned() else {
            return Json(json!({"error": "no such message"}));
        };
        let action_id = b["action_id"].as_str().unwrap_or_default();
        let Some(button) = m["blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|blk| blk["type"] == "actions")
            .flat_map(|blk| blk["elements"].as_array().cloned().unwrap_or_default())
            .find(|e| e["action_id"] == action_id)
        else {
            return Json(
                json!({"error": format!("message {} has no button {action_id}", m["ts"])}),
            );
        };
        s.counter += 1;
        let trigger = format!("{}.{}.{:x}", now(), s.counter, 0xfeed_u32);
        s.triggers.insert(trigger.clone(), now());
        let team = b["team"].as_str().unwrap_or("T0000");
        let user = b["user"].as_str().unwrap_or("U0000");
        let payload = json!({
            "type": "block_actions",
            "team": {"id": team, "domain": "example"},
            "user": {"id": user, "username": "someone", "name": "someone", "team_id": team},
            "api_app_id": "A0000000001",
            "token": "deprecated-verification-token",
            "container": {"type": "message", "message_ts": m["ts"], "channel_id": m["channel"], "is_ephemeral": false},
            "trigger_id": trigger,
            "channel": {"id": m["channel"], "name": "approvals"},
            "message": {"type": "message", "ts": m["ts"], "text": m["text"], "blocks": m["blocks"]},
            // Real Slack hands out a URL on its hooks host; this stand-in serves its own.
            "response_url": format!("http://{}/actions/{}/{}", s.addr, team, s.counter),
            "actions": [{
                "action_id": action_id,
                "block_id": button["block_id"].clone(),
                "text": button["text"].clone(),
                "value": button["value"].clone(),
                "type": "button",
                "action_ts": format!("{}.{:06}", now(), s.counter),
            }],
        });
        let secret = if b["forge"] == true {
            "not-the-signing-secret".to_owned()
        } else {
            s.secret.clone()
        };
        (secret, payload)
    };
    if b["socket"] == true {
        return Json(over_socket(&st, payload).await);
    }
    let url = b["request_url"].as_str().unwrap_or_default().to_owned();
    Json(
        deliver(
            &secret,
            &url,
            &payload,
            b["age_secs"].as_u64().unwrap_or(0),
            b["repeat"].as_u64().unwrap_or(1),
        )
        .await,
    )
}

async fn submit(State(st): S, Json(b): Json<Value>) -> Json<Value> {
    let (secret, payload) = {
        let s = st.lock().unwrap();
        let Some(view) = s.views.iter().find(|v| v["id"] == b["view_id"]).cloned() else {
            return Json(json!({"error": "no such view"}));
        };
        let team = b["team"].as_str().unwrap_or("T0000");
        let user = b["user"].as_str().unwrap_or("U0000");
        let mut state = json!({"values": {}});
        for blk in view["blocks"].as_array().into_iter().flatten() {
            if blk["type"] == "input" {
                let bid = blk["block_id"].as_str().unwrap_or_default();
                let aid = blk["element"]["action_id"].as_str().unwrap_or_default();
                state["values"][bid] =
                    json!({aid: {"type": "plain_text_input", "value": b["reason"]}});
            }
        }
        let mut v = view.clone();
        v["state"] = state;
        let payload = json!({
            "type": "view_submission",
            "team": {"id": team, "domain": "example"},
            "user": {"id": user, "username": "someone", "name": "someone", "team_id": team},
            "api_app_id": "A0000000001",
            "token": "deprecated-verification-token",
            "trigger_id": "submission-trigger",
            "view": v,
        });
        (s.secret.clone(), payload)
    };
    if b["socket"] == true {
        return Json(over_socket(&st, payload).await);
    }
    let url = b["request_url"].as_str().unwrap_or_default().to_owned();
    Json(deliver(&secret, &url, &payload, 0, 1).await)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, secret, channel, app_token] = <[String; 4]>::try_from(args)
        .unwrap_or_else(|_| panic!("usage: fake-slack TOKEN SIGNING_SECRET CHANNEL APP_TOKEN"));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let state = Arc::new(Mutex::new(Slack {
        token,
        secret,
        channel,
        app_token,
        addr: addr.clone(),
        ..Slack::default()
    }));
    let app = Router::new()
        .route("/api/{method}", post(api))
        .route("/actions/{team}/{n}", post(response))
        .route("/socket/{ticket}", get(socket))
        .route("/_test/disconnect", post(disconnect))
        .route("/_test/messages", get(messages))
        .route("/_test/click", post(click))
        .route("/_test/submit", post(submit))
        .with_state(state);
    println!("listening on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
