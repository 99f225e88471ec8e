//! Tasks through RabbitMQ: the journal's outbox is relayed to the broker, projectors consume it in
//! this process or in `dstore worker` processes, and report back what they applied.
//!
//! Topology, all durable, every name prefixed by `queue.namespace` (`dstore` below):
//! - exchange `dstore.tasks` (direct) → queue `dstore.{projector}` per projector, bound by its name.
//!   The queue has a single active consumer, so tasks are applied in order even when several workers
//!   of a projector run (the others stand by), and dead-letters to
//! - exchange `dstore.dead` (direct) → queue `dstore.{projector}.dead`: tasks a store refused for good
//!   and messages no consumer could read, for broker tools. It keeps the newest 100,000 messages;
//!   the list dstore serves and retries from (`/_dead_letters`) is the journal's.
//! - queue `dstore.{projector}.parked.{project}` per project held back by a failed migration: its
//!   tasks, in order, moved out of the way so they take no room in the consumer's prefetch window
//!   ([`consumer`]); applied from its head when the project is tried again, and deleted once empty.
//!   Dead-letters like the projector's queue. Queue `dstore.{projector}.parked` names them.
//! - queue `dstore.reports`: what consumers applied, refused and migrated, for the server's journal.
//!
//! The journal stays the source of truth. A task stays in it until a report says its projector
//! applied it; the relay's cursor only says how far the broker has confirmed ([`relay`]). Consumers
//! acknowledge a delivery only after the store applied it and the report was confirmed
//! ([`consumer`]), so a crash anywhere means a redelivery, never a loss, and redelivery is harmless
//! because every store applies by revision. Each loop reconnects with capped backoff on its own.

pub mod consumer;
pub mod relay;
pub mod reports;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use tokio::sync::watch;

use crate::blueprint::Ident;
use crate::config::QueueSettings;
use crate::projector::backoff;

/// The message header carrying the id of the journal a task comes from; reports repeat it, and the
/// server records only reports about its own journal's tasks.
pub const JOURNAL_HEADER: &str = "dstore-journal";

/// The header of a probe: a message a consumer sends its own queue to learn whether it is the
/// active consumer (only the active one receives it); consumers drop probes.
pub const PROBE_HEADER: &str = "dstore-probe";

/// A failure of one session with the broker; the loop reconnects after it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Other(String),
}

/// The broker settings and how each of this process's links to it is doing (for `/_health/ready`).
pub struct Broker {
    pub settings: QueueSettings,
    links: Mutex<BTreeMap<String, LinkState>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkState {
    pub connected: bool,
    pub last_error: Option<String>,
}

impl Broker {
    pub fn new(settings: QueueSettings) -> Broker {
        Broker {
            settings,
            links: Mutex::default(),
        }
    }

    fn exchange(&self) -> String {
        format!("{}.tasks", self.settings.namespace)
    }

    fn dead_exchange(&self) -> String {
        format!("{}.dead", self.settings.namespace)
    }

    /// The queue a projector consumes.
    pub fn queue(&self, projector: &str) -> String {
        format!("{}.{projector}", self.settings.namespace)
    }

    /// Where a projector's refused tasks end up.
    pub fn dead_queue(&self, projector: &str) -> String {
        format!("{}.{projector}.dead", self.settings.namespace)
    }

    /// The registry of a projector's parking queues: one message naming each project that has one.
    pub fn parked_queue(&self, projector: &str) -> String {
        format!("{}.{projector}.parked", self.settings.namespace)
    }

    /// Where a projector's consumer keeps a held project's tasks.
    pub fn project_parked_queue(&self, projector: &str, project: &Ident) -> String {
        format!("{}.{projector}.parked.{project}", self.settings.namespace)
    }

    /// Declares a project's parking queue (idempotent): refused tasks go where the projector's do.
    async fn declare_parked(
        &self,
        channel: &Channel,
        projector: &str,
        project: &Ident,
    ) -> Result<(), LinkError> {
        let mut args = classic();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_exchange().as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(projector.into()),
        );
        channel
            .queue_declare(
                self.project_parked_queue(projector, project)
                    .as_str()
                    .into(),
                QueueDeclareOptions::durable(),
                args,
            )
            .await?;
        Ok(())
    }

    /// The queue of consumers' reports to the server.
    pub fn reports_queue(&self) -> String {
        format!("{}.reports", self.settings.namespace)
    }

