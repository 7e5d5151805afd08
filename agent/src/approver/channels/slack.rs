//! Slack: a Block Kit message per request in a channel, Approve / Deny / Kill buttons, answers
//! through Slack's interactivity callbacks (HTTP request URL, v0 signatures), a modal for the
//! reason when the rule asks for one, and the message updated in place once decided or expired.
//!
//! Web API calls used: `chat.postMessage`, `chat.update`, `views.open`; callbacks handled:
//! `block_actions` and `view_submission`. Identity comes only from the signed payload's team
//! and user ids, never from display names.
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::{BoxFuture, Channel, ChannelError, summary};
use crate::approver::store::{StoredRequest, rfc3339};

/// Oldest callback accepted (Slack's documented window for replay protection).
pub const MAX_SKEW_SECS: i64 = 5 * 60;
/// Largest callback body read.
pub const MAX_CALLBACK_BYTES: usize = 64 * 1024;
/// `callback_id` of the reason modal.
pub const REASON_CALLBACK: &str = "countersign_reason";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Bot token (`xoxb-…`) with `chat:write`.
    pub bot_token: String,
    /// The app's signing secret: verifies every HTTP callback (Interactivity request URL).
    pub signing_secret: Option<String>,
    /// An app-level token (`xapp-…`, `connections:write`): answers come through Socket Mode,
    /// for approvers that cannot be reached from the internet.
    pub app_token: Option<String>,
    /// Channel id the requests are posted to.
    pub channel: String,
    /// Web API base URL.
    #[serde(default = "default_api_url")]
    pub api_url: String,
}

fn default_api_url() -> String {
    "https://slack.com/api".into()
}

pub struct Slack {
    config: SlackConfig,
    http: reqwest::Client,
}

