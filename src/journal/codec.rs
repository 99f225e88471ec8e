//! Byte formats of the journal's values, built outside the writer thread.
//!
//! The writer is the one serial step of every write, so it only copies bytes: item handlers encode the
//! record and the task once, in parallel, and the writer adds the sequence number and revision as a
//! fixed-size header. A document is serialized once and shared by the item record and the task.
//!
//! - item record: `revision u64 | version u32 | blueprint_uid u64 | body JSON`
//! - task: `seq u64 | revision u64 | Task JSON` (the JSON's own `seq` and `revision` are zero)
//! - change (the feed's index): `op u8 (0 put, 1 delete) | unix millis u64 | id 16 | blueprint`

use std::ops::Range;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::task::{Doc, Task, TaskOp, VersionDoc};
use super::{ItemRecord, JournalError};
use crate::blueprint::Ident;
use crate::json;

pub const RECORD_HEADER: usize = 20;
const TASK_HEADER: usize = 16;

fn corrupt(what: &str) -> JournalError {
    JournalError::Corrupt(<serde_json::Error as serde::de::Error>::custom(format!(
        "{what} is too short"
    )))
}

pub fn record_value(revision: u64, version: u32, blueprint_uid: u64, body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(RECORD_HEADER + body.len());
    value.extend_from_slice(&revision.to_be_bytes());
    value.extend_from_slice(&version.to_be_bytes());
    value.extend_from_slice(&blueprint_uid.to_be_bytes());
    value.extend_from_slice(body);
    value
}

pub fn decode_record(value: &[u8]) -> Result<ItemRecord, JournalError> {
    if value.len() < RECORD_HEADER {
        return Err(corrupt("an item record"));
    }
    let number = |range: std::ops::Range<usize>| big_endian(&value[range]);
    Ok(ItemRecord {
        revision: number(0..8),
        version: number(8..12) as u32,
        blueprint_uid: number(12..20),
        body: serde_json::from_slice(&value[RECORD_HEADER..])?,
        stored_bytes: value.len(),
    })
}

/// The blueprint uid an item record was stored with, from its header alone: what a delete needs,
/// without decoding the item.
pub fn record_blueprint_uid(value: &[u8]) -> Result<u64, JournalError> {
    let uid = value
        .get(12..RECORD_HEADER)
        .ok_or_else(|| corrupt("an item record"))?;
    Ok(big_endian(uid))
}

/// A header field: a big-endian number of at most 8 bytes.
fn big_endian(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b))
}

/// [`decode_record`], off the HTTP worker for a long record (`crate::aside`): decoding a record of
/// a MiB takes tens of milliseconds, which must not stall the requests that worker shares.
pub async fn decode_record_aside(value: Vec<u8>) -> Result<ItemRecord, JournalError> {
    crate::aside::sized(value.len(), move || decode_record(&value))
        .await
        .map_err(|e| JournalError::Thread(std::io::Error::other(e)))?
}

/// The value of an item's latest change in the `changes` column family.
pub fn change_value(delete: bool, millis: u64, id: &Uuid, blueprint: &Ident) -> Vec<u8> {
    let mut value = Vec::with_capacity(25 + blueprint.as_str().len());
    value.push(u8::from(delete));
    value.extend_from_slice(&millis.to_be_bytes());
    value.extend_from_slice(id.as_bytes());
    value.extend_from_slice(blueprint.as_str().as_bytes());
    value
}

/// A change value: (whether it is a delete, its id, its blueprint).
pub fn decode_change(value: &[u8]) -> Result<(bool, Uuid, Ident), JournalError> {
    if value.len() < 25 {
        return Err(corrupt("a change"));
    }
    let id = Uuid::from_slice(&value[9..25]).map_err(|_| corrupt("a change's id"))?;
    let blueprint = Ident::parse(&String::from_utf8_lossy(&value[25..]))
        .map_err(|_| corrupt("a change's blueprint"))?;
    Ok((value[0] == 1, id, blueprint))
}

