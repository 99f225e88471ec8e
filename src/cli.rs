//! The client half of the `dstore` binary: the README's curl recipes as commands against a running
//! server (put a blueprint from a file, freeze, show versions and back-fill progress, put or delete an
//! item from a file).
//!
//! Everything goes through the public HTTP API, so the commands work against any server, local or
//! remote. Errors are the server's own JSON errors, printed field by field; a command exits with 0 on
//! success and 1 on any failure. Nothing here panics on a bad answer or a bad file.

use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// Where the server is, and how to print its answers. Shared by every client command.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Base URL of the dstore server.
    #[arg(
        long,
        env = "DSTORE_SERVER",
        default_value = "http://127.0.0.1:2020",
        global = true
    )]
    server: String,
    /// Print the server's JSON answer as it is instead of a summary.
    #[arg(long, global = true)]
    json: bool,
}

/// The commands that talk to a running server.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Put, show or remove a blueprint in a project's working copy (on a running server).
    Blueprint {
        #[command(subcommand)]
        command: BlueprintCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Freeze a project's working copy as its next version (on a running server).
    Freeze {
        /// The project, e.g. `myblog`.
        project: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show versions, migrations and back-fill progress (of one project, or of all).
    Versions {
        /// The project; all projects when omitted.
        project: Option<String>,
        /// Keep showing progress until every back-fill has finished.
        #[arg(long, short)]
        watch: bool,
        /// With --watch: give up (exit 1) after this many seconds.
        #[arg(long, value_name = "SECONDS", requires = "watch")]
        timeout: Option<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Put, show or delete an item (on a running server).
    Item {
        #[command(subcommand)]
        command: ItemCommand,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand, Debug)]
pub enum BlueprintCommand {
    /// Put a blueprint from a JSON file (`-` reads standard input) into the working copy.
    Put {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A JSON file with the blueprint's definition, or `-` for standard input.
        file: PathBuf,
    },
    /// Print a blueprint as JSON: the working copy, or as frozen in --version.
    Get {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A frozen version instead of the working copy.
        #[arg(long, short)]
        version: Option<u32>,
    },
    /// Remove a blueprint from the working copy (takes effect at the next freeze).
    Delete {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ItemCommand {
    /// Write an item from a JSON file (`-` reads standard input). Its `id` names the item; without
    /// one the server generates it.
    Put {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A JSON file with one item (with `project_version`), or `-` for standard input.
        file: PathBuf,
        /// Answer only once every store has the write.
        #[arg(long)]
        wait: bool,
    },
    /// Print an item as JSON, as a client of --version sees it (default: the newest version).
    Get {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// The item's uuid.
        id: String,
        /// The version whose clients' view to show.
        #[arg(long, short)]
        version: Option<u32>,
    },
    /// Delete an item from every store and version (a missing item is not an error).
    Delete {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// The item's uuid.
        id: String,
        /// Answer only once every store has the delete.
        #[arg(long)]
        wait: bool,
    },
}

/// Why a command failed; printed as `dstore: <message>`.
#[derive(Debug)]
enum CliError {
    /// Bad input on our side: a file, an argument.
    Input(String),
    /// The server could not be reached or answered something unreadable.
    Transport(String),
    /// The server answered with an error status.
    Server { status: StatusCode, body: String },
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Input(message) | CliError::Transport(message) => f.write_str(message),
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
            eprintln!("dstore: {error}");
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
            connection,
        } => {
            let client = Client::new(&connection)?;
            let body = client
                .call(Method::POST, &[&project, "_version"], &[], None)
                .await?
                .1;
            client.summary(&body, || {
                format!("{project}: frozen as version {}", body["project_version"])
            });
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
            kind_of(&item)
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
                kind_of(other)
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

fn backfills_finished(projects: &[Value]) -> bool {
    projects.iter().all(|p| {
        versions_of(p).all(|v| v["backfill"].is_null() || v["backfill"]["finished"] == true)
    })
}

fn versions_of(project: &Value) -> impl Iterator<Item = &Value> {
    project["versions"].as_array().into_iter().flatten()
}

/// The versions of each project, with migrations and back-fill progress bars.
fn render_versions(projects: &[Value]) -> String {
    let mut out = String::new();
    if projects.is_empty() {
        out.push_str("no projects yet\n");
    }
    for project in projects {
        let name = project["project"].as_str().unwrap_or("?");
        match project["project_version"].as_u64() {
            Some(newest) => {
                let _ = writeln!(out, "{name}: newest version {newest}");
            }
            None => {
                let _ = writeln!(out, "{name}: no frozen version yet");
            }
        }
        for version in versions_of(project) {
            let blueprints: Vec<&str> = version["blueprints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let _ = writeln!(
                out,
                "  version {}{}  frozen {}  blueprints: {}",
                version["project_version"],
                if version["retired"] == true {
                    " (retired)"
                } else {
                    ""
                },
                version["frozen_at"].as_str().unwrap_or("?"),
                if blueprints.is_empty() {
                    "none".to_string()
                } else {
                    blueprints.join(", ")
                }
            );
            let migrations: Vec<String> = version["migrations"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(store, state)| match state["error"].as_str() {
                    Some(error) => format!("{store} failed ({error})"),
                    None => format!("{store} {}", state["state"].as_str().unwrap_or("?")),
                })
                .collect();
            let changes: Vec<String> = version["changes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(describe_change)
                .collect();
            if !changes.is_empty() {
                let _ = writeln!(out, "    changes: {}", summarize(&changes, 3));
            }
            if !migrations.is_empty() {
                let _ = writeln!(out, "    migrations: {}", migrations.join(", "));
            }
            if let Some(bar) = backfill_bar(&version["backfill"]) {
                let _ = writeln!(out, "    back-fill:  {bar}");
            }
        }
        let edits = project["unfrozen_changes"].as_array().map_or(0, Vec::len);
        if edits > 0 {
            let _ = writeln!(
                out,
                "  working copy: {edits} unfrozen edit{} (`dstore freeze {name}`)",
                if edits == 1 { "" } else { "s" }
            );
        }
    }
    out
}

/// One line per unfinished back-fill, for output that is not a terminal.
fn render_progress_lines(projects: &[Value]) -> String {
    let mut out = String::new();
    for project in projects {
        for version in versions_of(project) {
            let backfill = &version["backfill"];
            if backfill.is_null() || backfill["finished"] == true {
                continue;
            }
            if let Some(bar) = backfill_bar(backfill) {
                let _ = writeln!(
                    out,
                    "{} version {} back-fill: {bar}",
                    project["project"].as_str().unwrap_or("?"),
                    version["project_version"]
                );
            }
        }
    }
    out
}

/// `[#########...........]  45%  450/1000 items`, or None when the version has no back-fill.
fn backfill_bar(backfill: &Value) -> Option<String> {
    if backfill.is_null() {
        return None;
    }
    let total = backfill["total"].as_u64().unwrap_or(0);
    let finished = backfill["finished"] == true;
    let done = if finished {
        total
    } else {
        backfill["done"].as_u64().unwrap_or(0).min(total)
    };
    let ratio = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    const WIDTH: usize = 30;
    let filled = ((ratio * WIDTH as f64).round() as usize).min(WIDTH);
    Some(format!(
        "[{}{}] {:>3}%  {done}/{total} items{}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        (ratio * 100.0).floor() as u64,
        if finished { ", finished" } else { "" }
    ))
}

/// A change of the change log in one line, e.g. `column.rename article.title -> headline`.
fn describe_change(change: &Value) -> String {
    let kind = change["kind"].as_str().unwrap_or("change");
    let blueprint = change["blueprint"].as_str().unwrap_or("?");
    let text = |key: &str| match &change[key] {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    };
    match kind {
        "column.rename" => format!("{kind} {blueprint}.{} -> {}", text("from"), text("to")),
        "column.update" => format!(
            "{kind} {blueprint}.{} {}: {} -> {}",
            text("column"),
            text("option"),
            text("from"),
            text("to")
        ),
        "blueprint.update" => format!(
            "{kind} {blueprint} {}: {} -> {}",
            text("option"),
            text("from"),
            text("to")
        ),
        _ if change.get("column").is_some() => format!("{kind} {blueprint}.{}", text("column")),
        _ => format!("{kind} {blueprint}"),
    }
}

/// The first `shown` entries, then how many more.
fn summarize(entries: &[String], shown: usize) -> String {
    let mut text = entries[..entries.len().min(shown)].join(", ");
    if entries.len() > shown {
        let _ = write!(text, " and {} more", entries.len() - shown);
    }
    text
}

fn projection_note(status: StatusCode, body: &Value) -> String {
    if status == StatusCode::ACCEPTED || body["projected"] == false {
        format!(
            "; not yet in every store (still pending: {}), it stays safely queued",
            body["pending"]
        )
    } else if body["projected"] == true {
        "; in every store".into()
    } else {
        String::new()
    }
}

fn wait_query(wait: bool) -> Vec<(&'static str, &'static str)> {
    if wait {
        vec![("wait", "true")]
    } else {
        Vec::new()
    }
}

fn read_json(file: &Path) -> Result<Value, CliError> {
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(file).map(|t| text = t)
    };
    read.map_err(|e| CliError::Input(format!("cannot read {}: {e}", file.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::Input(format!("{} is not valid JSON: {e}", file.display())))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A thin HTTP client: builds URLs segment by segment (so names are escaped), and turns every
/// non-2xx answer into [`CliError::Server`].
struct Client {
    base: Url,
    http: reqwest::Client,
    json: bool,
}

impl Client {
    fn new(connection: &Connection) -> Result<Client, CliError> {
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
        })
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends one request; a 2xx answer's status and JSON body, or the error.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), CliError> {
        let url = self.url(segments, query);
        let mut request = self.http.request(method.clone(), url.clone());
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

    /// Prints the raw answer with --json, or the summary otherwise.
    fn summary(&self, body: &Value, summary: impl FnOnce() -> String) {
        if self.json {
            print_json(body);
        } else {
            println!("{}", summary());
        }
    }
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
    fn a_half_done_backfill_draws_a_half_full_bar() {
        let bar = backfill_bar(&json!({"total": 10, "done": 5, "finished": false})).unwrap();
        assert!(bar.starts_with(&format!("[{}{}]", "#".repeat(15), ".".repeat(15))));
        assert!(bar.contains(" 50%  5/10 items"), "{bar}");
    }

    #[test]
    fn an_empty_finished_backfill_is_full() {
        let bar = backfill_bar(&json!({"total": 0, "done": 0, "finished": true})).unwrap();
        assert!(bar.contains("100%") && bar.ends_with("finished"), "{bar}");
    }

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
        })
        .unwrap();
        let url = client.url(&["my/blog", "_version"], &[("wait", "true")]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:2020/my%2Fblog/_version?wait=true"
        );
    }
}
