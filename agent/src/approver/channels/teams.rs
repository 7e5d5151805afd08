//! Microsoft Teams, two ways:
//! - **bot** (`teams:`): an Adaptive Card per request posted to a channel conversation
//!   through the Bot Connector API, with `Action.Execute` buttons (Universal Actions). A
//!   click arrives as an `adaptiveCard/action` invoke whose Bot Framework JWT is verified
//!   (RS256 against the published keys, issuer, audience = our app id, lifetime, and the
//!   `serviceUrl` claim); the person is the activity's `from.aadObjectId`. The invoke's answer
//!   refreshes the card for the clicker, and the card is updated in place for everyone once
//!   decided or expired.
//! - **webhook** (`teams_webhook:`): notification only, a card with a link to the web page.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{BoxFuture, Channel, ChannelError};
use crate::approver::store::{StoredRequest, now_ms, rfc3339};

/// Bot Framework's token issuer.
pub const ISSUER: &str = "https://api.botframework.com";
/// How long fetched signing keys are trusted before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Clock skew accepted on token lifetimes.
const LEEWAY_SECS: u64 = 300;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamsConfig {
    /// The bot's Microsoft App ID (the audience of Bot Framework tokens).
    pub app_id: String,
    /// The bot's client secret (for Bot Connector tokens).
    pub app_password: String,
    /// The conversation's service URL, e.g. `https://smba.trafficmanager.net/emea/`.
    pub service_url: String,
    /// The channel conversation requests are posted to (`19:…@thread.tacv2`).
    pub conversation_id: String,
    #[serde(default = "default_token_url")]
    pub token_url: String,
    #[serde(default = "default_openid_url")]
    pub openid_url: String,
}

fn default_token_url() -> String {
    "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token".into()
}
fn default_openid_url() -> String {
    "https://login.botframework.com/v1/.well-known/openidconfiguration".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamsWebhookConfig {
    /// The channel's incoming webhook URL.
    pub url: String,
}

pub struct Teams {
    config: TeamsConfig,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    keys: Mutex<Option<(jsonwebtoken::jwk::JwkSet, Instant)>>,
    /// When the key set was last fetched, and the key ids it did not have: a token naming an
    /// unknown key makes at most one fetch a [`KEYS_REFETCH`], and a key id the fetch did not
    /// find is refused without fetching for [`UNKNOWN_KID_TTL`].
    fetches: tokio::sync::Mutex<(Option<Instant>, std::collections::HashMap<String, Instant>)>,
}

/// Least time between two fetches of the key set for an unknown key id.
const KEYS_REFETCH: Duration = Duration::from_secs(60);
/// How long a key id the key set did not have is refused without a fetch.
const UNKNOWN_KID_TTL: Duration = Duration::from_secs(600);
/// Unknown key ids remembered (beyond, the oldest are forgotten).
const MAX_UNKNOWN_KIDS: usize = 1024;

fn http_err(message: String) -> ChannelError {
    ChannelError::Http {
        channel: "teams",
        message,
    }
}

/// Why an invoke was refused.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No usable `Authorization: Bearer` header.
    #[error("no bearer token")]
    NoToken,
    /// The token does not verify (signature, issuer, audience, lifetime, unknown key).
    #[error("token: {0}")]
    Token(String),
    /// The signing keys could not be fetched.
    #[error("signing keys: {0}")]
    Keys(String),
    /// The token is for another service URL than the activity says.
    #[error("the token's serviceUrl is not the activity's")]
    ServiceUrl,
}

impl Teams {
    #[must_use]
    pub fn new(config: TeamsConfig, http: reqwest::Client) -> Self {
        Self {
            config,
            http,
            token: tokio::sync::Mutex::new(None),
            keys: Mutex::new(None),
            fetches: tokio::sync::Mutex::new((None, std::collections::HashMap::new())),
        }
    }

