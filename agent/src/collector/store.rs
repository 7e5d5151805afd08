//! The collector's database, through sqlx's `Any` driver: SQLite by default, PostgreSQL
//! when many hosts report. The same SQL runs on both (`$N` parameters, `ON CONFLICT`).
//!
//! - `records`: every accepted record: the raw envelope as received, and queryable columns;
//! - `heads`: per chain, the last accepted record and the key the next one must be signed by;
//! - `alerts`: gaps, forks, bad signatures, unknown keys, content problems (self-approvals);
//! - `digests`: the collector's signed digests of all heads, each chained to the previous.
use sqlx::{AnyPool, Row as _, any::AnyPoolOptions};

/// Why the database failed.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(#[from] sqlx::Error);

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS records (
        chain_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        host_id TEXT NOT NULL,
        host_name TEXT NOT NULL,
        hash TEXT NOT NULL,
        time TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        type TEXT NOT NULL,
        decision TEXT,
        request_id BIGINT,
        label TEXT,
        decided_by TEXT,
        on_behalf_of TEXT,
        problems TEXT,
        envelope TEXT NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (chain_id, seq))",
    "CREATE INDEX IF NOT EXISTS records_time ON records (time_ms)",
    "CREATE TABLE IF NOT EXISTS heads (
        chain_id TEXT PRIMARY KEY,
        host_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        next_key TEXT NOT NULL,
        updated_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS alerts (
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        host_id TEXT,
        chain_id TEXT,
        seq BIGINT,
        detail TEXT NOT NULL)",
    // The order records were stored in: the readers' cursor (a record shipped late still
    // comes after everything read before it).
    "CREATE TABLE IF NOT EXISTS ingest (
        n BIGINT PRIMARY KEY,
        chain_id TEXT NOT NULL,
        seq BIGINT NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ingest_record ON ingest (chain_id, seq)",
    // Records stored before the ingest order was kept get numbers, in the order received.
    "INSERT INTO ingest (n, chain_id, seq)
        SELECT (SELECT COALESCE(MAX(n), 0) FROM ingest)
                + ROW_NUMBER() OVER (ORDER BY r.received_at, r.chain_id, r.seq),
            r.chain_id, r.seq
        FROM records r
        WHERE NOT EXISTS (SELECT 1 FROM ingest i WHERE i.chain_id = r.chain_id AND i.seq = r.seq)",
    "CREATE TABLE IF NOT EXISTS digests (
        n BIGINT PRIMARY KEY,
        at TEXT NOT NULL,
        envelope TEXT NOT NULL)",
];

/// A chain's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub chain_id: String,
    pub host_id: String,
    pub seq: u64,
    pub hash: String,
    /// SPKI PEM of the key the next record must be signed by.
    pub next_key: String,
}

/// The queryable columns of one record.
#[derive(Debug, Clone)]
pub struct Row {
    pub chain_id: String,
    pub seq: u64,
    pub host_id: String,
    pub host_name: String,
    pub hash: String,
    pub time: String,
    pub time_ms: i64,
    pub kind: String,
    pub decision: Option<String>,
    pub request_id: Option<u64>,
    pub label: Option<String>,
    pub decided_by: Option<String>,
    pub on_behalf_of: Option<String>,
    /// Content problems found (alerted), `; `-separated.
    pub problems: Option<String>,
    /// The envelope as received (canonical JSON).
    pub envelope: String,
    pub received_at: String,
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub at: String,
    pub kind: String,
    pub host_id: Option<String>,
    pub chain_id: Option<String>,
    pub seq: Option<u64>,
    pub detail: String,
    /// How many times it was seen in its window (1 for alerts about an enrolled host's
    /// chain; anything anyone can send is counted in one alert per kind, peer and hour).
    pub count: u64,
    /// When it was last seen.
    pub last_at: String,
    /// Where it came from, when that is all that is known (the peer's address).
    pub source: Option<String>,
}

