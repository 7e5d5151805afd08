//! The HTTP API: host enrollment, signed escalations, the hosts' decision long poll, the
//! approvers' REST API (bearer tokens), and the channels' callbacks. Errors are JSON
//! `{"error": "…"}` that say what is wrong with the request, never internals.
use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    App,
    channels::slack,
    store::{AnswerResult, Answerer, StoreError, StoredRequest, now_ms, parse_rfc3339, rfc3339},
};
use crate::{
    proto::Decision,
    sign::{
        self,
        dsse::Envelope,
        statement::{self, Escalation},
    },
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// DSSE payload type of a host's poll for decisions.
pub const PAYLOAD_POLL: &str = "application/vnd.countersign.poll+json";
/// Longest a poll waits for a decision.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(25);
/// How far a signed poll's time may be from ours.
const MAX_POLL_SKEW_MS: i64 = 5 * 60 * 1000;
/// Longest deadline an escalation may ask for.
const MAX_DEADLINE_MS: i64 = 24 * 3600 * 1000;
/// Most decisions returned by one poll.
const POLL_BATCH: i64 = 200;

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    let strikes = ("approver", app.strikes.clone(), app.refusals.clone());
    Router::new()
        .route("/v1/key", get(key))
        .route("/v1/enroll", post(enroll))
        .route("/v1/escalations", post(escalate))
        .route("/v1/decisions", post(poll))
        .route("/v1/requests", get(list))
        .route("/v1/requests/{id}", get(show))
        .route("/v1/requests/{id}/answer", post(answer))
        .route("/v1/grants", get(grants))
        .route("/v1/grants/{id}/revoke", post(revoke))
        .route("/slack/interactivity", post(slack_callback))
        .route("/teams/messages", post(teams_activity))
        .merge(super::web::router())
        // Every route but these two takes a credential or a signature: a peer refused too
        // often is stopped for the rest of the minute.
        .route_layer(axum::middleware::from_fn_with_state(
            strikes,
            crate::serve::strikes_layer,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// An error answer.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = crate::serve::Reason(self.1.clone());
        let mut r = (self.0, Json(json!({"error": self.1}))).into_response();
        // The strikes layer logs a refusal with its reason and the peer.
        r.extensions_mut().insert(reason);
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the approver's store failed; try again".into(),
                )
            }
        }
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

async fn key(State(app): AppState) -> Json<Value> {
    Json(json!({
        "key_id": app.key_id,
        "public_key": sign::keys::public_pem(&app.key.verifying_key()),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    token: String,
    host_name: String,
    /// SPKI PEM of the host key.
    public_key: String,
}

async fn enroll(State(app): AppState, Json(b): Json<EnrollBody>) -> Result<Json<Value>, ApiError> {
    let hash = sign::sha256_hex(b.token.trim().as_bytes());
    if !app.config().enrollment_tokens.contains(&hash) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "unknown enrollment token".into(),
        ));
    }
    if b.host_name.is_empty() || b.host_name.len() > 255 {
        return Err(bad("host_name: 1 to 255 characters"));
    }
    let host_key =
        sign::keys::parse_public(&b.public_key).map_err(|m| bad(format!("public_key: {m}")))?;
    let host_id = sign::key_id(&host_key).0;
    match app
        .store
        .enroll(&hash, &host_id, &b.host_name, &b.public_key)
        .await?
    {
        Ok(()) => {
            tracing::info!(host_id, host = b.host_name, "host enrolled");
            Ok(Json(json!({
                "host_id": host_id,
                "approver_key_id": app.key_id,
                "approver_key": sign::keys::public_pem(&app.key.verifying_key()),
            })))
        }
        Err(why) => Err(ApiError(StatusCode::FORBIDDEN, why)),
    }
}

/// Verifies an envelope signed by an enrolled host; the host id and the payload.
async fn verify_host<T: serde::de::DeserializeOwned>(
    app: &App,
    env: &Envelope,
    payload_type: &str,
    host_of: impl Fn(&T) -> &str,
) -> Result<T, ApiError> {
    let unverified: T =
        serde_json::from_slice(&env.unverified_payload().map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(format!("payload: {e}")))?;
    let host_id = host_of(&unverified).to_owned();
    let Some(pem) = app.store.host_key(&host_id).await? else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("host {host_id} is not enrolled"),
        ));
    };
    let key = sign::keys::parse_public(&pem).map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored host key unreadable".into(),
        )
    })?;
    let v: T = env
        .verify_json(payload_type, &key)
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, format!("host {host_id}: {e}")))?;
    if host_of(&v) != host_id {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "host id changed under the signature".into(),
        ));
    }
    Ok(v)
}

