//! The HTTP side of the client commands: URLs built segment by segment (so names are escaped), every
//! non-2xx answer turned into [`CliError::Server`], and errors worded for the terminal.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::args::Connection;

/// Why a command failed; printed as `dstore: <message>`.
#[derive(Debug)]
pub(super) enum CliError {
    /// Bad input on our side: a file, an argument.
    Input(String),
    /// The server could not be reached or answered something unreadable.
    Transport(String),
    /// The server answered with an error status.
    Server { status: StatusCode, body: String },
    /// The server would refuse what was asked (a dry run's verdict); the report was printed.
    Refused(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Input(message)
            | CliError::Transport(message)
            | CliError::Refused(message) => f.write_str(message),
            CliError::Server { status, body } => {
                write!(f, "the server answered {status}")?;
                match serde_json::from_str::<Value>(body) {
                    Ok(json) => {
                        if let Some(what) = json["status"].as_str() {
                            write!(f, ": {what}")?;
                        }
                        for error in json["errors"].as_array().into_iter().flatten() {
                            let path = error["path"].as_str().unwrap_or_default();
                            let message = error["message"].as_str().unwrap_or_default();
                            if path.is_empty() {
                                write!(f, "\n  {message}")?;
                            } else {
                                write!(f, "\n  {path}: {message}")?;
                            }
                        }
                        Ok(())
                    }
                    Err(_) if body.trim().is_empty() => Ok(()),
                    Err(_) => write!(f, ": {}", shorten(body.trim(), 500)),
                }
            }
        }
    }
}

pub(super) fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A thin HTTP client: builds URLs segment by segment (so names are escaped), and turns every
/// non-2xx answer into [`CliError::Server`].
pub(super) struct Client {
    base: Url,
    http: reqwest::Client,
    pub(super) json: bool,
    api_key: Option<String>,
}

impl Client {
    pub(super) fn new(connection: &Connection) -> Result<Client, CliError> {
        let base = Url::parse(&connection.server)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| {
                CliError::Input(format!(
                    "--server {:?} is not an http(s) URL such as http://127.0.0.1:2020",
                    connection.server
                ))
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            base,
            http,
            json: connection.json,
            api_key: connection.api_key.clone().filter(|k| !k.is_empty()),
        })
    }

    /// The URL of a path of `segments` (each escaped as one segment). An empty, `.` or `..` name is
    /// refused: a URL drops such segments, and the request would reach another route.
    pub(super) fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url, CliError> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            return Err(CliError::Input(format!(
                "{bad:?} is not a name: project, blueprint, item and key names are never empty, \
                 . or .."
            )));
        }
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// Sends one request; a 2xx answer's status and JSON body, or the error.
    pub(super) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), CliError> {
        let url = self.url(segments, query)?;
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            CliError::Transport(format!(
                "cannot reach the dstore server at {}: {}; is it running? (set --server or DSTORE_SERVER)",
                self.base,
                root_cause(&e)
            ))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            CliError::Transport(format!(
                "{method} {url}: the answer could not be read: {}",
                root_cause(&e)
            ))
        })?;
        if !status.is_success() {
            return Err(CliError::Server { status, body: text });
        }
        let body = serde_json::from_str(&text).map_err(|_| {
            CliError::Transport(format!(
                "{method} {url}: the answer is not JSON (is {} a dstore server?): {}",
                self.base,
                shorten(text.trim(), 200)
            ))
        })?;
        Ok((status, body))
    }

    /// Starts a GET whose answer is read as it arrives (a stream); a non-2xx answer is the error.
    pub(super) async fn open(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, CliError> {
        let mut request = self.http.get(self.url(segments, query)?);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| {
            CliError::Transport(format!(
                "cannot reach the dstore server at {}: {}",
                self.base,
                root_cause(&e)
            ))
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(CliError::Server { status, body });
        }
        Ok(response)
    }

    /// Prints the raw answer with --json, or the summary otherwise.
    pub(super) fn summary(&self, body: &Value, summary: impl FnOnce() -> String) {
        if self.json {
            print_json(body);
        } else {
            println!("{}", summary());
        }
    }
}

pub(super) fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// The innermost cause of an error, e.g. `Connection refused (os error 111)`: reqwest's outer layers
/// only repeat the URL.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_errors_list_every_field() {
        let error = CliError::Server {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: json!({"status": "invalid item", "errors": [
                {"path": "/title", "message": "expected a string"},
                {"path": "", "message": "unknown key"}
            ]})
            .to_string(),
        };
        assert_eq!(
            error.to_string(),
            "the server answered 422 Unprocessable Entity: invalid item\n  /title: expected a string\n  unknown key"
        );
    }

    #[test]
    fn names_are_escaped_into_single_path_segments() {
        let client = Client::new(&Connection {
            server: "http://127.0.0.1:2020/".into(),
            json: false,
            api_key: None,
        })
        .unwrap();
        let url = client
            .url(&["my/blog", "_version"], &[("wait", "true")])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:2020/my%2Fblog/_version?wait=true"
        );
    }
}
