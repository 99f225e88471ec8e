//! A projector's consumer: takes task deliveries from its queue in batches, applies them step by step
//! ([`step`]), reports each step to the server, and only then settles the deliveries.
//!
//! Prefetch bounds what a consumer holds. A transient failure keeps the unsettled deliveries and
//! retries them with capped backoff, so a store that is down holds its own queue only; the broker
//! keeps the rest. A task the store refused for good is reported as a dead letter and rejected into
//! the projector's dead-letter queue; a message that is not a task goes there too. Runs in
//! `dstore serve` and in `dstore worker`, with the catalog of the process or a copy of the server's.

use std::sync::Arc;
use std::time::Duration;

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
use crate::blueprint::Ident;
use crate::catalog::MigrationState;
use crate::journal::task::{Task, TaskOp};
use crate::journal::{decode_task, DeadLetter};
use crate::projector::{backoff, Projector};
use crate::queue::hold::Holds;
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
        // Deliveries of projects held back by a failed migration wait here, unsettled and in
        // order, while the others go on; prefetch bounds how many.
        let mut parked = Parked::default();
        loop {
            let retry_in = parked.holds.next_try().unwrap_or(Duration::from_secs(3600));
            let first = tokio::select! {
                next = deliveries.next() => Some(next),
                _ = tokio::time::sleep(retry_in), if !parked.waiting.is_empty() => None,
                _ = shutdown.changed() => return Ok(()),
            };
            // Parked deliveries whose project may be tried again go first, in their order.
            let mut batch = parked.due();
            if let Some(first) = first {
                batch.push(delivered(first)?);
                while batch.len() < self.batch_size {
                    match deliveries.next().now_or_never() {
                        Some(next) => batch.push(delivered(next)?),
                        None => break,
                    }
                }
            }
            for (journal, run) in by_journal(batch) {
                if !self
                    .settle_batch(&reports, &journal, run, &mut parked, &mut shutdown)
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
        parked: &mut Parked,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, LinkError> {
        let mut tasks = Vec::with_capacity(batch.len());
        let mut held = Vec::with_capacity(batch.len());
        for delivery in batch {
            match decode_task(&delivery.data) {
                Ok(task) if parked.holds_back(&task.project) => parked.park(task, delivery),
                Ok(task) => {
                    tasks.push(task);
                    held.push(delivery);
                }
                Err(error) => {
                    tracing::error!(projector = self.projector.name(), %error, "a message that is not a task goes to the dead-letter queue");
                    // A task's seq is in its fixed header even when the rest cannot be read: the
                    // server then keeps it as a dead letter instead of waiting for it for ever.
                    if let Some(seq) = delivery
                        .data
                        .get(..8)
                        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                    {
                        let dead = DeadLetter::from_raw(
                            self.projector.name(),
                            seq,
                            &delivery.data,
                            "the consumer could not read the task".into(),
                        );
                        let step = Step {
                            dead: vec![dead],
                            ..Step::default()
                        };
                        self.report(reports, journal, &step).await?;
                    }
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
                let refused = step.dead.iter().any(|d| d.seq == task.seq);
                settle(delivery, !refused).await?;
            }
            tasks.drain(..settled);
            held.drain(..settled);
            if let Some(m) = step
                .migration
                .as_ref()
                .filter(|m| m.state == MigrationState::Done)
            {
                parked.holds.release(&m.project);
            }
            let failed_migration = step.migration.as_ref().filter(|m| {
                matches!(m.state, MigrationState::Failed { .. }) && step.retry.is_some()
            });
            if let Some(m) = failed_migration {
                // Only this project waits: its deliveries are parked, in order, and the rest go on.
                tracing::warn!(projector = self.projector.name(), project = %m.project, error = ?step.retry, "migration failed; the project's tasks wait, the others go on");
                parked.holds.hold(&m.project);
                let (mut kept_tasks, mut kept) = (Vec::new(), Vec::new());
                for (task, delivery) in tasks.drain(..).zip(held.drain(..)) {
                    if task.project == m.project {
                        parked.park(task, delivery);
                    } else {
                        kept_tasks.push(task);
                        kept.push(delivery);
                    }
                }
                (tasks, held) = (kept_tasks, kept);
                continue;
            }
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
                    seq: d.seq,
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

/// Deliveries of held projects, unsettled, in the order they arrived.
#[derive(Default)]
struct Parked {
    holds: Holds,
    waiting: Vec<(Ident, Delivery)>,
}

impl Parked {
    /// Whether a task of `project` must wait: its project is held, or earlier tasks of it are
    /// parked (order within a project is kept).
    fn holds_back(&self, project: &Ident) -> bool {
        self.holds.is_held(project) || self.waiting.iter().any(|(p, _)| p == project)
    }

    fn park(&mut self, task: Task, delivery: Delivery) {
        self.waiting.push((task.project, delivery));
    }

    /// The parked deliveries whose project may be tried again, in order.
    fn due(&mut self) -> Vec<Delivery> {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(project, _)| !self.holds.is_held(project));
        self.waiting = waiting;
        due.into_iter().map(|(_, delivery)| delivery).collect()
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
