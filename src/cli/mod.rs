//! The client half of the `dstore` binary: the README's curl recipes as commands against a running
//! server (put a blueprint from a file, freeze, show versions and back-fill progress, put or delete an
//! item from a file).
//!
//! Everything goes through the public HTTP API, so the commands work against any server, local or
//! remote. Errors are the server's own JSON errors, printed field by field; a command exits with 0 on
//! success and 1 on any failure. Nothing here panics on a bad answer or a bad file.

mod args;
mod client;
mod keys;
mod render;

use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub use args::{BlueprintCommand, ClientCommand, ItemCommand, KeysCommand};
use client::{print_json, CliError, Client};
use render::{
    backfills_finished, describe_change, render_diff, render_progress_lines, render_report,
    render_versions,
};

/// Runs one client command; prints its result or its error.
pub fn run(command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dstore: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dstore: {}", client::terminal_safe(&error.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: ClientCommand) -> Result<(), CliError> {
    match command {
        ClientCommand::Blueprint {
            command,
            connection,
        } => {
            let client = Client::new(&connection)?;
            match command {
                BlueprintCommand::Put {
                    project,
                    blueprint,
                    file,
                } => blueprint_put(&client, &project, &blueprint, &file).await,
                BlueprintCommand::Get {
                    project,
                    blueprint,
                    version,
                } => {
                    let mut path = vec![project.as_str(), blueprint.as_str(), "_blueprint"];
                    let version = version.map(|v| v.to_string());
                    path.extend(version.as_deref());
                    let body = client.call(Method::GET, &path, &[], None).await?.1;
                    print_json(&body);
                    Ok(())
                }
                BlueprintCommand::Delete { project, blueprint } => {
                    let path = [project.as_str(), blueprint.as_str(), "_blueprint"];
                    let body = client.call(Method::DELETE, &path, &[], None).await?.1;
                    client.summary(&body, || {
                        format!("{project}/{blueprint}: removed from the working copy; `dstore freeze {project}` makes it a version")
                    });
                    Ok(())
                }
            }
        }
        ClientCommand::Freeze {
            project,
            dry_run,
            force,
            connection,
        } => freeze(&Client::new(&connection)?, &project, dry_run, force).await,
        ClientCommand::Diff {
            project,
            from,
            to,
            connection,
        } => {
            let client = Client::new(&connection)?;
            let (from, to) = (from.to_string(), to.to_string());
            let body = client
                .call(
                    Method::GET,
                    &[&project, "_diff"],
                    &[("from", &from), ("to", &to)],
                    None,
                )
                .await?
                .1;
            client.summary(&body, || render_diff(&body));
            Ok(())
        }
        ClientCommand::Versions {
            project,
            watch,
            timeout,
            connection,
        } => {
            let client = Client::new(&connection)?;
            versions(&client, project.as_deref(), watch, timeout).await
        }
        ClientCommand::Keys {
            command,
            connection,
        } => keys::run(&Client::new(&connection)?, command).await,
        ClientCommand::Changes {
            project,
            version,
            since,
            blueprint,
            follow,
            connection,
        } => {
            let client = Client::new(&connection)?;
            let mut query = vec![("since", since.to_string())];
            if let Some(version) = version {
                query.push(("version", version.to_string()));
            }
            if let Some(blueprint) = blueprint {
                query.push(("blueprint", blueprint));
            }
            if follow {
                follow_changes(&client, &project, query).await
            } else {
                print_changes(&client, &project, query).await
            }
        }
        ClientCommand::Item {
            command,
            connection,
        } => {
            let client = Client::new(&connection)?;
            match command {
                ItemCommand::Put {
                    project,
                    blueprint,
                    file,
                    wait,
                } => item_put(&client, &project, &blueprint, &file, wait).await,
                ItemCommand::Get {
                    project,
                    blueprint,
                    id,
                    version,
                } => {
                    let version = version.map(|v| v.to_string());
                    let query: Vec<(&str, &str)> =
                        version.iter().map(|v| ("version", v.as_str())).collect();
                    let path = [project.as_str(), blueprint.as_str(), id.as_str()];
                    let body = client.call(Method::GET, &path, &query, None).await?.1;
                    print_json(&body);
                    Ok(())
                }
                ItemCommand::Delete {
                    project,
                    blueprint,
                    id,
                    wait,
                } => {
                    let path = [project.as_str(), blueprint.as_str(), id.as_str()];
                    let query = wait_query(wait);
                    let (status, body) = client.call(Method::DELETE, &path, &query, None).await?;
                    client.summary(&body, || {
                        let what = if body["found"] == Value::Bool(false) {
                            "did not exist; nothing to delete"
                        } else {
                            "deleted"
                        };
                        format!(
                            "{project}/{blueprint}/{id}: {what} (revision {}){}",
                            body["revision"],
                            projection_note(status, &body)
                        )
                    });
                    Ok(())
                }
            }
        }
    }
}