impl Slack {
    #[must_use]
    pub fn new(config: SlackConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    #[must_use]
    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    /// Calls Web API `method` with a JSON body; Slack's `ok: false` is an error.
    pub async fn call(&self, method: &str, body: &Value) -> Result<Value, ChannelError> {
        self.call_with_token(method, &self.config.bot_token, body)
            .await
    }

    /// Like [`Slack::call`], with another token (Socket Mode's app-level token).
    pub async fn call_with_token(
        &self,
        method: &str,
        token: &str,
        body: &Value,
    ) -> Result<Value, ChannelError> {
        let url = format!("{}/{method}", self.config.api_url.trim_end_matches('/'));
        let http = |message: String| ChannelError::Http {
            channel: "slack",
            message: format!("{method}: {message}"),
        };
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .json(body)
            .send()
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .map_err(|e| http(format!("HTTP {status}, not JSON: {e}")))?;
        if v["ok"] != Value::Bool(true) {
            return Err(ChannelError::Api {
                channel: "slack",
                message: format!(
                    "{method}: {}",
                    v["error"].as_str().unwrap_or("no error given")
                ),
            });
        }
        Ok(v)
    }

    /// Tells the clicking user `text`, visible to them only, through the click's
    /// `response_url` — only Slack's own hooks host or the configured API's origin (never an
    /// arbitrary address taken from a payload).
    pub async fn tell(&self, response_url: &str, text: &str) -> Result<(), ChannelError> {
        let api_origin = url::Url::parse(&self.config.api_url)
            .ok()
            .map(|u| u.origin().ascii_serialization());
        let target = url::Url::parse(response_url).map_err(|e| ChannelError::Http {
            channel: "slack",
            message: format!("response_url: {e}"),
        })?;
        let origin = target.origin().ascii_serialization();
        if origin != "https://hooks.slack.com" && Some(&origin) != api_origin.as_ref() {
            return Err(ChannelError::Http {
                channel: "slack",
                message: format!("response_url on {origin} refused"),
            });
        }
        let resp = self
            .http
            .post(target)
            .timeout(Duration::from_secs(10))
            .json(&json!({"response_type": "ephemeral", "replace_original": false, "text": text}))
            .send()
            .await
            .map_err(|e| ChannelError::Http {
                channel: "slack",
                message: format!("response_url: {e}"),
            })?;
        if !resp.status().is_success() {
            return Err(ChannelError::Api {
                channel: "slack",
                message: format!("response_url: HTTP {}", resp.status()),
            });
        }
        Ok(())
    }

    /// Opens the modal that asks for a reason before an answer counts.
    pub async fn open_reason_modal(
        &self,
        trigger_id: &str,
        id: i64,
        decision: &str,
        grant: Option<u32>,
    ) -> Result<(), ChannelError> {
        let view = json!({
            "type": "modal",
            "callback_id": REASON_CALLBACK,
            "private_metadata": match grant {
                Some(g) => format!("{id}:{decision}:{g}"),
                None => format!("{id}:{decision}"),
            },
            "title": {"type": "plain_text", "text": "Reason required"},
            "submit": {"type": "plain_text", "text": capitalise(decision)},
            "close": {"type": "plain_text", "text": "Cancel"},
            "blocks": [{
                "type": "input",
                "block_id": "reason",
                "label": {"type": "plain_text", "text": format!("Why {decision} request #{id}?")},
                "element": {"type": "plain_text_input", "action_id": "reason", "multiline": true, "max_length": 1000}
            }]
        });
        self.call(
            "views.open",
            &json!({"trigger_id": trigger_id, "view": view}),
        )
        .await
        .map(|_| ())
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Escapes text for Slack's mrkdwn (`&`, `<`, `>`), so request fields cannot inject links or
/// mentions.
#[must_use]
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Code span content: escaped, with backticks replaced so the span cannot be closed early.
fn code(s: &str) -> String {
    escape(&s.replace('`', "ˋ"))
}

/// The Block Kit blocks of a request: full context, and the buttons while it is pending.
#[must_use]
pub fn blocks(req: &StoredRequest, public_url: Option<&str>) -> Value {
    let e = &req.escalation;
    let v = &e.request;
    let mut fields = vec![
        format!("*Host*\n{}", escape(&e.host_name)),
        format!(
            "*Label (works for)*\n{}{}",
            escape(&v.label),
            e.on_behalf_of
                .as_deref()
                .map(|o| format!(" ({})", escape(o)))
                .unwrap_or_default()
        ),
        format!(
            "*Process*\npid {} user {}({})",
            v.pid,
            escape(v.user.as_deref().unwrap_or("?")),
            v.uid
        ),
        format!("*Kind*\n{}", escape(v.kind.as_str())),
    ];
    if let Some(rule) = &v.rule {
        fields.push(format!("*Rule*\n{}", escape(rule)));
    }
    fields.push(format!(
        "*Deadline*\n<!date^{}^{{date_short_pretty}} {{time_secs}}|{}>",
        req.deadline_ms / 1000,
        rfc3339(req.deadline_ms)
    ));
    let mut detail = String::new();
    if let Some(b) = &v.binary {
        detail.push_str(&format!("*Binary* `{}`\n", code(b)));
    }
    if !v.argv.is_empty() {
        detail.push_str(&format!(
            "*argv* `{}`{}\n",
            code(&crate::cli::requests::quote_argv(&v.argv)),
            if v.argv_truncated { " (truncated)" } else { "" }
        ));
    }
    if let Some(d) = v.destination_text() {
        detail.push_str(&format!("*Destination* `{}`\n", code(&d)));
    }
    if let Some(c) = &v.cwd {
        detail.push_str(&format!("*cwd* `{}`\n", code(c)));
    }
    if !v.parents.is_empty() {
        let chain: Vec<String> = v
            .parents
            .iter()
            .map(|p| format!("{}({})", p.comm, p.pid))
            .collect();
        detail.push_str(&format!("*Parents* `{}`\n", code(&chain.join(" <- "))));
    }
    if let Some(n) = &v.note {
        detail.push_str(&format!("*Note* {}\n", escape(n)));
    }
    let mut out = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": format!("countersign request #{}", req.id)}}),
        json!({"type": "section", "fields": fields.iter().map(|f| json!({"type": "mrkdwn", "text": f})).collect::<Vec<_>>()}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": detail}}),
    ];
    if req.state == "pending" {
        let mut ctx = format!(
            "Needs {}.",
            e.asks(crate::approver::store::now_ms() - req.created_ms)
        );
        if let Some(u) = public_url {
            ctx.push_str(&format!(
                " <{}/requests/{}|Open in the web page>",
                u.trim_end_matches('/'),
                req.id
            ));
        }
        out.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": ctx}]}));
        let id = req.id.to_string();
        let mut buttons = vec![
            json!({"type": "button", "action_id": "approve", "style": "primary", "value": id, "text": {"type": "plain_text", "text": "Approve once"}}),
        ];
        for (i, g) in e.grants.iter().enumerate().filter(|(_, g)| g.fits(v.kind)) {
            buttons.push(
                json!({"type": "button", "action_id": format!("grant_{i}"), "value": id,
                "text": {"type": "plain_text", "text": format!("Approve {}", g.describe())}}),
            );
        }
        buttons.push(json!({"type": "button", "action_id": "deny", "style": "danger", "value": id, "text": {"type": "plain_text", "text": "Deny"}}));
        buttons.push(json!({"type": "button", "action_id": "kill", "value": id, "text": {"type": "plain_text", "text": "Kill process"},
                 "confirm": {"title": {"type": "plain_text", "text": "Kill the process?"}, "text": {"type": "plain_text", "text": "The agent's process is killed, not just refused."}, "confirm": {"type": "plain_text", "text": "Kill"}, "deny": {"type": "plain_text", "text": "Cancel"}}}));
        out.push(json!({
            "type": "actions",
            "block_id": format!("countersign_{}", req.id),
            "elements": buttons
        }));
    } else {
        let who: Vec<String> = req
            .answers
            .iter()
            .map(|a| {
                format!(
                    "{} {} via {}{}",
                    escape(&a.approver),
                    a.decision,
                    a.channel,
                    a.justification
                        .as_deref()
                        .map(|j| format!(" (\"{}\")", escape(j)))
                        .unwrap_or_default()
                )
            })
            .collect();
        let text = format!(
            "*{}*{}",
            req.state.to_uppercase(),
            if who.is_empty() {
                String::new()
            } else {
                format!(": {}", who.join("; "))
            }
        );
        out.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": text}}));
        if let Some(g) = &req.grant {
            let state = if g.active() {
                format!("until {}", g.expires)
            } else if let Some(by) = &g.revoked_by {
                format!("revoked by {}", escape(by))
            } else {
                "expired".to_owned()
            };
            out.push(json!({"type": "section", "text": {"type": "mrkdwn",
                "text": format!("*Grant {}*: {} {state}", g.id, g.scope)}}));
            if g.active() {
                out.push(json!({"type": "actions", "block_id": format!("countersign_grant_{}", req.id), "elements": [
                    {"type": "button", "action_id": "revoke", "style": "danger", "value": req.id.to_string(), "text": {"type": "plain_text", "text": "Revoke grant"}}
                ]}));
            }
        }
    }
    Value::Array(out)
}

impl Channel for Slack {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn notify<'a>(
        &'a self,
        req: &'a StoredRequest,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, ChannelError>> {
        Box::pin(async move {
            let v = self
                .call(
                    "chat.postMessage",
                    &json!({"channel": self.config.channel, "text": summary(req), "blocks": blocks(req, public_url)}),
                )
                .await?;
            let channel = v["channel"].as_str().unwrap_or(&self.config.channel);
            Ok(v["ts"].as_str().map(|ts| format!("{channel} {ts}")))
        })
    }

    fn nudge<'a>(
        &'a self,
        req: &'a StoredRequest,
        reference: &'a str,
        text: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move {
            let (channel, ts) = reference
                .split_once(' ')
                .unwrap_or((&self.config.channel, reference));
            // In the request's thread (also shown in the channel), and the request itself
            // refreshed: who may answer now.
            self.call(
                "chat.postMessage",
                &json!({"channel": channel, "thread_ts": ts, "reply_broadcast": true, "text": escape(text)}),
            )
            .await?;
            self.update(req, reference, public_url).await
        })
    }

