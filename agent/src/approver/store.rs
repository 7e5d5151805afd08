//! The approver's store, through sqlx: SQLite (one file, the default) or PostgreSQL (several
//! replicas). Every decision is made inside one transaction that first locks the request's
//! row, so two approvers clicking at once on two replicas still make exactly one decision.
use ed25519_dalek::SigningKey;
use sqlx::{AnyPool, Row as _, any::AnyPoolOptions};

use crate::{
    approver::{
        config::ApproverConfig,
        decide::{self, Answer, Ask, Outcome},
    },
    proto::Decision,
    sign::{
        dsse::Envelope,
        statement::{self, Approval, DecisionStatement, Escalation, GrantStatement},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored value is not what this version wrote.
    #[error("stored data: {0}")]
    Corrupt(String),
    /// The request (host, id) is known with another action.
    #[error("{0}")]
    Conflict(String),
    /// Signing the decision failed.
    #[error("signing: {0}")]
    Sign(#[from] crate::sign::SignError),
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// RFC 3339 of a Unix time in milliseconds.
#[must_use]
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn schema(pg: bool) -> Vec<String> {
    let auto = if pg {
        "BIGSERIAL PRIMARY KEY"
    } else {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    vec![
        "CREATE TABLE IF NOT EXISTS hosts (host_id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL, enrolled_ms BIGINT NOT NULL)".into(),
        "CREATE TABLE IF NOT EXISTS enrollments (token_hash TEXT PRIMARY KEY, host_id TEXT NOT NULL, used_ms BIGINT NOT NULL)".into(),
        format!("CREATE TABLE IF NOT EXISTS requests (id {auto}, host_id TEXT NOT NULL, request_id BIGINT NOT NULL, action_hash TEXT NOT NULL, envelope TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL, deadline_ms BIGINT NOT NULL, created_ms BIGINT NOT NULL, decided_ms BIGINT, UNIQUE (host_id, request_id))"),
        "CREATE TABLE IF NOT EXISTS answers (request BIGINT NOT NULL, approver TEXT NOT NULL, channel TEXT NOT NULL, identity TEXT NOT NULL, decision TEXT NOT NULL, justification TEXT, at_ms BIGINT NOT NULL, grant_idx BIGINT, PRIMARY KEY (request, approver))".into(),
        "CREATE TABLE IF NOT EXISTS grants (id TEXT PRIMARY KEY, request BIGINT NOT NULL, host_id TEXT NOT NULL, scope TEXT NOT NULL, expires_ms BIGINT NOT NULL, granted_by TEXT NOT NULL, revoked_ms BIGINT, revoked_by TEXT)".into(),
        format!("CREATE TABLE IF NOT EXISTS revocations (seq {auto}, grant_id TEXT NOT NULL UNIQUE, host_id TEXT NOT NULL, envelope TEXT NOT NULL, at_ms BIGINT NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS decisions (seq {auto}, request BIGINT NOT NULL UNIQUE, host_id TEXT NOT NULL, envelope TEXT NOT NULL, decided_ms BIGINT NOT NULL)"),
        "CREATE TABLE IF NOT EXISTS messages (request BIGINT NOT NULL, channel TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (request, channel))".into(),
        "CREATE TABLE IF NOT EXISTS deliveries (key TEXT PRIMARY KEY, at_ms BIGINT NOT NULL)".into(),
        "CREATE TABLE IF NOT EXISTS sessions (id_hash TEXT PRIMARY KEY, approver TEXT NOT NULL, expires_ms BIGINT NOT NULL)".into(),
        "CREATE TABLE IF NOT EXISTS nudges (request BIGINT NOT NULL, kind TEXT NOT NULL, n BIGINT NOT NULL, at_ms BIGINT NOT NULL, PRIMARY KEY (request, kind, n))".into(),
    ]
}

/// A stored request with its answers.
#[derive(Debug, Clone)]
pub struct StoredRequest {
    /// The approver's own id (what people type).
    pub id: i64,
    /// `pending`, `approved`, `denied`, `killed`, `expired`.
    pub state: String,
    pub escalation: Escalation,
    pub deadline_ms: i64,
    pub created_ms: i64,
    pub answers: Vec<AnswerRow>,
    /// The grant given with its approval, if any.
    pub grant: Option<GrantRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AnswerRow {
    pub approver: String,
    pub channel: String,
    pub identity: String,
    pub decision: Decision,
    pub justification: Option<String>,
    pub at: String,
    /// The grant offered with an approval (index into the escalation's `grants`).
    pub grant: Option<u32>,
}

/// A grant as the approver keeps it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrantRow {
    // (`active()` tells whether it still counts.)
    pub id: String,
    /// The request it was given with.
    pub request: i64,
    pub host_id: String,
    pub scope: String,
    pub expires: String,
    pub granted_by: String,
    pub revoked: Option<String>,
    pub revoked_by: Option<String>,
}

impl GrantRow {
    /// Not revoked and not expired.
    #[must_use]
    pub fn active(&self) -> bool {
        self.revoked.is_none() && parse_rfc3339(&self.expires).is_some_and(|e| e > now_ms())
    }
}

/// What revoking a grant did.
#[derive(Debug, Clone)]
pub enum RevokeResult {
    Revoked,
    Refused(String),
    NotFound,
}

/// What recording an answer did.
#[derive(Debug, Clone)]
pub enum AnswerResult {
    Refused(String),
    Duplicate,
    Counted {
        have: u32,
        need: u32,
    },
    Decided {
        decision: Decision,
    },
    /// Decided or expired before this answer.
    Closed(String),
    NotFound,
}

/// What someone answers.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    pub decision: Decision,
    pub justification: Option<&'a str>,
    /// With an approval: give the grant offered at this index.
    pub grant: Option<u32>,
}

impl Choice<'_> {
    /// A plain answer (no reason, no grant).
    #[cfg(test)]
    #[must_use]
    pub fn plain(decision: Decision) -> Self {
        Self {
            decision,
            justification: None,
            grant: None,
        }
    }
}

/// Who answers, through what.
#[derive(Debug, Clone)]
pub struct Answerer<'a> {
    pub approver: &'a str,
    pub channel: &'a str,
    pub identity: &'a str,
}

fn decision_word(d: Decision) -> &'static str {
    match d {
        Decision::Approve => "approved",
        Decision::Deny => "denied",
        Decision::Kill => "killed",
    }
}

