//! The blueprint parser: whatever a client sends, parsing never panics, and a blueprint it accepts
//! survives dstore's own records (the catalog wraps it several levels deep) and reads back the same.
#![no_main]

use dstore_model::blueprint::{apply_edit, parse_blueprint, Blueprint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = dstore_model::json::parse(data) else {
        return;
    };
    let Ok(input) = parse_blueprint(&body, "") else {
        return;
    };
    let mut last_uid = 0;
    let Ok(blueprint) = apply_edit(None, input, &mut last_uid, "") else {
        return;
    };
    // The catalog stores a version as {"blueprints": {name: blueprint}} inside more records.
    let stored = serde_json::json!({"a": {"b": {"c": {"blueprints": {"x": blueprint}}}}});
    let text = serde_json::to_string(&stored).expect("a blueprint serializes");
    let back: serde_json::Value = serde_json::from_str(&text).expect("what was stored decodes");
    let decoded: Blueprint =
        serde_json::from_value(back["a"]["b"]["c"]["blueprints"]["x"].clone()).expect("decodes");
    assert_eq!(decoded, blueprint);
    // Its public form is accepted again as is.
    let public = blueprint.to_public();
    assert!(parse_blueprint(&public, "").is_ok(), "{public}");
});