    /// Every link's state, by name.
    pub fn links(&self) -> BTreeMap<String, LinkState> {
        self.links.lock().expect("links lock").clone()
    }

    fn set_link(&self, link: &str, connected: bool, error: Option<String>) {
        let mut links = self.links.lock().expect("links lock");
        let state = links.entry(link.to_string()).or_insert(LinkState {
            connected,
            last_error: None,
        });
        state.connected = connected;
        if error.is_some() || connected {
            state.last_error = error;
        }
    }

    /// A named connection (it shows in the broker's management tools), with a time limit.
    pub async fn connect(&self, link: &str) -> Result<Connection, LinkError> {
        let name = format!("dstore {link} (pid {})", std::process::id());
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(self.settings.url.expose(), properties),
        )
        .await
        .map_err(|_| LinkError::Other("no answer from the broker within 10 s".into()))??;
        Ok(connection)
    }

    /// Declares the exchanges and the queues of one projector (idempotent: same arguments always).
    /// Only the relay does: a projector's queue that vanished (deleted, or a broker that lost its
    /// data) must be found missing by the relay, which then publishes every pending task again. A
    /// consumer that declared it afresh would hide the loss, so consumers wait for it instead
    /// ([`Broker::queue_exists`]) and declare only the parking registry ([`Broker::declare_parking`]).
    async fn declare_projector(
        &self,
        connection: &Connection,
        channel: &Channel,
        projector: &str,
    ) -> Result<(), LinkError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let (exchange, dead_exchange) = (self.exchange(), self.dead_exchange());
        for name in [&exchange, &dead_exchange] {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        // Every queue is classic (see `classic`): a projector's queue keeps its order as its
        // parking queues do, and a vhost that defaults to quorum queues changes none of them.
        let mut dead_args = classic();
        dead_args.insert("x-max-length".into(), AMQPValue::LongInt(100_000));
        declare_bound(
            connection,
            channel,
            &self.dead_queue(projector),
            dead_args,
            &dead_exchange,
            projector,
        )
        .await?;
        let mut args = classic();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dead_exchange.as_str().into()),
        );
        declare_bound(
            connection,
            channel,
            &self.queue(projector),
            args,
            &exchange,
            projector,
        )
        .await?;
        self.declare_parking(channel, projector).await
    }

    /// Declares the registry of a projector's parked projects (the consumers' own queue).
    async fn declare_parking(&self, channel: &Channel, projector: &str) -> Result<(), LinkError> {
        channel
            .queue_declare(
                self.parked_queue(projector).as_str().into(),
                QueueDeclareOptions::durable(),
                classic(),
            )
            .await?;
        Ok(())
    }

    /// Whether the broker has a projector's queue (asked on a channel of its own, since a missing
    /// queue closes the channel that asked).
    async fn queue_exists(
        &self,
        connection: &Connection,
        projector: &str,
    ) -> Result<bool, LinkError> {
        exists(connection, &self.queue(projector)).await
    }

    /// The messages ready in a projector's queue; `None` when the broker has no such queue.
    async fn queue_depth(
        &self,
        connection: &Connection,
        projector: &str,
    ) -> Result<Option<u32>, LinkError> {
        depth(connection, &self.queue(projector)).await
    }

    /// Whether the broker has a project's parking queue (see [`Broker::queue_exists`]).
    async fn parked_exists(
        &self,
        connection: &Connection,
        projector: &str,
        project: &Ident,
    ) -> Result<bool, LinkError> {
        exists(connection, &self.project_parked_queue(projector, project)).await
    }

    async fn declare_reports(
        &self,
        connection: &Connection,
        channel: &Channel,
    ) -> Result<(), LinkError> {
        if exists(connection, &self.reports_queue()).await? {
            return Ok(());
        }
        channel
            .queue_declare(
                self.reports_queue().as_str().into(),
                QueueDeclareOptions::durable(),
                classic(),
            )
            .await?;
        Ok(())
    }

    /// Runs `session` on a new connection again and again until `shutdown`, reconnecting with capped
    /// backoff after each failure; a session that ran for a minute starts the backoff over. A session
    /// ends as soon as its connection reports an error, whatever it was waiting for.
    pub async fn keep_linked<F, Fut>(
        &self,
        link: &str,
        mut shutdown: watch::Receiver<bool>,
        mut session: F,
    ) where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = Result<(), LinkError>>,
    {
        let mut attempt = 0;
        while !*shutdown.borrow() {
            let started = Instant::now();
            let linked = async {
                let connection = self.connect(link).await?;
                let events = connection.events_listener();
                tokio::select! {
                    result = session(connection) => result,
                    error = lost(events) => Err(error),
                }
            };
            let result = tokio::select! {
                result = linked => result,
                _ = shutdown.changed() => Ok(()),
            };
            match result {
                Ok(()) => break,
                Err(error) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        attempt = 0;
                    }
                    tracing::warn!(link, %error, attempt, "rabbitmq link lost; reconnecting");
                    self.set_link(link, false, Some(error.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                        _ = shutdown.changed() => {}
                    }
                    attempt += 1;
                }
            }
        }
        self.set_link(link, false, None);
    }
}

