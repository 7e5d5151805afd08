//! Slack Socket Mode: answers arrive over a WebSocket the approver opens to Slack, so the
//! approver needs no inbound address. `apps.connections.open` (app-level token) gives a
//! one-time URL; Slack sends `hello`, then envelopes (`interactive` payloads), each of which
//! is acknowledged with its `envelope_id` (and, for a modal, the answer payload); a
//! `disconnect` means open a new connection. The connection is kept for ever, with backoff.
use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::slack::{Slack, parse_payload};
use crate::approver::{App, api::handle_slack_click};

/// Largest envelope read.
const MAX_FRAME: usize = 256 * 1024;

/// Runs Socket Mode until the process ends.
pub async fn run(app: Arc<App>, slack: Arc<Slack>, app_token: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        match session(&app, &slack, &app_token).await {
            Ok(()) => {
                tracing::info!("Slack Socket Mode: reconnecting (asked by Slack)");
                delay = Duration::from_millis(500);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Slack Socket Mode connection failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One connection: `Ok` when Slack asked us to reconnect.
async fn session(app: &Arc<App>, slack: &Arc<Slack>, app_token: &str) -> Result<(), String> {
    let opened = slack
        .call_with_token("apps.connections.open", app_token, &json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let url = opened["url"]
        .as_str()
        .ok_or("apps.connections.open gave no url")?;
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(MAX_FRAME);
    config.max_frame_size = Some(MAX_FRAME);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    tracing::info!("Slack Socket Mode connected");
    while let Some(msg) = ws.next().await {
        let msg = msg.map_err(|e| format!("reading: {e}"))?;
        let text = match msg {
            Message::Text(t) => t,
            Message::Ping(p) => {
                ws.send(Message::Pong(p)).await.map_err(|e| e.to_string())?;
                continue;
            }
            Message::Close(_) => return Err("closed by Slack".into()),
            _ => continue,
        };
        let Ok(envelope) = serde_json::from_str::<Value>(&text) else {
            tracing::warn!("Slack Socket Mode: a frame that is not JSON");
            continue;
        };
        match envelope["type"].as_str() {
            Some("hello") => continue,
            Some("disconnect") => return Ok(()),
            _ => {}
        }
        let Some(id) = envelope["envelope_id"].as_str() else {
            continue;
        };
        let answer = if envelope["type"] == "interactive" {
            match parse_payload(&envelope["payload"]) {
                Ok(Some(click)) => handle_slack_click(app, slack, click)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(status = %e.0, error = e.1, "Slack Socket Mode: the click failed");
                        None
                    }),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "Slack Socket Mode: malformed payload");
                    None
                }
            }
        } else {
            None
        };
        // Acknowledge every envelope (else Slack retries it), with the modal's answer if any.
        let mut ack = json!({"envelope_id": id});
        if let Some(a) = answer {
            ack["payload"] = a;
        }
        ws.send(Message::Text(ack.to_string().into()))
            .await
            .map_err(|e| format!("acknowledging: {e}"))?;
    }
    Err("the connection ended".into())
}