/// Columns added to `alerts` after its first release; a database made before gets them at
/// start (the error for a column already there is expected and ignored).
const ALERT_COLUMNS: &[&str] = &[
    "ALTER TABLE alerts ADD COLUMN count BIGINT NOT NULL DEFAULT 1",
    "ALTER TABLE alerts ADD COLUMN last_at TEXT",
    "ALTER TABLE alerts ADD COLUMN source TEXT",
];

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store {
    /// Connects (a SQLite file is made if missing) and makes the tables.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_owned()
        };
        // SQLite takes one writer at a time: one connection avoids `database is locked`.
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 8 })
            .connect(&url)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        for stmt in ALERT_COLUMNS {
            if let Err(e) = sqlx::query(stmt).execute(&pool).await {
                let m = e.to_string();
                if !(m.contains("duplicate column") || m.contains("already exists")) {
                    return Err(e.into());
                }
            }
        }
        sqlx::query("CREATE INDEX IF NOT EXISTS alerts_at ON alerts (at)")
            .execute(&pool)
            .await?;
        Ok(Self { pool })
    }

    pub async fn head(&self, chain_id: &str) -> Result<Option<Head>, StoreError> {
        let row = sqlx::query(
            "SELECT chain_id, host_id, seq, hash, next_key FROM heads WHERE chain_id = $1",
        )
        .bind(chain_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Head {
            chain_id: r.get(0),
            host_id: r.get(1),
            seq: u(r.get(2)),
            hash: r.get(3),
            next_key: r.get(4),
        }))
    }

    pub async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        let rows = sqlx::query(
            "SELECT chain_id, host_id, seq, hash, next_key FROM heads ORDER BY chain_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Head {
                chain_id: r.get(0),
                host_id: r.get(1),
                seq: u(r.get(2)),
                hash: r.get(3),
                next_key: r.get(4),
            })
            .collect())
    }

    /// Per chain: (chain id, host id, head seq, the head record's type, when the head moved).
    pub async fn head_activity(
        &self,
    ) -> Result<Vec<(String, String, u64, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.chain_id, h.host_id, h.seq, r.type, h.updated_at FROM heads h
             JOIN records r ON r.chain_id = h.chain_id AND r.seq = h.seq ORDER BY h.chain_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), u(r.get(2)), r.get(3), r.get(4)))
            .collect())
    }

    /// The hash of the stored record `seq` of `chain_id`.
    pub async fn hash_at(&self, chain_id: &str, seq: u64) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT hash FROM records WHERE chain_id = $1 AND seq = $2")
            .bind(chain_id)
            .bind(i(seq))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores a record and moves its chain's head, in one transaction.
    pub async fn insert(&self, row: &Row, head: &Head, now: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO records (chain_id, seq, host_id, host_name, hash, time, time_ms, type,
                decision, request_id, label, decided_by, on_behalf_of, problems, envelope, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(&row.chain_id)
        .bind(i(row.seq))
        .bind(&row.host_id)
        .bind(&row.host_name)
        .bind(&row.hash)
        .bind(&row.time)
        .bind(row.time_ms)
        .bind(&row.kind)
        .bind(&row.decision)
        .bind(row.request_id.map(i))
        .bind(&row.label)
        .bind(&row.decided_by)
        .bind(&row.on_behalf_of)
        .bind(&row.problems)
        .bind(&row.envelope)
        .bind(&row.received_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO ingest (n, chain_id, seq) SELECT COALESCE(MAX(n), 0) + 1, $1, $2 FROM ingest",
        )
        .bind(&row.chain_id)
        .bind(i(row.seq))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO heads (chain_id, host_id, seq, hash, next_key, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (chain_id) DO UPDATE SET host_id = excluded.host_id, seq = excluded.seq,
                hash = excluded.hash, next_key = excluded.next_key, updated_at = excluded.updated_at",
        )
        .bind(&head.chain_id)
        .bind(&head.host_id)
        .bind(i(head.seq))
        .bind(&head.hash)
        .bind(&head.next_key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn alert(&self, a: &Alert) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO alerts (at, kind, host_id, chain_id, seq, detail, count, last_at, source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&a.at)
        .bind(&a.kind)
        .bind(&a.host_id)
        .bind(&a.chain_id)
        .bind(a.seq.map(i))
        .bind(&a.detail)
        .bind(i(a.count))
        .bind(&a.last_at)
        .bind(&a.source)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets the count and last sighting of the alert of `kind` from `source` raised at `at`.
    pub async fn count_alert(
        &self,
        kind: &str,
        source: &str,
        at: &str,
        count: u64,
        last_at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE alerts SET count = $1, last_at = $2 WHERE kind = $3 AND source = $4 AND at = $5",
        )
        .bind(i(count))
        .bind(last_at)
        .bind(kind)
        .bind(source)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// All alerts, oldest first.
    #[cfg(test)]
    pub async fn alerts(&self) -> Result<Vec<Alert>, StoreError> {
        self.alerts_page(i64::MAX.unsigned_abs(), 0, false).await
    }

    /// At most `limit` alerts after the first `offset`, newest first when `newest`.
    pub async fn alerts_page(
        &self,
        limit: u64,
        offset: u64,
        newest: bool,
    ) -> Result<Vec<Alert>, StoreError> {
        let rows = sqlx::query(if newest {
            "SELECT at, kind, host_id, chain_id, seq, detail, count, last_at, source FROM alerts
             ORDER BY at DESC LIMIT $1 OFFSET $2"
        } else {
            "SELECT at, kind, host_id, chain_id, seq, detail, count, last_at, source FROM alerts
             ORDER BY at LIMIT $1 OFFSET $2"
        })
        .bind(i(limit))
        .bind(i(offset))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let at: String = r.get(0);
                Alert {
                    kind: r.get(1),
                    host_id: r.get(2),
                    chain_id: r.get(3),
                    seq: r.get::<Option<i64>, _>(4).map(u),
                    detail: r.get(5),
                    count: u(r.get(6)),
                    last_at: r.get::<Option<String>, _>(7).unwrap_or_else(|| at.clone()),
                    source: r.get(8),
                    at,
                }
            })
            .collect())
    }

    /// Per chain, the first and last seq of the records whose time is in `[from_ms, to_ms)`.
    pub async fn period(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, String, u64, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT chain_id, MIN(host_id), MIN(seq), MAX(seq) FROM records
             WHERE time_ms >= $1 AND time_ms < $2 GROUP BY chain_id ORDER BY chain_id",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), u(r.get(2)), u(r.get(3))))
            .collect())
    }

    /// The raw envelopes of `chain_id` from `first` to `last`, in order.
    pub async fn envelopes(
        &self,
        chain_id: &str,
        first: u64,
        last: u64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT envelope FROM records WHERE chain_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
        )
        .bind(chain_id)
        .bind(i(first))
        .bind(i(last))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Up to `limit` (ingest number, raw envelope) stored after ingest number `after` whose
    /// time is at or after `from_ms`, in the order they were stored.
    pub async fn ingested_after(
        &self,
        after: u64,
        from_ms: i64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.n, r.envelope FROM ingest i
             JOIN records r ON r.chain_id = i.chain_id AND r.seq = i.seq
             WHERE i.n > $1 AND r.time_ms >= $2 ORDER BY i.n LIMIT $3",
        )
        .bind(i(after))
        .bind(from_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (u(r.get(0)), r.get(1))).collect())
    }

    /// The last digest (number, envelope), if any.
    pub async fn last_digest(&self) -> Result<Option<(u64, String)>, StoreError> {
        let row = sqlx::query("SELECT n, envelope FROM digests ORDER BY n DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (u(r.get(0)), r.get(1))))
    }

    pub async fn add_digest(&self, n: u64, at: &str, envelope: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO digests (n, at, envelope) VALUES ($1, $2, $3)")
            .bind(i(n))
            .bind(at)
            .bind(envelope)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