    fn update<'a>(
        &'a self,
        req: &'a StoredRequest,
        reference: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move {
            let (channel, ts) = reference
                .split_once(' ')
                .unwrap_or((&self.config.channel, reference));
            self.call(
                "chat.update",
                &json!({"channel": channel, "ts": ts, "text": summary(req), "blocks": blocks(req, public_url)}),
            )
            .await
            .map(|_| ())
        })
    }
}

/// Why a callback was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// A header is missing or malformed.
    #[error("missing or malformed {0}")]
    Header(&'static str),
    /// The timestamp is outside the accepted window (a replay or a skewed clock).
    #[error("timestamp outside the {MAX_SKEW_SECS} s window")]
    Stale,
    /// The signature does not match the body.
    #[error("signature does not verify")]
    BadSignature,
    /// The body is not a form with a JSON `payload`.
    #[error("malformed payload: {0}")]
    Payload(String),
}

/// Verifies Slack's v0 request signature: HMAC-SHA256 over `v0:timestamp:body` with the
/// signing secret, compared in constant time, timestamp within [`MAX_SKEW_SECS`] of `now`.
pub fn verify_signature(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), CallbackError> {
    let ts: i64 = timestamp
        .and_then(|t| t.trim().parse().ok())
        .ok_or(CallbackError::Header("X-Slack-Request-Timestamp"))?;
    if (now - ts).abs() > MAX_SKEW_SECS {
        return Err(CallbackError::Stale);
    }
    let sig = signature
        .and_then(|s| s.strip_prefix("v0="))
        .and_then(decode_hex)
        .ok_or(CallbackError::Header("X-Slack-Signature"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| CallbackError::BadSignature)?;
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| CallbackError::BadSignature)
}

