//! Generic webhook: a signed JSON POST for anything else (paging, on-call tooling). The body
//! is `{"event": "requested"|"decided"|"expired", "request": {…}}`; the receiver checks
//! `X-Countersign-Signature: v1=HEX(HMAC-SHA256(secret, "v1:" + timestamp + ":" + body))` with
//! `X-Countersign-Timestamp` (Unix seconds), the same construction as Slack's v0 signatures.
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use super::{BoxFuture, Channel, ChannelError};
use crate::approver::store::{StoredRequest, rfc3339};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// Shared secret for the signature header.
    pub secret: String,
}

pub struct Webhook {
    config: WebhookConfig,
    http: reqwest::Client,
}

impl Webhook {
    #[must_use]
    pub fn new(config: WebhookConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    async fn post(
        &self,
        event: &str,
        req: &StoredRequest,
        text: Option<&str>,
        public_url: Option<&str>,
    ) -> Result<(), ChannelError> {
        let body = serde_json::to_vec(&json!({
            "event": event,
            "text": text,
            "request": {
                "id": req.id,
                "state": req.state,
                "host_id": req.escalation.host_id,
                "host_name": req.escalation.host_name,
                "on_behalf_of": req.escalation.on_behalf_of,
                "approvers": req.escalation.approvers,
                "quorum": req.escalation.quorum,
                "deadline": rfc3339(req.deadline_ms),
                "action": req.escalation.request,
                "answers": req.answers,
                "url": public_url.map(|u| format!("{}/requests/{}", u.trim_end_matches('/'), req.id)),
            }
        }))
        .map_err(|e| ChannelError::Http { channel: "webhook", message: e.to_string() })?;
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let resp = self
            .http
            .post(&self.config.url)
            .header("Content-Type", "application/json")
            .header("X-Countersign-Timestamp", ts.to_string())
            .header(
                "X-Countersign-Signature",
                signature(&self.config.secret, ts, &body),
            )
            .timeout(Duration::from_secs(10))
            .body(body)
            .send()
            .await
            .map_err(|e| ChannelError::Http {
                channel: "webhook",
                message: e.to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(ChannelError::Api {
                channel: "webhook",
                message: format!("HTTP {}", resp.status()),
            });
        }
        Ok(())
    }
}

/// The `X-Countersign-Signature` value for `body` sent at `timestamp`.
#[must_use]
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("v1:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v1={}", crate::sign::hex(&mac.finalize().into_bytes()))
}

impl Channel for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn notify<'a>(
        &'a self,
        req: &'a StoredRequest,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, ChannelError>> {
        Box::pin(async move {
            self.post("requested", req, None, public_url).await?;
            Ok(Some(String::new()))
        })
    }

    fn nudge<'a>(
        &'a self,
        req: &'a StoredRequest,
        _reference: &'a str,
        text: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move { self.post("reminder", req, Some(text), public_url).await })
    }

    fn update<'a>(
        &'a self,
        req: &'a StoredRequest,
        _reference: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move {
            let event = if req.state == "expired" {
                "expired"
            } else {
                "decided"
            };
            self.post(event, req, None, public_url).await
        })
    }
}