async fn blueprint_put(
    client: &Client,
    project: &str,
    blueprint: &str,
    file: &Path,
) -> Result<(), CliError> {
    let definition = read_json(file)?;
    let path = [project, blueprint, "_blueprint"];
    let body = client
        .call(Method::PUT, &path, &[], Some(&definition))
        .await?
        .1;
    client.summary(&body, || {
        let changes = body["changes"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            return format!("{project}/{blueprint}: unchanged (the working copy already holds it)");
        }
        let mut out = format!(
            "{project}/{blueprint}: {} in the working copy; `dstore freeze {project}` makes {} a version",
            if changes.len() == 1 {
                "1 change".to_string()
            } else {
                format!("{} changes", changes.len())
            },
            if changes.len() == 1 { "it" } else { "them" }
        );
        for change in &changes {
            let _ = write!(out, "\n  {}", describe_change(change));
        }
        out
    });
    Ok(())
}

async fn item_put(
    client: &Client,
    project: &str,
    blueprint: &str,
    file: &Path,
    wait: bool,
) -> Result<(), CliError> {
    let item = read_json(file)?;
    let Some(fields) = item.as_object() else {
        return Err(CliError::Input(format!(
            "{} must hold one JSON object (an item), not {}",
            file.display(),
            dstore::blueprint::value::kind(&item)
        )));
    };
    let query = wait_query(wait);
    let (status, body) = match fields.get("id") {
        Some(Value::String(id)) => {
            client
                .call(Method::PUT, &[project, blueprint, id], &query, Some(&item))
                .await?
        }
        Some(other) => {
            return Err(CliError::Input(format!(
                "the \"id\" in {} must be a uuid string, not {}",
                file.display(),
                dstore::blueprint::value::kind(other)
            )))
        }
        None => {
            client
                .call(Method::POST, &[project, blueprint], &query, Some(&item))
                .await?
        }
    };
    client.summary(&body, || {
        let verb = if status == StatusCode::CREATED {
            "created"
        } else {
            "written"
        };
        format!(
            "{project}/{blueprint}/{}: {verb} (revision {}){}",
            body["id"].as_str().unwrap_or("?"),
            body["revision"],
            projection_note(status, &body)
        )
    });
    Ok(())
}

/// Asks every later page in the version the first answer came in, when no `--version` was given:
/// without one the server answers in the newest live version as of each request, so a freeze
/// while the feed is read would change the shape of what is printed half-way.
fn pin_version(query: &mut Vec<(&str, String)>, version: Option<u64>) {
    if let Some(version) = version.filter(|_| !query.iter().any(|(k, _)| *k == "version")) {
        query.push(("version", version.to_string()));
    }
}

/// `dstore changes` without --follow: every page until the feed has nothing more, all in one
/// version (see [`pin_version`]).
async fn print_changes(
    client: &Client,
    project: &str,
    mut query: Vec<(&str, String)>,
) -> Result<(), CliError> {
    loop {
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = client
            .call(Method::GET, &[project, "_changes"], &pairs, None)
            .await?
            .1;
        pin_version(&mut query, page["version"].as_u64());
        let results = page["results"].as_array().cloned().unwrap_or_default();
        let mut out = std::io::stdout().lock();
        for change in &results {
            let _ = writeln!(out, "{change}");
        }
        let Some(last) = page["last_revision"].as_u64() else {
            return Err(CliError::Transport(format!(
                "the answer has no last_revision, so this is not a dstore change feed: {}",
                dstore::blueprint::value::excerpt_str(&page.to_string())
            )));
        };
        let since = query
            .iter()
            .find(|(k, _)| *k == "since")
            .map(|(_, v)| v.clone());
        if results.is_empty() && since.as_deref() == Some(&last.to_string()) {
            return Ok(());
        }
        // The page's horizon goes back with its revision: a read from 0 goes on below it.
        query.retain(|(k, _)| *k != "since" && *k != "horizon");
        query.push(("since", last.to_string()));
        if let Some(horizon) = page["horizon"].as_u64() {
            query.push(("horizon", horizon.to_string()));
        }
    }
}

