//! `Query<T>`: a query string read into `T`, whose refusal names the parameter at fault.
//!
//! actix's own `web::Query` answers a malformed value with the decoder's words alone ("invalid
//! digit found in string"), which say neither which parameter nor what it should be. This one,
//! when the whole query string does not read, finds the parameter whose value does not: the first
//! one without which the rest reads. That runs only on the refusal path; a query string that reads
//! costs what `web::Query` costs.

use std::future::{ready, Ready};
use std::ops::Deref;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest};
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct Query<T>(pub T);

/// The query of a route that takes no parameters: any parameter is refused (400, naming it), so a
/// mistyped or imagined option (`DELETE /{project}/_project?dry_run=true`) never passes silently.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The extractor of a route without parameters (see [`NoParams`]).
pub type NoQuery = Query<NoParams>;

impl<T> Deref for Query<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(read(request.query_string()).map(Query))
    }
}

/// Pairs of a query string tried alone to find the one at fault.
const MAX_ALONE: usize = 256;

/// `T` from a query string, or a 400 naming the parameter whose value it cannot read.
pub fn read<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let error = match serde_urlencoded::from_str::<T>(query) {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    let pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    // At most a few dozen pairs are tried; a longer query string is named as a whole.
    let culprit = (pairs.len() <= 32)
        .then(|| {
            (0..pairs.len()).find(|&i| {
                let rest: Vec<&str> = pairs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect();
                serde_urlencoded::from_str::<T>(&rest.join("&")).is_ok()
            })
        })
        .flatten();
    match culprit {
        Some(i) => {
            let (name, value) = pairs[i].split_once('=').unwrap_or((pairs[i], ""));
            let name = crate::blueprint::value::excerpt_str(&decoded(name));
            let message = match unknown(&error.to_string()) {
                Some(takes) => format!("{name} is not a parameter of this route; {takes}"),
                None => format!(
                    "{name}={:?} is not valid: {error}",
                    crate::blueprint::value::excerpt_str(&decoded(value))
                ),
            };
            Err(ApiError::bad_request(&name, message))
        }
        None => {
            // A parameter the route needs and the query leaves out, or one it repeats, where no
            // single pair is at fault, is named by serde alone.
            let message = error.to_string();
            let named = |prefix: &str| {
                message
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix('`'))
                    .map(crate::blueprint::value::excerpt_str)
            };
            if let Some(name) = named("missing field `") {
                Err(ApiError::bad_request(
                    &name,
                    format!("{name} is required on this route"),
                ))
            } else if let Some(name) = named("duplicate field `") {
                Err(ApiError::bad_request(
                    &name,
                    format!("{name} is given more than once"),
                ))
            } else if let (Some(takes), Some((name, _))) = (
                unknown(&message),
                message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split_once('`')),
            ) {
                // A query too long to try pair by pair.
                let name = crate::blueprint::value::excerpt_str(name);
                Err(ApiError::bad_request(
                    &name,
                    format!("{name} is not a parameter of this route; {takes}"),
                ))
            } else if let Some((name, value, error)) =
                pairs.iter().take(MAX_ALONE).find_map(|pair| {
                    // Each pair alone: one whose value is refused whatever else is sent (a value
                    // repeated, or a query too long to try without each pair) is named.
                    let error = serde_urlencoded::from_str::<T>(pair).err()?.to_string();
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (!error.starts_with("missing field `")).then_some((name, value, error))
                })
            {
                let name = crate::blueprint::value::excerpt_str(&decoded(name));
                Err(ApiError::bad_request(
                    &name,
                    format!(
                        "{name}={:?} is not valid: {error}",
                        crate::blueprint::value::excerpt_str(&decoded(value))
                    ),
                ))
            } else {
                Err(ApiError::bad_request(
                    "",
                    format!("invalid query string: {message}"),
                ))
            }
        }
    }
}

