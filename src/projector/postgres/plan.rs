//! Planning a batch of item tasks: which row of which table each task writes, newest revision only.
//!
//! Per (schema, table, id) only the task with the highest revision is kept — a newer delete wins over
//! an older upsert and the other way round — so each row is touched once per batch and a multi-row
//! `ON CONFLICT` never meets the same id twice. Versions or blueprints the catalog no longer holds (a
//! project deleted after the task was queued) need no write. Pure: no I/O.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::blueprint::{Blueprint, Ident};
use crate::catalog::{Snapshot, Version};
use crate::journal::task::{Doc, Task};
use crate::json::{members, MemberError};
use crate::projector::{Outcome, ProjectorError};

/// A document's fields as JSON text, borrowed from the task: columns are read without building the
/// document. A short list is searched in order, without hashing a name or allocating more than
/// once per row; a document of more than [`SCANNED`] fields is sorted by name once and searched by
/// halves, so a blueprint of hundreds of columns costs a logarithm per column instead of a scan (a
/// scan per column took time quadratic in the columns: 1.6 ms more a row at 900;
/// docs/performance.md).
pub struct Fields<'a> {
    fields: Vec<(&'a str, &'a str)>,
    sorted: bool,
}

/// Most fields a document's list is searched in order.
const SCANNED: usize = 16;

impl<'a> Fields<'a> {
    /// The fields of a document: a task's document is one JSON value (a [`Doc`] is never
    /// anything else), so its members are found by following strings and brackets alone, without
    /// checking the JSON again (serde's reading took a fifth of projection's instructions). Field
    /// names are identifiers: a name with an escape, like anything but an object, is refused.
    pub fn of(doc: &'a Doc) -> Result<Fields<'a>, String> {
        let mut fields = Vec::with_capacity(8);
        for member in members(doc.get()).map_err(described)? {
            let (name, value) = member.map_err(described)?;
            if name.contains('\\') {
                return Err(format!("the field name {name:?} holds an escape"));
            }
            fields.push((name, value));
        }
        Ok(Fields::new(fields))
    }

    fn new(mut fields: Vec<(&'a str, &'a str)>) -> Fields<'a> {
        if fields.len() <= SCANNED {
            return Fields {
                fields,
                sorted: false,
            };
        }
        // A stable sort keeps a repeated name's fields in document order; the last one stays.
        fields.sort_by(|a, b| a.0.cmp(b.0));
        let mut kept: Vec<(&'a str, &'a str)> = Vec::with_capacity(fields.len());
        for field in fields {
            match kept.last_mut() {
                Some(last) if last.0 == field.0 => *last = field,
                _ => kept.push(field),
            }
        }
        Fields {
            fields: kept,
            sorted: true,
        }
    }

    /// The field's JSON text; of a name given twice, the last (as a map would keep).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        if self.sorted {
            return self
                .fields
                .binary_search_by(|(n, _)| (*n).cmp(name))
                .ok()
                .map(|at| self.fields[at].1);
        }
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// Why a document's members could not be followed.
fn described(error: MemberError<'_>) -> String {
    match error {
        MemberError::NotObject => "not a JSON object".into(),
        MemberError::NoName => "a member without a name".into(),
        MemberError::NameNotEnded => "a name that does not end".into(),
        MemberError::NoValue(name) => format!("the field {name:?} has no value"),
        MemberError::ValueNotEnded(name) => format!("the field {name:?} does not end"),
        MemberError::NotFollowed(name) => {
            format!("the field {name:?} is not followed by `,` or `}}`")
        }
    }
}

/// One row to write: the newest state of an item in one version, and the task it came from.
pub struct Upsert<'a> {
    pub id: Uuid,
    pub revision: i64,
    pub task: usize,
    pub fields: Fields<'a>,
}

pub struct Delete {
    pub id: Uuid,
    pub revision: i64,
    pub task: usize,
}

/// Everything a batch writes into one table.
pub struct Group<'a> {
    pub schema: String,
    pub blueprint: &'a Blueprint,
    pub upserts: Vec<Upsert<'a>>,
    pub deletes: Vec<Delete>,
}

impl<'a> Group<'a> {
    /// The index of a task the group writes (all of a group's tasks are of its table's project).
    pub fn first_task(&self) -> Option<usize> {
        let upsert = self.upserts.first().map(|u| u.task);
        upsert.or_else(|| self.deletes.first().map(|d| d.task))
    }

    fn new(schema: String, blueprint: &'a Blueprint) -> Group<'a> {
        Group {
            schema,
            blueprint,
            upserts: Vec::new(),
            deletes: Vec::new(),
        }
    }
}

pub struct Plan<'a> {
    pub groups: Vec<Group<'a>>,
    /// The versions the batch writes into, to make sure they are migrated first.
    pub versions: Vec<(&'a Ident, &'a Version)>,
    pub outcomes: Vec<Outcome>,
}