/// Computes the v0 signature header value (the tests' reference).
#[cfg(test)]
fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", crate::sign::hex(&mac.finalize().into_bytes()))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a verified callback asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    pub team: String,
    pub user: String,
    /// The request id.
    pub id: i64,
    /// `approve`, `deny` or `kill`.
    pub decision: String,
    pub reason: Option<String>,
    /// For opening the reason modal.
    pub trigger_id: Option<String>,
    /// Identifies this delivery (retries carry the same).
    pub delivery: String,
    /// Where to tell the clicking user something (button clicks only).
    pub response_url: Option<String>,
    /// A modal submission (answered in the HTTP response) rather than a click.
    pub from_modal: bool,
    /// An approval that gives the grant offered at this index.
    pub grant: Option<u32>,
}

/// Parses a verified callback body (`payload=<JSON>`): a button click or the reason modal's
/// submission. `Ok(None)`: a callback this service does not act on.
pub fn parse_callback(body: &[u8]) -> Result<Option<Click>, CallbackError> {
    let payload = url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| CallbackError::Payload("no `payload` field".into()))?;
    let p: Value =
        serde_json::from_str(&payload).map_err(|e| CallbackError::Payload(e.to_string()))?;
    parse_payload(&p)
}

/// A click or modal submission from its interactivity payload (the JSON Slack sends).
pub fn parse_payload(p: &Value) -> Result<Option<Click>, CallbackError> {
    let team = p["team"]["id"]
        .as_str()
        .or_else(|| p["user"]["team_id"].as_str())
        .ok_or_else(|| CallbackError::Payload("no team id".into()))?
        .to_owned();
    let user = p["user"]["id"]
        .as_str()
        .ok_or_else(|| CallbackError::Payload("no user id".into()))?
        .to_owned();
    match p["type"].as_str() {
        Some("block_actions") => {
            let Some(action) = p["actions"].as_array().and_then(|a| a.first()) else {
                return Ok(None);
            };
            let action_id = action["action_id"].as_str().unwrap_or_default();
            // `grant_N`: approve and give the grant offered at index N.
            let (decision, grant) = match action_id.strip_prefix("grant_") {
                Some(n) => match n.parse::<u32>() {
                    Ok(n) => ("approve".to_owned(), Some(n)),
                    Err(_) => return Ok(None),
                },
                None => (action_id.to_owned(), None),
            };
            if !matches!(decision.as_str(), "approve" | "deny" | "kill" | "revoke") {
                return Ok(None);
            }
            let id = action["value"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| CallbackError::Payload("button without a request id".into()))?;
            let action_ts = action["action_ts"].as_str().unwrap_or_default();
            Ok(Some(Click {
                delivery: format!("slack:{team}:{user}:{action_ts}:{decision}:{id}"),
                team,
                user,
                id,
                decision,
                reason: None,
                trigger_id: p["trigger_id"].as_str().map(str::to_owned),
                response_url: p["response_url"].as_str().map(str::to_owned),
                from_modal: false,
                grant,
            }))
        }
        Some("view_submission") if p["view"]["callback_id"] == REASON_CALLBACK => {
            // `ID:DECISION` or `ID:approve:GRANT`.
            let meta = p["view"]["private_metadata"].as_str().unwrap_or_default();
            let mut parts = meta.split(':');
            let (id, decision) = parts
                .next()
                .and_then(|i| i.parse().ok())
                .zip(parts.next().map(str::to_owned))
                .ok_or_else(|| CallbackError::Payload("modal without its request".into()))?;
            let grant = parts.next().and_then(|g| g.parse().ok());
            let reason = p["view"]["state"]["values"]["reason"]["reason"]["value"]
                .as_str()
                .map(str::to_owned);
            let view_id = p["view"]["id"].as_str().unwrap_or_default();
            Ok(Some(Click {
                delivery: format!("slack:{team}:{user}:{view_id}:{decision}:{id}"),
                team,
                user,
                id,
                decision,
                reason,
                trigger_id: None,
                response_url: None,
                from_modal: true,
                grant,
            }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

    #[test]
    fn slack_documented_example_verifies() {
        // The example from Slack's "Verifying requests from Slack" page.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert_eq!(sign(SECRET, 1_531_420_618, body), sig);
        assert_eq!(
            verify_signature(
                SECRET,
                Some("1531420618"),
                Some(sig),
                body,
                1_531_420_618 + 10
            ),
            Ok(())
        );
    }

    #[test]
    fn forged_stale_and_malformed_callbacks_are_refused() {
        let body = b"payload=%7B%7D";
        let now = 1_700_000_000;
        let good = sign(SECRET, now, body);
        assert_eq!(
            verify_signature("other", Some(&now.to_string()), Some(&good), body, now),
            Err(CallbackError::BadSignature)
        );
        assert_eq!(
            verify_signature(
                SECRET,
                Some(&now.to_string()),
                Some(&good),
                b"payload=%7B%7Dx",
                now
            ),
            Err(CallbackError::BadSignature)
        );
        assert_eq!(
            verify_signature(SECRET, Some(&now.to_string()), Some(&good), body, now + 301),
            Err(CallbackError::Stale)
        );
        assert_eq!(
            verify_signature(SECRET, None, Some(&good), body, now),
            Err(CallbackError::Header("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            verify_signature(SECRET, Some(&now.to_string()), Some("v1=00"), body, now),
            Err(CallbackError::Header("X-Slack-Signature"))
        );
    }

    #[test]
    fn parses_a_button_click_and_a_reason_submission() {
        let payload = json!({"type": "block_actions", "team": {"id": "T1"}, "user": {"id": "U2", "name": "display names do not count"},
            "trigger_id": "tr", "actions": [{"action_id": "approve", "value": "42", "action_ts": "1.5"}]});
        let body = format!(
            "payload={}",
            url::form_urlencoded::byte_serialize(payload.to_string().as_bytes())
                .collect::<String>()
        );
        let c = parse_callback(body.as_bytes()).unwrap().unwrap();
        assert_eq!(
            (c.team.as_str(), c.user.as_str(), c.id, c.decision.as_str()),
            ("T1", "U2", 42, "approve")
        );
        let payload = json!({"type": "view_submission", "team": {"id": "T1"}, "user": {"id": "U2"},
            "view": {"id": "V1", "callback_id": REASON_CALLBACK, "private_metadata": "42:deny",
                     "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "not now"}}}}}});
        let body = format!(
            "payload={}",
            url::form_urlencoded::byte_serialize(payload.to_string().as_bytes())
                .collect::<String>()
        );
        let c = parse_callback(body.as_bytes()).unwrap().unwrap();
        assert_eq!(
            (c.id, c.decision.as_str(), c.reason.as_deref()),
            (42, "deny", Some("not now"))
        );
    }

    #[test]
    fn request_fields_cannot_inject_mrkdwn() {
        assert_eq!(
            escape("<!channel> & <http://x|y>"),
            "&lt;!channel&gt; &amp; &lt;http://x|y&gt;"
        );
    }
}
