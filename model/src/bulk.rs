//! Reading a `_bulk` body: NDJSON action lines, each followed by an item line for `put` and `create`.
//!
//! [`parse`] reads every action line before anything is written (a malformed one refuses the whole
//! request) but leaves each item as its raw line: the caller parses, checks and encodes one item at a
//! time and drops it, so a request never holds more than one parsed item. Action lines are small by
//! nature and refused past [`MAX_ACTION_BYTES`]; an item line past the caller's per-item limit fails
//! that operation alone with 413.

use serde_json::Value;
use uuid::Uuid;

use crate::blueprint::{FieldError, Ident};
use crate::json;

/// Largest action line: `{"put": {"blueprint": <63 bytes>, "id": <uuid>}}` takes about 120.
pub const MAX_ACTION_BYTES: usize = 4096;

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
    pub fn parse_item(&self, max_item_bytes: usize) -> Result<Value, (u16, Vec<FieldError>)> {
        let raw = self.item.unwrap_or_default();
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
        json::parse(raw).map_err(|e| (400, vec![e]))
    }
}

/// Reads every operation of a bulk body; an unreadable action line refuses the whole body, naming
/// its line (`/line/N`).
pub fn parse(raw: &[u8]) -> Result<Vec<Operation<'_>>, FieldError> {
    let mut lines = raw
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace));
    let mut ops = Vec::new();
    while let Some((number, line)) = lines.next() {
        let at = format!("/line/{number}");
        let (action, meta) = action_line(line).map_err(|message| FieldError::new(&at, message))?;
        let item = match action {
            Action::Delete => None,
            Action::Put | Action::Create => match lines.next() {
                Some((_, item)) => Some(item),
                None => {
                    return Err(FieldError::new(
                        &at,
                        format!("the {} action has no item line after it", action.name()),
                    ))
                }
            },
        };
        ops.push(operation(action, &meta, item));
    }
    Ok(ops)
}

/// The action and its metadata object.
fn action_line(line: &[u8]) -> Result<(Action, serde_json::Map<String, Value>), String> {
    if line.len() > MAX_ACTION_BYTES {
        return Err(format!(
            "the action line is {} bytes; an action line holds at most {MAX_ACTION_BYTES}",
            line.len()
        ));
    }
    let value = json::parse(line).map_err(|e| format!("malformed action line: {}", e.message))?;
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
        Value::Object(meta) => Ok((action, meta)),
        _ => Err(format!(
            "the {} action takes an object: {{\"blueprint\": …, \"id\": …}}",
            action.name()
        )),
    }
}

fn operation<'a>(
    action: Action,
    meta: &serde_json::Map<String, Value>,
    item: Option<&'a [u8]>,
) -> Operation<'a> {
    let mut op = Operation {
        action,
        blueprint: None,
        id: None,
        item,
        error: None,
    };
    let mut problems = Vec::new();
    match meta
        .get("blueprint")
        .and_then(Value::as_str)
        .map(Ident::parse)
    {
        Some(Ok(bp)) => op.blueprint = Some(bp),
        Some(Err(reason)) => problems.push(FieldError::new("/blueprint", reason)),
        None => problems.push(FieldError::new("/blueprint", "is required")),
    }
    match (action, meta.get("id")) {
        (Action::Create, None) => op.id = Some(Uuid::now_v7()),
        (Action::Create, Some(_)) => problems.push(FieldError::new(
            "/id",
            "create generates the id; use put to choose one",
        )),
        (_, Some(Value::String(raw))) => match Uuid::parse_str(raw) {
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
    if let Some(unknown) = meta
        .keys()
        .find(|k| !["blueprint", "id"].contains(&k.as_str()))
    {
        problems.push(FieldError::new(
            format!(
                "/{}",
                crate::blueprint::parse::pointer_segment(&crate::blueprint::value::excerpt_str(
                    unknown
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

    #[test]
    fn a_bad_action_line_refuses_the_body_and_a_bad_item_only_its_operation() {
        assert_eq!(parse(b"{\"put\": 1}\n{}").unwrap_err().path, "/line/1");
        assert_eq!(parse(b"\n{\"nope\": {}}").unwrap_err().path, "/line/2");
        let long = format!("{{\"put\": {{\"blueprint\": \"{}\"}}}}", "a".repeat(5000));
        assert!(parse(long.as_bytes()).unwrap_err().message.contains("4096"));
        let ops = parse(b"{\"create\": {\"blueprint\": \"a\"}}\n[[[[").unwrap();
        assert_eq!(ops[0].parse_item(1000).unwrap_err().0, 400);
        assert_eq!(ops[0].parse_item(2).unwrap_err().0, 413);
    }
}
