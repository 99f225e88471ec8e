//! The item checker: no input panics it, and an item it accepts survives being wrapped in a task
//! (about seven levels deep) and decoded again, and transforms into another version.
#![no_main]

use dstore_model::blueprint::check::check_item;
use dstore_model::blueprint::transform::transform;
use dstore_model::blueprint::{apply_edit, parse_blueprint, Blueprint};
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
    let Ok(Value::Object(body)) = dstore_model::json::parse(data) else {
        return;
    };
    let from = blueprint(every_type());
    let id = uuid::Uuid::nil();
    let Ok(item) = check_item(&from, 1, id, &body) else {
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
