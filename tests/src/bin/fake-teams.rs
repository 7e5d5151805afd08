//! fake-teams: a local stand-in for Microsoft Teams' Bot Framework, for the end-to-end tests
//! (no real Teams is reachable from the test machines). It implements what countersign uses,
//! with the documented shapes:
//! - the token endpoint (OAuth2 client credentials; form `grant_type`, `client_id`,
//!   `client_secret`, `scope`) issuing bearer tokens;
//! - the Bot Connector: `POST /v3/conversations/{id}/activities` and
//!   `PUT /v3/conversations/{id}/activities/{activityId}`, bearer token required;
//! - the OpenID metadata and JWKS that Bot Framework tokens are verified with;
//! - invokes: `POST /_test/invoke` makes the `adaptiveCard/action` activity a click on a
//!   card's `Action.Execute` produces, with a Bot Framework JWT (RS256, issuer
//!   `https://api.botframework.com`, audience the bot's app id, `serviceUrl` claim) signed
//!   by this stand-in's own test key (`fake-teams-key.pem`, made for these tests only), and
//!   posts it to the bot's messaging endpoint; `forge` sends a token signed otherwise or for
//!   another audience;
//! - an incoming webhook (`POST /webhook`) for the notification-only variant.
//!
//! Usage: `fake-teams APP_ID APP_PASSWORD CONVERSATION_ID`; prints `listening on ADDR`.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Form, Json, Router,
    extract::{Path, State},
    http::HeaderMap,
    routing::{get, post, put},
};
use serde_json::{Value, json};

const KEY_PEM: &[u8] = include_bytes!("fake-teams-key.pem");
const KEY_ID: &str = "fake-teams-test-key";
/// The key's modulus, base64url (`openssl rsa -modulus` of fake-teams-key.pem).
const KEY_N: &str = "2vXd1WLPeaYRB11iTUDmRUvTrpcFOxQa4KYxm_N3fU706fXemRgEp3Ab0KOX1UwUU9ywMlSLQTNa3pQp3VM2Y_N_jISfuSGvEvFod3W7SlyOwgLQdSW-Qnsdc4QE70gqxqHk8XXgF2-L9ezbOPxQ3CspT0Ji2hPT5AEzfGLE_dvDZULS8qwqOAK6Ts8j54PIC65MT4C_a0STjwCQR3lzHPBZFDTPIPUUtyObWIHPMu5wBpeu1I-CWPgUdtlp2PGTD2fVbEtQnCdiZIP0ok8oX6dHqtqLBIaEiC9FQ7V1c4FqiWNiKabZRo2kYpscgwvKtX3VqgfnS77n5F84S3fX9w";

#[derive(Default)]
struct Teams {
    app_id: String,
    app_password: String,
    conversation: String,
    addr: String,
    tokens: Vec<String>,
    activities: Vec<Value>,
    webhook: Vec<Value>,
    counter: u64,
    /// How often the OpenID metadata and the key set were fetched.
    openid_fetches: u64,
    keys_fetches: u64,
}

type S = State<Arc<Mutex<Teams>>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn token(
    State(st): S,
    Form(f): Form<Vec<(String, String)>>,
) -> (axum::http::StatusCode, Json<Value>) {
    let mut s = st.lock().unwrap();
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if get("grant_type") != Some("client_credentials")
        || get("client_id") != Some(s.app_id.as_str())
        || get("client_secret") != Some(s.app_password.as_str())
        || get("scope") != Some("https://api.botframework.com/.default")
    {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        );
    }
    s.counter += 1;
    let t = format!("connector-token-{}", s.counter);
    s.tokens.push(t.clone());
    (
        axum::http::StatusCode::OK,
        Json(
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": t}),
        ),
    )
}

fn authorised(s: &Teams, h: &HeaderMap) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| s.tokens.iter().any(|x| x == t))
}

async fn post_activity(
    State(st): S,
    Path(conv): Path<String>,
    h: HeaderMap,
    Json(a): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    let mut s = st.lock().unwrap();
    if !authorised(&s, &h) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "Unauthorized"}})),
        );
    }
    if conv != s.conversation {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "ConversationNotFound"}})),
        );
    }
    s.counter += 1;
    let id = format!("1:{:016}", s.counter);
    let mut stored = a.clone();
    stored["id"] = json!(id);
    stored["edits"] = json!([]);
    s.activities.push(stored);
    (axum::http::StatusCode::CREATED, Json(json!({"id": id})))
}

