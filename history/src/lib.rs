//! Warden's execution database: every job the recorder saw, at its latest
//! revision, with every history entry and attempt it ever had, and
//! per-minute and per-hour statistics of the archived ones. SQLite (one
//! file, embedded) or PostgreSQL, through one [`sqlx::AnyPool`]; the
//! schema's migrations are embedded in the binary and run at open.
//!
//! - [`rows`]: the pure part: a job revision → its rows, a batch folded to
//!   one write per job, what a newer revision does to an archived row.
//! - [`write`]: recording a batch in one transaction, idempotently (a row
//!   only ever moves to a higher revision; history and attempts merge).
//! - [`archive`]: the archival steps the recorder's janitor takes, and
//!   retention.
//! - [`text`]: full-text search, planned by how many jobs hold the words.
//! - [`read`]: get, search (filters, full text, newest first), statistics
//!   over any window, export as JSON lines.

use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions};

pub mod archive;
pub mod read;
pub mod rows;
pub mod text;
pub mod write;

pub use read::{Counts, Page, RowCounts, Search};
pub use rows::Revision;
pub use text::{Plan, TextLimits};
pub use write::Recorded;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend, DbError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(DbError::Url(format!(
                "{:?} is neither sqlite://PATH nor postgres://…",
                redact_url(url)
            )))
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("history database URL: {0}")]
    Url(String),
    #[error("history database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("history database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("history database holds an undecodable job {id}: {source}")]
    Decode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DbError {
    /// Whether the database could not be reached at all (down, a broken
    /// connection, no connection free in time): trying again later is
    /// all there is to do. Anything else is about the statement or its
    /// data.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Sql(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| unavailable_code(&c)))
            }
            DbError::Url(_) | DbError::Migrate(_) | DbError::Decode { .. } => false,
        }
    }
}

/// Whether a database error code says the server, not the statement,
/// failed: PostgreSQL's SQLSTATE classes 08 (connection), 53 (out of
/// resources), 57 (shutting down, an operator's cancel) and the
/// serialization and deadlock failures a retry resolves; SQLite's busy
/// and locked results (extended codes, primary 5 and 6).
pub fn unavailable_code(code: &str) -> bool {
    // A SQLSTATE is five characters; SQLite's extended codes are numbers
    // of at most four digits.
    if code.len() < 5 {
        return code.parse::<i64>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
    }
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code == "40001"
        || code == "40P01"
}

/// The URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    warden_shared::redact::redact(url)
}

/// The execution database: a pool for reads and one for writes (SQLite
/// has one writer at a time; its write pool is one connection, so the
/// recorder's batches and the janitor never wait on each other's locks).
#[derive(Debug, Clone)]
pub struct HistoryDb {
    read: AnyPool,
    write: AnyPool,
    backend: Backend,
    text_limits: text::TextLimits,
}

/// How long a statement waits for a lock (SQLite's busy timeout) or a
/// connection from the pool.
const WAIT: Duration = Duration::from_secs(10);