    /// A Bot Connector access token (client credentials), cached until shortly before expiry.
    async fn access_token(&self) -> Result<String, ChannelError> {
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let resp = self
            .http
            .post(&self.config.token_url)
            .timeout(Duration::from_secs(10))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.config.app_id.as_str()),
                ("client_secret", self.config.app_password.as_str()),
                ("scope", "https://api.botframework.com/.default"),
            ])
            .send()
            .await
            .map_err(|e| http_err(format!("token: {e}")))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .map_err(|e| http_err(format!("token: HTTP {status}: {e}")))?;
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| ChannelError::Api {
                channel: "teams",
                message: format!(
                    "token: HTTP {status}: {}",
                    v["error"].as_str().unwrap_or("no access_token")
                ),
            })?
            .to_owned();
        let ttl = v["expires_in"]
            .as_u64()
            .unwrap_or(300)
            .saturating_sub(60)
            .max(30);
        *cached = Some((token.clone(), Instant::now() + Duration::from_secs(ttl)));
        Ok(token)
    }

    fn activities_url(&self) -> String {
        format!(
            "{}/v3/conversations/{}/activities",
            self.config.service_url.trim_end_matches('/'),
            url::form_urlencoded::byte_serialize(self.config.conversation_id.as_bytes())
                .collect::<String>()
        )
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: String,
        activity: &Value,
    ) -> Result<Value, ChannelError> {
        let token = self.access_token().await?;
        let resp = self
            .http
            .request(method, &url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .json(activity)
            .send()
            .await
            .map_err(|e| http_err(format!("connector: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ChannelError::Api {
                channel: "teams",
                message: format!("connector: HTTP {status}"),
            });
        }
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// The JWKS the OpenID metadata names (cached; fetched again for an unknown key id).
    async fn keys(&self, refresh: bool) -> Result<jsonwebtoken::jwk::JwkSet, InvokeError> {
        if !refresh
            && let Some((k, at)) = self.keys.lock().ok().and_then(|g| g.clone())
            && at.elapsed() < KEYS_TTL
        {
            return Ok(k);
        }
        let get = |url: String| async move {
            self.http
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| InvokeError::Keys(format!("{url}: {e}")))?
                .json::<Value>()
                .await
                .map_err(|e| InvokeError::Keys(format!("{url}: {e}")))
        };
        let meta = get(self.config.openid_url.clone()).await?;
        let jwks_uri = meta["jwks_uri"]
            .as_str()
            .ok_or_else(|| InvokeError::Keys("no jwks_uri in the OpenID metadata".into()))?;
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_value(get(jwks_uri.to_owned()).await?)
                .map_err(|e| InvokeError::Keys(format!("{jwks_uri}: {e}")))?;
        if let Ok(mut g) = self.keys.lock() {
            *g = Some((set.clone(), Instant::now()));
        }
        Ok(set)
    }

    /// The key set fetched again for a key id it does not have — unless that id was looked
    /// for lately, or the set was fetched less than [`KEYS_REFETCH`] ago (one fetch at a
    /// time: concurrent invokes wait for it), so forged key ids cannot make the approver
    /// hammer the identity provider.
    async fn keys_for_unknown(&self, kid: &str) -> Result<jsonwebtoken::jwk::JwkSet, InvokeError> {
        let mut f = self.fetches.lock().await;
        let now = Instant::now();
        f.1.retain(|_, at| now.duration_since(*at) < UNKNOWN_KID_TTL);
        let recent = f.0.is_some_and(|at| now.duration_since(at) < KEYS_REFETCH);
        if f.1.contains_key(kid) || recent {
            // What the last fetch brought (another invoke may have fetched meanwhile).
            return self.keys(false).await;
        }
        f.0 = Some(now);
        let set = self.keys(true).await?;
        if set.find(kid).is_none() {
            if f.1.len() >= MAX_UNKNOWN_KIDS
                && let Some(oldest) =
                    f.1.iter()
                        .min_by_key(|(_, at)| **at)
                        .map(|(k, _)| k.clone())
            {
                f.1.remove(&oldest);
            }
            f.1.insert(kid.to_owned(), now);
        }
        Ok(set)
    }

    /// Verifies the Bot Framework token of an incoming activity.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        activity: &Value,
    ) -> Result<(), InvokeError> {
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .ok_or(InvokeError::NoToken)?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| InvokeError::Token(e.to_string()))?;
        if header.alg != jsonwebtoken::Algorithm::RS256 {
            return Err(InvokeError::Token(format!(
                "algorithm {:?} refused",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| InvokeError::Token("no key id".into()))?;
        let mut set = self.keys(false).await?;
        if set.find(&kid).is_none() {
            set = self.keys_for_unknown(&kid).await?;
        }
        let jwk = set
            .find(&kid)
            .ok_or_else(|| InvokeError::Token(format!("unknown key {kid}")))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
            .map_err(|e| InvokeError::Token(e.to_string()))?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[&self.config.app_id]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map_err(|e| InvokeError::Token(e.to_string()))?
            .claims;
        let norm = |s: &str| s.trim_end_matches('/').to_ascii_lowercase();
        match (
            claims["serviceUrl"].as_str(),
            activity["serviceUrl"].as_str(),
        ) {
            (Some(a), Some(b)) if norm(a) == norm(b) => Ok(()),
            _ => Err(InvokeError::ServiceUrl),
        }
    }
}

/// The Adaptive Card of a request: facts, and `Action.Execute` buttons while pending.
#[must_use]
pub fn card(req: &StoredRequest, public_url: Option<&str>) -> Value {
    let e = &req.escalation;
    let v = &e.request;
    let mut facts = vec![
        ("Host", e.host_name.clone()),
        (
            "Label",
            format!(
                "{}{}",
                v.label,
                e.on_behalf_of
                    .as_deref()
                    .map(|o| format!(" (works for {o})"))
                    .unwrap_or_default()
            ),
        ),
        (
            "Process",
            format!(
                "pid {} user {}({})",
                v.pid,
                v.user.as_deref().unwrap_or("?"),
                v.uid
            ),
        ),
    ];
    if let Some(b) = &v.binary {
        facts.push(("Binary", b.clone()));
    }
    if !v.argv.is_empty() {
        facts.push(("argv", crate::cli::requests::quote_argv(&v.argv)));
    }
    if let Some(d) = v.destination_text() {
        facts.push(("Destination", d));
    }
    if let Some(c) = &v.cwd {
        facts.push(("cwd", c.clone()));
    }
    if !v.parents.is_empty() {
        let chain: Vec<String> = v
            .parents
            .iter()
            .map(|p| format!("{}({})", p.comm, p.pid))
            .collect();
        facts.push(("Parents", chain.join(" <- ")));
    }
    if let Some(r) = &v.rule {
        facts.push(("Rule", r.clone()));
    }
    facts.push(("Deadline", rfc3339(req.deadline_ms)));
    for a in &req.answers {
        facts.push((
            "Answer",
            format!(
                "{} {} via {}{}",
                a.approver,
                a.decision,
                a.channel,
                a.justification
                    .as_deref()
                    .map(|j| format!(": {j}"))
                    .unwrap_or_default()
            ),
        ));
    }
    // Card text is plain (Adaptive Cards render a Markdown subset): no links from request data.
    let plain = |s: &str| s.replace(['[', ']', '*', '_', '`'], " ");
    let mut body = vec![
        json!({"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": true,
               "text": format!("countersign request #{} — {}", req.id, req.state)}),
        json!({"type": "FactSet", "facts": facts.iter().map(|(t, v)| json!({"title": t, "value": plain(v)})).collect::<Vec<_>>()}),
    ];
    let mut actions = Vec::new();
    if req.state == "pending" {
        body.push(json!({"type": "TextBlock", "wrap": true, "isSubtle": true,
                   "text": format!("Needs {}.", e.asks(now_ms() - req.created_ms))}));
        body.push(json!({"type": "Input.Text", "id": "reason", "placeholder": "Reason", "isMultiline": true, "maxLength": 1000}));
        for (verb, title) in [
            ("approve", "Approve"),
            ("deny", "Deny"),
            ("kill", "Kill process"),
        ] {
            actions.push(json!({"type": "Action.Execute", "verb": verb, "title": title, "data": {"id": req.id}}));
        }
        for (i, g) in e.grants.iter().enumerate().filter(|(_, g)| g.fits(v.kind)) {
            actions.push(json!({"type": "Action.Execute", "verb": "approve", "title": format!("Approve {}", g.describe()), "data": {"id": req.id, "grant": i}}));
        }
    } else if let Some(g) = req.grant.as_ref().filter(|g| g.active()) {
        body.push(json!({"type": "TextBlock", "wrap": true, "text": format!("Grant {} ({}) in force until {}", g.id, g.scope, g.expires)}));
        actions.push(json!({"type": "Action.Execute", "verb": "revoke", "title": "Revoke grant", "data": {"id": req.id}}));
    }
    if let Some(u) = public_url {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Open in the web page", "url": format!("{}/requests/{}", u.trim_end_matches('/'), req.id)}));
    }
    json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
        "actions": actions,
    })
}