async fn escalate(
    State(app): AppState,
    Json(env): Json<Envelope>,
) -> Result<Json<Value>, ApiError> {
    let esc: Escalation = verify_host(
        &app,
        &env,
        statement::PAYLOAD_ESCALATION,
        |e: &Escalation| &e.host_id,
    )
    .await?;
    if statement::action_hash(&esc.host_id, &esc.request) != esc.action_hash {
        return Err(bad("action_hash does not match the request"));
    }
    let deadline =
        parse_rfc3339(&esc.deadline).ok_or_else(|| bad("deadline: not an RFC 3339 time"))?;
    if deadline > now_ms() + MAX_DEADLINE_MS {
        return Err(bad("deadline: more than a day ahead"));
    }
    if esc.approvers.len() > 16 || esc.approvers.iter().any(|g| g.len() > 64) || esc.quorum > 16 {
        return Err(bad("approvers/quorum out of bounds"));
    }
    let (id, new) = app.store.insert_request(&esc, &env, deadline).await?;
    if new {
        tracing::info!(
            id,
            host = esc.host_name,
            request = esc.request.id,
            label = esc.request.label,
            "escalated"
        );
        app.announce(id);
    }
    Ok(Json(json!({"id": id, "new": new})))
}

/// What a host signs to fetch its decisions.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub host_id: String,
    /// Decisions after this sequence number.
    pub after: i64,
    /// Revocations after this sequence number.
    #[serde(default)]
    pub after_revocation: i64,
    /// How long to wait for one, in ms (capped at [`MAX_POLL_WAIT`]).
    pub wait_ms: u64,
    /// RFC 3339 time of signing.
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PollAnswer {
    pub decisions: Vec<SeqDecision>,
    /// Grants taken back (envelopes of revocations).
    #[serde(default)]
    pub revocations: Vec<SeqDecision>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SeqDecision {
    pub seq: i64,
    pub envelope: Envelope,
}

async fn poll(
    State(app): AppState,
    Json(env): Json<Envelope>,
) -> Result<Json<PollAnswer>, ApiError> {
    let p: Poll = verify_host(&app, &env, PAYLOAD_POLL, |p: &Poll| &p.host_id).await?;
    let at = parse_rfc3339(&p.at).ok_or_else(|| bad("at: not an RFC 3339 time"))?;
    if (now_ms() - at).abs() > MAX_POLL_SKEW_MS {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "poll signed too long ago (replay or clock skew)".into(),
        ));
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(p.wait_ms).min(MAX_POLL_WAIT);
    loop {
        // Registered before reading, so a decision stored in between still wakes us.
        let notified = app.decided.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let found = app
            .store
            .decisions_after(&p.host_id, p.after, POLL_BATCH)
            .await?;
        let revoked = app
            .store
            .revocations_after(&p.host_id, p.after_revocation, POLL_BATCH)
            .await?;
        if !found.is_empty() || !revoked.is_empty() || tokio::time::Instant::now() >= until {
            let seq = |v: Vec<(i64, Envelope)>| {
                v.into_iter()
                    .map(|(seq, envelope)| SeqDecision { seq, envelope })
                    .collect()
            };
            return Ok(Json(PollAnswer {
                decisions: seq(found),
                revocations: seq(revoked),
            }));
        }
        // Another replica's decision wakes nobody here: look again every second.
        let step = if app.store.is_shared() {
            until.min(tokio::time::Instant::now() + Duration::from_secs(1))
        } else {
            until
        };
        let _ = tokio::time::timeout_at(step, notified).await;
    }
}

/// The approver a bearer token proves, with the identity recorded for it.
fn bearer(app: &App, headers: &HeaderMap) -> Result<(String, String), ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "an approver token is needed (Authorization: Bearer …)".into(),
            )
        })?;
    let hash = sign::sha256_hex(token.trim().as_bytes());
    let name = app
        .config()
        .by_token_hash(&hash)
        .map(|a| a.name.clone())
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "unknown approver token".into()))?;
    Ok((name, format!("token:{}", &hash[..12])))
}

