//! Reading a `_bulk` body: NDJSON action lines, each followed by an item line for `put` and `create`.
//!
//! [`parse`] reads every action line before anything is written (a malformed one refuses the whole
//! request) but leaves each item as its raw line: the caller parses, checks and encodes one item at a
//! time and drops it, so a request never holds more than one parsed item. Action lines are small by
//! nature and refused past [`MAX_ACTION_BYTES`]; an item line past the caller's per-item limit fails
//! that operation alone with 413. A body holds at most [`MAX_OPERATIONS`] operations: each costs a
//! few hundred bytes until it is answered, far more than its shortest line (`{"delete":{}}`), so
//! the bound, not the body's size, keeps a request's memory in proportion.
//!
//! An action line as clients write it (one action, string values for `blueprint` and `id`, no
//! other key) is read straight into [`QuickLine`]; any other line takes the general path, which
//! builds a JSON value and names what is wrong. Both give the same operation for every line the
//! quick one reads (property-tested below).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use uuid::Uuid;

use crate::blueprint::{FieldError, Ident};
use crate::document::Document;
use crate::json;

/// Largest action line: `{"put": {"blueprint": <63 bytes>, "id": <uuid>}}` takes about 120.
pub const MAX_ACTION_BYTES: usize = 4096;
/// Most operations in one `_bulk` body.
pub const MAX_OPERATIONS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Put,
    Create,
    Delete,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Put => "put",
            Action::Create => "create",
            Action::Delete => "delete",
        }
    }
}

/// One operation of a bulk body, its item still unparsed.
#[derive(Debug)]
pub struct Operation<'a> {
    pub action: Action,
    pub blueprint: Option<Ident>,
    pub id: Option<Uuid>,
    /// The raw item line of a `put` or `create`.
    pub item: Option<&'a [u8]>,
    /// A problem found while reading the operation: its status and errors.
    pub error: Option<(u16, Vec<FieldError>)>,
}

impl Operation<'_> {
    /// The item, parsed; `max_item_bytes` bounds one item as a single PUT's body is bounded.
    pub fn parse_item(&self, max_item_bytes: usize) -> Result<Document, (u16, Vec<FieldError>)> {
        parse_item(self.item.unwrap_or_default(), max_item_bytes)
    }
}

/// An item line, parsed; `max_item_bytes` bounds one item as a single PUT's body is bounded.
pub fn parse_item(raw: &[u8], max_item_bytes: usize) -> Result<Document, (u16, Vec<FieldError>)> {
    if raw.len() > max_item_bytes {
        return Err((
            413,
            vec![FieldError::new(
                "",
                format!(
                    "the item line is {} bytes, more than the limit of {max_item_bytes} bytes for one item",
                    raw.len()
                ),
            )],
        ));
    }
    if blank(raw) {
        return Err((
            400,
            vec![FieldError::new(
                "",
                "the item line is empty: put and create take their item on the line right after \
                 their action line",
            )],
        ));
    }
    Document::parse(raw).map_err(|e| (400, vec![e]))
}

