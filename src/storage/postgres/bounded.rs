//! Every exchange a node has with the storage through its pool, bounded in time.
//!
//! A storage that stops answering without closing its connections (a partition, a frozen server, a
//! proxy or balancer in between that hangs) would otherwise hold a query, and whatever waits on it
//! (a request, a change feed stream, a projector), for as long as the kernel keeps the connection:
//! about a quarter of an hour while it retransmits, for ever when something on the way
//! acknowledges for the server. Invariants:
//! - a statement sent through [`Bounded`] gets its answer within `storage.query_timeout_secs`, and
//!   each row of a stream within as long after the one before; a transaction (`within` around it)
//!   gets as long for the whole of it. Past the limit the call fails with [`TimedOut`], which
//!   callers answer as 503;
//! - a connection given up on is never used again: the pool checks each connection it gets back
//!   within the same limit (a statement dropped half-way leaves its answer to be read first) and
//!   closes it when the check gets no answer, or finds it inside a transaction, so a node's pool
//!   never fills with connections that wait for ever nor hands out one whose writes never commit;
//! - a connection idle for a while is checked before it is handed out; one used a moment ago is
//!   not, since the check on its return is that recent;
//! - the server ends a statement a little after the node gave up on it (`statement_timeout`); what
//!   may rightly take longer (a project's drop) lifts it for its own transaction.
//!
//! The write batcher keeps its own connection and its own limit (`storage.commit_timeout_secs`,
//! `writer`); the catalog listener has its quiet check (`catalog`).

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::{Connection, Either, Execute, Executor, Postgres, Row, Transaction};

use crate::storage::StorageError;

/// How long a pooled connection may have been idle and still be handed out unchecked.
const FRESH: Duration = Duration::from_secs(1);

/// True on a connection outside a transaction: a statement that is the first of its transaction
/// starts when the transaction does. Sent as a simple query (one message): in the extended
/// protocol each message after the first starts the statement again, later than its transaction.
const OUTSIDE: &str = "SELECT now() = statement_timestamp()";

/// How much longer than the node the server lets a statement run (`statement_timeout`).
const SERVER_GRACE: Duration = Duration::from_secs(5);

/// Longest wait for a connection of the pool (all of them busy, or a new one to be made).
const MAX_ACQUIRE: Duration = Duration::from_secs(5);

/// No answer from the storage within the limit.
#[derive(Clone, Copy, Debug)]
pub struct TimedOut(pub Duration);

impl From<TimedOut> for sqlx::Error {
    fn from(TimedOut(limit): TimedOut) -> Self {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer in {} s (storage.query_timeout_secs)",
                limit.as_secs()
            ),
        ))
    }
}

impl From<TimedOut> for StorageError {
    fn from(TimedOut(limit): TimedOut) -> Self {
        StorageError::Unavailable(format!(
            "postgresql storage: no answer from the storage in {} s \
             (storage.query_timeout_secs); a change it was asked for may or may not have been made",
            limit.as_secs()
        ))
    }
}

/// Whether `error` says the connection was lost before the statement could run: it broke, or
/// the server ended the session (a restart, a failover, `pg_terminate_backend`). Not dstore's
/// own time limit ([`TimedOut`]), after which the statement may still be running.
pub fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(e) => e.kind() != std::io::ErrorKind::TimedOut,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Runs `read`, read-only statements, once more when the connection it took was found lost: a
/// server restarted or failed over a moment ago ended every pooled session, and the pool checks
/// the connections it hands out for a while after one was found so ([`Bounded`]). Never for
/// what writes: a statement whose answer was lost may have been made.
pub async fn read_twice<T, F, Fut>(read: F) -> Result<T, sqlx::Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    match read().await {
        Err(error) if connection_lost(&error) => {
            tracing::info!(%error, "a pooled connection was lost; reading again");
            read().await
        }
        done => done,
    }
}

/// Runs `work` (a transaction, a few statements on one connection) within `limit`.
pub async fn within<T, E: From<TimedOut>>(
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => done,
        Err(_) => Err(TimedOut(limit).into()),
    }
}

