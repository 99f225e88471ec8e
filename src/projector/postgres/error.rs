//! What a PostgreSQL failure means for dstore: retry later, refuse one row, or a missing structure.
//!
//! Classified by SQLSTATE class. Anything that is not clearly the row's fault is transient, so a
//! task is never dead-lettered because the server was down, restarting, overloaded or misconfigured:
//! it waits in the journal and the problem shows in `/_health/ready`.

use thiserror::Error;

use super::ident::NameError;
use crate::projector::ProjectorError;

#[derive(Debug, Error)]
pub enum PgError {
    #[error("invalid postgresql connection url (postgresql.url / DATABASE_URL): {0}")]
    Url(#[source] sqlx::Error),
    #[error(transparent)]
    Name(#[from] NameError),
}

impl From<NameError> for ProjectorError {
    fn from(error: NameError) -> ProjectorError {
        ProjectorError::permanent(error.to_string())
    }
}

/// What a failed statement means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The rows themselves are refused (bad data, a constraint): retrying them cannot help.
    Row,
    /// The schema or table is missing: the version has to be migrated (again).
    Missing,
    /// The database does not exist yet.
    NoDatabase,
    /// Connection loss, serialization failure, overload, shutdown, anything unknown: retry later.
    Transient,
}

/// The SQLSTATE of a database error, if the error came from the server.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

pub fn classify(error: &sqlx::Error) -> Failure {
    match sqlstate(error) {
        None => Failure::Transient,
        Some(code) if code == INTERNAL => {
            internal(error.as_database_error().map_or("", |e| e.message()))
        }
        Some(code) => classify_code(&code),
    }
}

/// PostgreSQL's internal error, which PostGIS raises too.
const INTERNAL: &str = "XX000";

/// What an internal error (XX000) means, by its message: PostGIS refusing a geometry it cannot
/// take is the row's fault; anything else — the server's own (a tuple updated concurrently by
/// another's DDL, a cache look-up that failed, a block it cannot read) — is retried, holding back
/// only its project (see [`is_scoped`]), rather than dead-lettering rows for a server's trouble.
fn internal(message: &str) -> Failure {
    // Not "ring": "during" and "string" hold it.
    const GEOMETRY: [&str; 10] = [
        "geometr",
        "lwgeom",
        "geos",
        "polygon",
        "linestring",
        "linearring",
        "coordinate",
        "postgis",
        "wkb",
        "endian",
    ];
    let message = message.to_ascii_lowercase();
    match GEOMETRY.iter().any(|word| message.contains(word)) {
        true => Failure::Row,
        false => Failure::Transient,
    }
}

/// Classes 22 (data exception), 23 (integrity constraint) and 54 (row too large) are the row's
/// fault (an internal error, XX000, only when its message names a geometry: [`classify`]). Classes
/// 08, 40, 53, 57, 58 and everything else are retried.
pub fn classify_code(code: &str) -> Failure {
    match code {
        "3F000" | "42P01" => Failure::Missing,
        "3D000" => Failure::NoDatabase,
        _ => match code.get(..2) {
            Some("22" | "23" | "54") => Failure::Row,
            _ => Failure::Transient,
        },
    }
}

/// PostgreSQL's own words: message, detail and SQLSTATE.
pub fn describe(error: &sqlx::Error) -> String {
    let (brief, detail) = (brief(error), detail(error));
    match detail {
        Some(detail) => format!("{brief} ({detail})"),
        None => brief,
    }
}

/// PostgreSQL's message and SQLSTATE, without its DETAIL, which may quote a row's values
/// (`Key (email)=(…) already exists`, `Failing row contains (…)`): what logs may carry.
pub fn brief(error: &sqlx::Error) -> String {
    match error.as_database_error() {
        Some(db) => match db.code() {
            Some(code) => format!("{} [sqlstate {code}]", db.message()),
            None => db.message().to_owned(),
        },
        None => error.to_string(),
    }
}

/// PostgreSQL's DETAIL of an error, if it gave one.
pub fn detail(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()?
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
        .detail()
        .map(str::to_owned)
}

/// A transient projector error with context: `what` failed because of `error`. Scoped (only the
/// project waits) when the server refused the statement for a cause that may be one table's own.
pub fn transient(what: &str, error: &sqlx::Error) -> ProjectorError {
    let message = format!("postgresql: {what}: {}", brief(error));
    let failed = match sqlstate(error) {
        Some(code) if is_scoped(&code) => ProjectorError::scoped(message),
        _ => ProjectorError::transient(message),
    };
    failed.with_detail(detail(error))
}

/// SQLSTATEs that may be about one table, not the server: insufficient privilege and other access
/// rule violations (class 42, but a missing table, which a migration makes again), a lock not
/// available or an object in use (55), a statement cancelled by its timeout (57014), and errors
/// raised by triggers and the routines they call (P0, 38, 39, 2F), and an internal error that
/// names no geometry (XX000: a tuple another's DDL updated, say). Connection loss, overload and
/// shutdown (08, 53, 57P0x) stall every project alike and are not scoped.
fn is_scoped(code: &str) -> bool {
    code != "42P01"
        && (code == "57014"
            || code == INTERNAL
            || matches!(code.get(..2), Some("42" | "55" | "P0" | "38" | "39" | "2F")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_constraint_errors_refuse_the_row_and_the_rest_is_retried() {
        for code in ["22001", "22P02", "23505", "23502", "54000"] {
            assert_eq!(classify_code(code), Failure::Row, "{code}");
        }
        for code in [
            "08006", "08001", "40001", "40P01", "53300", "57P01", "57014", "58030", "55P03",
            "42703",
        ] {
            assert_eq!(classify_code(code), Failure::Transient, "{code}");
        }
        assert_eq!(classify_code("3F000"), Failure::Missing);
        assert_eq!(classify_code("42P01"), Failure::Missing);
        assert_eq!(classify_code("3D000"), Failure::NoDatabase);
    }

    #[test]
    fn refusals_that_may_be_one_tables_own_hold_only_its_project() {
        for code in [
            "42501", "42703", "55P03", "55006", "57014", "P0001", "38000", "39P01", "XX000",
        ] {
            assert!(is_scoped(code), "{code}");
        }
        for code in [
            "08006", "40001", "40P01", "53100", "53300", "57P01", "58030", "42P01",
        ] {
            assert!(!is_scoped(code), "{code}");
        }
    }

    /// PostGIS's refusal of a geometry is the row's; the server's own internal errors are retried.
    #[test]
    fn an_internal_error_is_the_rows_only_when_it_names_a_geometry() {
        for message in [
            "lwgeom_intersection: GEOS Error: TopologyException: Input geom 0 is invalid",
            "geometry requires more points",
            "Invalid endian flag value encountered.",
            "WKB structure does not match expected size!",
            "Invalid polygon: ring is not closed",
        ] {
            assert_eq!(internal(message), Failure::Row, "{message}");
        }
        for message in [
            "tuple concurrently updated",
            "unexpected end of data during a string's conversion",
            "cache lookup failed for type 16384",
            "could not read block 7 in file \"base/5/16384\": read only 0 of 8192 bytes",
        ] {
            assert_eq!(internal(message), Failure::Transient, "{message}");
        }
    }

    #[test]
    fn errors_without_a_server_answer_are_transient() {
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Transient);
        assert_eq!(
            classify(&sqlx::Error::Io(
                std::io::ErrorKind::ConnectionRefused.into()
            )),
            Failure::Transient
        );
    }
}