/// What a route takes, from serde's refusal of an unknown field ("unknown field `x`, expected one
/// of `a`, `b`" or "…, there are no fields"); `None` for any other refusal.
pub(super) fn unknown(error: &str) -> Option<String> {
    let rest = error.strip_prefix("unknown field `")?;
    let (_, rest) = rest.split_once("`, ")?;
    Some(if rest == "there are no fields" {
        "it takes none".to_string()
    } else {
        let names = rest
            .trim_start_matches("expected one of ")
            .trim_start_matches("expected ")
            .replace('`', "");
        format!("it takes {names}")
    })
}

fn decoded(text: &str) -> String {
    form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Params {
        limit: Option<u32>,
        dry_run: Option<bool>,
        name: Option<String>,
    }

    /// A value that does not read is named by its parameter; a good query string reads as
    /// `web::Query` reads it.
    #[test]
    fn the_parameter_at_fault_is_named() {
        let long = std::iter::once("limit=abc".to_string())
            .chain((0..40).map(|_| "dry_run=true".to_string()))
            .collect::<Vec<_>>()
            .join("&");
        let params: Params = read("limit=5&dry_run=true&name=a%20b").unwrap();
        assert_eq!(
            (params.limit, params.dry_run, params.name.as_deref()),
            (Some(5), Some(true), Some("a b"))
        );
        for (query, name) in [
            ("limit=abc", "limit"),
            ("name=x&dry_run=yes", "dry_run"),
            ("limit=99999999999&name=x", "limit"),
            ("l%69mit=-1", "limit"),
            // Repeated, neither copy alone is at fault; past 32 pairs none is tried without.
            ("limit=abc&limit=abc", "limit"),
            (&long, "limit"),
        ] {
            let ApiError::BadRequest(message, errors) = read::<Params>(query).unwrap_err() else {
                panic!("a 400 for {query}");
            };
            assert_eq!(errors[0].path, name, "{query}: {message}");
            assert!(message.starts_with(&format!("{name}=")), "{message}");
        }
    }

    /// A parameter the route needs and the query leaves out is named.
    #[test]
    fn a_missing_parameter_is_named() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            from: u32,
            to: u32,
        }
        for query in ["from=1", "from=1&from=2", ""] {
            let Err(ApiError::BadRequest(message, errors)) = read::<Needs>(query) else {
                panic!("a 400 for {query:?}");
            };
            let expected = if query.is_empty() { "from" } else { "to" };
            if query == "from=1&from=2" {
                // A repeated parameter is the fault named first.
                assert_eq!(errors[0].path, "from", "{message}");
            } else {
                assert_eq!(errors[0].path, expected, "{query:?}: {message}");
                assert_eq!(message, format!("{expected} is required on this route"));
            }
        }
    }

    /// A query string too long to try pair by pair still names a parameter the route does not
    /// take.
    #[test]
    fn an_unknown_parameter_in_a_long_query_is_named() {
        let query: Vec<String> = (0..40).map(|i| format!("p{i}=1")).collect();
        let Err(ApiError::BadRequest(message, errors)) = read::<NoParams>(&query.join("&")) else {
            panic!("a 400");
        };
        assert_eq!(errors[0].path, "p0", "{message}");
    }

    /// A parameter a route does not take is named, with those it takes.
    #[test]
    fn an_unknown_parameter_is_named_with_those_the_route_takes() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Known {
            limit: Option<u32>,
            dry_run: Option<bool>,
        }
        let Err(ApiError::BadRequest(message, errors)) = read::<Known>("limit=5&lmit=6") else {
            panic!("a 400");
        };
        assert_eq!(errors[0].path, "lmit");
        assert_eq!(
            message,
            "lmit is not a parameter of this route; it takes limit or dry_run"
        );
    }

    /// A route without parameters refuses any, naming it, and takes an empty query string.
    #[test]
    fn a_route_without_parameters_refuses_any() {
        assert!(read::<NoParams>("").is_ok());
        for (query, name) in [("dry_run=true", "dry_run"), ("force", "force")] {
            let Err(ApiError::BadRequest(message, errors)) = read::<NoParams>(query) else {
                panic!("a 400 for {query}");
            };
            assert_eq!(errors[0].path, name, "{query}");
            assert_eq!(
                message,
                format!("{name} is not a parameter of this route; it takes none")
            );
        }
    }
}