/// Whether a line holds nothing but whitespace.
fn blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Reads every operation of a bulk body; an unreadable action line refuses the whole body, naming
/// its line (`/line/N`), and so does a body without any operation (as Elasticsearch's `_bulk`
/// does: it is a client's mistake, not a batch of nothing). Blank lines between operations are
/// passed over; an item is the line right after its action line, blank or not (a blank one fails
/// its operation alone): skipping it would take the next operation's action line for the item,
/// and leave that operation out of the answer, every later answer one place off.
pub fn parse(raw: &[u8]) -> Result<Vec<Operation<'_>>, FieldError> {
    let mut lines = lines(raw)
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .peekable();
    let mut ops = Vec::new();
    while let Some((number, line)) = lines.next() {
        if blank(line) {
            continue;
        }
        let at = || format!("/line/{number}");
        if ops.len() == MAX_OPERATIONS {
            return Err(FieldError::new(
                at(),
                format!("a _bulk body holds at most {MAX_OPERATIONS} operations; send the rest in another"),
            ));
        }
        let (action, meta) =
            action_line(line).map_err(|e| FieldError::new(at() + &e.path, e.message))?;
        let item = match action {
            Action::Delete => None,
            Action::Put | Action::Create => match lines.next() {
                // A body's last line, blank, is only what follows its last newline.
                Some((_, item)) if !(blank(item) && lines.peek().is_none()) => Some(item),
                _ => {
                    return Err(FieldError::new(
                        at(),
                        format!("the {} action has no item line after it", action.name()),
                    ))
                }
            },
        };
        ops.push(operation(action, meta, item));
    }
    if ops.is_empty() {
        return Err(FieldError::new(
            "",
            "the _bulk body holds no operation: send an action line, and the item after it for put and create",
        ));
    }
    Ok(ops)
}

/// The lines of `raw` as `split` at `\n` gives them, found with memchr rather than by testing
/// each byte in turn.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', raw)
        .chain([raw.len()])
        .map(move |end| {
            let line = &raw[start..end];
            start = end + 1;
            line
        })
}

/// What an action line's object says, whichever path read it.
struct Meta<'a> {
    /// `blueprint` when it is a string (anything else counts as missing).
    blueprint: Option<Cow<'a, str>>,
    id: IdField<'a>,
    /// The first key that is neither `blueprint` nor `id`.
    unknown: Option<String>,
}

enum IdField<'a> {
    Missing,
    Text(Cow<'a, str>),
    /// Present but not a string.
    Other,
}

/// The common action line, read without a JSON value. Strings with escapes, `null`s, other keys,
/// repeated keys and anything nested fail here and take the general path.
#[derive(Deserialize)]
enum QuickLine<'a> {
    #[serde(rename = "put", alias = "index", borrow)]
    Put(QuickMeta<'a>),
    #[serde(rename = "create", borrow)]
    Create(QuickMeta<'a>),
    #[serde(rename = "delete", borrow)]
    Delete(QuickMeta<'a>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickMeta<'a> {
    #[serde(default, borrow, deserialize_with = "plain_str")]
    blueprint: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "plain_str")]
    id: Option<&'a str>,
}

/// A string without escapes; `null` is refused (it is not the same as a missing key for `id`).
fn plain_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    <&'de str>::deserialize(d).map(Some)
}

impl<'a> QuickLine<'a> {
    fn into_parts(self) -> (Action, Meta<'a>) {
        let (action, meta) = match self {
            QuickLine::Put(meta) => (Action::Put, meta),
            QuickLine::Create(meta) => (Action::Create, meta),
            QuickLine::Delete(meta) => (Action::Delete, meta),
        };
        let id = meta
            .id
            .map_or(IdField::Missing, |id| IdField::Text(Cow::Borrowed(id)));
        let blueprint = meta.blueprint.map(Cow::Borrowed);
        let unknown = None;
        (
            action,
            Meta {
                blueprint,
                id,
                unknown,
            },
        )
    }
}

/// `line` without the JSON whitespace at its end.
fn trim_json_space(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|b| !json::is_space(*b))
        .map_or(0, |at| at + 1);
    &line[..end]
}

/// The action and its metadata object.
fn action_line(line: &[u8]) -> Result<(Action, Meta<'_>), FieldError> {
    if line.len() > MAX_ACTION_BYTES {
        return Err(FieldError::new(
            "",
            format!(
                "the action line is {} bytes; an action line holds at most {MAX_ACTION_BYTES}",
                line.len()
            ),
        ));
    }
    if let Some(parts) = compact_line(line) {
        return Ok(parts);
    }
    if let Ok(quick) = serde_json::from_slice::<QuickLine>(line) {
        return Ok(quick.into_parts());
    }
    general_action_line(line)
}

