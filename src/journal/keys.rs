//! Byte layouts of the journal's keys.

use uuid::Uuid;

use super::task::Task;
use crate::blueprint::Ident;

/// `project \0 blueprint \0 id(16)` in the `items` column family.
pub fn item(project: &Ident, blueprint: &Ident, id: &Uuid) -> Vec<u8> {
    item_of(
        project.as_str().as_bytes(),
        blueprint.as_str().as_bytes(),
        id.as_bytes(),
    )
}

/// [`item`] from the names' bytes, as other keys hold them (the keyspaces').
pub fn item_of(project: &[u8], blueprint: &[u8], id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(project.len() + blueprint.len() + id.len() + 2);
    key.extend_from_slice(project);
    key.push(0);
    key.extend_from_slice(blueprint);
    key.push(0);
    key.extend_from_slice(id);
    key
}

/// The project, blueprint and id bytes of an [`item`] key; `None` for a key too short to be one.
pub fn split_item(key: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let project = key.iter().position(|b| *b == 0)?;
    let id = key.len().checked_sub(16)?;
    let blueprint = key.get(project + 1..id.checked_sub(1)?)?;
    Some((&key[..project], blueprint, &key[id..]))
}

/// `project \0`: every item key of the project starts with it.
pub fn project_prefix(project: &Ident) -> Vec<u8> {
    name_then(&[], project.as_str(), 0, &[])
}

/// `head name byte tail`, in one allocation: the journal's writer builds several keys like it
/// per item, and growing each step by step took 6 % of its instructions.
fn name_then(head: &[u8], name: &str, byte: u8, tail: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(head.len() + name.len() + 1 + tail.len());
    key.extend_from_slice(head);
    key.extend_from_slice(name.as_bytes());
    key.push(byte);
    key.extend_from_slice(tail);
    key
}

/// The first key after every key of the project.
pub fn project_end(project: &Ident) -> Vec<u8> {
    name_then(&[], project.as_str(), 1, &[])
}

/// `projector \0 seq(u64 BE)` in the `tasks` and `dead` column families.
pub fn task(projector: &str, seq: u64) -> Vec<u8> {
    name_then(&[], projector, 0, &seq.to_be_bytes())
}

/// Read options for a projector's tasks with a seq in `from ..= until`.
pub fn task_range(projector: &str, from: u64, until: u64) -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    options.set_iterate_lower_bound(task(projector, from));
    options.set_iterate_upper_bound(task(projector, until.saturating_add(1)));
    options
}

pub fn projector_prefix(projector: &str) -> Vec<u8> {
    name_then(&[], projector, 0, &[])
}

