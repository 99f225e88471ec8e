//! A small validator for index mappings against the official schemas, independent of the allow-list
//! dstore compiles in: it walks `tests/data/elasticsearch-mapping.schema.json` (the OpenAPI component
//! schemas of elastic/elasticsearch-specification, Apache-2.0) as JSON Schema, and, since those schemas
//! do not forbid unknown keys, refuses every key a schema does not list.

use serde_json::Value;

/// Parameters Elasticsearch 8 refuses although a schema may still list them.
const REFUSED: &[&str] = &[
    "tree",
    "precision",
    "tree_levels",
    "strategy",
    "distance_error_pct",
    "points_only",
];

pub struct Schemas {
    all: Value,
}

impl Schemas {
    pub fn load() -> Schemas {
        let text = include_str!("../../data/elasticsearch-mapping.schema.json");
        let mut all: Value = serde_json::from_str(text).expect("the vendored schema is JSON");
        Schemas {
            all: all["openapi_components_schemas"].take(),
        }
    }

    fn named(&self, reference: &str) -> &Value {
        let name = reference.rsplit('/').next().unwrap_or_default();
        self.all
            .get(name)
            .unwrap_or_else(|| panic!("the schema has no {name}"))
    }

    /// Every property a schema lists, following `allOf`.
    fn listed<'a>(&'a self, schema: &'a Value, out: &mut Vec<(&'a str, &'a Value)>) {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            return self.listed(self.named(r), out);
        }
        for part in schema["allOf"].as_array().into_iter().flatten() {
            self.listed(part, out);
        }
        for (key, p) in schema["properties"].as_object().into_iter().flatten() {
            out.push((key, p));
        }
    }

    /// Problems of a whole `mappings` object, as `path: message`.
    pub fn check_type_mapping(&self, mapping: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        self.check_object(
            mapping,
            self.named("_types.mapping.TypeMapping"),
            "",
            &mut problems,
        );
        problems
    }

    fn check_object(&self, value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
        let Some(object) = value.as_object() else {
            return problems.push(format!("{path}: must be an object"));
        };
        let mut listed = Vec::new();
        self.listed(schema, &mut listed);
        for (key, v) in object {
            let at = format!("{path}/{key}");
            if REFUSED.contains(&key.as_str()) {
                problems.push(format!("{at}: refused by Elasticsearch 8"));
            } else {
                match listed.iter().find(|(k, _)| k == key) {
                    Some((_, p)) => self.check_value(v, p, &at, problems),
                    None => problems.push(format!("{at}: not listed by the schema")),
                }
            }
        }
    }

    /// One field mapping: its `type` (default `object`) picks the schema through the discriminator.
    fn check_property(&self, value: &Value, path: &str, problems: &mut Vec<String>) {
        let ty = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("object");
        let discriminator = &self.all["_types.mapping.Property"]["discriminator"]["mapping"];
        match discriminator.get(ty).and_then(Value::as_str) {
            Some(reference) => self.check_object(value, self.named(reference), path, problems),
            None => problems.push(format!("{path}/type: {ty:?} is not a field type")),
        }
    }

    fn check_value(&self, value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            if r.ends_with("/_types.mapping.Property") {
                return self.check_property(value, path, problems);
            }
            return self.check_value(value, self.named(r), path, problems);
        }
        for part in schema["allOf"].as_array().into_iter().flatten() {
            self.check_value(value, part, path, problems);
        }
        if let Some(options) = schema["oneOf"].as_array() {
            let fits = options.iter().any(|o| {
                let mut inner = Vec::new();
                self.check_value(value, o, path, &mut inner);
                inner.is_empty()
            });
            if !fits {
                problems.push(format!("{path}: fits none of the schema's alternatives"));
            }
        }
        if let Some(options) = schema["enum"].as_array() {
            let as_text = match value {
                Value::Bool(b) => Value::String(b.to_string()),
                other => other.clone(),
            };
            if !options.contains(&as_text) {
                problems.push(format!("{path}: {value} is not one of {}", schema["enum"]));
            }
            return;
        }
        let fits = match schema.get("type").and_then(Value::as_str) {
            Some("boolean") => value.is_boolean(),
            Some("number") => value.is_number(),
            Some("string") => value.is_string() || (schema["nullable"] == true && value.is_null()),
            Some("array") => value.is_array(),
            Some("object") => value.is_object(),
            _ => true,
        };
        if !fits {
            return problems.push(format!("{path}: {value} is not of type {}", schema["type"]));
        }
        if let (Some(object), Some(additional)) =
            (value.as_object(), schema.get("additionalProperties"))
        {
            for (key, v) in object {
                self.check_value(v, additional, &format!("{path}/{key}"), problems);
            }
        }
        if let (Some(object), Some(_)) = (value.as_object(), schema.get("properties")) {
            self.check_object(&Value::Object(object.clone()), schema, path, problems);
        }
    }
}

#[test]
fn the_validator_refuses_legacy_and_unknown_parameters() {
    let schemas = Schemas::load();
    let mapping = serde_json::json!({
        "dynamic": "strict",
        "_id": {"path": "id"},
        "properties": {
            "a": {"type": "geo_shape", "tree": "quadtree"},
            "b": {"type": "string", "index": "not_analyzed"},
            "c": {"type": "keyword", "index": "no"},
            "d": {"type": "object", "enabled": false},
        }
    });
    let problems = schemas.check_type_mapping(&mapping);
    for path in [
        "/_id",
        "/properties/a/tree",
        "/properties/b/type",
        "/properties/c/index",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{path}:"))),
            "{path} not reported: {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");
}
