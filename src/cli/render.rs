//! What `dstore versions` and `dstore blueprint put` print: version tables, back-fill progress bars and
//! one-line changes, drawn from the server's JSON. Pure functions of that JSON.

use std::fmt::Write as _;

use serde_json::Value;

/// Whether no version of these projects is still being back-filled.
pub(super) fn backfills_finished(projects: &[Value]) -> bool {
    projects.iter().all(|p| {
        versions_of(p).all(|v| v["backfill"].is_null() || v["backfill"]["finished"] == true)
    })
}

fn versions_of(project: &Value) -> impl Iterator<Item = &Value> {
    project["versions"].as_array().into_iter().flatten()
}

/// The versions of each project, with migrations and back-fill progress bars.
pub(super) fn render_versions(projects: &[Value]) -> String {
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
pub(super) fn render_progress_lines(projects: &[Value]) -> String {
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
pub(super) fn backfill_bar(backfill: &Value) -> Option<String> {
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
pub(super) fn describe_change(change: &Value) -> String {
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
pub(super) fn summarize(entries: &[String], shown: usize) -> String {
    let mut text = entries[..entries.len().min(shown)].join(", ");
    if entries.len() > shown {
        let _ = write!(text, " and {} more", entries.len() - shown);
    }
    text
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
}
