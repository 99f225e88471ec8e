//! GET /_metrics: the Prometheus text exposition of requests, the journal, projectors and back-fills.

use std::fmt::Write;

use actix_web::{web, HttpResponse};

use super::observe::RequestMetrics;
use super::State;

pub async fn metrics(
    _: super::query::NoQuery,
    state: State,
    requests: web::Data<RequestMetrics>,
    request: actix_web::HttpRequest,
) -> HttpResponse {
    // Open to anyone (`auth.public` names `metrics`): making the text reads every project's
    // back-fills from the storage, so such requests share one.
    let text = if state.anonymous(&request) {
        state.metrics_text.get(render(&state, &requests)).await
    } else {
        render(&state, &requests).await
    };
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// The metrics as Prometheus text.
async fn render(state: &State, requests: &RequestMetrics) -> String {
    let mut out = String::with_capacity(4096);
    requests.render(&mut out);
    let stats = state.storage.stats().await;
    let mut projectors = Vec::new();
    for name in state.registry.names() {
        projectors.push((name, state.storage.progress(name).await));
    }
    let mut backfills = Vec::new();
    for (name, project) in &state.storage.snapshot().projects {
        for version in &project.versions {
            if let Ok(Some(b)) = state.storage.backfill_state(name, version.number).await {
                backfills.push((
                    format!("{{project=\"{name}\",version=\"{}\"}}", version.number),
                    b,
                ));
            }
        }
    }
    let mut gauge = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    gauge(
        "dstore_journal_last_seq",
        "Sequence number of the newest journal entry.",
        "counter",
        vec![(String::new(), stats.last_revision)],
    );
    let (items, bytes) = (stats.items, stats.bytes);
    gauge(
        "dstore_journal_items",
        "Items whose latest state the journal holds (estimate).",
        "gauge",
        vec![(String::new(), items)],
    );
    gauge(
        "dstore_journal_size_bytes",
        "Bytes the journal occupies on disk and in memory (estimate).",
        "gauge",
        vec![(String::new(), bytes)],
    );
    gauge(
        "dstore_catalog_bytes",
        "Bytes every project's blueprints and versions take as JSON (this node's copy); edits that would grow it past dstore_catalog_max_bytes are refused.",
        "gauge",
        vec![(String::new(), state.storage.catalog_bytes() as u64)],
    );
    gauge(
        "dstore_catalog_max_bytes",
        "The most bytes the catalog may take as JSON (storage.max_catalog_bytes).",
        "gauge",
        vec![(
            String::new(),
            state.settings.storage.max_catalog_bytes as u64,
        )],
    );
    let per = |f: &dyn Fn(&crate::journal::ProjectorProgress) -> u64| {
        projectors
            .iter()
            .map(|(name, p)| (format!("{{projector=\"{name}\"}}"), f(p)))
            .collect::<Vec<_>>()
    };
    gauge(
        "dstore_projector_pending_tasks",
        "Tasks waiting for a projector.",
        "gauge",
        per(&|p| p.pending),
    );
    gauge(
        "dstore_projector_applied_total",
        "Tasks applied since start.",
        "counter",
        per(&|p| p.applied),
    );
    gauge(
        "dstore_projector_failed_total",
        "Tasks refused for good since start.",
        "counter",
        per(&|p| p.failed),
    );
    gauge(
        "dstore_projector_dead_letters",
        "Dead letters waiting for a retry.",
        "gauge",
        per(&|p| p.dead_letters),
    );
    gauge(
        "dstore_projector_failing",
        "1 while the projector's last attempt failed.",
        "gauge",
        per(&|p| u64::from(p.last_error.is_some())),
    );
    let total = backfills
        .iter()
        .map(|(l, b)| (l.clone(), b.total))
        .collect();
    let done = backfills.iter().map(|(l, b)| (l.clone(), b.done)).collect();
    gauge(
        "dstore_backfill_items_total",
        "Items a back-fill has to look at.",
        "gauge",
        total,
    );
    gauge(
        "dstore_backfill_items_done",
        "Items a back-fill has looked at.",
        "gauge",
        done,
    );
    gauge(
        "dstore_items_left_out_of_a_version_total",
        "Item writes since start that left their item out of a live version (one per version), which allows no null where the item has none: after a forced breaking freeze, clients still writing what a newer version cannot hold.",
        "counter",
        vec![(
            String::new(),
            crate::write::LEFT_OUT.load(std::sync::atomic::Ordering::Relaxed),
        )],
    );
    for projector in state.registry.iter() {
        for (name, help, value) in projector.counters() {
            gauge(name, help, "counter", vec![(String::new(), value)]);
        }
    }
    if let Some(keys) = &state.keys {
        gauge(
            "dstore_auth_unknown_key_reads_total",
            "Reads of all the API keys made because a request named a key this node had not read yet, one made or rotated through another node (shared, at most four a second); an id the storage does not hold costs a read of that one key.",
            "counter",
            vec![(String::new(), keys.miss_reads())],
        );
        gauge(
            "dstore_auth_failed_logins_limited_total",
            "Requests answered 429 because their address sent more tokens that are no key than auth.failed_logins_per_minute allows.",
            "counter",
            vec![(String::new(), state.failed_logins.limited())],
        );
    }
    let budget = &state.in_flight;
    gauge(
        "dstore_request_memory_bytes",
        "Request memory held now (server.max_inflight_bytes): by every request, and the part answers not yet taken by their clients hold (at most three quarters).",
        "gauge",
        vec![
            ("{held_by=\"all\"}".into(), budget.used() as u64),
            ("{held_by=\"answers\"}".into(), budget.answers() as u64),
        ],
    );
    let (busy, answers) = budget.refused();
    gauge(
        "dstore_request_memory_refused_total",
        "Requests answered 503 for request memory: the budget was held, or answers not yet taken by their clients held their three quarters of it.",
        "counter",
        vec![
            ("{held_by=\"all\"}".into(), busy),
            ("{held_by=\"answers\"}".into(), answers),
        ],
    );
    let (memtables, cache) = crate::rocks::usage();
    gauge(
        "dstore_rocksdb_memory_bytes",
        "Memory RocksDB holds in this process, by kind; memtables are flushed past one shared budget and the block cache is bounded (ARCHITECTURE.md); the journal's table readers (index and filter blocks) grow with its data.",
        "gauge",
        vec![
            ("{kind=\"memtables\"}".into(), memtables as u64),
            ("{kind=\"block_cache\"}".into(), cache as u64),
            (
                "{kind=\"table_readers\"}".into(),
                stats.table_readers_bytes,
            ),
        ],
    );
    out
}
