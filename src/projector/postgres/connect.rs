//! Connection settings, the lazy pool, creating the database, and explaining connection failures.
//!
//! Nothing here connects at construction: dstore starts whatever the state of the server, and every
//! failure message names the setting to fix (`postgresql.host` / `POSTGRESQL_HOST` …).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::error::{describe, sqlstate, PgError};
use super::ident::quote;
use crate::config::PostgresSettings;

/// How long an operation waits for a connection before the attempt counts as failed (and is retried).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a direct connection attempt may take before the server counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub fn options(settings: &PostgresSettings) -> Result<PgConnectOptions, PgError> {
    let options = match &settings.url {
        Some(url) => PgConnectOptions::from_str(url.expose()).map_err(PgError::Url)?,
        None => {
            let mut options = PgConnectOptions::new()
                .host(&settings.host)
                .port(settings.port)
                .username(&settings.user)
                .database(&settings.database);
            if !settings.password.is_empty() {
                options = options.password(settings.password.expose());
            }
            options
        }
    };
    // Timestamps are written with an explicit offset; UTC here makes reads independent of the
    // server's configured time zone too. A transaction left idle (its process stopped or cut off
    // in the middle of a batch) is ended by the server, so the locks it holds on a version's
    // tables do not stall the node that took the batch over, nor a drop, until it comes back.
    // A lock held by someone else is waited for `lock_timeout_secs`, then the statement fails
    // (55P03) and only its project is held; a statement that runs far longer than any batch
    // takes is ended (57014) the same way. Literals in DDL (`ident::literal`) double quotes and
    // take backslashes as they are, which only `standard_conforming_strings` makes true.
    let lock_timeout = format!("{}s", settings.lock_timeout_secs);
    Ok(options
        .application_name("dstore")
        .options([
            ("TimeZone", "UTC"),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            ),
            ("lock_timeout", lock_timeout.as_str()),
            ("statement_timeout", STATEMENT_TIMEOUT),
            ("standard_conforming_strings", "on"),
        ])
        .disable_statement_logging())
}

/// The longest a projector's statement runs: a batch's statements take seconds at most.
const STATEMENT_TIMEOUT: &str = "10min";

/// How long the server lets a projector's transaction sit idle before it ends its session: far
/// longer than dstore ever pauses between the statements of a batch, which it sends one after
/// another.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

pub fn lazy_pool(options: &PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone())
}

/// `host:port/database`, for messages.
pub fn target(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// Connects once, outside the pool: `Err(None)` when the server does not answer in time.
pub async fn probe(options: &PgConnectOptions) -> Result<(), Option<sqlx::Error>> {
    match tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(error)) => Err(Some(error)),
        Err(_) => Err(None),
    }
}

/// Why the pool cannot connect (the pool itself only says it timed out).
pub async fn diagnose(options: &PgConnectOptions) -> String {
    match probe(options).await {
        Ok(()) => format!("postgresql at {} answers again", target(options)),
        Err(Some(error)) => explain(options, &error),
        Err(None) => no_answer(options),
    }
}

pub fn no_answer(options: &PgConnectOptions) -> String {
    format!(
        "no answer from postgresql at {} within {} seconds; check postgresql.host / POSTGRESQL_HOST and postgresql.port / POSTGRESQL_PORT",
        target(options),
        PROBE_TIMEOUT.as_secs()
    )
}

/// A connection failure in words that name the setting to fix.
pub fn explain(options: &PgConnectOptions, error: &sqlx::Error) -> String {
    let target = target(options);
    let code = sqlstate(error).unwrap_or_default();
    let hint = if code.starts_with("28") {
        "check postgresql.user / POSTGRESQL_USER and postgresql.password / POSTGRESQL_PASSWORD"
    } else if code == "3D000" {
        "dstore creates postgresql.database / POSTGRESQL_DATABASE when the user may (CREATEDB)"
    } else if matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
    ) {
        "check postgresql.host / POSTGRESQL_HOST and postgresql.port / POSTGRESQL_PORT, or postgresql.url"
    } else {
        "check the postgresql settings"
    };
    format!(
        "cannot use postgresql at {target}: {}; {hint}",
        describe(error)
    )
}

/// Creates the configured database through the `postgres` maintenance database (or `template1`).
pub async fn create_database(options: &PgConnectOptions) -> Result<(), String> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Err("no database is configured (postgresql.database / POSTGRESQL_DATABASE)".into());
    };
    let quoted = quote(&name).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for maintenance in ["postgres", "template1"] {
        let mut connection =
            match PgConnection::connect_with(&options.clone().database(maintenance)).await {
                Ok(connection) => connection,
                Err(error) => {
                    last = explain(options, &error);
                    continue;
                }
            };
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut connection)
            .await;
        let _ = connection.close().await;
        return match created {
            Ok(_) => {
                tracing::info!(database = %name, "created the postgresql database");
                Ok(())
            }
            // Someone else created it in the meantime.
            Err(error) if sqlstate(&error).as_deref() == Some("42P04") => Ok(()),
            Err(error) => Err(format!(
                "cannot create database {name:?}: {}",
                describe(&error)
            )),
        };
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A projector's connections carry the idle-transaction timeout: a stopped process's
    /// transaction does not hold its locks until it comes back.
    #[tokio::test]
    async fn a_projector_s_idle_transaction_is_ended_by_the_server() {
        let url = std::env::var("DSTORE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let settings = PostgresSettings {
            url: Some(format!("{}/postgres", url.trim_end_matches('/')).into()),
            ..PostgresSettings::default()
        };
        let pool = lazy_pool(&options(&settings).unwrap(), 1);
        let timeout: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(timeout, "30s");
        assert_eq!(
            sqlx::query_scalar::<_, String>("SHOW TimeZone")
                .fetch_one(&pool)
                .await
                .unwrap(),
            "UTC"
        );
    }
}