/// The revision at the start of an item record, without decoding the rest.
pub fn record_revision(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// The version an item record was written for, without decoding the rest.
pub fn record_version(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(8..12)?.try_into().ok()?))
}

/// An item record's revision and body text (the item as its own version sees it), undecoded.
pub fn record_body(value: &[u8]) -> Option<(u64, &[u8])> {
    Some((record_revision(value)?, value.get(RECORD_HEADER..)?))
}

pub fn task_value(seq: u64, revision: u64, body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(TASK_HEADER + body.len());
    value.extend_from_slice(&seq.to_be_bytes());
    value.extend_from_slice(&revision.to_be_bytes());
    value.extend_from_slice(body);
    value
}

/// A task from outside the local journal (a broker, another node's store): each document is checked
/// to be one JSON value.
pub fn decode_task(value: &[u8]) -> Result<Task, JournalError> {
    decode(value, Docs::Check)
}

/// A task the local journal holds: its documents were serialized by the write path and RocksDB
/// checks its blocks' checksums, so a document's end is found by following its strings and brackets
/// (`json::value_end`) instead of checking every byte again (a third of projection's instructions
/// per row into PostgreSQL; docs/performance.md).
pub fn decode_own_task(value: &[u8]) -> Result<Task, JournalError> {
    decode(value, Docs::Known)
}

/// How a task's documents are read.
#[derive(Clone, Copy)]
enum Docs {
    /// Checked to be one JSON value each.
    Check,
    /// Known to be JSON: only their ends are found.
    Known,
}

fn decode(value: &[u8], docs: Docs) -> Result<Task, JournalError> {
    if value.len() < TASK_HEADER {
        return Err(corrupt("a task"));
    }
    let seq = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
    let stored_revision = u64::from_be_bytes(value[8..16].try_into().expect("8 bytes"));
    let body = &value[TASK_HEADER..];
    let mut task: Task = match decode_upsert(body, docs) {
        Some(task) => task,
        None => serde_json::from_slice(body)?,
    };
    task.seq = seq;
    if let TaskOp::Upsert { revision, .. } | TaskOp::Delete { revision, .. } = &mut task.op {
        *revision = stored_revision;
    }
    Ok(task)
}

/// An `Upsert` task in the layout [`upsert_body`] writes, read without serde's derived decoder
/// (which took two thirds of the instructions of reading a task from the journal); `None` for
/// anything else, which serde then reads.
fn decode_upsert(body: &[u8], check: Docs) -> Option<Task> {
    let rest = body.strip_prefix(b"{\"seq\":0,\"project\":\"")?;
    let (project, rest) = text_until_quote(rest)?;
    let rest = rest.strip_prefix(b"\",\"op\":{\"upsert\":{\"blueprint\":\"")?;
    let (blueprint, rest) = text_until_quote(rest)?;
    let rest = rest.strip_prefix(b"\",\"id\":\"")?;
    let (id, rest) = text_until_quote(rest)?;
    let mut rest = rest.strip_prefix(b"\",\"revision\":0,\"docs\":[")?;
    let mut docs = Vec::with_capacity(1);
    loop {
        rest = rest.strip_prefix(b"{\"version\":")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let version: u32 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = rest[digits..].strip_prefix(b",\"doc\":")?;
        let (doc, end) = match check {
            Docs::Check => {
                let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Doc>();
                (values.next()?.ok()?, values.byte_offset())
            }
            Docs::Known => {
                // A document is an object; anything else is left to serde, which names it.
                if rest.first() != Some(&b'{') {
                    return None;
                }
                let end = json::value_end(rest, 0)?;
                (
                    Doc::known_json(std::str::from_utf8(&rest[..end]).ok()?),
                    end,
                )
            }
        };
        rest = rest[end..].strip_prefix(b"}")?;
        docs.push(VersionDoc { version, doc });
        match rest.split_first()? {
            (b',', tail) => rest = tail,
            (b']', tail) if tail == b"}}}" => break,
            _ => return None,
        }
    }
    Some(Task {
        seq: 0,
        project: Ident::parse(project).ok()?,
        op: TaskOp::Upsert {
            blueprint: Ident::parse(blueprint).ok()?,
            id: Uuid::try_parse(id).ok()?,
            revision: 0,
            docs,
        },
    })
}