impl HistoryDb {
    /// Connects to `url` (`sqlite://PATH`, the file made if missing, or
    /// `postgres://USER@HOST:PORT/DB`) and brings its schema up to this
    /// binary's version.
    pub async fn open(url: &str) -> Result<HistoryDb, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| DbError::Url(format!("{}: {e}", redact_url(&url))))?
            .disable_statement_logging();
        let (readers, writers) = match backend {
            Backend::Sqlite => (4, 1),
            Backend::Postgres => (8, 4),
        };
        // SQLite's page cache is per connection (2 MiB by default): the
        // writer keeps 64 MiB of the indexes it appends to, each reader 16.
        let pool = |n: u32, cache: &'static str| {
            AnyPoolOptions::new()
                .max_connections(n)
                .acquire_timeout(WAIT)
                // Waiting for the one SQLite writer is how writes take
                // turns, not a sign of trouble: say so only near the limit.
                .acquire_slow_threshold(WAIT.mul_f64(0.8))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = NORMAL",
                                "PRAGMA busy_timeout = 10000",
                                "PRAGMA temp_store = MEMORY",
                                cache,
                            ] {
                                sqlx::query(pragma).execute(&mut *conn).await?;
                            }
                        }
                        Ok(())
                    })
                })
        };
        let write = pool(writers, "PRAGMA cache_size = -65536")
            .connect_with(options.clone())
            .await?;
        migrate(&write, backend).await?;
        let read = pool(readers, "PRAGMA cache_size = -16384")
            .connect_with(options)
            .await?;
        Ok(HistoryDb {
            read,
            write,
            backend,
            text_limits: text::TextLimits::default(),
        })
    }

    /// Opens the database, waiting with backoff while it cannot be reached
    /// (a PostgreSQL server still starting); `Ok(None)` on shutdown. A URL
    /// or schema that can never work is an error at once.
    pub async fn open_waiting(
        service: &str,
        url: &str,
        shutdown: &CancellationToken,
        on_wait: impl Fn(Duration),
    ) -> Result<Option<HistoryDb>, DbError> {
        let since = Instant::now();
        let mut backoff =
            warden_shared::ready::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match HistoryDb::open(url).await {
                Ok(db) => return Ok(Some(db)),
                Err(e) if e.is_unavailable() => {
                    let waited = since.elapsed();
                    on_wait(waited);
                    warn!(
                        service,
                        database = %redact_url(url),
                        error = %e,
                        waited_s = waited.as_secs(),
                        "waiting for the history database"
                    );
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The schema version (the latest migration applied).
    pub async fn schema_version(&self) -> Result<i64, DbError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(MAX(version) AS BIGINT) FROM _sqlx_migrations WHERE success = TRUE",
        )
        .fetch_one(&self.read)
        .await?;
        Ok(v.unwrap_or(0))
    }

    /// Refreshes what the query planner knows of the tables (and, on
    /// PostgreSQL, which pages are all visible, for index-only scans, and
    /// the text index's pending entries merged):
    /// what a bulk import needs before its searches are fast, and what
    /// autovacuum (PostgreSQL) or this (SQLite, sampled) does from time
    /// to time on a database the recorder fills a little at a time.
    pub async fn analyze(&self) -> Result<(), DbError> {
        let statements: &[&str] = match self.backend {
            Backend::Sqlite => &["PRAGMA analysis_limit = 1000", "ANALYZE"],
            Backend::Postgres => &["VACUUM (ANALYZE) jobs, job_text", "ANALYZE"],
        };
        let mut conn = self.write.acquire().await?;
        for sql in statements {
            sqlx::query(*sql).execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Closes both pools (the rest of the process's writes are done).
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Brings the schema up to this binary's version. PostgreSQL serializes
/// concurrent migrations itself (an advisory lock); SQLite does not, so
/// two processes opening a new file at once (`warden up`'s API and
/// recorder, say) may race: the loser's transaction fails on a table the
/// winner made, and its second try finds the migration applied.
async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), DbError> {
    static IN_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = IN_PROCESS.lock().await;
    let mut tries = 0;
    loop {
        let r = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(pool).await,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(pool).await,
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if backend == Backend::Sqlite && tries < 3 => {
                tries += 1;
                tracing::debug!(error = %e, "schema migration raced another process; trying again");
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Microseconds since the epoch: how the database keeps times.
pub fn micros(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_micros()
}

/// The instant `us` microseconds after the epoch.
pub fn from_micros(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// `$1, $2, …` for `n` values starting at `from` (PostgreSQL), or as
/// many `?` (SQLite). Only for a statement whose every value is numbered
/// by these two functions, in order.
///
/// SQLite looks a numbered parameter's name up in a list of all of them,
/// once per parameter as sqlx binds it: a 200-row insert of 18 values
/// each (3,600 names) spent half the recorder's time there. Anonymous
/// parameters have no names to look up.
pub(crate) fn placeholders(backend: Backend, from: usize, n: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; n].join(", "),
        Backend::Postgres => (from..from + n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `($1, …, $k), ($k+1, …)` for `rows` rows of `width` values (or `?`s on
/// SQLite, as [`placeholders`]).
pub(crate) fn value_rows(backend: Backend, rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(backend, 1 + r * width, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend() {
        assert_eq!(
            Backend::of_url("sqlite:///tmp/h.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::of_url("sqlite::memory:").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::of_url("postgres://u@127.0.0.1:5/db").ok(),
            Some(Backend::Postgres)
        );
        let e = Backend::of_url("mysql://u:secret@h/db")
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| !e.contains("secret")), "{e:?}");
    }

    #[test]
    fn server_failures_are_told_from_statement_failures() {
        for c in ["57P01", "08006", "53300", "40001", "40P01", "5", "517", "6"] {
            assert!(unavailable_code(c), "{c}");
        }
        for c in ["23505", "42P01", "22P02", "19", "2067", "1"] {
            assert!(!unavailable_code(c), "{c}");
        }
    }

    #[test]
    fn placeholder_rows_number_every_value_once() {
        assert_eq!(placeholders(Backend::Postgres, 3, 2), "$3, $4");
        assert_eq!(
            value_rows(Backend::Postgres, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(value_rows(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }
}
