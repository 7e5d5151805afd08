//! `countersign approver`: the service daemons escalate to. It verifies each escalation
//! against the host's enrolled key, shows the request in the configured channels, takes
//! answers from the people configured for it (identities per channel, never display names),
//! enforces separation of duties and quorum, and hands each host its decisions, each signed
//! with the approver's key and bound to the request id and action hash.
pub mod api;
pub mod channels;
pub mod config;
pub mod decide;
pub mod store;
pub mod web;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use ed25519_dalek::SigningKey;

use self::{
    channels::{
        Channel,
        slack::Slack,
        teams::{Teams, TeamsWebhook},
        webhook::Webhook,
    },
    config::ApproverConfig,
    store::Store,
};

/// How often deadlines are checked.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// Shared by every handler.
pub struct App {
    /// The configuration in force (people and groups are re-read on SIGHUP).
    config: std::sync::RwLock<Arc<ApproverConfig>>,
    /// Where it was read from.
    config_path: std::path::PathBuf,
    pub store: Store,
    pub key: SigningKey,
    pub key_id: String,
    pub channels: Vec<Arc<dyn Channel>>,
    pub slack: Option<Arc<Slack>>,
    pub teams: Option<Arc<Teams>>,
    /// Woken whenever a decision is stored (long polls wait on it).
    pub decided: tokio::sync::Notify,
    /// Refused clients, logged at a bounded rate.
    pub refusals: Arc<crate::serve::Refusals>,
    /// Peers refused too often.
    pub strikes: Arc<crate::serve::Strikes>,
}

impl App {
    /// The configuration in force.
    pub fn config(&self) -> Arc<ApproverConfig> {
        self.config
            .read()
            .map_or_else(|p| p.into_inner().clone(), |c| c.clone())
    }

    /// Reads the configuration file again and takes its people, groups and enrollment tokens
    /// (the rest needs a restart and is kept, with a warning). A file with errors changes
    /// nothing.
    pub fn reload(&self) -> Result<(), config::ConfigError> {
        let mut new = ApproverConfig::load(&self.config_path)?;
        let old = self.config();
        let restart_only = [
            ("listen", new.listen != old.listen),
            ("tls", format!("{:?}", new.tls) != format!("{:?}", old.tls)),
            ("limits", new.limits != old.limits),
            ("database", new.database != old.database),
            ("key", new.key != old.key),
            ("public_url", new.public_url != old.public_url),
            (
                "slack",
                format!("{:?}", new.slack) != format!("{:?}", old.slack),
            ),
            (
                "teams",
                format!("{:?}", new.teams) != format!("{:?}", old.teams),
            ),
            (
                "teams_webhook",
                format!("{:?}", new.teams_webhook) != format!("{:?}", old.teams_webhook),
            ),
            (
                "webhook",
                format!("{:?}", new.webhook) != format!("{:?}", old.webhook),
            ),
        ];
        for (field, changed) in restart_only {
            if changed {
                tracing::warn!(
                    field,
                    "changed in the configuration; takes effect at the next restart"
                );
            }
        }
        new.listen = old.listen;
        new.tls.clone_from(&old.tls);
        new.limits.clone_from(&old.limits);
        new.database.clone_from(&old.database);
        new.key.clone_from(&old.key);
        new.public_url.clone_from(&old.public_url);
        new.slack.clone_from(&old.slack);
        new.teams.clone_from(&old.teams);
        new.teams_webhook.clone_from(&old.teams_webhook);
        new.webhook.clone_from(&old.webhook);
        tracing::info!(
            approvers = new.approvers.len(),
            groups = new.groups.len(),
            "people and groups reloaded"
        );
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(new);
        }
        Ok(())
    }

    /// Shows a new request in every channel (in the background; failures are logged and
    /// retried a few times: the request stays answerable through the API and CLI anyway).
    pub fn announce(self: &Arc<Self>, id: i64) {
        let app = self.clone();
        tokio::spawn(async move {
            let Ok(Some(req)) = app.store.get(id).await else {
                return;
            };
            for ch in &app.channels {
                let mut delay = Duration::from_millis(500);
                for attempt in 1..=5 {
                    match ch.notify(&req, app.config().public_url.as_deref()).await {
                        Ok(reference) => {
                            if let Some(r) = reference
                                && let Err(e) = app.store.set_message(id, ch.name(), &r).await
                            {
                                tracing::error!(id, channel = ch.name(), error = %e, "cannot store the message reference");
                            }
                            tracing::info!(id, channel = ch.name(), "request shown");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(id, channel = ch.name(), attempt, error = %e, "showing the request failed");
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
        });
    }

    /// After a decision or expiry: wakes the hosts' long polls and updates every channel.
    pub fn settled(self: &Arc<Self>, id: i64) {
        self.decided.notify_waiters();
        let app = self.clone();
        tokio::spawn(async move {
            let Ok(Some(req)) = app.store.get(id).await else {
                return;
            };
            for ch in &app.channels {
                let reference = match app.store.message(id, ch.name()).await {
                    Ok(Some(r)) => r,
                    _ => continue,
                };
                if let Err(e) = ch
                    .update(&req, &reference, app.config().public_url.as_deref())
                    .await
                {
                    tracing::warn!(id, channel = ch.name(), error = %e, "updating the request's message failed");
                }
            }
        });
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub fn run(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = ApproverConfig::load(config_path)?;
    let config_path = config_path.to_path_buf();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, config_path))
}

async fn serve(config: ApproverConfig, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (key, made) = crate::sign::keys::load_or_create(&config.key)
        .with_context(|| format!("the approver key ({})", config.key.display()))?;
    let key_id = crate::sign::key_id(&key.verifying_key()).0;
    if made {
        tracing::info!(path = %config.key.display(), key_id, "approver key made");
    }
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening the database ({})", redact(&config.database)))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .context("HTTP client")?;
    let mut channels: Vec<Arc<dyn Channel>> = Vec::new();
    let slack = config
        .slack
        .clone()
        .map(|c| Arc::new(Slack::new(c, http.clone())));
    if let Some(s) = &slack {
        channels.push(s.clone());
    }
    let teams = config
        .teams
        .clone()
        .map(|c| Arc::new(Teams::new(c, http.clone())));
    if let Some(t) = &teams {
        channels.push(t.clone());
    }
    if let Some(w) = config.teams_webhook.clone() {
        channels.push(Arc::new(TeamsWebhook::new(w, http.clone())));
    }
    if let Some(w) = config.webhook.clone() {
        channels.push(Arc::new(Webhook::new(w, http.clone())));
    }
    let listen = config.listen;
    let tls = config.tls.clone();
    let limits = config.limits.clone();
    let app = Arc::new(App {
        config: std::sync::RwLock::new(Arc::new(config)),
        config_path,
        store,
        key,
        key_id: key_id.clone(),
        channels,
        slack,
        teams,
        decided: tokio::sync::Notify::new(),
        refusals: Arc::new(crate::serve::Refusals::default()),
        strikes: Arc::new(crate::serve::Strikes::new(
            limits.refusals_per_peer_per_minute,
        )),
    });
    tokio::spawn(expiry_loop(app.clone()));
    let reloading = app.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = reloading.reload() {
                tracing::error!(error = %e, "configuration reload failed; the one in force stays");
            }
        }
    });
    if let Some(s) = app.slack.clone()
        && let Some(token) = app
            .config()
            .slack
            .as_ref()
            .and_then(|c| c.app_token.clone())
    {
        tokio::spawn(channels::slack_socket::run(app.clone(), s, token));
    }
    let router = api::router(app.clone());
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
    };
    let tls = match &tls {
        Some(t) => Some(crate::serve::tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "countersign approver: listening on {}{listen} (key {key_id})",
        if tls.is_some() { "https://" } else { "http://" }
    );
    crate::serve::serve(
        crate::serve::Front {
            service: "approver",
            router,
            limits,
            max_body: api::MAX_BODY_BYTES,
            refusals: app.refusals.clone(),
        },
        listener,
        tls,
        shutdown,
    )
    .await;
    eprintln!("countersign approver: stopped");
    Ok(())
}