/// The seq at the end of a task key.
pub fn task_seq(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|start| key[start..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

pub fn backfill(project: &Ident, version: u32) -> Vec<u8> {
    format!("backfill/{project}/{version:010}").into_bytes()
}

/// The back-fill of a version into some projectors only (a rebuild of their stores).
pub fn rebuild(project: &Ident, version: u32, projectors: &[String]) -> Vec<u8> {
    format!("backfill/{project}/{version:010}/{}", projectors.join(",")).into_bytes()
}

/// Every back-fill key of a project lies in `from .. to`.
pub fn backfill_range(project: &Ident) -> (Vec<u8>, Vec<u8>) {
    (
        format!("backfill/{project}/").into_bytes(),
        format!("backfill/{project}0").into_bytes(),
    )
}

/// The layout of the names dstore gives what it makes in the stores (see `Journal::upgrade_layout`).
pub const LAYOUT: &[u8] = b"layout";

/// The relay's cursor of one projector: the last seq the broker confirmed.
pub fn published(projector: &str) -> Vec<u8> {
    format!("published/{projector}").into_bytes()
}

pub const LAST_SEQ: &[u8] = b"last_seq";

/// In the meta family: the number of the last version of `project` frozen through this journal
/// (see `Journal::check_catalog_not_behind`).
pub fn frozen(project: &Ident) -> Vec<u8> {
    format!("frozen/{project}").into_bytes()
}

/// Every [`frozen`] mark starts with this.
pub const FROZEN_PREFIX: &[u8] = b"frozen/";

/// In the meta family: the seq of a projector's dead letter of the item `task` writes, so a newer
/// letter of the item replaces it (see `Journal::settle`); `None` for a task of no item.
pub fn letter_of_item(projector: &str, task: &Task) -> Option<Vec<u8>> {
    let (blueprint, id) = task.op.item()?;
    let item = item(&task.project, blueprint, id);
    Some(name_then(b"dead_item/", projector, 0, &item))
}

/// Under buffered durability, the highest seq the writer may hand out before it writes this mark
/// again, synced (see `Writer::reserve`): the journal opens at least there.
pub const SEQ_RESERVED: &[u8] = b"seq_reserved";

/// Where a start found revisions handed out whose batches were not found written (a machine's
/// crash under buffered durability): `lost/<from, 20 digits>` = the last such revision (8 bytes,
/// big-endian), those after `from` up to it lost (see `Journal::lost`).
pub fn lost(from: u64) -> Vec<u8> {
    format!("lost/{from:020}").into_bytes()
}

pub const LOST_PREFIX: &[u8] = b"lost/";

/// The projectors the journal fed at its last start, as a JSON list (see
/// `Journal::catch_up_added`).
pub const PROJECTORS_FED: &[u8] = b"projectors_fed";

/// Present while the `keyspaces` column family is kept current by the writer (see `journal/import`).
pub const KEYSPACES_KEPT: &[u8] = b"keyspaces_kept";

/// Set once the `changes` column family holds the latest change of every item (journals made
/// before the change feed get it built at start).
pub const CHANGES_INDEXED: &[u8] = b"changes_indexed";

/// Set once deleted items' markers live in the `deleted` column family (journals made before it
/// kept them in `changes`, and get them moved at start).
pub const DELETED_MOVED: &[u8] = b"deleted_moved";

/// `project \0 revision(u64 BE)` in the `changes` column family: the latest change of each item.
pub fn change(project: &Ident, revision: u64) -> Vec<u8> {
    name_then(&[], project.as_str(), 0, &revision.to_be_bytes())
}

/// Tombstones start with this byte, which no project name does (names are `[a-z][a-z0-9_]*`).
pub const TOMBSTONE: u8 = 0xff;

/// `0xff project \0 revision` in `changes`: the deletes, found by age without reading the puts.
pub fn tombstone(project: &Ident, revision: u64) -> Vec<u8> {
    name_then(&[TOMBSTONE], project.as_str(), 0, &revision.to_be_bytes())
}

/// The project and revision of a [`tombstone`] key; `None` for a key that is not one.
pub fn split_tombstone(key: &[u8]) -> Option<(Ident, u64)> {
    let (head, revision) = key.split_last_chunk::<8>()?;
    let name = head.strip_prefix(&[TOMBSTONE])?.strip_suffix(&[0])?;
    let project = Ident::parse(std::str::from_utf8(name).ok()?).ok()?;
    Some((project, u64::from_be_bytes(*revision)))
}

/// The tombstones of a project lie in `from .. to`.
pub fn tombstone_range(project: &Ident) -> (Vec<u8>, Vec<u8>) {
    let mut from = vec![TOMBSTONE];
    from.extend_from_slice(&project_prefix(project));
    let mut to = vec![TOMBSTONE];
    to.extend_from_slice(&project_end(project));
    (from, to)
}

/// Deleted items start with this byte (see [`TOMBSTONE`]).
pub const DELETED: u8 = 0xfe;

/// `0xfe project \0 blueprint \0 id` in `deleted`: the revision of a deleted item's tombstone, so
/// writing the item again replaces it. (The first byte is from when these lived in `changes`
/// beside the changes; it keeps the keys of journals that moved them unchanged.)
pub fn deleted(item_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(item_key.len() + 1);
    key.push(DELETED);
    key.extend_from_slice(item_key);
    key
}

/// The deleted items of a project lie in `from .. to`.
pub fn deleted_range(project: &Ident) -> (Vec<u8>, Vec<u8>) {
    (
        deleted(&project_prefix(project)),
        deleted(&project_end(project)),
    )
}

/// The highest revision of a project whose changes are no longer kept (meta).
pub fn horizon(project: &Ident) -> Vec<u8> {
    format!("horizon/{project}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_byte_layouts() {
        let p = Ident::parse("blog").unwrap();
        assert_eq!(project_prefix(&p), b"blog\0");
        assert_eq!(project_end(&p), b"blog\x01");
        assert_eq!(projector_prefix("postgresql"), b"postgresql\0");
        assert_eq!(task("postgresql", 258), b"postgresql\0\0\0\0\0\0\0\x01\x02");
        assert_eq!(task_seq(&task("postgresql", 258)), 258);
        assert_eq!(change(&p, 1), b"blog\0\0\0\0\0\0\0\0\x01");
        assert_eq!(tombstone(&p, 1), b"\xffblog\0\0\0\0\0\0\0\0\x01");
        let (from, to) = tombstone_range(&p);
        assert!(from < tombstone(&p, 1) && tombstone(&p, u64::MAX) < to);
        assert_eq!(split_tombstone(&tombstone(&p, 7)), Some((p.clone(), 7)));
        assert_eq!(split_tombstone(&change(&p, 7)), None);
    }

    #[test]
    fn an_item_key_splits_back_into_its_parts() {
        let (p, b, id) = (
            Ident::parse("blog").unwrap(),
            Ident::parse("article").unwrap(),
            Uuid::new_v4(),
        );
        let key = item(&p, &b, &id);
        assert_eq!(
            split_item(&key),
            Some((&b"blog"[..], &b"article"[..], &id.as_bytes()[..]))
        );
        assert_eq!(split_item(b"blog\0short"), None);
        assert_eq!(split_item(&key[..5]), None);
    }
}