/// `dstore changes --follow`: the feed read as server-sent events, each change printed as an NDJSON
/// line; a dropped connection is opened again from the last event id, so nothing is missed or
/// printed twice. The id moves with heartbeats too (past changes a `--blueprint` filter hid) and
/// carries the horizon while a read from 0 is below it, so a reconnect goes on where a revision
/// alone would be refused as compacted. A reconnect asks for the version the first connection
/// was answered in (see [`pin_version`]). A 503, as an answer or as the reason a stream ended
/// (the server busy, its storage away for a moment), is waited out like a dropped connection;
/// any other refusal ends the command.
async fn follow_changes(
    client: &Client,
    project: &str,
    mut query: Vec<(&str, String)>,
) -> Result<(), CliError> {
    query.push(("feed", "sse".into()));
    let mut attempt = 0u32;
    loop {
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let waited_out = match client.open(&[project, "_changes"], &pairs).await {
            Ok(response) => Ok(response),
            Err(CliError::Transport(message)) => Err(message),
            Err(CliError::Server { status, body }) if status == StatusCode::SERVICE_UNAVAILABLE => {
                let why = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|b| b["status"].as_str().map(str::to_string))
                    .unwrap_or(body);
                Err(format!("503 {why}"))
            }
            Err(error) => return Err(error),
        };
        let mut response = match waited_out {
            Ok(response) => response,
            Err(why) => {
                attempt += 1;
                eprintln!("dstore: {}; trying again", client::terminal_safe(&why));
                tokio::time::sleep(Duration::from_secs(u64::from(attempt.min(10)))).await;
                continue;
            }
        };
        attempt = 0;
        let version = response
            .headers()
            .get("x-dstore-version")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        pin_version(&mut query, version);
        let mut events = SseEvents::default();
        let mut pending: Vec<u8> = Vec::new();
        'stream: loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) | Err(_) => break,
            };
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(event) = events.line(line.trim_end_matches(['\r', '\n'])) else {
                    continue;
                };
                if let Some(data) = &event.data {
                    let change: Value = serde_json::from_str(data).map_err(|_| {
                        CliError::Transport(format!("the feed sent data that is not JSON: {data}"))
                    })?;
                    if event.kind == "gone" || change["status"].is_string() {
                        let status = change["status"].as_str().unwrap_or("the feed ended");
                        if change["code"] == 503 {
                            eprintln!("dstore: {}; trying again", client::terminal_safe(status));
                            break 'stream;
                        }
                        return Err(CliError::Refused(status.to_string()));
                    }
                    println!("{data}");
                    let _ = std::io::stdout().flush();
                }
                // Only an event received whole moves the point a reconnect goes on from.
                if let Some(id) = event.id {
                    // `revision`, or `revision/horizon` below the horizon.
                    let (since, horizon) = id.split_once('/').unwrap_or((&id, ""));
                    query.retain(|(k, _)| *k != "since" && *k != "horizon");
                    query.push(("since", since.to_string()));
                    if !horizon.is_empty() {
                        query.push(("horizon", horizon.to_string()));
                    }
                }
            }
        }
        // The stream ended (the server stopped, cut it, or the connection dropped): what came of
        // an event not ended by its blank line is dropped and read again from the last whole one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The events of a server-sent event stream, read line by line as the format says: an event's
/// fields gather until the blank line that ends it, and only then is it handed out, so an event
/// cut short by a dropped connection is never shown, nor its id taken as read.
#[derive(Debug, Default)]
struct SseEvents {
    id: Option<String>,
    kind: String,
    data: Option<String>,
}

/// An event of [`SseEvents`]: its id if it had one (a heartbeat has only that), its `event:`
/// name (empty for a change) and its data.
#[derive(Debug, PartialEq)]
struct SseEvent {
    id: Option<String>,
    kind: String,
    data: Option<String>,
}

impl SseEvents {
    /// Takes one line (its end of line removed); the blank line ending an event hands it out.
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let event = SseEvent {
                id: self.id.take(),
                kind: std::mem::take(&mut self.kind),
                data: self.data.take(),
            };
            return (event.id.is_some() || event.data.is_some()).then_some(event);
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.id = Some(value.trim().to_string()),
            "event" => self.kind = value.to_string(),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            // A comment (a heartbeat's `: heartbeat`), `retry:`, a field the format ignores.
            _ => {}
        }
        None
    }
}