/// A request as the API shows it.
#[must_use]
pub fn request_json(r: &StoredRequest) -> Value {
    let e = &r.escalation;
    let mut view = e.request.clone();
    view.expires_in_ms = u64::try_from(r.deadline_ms - now_ms()).unwrap_or(0);
    json!({
        "id": r.id,
        "state": r.state,
        "host_id": e.host_id,
        "host_name": e.host_name,
        "on_behalf_of": e.on_behalf_of,
        "approvers": e.approvers,
        "quorum": e.quorum,
        "justification": e.justification,
        "created": rfc3339(r.created_ms),
        "deadline": rfc3339(r.deadline_ms),
        "on_timeout": e.on_timeout,
        "action_hash": e.action_hash,
        "grants": e.grants.iter().map(|g| json!({"scope": g.scope, "for_secs": g.for_secs, "describe": g.describe()})).collect::<Vec<_>>(),
        "request": view,
        "answers": r.answers,
    })
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(app): AppState,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    bearer(&app, &headers)?;
    let state = match q.state.as_deref() {
        None => Some("pending"),
        Some("all") => None,
        Some(s @ ("pending" | "approved" | "denied" | "killed" | "expired")) => Some(s),
        Some(s) => {
            return Err(bad(format!(
                "state: `{s}` is not pending, approved, denied, killed, expired or all"
            )));
        }
    };
    let rows = app
        .store
        .list(state, q.limit.unwrap_or(100).clamp(1, 1000))
        .await?;
    Ok(Json(Value::Array(rows.iter().map(request_json).collect())))
}

async fn show(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    bearer(&app, &headers)?;
    match app.store.get(id).await? {
        Some(r) => Ok(Json(request_json(&r))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no request {id}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    decision: Decision,
    justification: Option<String>,
    /// With `approve`: give the grant at this index of the request's `grants`.
    grant: Option<u32>,
}

/// Records an answer from any channel and, when it decides, settles the request.
pub async fn record_answer(
    app: &Arc<App>,
    id: i64,
    who: &Answerer<'_>,
    decision: Decision,
    justification: Option<&str>,
    grant: Option<u32>,
) -> Result<AnswerResult, ApiError> {
    if justification.is_some_and(|j| j.len() > 1000) {
        return Err(bad("justification: at most 1000 characters"));
    }
    let r = app
        .store
        .answer(
            &app.config(),
            &app.key,
            id,
            who,
            super::store::Choice {
                decision,
                justification,
                grant,
            },
        )
        .await?;
    match &r {
        AnswerResult::Decided { decision } => {
            tracing::info!(id, approver = who.approver, channel = who.channel, %decision, "decided");
            app.settled(id);
        }
        AnswerResult::Refused(why) => {
            tracing::warn!(
                id,
                approver = who.approver,
                channel = who.channel,
                why,
                "answer refused"
            );
        }
        _ => {}
    }
    Ok(r)
}

fn answer_json(id: i64, r: &AnswerResult) -> Result<Json<Value>, ApiError> {
    match r {
        AnswerResult::Decided { decision } => Ok(Json(
            json!({"id": id, "result": "decided", "decision": decision}),
        )),
        AnswerResult::Counted { have, need } => Ok(Json(
            json!({"id": id, "result": "counted", "have": have, "need": need}),
        )),
        AnswerResult::Duplicate => Ok(Json(json!({"id": id, "result": "duplicate"}))),
        AnswerResult::Refused(why) => Err(ApiError(StatusCode::FORBIDDEN, why.clone())),
        AnswerResult::Closed(why) => Err(ApiError(StatusCode::CONFLICT, why.clone())),
        AnswerResult::NotFound => Err(ApiError(StatusCode::NOT_FOUND, format!("no request {id}"))),
    }
}

async fn answer(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(b): Json<AnswerBody>,
) -> Result<Json<Value>, ApiError> {
    let (name, identity) = bearer(&app, &headers)?;
    let who = Answerer {
        approver: &name,
        channel: "api",
        identity: &identity,
    };
    let r = record_answer(
        &app,
        id,
        &who,
        b.decision,
        b.justification.as_deref(),
        b.grant,
    )
    .await?;
    answer_json(id, &r)
}

/// Revokes a grant from any channel; the outcome for people.
pub async fn revoke_grant(
    app: &Arc<App>,
    grant_id: &str,
    approver: &str,
    channel: &str,
) -> Result<String, ApiError> {
    let by = format!("{approver} via {channel}");
    match app
        .store
        .revoke(&app.config(), &app.key, grant_id, approver, &by)
        .await?
    {
        super::store::RevokeResult::Revoked => {
            tracing::info!(grant = grant_id, by, "grant revoked");
            app.decided.notify_waiters();
            if let Some(id) = grant_id.strip_prefix("g-").and_then(|i| i.parse().ok()) {
                app.settled(id);
            }
            Ok(format!("Grant {grant_id} revoked."))
        }
        super::store::RevokeResult::Refused(why) => Err(ApiError(StatusCode::FORBIDDEN, why)),
        super::store::RevokeResult::NotFound => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no grant {grant_id}"),
        )),
    }
}

