//! A projector's consumer: takes task deliveries from its queue in batches, applies them step by step
//! ([`step`]), reports each step to the server, and only then settles the deliveries.
//!
//! Prefetch bounds what a consumer holds. A transient failure keeps the unsettled deliveries and
//! retries them with capped backoff, so a store that is down holds its own queue only; the broker
//! keeps the rest. A task the store refused for good is reported as a dead letter and rejected into
//! the projector's dead-letter queue; a message that is not a task goes there too, and so does a
//! task that names no journal or another than the consumer's deployment, unapplied and unreported. Runs in
//! `dstore serve` and in `dstore worker`, with the catalog of the process or a copy of the server's.
//!
//! A project whose migration failed is held ([`Holds`]) and its tasks are parked: moved, in order,
//! to a parking queue of its own (`{ns}.{projector}.parked.{project}`), so however many of them come
//! they take no room in the prefetch window and the other projects go on. While a project has a
//! parking queue, its new deliveries join the end of it; a session checks whether a project has one
//! the first time it meets the project, so an earlier consumer's parked tasks are never overtaken.
//! When its hold ends, its tasks are taken from the head of that queue a batch at a time and
//! applied; if it fails again, the batch goes back to the head unchanged. The consumer channel is
//! transactional: a task's copy in a parking queue and the acknowledgement of the delivery it came
//! from are committed together, so a crash leaves the task in one place.
//!
//! The registry (`{ns}.{projector}.parked`, a message per parked project) tells a new active
//! consumer which parking queues to try without waiting for their projects' next task. Only the
//! active consumer reads it and tries parking queues: at once when it is the queue's only consumer,
//! else from its first delivery, which only the active one gets. Until then a consumer sends its
//! queue a probe every few seconds (dropped by whoever receives it), so the active one learns it
//! is even when no task comes.
//!
//! A consumer publishes (its reports, parked copies, registry entries and probes) on a connection
//! of its own, never on the one its deliveries come on: under a memory or disk alarm RabbitMQ
//! stops reading a connection that publishes, acknowledgements included, and a backlog that
//! raised the alarm could then never drain. While that publishing connection is blocked, a step's
//! report is kept and its deliveries are acknowledged all the same (up to [`MOST_UNSENT`] bytes
//! of reports), and the kept reports are sent once it is unblocked; a session that ends first
//! loses them, and its tasks, still pending in the journal, are published again by the relay and
//! applied again, which is harmless. Parking waits for its copy's confirmation before it
//! acknowledges the delivery: while an alarm lasts, a held project's deliveries are set aside,
//! unacknowledged and in order, and parked once it is over; the other projects' go on as long as
//! the window has room beside them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::watch;

