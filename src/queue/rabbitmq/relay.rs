//! The relay: publishes the journal's pending tasks to the broker, in seq order per projector.
//!
//! Per projector it keeps a cursor, the last seq the broker confirmed; tasks above it are the outbox.
//! A batch is published (persistent, `message_id` = seq, the journal's id in a header), every
//! confirmation awaited, and only then the cursor moves. The tasks themselves stay in the journal
//! until a consumer's report says they were applied.
//!
//! A session starts by publishing again every task above the cursor — a failed session may have
//! published some of them — from one consistent view of the journal, so what it re-sends is a whole
//! tail of each queue (see `journal::outbox`). A projector's queue that is missing from the broker
//! (deleted, or a broker that lost its data) gets every pending task again: the relay finds it
//! missing at the start of a session, or by an unroutable publish, or by asking every few seconds
//! while idle, and only the relay declares it (consumers wait for it). Later tasks were never
//! published and go out as they come.
//!
//! Tasks, or the reports of them, can also be lost inside a broker whose queue stays: a purge, a
//! length or TTL policy, a broker restored from its definitions. Their tasks would stay pending
//! for ever. While idle, the relay also watches each projector's oldest pending task: when it has
//! stayed the oldest for `queue.republish_after_secs` while the queue holds no message ready, every
//! pending task of the projector is published again (applying a task twice is harmless), and the
//! wait doubles while that goes on, up to an hour. The projects with a parking queue are left out
//! of both: a held project keeps its tasks pending on purpose there, so the oldest task watched is
//! the oldest of another project, and what is published again leaves out the held projects' tasks
//! already published (they are in their parking queues), so a held project never stops the others'
//! lost tasks from being found, and its backlog is never parked twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::watch;

use super::{confirmed, persistent, Broker, LinkError, JOURNAL_HEADER};
use crate::blueprint::Ident;
use crate::journal::{codec, DeadLetter, Journal, JournalError, RawTask};

/// How often an idle relay checks that every projector's queue is still there.
const QUEUE_CHECK: Duration = Duration::from_secs(5);

/// The longest wait between two publishings again of a projector's pending tasks.
const MOST_REPUBLISH_WAIT: Duration = Duration::from_secs(3600);

/// A projector's oldest pending task outside the projects found parked, since when it has been
/// the oldest, and how long it may stay so while its queue is empty before its tasks are published
/// again.
#[derive(Clone)]
struct Stall {
    /// 0 when every pending task is of a project in `parked`.
    oldest: u64,
    /// Where the next look starts: every pending task before it is of a project in `parked`.
    scan_from: u64,
    since: tokio::time::Instant,
    wait: Duration,
    /// The projects of the projector found with a parking queue at the last look: their tasks are
    /// passed over to find `oldest`, and left out when tasks are published again.
    parked: HashSet<Ident>,
}

/// Per projector, the projects whose tasks a publishing again leaves out, up to which seq: those
/// the broker confirmed before, which are in their parking queues.
type Skip = HashMap<&'static str, (HashSet<Ident>, u64)>;

/// Relays `projector`'s tasks until `shutdown` turns true. Each projector has a relay of its
/// own, on a connection of its own (`relay {projector}` in `/_health/ready`'s links): a queue
/// whose publishes fail (a policy refusing them, its node down, confirmations that do not come)
/// ends only its relay's sessions, and the other projectors' tasks go on.
pub async fn run(
    journal: Arc<Journal>,
    broker: Arc<Broker>,
    projector: &'static str,
    batch_size: usize,
    shutdown: watch::Receiver<bool>,
) {
    let link = format!("relay {projector}");
    let relay = Relay {
        journal: &journal,
        broker: &broker,
        projectors: &[projector],
        link: &link,
        batch_size,
        stalls: Mutex::default(),
        max_message: AtomicUsize::new(broker.settings.max_message_bytes),
    };
    let session = |connection| relay.session(connection, shutdown.clone());
    broker.keep_linked(&link, shutdown.clone(), session).await;
}