/// `dstore freeze`: the freeze, its dry run (the report as a table), or the report of a refusal.
async fn freeze(
    client: &Client,
    project: &str,
    dry_run: bool,
    force: bool,
) -> Result<(), CliError> {
    let query: &[(&str, &str)] = match (dry_run, force) {
        (true, _) => &[("dry_run", "true")],
        (false, true) => &[("force", "true")],
        (false, false) => &[],
    };
    match client
        .call(Method::POST, &[project, "_version"], query, None)
        .await
    {
        Ok((_, report)) if dry_run => {
            client.summary(&report, || render_report(&report));
            if report["allowed"] == false {
                return Err(CliError::Refused(format!(
                    "{project}: this freeze would be refused (values would be lost); declare conversions, \
                     set the project's compatibility to lossy_allowed, or freeze with --force"
                )));
            }
            Ok(())
        }
        Ok((_, body)) => {
            client.summary(&body, || {
                format!("{project}: frozen as version {}", body["project_version"])
            });
            Ok(())
        }
        Err(CliError::Server { status, body }) if status == StatusCode::CONFLICT => {
            // A refused freeze carries the report: show it before the error.
            if let Some(report) = serde_json::from_str::<Value>(&body)
                .ok()
                .filter(|b| b["report"].is_object())
            {
                client.summary(&report, || render_report(&report["report"]));
            }
            Err(CliError::Server { status, body })
        }
        Err(error) => Err(error),
    }
}