/// The action line as most clients write it, without spaces (`{"put":{"blueprint":"a","id":"…"}}`),
/// read by comparing bytes: serde's derived reader of [`QuickLine`] took 5 % of a `_bulk` item's
/// instructions. `None` for any other line, which [`QuickLine`] or the general path then reads:
/// spaces, escapes or control characters in a string, other or repeated keys.
fn compact_line(line: &[u8]) -> Option<(Action, Meta<'_>)> {
    let line = trim_json_space(line);
    let (action, mut rest) = [
        (Action::Put, &b"{\"put\":{"[..]),
        (Action::Put, b"{\"index\":{"),
        (Action::Create, b"{\"create\":{"),
        (Action::Delete, b"{\"delete\":{"),
    ]
    .into_iter()
    .find_map(|(action, start)| Some((action, line.strip_prefix(start)?)))?;
    rest = rest.strip_suffix(b"}}")?;
    let mut meta = Meta {
        blueprint: None,
        id: IdField::Missing,
        unknown: None,
    };
    while !rest.is_empty() {
        let (blueprint, value) = match rest.strip_prefix(b"\"blueprint\":\"") {
            Some(value) => (true, value),
            None => (false, rest.strip_prefix(b"\"id\":\"")?),
        };
        let end = value
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .filter(|&end| value[end] == b'"')?;
        let text = Cow::Borrowed(std::str::from_utf8(&value[..end]).ok()?);
        // A repeated key is left to the other paths, which refuse it.
        let repeated = if blueprint {
            meta.blueprint.replace(text).is_some()
        } else {
            !matches!(
                std::mem::replace(&mut meta.id, IdField::Text(text)),
                IdField::Missing
            )
        };
        if repeated {
            return None;
        }
        rest = &value[end + 1..];
        if !rest.is_empty() {
            rest = rest.strip_prefix(b",").filter(|r| !r.is_empty())?;
        }
    }
    Some((action, meta))
}

/// Any action line, through a JSON value: what [`QuickLine`] does not read, and every error (its
/// path within the line: a key the line repeats is named).
fn general_action_line(line: &[u8]) -> Result<(Action, Meta<'static>), FieldError> {
    let value = json::parse(line)
        .map_err(|e| FieldError::new(e.path, format!("malformed action line: {}", e.message)))?;
    general_action(value).map_err(|message| FieldError::new("", message))
}

/// What an action line's JSON value says, or why it says nothing.
fn general_action(value: Value) -> Result<(Action, Meta<'static>), String> {
    let Value::Object(object) = value else {
        return Err("an action line is an object with one key: put, create or delete".into());
    };
    let mut entries = object.into_iter();
    let (Some((name, meta)), None) = (entries.next(), entries.next()) else {
        return Err("an action line is an object with one key: put, create or delete".into());
    };
    let action = match name.as_str() {
        "put" | "index" => Action::Put,
        "create" => Action::Create,
        "delete" => Action::Delete,
        other => {
            return Err(format!(
                "unknown action {:?}; expected put, create or delete",
                crate::blueprint::value::excerpt_str(other)
            ))
        }
    };
    match meta {
        Value::Object(mut meta) => {
            let unknown = meta
                .keys()
                .find(|k| !["blueprint", "id"].contains(&k.as_str()))
                .cloned();
            let blueprint = match meta.swap_remove("blueprint") {
                Some(Value::String(blueprint)) => Some(Cow::Owned(blueprint)),
                _ => None,
            };
            let id = match meta.swap_remove("id") {
                None => IdField::Missing,
                Some(Value::String(id)) => IdField::Text(Cow::Owned(id)),
                Some(_) => IdField::Other,
            };
            Ok((
                action,
                Meta {
                    blueprint,
                    id,
                    unknown,
                },
            ))
        }
        _ => Err(format!(
            "the {} action takes an object: {{\"blueprint\": …, \"id\": …}}",
            action.name()
        )),
    }
}