/// Marks requests whose deadline passed as expired (the hosts apply their timeout outcome by
/// themselves; this keeps the channels true), and sends reminders and ladder steps as they
/// fall due — each one once, whichever replica claims it.
async fn expiry_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tick.tick().await;
        match app.store.expire_due().await {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(id, "request expired");
                    app.settled(id);
                }
            }
            Err(e) => tracing::error!(error = %e, "checking deadlines failed"),
        }
        if let Err(e) = nudges(&app).await {
            tracing::error!(error = %e, "checking reminders failed");
        }
    }
}

/// Reminders and ladder steps that are due.
async fn nudges(app: &Arc<App>) -> Result<(), store::StoreError> {
    let now = store::now_ms();
    for req in app.store.list(Some("pending"), 1000).await? {
        let e = &req.escalation;
        let elapsed = now - req.created_ms;
        let left = humantime::format_duration(std::time::Duration::from_secs(
            u64::try_from((req.deadline_ms - now) / 1000).unwrap_or(0),
        ));
        let mut texts = Vec::new();
        for (i, step) in e.ladder.iter().enumerate() {
            if elapsed >= (step.after_secs as i64) * 1000
                && app.store.claim_nudge(req.id, "ladder", i as i64).await?
            {
                texts.push(format!(
                    "Request #{} was not decided in time: escalated to {} ({left} left).",
                    req.id,
                    step.approvers.join(", ")
                ));
            }
        }
        if let Some(every) = e.remind_secs.filter(|s| *s > 0) {
            let n = elapsed / (every as i64 * 1000);
            if n >= 1 && app.store.claim_nudge(req.id, "remind", n).await? {
                texts.push(format!(
                    "Reminder: request #{} still needs an answer ({left} left).",
                    req.id
                ));
            }
        }
        for text in texts {
            tracing::info!(id = req.id, text, "nudge");
            for ch in &app.channels {
                if let Ok(Some(reference)) = app.store.message(req.id, ch.name()).await
                    && let Err(err) = ch
                        .nudge(&req, &reference, &text, app.config().public_url.as_deref())
                        .await
                {
                    tracing::warn!(id = req.id, channel = ch.name(), error = %err, "nudge failed");
                }
            }
        }
    }
    Ok(())
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