async fn versions(
    client: &Client,
    project: Option<&str>,
    watch: bool,
    timeout: Option<u64>,
) -> Result<(), CliError> {
    let path: Vec<&str> = match project {
        Some(project) => vec![project, "_version"],
        None => vec!["_version"],
    };
    let fetch = || async {
        let body = client.call(Method::GET, &path, &[], None).await?.1;
        Ok::<_, CliError>(match project {
            Some(_) => vec![body],
            None => body
                .as_object()
                .map(|all| all.values().cloned().collect())
                .unwrap_or_default(),
        })
    };
    let mut projects = fetch().await?;
    if client.json && !watch {
        print_json(&Value::Array(projects));
        return Ok(());
    }
    if !watch {
        print!("{}", render_versions(&projects));
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal() && !client.json;
    let started = Instant::now();
    let mut shown_lines = 0;
    let mut last_progress = String::new();
    loop {
        let finished = backfills_finished(&projects);
        if terminal {
            // Redraw the table in place.
            let table = render_versions(&projects);
            let mut out = std::io::stdout().lock();
            if shown_lines > 0 {
                let _ = write!(out, "\x1b[{shown_lines}A\x1b[J");
            }
            let _ = write!(out, "{table}");
            let _ = out.flush();
            shown_lines = table.lines().count();
        } else if !finished {
            let progress = render_progress_lines(&projects);
            if progress != last_progress {
                print!("{progress}");
                let _ = std::io::stdout().flush();
                last_progress = progress;
            }
        }
        if finished {
            if client.json {
                print_json(&Value::Array(projects));
            } else if !terminal {
                print!("{}", render_versions(&projects));
            }
            return Ok(());
        }
        if let Some(limit) = timeout {
            if started.elapsed() >= Duration::from_secs(limit) {
                return Err(CliError::Transport(format!(
                    "back-fills still running after {limit} s:\n{}",
                    render_progress_lines(&projects).trim_end()
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        projects = fetch().await?;
    }
}

/// What a write's answer says beyond its revision: the versions its item is not in, a store that
/// refused it for good, the stores still behind (with `--wait`).
fn projection_note(status: StatusCode, body: &Value) -> String {
    let mut note = String::new();
    if let Some(versions) = body["not_in_versions"].as_array() {
        let versions: Vec<String> = versions.iter().map(Value::to_string).collect();
        note.push_str(&format!(
            "; not in version {}, which allows no null where it has none (GET it there for the column)",
            versions.join(", ")
        ));
    }
    if let Some(refused) = body["refused"].as_array().filter(|r| !r.is_empty()) {
        let stores: Vec<&str> = refused
            .iter()
            .filter_map(|r| r["projector"].as_str())
            .collect();
        note.push_str(&format!(
            "; refused for good by {} (a dead letter with the reason: GET /_dead_letters; retried by POST /_dead_letters/_retry once fixed)",
            stores.join(", ")
        ));
    }
    if status == StatusCode::ACCEPTED {
        note.push_str(&format!(
            "; not yet in every store (still pending: {}), it stays safely queued",
            body["pending"]
        ));
    } else if body["projected"] == true {
        note.push_str("; in every store");
    } else if body["projected"] == false && body.get("refused").is_none() {
        // Every store settled it, but which refused it could not be read.
        note.push_str("; whether every store took it is not known (see GET /_dead_letters)");
    }
    note
}

fn wait_query(wait: bool) -> Vec<(&'static str, &'static str)> {
    if wait {
        vec![("wait", "true")]
    } else {
        Vec::new()
    }
}

/// The most of an input file read: more than any request body the server takes.
const MAX_INPUT_BYTES: u64 = 64 << 20;

fn read_json(file: &Path) -> Result<Value, CliError> {
    let mut text = String::new();
    let source: Box<dyn Read> = if file == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(file)
                .map_err(|e| CliError::Input(format!("cannot read {}: {e}", file.display())))?,
        )
    };
    source
        .take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", file.display())))?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(CliError::Input(format!(
            "{} is larger than {} MiB, more than the server takes in one request",
            file.display(),
            MAX_INPUT_BYTES >> 20
        )));
    }
    serde_json::from_str(&text)
        .map_err(|e| CliError::Input(format!("{} is not valid JSON: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_summary_says_what_its_answer_says_beyond_the_revision() {
        let note = |status, body: Value| projection_note(status, &body);
        assert_eq!(note(StatusCode::OK, serde_json::json!({})), "");
        assert_eq!(
            note(StatusCode::OK, serde_json::json!({"projected": true})),
            "; in every store"
        );
        let left_out = note(
            StatusCode::OK,
            serde_json::json!({"projected": true, "not_in_versions": [2, 3]}),
        );
        assert!(left_out.starts_with("; not in version 2, 3,"), "{left_out}");
        assert!(left_out.ends_with("; in every store"), "{left_out}");
        // A refusal is not a store still behind.
        let refused = note(
            StatusCode::OK,
            serde_json::json!({"projected": false,
                "refused": [{"projector": "postgresql", "revision": 4, "reason": "duplicate key"}]}),
        );
        assert!(
            refused.contains("refused for good by postgresql") && !refused.contains("pending"),
            "{refused}"
        );
        let behind = note(
            StatusCode::ACCEPTED,
            serde_json::json!({"projected": false, "pending": ["elasticsearch"]}),
        );
        assert!(
            behind.contains("still pending: [\"elasticsearch\"]"),
            "{behind}"
        );
        let unknown = note(StatusCode::OK, serde_json::json!({"projected": false}));
        assert!(unknown.contains("not known"), "{unknown}");
    }

    #[test]
    fn the_feed_is_read_on_in_the_version_of_its_first_answer_unless_one_was_asked() {
        let mut query = vec![("since", "0".to_string())];
        super::pin_version(&mut query, None);
        assert_eq!(query.len(), 1, "an answer without a version pins nothing");
        super::pin_version(&mut query, Some(1));
        super::pin_version(&mut query, Some(2));
        assert_eq!(
            query,
            vec![("since", "0".to_string()), ("version", "1".to_string())]
        );
        let mut asked = vec![("version", "3".to_string())];
        super::pin_version(&mut asked, Some(4));
        assert_eq!(asked, vec![("version", "3".to_string())]);
    }

    /// Only the blank line ending an event hands it out: an event cut short is never shown, and
    /// its id is never taken as the point to go on from. A heartbeat's id alone moves it.
    #[test]
    fn an_event_counts_only_once_its_blank_line_arrived() {
        let mut events = SseEvents::default();
        let mut out = Vec::new();
        for line in "id: 41\ndata: {\"revision\":41}\n\nid: 42\n: heartbeat\n\nretry: 5\nid: 43/7\ndata: {\"revi"
            .split('\n')
        {
            out.extend(events.line(line));
        }
        assert_eq!(
            out,
            [
                SseEvent {
                    id: Some("41".into()),
                    kind: String::new(),
                    data: Some("{\"revision\":41}".into())
                },
                SseEvent {
                    id: Some("42".into()),
                    kind: String::new(),
                    data: None
                },
            ]
        );
        let mut gone = SseEvents::default();
        for line in ["event: gone", "data:{\"code\":503}", "data: x"] {
            assert_eq!(gone.line(line), None);
        }
        assert_eq!(
            gone.line(""),
            Some(SseEvent {
                id: None,
                kind: "gone".into(),
                data: Some("{\"code\":503}\nx".into())
            })
        );
        assert_eq!(gone.line(""), None, "an empty event is nothing");
    }
}