#[derive(Deserialize)]
struct GrantsQuery {
    all: Option<bool>,
}

async fn grants(
    State(app): AppState,
    headers: HeaderMap,
    Query(q): Query<GrantsQuery>,
) -> Result<Json<Value>, ApiError> {
    bearer(&app, &headers)?;
    let rows = app.store.grants(!q.all.unwrap_or(false), 1000).await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or_default()))
}

async fn revoke(
    State(app): AppState,
    headers: HeaderMap,
    Path(gid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (name, _) = bearer(&app, &headers)?;
    let text = revoke_grant(&app, &gid, &name, "api").await?;
    Ok(Json(
        json!({"grant": gid, "result": "revoked", "text": text}),
    ))
}

async fn slack_callback(State(app): AppState, headers: HeaderMap, body: Bytes) -> Response {
    let Some(slack) = app.slack.clone() else {
        return ApiError(StatusCode::NOT_FOUND, "Slack is not configured".into()).into_response();
    };
    let Some(secret) = slack.config().signing_secret.clone() else {
        return ApiError(
            StatusCode::NOT_FOUND,
            "Slack answers come through Socket Mode here (no signing_secret)".into(),
        )
        .into_response();
    };
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if body.len() > slack::MAX_CALLBACK_BYTES {
        return bad("callback too large").into_response();
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Err(e) = slack::verify_signature(
        &secret,
        header("x-slack-request-timestamp"),
        header("x-slack-signature"),
        &body,
        now,
    ) {
        return ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response();
    }
    let click = match slack::parse_callback(&body) {
        Ok(Some(c)) => c,
        Ok(None) => return StatusCode::OK.into_response(),
        Err(e) => return bad(e.to_string()).into_response(),
    };
    match handle_slack_click(&app, &slack, click).await {
        Ok(Some(body)) => (StatusCode::OK, Json(body)).into_response(),
        Ok(None) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Acts on a verified Slack click or modal submission (from an HTTP callback or Socket
/// Mode); the JSON to answer with, if any (a modal's errors).
pub async fn handle_slack_click(
    app: &Arc<App>,
    slack: &Arc<slack::Slack>,
    click: slack::Click,
) -> Result<Option<Value>, ApiError> {
    if !app.store.first_delivery(&click.delivery).await? {
        return Ok(None); // a retried delivery
    }
    let tell = |text: String| -> Option<Value> {
        if click.from_modal {
            // Shown under the modal's input; the modal stays open.
            return Some(json!({"response_action": "errors", "errors": {"reason": text}}));
        }
        if let Some(url) = click.response_url.clone() {
            let slack = slack.clone();
            tokio::spawn(async move {
                if let Err(e) = slack.tell(&url, &text).await {
                    tracing::warn!(error = %e, "telling the Slack user failed");
                }
            });
        }
        None
    };
    let config = app.config();
    let Some(person) = config.by_slack(&click.team, &click.user) else {
        tracing::warn!(
            team = click.team,
            user = click.user,
            "Slack user is not an approver"
        );
        return Ok(tell(format!(
            "Slack user {} of team {} is not a configured approver.",
            click.user, click.team
        )));
    };
    if click.decision == "revoke" {
        let name = person.name.clone();
        return Ok(
            match revoke_grant(app, &format!("g-{}", click.id), &name, "slack").await {
                Ok(text) => tell(text),
                Err(e) => tell(e.1),
            },
        );
    }
    let decision = match click.decision.as_str() {
        "approve" => Decision::Approve,
        "deny" => Decision::Deny,
        _ => Decision::Kill,
    };
    // A rule that asks for a reason: the button opens the modal; its submission answers.
    if click.reason.is_none()
        && let Some(trigger) = &click.trigger_id
        && let Some(r) = app.store.get(click.id).await?
        && r.escalation.justification
        && r.state == "pending"
    {
        if let Err(e) = slack
            .open_reason_modal(trigger, click.id, &click.decision, click.grant)
            .await
        {
            tracing::warn!(error = %e, "opening the reason modal failed");
        }
        return Ok(None);
    }
    let identity = format!("slack:{}/{}", click.team, click.user);
    let name = person.name.clone();
    let who = Answerer {
        approver: &name,
        channel: "slack",
        identity: &identity,
    };
    Ok(
        match record_answer(
            app,
            click.id,
            &who,
            decision,
            click.reason.as_deref(),
            click.grant,
        )
        .await?
        {
            AnswerResult::Decided { .. } | AnswerResult::Duplicate => None,
            AnswerResult::Counted { have, need } => {
                tell(format!("Counted: {have} of {need} approvals."))
            }
            AnswerResult::Refused(why) | AnswerResult::Closed(why) => tell(why),
            AnswerResult::NotFound => tell(format!("No request {}.", click.id)),
        },
    )
}

/// Bot Framework activities: `adaptiveCard/action` invokes from the card's buttons.
async fn teams_activity(
    State(app): AppState,
    headers: HeaderMap,
    Json(activity): Json<Value>,
) -> Response {
    let Some(teams) = app.teams.clone() else {
        return ApiError(StatusCode::NOT_FOUND, "Teams is not configured".into()).into_response();
    };
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if let Err(e) = teams.verify(auth, &activity).await {
        return ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response();
    }
    if activity["type"] != "invoke" || activity["name"] != "adaptiveCard/action" {
        // Messages, installs and the like: acknowledged, nothing to do.
        return StatusCode::OK.into_response();
    }
    let tell = |text: String| -> Response {
        Json(json!({"statusCode": 200, "type": "application/vnd.microsoft.activity.message", "value": text})).into_response()
    };
    let action = &activity["value"]["action"];
    let decision = match action["verb"].as_str() {
        Some("approve") => Decision::Approve,
        Some("deny") => Decision::Deny,
        Some("kill") => Decision::Kill,
        Some("revoke") => Decision::Deny, // handled below, once the person is known
        _ => return tell("Unknown action.".into()),
    };
    let Some(id) = action["data"]["id"].as_i64() else {
        return tell("This card names no request.".into());
    };
    if let Some(aid) = activity["id"].as_str() {
        match app.store.first_delivery(&format!("teams:{aid}")).await {
            Ok(true) => {}
            Ok(false) => return tell("Already handled.".into()),
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    let aad = activity["from"]["aadObjectId"].as_str().unwrap_or_default();
    let config = app.config();
    let Some(person) = config.by_aad(aad) else {
        tracing::warn!(aad, "Teams user is not an approver");
        return tell(format!(
            "Your Teams account ({aad}) is not a configured approver."
        ));
    };
    let identity = format!("teams:{aad}");
    let name = person.name.clone();
    if action["verb"] == "revoke" {
        return match revoke_grant(&app, &format!("g-{id}"), &name, "teams").await {
            Ok(text) => tell(text),
            Err(e) => tell(e.1),
        };
    }
    let who = Answerer {
        approver: &name,
        channel: "teams",
        identity: &identity,
    };
    let reason = action["data"]["reason"]
        .as_str()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let grant = action["data"]["grant"]
        .as_u64()
        .and_then(|g| u32::try_from(g).ok());
    match record_answer(&app, id, &who, decision, reason, grant).await {
        Ok(AnswerResult::Decided { .. } | AnswerResult::Duplicate) => match app.store.get(id).await
        {
            // The refreshed card, for the person who clicked.
            Ok(Some(r)) => Json(json!({
                "statusCode": 200,
                "type": "application/vnd.microsoft.card.adaptive",
                "value": super::channels::teams::card(&r, app.config().public_url.as_deref()),
            }))
            .into_response(),
            _ => tell("Decided.".into()),
        },
        Ok(AnswerResult::Counted { have, need }) => {
            tell(format!("Counted: {have} of {need} approvals."))
        }
        Ok(AnswerResult::Refused(why) | AnswerResult::Closed(why)) => tell(why),
        Ok(AnswerResult::NotFound) => tell(format!("No request {id}.")),
        Err(e) => e.into_response(),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [("content-type", "application/json")],
        include_str!("openapi.json"),
    )
}

#[cfg(test)]
mod tests {
    /// Regression guard: every approver route is described in the served OpenAPI document.
    #[test]
    fn the_openapi_document_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let source = include_str!("api.rs");
        let routes: Vec<&str> = source
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
            .filter_map(|l| l.split('"').next())
            .filter(|p| p.starts_with("/v1/") || p.starts_with("/slack") || p.starts_with("/teams"))
            .collect();
        assert!(routes.len() >= 10, "{routes:?}");
        for r in routes {
            assert!(doc["paths"][r].is_object(), "{r} is not in openapi.json");
        }
    }
}