/// Arguments of a classic queue: a message returned unacknowledged goes back to its place, so a
/// projector's queue and a parking queue keep their order, and nothing is dropped after some
/// number of returns (a vhost may default to quorum queues, which do neither: RabbitMQ 4 puts a
/// returned message at the back and dead-letters it after 20 returns). The journal holds every
/// task until it is applied, so a queue needs no replicas of its own.
fn classic() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args
}

/// Whether the broker has `queue`, asked on a channel of its own (a missing queue closes the
/// channel that asked).
async fn exists(connection: &Connection, queue: &str) -> Result<bool, LinkError> {
    Ok(depth(connection, queue).await?.is_some())
}

/// The messages ready in `queue`, asked by a passive declare on a channel of its own (a refused
/// declare closes its channel); `None` when the broker has no such queue.
async fn depth(connection: &Connection, queue: &str) -> Result<Option<u32>, LinkError> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(declared) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(Some(declared.message_count()))
        }
        Err(error) if is_no_queue(&error) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Whether a passive declare failed because the queue does not exist. NOT_FOUND also answers for
/// a durable queue whose node is down: only "no queue" says it is absent.
fn is_no_queue(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
            && e.get_message().as_str().contains("no queue"))
}

/// Declares a durable queue with `args`, unless the broker has it already, and binds it to
/// `exchange` under `key`. A queue that exists is taken as it is: one made before its arguments
/// changed (a quorum queue a vhost's default made, before every queue was declared classic) would
/// refuse the new ones for ever, and with them every session that declares it.
async fn declare_bound(
    connection: &Connection,
    channel: &Channel,
    queue: &str,
    args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<(), LinkError> {
    if !exists(connection, queue).await? {
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
            .await?;
    }
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Resolves when the connection reports an error (a broker restart, a dropped socket, a missed
/// heartbeat): operations in flight on it may otherwise never finish. Soft errors close only the
/// channel they happened on, and its caller sees them.
async fn lost(events: impl futures::Stream<Item = lapin::Event>) -> LinkError {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(error) = event {
            let soft = matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
                if matches!(e.kind(), AMQPErrorKind::Soft(_)));
            if !soft {
                return LinkError::Broker(error);
            }
        }
    }
    LinkError::Other("the connection to the broker closed".into())
}

/// Message properties of everything dstore publishes: persistent, identified.
fn persistent(message_id: String) -> lapin::BasicProperties {
    lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_app_id("dstore".into())
        .with_message_id(message_id.into())
}

/// Waits for the broker to confirm a publish; a nack, a returned (unroutable) message or no answer
/// within a minute (a broker blocked by a resource alarm) is an error.
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<(), LinkError> {
    let confirmation = tokio::time::timeout(Duration::from_secs(60), confirm)
        .await
        .map_err(|_| {
            LinkError::Other(
                "the broker confirmed nothing within 60 s (is it blocked by a resource alarm?)"
                    .into(),
            )
        })??;
    read_confirmation(confirmation)
}

/// A broker's confirmation of a publish as an outcome: a nack or a returned (unroutable) message
/// is an error.
fn read_confirmation(confirmation: lapin::Confirmation) -> Result<(), LinkError> {
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(returned)) => Err(LinkError::Other(format!(
            "the broker could not route a message ({}); its queue is declared again",
            returned.reply_text
        ))),
        lapin::Confirmation::Nack(_) => Err(LinkError::Other(
            "the broker refused a message (nack)".into(),
        )),
        lapin::Confirmation::NotRequested => Err(LinkError::Other(
            "publisher confirms are not enabled on the channel".into(),
        )),
    }
}