fn operation<'a>(action: Action, meta: Meta<'_>, item: Option<&'a [u8]>) -> Operation<'a> {
    let mut op = Operation {
        action,
        blueprint: None,
        id: None,
        item,
        error: None,
    };
    let mut problems = Vec::new();
    match meta.blueprint.as_deref().map(Ident::parse) {
        Some(Ok(bp)) => op.blueprint = Some(bp),
        Some(Err(reason)) => problems.push(FieldError::new("/blueprint", reason)),
        None => problems.push(FieldError::new("/blueprint", "is required")),
    }
    match (action, &meta.id) {
        (Action::Create, IdField::Missing) => op.id = Some(Uuid::now_v7()),
        (Action::Create, _) => problems.push(FieldError::new(
            "/id",
            "create generates the id; use put to choose one",
        )),
        (_, IdField::Text(raw)) => match Uuid::parse_str(raw) {
            Ok(id) => op.id = Some(id),
            Err(_) => problems.push(FieldError::new(
                "/id",
                format!(
                    "{:?} is not a uuid",
                    crate::blueprint::value::excerpt_str(raw)
                ),
            )),
        },
        (_, _) => problems.push(FieldError::new("/id", "is required: a uuid")),
    }
    if let Some(unknown) = meta.unknown {
        problems.push(FieldError::new(
            format!(
                "/{}",
                crate::blueprint::parse::pointer_segment(&crate::blueprint::value::excerpt_str(
                    &unknown
                ))
            ),
            "unknown key; expected blueprint and id",
        ));
    }
    if !problems.is_empty() {
        op.error = Some((400, problems));
    }
    op
}

#[cfg(test)]
mod tests {
    /// Past `MAX_OPERATIONS`, the body is refused at the first operation too many, before any
    /// is kept; at the bound it is read whole.
    #[test]
    fn a_body_holds_at_most_max_operations() {
        let line =
            "{\"delete\":{\"blueprint\":\"a\",\"id\":\"5f0c0c9e-1b2a-4c3d-8e4f-000000000001\"}}\n";
        let at_bound = line.repeat(super::MAX_OPERATIONS);
        assert_eq!(
            super::parse(at_bound.as_bytes()).unwrap().len(),
            super::MAX_OPERATIONS
        );
        let over = line.repeat(super::MAX_OPERATIONS + 1);
        let error = super::parse(over.as_bytes()).unwrap_err();
        assert_eq!(error.path, format!("/line/{}", super::MAX_OPERATIONS + 1));
        assert!(
            error.message.contains("at most 100000 operations"),
            "{}",
            error.message
        );
    }

    use super::*;

