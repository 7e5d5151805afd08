//! The web page: pending requests and history, server-rendered, with approve / deny / kill
//! forms, behind a login with the approver's token. Sessions are random ids (stored hashed,
//! 12 h), in an `HttpOnly`, `SameSite=Strict` cookie; every form carries a token derived from
//! the session (CSRF). Answers go through the same checks as every other channel.
use std::{fmt::Write as _, sync::Arc};

use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;

use super::{
    App,
    api::record_answer,
    store::{AnswerResult, Answerer, StoredRequest, now_ms, rfc3339},
};
use crate::{cli::requests::quote_argv, proto::Decision, sign};

/// How long a login lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;
const COOKIE: &str = "countersign_session";

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/requests") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/requests", get(list))
        .route("/requests/{id}", get(show))
        .route("/requests/{id}/answer", post(answer))
        .route("/requests/{id}/revoke", post(revoke))
}

/// HTML-escapes text.
#[must_use]
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn page(title: &str, who: Option<&str>, body: &str) -> Html<String> {
    let nav = who
        .map(|w| {
            format!(
                "<nav>Signed in as <b>{}</b> · <a href=\"/requests\">Requests</a> <form method=\"post\" action=\"/logout\" class=\"inline\"><button>Sign out</button></form></nav>",
                esc(w)
            )
        })
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · countersign</title>\
<meta name=\"viewport\" content=\"width=device-width\">\
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}}\
table{{border-collapse:collapse}}td,th{{text-align:left;vertical-align:top;padding:.2rem .6rem .2rem 0}}\
code{{background:#f3f3f3;padding:0 .2rem;white-space:pre-wrap;word-break:break-all}}\
.req{{border:1px solid #ccc;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}}\
.pending{{border-color:#c80}}.msg{{background:#eef;padding:.5rem 1rem}}.err{{background:#fee;padding:.5rem 1rem}}\
.inline{{display:inline}}button{{margin-right:.4rem}}</style></head><body>{nav}<h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    ))
}

/// The approver signed in by the session cookie, and the session id.
async fn session(app: &App, headers: &HeaderMap) -> Option<(String, String)> {
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())?;
    let name = app
        .store
        .session(&sign::sha256_hex(id.as_bytes()))
        .await
        .ok()??;
    // A person removed from the configuration loses their sessions.
    app.config().by_name(&name)?;
    Some((name, id))
}