use super::reports::{Refusal, Report};
use super::{confirmed, persistent, Broker, LinkError, JOURNAL_HEADER, PROBE_HEADER};
use crate::blueprint::Ident;
use crate::journal::task::Task;
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
    deployment: Option<String>,
    shutdown: watch::Receiver<bool>,
) {
    let link = format!("consumer {}", projector.name());
    let consumer = Consumer {
        broker: &broker,
        projector: projector.as_ref(),
        view: &view,
        batch_size: batch_size.max(1),
        link: &link,
        deployment,
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
    /// The journal whose tasks this consumer applies: a server's own; none for a worker, whose
    /// server's catalog refuses another journal's tasks (`CatalogView`), which then wait.
    deployment: Option<String>,
}

impl Consumer<'_> {
    /// Whether tasks from `journal` are this consumer's to apply (and to report): a relay names
    /// its journal on every task it publishes (`JOURNAL_HEADER`), so a task naming none was
    /// published by hand, and one naming another journal by another deployment sharing the
    /// broker. Applied, either would write into this deployment's stores what its journal never
    /// held (a forged drop would empty them), and its report would settle nothing here or,
    /// reaching the other deployment's collector, settle tasks its stores never got.
    /// A worker cannot tell a task of another deployment from its own pointed at the wrong
    /// server: its server's catalog refuses the task's journal, and the task waits, saying so,
    /// until the worker is pointed at the server that sent it.
    fn works_for(&self, journal: &str) -> bool {
        if journal.is_empty() {
            return false;
        }
        match &self.deployment {
            Some(ours) => ours == journal,
            None => {
                // A worker's projector learns its deployment from the first task it applies.
                self.projector.work_for(journal);
                true
            }
        }
    }

    /// Rejects deliveries of tasks `journal` names, not this deployment's (see [`Self::works_for`]),
    /// into the dead-letter queue, unapplied and unreported.
    async fn refuse_foreign(
        &self,
        journal: &str,
        deliveries: &[Delivery],
    ) -> Result<(), LinkError> {
        tracing::error!(
            projector = self.projector.name(),
            journal,
            ours = self.deployment.as_deref(),
            tasks = deliveries.len(),
            "tasks that do not come from this deployment's journal (published by hand, or by \
             another deployment sharing the broker and queue.namespace: give each its own) go \
             to the dead-letter queue unapplied and unreported"
        );
        for delivery in deliveries {
            settle(delivery, false).await?;
        }
        Ok(())
    }

    async fn session(
        &self,
        connection: Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let name = self.projector.name();
        if !self.await_queue(&connection, &mut shutdown).await? {
            return Ok(());
        }
        let channel = connection.create_channel().await?;
        self.broker.declare_parking(&channel, name).await?;
        channel
            .basic_qos(self.broker.settings.prefetch, BasicQosOptions::default())
            .await?;
        channel.tx_select().await?;
        let publisher = self
            .broker
            .connect(&format!("{} publisher", self.link))
            .await?;
        let publisher_lost = super::lost(publisher.events_listener());
        let out = publisher.create_channel().await?;
        self.broker.declare_reports(&publisher, &out).await?;
        out.confirm_select(ConfirmSelectOptions::default()).await?;
        let session = Session {
            connection: &connection,
            channel: &channel,
            publisher: &publisher,
            out: &out,
            unsent: std::sync::Mutex::default(),
        };
        tokio::select! {
            result = self.consume(&session, &mut shutdown) => result,
            error = publisher_lost => Err(error),
        }
    }

    /// Consumes the session's queue until `shutdown`.
    async fn consume(
        &self,
        session: &Session<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let name = self.projector.name();
        let channel = session.channel;
        let tag = format!("dstore-{name}-{}", std::process::id());
        let queue = self.broker.queue(name);
        let mut deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Another worker may have applied a project's drop while this one was away.
        self.view.clear();
        self.broker.set_link(self.link, true, None);
        let mut parking = Parking::default();
        loop {
            self.send_unsent(session).await?;
            if parking.park_aside(session, self.broker, name).await? > 0 {
                session.channel.tx_commit().await?;
            }
            if !parking.known {
                if self.only_consumer(session, &queue).await? {
                    self.take_over(session, &mut parking).await?;
                } else {
                    // Only the active consumer receives it: it then takes over.
                    self.probe(session, &queue).await?;
                }
            }
            // Without a project due, wake to ask again whether this consumer became the active one.
            let due = parking.next_due();
            let wait = due.as_ref().map_or(ACTIVE_CHECK, |(_, wait)| *wait);
            // Kept reports are sent as soon as the publishing connection is unblocked.
            let unsent = session.holds_unsent() || !parking.aside.is_empty();
            let first = tokio::select! {
                next = deliveries.next() => Some(Some(next)),
                _ = tokio::time::sleep(wait), if due.is_some() || !parking.known => Some(None),
                _ = tokio::time::sleep(UNSENT_CHECK), if unsent => None,
                _ = shutdown.changed() => return Ok(()),
            };
            let Some(first) = first else {
                continue; // to send the kept reports
            };
            let Some(first) = first else {
                let Some((project, _)) = due else { continue };
                if !self
                    .retry(session, &project, &mut parking, shutdown)
                    .await?
                {
                    return Ok(());
                }
                continue;
            };
            if !parking.known {
                self.take_over(session, &mut parking).await?;
            }
            // A batch ends after 8 MiB of tasks, as the journal's do: each holds an item for every
            // live version, and the store gets the batch in one statement.
            let mut batch = vec![delivered(first)?];
            let mut bytes = batch[0].data.len();
            while batch.len() < self.batch_size && bytes < crate::journal::BATCH_BYTES {
                match deliveries.next().now_or_never() {
                    Some(next) => {
                        let next = delivered(next)?;
                        bytes += next.data.len();
                        batch.push(next);
                    }
                    None => break,
                }
            }
            let probes = batch.iter().filter(|delivery| is_probe(delivery)).count();
            if probes > 0 {
                for delivery in batch.iter().filter(|delivery| is_probe(delivery)) {
                    settle(delivery, true).await?;
                }
                session.channel.tx_commit().await?;
                batch.retain(|delivery| !is_probe(delivery));
            }
            for (journal, run) in by_journal(batch) {
                let settled = self
                    .settle_batch(
                        session,
                        &journal,
                        run,
                        Source::Queue,
                        &mut parking,
                        shutdown,
                    )
                    .await?;
                if !settled {
                    return Ok(());
                }
            }
        }
    }

    /// Whether this session is its queue's only consumer, hence the active one.
    async fn only_consumer(&self, session: &Session<'_>, queue: &str) -> Result<bool, LinkError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = session
            .channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        Ok(declared.consumer_count() == 1)
    }

    /// Waits until the broker has this consumer's queue, which only the relay declares (see
    /// `Broker::declare_projector`); false once shutting down.
    async fn await_queue(
        &self,
        connection: &Connection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, LinkError> {
        let name = self.projector.name();
        let mut said: Option<Instant> = None;
        while !self.broker.queue_exists(connection, name).await? {
            // Said at once, then every minute: a worker whose namespace or projector no server
            // publishes to waits for ever.
            if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                let queue = self.broker.queue(name);
                tracing::warn!(%queue, "the broker has no queue for this projector; waiting for a dstore server's relay to declare it (is queue.namespace the server's?)");
                let reason = format!("waiting for the relay to declare queue {queue}");
                self.broker.set_link(self.link, false, Some(reason));
                said = Some(Instant::now());
            }
            tokio::select! {
                _ = tokio::time::sleep(QUEUE_CHECK) => {}
                _ = shutdown.changed() => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Sends this consumer's queue a probe (see [`PROBE_HEADER`]).
    async fn probe(&self, session: &Session<'_>, queue: &str) -> Result<(), LinkError> {
        let mut headers = FieldTable::default();
        headers.insert(PROBE_HEADER.into(), AMQPValue::Boolean(true));
        // Unconfirmed, and not sent while an alarm blocks the publishing connection (the publish
        // would wait for its end): a probe lost is sent again a few seconds later.
        if session.publisher.status().blocked() {
            return Ok(());
        }
        let publish = session.out.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"",
            lapin::BasicProperties::default().with_headers(headers),
        );
        tokio::select! {
            published = publish => drop(published?),
            () = blocked(session.publisher) => {}
        }
        Ok(())
    }

    /// Reads the registry of parking queues, as the active consumer: from now on this session
    /// tries every parked project in its turn.
    async fn take_over(
        &self,
        session: &Session<'_>,
        parking: &mut Parking,
    ) -> Result<(), LinkError> {
        tokio::time::sleep(TAKE_OVER_GRACE).await;
        let name = self.projector.name();
        for project in self.registry(session, None).await? {
            // Made again, empty, when it was deleted before its entry was removed: the project's
            // first try then forgets it.
            self.broker
                .declare_parked(session.channel, name, &project)
                .await?;
            parking.checked.insert(project.clone());
            parking.declared.insert(project.clone());
            parking.registered.insert(project.clone());
            parking.parked.entry(project).or_insert(None);
        }
        parking.known = true;
        if !parking.parked.is_empty() {
            tracing::info!(
                projector = self.projector.name(),
                projects = parking.parked.len(),
                "projects with tasks parked by an earlier consumer"
            );
        }
        Ok(())
    }

    /// Applies a batch from the head of `project`'s parking queue (its hold is over). When the
    /// project fails again, what was not applied goes back to the head; when the queue is empty,
    /// the project's deliveries flow again. False when shutdown interrupted it.
    async fn retry(
        &self,
        session: &Session<'_>,
        project: &Ident,
        parking: &mut Parking,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, LinkError> {
        let queue = self
            .broker
            .project_parked_queue(self.projector.name(), project);
        parking.parked.insert(project.clone(), Some(Instant::now()));
        // The head alone first: when it fails again (most often a migration still failing), the
        // try cost one message, not a batch taken from the broker one by one and put back.
        let mut limit = 1;
        loop {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while batch.len() < limit && bytes < crate::journal::BATCH_BYTES {
                match session
                    .channel
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?
                {
                    Some(message) => {
                        bytes += message.delivery.data.len();
                        batch.push(message.delivery);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                // Its deliveries set aside (an alarm blocks their parking) come after what the
                // queue held: let go now, the project's next delivery would overtake them.
                if parking.sets_aside(project) {
                    return Ok(true);
                }
                return self.unpark(session, project, parking).await.map(|()| true);
            }
            for (journal, run) in by_journal(batch) {
                if parking.holds.is_held(project) {
                    // Failed again: the rest of the batch goes back to the head, in order.
                    for delivery in &run {
                        requeue(delivery).await?;
                    }
                    session.channel.tx_commit().await?;
                    continue;
                }
                if !self
                    .settle_batch(session, &journal, run, Source::Parking, parking, shutdown)
                    .await?
                {
                    return Ok(false);
                }
            }
            if limit > 1 || parking.holds.is_held(project) {
                return Ok(true);
            }
            limit = self.batch_size;
        }
    }

    /// The projects the registry names, reading every entry once and returning each to its place,
    /// except those naming `remove` (or nothing readable), which are removed.
    async fn registry(
        &self,
        session: &Session<'_>,
        remove: Option<&Ident>,
    ) -> Result<HashSet<Ident>, LinkError> {
        let registry = self.broker.parked_queue(self.projector.name());
        let mut projects = HashSet::new();
        let mut left = None;
        while left != Some(0) {
            let Some(entry) = session
                .channel
                .basic_get(registry.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            left = Some(left.map_or(entry.message_count, |left: u32| left - 1));
            let entry = entry.delivery;
            let named = std::str::from_utf8(&entry.data)
                .ok()
                .and_then(|name| Ident::parse(name).ok());
            match named {
                Some(project) if Some(&project) != remove => {
                    requeue(&entry).await?;
                    projects.insert(project);
                }
                _ => settle(&entry, true).await?,
            }
        }
        session.channel.tx_commit().await?;
        Ok(projects)
    }

    /// Forgets `project`'s parking queue, which is empty: deletes it, then its registry entry.
    async fn unpark(
        &self,
        session: &Session<'_>,
        project: &Ident,
        parking: &mut Parking,
    ) -> Result<(), LinkError> {
        let queue = self
            .broker
            .project_parked_queue(self.projector.name(), project);
        // On a channel of its own: a refusal (the queue is not empty) closes the channel that asked.
        let channel = session.connection.create_channel().await?;
        let deleted = channel
            .queue_delete(
                queue.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        if let Err(error) = deleted {
            tracing::warn!(%project, %error, "a parking queue is not deleted; it is read again later");
            parking.holds.hold(project, Duration::ZERO);
            return Ok(());
        }
        let _ = channel.close(200, "deleted".into()).await;
        self.registry(session, Some(project)).await?;
        parking.parked.remove(project);
        parking.registered.remove(project);
        parking.declared.remove(project);
        parking.holds.release(project);
        // The server replaces its list of the projects held back only with a report: without
        // one, the last (made before this) would name the project until the next step. A session
        // that has settled no task yet does not know which server's journal to tell, and the
        // list stays as it is until its first step.
        if let Some(journal) = parking.journal.clone() {
            let holding = parking.holding(None);
            self.report(session, &journal, &Step::default(), holding)
                .await?;
        }
        tracing::info!(projector = self.projector.name(), %project, "the project's parked tasks are applied; its deliveries flow again");
        Ok(())
    }

    /// Applies a batch until every delivery is settled; false when shutdown interrupted it (the
    /// unsettled deliveries return to their queue with the connection). Deliveries of held
    /// projects are parked; from the queue, so are those of projects with tasks parked before them.
    async fn settle_batch(
        &self,
        session: &Session<'_>,
        journal: &str,
        batch: Vec<Delivery>,
        from: Source,
        parking: &mut Parking,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, LinkError> {
        let name = self.projector.name();
        let count = batch.len();
        let mut tasks = Vec::with_capacity(count);
        let mut held = Vec::with_capacity(count);
        // Whether the run's journal is this consumer's deployment, decided at its first task.
        let mut ours = None;
        let mut foreign = Vec::new();
        for delivery in batch {
            let task = decode_task(&delivery.data);
            if task.is_ok() && !*ours.get_or_insert_with(|| self.works_for(journal)) {
                foreign.push(delivery);
                continue;
            }
            let parks = match &task {
                Ok(task) if from == Source::Queue => {
                    parking
                        .parks(session, self.broker, name, &task.project)
                        .await?
                }
                _ => false,
            };
            match task {
                Ok(task) if parks => {
                    parking
                        .park(session, self.broker, name, &task.project, delivery)
                        .await?;
                }
                Ok(task) => {
                    tasks.push(task);
                    held.push(delivery);
                }
                Err(error) => {
                    tracing::error!(projector = name, %error, "a message that is not a task goes to the dead-letter queue");
                    // A task's seq is in its fixed header even when the rest cannot be read: the
                    // server then keeps it as a dead letter instead of waiting for it for ever.
                    if let Some(seq) = delivery
                        .data
                        .get(..8)
                        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                    {
                        let dead =
                            DeadLetter::from_raw(name, seq, &delivery.data, UNREADABLE.into());
                        let step = Step {
                            dead: vec![dead],
                            ..Step::default()
                        };
                        let holding = parking.holding(None);
                        self.report(session, journal, &step, holding).await?;
                    }
                    settle(&delivery, false).await?;
                }
            }
        }
        if !foreign.is_empty() {
            self.refuse_foreign(journal, &foreign).await?;
        }
        if tasks.len() < count {
            // Something was parked or refused: commit it before applying the rest.
            session.channel.tx_commit().await?;
        }
        if !tasks.is_empty() && parking.journal.as_deref() != Some(journal) {
            parking.journal = Some(journal.to_string());
        }
        let mut attempt = 0;
        while !tasks.is_empty() {
            let step = self.step(&tasks, journal).await;
            let settled = step.settled();
            tracing::debug!(projector = name, settled, "step applied");
            let holding = parking.holding(step.held.as_ref());
            self.report(session, journal, &step, holding).await?;
            for (task, delivery) in tasks.iter().zip(&held).take(settled) {
                let refused = step.dead.iter().any(|d| d.seq == task.seq);
                settle(delivery, !refused).await?;
            }
            session.channel.tx_commit().await?;
            let failed = step.held.clone();
            parking
                .holds
                .went_through(&tasks[..settled], failed.as_ref());
            tasks.drain(..settled);
            held.drain(..settled);
            if let Some(project) = failed {
                // Only this project waits: its tasks are parked, in order, and the rest go on.
                tracing::warn!(projector = name, %project, error = ?step.retry, "the project's tasks were refused; they are parked, the others go on");
                parking.holds.hold(&project, step.held_cost);
                let (mut kept_tasks, mut kept) = (Vec::new(), Vec::new());
                for (task, delivery) in tasks.drain(..).zip(held.drain(..)) {
                    if task.project != project {
                        kept_tasks.push(task);
                        kept.push(delivery);
                    } else if from == Source::Parking {
                        // Back to the head of its parking queue, in order.
                        requeue(&delivery).await?;
                    } else {
                        parking
                            .park(session, self.broker, name, &task.project, delivery)
                            .await?;
                    }
                }
                session.channel.tx_commit().await?;
                (tasks, held) = (kept_tasks, kept);
                continue;
            }
            if let Some(error) = step.retry {
                tracing::warn!(projector = name, %error, attempt, "projection failed; retrying");
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
    async fn step(&self, tasks: &[Task], journal: &str) -> Step {
        // A drop's project is read again with its tasks (`CatalogView::snapshot_for`).
        match self.view.snapshot_for(tasks, journal).await {
            Ok(snapshot) => step::apply(self.projector, &snapshot, tasks).await,
            // One project's catalog cannot be read: the first project's tasks are tried alone,
            // and if they fail so, that project is held while the others go on.
            Err(error) if error.scoped => {
                let first = &tasks[0].project;
                let own = tasks.iter().take_while(|t| &t.project == first).count();
                if own < tasks.len() {
                    return Box::pin(self.step(&tasks[..own], journal)).await;
                }
                Step {
                    retry: Some(error),
                    held: Some(first.clone()),
                    ..Step::default()
                }
            }
            Err(error) => Step {
                retry: Some(error),
                ..Step::default()
            },
        }
    }

    /// Sends the step's report to the server and waits for the broker to take it.
    async fn report(
        &self,
        session: &Session<'_>,
        journal: &str,
        step: &Step,
        held: Vec<Ident>,
    ) -> Result<(), LinkError> {
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
            held: Some(held),
        };
        session.keep(report);
        self.send_unsent(session).await?;
        // Past what may be kept, the deliveries wait for the alarm to end.
        while session.unsent_bytes() > MOST_UNSENT {
            tokio::time::sleep(UNSENT_CHECK).await;
            self.send_unsent(session).await?;
        }
        Ok(())
    }

    /// Sends the kept reports, in order, unless the publishing connection is blocked; one the
    /// connection is blocked while it waits for is kept to be sent again (recording a report
    /// twice is harmless).
    async fn send_unsent(&self, session: &Session<'_>) -> Result<(), LinkError> {
        while let Some(report) = session.first_unsent() {
            let body = serde_json::to_vec(&report)
                .map_err(|e| LinkError::Other(format!("cannot encode a report: {e}")))?;
            let id = format!(
                "{}-{}",
                report.projector,
                report.applied.last().unwrap_or(&0)
            );
            let queue = self.broker.reports_queue();
            if !publish_unless_blocked(session, &queue, true, &body, persistent(id)).await? {
                return Ok(());
            }
            session.sent_first();
        }
        Ok(())
    }
}

/// Most bytes of reports a consumer keeps while its publishing connection is blocked (about a
/// million tasks applied): past them, its deliveries wait.
const MOST_UNSENT: usize = 16 << 20;

/// Most bytes of one report kept: kept reports are merged up to it, so that none grows past what
/// a broker takes in one message (RabbitMQ 4: 16 MiB).
const MOST_MERGED: usize = 1 << 20;

/// How often kept reports are tried again while the publishing connection is blocked.
const UNSENT_CHECK: Duration = Duration::from_millis(500);

/// Resolves once `connection` is blocked by a resource alarm.
async fn blocked(connection: &Connection) {
    while !connection.status().blocked() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consumer's connection and its channel of deliveries (transactional), its publishing
/// connection and channel (with confirms), and the reports not sent yet, oldest first.
struct Session<'a> {
    connection: &'a Connection,
    channel: &'a Channel,
    publisher: &'a Connection,
    out: &'a Channel,
    unsent: std::sync::Mutex<std::collections::VecDeque<Report>>,
}

impl Session<'_> {
    /// Keeps `report` to be sent after the others kept, merged into the last when neither
    /// records a migration; one heavier than [`MOST_MERGED`] is kept in parts ([`split`]).
    fn keep(&self, report: Report) {
        let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        for report in split(report) {
            Self::keep_part(&mut unsent, report);
        }
    }

    fn keep_part(unsent: &mut std::collections::VecDeque<Report>, report: Report) {
        match unsent.back_mut() {
            Some(last)
                if last.journal == report.journal
                    && (last.migration.is_none() || report.migration.is_none())
                    && weight(last) + weight(&report) <= MOST_MERGED =>
            {
                last.applied.extend(report.applied);
                last.refused.extend(report.refused);
                last.migration = last.migration.take().or(report.migration);
                last.error = report.error;
                last.held = report.held;
            }
            _ => unsent.push_back(report),
        }
    }

    fn first_unsent(&self) -> Option<Report> {
        let unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        unsent.front().cloned()
    }

    fn sent_first(&self) {
        let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        unsent.pop_front();
    }

    fn holds_unsent(&self) -> bool {
        !self
            .unsent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// About the bytes the kept reports hold.
    fn unsent_bytes(&self) -> usize {
        let unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        unsent.iter().map(weight).sum()
    }
}

/// `report` in parts of at most [`MOST_MERGED`] bytes each (a part of one refusal heavier than
/// that, alone), in its order: a step of thousands of refusals, each with its store's words,
/// would otherwise be a message the broker refuses (RabbitMQ 4 takes at most 16 MiB), and the
/// step would be applied and refused again for ever. Recording a report is per task, so its parts
/// record what it would; the migration goes with the first, and each says what the whole does
/// of the consumer's error and its held projects.
fn split(report: Report) -> Vec<Report> {
    if weight(&report) <= MOST_MERGED {
        return vec![report];
    }
    let Report {
        projector,
        journal,
        applied,
        refused,
        migration,
        error,
        held,
    } = report;
    let part = |applied: Vec<u64>, refused: Vec<Refusal>| Report {
        projector: projector.clone(),
        journal: journal.clone(),
        applied,
        refused,
        migration: None,
        error: error.clone(),
        held: held.clone(),
    };
    let mut parts: Vec<Report> = applied
        .chunks((MOST_MERGED - 256) / 21)
        .map(|seqs| part(seqs.to_vec(), Vec::new()))
        .collect();
    let mut refusals = Vec::new();
    let mut bytes = 0;
    for refusal in refused {
        let more = refusal_weight(&refusal);
        if !refusals.is_empty() && 256 + bytes + more > MOST_MERGED {
            parts.push(part(Vec::new(), std::mem::take(&mut refusals)));
            bytes = 0;
        }
        bytes += more;
        refusals.push(refusal);
    }
    if !refusals.is_empty() || parts.is_empty() {
        parts.push(part(Vec::new(), refusals));
    }
    parts[0].migration = migration;
    parts
}

/// About the bytes of a report, kept or encoded: a seq applied is at most 21 bytes of JSON, a
/// refusal its reason and time.
fn weight(report: &Report) -> usize {
    let refused: usize = report.refused.iter().map(refusal_weight).sum();
    report.applied.len() * 21 + refused + 256
}

fn refusal_weight(refusal: &Refusal) -> usize {
    refusal.reason.len() + refusal.at.len() + 48
}

/// Where a delivery came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The projector's queue.
    Queue,
    /// The head of its project's parking queue.
    Parking,
}

/// How often a consumer that is not the only one asks again whether it is (see the module's
/// documentation).
const ACTIVE_CHECK: Duration = Duration::from_secs(5);

/// How long a consumer that became the active one waits before it reads the parking state. The
/// broker gives back what the previous active consumer held unacknowledged queue by queue, as each
/// learns that its channel closed, and `basic_get` does not wait for that: read at once, a parking
/// queue could look empty (and be deleted) or shorter than it is. This narrows that window to
/// a broker slower than a second to notice, not closes it.
const TAKE_OVER_GRACE: Duration = Duration::from_secs(1);

/// How often a consumer asks whether its queue, missing, has been declared.
const QUEUE_CHECK: Duration = Duration::from_millis(500);

/// What this session knows of parked tasks.
#[derive(Default)]
struct Parking {
    holds: Holds,
    /// Projects with a parking queue, with when this session last tried one (none: not yet).
    parked: HashMap<Ident, Option<Instant>>,
    /// Projects this session checked for a parking queue made before it.
    checked: HashSet<Ident>,
    /// Projects the registry names (as this session read or wrote it).
    registered: HashSet<Ident>,
    /// Whether this session is the active consumer and read the registry.
    known: bool,
    /// Projects whose parking queue this session declared.
    declared: HashSet<Ident>,
    /// The journal of the tasks this session last settled, whose server its reports go to.
    journal: Option<String>,
    /// Deliveries to park, in order, set aside unacknowledged while the publishing connection is
    /// blocked.
    aside: std::collections::VecDeque<(Ident, Delivery)>,
}

impl Parking {
    /// Whether a delivery of `project` from the queue must be parked: its project is held, or
    /// older tasks of it are parked (asked of the broker the first time the session meets it).
    async fn parks(
        &mut self,
        session: &Session<'_>,
        broker: &Broker,
        projector: &str,
        project: &Ident,
    ) -> Result<bool, LinkError> {
        if self.holds.is_held(project) || self.parked.contains_key(project) {
            return Ok(true);
        }
        if self.checked.insert(project.clone())
            && broker
                .parked_exists(session.connection, projector, project)
                .await?
        {
            self.parked.insert(project.clone(), None);
            return Ok(true);
        }
        Ok(false)
    }

    /// The projects held back once a step that holds `now` is settled: those held, those with a
    /// parking queue, and `now`.
    fn holding(&self, now: Option<&Ident>) -> Vec<Ident> {
        let mut held: Vec<Ident> = self.holds.known();
        held.extend(self.parked.keys().cloned());
        held.extend(now.cloned());
        held.sort();
        held.dedup();
        held
    }

    /// The parked project to try next and how long until its hold ends; of those due, the one
    /// tried longest ago. A project with deliveries set aside is tried at most every
    /// [`UNSENT_CHECK`]: its parking queue may be empty until they are parked (and is not let go
    /// meanwhile, see `retry`).
    fn next_due(&self) -> Option<(Ident, Duration)> {
        self.parked
            .iter()
            .map(|(project, tried)| {
                let mut wait = self.holds.wait(project);
                if self.sets_aside(project) {
                    let since = tried.map_or(UNSENT_CHECK, |at| at.elapsed());
                    wait = wait.max(UNSENT_CHECK.saturating_sub(since));
                }
                (project, wait, *tried)
            })
            .min_by_key(|(_, wait, tried)| (*wait, *tried))
            .map(|(project, wait, _)| (project.clone(), wait))
    }

    /// Whether deliveries of `project` are set aside, waiting to be parked.
    fn sets_aside(&self, project: &Ident) -> bool {
        self.aside.iter().any(|(aside, _)| aside == project)
    }

    /// Publishes a copy of `delivery` at the end of `project`'s parking queue and acknowledges it
    /// (at the channel's next commit), after the deliveries set aside before it. The first task of
    /// a project parked makes its queue and its registry entry. While the publishing connection is
    /// blocked by a resource alarm, the delivery is set aside, unacknowledged, in order.
    async fn park(
        &mut self,
        session: &Session<'_>,
        broker: &Broker,
        projector: &str,
        project: &Ident,
        delivery: Delivery,
    ) -> Result<(), LinkError> {
        self.parked.entry(project.clone()).or_insert(None);
        self.aside.push_back((project.clone(), delivery));
        self.park_aside(session, broker, projector).await.map(drop)
    }

    /// Parks the deliveries set aside, in order, until the publishing connection is blocked;
    /// answers how many it acknowledged (to be committed).
    async fn park_aside(
        &mut self,
        session: &Session<'_>,
        broker: &Broker,
        projector: &str,
    ) -> Result<usize, LinkError> {
        let mut parked = 0;
        while let Some((project, delivery)) = self.aside.front() {
            let queue = broker.project_parked_queue(projector, project);
            // Declared once a session; a queue deleted from outside since returns the copy,
            // which is published `mandatory`: the session ends, and the next one declares it.
            if self.declared.insert(project.clone()) {
                broker
                    .declare_parked(session.channel, projector, project)
                    .await?;
            }
            if !self.registered.contains(project) {
                let registry = broker.parked_queue(projector);
                let entry = project.as_str().as_bytes();
                let properties = persistent(format!("parked-{project}"));
                if !publish_unless_blocked(session, &registry, false, entry, properties).await? {
                    return Ok(parked);
                }
                self.registered.insert(project.clone());
            }
            // The copy is confirmed before the delivery is acknowledged: a crash (or an alarm)
            // between the two parks the task twice, which is harmless (applying it twice is).
            let properties = delivery.properties.clone();
            if !publish_unless_blocked(session, &queue, true, &delivery.data, properties).await? {
                return Ok(parked);
            }
            settle(delivery, true).await?;
            self.aside.pop_front();
            parked += 1;
        }
        Ok(parked)
    }
}

/// Publishes on the session's publishing channel and waits for the broker's confirmation; false,
/// with nothing known of the message, when the publishing connection is or becomes blocked by a
/// resource alarm first (lapin writes nothing on a blocked connection).
async fn publish_unless_blocked(
    session: &Session<'_>,
    queue: &str,
    mandatory: bool,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<bool, LinkError> {
    if session.publisher.status().blocked() {
        return Ok(false);
    }
    let published = async {
        let confirm = session
            .out
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?;
        confirmed(confirm).await
    };
    tokio::select! {
        answer = published => answer.map(|()| true),
        () = blocked(session.publisher) => Ok(false),
    }
}

/// Why a consumer refuses a message it cannot read as a task; the server takes such a refusal
/// only when its own copy of the task cannot be read either (`reports::record`).
pub(super) const UNREADABLE: &str = "the consumer could not read the task";

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

/// Whether a delivery is a probe (see [`PROBE_HEADER`]).
fn is_probe(delivery: &Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|headers| {
            headers
                .inner()
                .iter()
                .any(|(name, _)| name.as_str() == PROBE_HEADER)
        })
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

/// Returns a delivery to its place in its queue (at the channel's next commit).
async fn requeue(delivery: &Delivery) -> Result<(), LinkError> {
    let sent = delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await?;
    settled(sent)
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
    settled(sent)
}

/// Whether the acker sent its answer: not when the channel closed first.
fn settled(sent: bool) -> Result<(), LinkError> {
    if sent {
        Ok(())
    } else {
        Err(LinkError::Other(
            "the channel closed before a delivery was settled".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::step::MigrationRecord;

    fn report(
        applied: std::ops::Range<u64>,
        refused: std::ops::Range<u64>,
        reason: usize,
    ) -> Report {
        Report {
            projector: "postgresql".into(),
            journal: "journal".into(),
            applied: applied.collect(),
            refused: refused
                .map(|seq| Refusal {
                    seq,
                    reason: "é".repeat(reason / 2),
                    at: "2026-12-07T00:00:00.000Z".into(),
                })
                .collect(),
            migration: Some(MigrationRecord {
                project: Ident::parse("p").unwrap(),
                version: 2,
                state: crate::catalog::MigrationState::Done,
                task: Some(7),
            }),
            error: Some("the store is down".into()),
            held: Some(vec![Ident::parse("q").unwrap()]),
        }
    }

    #[test]
    fn a_report_heavier_than_a_message_is_kept_in_parts_that_record_the_same() {
        let whole = report(0..120_000, 200_000..205_000, 1000);
        let parts = split(whole.clone());
        assert!(parts.len() > 5, "{} parts", parts.len());
        for part in &parts {
            let bytes = serde_json::to_vec(part).unwrap().len();
            assert!(bytes <= MOST_MERGED, "a part of {bytes} bytes");
            assert_eq!(part.error, whole.error);
            assert_eq!(part.held, whole.held);
        }
        let applied: Vec<u64> = parts.iter().flat_map(|p| p.applied.clone()).collect();
        assert_eq!(applied, whole.applied);
        let refused: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.refused.iter().map(|r| r.seq))
            .collect();
        assert_eq!(refused, (200_000..205_000).collect::<Vec<_>>());
        assert!(parts[0].migration.is_some());
        assert!(parts[1..].iter().all(|p| p.migration.is_none()));

        let light = report(0..10, 10..12, 100);
        assert_eq!(split(light.clone()).len(), 1);
        // One refusal past the limit alone is a part of its own.
        let heavy = report(0..1, 1..3, 2 * MOST_MERGED);
        assert_eq!(split(heavy).len(), 3);
    }
}