    #[test]
    fn operations_keep_their_item_lines_raw() {
        let body = b"{\"put\": {\"blueprint\": \"a\", \"id\": \"0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01\"}}\n{\"x\": 1}\n\n{\"delete\": {\"blueprint\": \"a\", \"id\": \"0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01\"}}\n{\"create\": {\"blueprint\": \"a\"}}\n{}";
        let ops = parse(body).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].item, Some(&b"{\"x\": 1}"[..]));
        assert_eq!(ops[1].action, Action::Delete);
        assert!(ops[2].id.is_some() && ops[2].error.is_none());
    }

    /// A blank line where an item belongs fails that operation alone: the next line is an action
    /// line again, and every operation is answered in its place.
    #[test]
    fn a_blank_item_line_fails_its_operation_alone() {
        let body = format!(
            "{{\"put\":{{\"blueprint\":\"a\",\"id\":\"{ID}\"}}}}\n\r\n{{\"delete\":{{\"blueprint\":\"a\",\"id\":\"{ID}\"}}}}\n\n{{\"create\":{{\"blueprint\":\"a\"}}}}\n{{}}\n"
        );
        let ops = parse(body.as_bytes()).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].action, Action::Put);
        let (status, errors) = ops[0].parse_item(1000).unwrap_err();
        assert_eq!(status, 400);
        assert!(
            errors[0].message.contains("item line is empty"),
            "{errors:?}"
        );
        assert_eq!(ops[1].action, Action::Delete);
        assert_eq!(ops[2].action, Action::Create);
        assert!(ops[2].parse_item(1000).is_ok());
        // An action with nothing after it but the body's last newline has no item line.
        let error = parse(b"{\"create\": {\"blueprint\": \"a\"}}\n").unwrap_err();
        assert!(error.message.contains("no item line"), "{error:?}");
    }

    #[test]
    fn a_body_without_operations_is_refused() {
        for body in [&b""[..], b"\n", b" \r\n\t\n"] {
            let error = parse(body).unwrap_err();
            assert!(error.message.contains("holds no operation"), "{error:?}");
        }
    }

    #[test]
    fn a_bad_action_line_refuses_the_body_and_a_bad_item_only_its_operation() {
        assert_eq!(parse(b"{\"put\": 1}\n{}").unwrap_err().path, "/line/1");
        assert_eq!(parse(b"\n{\"nope\": {}}").unwrap_err().path, "/line/2");
        // A key an action line repeats is named within its line, however the line is written.
        for line in [
            &br#"{"put":{"blueprint":"a","blueprint":"b","id":"x"}}"#[..],
            br#"{"put": {"blueprint": "a", "\u0062lueprint": "b"}}"#,
        ] {
            let error = parse(line).unwrap_err();
            assert_eq!(error.path, "/line/1/put/blueprint", "{error:?}");
            assert!(error.message.contains("twice"), "{error:?}");
        }
        assert_eq!(
            parse(br#"{"put":{},"put":{}}"#).unwrap_err().path,
            "/line/1/put"
        );
        let long = format!("{{\"put\": {{\"blueprint\": \"{}\"}}}}", "a".repeat(5000));
        assert!(parse(long.as_bytes()).unwrap_err().message.contains("4096"));
        let ops = parse(b"{\"create\": {\"blueprint\": \"a\"}}\n[[[[").unwrap();
        assert_eq!(ops[0].parse_item(1000).unwrap_err().0, 400);
        assert_eq!(ops[0].parse_item(2).unwrap_err().0, 413);
    }

    const ID: &str = "0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01";

    fn quick(line: &str) -> bool {
        serde_json::from_slice::<QuickLine>(line.as_bytes()).is_ok()
    }

    #[test]
    fn compact_lines_are_read_by_their_bytes() {
        let line = format!(r#"{{"put":{{"blueprint":"article","id":"{ID}"}}}}"#);
        let (action, meta) = compact_line(line.as_bytes()).unwrap();
        let op = operation(action, meta, None);
        assert_eq!(
            (op.action, op.blueprint.unwrap().as_str()),
            (Action::Put, "article")
        );
        assert_eq!(op.id.unwrap().to_string(), ID);
        assert!(compact_line(br#"{"delete":{"id":"x","blueprint":"a}}"}}"#).is_some());
        for other in [
            r#"{"put": {"blueprint":"a"}}"#.to_string(),
            r#"{"put":{"blueprint":"a","blueprint":"b"}}"#.to_string(),
            r#"{"put":{"blueprint":"a\u0062"}}"#.to_string(),
            r#"{"put":{"blueprint":"a",}}"#.to_string(),
            r#"{"put":{"blueprint":"a","x":"b"}}"#.to_string(),
            "{\"put\":{\"blueprint\":\"a\tb\"}}".to_string(),
            r#"{"put":{"blueprint":"a"}}}"#.to_string(),
        ] {
            assert!(compact_line(other.as_bytes()).is_none(), "{other}");
        }
    }

    #[test]
    fn lines_as_clients_write_them_take_the_quick_path_and_odd_ones_the_general() {
        for line in [
            format!(r#"{{"put": {{"blueprint": "article", "id": "{ID}"}}}}"#),
            format!(r#"{{"index":{{"id":"{ID}","blueprint":"article"}}}}"#),
            r#"{"create": {"blueprint": "article"}}"#.to_string(),
            format!(r#" {{ "delete" : {{ "blueprint" : "a", "id" : "{ID}" }} }} "#),
        ] {
            assert!(quick(&line), "{line}");
        }
        for line in [
            r#"{"create": {"blueprint": "a", "id": null}}"#,
            r#"{"put": {"blueprint": "a\u0062"}}"#,
            r#"{"put": {"blueprint": "a", "other": 1}}"#,
            r#"{"put": {"blueprint": "a"}, "delete": {}}"#,
            r#"{"put": {"blueprint": "a", "blueprint": "b"}}"#,
        ] {
            assert!(!quick(line), "{line}");
        }
        // A null id is not a missing one: create refuses it.
        let ops = parse(b"{\"create\": {\"blueprint\": \"a\", \"id\": null}}\n{}").unwrap();
        assert_eq!(ops[0].error.as_ref().unwrap().1[0].path, "/id");
    }

    fn fragment() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::sample::select(vec![
            "\"a\"".to_string(),
            "\"article\"".to_string(),
            format!("\"{ID}\""),
            "\"not-a-uuid\"".to_string(),
            "\"a\\u0062\"".to_string(),
            "\"bad name!\"".to_string(),
            "\"\"".to_string(),
            "null".to_string(),
            "1".to_string(),
            "{}".to_string(),
            "[\"a\"]".to_string(),
        ])
    }

    proptest::proptest! {
        #[test]
        fn lines_are_the_ones_split_gives(raw in "[\n\ra]{0,12}") {
            let found: Vec<&[u8]> = lines(raw.as_bytes()).collect();
            let split: Vec<&[u8]> = raw.as_bytes().split(|b| *b == b'\n').collect();
            proptest::prop_assert_eq!(found, split);
        }

        /// Whatever line a quick path reads, the general path reads the same operation from.
        #[test]
        fn the_quick_path_agrees_with_the_general_one(
            action in proptest::sample::select(vec!["put", "index", "create", "delete", "Put", "other"]),
            entries in proptest::collection::vec(
                (proptest::sample::select(vec!["blueprint", "id", "x", "Id"]), fragment()),
                0..4,
            ),
            extra in proptest::option::of(fragment()),
            compact in proptest::bool::ANY,
            end in proptest::sample::select(vec!["", " ", "\r", "\x0c", "}"]),
        ) {
            let (colon, comma) = if compact { (":", ",") } else { (": ", ", ") };
            let meta: Vec<String> = entries.iter().map(|(k, v)| format!("\"{k}\"{colon}{v}")).collect();
            let mut line = format!("{{\"{action}\"{colon}{{{}}}", meta.join(comma));
            if let Some(extra) = extra {
                line.push_str(&format!("{comma}\"more\"{colon}{extra}"));
            }
            line.push('}');
            line.push_str(end);
            let quick = compact_line(line.as_bytes())
                .or_else(|| serde_json::from_slice::<QuickLine>(line.as_bytes()).ok().map(QuickLine::into_parts));
            if let Some((action, meta)) = quick {
                let (general_action, general_meta) = general_action_line(line.as_bytes())
                    .expect("the general path reads every line the quick one reads");
                proptest::prop_assert_eq!(action, general_action);
                let (a, b) = (operation(action, meta, None), operation(action, general_meta, None));
                proptest::prop_assert_eq!(&a.blueprint, &b.blueprint);
                proptest::prop_assert_eq!(&a.error, &b.error);
                // create generates a fresh id each time; everything else must be equal.
                proptest::prop_assert_eq!(a.id.is_some(), b.id.is_some());
                if action != Action::Create {
                    proptest::prop_assert_eq!(a.id, b.id);
                }
            }
        }
    }
}