fn message(card: Value) -> Value {
    json!({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}]})
}

impl Channel for Teams {
    fn name(&self) -> &'static str {
        "teams"
    }

    fn notify<'a>(
        &'a self,
        req: &'a StoredRequest,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, ChannelError>> {
        Box::pin(async move {
            let v = self
                .send(
                    reqwest::Method::POST,
                    self.activities_url(),
                    &message(card(req, public_url)),
                )
                .await?;
            Ok(v["id"].as_str().map(str::to_owned))
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
            let reply = json!({"type": "message", "text": text, "replyToId": reference});
            self.send(reqwest::Method::POST, self.activities_url(), &reply)
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
            let url = format!(
                "{}/{}",
                self.activities_url(),
                url::form_urlencoded::byte_serialize(reference.as_bytes()).collect::<String>()
            );
            let mut m = message(card(req, public_url));
            m["id"] = json!(reference);
            self.send(reqwest::Method::PUT, url, &m).await.map(|_| ())
        })
    }
}

/// Teams' notification-only variant: an incoming webhook gets a card that links to the web
/// page (answers are given there).
pub struct TeamsWebhook {
    config: TeamsWebhookConfig,
    http: reqwest::Client,
}

impl TeamsWebhook {
    #[must_use]
    pub fn new(config: TeamsWebhookConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    async fn post(
        &self,
        req: &StoredRequest,
        public_url: Option<&str>,
        text: Option<&str>,
    ) -> Result<(), ChannelError> {
        let mut c = card(req, public_url);
        // No buttons to press here: only the link.
        if let Some(a) = c["actions"].as_array_mut() {
            a.retain(|x| x["type"] == "Action.OpenUrl");
        }
        if let (Some(t), Some(b)) = (text, c["body"].as_array_mut()) {
            b.insert(
                0,
                json!({"type": "TextBlock", "wrap": true, "weight": "Bolder", "text": t}),
            );
        }
        if let Some(b) = c["body"].as_array_mut() {
            b.retain(|x| x["type"] != "Input.Text");
        }
        let resp = self
            .http
            .post(&self.config.url)
            .timeout(Duration::from_secs(10))
            .json(&json!({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": c}]}))
            .send()
            .await
            .map_err(|e| ChannelError::Http { channel: "teams-webhook", message: e.to_string() })?;
        if !resp.status().is_success() {
            return Err(ChannelError::Api {
                channel: "teams-webhook",
                message: format!("HTTP {}", resp.status()),
            });
        }
        Ok(())
    }
}

impl Channel for TeamsWebhook {
    fn name(&self) -> &'static str {
        "teams-webhook"
    }

    fn notify<'a>(
        &'a self,
        req: &'a StoredRequest,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, ChannelError>> {
        Box::pin(async move {
            self.post(req, public_url, None).await?;
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
        Box::pin(async move { self.post(req, public_url, Some(text)).await })
    }

    fn update<'a>(
        &'a self,
        req: &'a StoredRequest,
        _reference: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move { self.post(req, public_url, None).await })
    }
}
