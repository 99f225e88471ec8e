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

/// `text` with every character a terminal would act on written out instead (`\u{1b}`): control
/// characters other than newline and tab, and the bidirectional overrides that reorder what
/// follows. Key names, descriptions and the server's messages are free text: printed raw, one
/// could move the cursor, recolour or hide the lines after it.
pub(super) fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let acts = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(acts) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if acts(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
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
    /// `--read-timeout`, in seconds.
    read_timeout: u64,
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
        // A server that accepts and never answers (stuck, or another program on the port) is
        // given up on after the read time-out instead of hanging the command for ever. A
        // followed feed sends a heartbeat at least every 300 s, below the least sensible value.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(connection.read_timeout))
            .build()
            .map_err(|e| CliError::Transport(format!("cannot build the HTTP client: {e}")))?;
        // The key travels in a header as `Bearer <key>`: one with a space, a control or a
        // non-ASCII character inside cannot be sent (and is no key dstore makes). The key itself
        // is never printed.
        let api_key = connection
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty());
        if api_key.is_some_and(|k| !k.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(CliError::Input(
                "--api-key (DSTORE_API_KEY) holds a space, a control character or a non-ASCII \
                 one: API keys are visible ASCII; check how it was copied"
                    .into(),
            ));
        }
        Ok(Client {
            base,
            http,
            json: connection.json,
            api_key: api_key.map(str::to_string),
            read_timeout: connection.read_timeout,
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
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            self.silent(&e).unwrap_or_else(|| {
                CliError::Transport(format!(
                    "{method} {url}: the answer could not be read: {}",
                    root_cause(&e)
                ))
            })
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

    /// The error for a request that got no answer: the server is not there, or sent nothing.
    fn unreachable(&self, error: &reqwest::Error) -> CliError {
        self.silent(error).unwrap_or_else(|| {
            CliError::Transport(format!(
                "cannot reach the dstore server at {}: {}; is it running? (set --server or DSTORE_SERVER)",
                self.base,
                root_cause(error)
            ))
        })
    }

    /// The error for a request the server sent nothing to for `--read-timeout`.
    fn silent(&self, error: &reqwest::Error) -> Option<CliError> {
        error.is_timeout().then(|| {
            CliError::Transport(format!(
                "the server at {} sent nothing for {} s (--read-timeout, DSTORE_READ_TIMEOUT): it \
                 may be overloaded or stuck (see its /_health), or another program listens there",
                self.base, self.read_timeout
            ))
        })
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
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
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
            println!("{}", terminal_safe(&summary()));
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
            read_timeout: 600,
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

    /// A server that accepts the connection and never answers is given up on, saying so.
    #[tokio::test]
    async fn a_server_that_never_answers_is_given_up_on_after_the_read_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(socket, _)| socket));
        let client = Client::new(&Connection {
            server: format!("http://{address}"),
            json: false,
            api_key: None,
            read_timeout: 1,
        })
        .unwrap();
        let started = std::time::Instant::now();
        let answer = client.call(Method::GET, &["_version"], &[], None).await;
        match answer {
            Err(CliError::Transport(message)) => {
                assert!(message.contains("sent nothing for 1 s"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(held.join());
    }

    #[test]
    fn what_a_terminal_would_act_on_is_written_out() {
        assert_eq!(terminal_safe("plain\nline\ttab é"), "plain\nline\ttab é");
        assert_eq!(
            terminal_safe("a\u{1b}[2Jb\u{202e}c\r\u{7f}"),
            "a\\u{1b}[2Jb\\u{202e}c\\u{d}\\u{7f}"
        );
    }

    #[test]
    fn an_api_key_no_header_could_carry_is_refused_before_sending() {
        let with = |key: &str| {
            Client::new(&Connection {
                server: "http://127.0.0.1:2020".into(),
                json: false,
                api_key: Some(key.into()),
                read_timeout: 600,
            })
        };
        for key in [
            "with a space",
            "tab\tinside",
            "caf\u{e9}-key",
            "nul\0key",
            "esc\u{1b}[0m",
        ] {
            match with(key) {
                Err(CliError::Input(message)) => {
                    assert!(message.contains("visible ASCII"), "{message}");
                    assert!(!message.contains(key), "the key is never printed");
                }
                Err(other) => panic!("{key:?}: {other}"),
                Ok(_) => panic!("{key:?} was accepted"),
            }
        }
        let client = with("  padded-0123456789abcdef\r\n").expect("surrounding space is trimmed");
        assert_eq!(client.api_key.as_deref(), Some("padded-0123456789abcdef"));
        assert!(with("").unwrap().api_key.is_none());
    }
}
