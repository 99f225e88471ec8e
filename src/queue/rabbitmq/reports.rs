//! Reports: what a consumer did with a step of tasks, sent back to the server through the broker, and
//! the server's loop that records them in the journal and the catalog.
//!
//! A report is recorded before its delivery is acknowledged, and recording is idempotent (removing a
//! task twice, or storing the same dead letter twice, changes nothing), so a redelivered report is
//! harmless.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Broker, LinkError};
use crate::journal::{DeadLetter, Journal};
use crate::queue::step::{self, MigrationRecord};

const LINK: &str = "reports";

/// What one consumer step did, as the server records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub projector: String,
    /// The id of the journal the tasks came from (their `dstore-journal` header).
    pub journal: String,
    /// Seqs of the tasks applied.
    pub applied: Vec<u64>,
    /// Tasks refused for good; the server keeps them as dead letters with its own copy of the task.
    pub refused: Vec<Refusal>,
    pub migration: Option<MigrationRecord>,
    /// The error the consumer is retrying after, or `None` once it is working again.
    pub error: Option<String>,
    /// The projects the consumer holds back now (their tasks parked), which the server's
    /// back-pressure refuses first (see `storage::admits`); `None` from a consumer that does not
    /// say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<crate::blueprint::Ident>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub seq: u64,
    pub reason: String,
    pub at: String,
}

/// Records reports until `shutdown` turns true.
pub async fn collect(journal: Arc<Journal>, broker: Arc<Broker>, shutdown: watch::Receiver<bool>) {
    let session = |connection| session(connection, &journal, &broker);
    broker.keep_linked(LINK, shutdown.clone(), session).await;
}

async fn session(
    connection: Connection,
    journal: &Journal,
    broker: &Broker,
) -> Result<(), LinkError> {
    let channel = connection.create_channel().await?;
    broker.declare_reports(&connection, &channel).await?;
    channel.basic_qos(200, BasicQosOptions::default()).await?;
    let mut reports = channel
        .basic_consume(
            broker.reports_queue().as_str().into(),
            "dstore-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    broker.set_link(LINK, true, None);
    while let Some(delivery) = reports.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<Report>(&delivery.data) {
            Ok(report) => {
                record(journal, &report)?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(error) => {
                tracing::error!(%error, "dropping an unreadable report");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
    }
    Err(LinkError::Other(
        "the broker cancelled the reports consumer".into(),
    ))
}

/// Records a report; one about another journal's tasks or from a projector this server does not
/// enable is logged and skipped.
fn record(journal: &Journal, report: &Report) -> Result<(), LinkError> {
    let Some(name) = journal.projectors().find(|p| *p == report.projector) else {
        tracing::warn!(projector = %report.projector, "a report from a projector this server does not enable");
        return Ok(());
    };
    if report.journal != journal.id() {
        tracing::warn!(
            projector = name,
            journal = %report.journal,
            "a report about tasks of another journal (an old data directory?) is ignored"
        );
        return Ok(());
    }
    let failed = |e: crate::journal::JournalError| LinkError::Other(format!("journal: {e}"));
    let mut dead = Vec::with_capacity(report.refused.len());
    for refusal in &report.refused {
        // A task already recorded (a report delivered twice) is no longer pending.
        if let Some(raw) = journal.pending_raw(name, refusal.seq).map_err(failed)? {
            // A message the consumer could not read, naming a task the journal can: not that
            // task as the relay sent it (a forged or damaged message); the task itself is still
            // queued, or published again if it was lost (`relay`).
            if refusal.reason.starts_with(super::consumer::UNREADABLE)
                && crate::journal::decode_task(&raw).is_ok()
            {
                tracing::warn!(
                    projector = name,
                    seq = refusal.seq,
                    "a message named a pending task the consumer could not read, though the \
                     journal's copy reads: it was not the task the relay sent; the task stays pending"
                );
                continue;
            }
            let mut letter = DeadLetter::from_raw(name, refusal.seq, &raw, refusal.reason.clone());
            letter.at = refusal.at.clone();
            dead.push(letter);
        }
    }
    step::record(
        journal,
        name,
        &report.applied,
        dead,
        report.migration.as_ref(),
        None,
    )
    .map_err(failed)?;
    journal.note_error(name, report.error.clone());
    if let Some(held) = &report.held {
        journal.note_held(name, held.clone());
    }
    Ok(())
}