async fn put_activity(
    State(st): S,
    Path((conv, id)): Path<(String, String)>,
    h: HeaderMap,
    Json(a): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    let mut s = st.lock().unwrap();
    if !authorised(&s, &h) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "Unauthorized"}})),
        );
    }
    if conv != s.conversation {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "ConversationNotFound"}})),
        );
    }
    let Some(old) = s.activities.iter_mut().find(|x| x["id"] == id) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "ActivityNotFound"}})),
        );
    };
    let prev = old["attachments"].clone();
    old["edits"].as_array_mut().unwrap().push(prev);
    old["attachments"] = a["attachments"].clone();
    (axum::http::StatusCode::OK, Json(json!({"id": id})))
}

async fn openid(State(st): S) -> Json<Value> {
    let mut s = st.lock().unwrap();
    s.openid_fetches += 1;
    Json(json!({
        "issuer": "https://api.botframework.com",
        "authorization_endpoint": "https://invalid.botframework.com",
        "jwks_uri": format!("http://{}/keys", s.addr),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"]
    }))
}

async fn keys(State(st): S) -> Json<Value> {
    st.lock().unwrap().keys_fetches += 1;
    Json(
        json!({"keys": [{"kty": "RSA", "use": "sig", "kid": KEY_ID, "n": KEY_N, "e": "AQAB", "endorsements": ["msteams"]}]}),
    )
}

async fn webhook(State(st): S, Json(b): Json<Value>) -> &'static str {
    st.lock().unwrap().webhook.push(b);
    "1"
}

async fn state(State(st): S) -> Json<Value> {
    let s = st.lock().unwrap();
    Json(json!({"activities": s.activities, "webhook": s.webhook,
        "openid_fetches": s.openid_fetches, "keys_fetches": s.keys_fetches}))
}

/// A click on a card's Action.Execute: the invoke activity Teams sends to the bot.
async fn invoke(State(st): S, Json(b): Json<Value>) -> Json<Value> {
    let (activity, token) = {
        let mut s = st.lock().unwrap();
        s.counter += 1;
        let service_url = format!("http://{}/", s.addr);
        let activity = json!({
            "type": "invoke",
            "name": "adaptiveCard/action",
            "id": format!("f:{}", s.counter),
            "timestamp": "2026-01-01T00:00:00.000Z",
            "serviceUrl": service_url,
            "channelId": "msteams",
            "from": {"id": format!("29:{}", b["aad"].as_str().unwrap_or("")), "name": "Display names do not count", "aadObjectId": b["aad"]},
            "conversation": {"isGroup": true, "conversationType": "channel", "id": s.conversation},
            "recipient": {"id": format!("28:{}", s.app_id), "name": "countersign"},
            "replyToId": b["activity_id"],
            "value": {"action": {"type": "Action.Execute", "verb": b["verb"], "data": {"id": b["id"], "reason": b["reason"]}}, "trigger": "manual"},
        });
        let forge = b["forge"].as_str().unwrap_or("");
        let aud = if forge == "audience" {
            "someone-else".to_owned()
        } else {
            s.app_id.clone()
        };
        let exp = if forge == "expired" {
            now() - 3600
        } else {
            now() + 3600
        };
        let claims = json!({"iss": "https://api.botframework.com", "aud": aud, "serviceUrl": service_url, "nbf": now() - 60, "exp": exp});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(if forge == "kid" {
            format!("no-such-key-{}", s.counter)
        } else {
            KEY_ID.into()
        });
        let key = if forge == "key" {
            // Any other RSA key: an HMAC token with the right kid is the simplest forgery.
            header.alg = jsonwebtoken::Algorithm::HS256;
            jsonwebtoken::EncodingKey::from_secret(b"forged")
        } else {
            jsonwebtoken::EncodingKey::from_rsa_pem(KEY_PEM).expect("test key")
        };
        (
            activity,
            jsonwebtoken::encode(&header, &claims, &key).expect("token"),
        )
    };
    let resp = reqwest::Client::new()
        .post(b["bot_url"].as_str().unwrap_or_default())
        .bearer_auth(token)
        .json(&activity)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            Json(json!({"status": status, "body": r.json::<Value>().await.unwrap_or(Value::Null)}))
        }
        Err(e) => Json(json!({"status": 0, "body": e.to_string()})),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [app_id, app_password, conversation] = <[String; 3]>::try_from(args)
        .unwrap_or_else(|_| panic!("usage: fake-teams APP_ID APP_PASSWORD CONVERSATION_ID"));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let st = Arc::new(Mutex::new(Teams {
        app_id,
        app_password,
        conversation,
        addr: addr.clone(),
        ..Teams::default()
    }));
    let app = Router::new()
        .route("/oauth2/token", post(token))
        .route("/v3/conversations/{conv}/activities", post(post_activity))
        .route(
            "/v3/conversations/{conv}/activities/{id}",
            put(put_activity),
        )
        .route("/openid", get(openid))
        .route("/keys", get(keys))
        .route("/webhook", post(webhook))
        .route("/_test/state", get(state))
        .route("/_test/invoke", post(invoke))
        .with_state(st);
    println!("listening on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