struct Relay<'a> {
    journal: &'a Journal,
    broker: &'a Broker,
    /// The one projector relayed (a session's steps are written for any number).
    projectors: &'a [&'static str],
    link: &'a str,
    batch_size: usize,
    /// Kept across sessions, so that a link that drops often does not hide lost tasks.
    stalls: Mutex<HashMap<&'static str, Stall>>,
    /// The largest task the broker takes: `queue.max_message_bytes`, or less once the broker
    /// refused a task naming its own limit.
    max_message: AtomicUsize,
}

/// Per projector, the last seq the broker confirmed in this session.
type Cursors = HashMap<&'static str, u64>;

impl Relay<'_> {
    async fn session(
        &self,
        connection: Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let mut cursors = Cursors::new();
        for projector in self.projectors {
            let cursor = if self.broker.queue_exists(&connection, projector).await? {
                self.journal.published(projector).map_err(journal)?
            } else {
                tracing::warn!(
                    projector,
                    queue = %self.broker.queue(projector),
                    "the broker has no queue for this projector; publishing every pending task again"
                );
                0
            };
            cursors.insert(*projector, cursor);
        }
        let channel = connection.create_channel().await?;
        for projector in self.projectors {
            self.broker
                .declare_projector(&connection, &channel, projector)
                .await?;
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.broker.set_link(self.link, true, None);

        self.publish_tails(&channel, &mut cursors, &Skip::new())
            .await?;

        let mut checked = tokio::time::Instant::now();
        loop {
            let published = self
                .publish_round(&channel, &mut cursors, &Skip::new(), |p, after| {
                    self.journal.outbox(p, after, self.batch_size)
                })
                .await?;
            if published > 0 {
                if *shutdown.borrow() {
                    return Ok(());
                }
                // Under sustained writes the checks below still run every few seconds: a purge
                // under load is found as when idle.
                if checked.elapsed() < QUEUE_CHECK {
                    continue;
                }
            } else {
                // Idle: let every lane see what its consumers reported (nothing else refreshes
                // them).
                for projector in self.projectors {
                    let _ = self.journal.refresh_progress(projector);
                }
            }
            // A queue deleted while nothing is published would go unnoticed until the next task:
            // the session starts over, and the new one publishes every pending task again.
            if checked.elapsed() >= QUEUE_CHECK {
                checked = tokio::time::Instant::now();
                let mut skip = Skip::new();
                for projector in self.projectors {
                    let Some(depth) = self.broker.queue_depth(&connection, projector).await? else {
                        let queue = self.broker.queue(projector);
                        return Err(LinkError::Other(format!("queue {queue} vanished")));
                    };
                    if let Some((from, parked)) = self.lost(&connection, projector, depth).await? {
                        let confirmed = cursors.insert(projector, from).unwrap_or(0);
                        skip.insert(projector, (parked, confirmed));
                    }
                }
                if !skip.is_empty() {
                    self.publish_tails(&channel, &mut cursors, &skip).await?;
                }
            }
            if published > 0 {
                continue;
            }
            tokio::select! {
                _ = self.journal.wait_for_commit(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Publishes every pending task above each cursor from one consistent view of the journal, so
    /// that what goes out again is a whole tail of each queue (see `journal::outbox`); tasks
    /// committed after the view was taken were never published and follow as usual.
    async fn publish_tails(
        &self,
        channel: &Channel,
        cursors: &mut Cursors,
        skip: &Skip,
    ) -> Result<(), LinkError> {
        let view = self.journal.outbox_view();
        while self
            .publish_round(channel, cursors, skip, |p, after| {
                view.read(p, after, self.batch_size)
            })
            .await?
            > 0
        {}
        for cursor in cursors.values_mut() {
            *cursor = (*cursor).max(view.until);
        }
        Ok(())
    }

    /// Where to publish `projector`'s pending tasks again from, and the projects to leave out,
    /// when its oldest pending task outside the parked projects has stayed the oldest for its
    /// wait while its queue held no message (`depth`): the broker lost the tasks, or the
    /// consumers' reports of them. The projects with a parking queue are looked up once a wait:
    /// a held project's tasks wait there on purpose, and publishing them again would only add
    /// its whole backlog to its parking queue once more at every wait.
    async fn lost(
        &self,
        connection: &Connection,
        projector: &'static str,
        depth: u32,
    ) -> Result<Option<(u64, HashSet<Ident>)>, LinkError> {
        let (known, scan_from) = match self.stalls.lock().expect("stalls lock").get(projector) {
            Some(stall) => (stall.parked.clone(), stall.scan_from),
            None => Default::default(),
        };
        let now = tokio::time::Instant::now();
        let (found, scanned) = self.oldest_outside(projector, &known, scan_from)?;
        let Some((oldest, project)) = found else {
            if known.is_empty() {
                self.stalls.lock().expect("stalls lock").remove(projector);
            } else {
                self.only_parked(connection, projector, known, scanned, now)
                    .await?;
            }
            return Ok(None);
        };
        let pending_for = {
            let mut stalls = self.stalls.lock().expect("stalls lock");
            let fresh = Stall {
                oldest,
                scan_from: oldest,
                since: now,
                wait: Duration::from_secs(self.broker.settings.republish_after_secs),
                parked: known.clone(),
            };
            let stall = stalls.entry(projector).or_insert_with(|| fresh.clone());
            if stall.oldest != oldest {
                *stall = fresh;
                return Ok(None);
            }
            // While a resource alarm blocks the relay's own publishes, consumers keep their
            // reports (see `consumer`): the oldest task stays pending though applied, and its
            // wait starts over once the alarm is past.
            if connection.status().blocked() {
                stall.since = now;
                return Ok(None);
            }
            if depth > 0 || now.duration_since(stall.since) < stall.wait {
                return Ok(None);
            }
            now.duration_since(stall.since)
        };
        // Which projects are parked now: those found before, and the oldest task's.
        let candidates: Vec<Ident> = known.iter().chain([&project]).cloned().collect();
        let parked = self.parked_now(connection, projector, &candidates).await?;
        let mut stalls = self.stalls.lock().expect("stalls lock");
        let Some(stall) = stalls.get_mut(projector) else {
            return Ok(None);
        };
        stall.since = now;
        let released = known.iter().any(|p| !parked.contains(p));
        stall.parked = parked.clone();
        if parked.contains(&project) || released {
            // The oldest task outside the parked projects is another now: the next look finds it
            // (from the first task again, when a project was released).
            stall.scan_from = if released { 0 } else { oldest };
            return Ok(None);
        }
        tracing::warn!(
            projector,
            oldest,
            pending_for_secs = pending_for.as_secs(),
            parked = parked.len(),
            "the projector's oldest task stays pending while its queue is empty: the broker lost \
             tasks or their reports; publishing its pending tasks again"
        );
        stall.wait = (stall.wait * 2).min(MOST_REPUBLISH_WAIT);
        Ok(Some((oldest - 1, parked)))
    }

    /// When every pending task of `projector` is of a project found parked (`known`): the next
    /// look starts where this one's scan ended (`scanned`), not at a held backlog's first task,
    /// and once a wait the projects are asked again whether they are still parked (one released
    /// has its tasks looked at again, from the first).
    async fn only_parked(
        &self,
        connection: &Connection,
        projector: &'static str,
        known: HashSet<Ident>,
        scanned: u64,
        now: tokio::time::Instant,
    ) -> Result<(), LinkError> {
        let due = {
            let mut stalls = self.stalls.lock().expect("stalls lock");
            let stall = stalls.entry(projector).or_insert_with(|| Stall {
                oldest: 0,
                scan_from: scanned,
                since: now,
                wait: Duration::from_secs(self.broker.settings.republish_after_secs),
                parked: known.clone(),
            });
            stall.oldest = 0;
            stall.scan_from = scanned;
            let due = now.duration_since(stall.since) >= stall.wait;
            if due {
                stall.since = now;
            }
            due
        };
        if !due {
            return Ok(());
        }
        let known: Vec<Ident> = known.into_iter().collect();
        let parked = self.parked_now(connection, projector, &known).await?;
        if parked.len() < known.len() {
            let mut stalls = self.stalls.lock().expect("stalls lock");
            if let Some(stall) = stalls.get_mut(projector) {
                stall.scan_from = 0;
                stall.parked = parked;
            }
        }
        Ok(())
    }

    /// Those of `projects` that have a parking queue of `projector` now.
    async fn parked_now(
        &self,
        connection: &Connection,
        projector: &str,
        projects: &[Ident],
    ) -> Result<HashSet<Ident>, LinkError> {
        let mut parked = HashSet::new();
        for project in projects {
            if self
                .broker
                .parked_exists(connection, projector, project)
                .await?
            {
                parked.insert(project.clone());
            }
        }
        Ok(parked)
    }

    /// The seq and project of `projector`'s oldest pending task of a project not in `parked`, at
    /// `from` or after (every task before `from` is of a project in `parked`), and the seq the
    /// scan ended before.
    fn oldest_outside(
        &self,
        projector: &str,
        parked: &HashSet<Ident>,
        mut from: u64,
    ) -> Result<(Option<(u64, Ident)>, u64), LinkError> {
        loop {
            let pending = self
                .journal
                .pending_from(projector, from, 1, |p| parked.contains(p))
                .map_err(journal)?;
            if let Some(task) = pending.tasks.into_iter().next() {
                return Ok((Some((task.seq, task.project)), task.seq));
            }
            if pending.first_seen.is_some() {
                from = from.max(pending.last_seen + 1);
            }
            if !pending.cut_short {
                return Ok((None, from));
            }
        }
    }

    /// Publishes one batch per projector from `read`, but for the tasks `skip` leaves out, awaits
    /// every confirmation, then moves and stores the cursors. Answers how many tasks were read.
    async fn publish_round(
        &self,
        channel: &Channel,
        cursors: &mut Cursors,
        skip: &Skip,
        read: impl Fn(&str, u64) -> Result<Vec<RawTask>, JournalError>,
    ) -> Result<usize, LinkError> {
        let mut published = 0;
        for projector in self.projectors {
            let cursor = cursors.get_mut(projector).expect("a cursor per projector");
            let tasks = read(projector, *cursor).map_err(journal)?;
            let Some(last) = tasks.last().map(|(seq, _)| *seq) else {
                continue;
            };
            let taken = tasks.len();
            let tasks = match skip.get(projector) {
                Some((parked, until)) => tasks
                    .into_iter()
                    .filter(|(seq, value)| {
                        *seq > *until
                            || !codec::decode_own_task(value)
                                .is_ok_and(|task| parked.contains(&task.project))
                    })
                    .collect(),
                None => tasks,
            };
            let tasks = self.bury_oversized(projector, tasks)?;
            let mut confirms = Vec::with_capacity(tasks.len());
            for (seq, value) in &tasks {
                let published = channel
                    .basic_publish(
                        self.broker.exchange().as_str().into(),
                        (*projector).into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        value,
                        self.properties(*seq),
                    )
                    .await;
                match published {
                    Ok(confirm) => confirms.push(confirm),
                    Err(error) => {
                        // The broker closes the channel on a message over its size: the next
                        // publish of the batch fails without the size, which only the earlier
                        // publish's confirmation names. Read them (they end at once on a closed
                        // channel) so the limit is learned and the next session goes past it.
                        let earlier =
                            futures::future::join_all(confirms.into_iter().map(confirmed));
                        if let Ok(answers) = tokio::time::timeout(LEARN_WAIT, earlier).await {
                            for refused in answers.into_iter().filter_map(Result::err) {
                                self.learn_limit(refused);
                            }
                        }
                        return Err(self.learn_limit(error.into()));
                    }
                }
            }
            futures::future::try_join_all(confirms.into_iter().map(confirmed))
                .await
                .map_err(|error| self.learn_limit(error))?;
            *cursor = last;
            self.journal
                .mark_published(projector, last)
                .map_err(journal)?;
            published += taken;
        }
        Ok(published)
    }

    fn properties(&self, seq: u64) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            JOURNAL_HEADER.into(),
            AMQPValue::LongString(self.journal.id().into()),
        );
        persistent(seq.to_string()).with_headers(headers)
    }
}

impl Relay<'_> {
    /// Makes the tasks larger than the broker takes dead letters saying so, and answers the others:
    /// the broker would refuse such a task every time, and every later task of the projector, of
    /// every project, would wait behind it for ever. `POST /_dead_letters/_retry` queues them
    /// again once the broker takes them.
    fn bury_oversized(
        &self,
        projector: &str,
        tasks: Vec<RawTask>,
    ) -> Result<Vec<RawTask>, LinkError> {
        let most = self.max_message.load(Ordering::Relaxed);
        if tasks.iter().all(|(_, value)| value.len() <= most) {
            return Ok(tasks);
        }
        let (kept, oversized): (Vec<RawTask>, Vec<RawTask>) = tasks
            .into_iter()
            .partition(|(_, value)| value.len() <= most);
        let dead: Vec<DeadLetter> = oversized
            .iter()
            .map(|(seq, value)| {
                let reason = format!(
                    "the broker takes messages of at most {most} bytes (RabbitMQ's \
                     max_message_size, queue.max_message_bytes) and this task is {} bytes (its \
                     item as every live version sees it): raise both, or retire versions, then \
                     retry it",
                    value.len()
                );
                DeadLetter::from_raw(projector, *seq, value, reason)
            })
            .collect();
        tracing::warn!(
            projector,
            tasks = dead.len(),
            most,
            "tasks larger than the broker takes are kept as dead letters"
        );
        self.journal.ack(projector, &[], dead).map_err(journal)?;
        Ok(kept)
    }

    /// Notes the limit a broker names when it refuses a message for its size, so the next session
    /// keeps such tasks out; answers the error.
    /// Notes the broker's size limit when `error` is its refusal of a message for its size
    /// ([`refused_size`]); answers the error.
    fn learn_limit(&self, error: LinkError) -> LinkError {
        if let Some(most) = refused_size(&error.to_string()) {
            let was = self.max_message.fetch_min(most, Ordering::Relaxed);
            if most < was {
                tracing::warn!(
                    most,
                    "the broker refuses messages over {most} bytes (max_message_size); larger \
                     tasks become dead letters"
                );
            }
        }
        error
    }
}

/// How long a failed batch waits for its earlier publishes' confirmations, to learn from them
/// the broker's size limit.
const LEARN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The limit in a broker's refusal of a message for its size (RabbitMQ: "message size N is larger
/// than configured max size M").
fn refused_size(error: &str) -> Option<usize> {
    let (_, after) = error.split_once("larger than configured max size ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn journal(error: JournalError) -> LinkError {
    LinkError::Other(format!("journal: {error}"))
}

#[cfg(test)]
mod tests {
    use super::refused_size;

    /// RabbitMQ names its limit when it refuses a message for its size; other errors name none.
    #[test]
    fn the_limit_a_broker_names_is_read_from_its_refusal() {
        let refusal = "rabbitmq: protocol error: AMQP soft error: PRECONDITION-FAILED: \
                       PRECONDITION_FAILED - message size 20971520 is larger than configured max \
                       size 16777216";
        assert_eq!(refused_size(refusal), Some(16_777_216));
        assert_eq!(refused_size("rabbitmq: connection reset by peer"), None);
        assert_eq!(refused_size("larger than configured max size "), None);
    }
}
