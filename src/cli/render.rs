//! What `dstore versions`, `dstore blueprint put`, `dstore freeze --dry-run` and `dstore diff` print:
//! version tables, back-fill progress bars, one-line changes and compatibility tables, drawn from the
//! server's JSON. Pure functions of that JSON.

use std::fmt::Write as _;

use serde_json::Value;

/// Whether no version of these projects is still being back-filled.
pub(super) fn backfills_finished(projects: &[Value]) -> bool {
    projects
        .iter()
        .all(|p| versions_of(p).all(|v| backfill_over(&v["backfill"])))
}

/// Whether a version's back-fill is over: none, finished, or stopped by the version's retirement.
fn backfill_over(backfill: &Value) -> bool {
    backfill.is_null() || backfill["finished"] == true || backfill["stopped"] == true
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
            if backfill_over(backfill) {
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
        match (finished, backfill["stopped"] == true) {
            (true, _) => ", finished",
            (false, true) => ", stopped: the version was retired",
            (false, false) => "",
        }
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

/// `dstore freeze --dry-run`: the compatibility report as one table per live version, then what each
/// store would run.
pub(super) fn render_report(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: freezing would make version {} (compatibility: {}, verdict: {}) — {}",
        text(&report["project"]),
        report["version"],
        text(&report["compatibility"]),
        text(&report["verdict"]),
        if report["allowed"] == true {
            "allowed"
        } else {
            "refused without --force"
        }
    );
    let _ = writeln!(out, "counted on {} stored items", report["items"]);
    let versions = report["live_versions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if versions.is_empty() {
        let _ = writeln!(out, "no live version: nothing to compare with");
    }
    for version in versions {
        let _ = writeln!(out, "\nagainst version {}:", version["version"]);
        let columns = version["columns"].as_array().map_or(&[][..], Vec::as_slice);
        if columns.is_empty() {
            let changes = version["changes"].as_array().map_or(0, Vec::len);
            let _ = writeln!(
                out,
                "  no column changes a value ({changes} change{})",
                if changes == 1 { "" } else { "s" }
            );
            continue;
        }
        out.push_str(&column_table(columns, true));
        let totals = |key: &str| {
            format!(
                "{} losing a value, {}",
                version[key]["items_losing_a_value"],
                refused(&version[key])
            )
        };
        let _ = writeln!(
            out,
            "  items: old clients reading new writes: {}; new clients reading old writes: {}",
            totals("old_clients_reading_new_writes"),
            totals("new_clients_reading_old_writes")
        );
        if let Some(note) = version["note"].as_str() {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    for retired in report["retired_versions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
    {
        let counts = &retired["new_clients_reading_old_writes"];
        let _ = writeln!(
            out,
            "\nretired version {} still holds {} items; moved into the new version: {} losing a \
             value, {}",
            retired["version"],
            retired["items"],
            counts["items_losing_a_value"],
            refused(counts)
        );
    }
    if let Some(stores) = report["stores"].as_object() {
        for (store, preview) in stores {
            let _ = writeln!(out, "\n{store} would run:");
            match preview["statements"].as_array() {
                Some(statements) => {
                    for statement in statements {
                        let _ = writeln!(out, "  {};", text(statement));
                    }
                }
                None => {
                    let pretty = serde_json::to_string_pretty(preview).unwrap_or_default();
                    for line in pretty.lines() {
                        let _ = writeln!(out, "  {line}");
                    }
                }
            }
        }
    }
    out
}

/// `dstore diff`: the changes between two versions, then each changed column's verdicts.
pub(super) fn render_diff(diff: &Value) -> String {
    let mut out = String::new();
    let changes: Vec<String> = diff["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(describe_change)
        .collect();
    let _ = writeln!(
        out,
        "{}: version {} → {}: {} change{}",
        text(&diff["project"]),
        diff["from"],
        diff["to"],
        changes.len(),
        if changes.len() == 1 { "" } else { "s" }
    );
    for change in &changes {
        let _ = writeln!(out, "  {change}");
    }
    let columns = diff["columns"].as_array().map_or(&[][..], Vec::as_slice);
    if !columns.is_empty() {
        out.push('\n');
        out.push_str(&column_table(columns, false));
    }
    out
}

/// One row per changed column with a verdict per direction; under it, the reason of every verdict
/// that is not lossless. `report` rows carry item counts and the report's direction names.
fn column_table(columns: &[Value], report: bool) -> String {
    let (old_reads_new, new_reads_old, headers) = if report {
        (
            "old_clients_reading_new_writes",
            "new_clients_reading_old_writes",
            [
                "COLUMN",
                "CHANGE",
                "OLD CLIENTS READ NEW WRITES",
                "NEW CLIENTS READ OLD WRITES",
            ],
        )
    } else {
        (
            "clients_of_from_reading_writes_of_to",
            "clients_of_to_reading_writes_of_from",
            ["COLUMN", "CHANGE", "FROM READS TO", "TO READS FROM"],
        )
    };
    let cell = |direction: &Value| {
        let verdict = text(&direction["verdict"]);
        match (
            direction["items_losing_a_value"].as_u64(),
            direction["items_refused"].as_u64(),
        ) {
            (Some(lost), Some(n)) if n > 0 => {
                format!("{verdict}: {lost} lose a value, {}", refused(direction))
            }
            (Some(lost), Some(_)) if verdict != "lossless" => {
                format!("{verdict}: {lost} lose a value")
            }
            _ => verdict,
        }
    };
    let rows: Vec<[String; 4]> = columns
        .iter()
        .map(|c| {
            [
                format!("{}.{}", text(&c["blueprint"]), text(&c["column"])),
                text(&c["change"]),
                cell(&c[old_reads_new]),
                cell(&c[new_reads_old]),
            ]
        })
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for row in &rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 4]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(value, width)| format!("{value}{}", " ".repeat(width - value.chars().count())))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  ").trim_end());
    };
    line(&mut out, headers);
    for row in &rows {
        line(&mut out, [&row[0], &row[1], &row[2], &row[3]]);
    }
    for (c, row) in columns.iter().zip(&rows) {
        for (direction, name) in [
            (old_reads_new, headers[2].to_lowercase()),
            (new_reads_old, headers[3].to_lowercase()),
        ] {
            if c[direction]["verdict"] != "lossless" {
                let _ = writeln!(
                    out,
                    "    {} ({name}): {}",
                    row[0],
                    text(&c[direction]["reason"])
                );
            }
        }
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

/// `N refused`, and how many of them as duplicates in a column made unique or for their row's
/// size.
fn refused(counts: &Value) -> String {
    let refused = &counts["items_refused"];
    let why: Vec<String> = [
        ("items_refused_as_duplicates", "as duplicates"),
        ("items_refused_for_row_size", "for their row's size"),
    ]
    .into_iter()
    .filter_map(|(key, why)| {
        let n = counts[key].as_u64().filter(|n| *n > 0)?;
        Some(format!("{n} {why}"))
    })
    .collect();
    match why.is_empty() {
        true => format!("{refused} refused"),
        false => format!("{refused} refused ({})", why.join(", ")),
    }
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
    fn a_report_shows_each_direction_with_its_counts_and_reasons() {
        let column = |verdict: &str, lost: u64| {
            json!({"verdict": verdict, "reason": format!("{verdict} reason"),
                "items_losing_a_value": lost, "items_refused": 0})
        };
        let report = json!({"project": "shop", "version": 2, "compatibility": "lossless",
            "verdict": "lossy", "allowed": false, "items": 3, "live_versions": [{
                "version": 1, "changes": [],
                "old_clients_reading_new_writes": {"items_losing_a_value": 0, "items_refused": 0},
                "new_clients_reading_old_writes": {"items_losing_a_value": 1, "items_refused": 0},
                "columns": [{"blueprint": "product", "column": "price", "change": "type",
                    "old_clients_reading_new_writes": column("lossless", 0),
                    "new_clients_reading_old_writes": column("lossy", 1)}]}],
            "retired_versions": [{"version": 0, "items": 7, "changes": [],
                "new_clients_reading_old_writes": {"items_losing_a_value": 2, "items_refused": 3,
                    "items_refused_as_duplicates": 2}}],
            "stores": {"postgresql": {"statements": ["CREATE SCHEMA s"]}}});
        let out = render_report(&report);
        assert!(out.contains("refused without --force"), "{out}");
        assert!(out.contains("product.price"), "{out}");
        assert!(out.contains("lossy: 1 lose a value"), "{out}");
        assert!(
            out.contains("(new clients read old writes): lossy reason"),
            "{out}"
        );
        assert!(!out.contains("lossless reason"), "{out}");
        assert!(out.contains("  CREATE SCHEMA s;"), "{out}");
        assert!(
            out.contains("retired version 0 still holds 7 items; moved into the new version: 2 losing a value, 3 refused (2 as duplicates)"),
            "{out}"
        );
    }

    #[test]
    fn a_retired_versions_stopped_backfill_is_done_waiting_for() {
        let stopped = json!({"total": 10, "done": 4, "finished": false, "stopped": true});
        let bar = backfill_bar(&stopped).unwrap();
        assert!(bar.contains("4/10 items, stopped"), "{bar}");
        let project =
            json!({"project": "p", "versions": [{"project_version": 2, "backfill": stopped}]});
        assert!(backfills_finished(std::slice::from_ref(&project)));
        assert_eq!(render_progress_lines(&[project]), "");
    }

    #[test]
    fn an_empty_finished_backfill_is_full() {
        let bar = backfill_bar(&json!({"total": 0, "done": 0, "finished": true})).unwrap();
        assert!(bar.contains("100%") && bar.ends_with("finished"), "{bar}");
    }
}