enum Op<'a> {
    Upsert(&'a Doc),
    Delete,
}

/// A row of one table in one version: (project, version, table, id). The schema's name is made once
/// per group, not per row.
type RowKey<'a> = (&'a Ident, u32, &'a Ident, Uuid);
/// The newest write of a row so far: (revision, task index, what, blueprint as frozen).
type Newest<'a> = (i64, usize, Op<'a>, &'a Blueprint);

/// Plans a batch. Versions or blueprints the catalog no longer holds (a project deleted since the
/// task was queued) need no write; their tasks succeed.
pub fn plan<'a>(snapshot: &'a Snapshot, tasks: &'a [Task]) -> Plan<'a> {
    let mut outcomes: Vec<Outcome> = tasks.iter().map(|_| Ok(())).collect();
    // Each row's newest write so far, in the order of the tasks that wrote them: a row written
    // again by a newer task leaves its old place empty and takes a new one at the end, so the
    // rows stay in task order without sorting them (sorting took a twelfth of projection's
    // instructions).
    let mut rows: Vec<Option<(RowKey<'a>, Newest<'a>)>> = Vec::with_capacity(tasks.len());
    // foldhash, seeded per process: ids come from clients, so the hash must not be one they can
    // aim collisions at; SipHash took 5 % of projection's CPU here.
    let mut newest: HashMap<RowKey<'a>, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(tasks.len(), Default::default());
    let mut versions: BTreeMap<(&'a Ident, u32), &'a Version> = BTreeMap::new();
    for (index, task) in tasks.iter().enumerate() {
        for write in task.version_writes() {
            let Ok(revision) = i64::try_from(write.revision) else {
                outcomes[index] = Err(ProjectorError::permanent(format!(
                    "revision {} does not fit a postgresql bigint",
                    write.revision
                )));
                break;
            };
            let (number, blueprint, id) = (write.version, write.blueprint, write.id);
            let op = write.doc.map_or(Op::Delete, Op::Upsert);
            let Some(version) = snapshot
                .projects
                .get(&task.project)
                .and_then(|p| p.version(number))
            else {
                continue;
            };
            let Some(definition) = version.blueprints.get(blueprint) else {
                continue;
            };
            versions.entry((&task.project, number)).or_insert(version);
            let key = (&task.project, number, &definition.table, id);
            let row = Some((key, (revision, index, op, definition)));
            match newest.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(rows.len());
                    rows.push(row);
                }
                Entry::Occupied(mut slot) => {
                    let at = *slot.get();
                    // Equal revisions are redeliveries of one write: the later copy is as good as
                    // the first.
                    let (_, (current, ..)) = rows[at].as_ref().expect("a row `newest` points at");
                    if *current <= revision {
                        rows[at] = None;
                        slot.insert(rows.len());
                        rows.push(row);
                    }
                }
            }
        }
    }
    let mut groups: BTreeMap<(&'a Ident, u32, &'a Ident), Group<'a>> = BTreeMap::new();
    for ((project, number, table, id), (revision, task, op, blueprint)) in
        rows.into_iter().flatten()
    {
        let group = groups
            .entry((project, number, table))
            .or_insert_with(|| Group::new(super::ident::schema_name(project, number), blueprint));
        match op {
            Op::Upsert(doc) => match Fields::of(doc) {
                Ok(fields) => group.upserts.push(Upsert {
                    id,
                    revision,
                    task,
                    fields,
                }),
                Err(e) => {
                    outcomes[task] = Err(ProjectorError::permanent(format!(
                        "the document of {id} is not a JSON object of fields: {e}"
                    )))
                }
            },
            Op::Delete => group.deletes.push(Delete { id, revision, task }),
        }
    }
    // Each group's rows are in task order: when two rows compete for a unique value, the earlier
    // write gets it.
    let groups: Vec<Group<'a>> = groups.into_values().collect();
    Plan {
        groups,
        versions: versions
            .into_iter()
            .map(|((project, _), version)| (project, version))
            .collect(),
        outcomes,
    }
}

/// Whether a group's rows may be written in another order than its tasks' (in lanes, or new rows
/// before the others): a unique column other than `id` would let two rows compete for one value,
/// and then the winner would no longer be the earlier task.
pub fn may_share(group: &Group<'_>) -> bool {
    !group.blueprint.columns.values().any(|c| c.def.unique)
}

