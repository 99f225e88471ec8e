//! The relay: publishes the journal's pending tasks to the broker, in seq order per projector.
//!
//! Per projector it keeps a cursor, the last seq the broker confirmed; tasks above it are the outbox.
//! A batch is published (persistent, `message_id` = seq), every confirmation awaited, and only then
//! the cursor moves. A session that fails mid-batch leaves the cursor behind, so the next session
//! publishes those tasks again: consumers may see a task twice, never miss one. The tasks themselves
//! stay in the journal until a consumer's report says they were applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Connection;
use tokio::sync::watch;

use super::{confirmed, persistent, Broker, LinkError};
use crate::journal::Journal;

const LINK: &str = "relay";

/// Runs until `shutdown` turns true.
pub async fn run(
    journal: Arc<Journal>,
    broker: Arc<Broker>,
    projectors: Vec<&'static str>,
    batch_size: usize,
    shutdown: watch::Receiver<bool>,
) {
    let session = |connection| {
        session(
            connection,
            &journal,
            &broker,
            &projectors,
            batch_size,
            shutdown.clone(),
        )
    };
    broker.keep_linked(LINK, shutdown.clone(), session).await;
}

async fn session(
    connection: Connection,
    journal: &Journal,
    broker: &Broker,
    projectors: &[&'static str],
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let channel = connection.create_channel().await?;
    for projector in projectors {
        broker.declare_projector(&channel, projector).await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    broker.set_link(LINK, true, None);
    let mut cursors = HashMap::new();
    for projector in projectors {
        cursors.insert(*projector, journal.published(projector).map_err(other)?);
    }
    let exchange = broker.exchange();
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    loop {
        let mut published = 0;
        for projector in projectors {
            let cursor = cursors.get_mut(projector).expect("a cursor per projector");
            let tasks = journal
                .outbox(projector, *cursor, batch_size)
                .map_err(other)?;
            let Some(last) = tasks.last().map(|(seq, _)| *seq) else {
                continue;
            };
            let mut confirms = Vec::with_capacity(tasks.len());
            for (seq, value) in &tasks {
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            (*projector).into(),
                            mandatory,
                            value,
                            persistent(seq.to_string()),
                        )
                        .await?,
                );
            }
            futures::future::try_join_all(confirms.into_iter().map(confirmed)).await?;
            *cursor = last;
            journal.mark_published(projector, last).map_err(other)?;
            published += tasks.len();
        }
        if published == 0 {
            tokio::select! {
                _ = journal.wait_for_commit(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        } else if *shutdown.borrow() {
            return Ok(());
        }
    }
}

fn other(error: impl std::fmt::Display) -> LinkError {
    LinkError::Other(format!("journal: {error}"))
}