/// The text before the next `"` (which identifiers and uuids never contain), and the rest from
/// that quote on.
fn text_until_quote(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|b| *b == b'"')?;
    Some((std::str::from_utf8(&bytes[..end]).ok()?, &bytes[end..]))
}

/// Encodes a task whose seq and revision the writer fills in (`Migrate`, `Delete`, `DropProject`).
pub fn task_body(project: &Ident, op: &TaskOp) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Borrowed<'a> {
        seq: u64,
        project: &'a Ident,
        op: &'a TaskOp,
    }
    serde_json::to_vec(&Borrowed {
        seq: 0,
        project,
        op,
    })
    .expect("tasks serialize")
}

/// An encoded `Upsert` task body and where each version's document lies in it, so the writer copies
/// the documents into the local keyspaces without decoding the task.
#[derive(Clone, Debug, Default)]
pub struct UpsertBody {
    pub bytes: Vec<u8>,
    /// (version, byte range of its document in `bytes`), in the order of the task's documents.
    pub docs: Vec<(u32, Range<usize>)>,
}

impl UpsertBody {
    /// Each version's document text.
    pub fn docs(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.docs
            .iter()
            .map(|(version, range)| (*version, &self.bytes[range.clone()]))
    }
}

/// Encodes an `Upsert` task from documents already serialized, exactly as serde would.
pub fn upsert_body(
    project: &Ident,
    blueprint: &Ident,
    id: &Uuid,
    docs: &[(u32, &[u8])],
) -> UpsertBody {
    let size: usize = docs.iter().map(|(_, d)| d.len() + 24).sum();
    let mut out = Vec::with_capacity(size + 160);
    // Identifiers and uuids never need escaping.
    out.extend_from_slice(b"{\"seq\":0,\"project\":\"");
    out.extend_from_slice(project.as_str().as_bytes());
    out.extend_from_slice(b"\",\"op\":{\"upsert\":{\"blueprint\":\"");
    out.extend_from_slice(blueprint.as_str().as_bytes());
    out.extend_from_slice(b"\",\"id\":\"");
    let mut text = [0u8; 36];
    out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
    out.extend_from_slice(b"\",\"revision\":0,\"docs\":[");
    let mut spans = Vec::with_capacity(docs.len());
    for (i, (version, doc)) in docs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"version\":");
        out.extend_from_slice(itoa::Buffer::new().format(*version).as_bytes());
        out.extend_from_slice(b",\"doc\":");
        spans.push((*version, out.len()..out.len() + doc.len()));
        out.extend_from_slice(doc);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}}}");
    UpsertBody {
        bytes: out,
        docs: spans,
    }
}