fn csrf(session_id: &str) -> String {
    sign::sha256_hex(format!("csrf:{session_id}").as_bytes())
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

async fn login_page() -> Html<String> {
    page(
        "Sign in",
        None,
        "<form method=\"post\" action=\"/login\"><label>Approver token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" size=\"50\"></label> <button id=\"signin\">Sign in</button></form>",
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<Arc<App>>, Form(f): Form<LoginForm>) -> Response {
    let hash = sign::sha256_hex(f.token.trim().as_bytes());
    let config = app.config();
    let Some(who) = config.by_token_hash(&hash) else {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            page(
                "Sign in",
                None,
                "<p class=\"err\">Unknown token.</p><p><a href=\"/login\">Try again</a></p>",
            ),
        )
            .into_response();
        r.extensions_mut().insert(crate::serve::Reason(
            "web sign-in with an unknown token".into(),
        ));
        return r;
    };
    let mut raw = [0u8; 32];
    if getrandom::fill(&mut raw).is_err() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let id = sign::hex(&raw);
    if let Err(e) = app
        .store
        .create_session(
            &sign::sha256_hex(id.as_bytes()),
            &who.name,
            now_ms() + SESSION_MS,
        )
        .await
    {
        tracing::error!(error = %e, "storing a session failed");
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    tracing::info!(approver = who.name, "web sign-in");
    let secure = if app.config().tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
                SESSION_MS / 1000
            ),
        )],
        Redirect::to("/requests"),
    )
        .into_response()
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some((_, id)) = session(&app, &headers).await {
        let _ = app
            .store
            .delete_session(&sign::sha256_hex(id.as_bytes()))
            .await;
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

fn render(r: &StoredRequest, csrf_token: Option<&str>) -> String {
    let e = &r.escalation;
    let v = &e.request;
    let mut s = String::new();
    let _ = write!(
        s,
        "<div class=\"req {}\" id=\"request-{}\"><h2><a href=\"/requests/{}\">#{}</a> {} — <span class=\"state\">{}</span></h2><table>",
        esc(&r.state),
        r.id,
        r.id,
        r.id,
        esc(v.kind.as_str()),
        esc(&r.state)
    );
    let mut row = |k: &str, val: String| {
        let _ = write!(s, "<tr><th>{}</th><td>{val}</td></tr>", esc(k));
    };
    row("Host", esc(&e.host_name));
    row(
        "Label",
        format!(
            "{}{}",
            esc(&v.label),
            e.on_behalf_of
                .as_deref()
                .map(|o| format!(" (works for {})", esc(o)))
                .unwrap_or_default()
        ),
    );
    row(
        "Process",
        format!(
            "pid {} user {}({})",
            v.pid,
            esc(v.user.as_deref().unwrap_or("?")),
            v.uid
        ),
    );
    if let Some(b) = &v.binary {
        row("Binary", format!("<code>{}</code>", esc(b)));
    }
    if !v.argv.is_empty() {
        row(
            "argv",
            format!(
                "<code class=\"argv\">{}</code>{}",
                esc(&quote_argv(&v.argv)),
                if v.argv_truncated { " (truncated)" } else { "" }
            ),
        );
    }
    if let Some(d) = v.destination_text() {
        row("Destination", format!("<code>{}</code>", esc(&d)));
    }
    if let Some(c) = &v.cwd {
        row("cwd", format!("<code>{}</code>", esc(c)));
    }
    if !v.parents.is_empty() {
        let chain: Vec<String> = v
            .parents
            .iter()
            .map(|p| format!("{}({})", p.comm, p.pid))
            .collect();
        row(
            "Parents",
            format!("<code>{}</code>", esc(&chain.join(" <- "))),
        );
    }
    if let Some(rule) = &v.rule {
        row("Rule", esc(rule));
    }
    if let Some(n) = &v.note {
        row("Note", esc(n));
    }
    row("Asks", esc(&e.asks(now_ms() - r.created_ms)));
    row(
        "Deadline",
        format!("{} (then {})", esc(&rfc3339(r.deadline_ms)), e.on_timeout),
    );
    for a in &r.answers {
        row(
            "Answer",
            format!(
                "{} {} via {} at {}{}",
                esc(&a.approver),
                a.decision,
                esc(&a.channel),
                esc(&a.at),
                a.justification
                    .as_deref()
                    .map(|j| format!(": “{}”", esc(j)))
                    .unwrap_or_default()
            ),
        );
    }
    s.push_str("</table>");
    if let (Some(token), "pending") = (csrf_token, r.state.as_str()) {
        let grants: String = e
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| g.fits(v.kind))
            .map(|(i, g)| {
                format!(
                    "<button name=\"choice\" value=\"grant-{i}\" id=\"grant-{id}-{i}\">Approve {}</button>",
                    esc(&g.describe()),
                    id = r.id
                )
            })
            .collect();
        let _ = write!(
            s,
            "<form method=\"post\" action=\"/requests/{id}/answer\"><input type=\"hidden\" name=\"csrf\" value=\"{token}\">\
<label>Reason <input name=\"reason\" id=\"reason-{id}\" size=\"40\"></label> \
<button name=\"choice\" value=\"approve\" id=\"approve-{id}\">Approve once</button>{grants}\
<button name=\"choice\" value=\"deny\" id=\"deny-{id}\">Deny</button>\
<button name=\"choice\" value=\"kill\" id=\"kill-{id}\">Kill process</button></form>",
            id = r.id
        );
    }
    if let Some(g) = &r.grant {
        let state = if g.active() {
            format!("in force until {}", esc(&g.expires))
        } else if let Some(by) = &g.revoked_by {
            format!("revoked by {}", esc(by))
        } else {
            "expired".to_owned()
        };
        let _ = write!(
            s,
            "<p class=\"grant\" id=\"grant-state-{id}\">Grant {} ({}): {state}</p>",
            esc(&g.id),
            esc(&g.scope),
            id = r.id
        );
        if let (Some(token), true) = (csrf_token, g.active()) {
            let _ = write!(
                s,
                "<form method=\"post\" action=\"/requests/{id}/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{token}\"><button id=\"revoke-{id}\">Revoke grant</button></form>",
                id = r.id
            );
        }
    }
    s.push_str("</div>");
    s
}

#[derive(Deserialize)]
struct Flash {
    msg: Option<String>,
    err: Option<String>,
}

fn flash(f: &Flash) -> String {
    let mut s = String::new();
    if let Some(m) = &f.msg {
        let _ = write!(s, "<p class=\"msg\" id=\"flash\">{}</p>", esc(m));
    }
    if let Some(m) = &f.err {
        let _ = write!(s, "<p class=\"err\" id=\"flash\">{}</p>", esc(m));
    }
    s
}

