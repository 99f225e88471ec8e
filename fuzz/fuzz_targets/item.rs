//! The item checker: no input panics it, and an item it accepts survives being wrapped in a task
//! (about seven levels deep) and decoded again, and transforms into another version. The write
//! path's body reader (`Document::parse`) accepts and refuses what `json::parse` does, and the
//! checker finds the same fields in what either read.
#![no_main]

use dstore_model::blueprint::check::check_item;
use dstore_model::blueprint::transform::transform;
use dstore_model::blueprint::{apply_edit, parse_blueprint, Blueprint};
use dstore_model::document::{AsFields, Document};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn every_type() -> Value {
    let mut columns = serde_json::Map::new();
    for base in [
        "uuid", "string", "text", "point", "linestring", "polygon", "date", "datetime", "float",
        "integer", "boolean", "json",
    ] {
        columns.insert(base.into(), json!({"type": base}));
        columns.insert(format!("{base}_list"), json!({"type": format!("{base}[]")}));
    }
    json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": columns})
}

fn blueprint(body: Value) -> Blueprint {
    let mut uid = 0;
    apply_edit(None, parse_blueprint(&body, "").expect("valid"), &mut uid, "").expect("valid")
}

fuzz_target!(|data: &[u8]| {
    let document = Document::parse(data);
    let parsed = dstore_model::json::parse(data);
    assert_eq!(document.as_ref().err(), parsed.as_ref().err());
    let (Ok(document), Ok(Value::Object(body))) = (document, parsed) else {
        return;
    };
    let fields = document.fields().expect("an object either way");
    assert!(fields.keys().eq(body.keys().map(String::as_str)));
    assert!(fields.keys().all(|k| fields.get(k) == body.get(k)));
    let from = blueprint(every_type());
    let id = uuid::Uuid::nil();
    let checked = check_item(&from, 1, id, &body);
    assert_eq!(check_item(&from, 1, id, fields), checked);
    let Ok(item) = checked else {
        return;
    };
    let item = item.into_map();
    let task = json!({"seq": 0, "project": "p", "op": {"upsert": {"docs": [{"version": 1, "doc": item}]}}});
    let wrapped = json!({"dead": {"letter": {"task": task}}});
    let text = serde_json::to_string(&wrapped).expect("serializes");
    let back: Value = serde_json::from_str(&text).expect("what was journaled decodes");
    assert_eq!(back, wrapped);
    // Every type changed into text and back: transforms never panic.
    let mut to_text = every_type();
    for column in to_text["columns"].as_object_mut().expect("columns").values_mut() {
        column["type"] = json!("text");
    }
    let to = blueprint(to_text);
    let _ = transform(&item, &from, &to, 2);
});
