//! Wakes the followers of a project when it changes.
//!
//! One `watch` channel per followed project holds the highest revision known to be committed; a
//! backend publishes after every commit (and, in cluster mode, what a poller sees other nodes
//! commit), and nudges it when the project's versions change without a commit (a retire), so a
//! follower of a retired version ends at once. A project nobody follows costs one map lookup per
//! commit; a channel whose followers all left is dropped at the next publish.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::blueprint::Ident;

#[derive(Default)]
pub struct ChangeSignal {
    channels: Mutex<HashMap<Ident, watch::Sender<u64>>>,
}

impl ChangeSignal {
    /// A receiver that sees every later publish for `project`.
    pub fn subscribe(&self, project: &Ident) -> watch::Receiver<u64> {
        self.channels
            .lock()
            .expect("signal lock")
            .entry(project.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Says that `project` has committed changes up to `revision`.
    pub fn publish(&self, project: &Ident, revision: u64) {
        let mut channels = self.channels.lock().expect("signal lock");
        if channels.is_empty() {
            return;
        }
        if let Some(sender) = channels.get(project) {
            if sender.receiver_count() == 0 {
                channels.remove(project);
                return;
            }
            sender.send_if_modified(|known| {
                let newer = revision > *known;
                *known = (*known).max(revision);
                newer
            });
        }
    }

    /// Wakes the followers of `project` without a new revision: its versions changed (one was
    /// retired), so each reads again and finds whether it may go on.
    pub fn nudge(&self, project: &Ident) {
        if let Some(sender) = self.channels.lock().expect("signal lock").get(project) {
            sender.send_modify(|_| {});
        }
    }

    /// The projects someone follows now.
    pub fn followed(&self) -> Vec<Ident> {
        let mut channels = self.channels.lock().expect("signal lock");
        channels.retain(|_, sender| sender.receiver_count() > 0);
        channels.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_follower_wakes_on_a_newer_revision_and_channels_without_followers_go() {
        let signal = ChangeSignal::default();
        let project = Ident::parse("p").unwrap();
        let mut follower = signal.subscribe(&project);
        signal.publish(&project, 5);
        follower.changed().await.unwrap();
        assert_eq!(*follower.borrow_and_update(), 5);
        signal.publish(&project, 3);
        assert!(!follower.has_changed().unwrap());
        assert_eq!(signal.followed(), vec![project.clone()]);
        signal.nudge(&project);
        assert!(
            follower.has_changed().unwrap(),
            "a nudge wakes without a new revision"
        );
        assert_eq!(*follower.borrow_and_update(), 5);
        drop(follower);
        assert!(signal.followed().is_empty());
    }
}