async fn list(State(app): State<Arc<App>>, headers: HeaderMap, Query(f): Query<Flash>) -> Response {
    let Some((who, sid)) = session(&app, &headers).await else {
        return to_login();
    };
    let token = csrf(&sid);
    let (pending, all) = match (
        app.store.list(Some("pending"), 200).await,
        app.store.list(None, 50).await,
    ) {
        (Ok(p), Ok(a)) => (p, a),
        _ => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    let mut body = flash(&f);
    body.push_str("<h2>Pending</h2>");
    if pending.is_empty() {
        body.push_str("<p id=\"none-pending\">Nothing is waiting.</p>");
    }
    for r in &pending {
        body.push_str(&render(r, Some(&token)));
    }
    body.push_str("<h2>History</h2>");
    for r in all.iter().filter(|r| r.state != "pending") {
        body.push_str(&render(r, Some(&token)));
    }
    page("Requests", Some(&who), &body).into_response()
}

async fn show(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(f): Query<Flash>,
) -> Response {
    let Some((who, sid)) = session(&app, &headers).await else {
        return to_login();
    };
    match app.store.get(id).await {
        Ok(Some(r)) => page(
            &format!("Request #{id}"),
            Some(&who),
            &(flash(&f) + &render(&r, Some(&csrf(&sid)))),
        )
        .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            page("Not found", Some(&who), "<p>No such request.</p>"),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[derive(Deserialize)]
struct AnswerForm {
    csrf: String,
    /// `approve`, `deny`, `kill`, or `grant-N` (approve and give the grant offered at N).
    choice: String,
    reason: Option<String>,
}

async fn answer(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<AnswerForm>,
) -> Response {
    let Some((who, sid)) = session(&app, &headers).await else {
        return to_login();
    };
    if f.csrf != csrf(&sid) {
        return (
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                Some(&who),
                "<p class=\"err\">This form is not from your session.</p>",
            ),
        )
            .into_response();
    }
    let identity = format!("web:{who}");
    let a = Answerer {
        approver: &who,
        channel: "web",
        identity: &identity,
    };
    let reason = f.reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let (decision, grant) = match f.choice.as_str() {
        "approve" => (Decision::Approve, None),
        "deny" => (Decision::Deny, None),
        "kill" => (Decision::Kill, None),
        other => match other.strip_prefix("grant-").and_then(|n| n.parse().ok()) {
            Some(n) => (Decision::Approve, Some(n)),
            None => return StatusCode::BAD_REQUEST.into_response(),
        },
    };
    let (key, text) = match record_answer(&app, id, &a, decision, reason, grant).await {
        Ok(AnswerResult::Decided { decision }) => {
            ("msg", format!("Request #{id} decided: {decision}."))
        }
        Ok(AnswerResult::Counted { have, need }) => {
            ("msg", format!("Counted: {have} of {need} approvals."))
        }
        Ok(AnswerResult::Duplicate) => ("msg", "You answered already.".to_owned()),
        Ok(AnswerResult::Refused(why) | AnswerResult::Closed(why)) => ("err", why),
        Ok(AnswerResult::NotFound) => ("err", format!("No request {id}.")),
        Err(_) => (
            "err",
            "The answer could not be recorded; try again.".to_owned(),
        ),
    };
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(key, &text)
        .finish();
    Redirect::to(&format!("/requests/{id}?{q}")).into_response()
}

#[derive(Deserialize)]
struct RevokeForm {
    csrf: String,
}

async fn revoke(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<RevokeForm>,
) -> Response {
    let Some((who, sid)) = session(&app, &headers).await else {
        return to_login();
    };
    if f.csrf != csrf(&sid) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let (key, text) =
        match crate::approver::api::revoke_grant(&app, &format!("g-{id}"), &who, "web").await {
            Ok(t) => ("msg", t),
            Err(e) => ("err", e.1),
        };
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(key, &text)
        .finish();
    Redirect::to(&format!("/requests/{id}?{q}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::{esc, render};
    use crate::approver::store::StoredRequest;

    #[test]
    fn a_connect_shows_its_learnt_name_beside_the_address() {
        let escalation = serde_json::from_value(serde_json::json!({
            "v": 1, "host_id": "h", "host_name": "build-7", "action_hash": "00",
            "on_behalf_of": null, "approvers": [], "quorum": 1, "justification": false,
            "deadline": "2026-11-24T00:00:00Z", "on_timeout": "deny",
            "sent_at": "2026-11-24T00:00:00Z",
            "request": {
                "id": 3, "kind": "connect", "label": "coder", "pid": 10, "tid": 10, "uid": 0,
                "user": "root", "binary": "/usr/bin/curl", "argv": ["curl"],
                "argv_truncated": false, "cwd": "/", "parents": [],
                "destination": "93.184.216.34:443", "protocol": "tcp",
                "destination_names": ["api.example.com"], "age_ms": 0, "expires_in_ms": 0,
                "note": null, "rule": null
            }
        }))
        .unwrap();
        let r = StoredRequest {
            id: 1,
            state: "pending".into(),
            escalation,
            deadline_ms: 0,
            created_ms: 0,
            answers: Vec::new(),
            grant: None,
        };
        let html = render(&r, None);
        assert!(
            html.contains("<code>api.example.com (DNS) → 93.184.216.34:443/tcp</code>"),
            "{html}"
        );
    }

    #[test]
    fn request_fields_cannot_inject_html() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