fn parse_decision(s: &str) -> Result<Decision, StoreError> {
    match s {
        "approve" => Ok(Decision::Approve),
        "deny" => Ok(Decision::Deny),
        "kill" => Ok(Decision::Kill),
        _ => Err(StoreError::Corrupt(format!("decision `{s}`"))),
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    pg: bool,
}

impl Store {
    /// Opens (creating if needed) the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let pg = url.starts_with("postgres");
        let url = if pg {
            url.to_owned()
        } else {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned();
            if let Some(dir) = std::path::Path::new(&path).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Db(sqlx::Error::Configuration(
                        format!("creating {}: {e}", dir.display()).into(),
                    ))
                })?;
            }
            format!("sqlite://{path}?mode=rwc")
        };
        // SQLite: one writer at a time anyway; one connection keeps it simple and correct.
        let pool = AnyPoolOptions::new()
            .max_connections(if pg { 8 } else { 1 })
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await?;
        for ddl in schema(pg) {
            sqlx::query(&ddl).execute(&pool).await?;
        }
        Ok(Self { pool, pg })
    }

    /// Whether other replicas may write to the same database (PostgreSQL).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.pg
    }

    /// Enrolls a host with a one-time token (by hash). The same host enrolling again with the
    /// same key is accepted (a retried enrollment); a used token or a changed key is not.
    pub async fn enroll(
        &self,
        token_hash: &str,
        host_id: &str,
        name: &str,
        public_key: &str,
    ) -> Result<Result<(), String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let used = sqlx::query("SELECT host_id FROM enrollments WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = used {
            let by: String = row.try_get(0)?;
            if by != host_id {
                return Ok(Err("this enrollment token was used already".into()));
            }
        } else {
            sqlx::query(
                "INSERT INTO enrollments (token_hash, host_id, used_ms) VALUES ($1, $2, $3)",
            )
            .bind(token_hash)
            .bind(host_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        let known = sqlx::query("SELECT public_key FROM hosts WHERE host_id = $1")
            .bind(host_id)
            .fetch_optional(&mut *tx)
            .await?;
        match known {
            Some(row) => {
                let key: String = row.try_get(0)?;
                if key.trim() != public_key.trim() {
                    return Ok(Err(format!("host {host_id} is enrolled with another key")));
                }
            }
            None => {
                sqlx::query("INSERT INTO hosts (host_id, name, public_key, enrolled_ms) VALUES ($1, $2, $3, $4)")
                    .bind(host_id)
                    .bind(name)
                    .bind(public_key)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// The public key (PEM) an enrolled host signs with.
    pub async fn host_key(&self, host_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT public_key FROM hosts WHERE host_id = $1")
            .bind(host_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Stores a verified escalation; `(id, new)`. A retry of the same escalation gives the
    /// same id; the same request id with another action is a conflict.
    pub async fn insert_request(
        &self,
        esc: &Escalation,
        envelope: &Envelope,
        deadline_ms: i64,
    ) -> Result<(i64, bool), StoreError> {
        let body = serde_json::to_string(esc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let env =
            serde_json::to_string(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO requests (host_id, request_id, action_hash, envelope, body, state, deadline_ms, created_ms) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7) ON CONFLICT (host_id, request_id) DO NOTHING RETURNING id",
        )
        .bind(&esc.host_id)
        .bind(esc.request.id as i64)
        .bind(&esc.action_hash)
        .bind(env)
        .bind(body)
        .bind(deadline_ms)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok((row.try_get(0)?, true));
        }
        let row = sqlx::query(
            "SELECT id, action_hash FROM requests WHERE host_id = $1 AND request_id = $2",
        )
        .bind(&esc.host_id)
        .bind(esc.request.id as i64)
        .fetch_one(&self.pool)
        .await?;
        let hash: String = row.try_get(1)?;
        if hash != esc.action_hash {
            return Err(StoreError::Conflict(format!(
                "request {} of host {} is known with another action",
                esc.request.id, esc.host_id
            )));
        }
        Ok((row.try_get(0)?, false))
    }

    fn row_to_request(row: &sqlx::any::AnyRow) -> Result<StoredRequest, StoreError> {
        let body: String = row.try_get("body")?;
        Ok(StoredRequest {
            id: row.try_get("id")?,
            state: row.try_get("state")?,
            escalation: serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("request body: {e}")))?,
            deadline_ms: row.try_get("deadline_ms")?,
            created_ms: row.try_get("created_ms")?,
            answers: Vec::new(),
            grant: None,
        })
    }

    async fn answers<'e, E>(exec: E, id: i64) -> Result<Vec<AnswerRow>, StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let rows = sqlx::query("SELECT approver, channel, identity, decision, justification, at_ms, grant_idx FROM answers WHERE request = $1 ORDER BY at_ms, approver")
            .bind(id)
            .fetch_all(exec)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AnswerRow {
                    approver: r.try_get(0)?,
                    channel: r.try_get(1)?,
                    identity: r.try_get(2)?,
                    decision: parse_decision(&r.try_get::<String, _>(3)?)?,
                    justification: r.try_get(4)?,
                    at: rfc3339(r.try_get(5)?),
                    grant: r
                        .try_get::<Option<i64>, _>(6)?
                        .and_then(|g| u32::try_from(g).ok()),
                })
            })
            .collect()
    }

    pub async fn get(&self, id: i64) -> Result<Option<StoredRequest>, StoreError> {
        let row = sqlx::query(
            "SELECT id, state, body, deadline_ms, created_ms FROM requests WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut r = Self::row_to_request(&row)?;
        r.answers = Self::answers(&self.pool, id).await?;
        r.grant = self.grant_row(id).await?;
        Ok(Some(r))
    }

    /// Requests in `state` (all with `None`), newest first, at most `limit`.
    pub async fn list(
        &self,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<StoredRequest>, StoreError> {
        let rows = match state {
            Some(s) => sqlx::query("SELECT id, state, body, deadline_ms, created_ms FROM requests WHERE state = $1 ORDER BY id DESC LIMIT $2")
                .bind(s.to_owned())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
            None => sqlx::query("SELECT id, state, body, deadline_ms, created_ms FROM requests ORDER BY id DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = Self::row_to_request(row)?;
            r.answers = Self::answers(&self.pool, r.id).await?;
            r.grant = self.grant_row(r.id).await?;
            out.push(r);
        }
        Ok(out)
    }

    /// Records one answer and, if it decides the request, the signed decision — all in one
    /// transaction that holds the request's row.
    pub async fn answer(
        &self,
        config: &ApproverConfig,
        key: &SigningKey,
        id: i64,
        who: &Answerer<'_>,
        choice: Choice<'_>,
    ) -> Result<AnswerResult, StoreError> {
        let Choice {
            decision,
            justification,
            grant,
        } = choice;
        let mut tx = self.pool.begin().await?;
        // Takes the row lock (PostgreSQL) or the write lock (SQLite) before anything is read.
        let locked = sqlx::query("UPDATE requests SET state = state WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if locked.rows_affected() == 0 {
            return Ok(AnswerResult::NotFound);
        }
        let row = sqlx::query(
            "SELECT id, state, body, deadline_ms, created_ms FROM requests WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let req = Self::row_to_request(&row)?;
        if req.state != "pending" {
            return Ok(AnswerResult::Closed(format!(
                "request {id} is {} already",
                req.state
            )));
        }
        let now = now_ms();
        if now >= req.deadline_ms {
            return Ok(AnswerResult::Closed(format!("request {id} expired")));
        }
        let given = Self::answers(&mut *tx, id).await?;
        let esc = &req.escalation;
        if let Some(g) = grant {
            let offer = esc
                .grants
                .get(g as usize)
                .filter(|o| o.fits(esc.request.kind));
            if decision != Decision::Approve || offer.is_none() {
                return Ok(AnswerResult::Refused(format!(
                    "request {id} does not offer that grant"
                )));
            }
        }
        let ask = Ask {
            // The ladder widens who may answer as time passes.
            groups: esc.groups_at(now - req.created_ms),
            quorum: esc.quorum,
            each_group: esc.each_group,
            justification: esc.justification,
            requester: crate::sign::statement::requester_identities(
                esc.on_behalf_of.as_deref(),
                &esc.request,
            ),
        };
        let given_short: Vec<Answer> = given
            .iter()
            .map(|a| Answer {
                approver: a.approver.clone(),
                decision: a.decision,
            })
            .collect();
        let outcome = decide::answer(
            config,
            &ask,
            &given_short,
            who.approver,
            decision,
            justification,
        );
        let decided = match outcome {
            Outcome::Refused(why) => return Ok(AnswerResult::Refused(why)),
            Outcome::Duplicate => return Ok(AnswerResult::Duplicate),
            Outcome::Counted { .. } => None,
            Outcome::Decided(d) => Some(d),
        };
        let justification = justification.map(str::trim).filter(|j| !j.is_empty());
        sqlx::query("INSERT INTO answers (request, approver, channel, identity, decision, justification, at_ms, grant_idx) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(id)
            .bind(who.approver)
            .bind(who.channel)
            .bind(who.identity)
            .bind(decision.to_string())
            .bind(justification.map(str::to_owned))
            .bind(now)
            .bind(grant.map(i64::from))
            .execute(&mut *tx)
            .await?;
        let Some(d) = decided else {
            let Outcome::Counted { have, need } = outcome else {
                unreachable!("handled above")
            };
            tx.commit().await?;
            return Ok(AnswerResult::Counted { have, need });
        };
        let identities_of = |name: &str| {
            config
                .by_name(name)
                .map(super::config::Approver::all_identities)
                .unwrap_or_default()
        };
        let mut approvals: Vec<Approval> = given
            .iter()
            .map(|a| Approval {
                approver: a.approver.clone(),
                channel: a.channel.clone(),
                identity: a.identity.clone(),
                decision: a.decision,
                justification: a.justification.clone(),
                at: a.at.clone(),
                grant: a.grant,
                identities: identities_of(&a.approver),
            })
            .collect();
        approvals.push(Approval {
            approver: who.approver.to_owned(),
            channel: who.channel.to_owned(),
            identity: who.identity.to_owned(),
            decision,
            justification: justification.map(str::to_owned),
            at: rfc3339(now),
            grant,
            identities: identities_of(who.approver),
        });
        // A grant is given only if every approval chose it.
        let chosen = if d == Decision::Approve {
            let mut picks = approvals
                .iter()
                .filter(|a| a.decision == Decision::Approve)
                .map(|a| a.grant);
            let first = picks.next().flatten();
            first.filter(|f| picks.all(|p| p == Some(*f)))
        } else {
            None
        };
        let grant_statement = chosen
            .and_then(|g| esc.grants.get(g as usize))
            .map(|offer| GrantStatement {
                id: format!("g-{id}"),
                scope: offer.scope,
                expires_at: rfc3339(now + (offer.for_secs as i64).saturating_mul(1000)),
            });
        let stmt = DecisionStatement {
            v: statement::STATEMENT_VERSION,
            approver_key: crate::sign::key_id(&key.verifying_key()).0,
            host_id: esc.host_id.clone(),
            request: esc.request.id,
            action_hash: esc.action_hash.clone(),
            decision: d,
            approvals,
            decided_at: rfc3339(now),
            grant: grant_statement.clone(),
        };
        let envelope = Envelope::sign_json(statement::PAYLOAD_DECISION, &stmt, key)?;
        let updated = sqlx::query(
            "UPDATE requests SET state = $1, decided_ms = $2 WHERE id = $3 AND state = 'pending'",
        )
        .bind(decision_word(d))
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(AnswerResult::Closed(format!(
                "request {id} was decided meanwhile"
            )));
        }
        sqlx::query("INSERT INTO decisions (request, host_id, envelope, decided_ms) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(&esc.host_id)
            .bind(serde_json::to_string(&envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if let Some(g) = &grant_statement {
            let by: Vec<&str> = stmt.approvals.iter().map(|a| a.approver.as_str()).collect();
            sqlx::query("INSERT INTO grants (id, request, host_id, scope, expires_ms, granted_by) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&g.id)
                .bind(id)
                .bind(&esc.host_id)
                .bind(g.scope.to_string())
                .bind(parse_rfc3339(&g.expires_at).unwrap_or(now))
                .bind(by.join(", "))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(AnswerResult::Decided { decision: d })
    }

    /// Signed decisions for `host_id` after sequence `after`, oldest first.
    pub async fn decisions_after(
        &self,
        host_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Envelope)>, StoreError> {
        self.signed_after("decisions", host_id, after, limit).await
    }

    /// The envelopes of `table` (`decisions` or `revocations`) for `host_id` after sequence
    /// `after`, oldest first.
    async fn signed_after(
        &self,
        table: &'static str,
        host_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Envelope)>, StoreError> {
        let sql = format!(
            "SELECT seq, envelope FROM {table} WHERE host_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(host_id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let env: String = r.try_get(1)?;
                Ok((
                    r.try_get(0)?,
                    serde_json::from_str(&env)
                        .map_err(|e| StoreError::Corrupt(format!("{table} envelope: {e}")))?,
                ))
            })
            .collect()
    }

    /// Grants, newest first (`active`: not revoked and not expired).
    pub async fn grants(&self, active: bool, limit: i64) -> Result<Vec<GrantRow>, StoreError> {
        let rows = sqlx::query("SELECT id, request, host_id, scope, expires_ms, granted_by, revoked_ms, revoked_by FROM grants ORDER BY request DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let now = now_ms();
        let mut out = Vec::new();
        for r in &rows {
            let expires: i64 = r.try_get(4)?;
            let revoked: Option<i64> = r.try_get(6)?;
            if active && (revoked.is_some() || expires <= now) {
                continue;
            }
            out.push(GrantRow {
                id: r.try_get(0)?,
                request: r.try_get(1)?,
                host_id: r.try_get(2)?,
                scope: r.try_get(3)?,
                expires: rfc3339(expires),
                granted_by: r.try_get(5)?,
                revoked: revoked.map(rfc3339),
                revoked_by: r.try_get(7)?,
            });
        }
        Ok(out)
    }

    /// The grant given with request `id`, if any.
    async fn grant_row(&self, id: i64) -> Result<Option<GrantRow>, StoreError> {
        let row = sqlx::query("SELECT id, request, host_id, scope, expires_ms, granted_by, revoked_ms, revoked_by FROM grants WHERE request = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(GrantRow {
            id: r.try_get(0)?,
            request: r.try_get(1)?,
            host_id: r.try_get(2)?,
            scope: r.try_get(3)?,
            expires: rfc3339(r.try_get(4)?),
            granted_by: r.try_get(5)?,
            revoked: r.try_get::<Option<i64>, _>(6)?.map(rfc3339),
            revoked_by: r.try_get(7)?,
        }))
    }

    /// Revokes grant `grant_id` as `by` (who must be allowed to answer its request), and
    /// signs the revocation for its host.
    pub async fn revoke(
        &self,
        config: &ApproverConfig,
        key: &SigningKey,
        grant_id: &str,
        approver: &str,
        by: &str,
    ) -> Result<RevokeResult, StoreError> {
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query("UPDATE grants SET scope = scope WHERE id = $1")
            .bind(grant_id)
            .execute(&mut *tx)
            .await?;
        if locked.rows_affected() == 0 {
            return Ok(RevokeResult::NotFound);
        }
        let row = sqlx::query("SELECT g.request, g.host_id, g.revoked_ms, g.expires_ms, r.body FROM grants g JOIN requests r ON r.id = g.request WHERE g.id = $1")
            .bind(grant_id)
            .fetch_one(&mut *tx)
            .await?;
        let host_id: String = row.try_get(1)?;
        if row.try_get::<Option<i64>, _>(2)?.is_some() {
            return Ok(RevokeResult::Refused(format!(
                "grant {grant_id} is revoked already"
            )));
        }
        if row.try_get::<i64, _>(3)? <= now_ms() {
            return Ok(RevokeResult::Refused(format!(
                "grant {grant_id} has expired"
            )));
        }
        let body: String = row.try_get(4)?;
        let esc: Escalation = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("request body: {e}")))?;
        // Anyone who may answer such a request may take the grant back (the agent's owner
        // too: revoking only ever narrows what runs).
        let ask = Ask {
            groups: esc.groups_at(i64::MAX / 2),
            quorum: 1,
            each_group: false,
            justification: false,
            requester: Vec::new(),
        };
        if let Err(why) = decide::may_answer(config, &ask, approver) {
            return Ok(RevokeResult::Refused(why));
        }
        let now = now_ms();
        let stmt = statement::RevocationStatement {
            v: statement::STATEMENT_VERSION,
            approver_key: crate::sign::key_id(&key.verifying_key()).0,
            host_id: host_id.clone(),
            grant_id: grant_id.to_owned(),
            by: by.to_owned(),
            at: rfc3339(now),
        };
        let envelope = Envelope::sign_json(statement::PAYLOAD_REVOCATION, &stmt, key)?;
        sqlx::query("UPDATE grants SET revoked_ms = $1, revoked_by = $2 WHERE id = $3")
            .bind(now)
            .bind(by)
            .bind(grant_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO revocations (grant_id, host_id, envelope, at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(grant_id)
        .bind(&host_id)
        .bind(serde_json::to_string(&envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RevokeResult::Revoked)
    }

    /// Signed revocations for `host_id` after sequence `after`, oldest first.
    pub async fn revocations_after(
        &self,
        host_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Envelope)>, StoreError> {
        self.signed_after("revocations", host_id, after, limit)
            .await
    }

    /// Marks pending requests whose deadline passed as expired; their ids.
    pub async fn expire_due(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("UPDATE requests SET state = 'expired', decided_ms = $1 WHERE state = 'pending' AND deadline_ms <= $1 RETURNING id")
            .bind(now_ms())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Remembers where a channel showed a request (e.g. a Slack message's channel and ts).
    pub async fn set_message(
        &self,
        id: i64,
        channel: &str,
        reference: &str,
    ) -> Result<(), StoreError> {
        let sql = if self.pg {
            "INSERT INTO messages (request, channel, ref) VALUES ($1, $2, $3) ON CONFLICT (request, channel) DO UPDATE SET ref = EXCLUDED.ref"
        } else {
            "INSERT OR REPLACE INTO messages (request, channel, ref) VALUES ($1, $2, $3)"
        };
        sqlx::query(sql)
            .bind(id)
            .bind(channel)
            .bind(reference)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn message(&self, id: i64, channel: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT ref FROM messages WHERE request = $1 AND channel = $2")
            .bind(id)
            .bind(channel)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Claims reminder or ladder step `n` of `kind` for request `id`: true for the one
    /// replica that sends it.
    pub async fn claim_nudge(&self, id: i64, kind: &str, n: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("INSERT INTO nudges (request, kind, n, at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (request, kind, n) DO NOTHING")
            .bind(id)
            .bind(kind)
            .bind(n)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stores a web session (by the hash of its id).
    pub async fn create_session(
        &self,
        id_hash: &str,
        approver: &str,
        expires_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE expires_ms < $1")
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO sessions (id_hash, approver, expires_ms) VALUES ($1, $2, $3)")
            .bind(id_hash)
            .bind(approver)
            .bind(expires_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The approver of a live session.
    pub async fn session(&self, id_hash: &str) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT approver FROM sessions WHERE id_hash = $1 AND expires_ms > $2")
                .bind(id_hash)
                .bind(now_ms())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// True the first time `key` is seen (a callback delivered twice is handled once).
    pub async fn first_delivery(&self, key: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO deliveries (key, at_ms) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{proto::RequestView, sign::statement::action_hash};

    fn config() -> ApproverConfig {
        serde_yaml::from_str(
            "approvers:\n  - {name: bob}\n  - {name: carol}\ngroups:\n  dev: [bob, carol]\n",
        )
        .unwrap()
    }

    fn escalation(id: u64, deadline_ms: i64) -> Escalation {
        let request: RequestView = serde_json::from_value(serde_json::json!({
            "id": id, "kind": "exec", "label": "coder", "pid": 10, "tid": 10, "uid": 1000,
            "user": "u", "binary": "/bin/true", "argv": ["true"], "argv_truncated": false,
            "cwd": "/", "parents": [], "destination": null, "protocol": null, "age_ms": 0,
            "expires_in_ms": 0, "note": null, "rule": null
        }))
        .unwrap();
        Escalation {
            v: 1,
            host_id: "host".into(),
            host_name: "h".into(),
            action_hash: action_hash("host", &request),
            request,
            on_behalf_of: None,
            approvers: vec!["dev".into()],
            quorum: 1,
            each_group: false,
            justification: false,
            deadline: rfc3339(deadline_ms),
            on_timeout: Decision::Deny,
            sent_at: rfc3339(now_ms()),
            remind_secs: None,
            ladder: Vec::new(),
            grants: Vec::new(),
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/a.db", dir.path().display());
        let s = Store::open(&url).await.unwrap();
        (dir, s)
    }

    fn envelope(key: &SigningKey) -> Envelope {
        Envelope::sign("t", b"{}", key)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_answers_at_once_make_one_signed_bound_decision() {
        let (_d, s) = store().await;
        let key = SigningKey::from_bytes(&[3; 32]);
        let esc = escalation(7, now_ms() + 60_000);
        let (id, new) = s
            .insert_request(&esc, &envelope(&key), now_ms() + 60_000)
            .await
            .unwrap();
        assert!(new);
        // A retry of the same escalation is the same request; another action is refused.
        assert_eq!(
            s.insert_request(&esc, &envelope(&key), 0).await.unwrap(),
            (id, false)
        );
        let mut other = esc.clone();
        other.action_hash = "0".repeat(64);
        assert!(matches!(
            s.insert_request(&other, &envelope(&key), 0).await,
            Err(StoreError::Conflict(_))
        ));
        let c = config();
        let (a, b) = tokio::join!(
            s.answer(
                &c,
                &key,
                id,
                &Answerer {
                    approver: "bob",
                    channel: "api",
                    identity: "t:b"
                },
                Choice::plain(Decision::Approve)
            ),
            s.answer(
                &c,
                &key,
                id,
                &Answerer {
                    approver: "carol",
                    channel: "api",
                    identity: "t:c"
                },
                Choice::plain(Decision::Approve)
            ),
        );
        let decided = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Ok(AnswerResult::Decided { .. })))
            .count();
        assert_eq!(decided, 1, "{a:?} {b:?}");
        let ds = s.decisions_after("host", 0, 10).await.unwrap();
        assert_eq!(ds.len(), 1);
        let stmt: DecisionStatement = ds[0]
            .1
            .verify_json(statement::PAYLOAD_DECISION, &key.verifying_key())
            .unwrap();
        assert_eq!((stmt.host_id.as_str(), stmt.request), ("host", 7));
        assert_eq!(stmt.action_hash, esc.action_hash);
        assert_eq!(stmt.decision, Decision::Approve);
        assert_eq!(stmt.approvals.len(), 1);
        assert!(
            s.decisions_after("other-host", 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A grant is given only if offered and chosen by every approval of the quorum.
    #[tokio::test(flavor = "current_thread")]
    async fn grants_must_be_offered_and_agreed() {
        use crate::sign::statement::{GrantOffer, GrantScope};
        let (_d, s) = store().await;
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut esc = escalation(9, now_ms() + 60_000);
        esc.grants = vec![
            GrantOffer {
                scope: GrantScope::Binary,
                for_secs: 600,
            },
            GrantOffer {
                scope: GrantScope::Destination,
                for_secs: 600,
            },
        ];
        esc.quorum = 2;
        let (id, _) = s
            .insert_request(&esc, &envelope(&key), now_ms() + 60_000)
            .await
            .unwrap();
        let c = config();
        let who = |n: &'static str| Answerer {
            approver: n,
            channel: "api",
            identity: n,
        };
        let with = |g: Option<u32>| Choice {
            decision: Decision::Approve,
            justification: None,
            grant: g,
        };
        // Out of range, and a connect grant for an exec: refused.
        for g in [5, 1] {
            let r = s
                .answer(&c, &key, id, &who("bob"), with(Some(g)))
                .await
                .unwrap();
            assert!(matches!(r, AnswerResult::Refused(_)), "{g}: {r:?}");
        }
        s.answer(&c, &key, id, &who("bob"), with(Some(0)))
            .await
            .unwrap();
        // Carol approves without the grant: approved, but no grant.
        let r = s
            .answer(&c, &key, id, &who("carol"), with(None))
            .await
            .unwrap();
        assert!(matches!(r, AnswerResult::Decided { .. }), "{r:?}");
        let d = s.decisions_after("host", 0, 10).await.unwrap();
        let stmt: DecisionStatement = d[0]
            .1
            .verify_json(statement::PAYLOAD_DECISION, &key.verifying_key())
            .unwrap();
        assert!(stmt.grant.is_none(), "{stmt:?}");
        assert!(s.grants(false, 10).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn expired_requests_take_no_answers() {
        let (_d, s) = store().await;
        let key = SigningKey::from_bytes(&[3; 32]);
        let (id, _) = s
            .insert_request(&escalation(1, now_ms() - 1), &envelope(&key), now_ms() - 1)
            .await
            .unwrap();
        assert_eq!(s.expire_due().await.unwrap(), [id]);
        let r = s
            .answer(
                &config(),
                &key,
                id,
                &Answerer {
                    approver: "bob",
                    channel: "api",
                    identity: "t",
                },
                Choice::plain(Decision::Approve),
            )
            .await
            .unwrap();
        assert!(
            matches!(r, AnswerResult::Closed(ref m) if m.contains("expired")),
            "{r:?}"
        );
        assert!(s.decisions_after("host", 0, 10).await.unwrap().is_empty());
    }
}