/// [`within`] for a transaction that writes and that a client waits on: past the limit its
/// COMMIT may have been on its way or its answer lost, so its outcome is unknown
/// ([`StorageError::Uncertain`]), not "not written".
pub async fn within_write<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => done,
        Err(_) => Err(StorageError::Uncertain(format!(
            "postgresql storage: no answer from the storage in {} s \
             (storage.query_timeout_secs); whether the change was made is unknown: read it \
             before asking again for what cannot be asked twice (a new key, a create)",
            limit.as_secs()
        ))),
    }
}

/// A node's pool, whose statements are each bounded by `limit`.
#[derive(Clone, Debug)]
pub struct Bounded {
    pool: PgPool,
    limit: Duration,
    /// When a connection was last found lost (see [`Lost`]).
    lost: Lost,
}

/// When one of the pool's connections was last found lost: for [`CHECK_AFTER_LOSS`] after, the
/// pool checks every connection before handing it out, fresh ones too, since whatever ended one
/// (a restart, a failover) ended the others.
#[derive(Clone, Debug, Default)]
struct Lost(std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>);

/// How long after a connection was found lost the pool checks each one it hands out.
const CHECK_AFTER_LOSS: Duration = Duration::from_secs(2);

impl Lost {
    fn note<T>(&self, result: &Result<T, sqlx::Error>) {
        if let Err(error) = result {
            if connection_lost(error) {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
            }
        }
    }

    fn recent(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < CHECK_AFTER_LOSS)
    }
}

impl Bounded {
    /// A lazily connecting pool of `size` connections made with `options`.
    pub fn connect_lazy(options: PgConnectOptions, size: u32, limit: Duration) -> Bounded {
        // A statement the node gave up on is ended by the server too, a little after, rather
        // than holding its locks and its work until it finishes.
        let ended = (limit + SERVER_GRACE).as_millis();
        let options = options.options([("statement_timeout", format!("{ended}ms"))]);
        let acquire = limit.min(MAX_ACQUIRE);
        // An idle connection that does not answer is given up in half the time a read may wait
        // for one, leaving the other half to connect anew.
        let check = acquire / 2;
        let lost = Lost::default();
        let recently = lost.clone();
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(acquire)
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let recently = recently.recent();
                Box::pin(async move {
                    if meta.idle_for < FRESH && !recently {
                        return Ok(true);
                    }
                    within(check, conn.ping()).await.map(|()| true)
                })
            })
            .after_release(move |conn, _| {
                Box::pin(async move {
                    // An answer says the connection is alive; `true` that the statement ran as
                    // the first of its own transaction. A transaction left open (a `BEGIN` cut
                    // short before sqlx counted it) began earlier: the connection is closed, not
                    // pooled, where the next statements would never commit.
                    let row = within(limit, sqlx::raw_sql(OUTSIDE).fetch_one(&mut *conn)).await?;
                    row.try_get::<bool, _>(0)
                })
            })
            .connect_lazy_with(options);
        Bounded { pool, limit, lost }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A connection of the pool, for statements run on it (bound them with [`within`]).
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        self.pool.acquire().await
    }

    /// A transaction on a connection of the pool (bound it with [`within`]).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        within(self.limit, self.pool.begin()).await
    }
}

impl<'p> Executor<'p> for &'_ Bounded {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let limit = self.limit;
        let lost = self.lost.clone();
        let rows = (&self.pool).fetch_many(query);
        futures::stream::unfold(Some(rows), move |rows| {
            let lost = lost.clone();
            async move {
                let mut rows = rows?;
                match tokio::time::timeout(limit, rows.next()).await {
                    Ok(Some(row)) => {
                        lost.note(&row);
                        Some((row, Some(rows)))
                    }
                    Ok(None) => None,
                    Err(_) => Some((Err(TimedOut(limit).into()), None)),
                }
            }
        })
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let (limit, lost) = (self.limit, self.lost.clone());
        let fetched = (&self.pool).fetch_optional(query);
        Box::pin(async move {
            let row = within(limit, fetched).await;
            lost.note(&row);
            row
        })
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> BoxFuture<'e, Result<sqlx::postgres::PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        Box::pin(within(
            self.limit,
            (&self.pool).prepare_with(sql, parameters),
        ))
    }

    fn describe<'e>(
        self,
        sql: sqlx::SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        Box::pin(within(self.limit, (&self.pool).describe(sql)))
    }
}