/// Serializes a document.
pub fn doc_bytes(doc: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(doc).expect("JSON maps serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A project, a blueprint and a fresh item id.
    fn names(project: &str, blueprint: &str) -> (Ident, Ident, Uuid) {
        (
            Ident::parse(project).unwrap(),
            Ident::parse(blueprint).unwrap(),
            Uuid::new_v4(),
        )
    }

    #[test]
    fn a_hand_encoded_upsert_decodes_to_the_task_serde_would_build() {
        let (project, blueprint, id) = names("p", "b");
        let docs: Vec<Map<String, Value>> = [json!({"a": "x\"y"}), json!({"b": [1.5, null]})]
            .into_iter()
            .map(|v| v.as_object().unwrap().clone())
            .collect();
        let bytes: Vec<Vec<u8>> = docs.iter().map(doc_bytes).collect();
        let body = upsert_body(&project, &blueprint, &id, &[(1, &bytes[0]), (2, &bytes[1])]);
        let spans: Vec<(u32, &[u8])> = body.docs().collect();
        assert_eq!(spans, [(1, &bytes[0][..]), (2, &bytes[1][..])]);
        let task = decode_task(&task_value(7, 5, &body.bytes)).unwrap();
        let expected = Task {
            seq: 7,
            project,
            op: TaskOp::Upsert {
                blueprint,
                id,
                revision: 5,
                docs: vec![VersionDoc::new(1, &docs[0]), VersionDoc::new(2, &docs[1])],
            },
        };
        assert_eq!(task, expected);
    }

    #[test]
    fn upserts_read_without_serde_are_read_as_serde_reads_them() {
        let (project, blueprint, id) = names("shop_1", "article");
        let docs: Vec<Vec<u8>> = [
            json!({"title": "a } ] \" tricky, \\ text", "n": [1, {"x": null}]}),
            json!({}),
            json!({"u": "\u{0} é 𝄞"}),
        ]
        .iter()
        .map(|v| doc_bytes(v.as_object().unwrap()))
        .collect();
        for count in 1..=docs.len() {
            let versions: Vec<(u32, &[u8])> = (0..count)
                .map(|i| (u32::MAX - i as u32, &docs[i][..]))
                .collect();
            let body = upsert_body(&project, &blueprint, &id, &versions);
            let serde: Task = serde_json::from_slice(&body.bytes).unwrap();
            for docs in [Docs::Check, Docs::Known] {
                let fast = decode_upsert(&body.bytes, docs)
                    .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&body.bytes)));
                assert_eq!(fast, serde);
            }
        }
        // Anything else is left to serde: other tasks, other layouts, damaged text.
        let body = upsert_body(&project, &blueprint, &id, &[(1, &docs[0][..])]).bytes;
        let migrate = task_body(&project, &TaskOp::Migrate { version: 2 });
        let spaced = String::from_utf8(body.clone())
            .unwrap()
            .replace(":0,", ": 0,");
        let mut trailing = body.clone();
        trailing.push(b' ');
        let cut = &body[..body.len() - 3];
        for other in [&migrate[..], spaced.as_bytes(), &trailing, cut, b""] {
            assert!(decode_upsert(other, Docs::Check).is_none());
            assert!(decode_upsert(other, Docs::Known).is_none());
        }
        let task = decode_task(&task_value(3, 2, &migrate)).unwrap();
        assert_eq!(task.op, TaskOp::Migrate { version: 2 });
    }

    #[test]
    fn a_task_from_outside_the_journal_has_its_documents_checked() {
        let (project, blueprint, id) = names("p", "b");
        let body = upsert_body(&project, &blueprint, &id, &[(1, b"{\"a\":nope}")]).bytes;
        let value = task_value(1, 1, &body);
        assert!(matches!(decode_task(&value), Err(JournalError::Corrupt(_))));
        // What the journal wrote itself is only followed to its end; a document that is not an
        // object is left to serde, which refuses it too.
        assert!(decode_own_task(&value).is_ok());
        let scalar = task_value(
            1,
            1,
            &upsert_body(&project, &blueprint, &id, &[(1, b"nope")]).bytes,
        );
        assert!(decode_own_task(&scalar).is_err());
        // Damaged text that is framed all the same still serializes (as a dead letter does it),
        // as a JSON string of itself.
        let damaged = upsert_body(&project, &blueprint, &id, &[(1, b"{\"a\":1]")]).bytes;
        let task = decode_own_task(&task_value(1, 1, &damaged)).unwrap();
        let text = serde_json::to_value(&task).unwrap();
        assert_eq!(text["op"]["upsert"]["docs"][0]["doc"], "{\"a\":1]");
    }

    #[test]
    fn records_round_trip_and_short_values_are_corrupt() {
        let body = doc_bytes(json!({"id": "x"}).as_object().unwrap());
        let record = decode_record(&record_value(9, 3, 77, &body)).unwrap();
        assert_eq!(
            (record.revision, record.version, record.blueprint_uid),
            (9, 3, 77)
        );
        assert_eq!(record.body["id"], "x");
        assert!(decode_record(b"short").is_err());
        assert!(decode_task(b"short").is_err());
    }
}