/// Splits a batch's groups into at most `lanes` sets by item id, for one transaction each at the same
/// time. Every row and tombstone a group writes is keyed by its item's id, so no two lanes touch the
/// same row, and every task lands in one lane: a task writes one item (in each of its versions).
/// One set when `lanes` is 1, the batch holds fewer than `min_rows` rows, or a table has a unique
/// column. Each group keeps its task order.
pub fn split<'a>(groups: Vec<Group<'a>>, lanes: usize, min_rows: usize) -> Vec<Vec<Group<'a>>> {
    let rows: usize = groups
        .iter()
        .map(|g| g.upserts.len() + g.deletes.len())
        .sum();
    if lanes <= 1 || rows < min_rows || !groups.iter().all(may_share) {
        return vec![groups];
    }
    let lane = |id: &Uuid| (id.as_u128() % lanes as u128) as usize;
    let mut sets: Vec<Vec<Group<'a>>> = (0..lanes).map(|_| Vec::new()).collect();
    for group in groups {
        let mut parts: Vec<Group<'a>> = (0..lanes)
            .map(|_| Group::new(group.schema.clone(), group.blueprint))
            .collect();
        for upsert in group.upserts {
            parts[lane(&upsert.id)].upserts.push(upsert);
        }
        for delete in group.deletes {
            parts[lane(&delete.id)].deletes.push(delete);
        }
        for (set, part) in sets.iter_mut().zip(parts) {
            if !part.upserts.is_empty() || !part.deletes.is_empty() {
                set.push(part);
            }
        }
    }
    sets.retain(|set| !set.is_empty());
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use proptest::prelude::*;
    use serde_json::Value;

    use crate::catalog::Catalog;
    use crate::journal::task::{TaskOp, VersionDoc};
    use crate::projector::conformance;

    fn raw(text: &str) -> Doc {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn fields_are_read_by_name_the_last_of_a_repeated_name_winning() {
        let doc = raw(r#" { "a" : 1 , "b": "x,}]", "a": [2, {"c": "]"}], "n": -1.5e3 } "#);
        let fields = Fields::of(&doc).unwrap();
        assert_eq!(fields.get("a"), Some(r#"[2, {"c": "]"}]"#));
        assert_eq!(fields.get("b"), Some("\"x,}]\""));
        assert_eq!(fields.get("n"), Some("-1.5e3"));
        assert!(fields.get("c").is_none());
        assert_eq!(Fields::of(&raw("{}")).unwrap().get("a"), None);
        for refused in ["[1]", "\"a\"", "null", r#"{"a\u0062": 1}"#] {
            assert!(Fields::of(&raw(refused)).is_err(), "{refused}");
        }
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".*".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Following strings and brackets finds the members serde finds, in any layout.
        #[test]
        fn fields_are_the_members_serde_reads(
            members in prop::collection::btree_map("[a-z_][a-z0-9_]{0,8}", json(), 0..24),
            pretty in any::<bool>(),
        ) {
            let doc = Value::Object(members.clone().into_iter().collect());
            let text = if pretty {
                serde_json::to_string_pretty(&doc).unwrap()
            } else {
                doc.to_string()
            };
            let read: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
            let doc = raw(&text);
            let fields = Fields::of(&doc).unwrap();
            for name in members.keys() {
                let got: Value = serde_json::from_str(fields.get(name).unwrap()).unwrap();
                prop_assert_eq!(&got, &read[name]);
            }
            prop_assert!(fields.get("Absent").is_none());
        }
    }

    #[test]
    fn a_wide_document_is_read_by_name_as_a_short_one_is() {
        // Past the scanned length the list is sorted: the same answers, the last repeat winning.
        let mut doc = serde_json::Map::new();
        for i in 0..900 {
            doc.insert(format!("c{i}"), serde_json::json!(i));
        }
        let mut text = serde_json::Value::Object(doc).to_string();
        text.pop();
        text.push_str(r#","c7": "again", "c0": [0]}"#);
        let doc = raw(&text);
        let fields = Fields::of(&doc).unwrap();
        assert!(fields.sorted);
        for i in 1..900 {
            let expected = if i == 7 {
                "\"again\"".to_string()
            } else {
                i.to_string()
            };
            assert_eq!(fields.get(&format!("c{i}")), Some(expected.as_str()));
        }
        assert_eq!(fields.get("c0"), Some("[0]"));
        assert!(fields.get("c900").is_none() && fields.get("b").is_none());
    }

    fn upsert(seq: u64, id: Uuid, revision: u64, version: u32) -> Task {
        Task {
            seq,
            project: Ident::parse("p").unwrap(),
            op: TaskOp::Upsert {
                blueprint: Ident::parse("sample").unwrap(),
                id,
                revision,
                docs: vec![VersionDoc::new(version, &conformance::sample_doc(id, "t"))],
            },
        }
    }

    fn delete(seq: u64, id: Uuid, revision: u64) -> Task {
        Task {
            seq,
            project: Ident::parse("p").unwrap(),
            op: TaskOp::Delete {
                blueprint: Ident::parse("sample").unwrap(),
                id,
                revision,
                versions: vec![1],
            },
        }
    }

    /// The catalog of project `p` with the sample blueprint frozen as version 1.
    fn sample_snapshot() -> Arc<Snapshot> {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        conformance::freeze_sample(&catalog, &Ident::parse("p").unwrap());
        catalog.snapshot()
    }

    #[test]
    fn each_row_is_written_once_by_its_newest_task_and_unknown_versions_are_skipped() {
        let snapshot = sample_snapshot();
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let (d, e) = (Uuid::from_u128(4), Uuid::from_u128(5));
        let tasks = vec![
            upsert(1, a, 5, 1),
            delete(2, a, 4),
            upsert(3, b, 6, 1),
            delete(4, b, 7),
            upsert(5, c, 8, 1),
            upsert(6, c, 9, 2),
            upsert(7, a, u64::MAX, 1),
            upsert(8, d, 10, 1),
            upsert(9, e, 11, 1),
            upsert(10, d, 12, 1),
        ];
        let plan = plan(&snapshot, &tasks);
        assert_eq!(plan.groups.len(), 1);
        let group = &plan.groups[0];
        assert_eq!(group.schema, "p_v1");
        let upserts: Vec<(Uuid, usize)> = group.upserts.iter().map(|u| (u.id, u.task)).collect();
        // In task order: `d`, written again by a later task, comes after `e`.
        assert_eq!(upserts, vec![(a, 0), (c, 4), (e, 8), (d, 9)]);
        let deletes: Vec<(Uuid, usize)> = group.deletes.iter().map(|d| (d.id, d.task)).collect();
        assert_eq!(deletes, vec![(b, 3)]);
        assert_eq!(plan.versions.len(), 1);
        assert!(plan.outcomes[..6].iter().all(Result::is_ok));
        assert!(plan.outcomes[7..].iter().all(Result::is_ok));
        assert!(
            plan.outcomes[6].is_err(),
            "a revision beyond bigint is refused"
        );
    }

    #[test]
    fn a_large_batch_splits_into_lanes_by_item_id_keeping_task_order() {
        let snapshot = sample_snapshot();
        let tasks: Vec<Task> = (0..40u64)
            .map(|n| {
                let id = Uuid::from_u128(u128::from(n % 10));
                if n % 7 == 0 {
                    delete(n, id, n + 1)
                } else {
                    upsert(n, id, n + 1, 1)
                }
            })
            .collect();
        let lanes = |min_rows| split(plan(&snapshot, &tasks).groups, 3, min_rows);

        let sets = lanes(10);
        assert_eq!(sets.len(), 3);
        let mut seen = Vec::new();
        for (index, set) in sets.iter().enumerate() {
            for group in set {
                let ids = group
                    .upserts
                    .iter()
                    .map(|u| (u.id, u.task))
                    .chain(group.deletes.iter().map(|d| (d.id, d.task)));
                for (id, task) in ids {
                    assert_eq!(id.as_u128() % 3, index as u128, "{id} in lane {index}");
                    seen.push((id, task));
                }
                assert!(group.upserts.windows(2).all(|w| w[0].task < w[1].task));
                assert!(group.deletes.windows(2).all(|w| w[0].task < w[1].task));
            }
        }
        let planned = plan(&snapshot, &tasks);
        let group = &planned.groups[0];
        let mut whole: Vec<(Uuid, usize)> = group
            .upserts
            .iter()
            .map(|u| (u.id, u.task))
            .chain(group.deletes.iter().map(|d| (d.id, d.task)))
            .collect();
        seen.sort();
        whole.sort();
        assert_eq!(seen, whole, "every row in exactly one lane");

        // Ten rows: a batch smaller than the threshold stays whole.
        assert_eq!(lanes(11).len(), 1);
        assert_eq!(split(plan(&snapshot, &tasks).groups, 1, 0).len(), 1);

        // A unique column keeps the batch in one transaction, whatever its size.
        let mut unique = plan(&snapshot, &tasks).groups[0].blueprint.clone();
        unique
            .columns
            .values_mut()
            .next()
            .expect("a column")
            .def
            .unique = true;
        let mut groups = plan(&snapshot, &tasks).groups;
        groups[0].blueprint = &unique;
        assert_eq!(split(groups, 3, 0).len(), 1);
    }
}
