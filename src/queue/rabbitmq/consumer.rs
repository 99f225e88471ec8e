//! A projector's consumer: takes task deliveries from its queue in batches, applies them step by step
//! ([`step`]), reports each step to the server, and only then settles the deliveries.
//!
//! Prefetch bounds what a consumer holds. A transient failure keeps the unsettled deliveries and
//! retries them with capped backoff, so a store that is down holds its own queue only; the broker
//! keeps the rest. A task the store refused for good is reported as a dead letter and rejected into
//! the projector's dead-letter queue; a message that is not a task goes there too. Runs in
//! `dstore serve` and in `dstore worker`, with the catalog of the process or a copy of the server's.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;

use super::reports::{Refusal, Report};
use super::{confirmed, persistent, Broker, LinkError, JOURNAL_HEADER};
use crate::journal::decode_task;
use crate::journal::task::{Task, TaskOp};
use crate::projector::{backoff, Projector};
use crate::queue::step::{self, Step};
use crate::queue::view::CatalogView;

/// Consumes a projector's queue until `shutdown` turns true.
pub async fn run(
    broker: Arc<Broker>,
    projector: Arc<dyn Projector>,
    view: Arc<CatalogView>,
    batch_size: usize,
    shutdown: watch::Receiver<bool>,
) {
    let link = format!("consumer {}", projector.name());
    let consumer = Consumer {
        broker: &broker,
        projector: projector.as_ref(),
        view: &view,
        batch_size: batch_size.max(1),
        link: &link,
    };
    let session = |connection| consumer.session(connection, shutdown.clone());
    broker.keep_linked(&link, shutdown.clone(), session).await;
}

struct Consumer<'a> {
    broker: &'a Broker,
    projector: &'a dyn Projector,
    view: &'a CatalogView,
    batch_size: usize,
    link: &'a str,
}

impl Consumer<'_> {
    async fn session(
        &self,
        connection: Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let name = self.projector.name();
        let channel = connection.create_channel().await?;
        self.broker.declare_projector(&channel, name).await?;
        channel
            .basic_qos(self.broker.settings.prefetch, BasicQosOptions::default())
            .await?;
        let reports = connection.create_channel().await?;
        self.broker.declare_reports(&reports).await?;
        reports
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = format!("dstore-{name}-{}", std::process::id());
        let mut deliveries = channel
            .basic_consume(
                self.broker.queue(name).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Another worker may have applied a project's drop while this one was away.
        self.view.clear();
        self.broker.set_link(self.link, true, None);
        loop {
            let first = tokio::select! {
                next = deliveries.next() => next,
                _ = shutdown.changed() => return Ok(()),
            };
            let mut batch = vec![delivered(first)?];
            while batch.len() < self.batch_size {
                match deliveries.next().now_or_never() {
                    Some(next) => batch.push(delivered(next)?),
                    None => break,
                }
            }
            for (journal, run) in by_journal(batch) {
                if !self
                    .settle_batch(&reports, &journal, run, &mut shutdown)
                    .await?
                {
                    return Ok(());
                }
            }
        }
    }

    /// Applies a batch until every delivery is settled; false when shutdown interrupted it (the
    /// unsettled deliveries return to the queue with the connection).
    async fn settle_batch(
        &self,
        reports: &Channel,
        journal: &str,
        batch: Vec<Delivery>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, LinkError> {
        let mut tasks = Vec::with_capacity(batch.len());
        let mut held = Vec::with_capacity(batch.len());
        for delivery in batch {
            match decode_task(&delivery.data) {
                Ok(task) => {
                    tasks.push(task);
                    held.push(delivery);
                }
                Err(error) => {
                    tracing::error!(projector = self.projector.name(), %error, "a message that is not a task goes to the dead-letter queue");
                    settle(&delivery, false).await?;
                }
            }
        }
        let mut attempt = 0;
        while !tasks.is_empty() {
            let step = self.step(&tasks).await;
            let settled = step.settled();
            tracing::debug!(projector = self.projector.name(), settled, "step applied");
            self.report(reports, journal, &step).await?;
            for (task, delivery) in tasks.iter().zip(&held).take(settled) {
                let refused = step.dead.iter().any(|d| d.task.seq == task.seq);
                settle(delivery, !refused).await?;
            }
            tasks.drain(..settled);
            held.drain(..settled);
            if let Some(error) = step.retry {
                tracing::warn!(projector = self.projector.name(), %error, attempt, "projection failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = shutdown.changed() => return Ok(false),
                }
                attempt += 1;
            } else {
                attempt = 0;
            }
        }
        Ok(true)
    }

    /// One step over the front of `tasks`, with the catalog they need.
    async fn step(&self, tasks: &[Task]) -> Step {
        if matches!(tasks[0].op, TaskOp::DropProject) {
            self.view.forget(&tasks[0].project);
        }
        match self.view.snapshot_for(tasks).await {
            Ok(snapshot) => step::apply(self.projector, &snapshot, tasks).await,
            Err(error) => Step {
                retry: Some(error),
                ..Step::default()
            },
        }
    }

    /// Sends the step's report to the server and waits for the broker to take it.
    async fn report(&self, channel: &Channel, journal: &str, step: &Step) -> Result<(), LinkError> {
        let report = Report {
            projector: self.projector.name().to_string(),
            journal: journal.to_string(),
            applied: step.applied.clone(),
            refused: step
                .dead
                .iter()
                .map(|d| Refusal {
                    seq: d.task.seq,
                    reason: d.reason.clone(),
                    at: d.at.clone(),
                })
                .collect(),
            migration: step.migration.clone(),
            error: step.retry.as_ref().map(|e| e.message.clone()),
        };
        let body = serde_json::to_vec(&report)
            .map_err(|e| LinkError::Other(format!("cannot encode a report: {e}")))?;
        let id = format!("{}-{}", report.projector, step.applied.last().unwrap_or(&0));
        let confirm = channel
            .basic_publish(
                "".into(),
                self.broker.reports_queue().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                persistent(id),
            )
            .await?;
        confirmed(confirm).await
    }
}

/// Splits a batch into runs of deliveries from the same journal, in order: a report speaks for
/// one journal.
fn by_journal(batch: Vec<Delivery>) -> Vec<(String, Vec<Delivery>)> {
    let mut runs: Vec<(String, Vec<Delivery>)> = Vec::new();
    for delivery in batch {
        let journal = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| {
                headers
                    .inner()
                    .iter()
                    .find(|(name, _)| name.as_str() == JOURNAL_HEADER)
            })
            .and_then(|(_, value)| match value {
                lapin::types::AMQPValue::LongString(id) => Some(id.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        match runs.last_mut() {
            Some((current, run)) if *current == journal => run.push(delivery),
            _ => runs.push((journal, vec![delivery])),
        }
    }
    runs
}

/// The next delivery, or why the session ended.
fn delivered(next: Option<lapin::Result<Delivery>>) -> Result<Delivery, LinkError> {
    match next {
        Some(delivery) => Ok(delivery?),
        None => Err(LinkError::Other(
            "the broker cancelled the consumer (was its queue deleted?)".into(),
        )),
    }
}

/// Acknowledges a delivery, or rejects it into the dead-letter queue.
async fn settle(delivery: &Delivery, ack: bool) -> Result<(), LinkError> {
    let sent = if ack {
        delivery.acker.ack(BasicAckOptions::default()).await?
    } else {
        delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await?
    };
    if sent {
        Ok(())
    } else {
        Err(LinkError::Other(
            "the channel closed before a delivery was settled".into(),
        ))
    }
}
