//! The index dstore creates for one blueprint of one frozen version: settings, a strict mapping built
//! from the type table of docs/design.md §2, and the `_meta` that says whose index it is.
//!
//! Invariants: the mapping is `"dynamic": "strict"`, so a document with a key the version does not
//! know is refused rather than silently mapped; it uses only types and parameters Elasticsearch 8
//! accepts (a test checks every generated mapping against the official schemas); a column's
//! `elasticsearch` override is applied here and checked in [`check_overrides`]. Pure: no I/O.

use serde_json::{json, Map, Value};

use super::schema;
use crate::blueprint::parse::{pointer_segment, BlueprintInput};
use crate::blueprint::types::{BaseType, ColumnType};
use crate::blueprint::{Blueprint, ColumnDef, FieldError, Ident};

/// How long Elasticsearch remembers the version of a deleted document. Deletes are external-versioned
/// like writes, so while the tombstone lives an older revision (a redelivered task, a back-fill chunk
/// queued behind the delete) is refused as a conflict. The default of 60s is shorter than an outage of
/// the store that holds such a task back, so dstore keeps tombstones for a day; each costs a few dozen
/// bytes of heap per deleted document until then.
pub const GC_DELETES: &str = "1d";

/// `date` columns: the canonical `YYYY-MM-DD`.
pub const DATE_FORMAT: &str = "yyyy-MM-dd";

/// `datetime` columns: the canonical `YYYY-MM-DD HH:MM:SS` (UTC), with or without microseconds, and ISO.
pub const DATETIME_FORMAT: &str =
    "yyyy-MM-dd HH:mm:ss||yyyy-MM-dd HH:mm:ss.SSSSSS||strict_date_optional_time";

/// Longest string a keyword column indexes, in characters: Lucene refuses terms over 32766 bytes,
/// and 8191 characters stay under it in UTF-8. Longer values are kept in `_source`, not indexed.
pub const KEYWORD_IGNORE_ABOVE: u64 = 8191;

/// `{"type": ty, …params}`.
fn field(ty: &str, params: &[(&str, Value)]) -> Map<String, Value> {
    let mut mapping = Map::new();
    mapping.insert("type".into(), Value::from(ty));
    for (key, value) in params {
        mapping.insert((*key).into(), value.clone());
    }
    mapping
}

/// The generated mapping of a scalar kind; an array column maps like its element.
fn base_mapping(base: BaseType) -> Map<String, Value> {
    match base {
        BaseType::Uuid => field("keyword", &[]),
        BaseType::String => field("keyword", &[("ignore_above", json!(KEYWORD_IGNORE_ABOVE))]),
        BaseType::Text => field("text", &[]),
        BaseType::Point => field("geo_point", &[]),
        BaseType::LineString | BaseType::Polygon => field("geo_shape", &[]),
        BaseType::Date => field("date", &[("format", json!(DATE_FORMAT))]),
        BaseType::DateTime => field("date", &[("format", json!(DATETIME_FORMAT))]),
        BaseType::Float => field("float", &[]),
        BaseType::Integer => field("integer", &[]),
        BaseType::Boolean => field("boolean", &[]),
        BaseType::Json => field("object", &[("enabled", json!(false))]),
    }
}

/// The mapping dstore generates for a column type, before any override.
pub fn generated(ty: ColumnType) -> Map<String, Value> {
    match ty {
        ColumnType::One(base) | ColumnType::Many(base) => base_mapping(base),
    }
}

/// A column's mapping: an override with a `type` replaces the generated mapping; one without adds
/// or replaces parameters of it.
pub fn column_mapping(def: &ColumnDef) -> Map<String, Value> {
    match &def.elasticsearch {
        None => generated(def.ty),
        Some(over) if over.contains_key("type") => over.clone(),
        Some(over) => {
            let mut mapping = generated(def.ty);
            mapping.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
            mapping
        }
    }
}

/// Checks a column's override as it would be applied: `(pointer below the override, message)`.
pub fn check_override(ty: ColumnType, over: &Map<String, Value>) -> Vec<(String, String)> {
    let mut problems = check_override_schema(ty, over);
    if problems.is_empty() {
        let def = ColumnDef {
            elasticsearch: Some(over.clone()),
            ..ColumnDef::of_type(ty)
        };
        problems.extend(holds(ty.base(), &column_mapping(&def)));
    }
    problems
}

/// [`check_override`] without [`holds`]: what a column whose override did not change is still
/// held to (its items were taken before dstore checked whether the field holds them).
fn check_override_schema(ty: ColumnType, over: &Map<String, Value>) -> Vec<(String, String)> {
    let def = ColumnDef {
        elasticsearch: Some(over.clone()),
        ..ColumnDef::of_type(ty)
    };
    schema::check_property(&column_mapping(&def), None)
        .into_iter()
        // A problem in a generated parameter is ours, not the client's; report only what they sent.
        .filter(|(path, _)| over.contains_key(&first_key(path)))
        .collect()
}

/// Whether a field mapped as `effective` takes every value of a `base` column as dstore sends it
/// (a mapping that refuses some would make Elasticsearch refuse those items for ever, while every
/// other store took them): the problem, under the override key it comes from, if not.
fn holds(base: BaseType, effective: &Map<String, Value>) -> Option<(String, String)> {
    use BaseType::*;
    let ty = effective
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("object");
    // Types that take every value of the column's type (dates within years 1–9999, integers of
    // 32 bits, floats of 32, any string up to Lucene's term limit when ignored above). An object
    // mapping of a json column with properties says which shape of values the column holds.
    let takes: &[&str] = match base {
        String | Text => &[
            "keyword",
            "text",
            "wildcard",
            "match_only_text",
            "search_as_you_type",
        ],
        Uuid => &["keyword", "text", "wildcard", "match_only_text"],
        Integer => &[
            "integer",
            "long",
            "float",
            "double",
            "scaled_float",
            "keyword",
        ],
        Float => &["float", "double", "keyword"],
        Boolean => &["boolean", "keyword"],
        Date | DateTime => &["date", "keyword"],
        Point => &["geo_point", "geo_shape"],
        LineString | Polygon => &["geo_shape"],
        Json => &["object", "nested"],
    };
    if !takes.contains(&ty) {
        return Some((
            "/type".into(),
            format!(
                "an Elasticsearch {ty} field cannot take every {} value dstore sends (it would \
                 refuse those items for ever); a {} column takes {}",
                base.name(),
                base.name(),
                takes.join(", ")
            ),
        ));
    }
    // Elasticsearch refuses a document that sends a value for a scripted field, and dstore sends
    // every column.
    if effective.contains_key("script") {
        return Some((
            "/script".into(),
            "a field computed by a script refuses every document that sends it a value, and \
             dstore sends every column"
                .into(),
        ));
    }
    // A multi-field indexes the same value again: its type must take every value too.
    if let Some(fields) = effective.get("fields").and_then(Value::as_object) {
        for (name, sub) in fields {
            let Some(sub_ty) = sub.get("type").and_then(Value::as_str) else {
                continue;
            };
            if !takes.contains(&sub_ty) {
                return Some((
                    format!(
                        "/fields/{}/type",
                        name.replace('~', "~0").replace('/', "~1")
                    ),
                    format!(
                        "an Elasticsearch {sub_ty} field cannot take every {} value dstore sends \
                         (it would refuse those items for ever); a {} column takes {}",
                        base.name(),
                        base.name(),
                        takes.join(", ")
                    ),
                ));
            }
        }
    }
    // Keys a value may hold: named by properties, or taken as they come (`dynamic` true or
    // `runtime`; `strict`, the index's, refuses every key not named).
    let dynamic = matches!(
        effective.get("dynamic"),
        Some(Value::Bool(true)) | Some(Value::String(_))
    ) && !matches!(
        effective.get("dynamic").and_then(Value::as_str),
        Some("strict" | "false")
    );
    let named = effective
        .get("properties")
        .and_then(Value::as_object)
        .is_some_and(|properties| !properties.is_empty());
    let shapeless = !named && !dynamic;
    if base == Json && ty == "nested" && shapeless {
        return Some((
            "/properties".into(),
            "a json column mapped as nested must name its properties, or let keys come as they \
             are (\"dynamic\": true or \"runtime\"): the index's mapping is strict, and every \
             key a value holds would be refused"
                .into(),
        ));
    }
    if base == Json
        && ty == "object"
        && shapeless
        && effective.get("enabled") != Some(&Value::Bool(false))
    {
        return Some((
            "/enabled".into(),
            "a json column mapped as an object without properties must stay \"enabled\": false: \
             the index's mapping is strict, and every key a value holds would be refused"
                .into(),
        ));
    }
    if ty == "date" {
        // What dstore sends: `2024-05-01`, and `2024-05-01 10:00:00` with or without microseconds.
        let needed: &[&[&str]] = if base == Date {
            &[&[
                "yyyy-MM-dd",
                "strict_date_optional_time",
                "date_optional_time",
                "strict_date",
                "date",
                "strict_date_optional_time_nanos",
            ]]
        } else {
            &[&["yyyy-MM-dd HH:mm:ss"], &["yyyy-MM-dd HH:mm:ss.SSSSSS"]]
        };
        let format = effective
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or("strict_date_optional_time||epoch_millis");
        let alternatives: Vec<&str> = format.split("||").map(str::trim).collect();
        if !needed
            .iter()
            .all(|any| any.iter().any(|f| alternatives.contains(f)))
        {
            let ours = if base == Date {
                DATE_FORMAT
            } else {
                DATETIME_FORMAT
            };
            let at = if effective.contains_key("format") {
                "/format"
            } else {
                "/type"
            };
            return Some((
                at.into(),
                format!(
                    "the field's date format {format:?} does not read every {} dstore sends; \
                     keep {ours:?} among its alternatives (joined by ||)",
                    base.name()
                ),
            ));
        }
    }
    None
}

/// The unescaped first segment of a JSON pointer: the override key a problem is under.
fn first_key(path: &str) -> String {
    let segment = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    segment.replace("~1", "/").replace("~0", "~")
}

/// Elasticsearch's `index.mapping.total_fields.limit`, `index.mapping.depth.limit` and
/// `index.mapping.nested_fields.limit` defaults: an index whose mapping passes one is refused, for
/// good, when the version is migrated.
pub const MAX_FIELDS: usize = 1000;
pub const MAX_DEPTH: usize = 20;
pub const MAX_NESTED: usize = 50;

/// What a mapping adds against Elasticsearch's limits.
#[derive(Default)]
struct Counts {
    /// Itself, its multi-fields and object properties, as Elasticsearch counts them.
    fields: usize,
    /// Its depth in objects.
    depth: usize,
    /// Its `nested` mappings.
    nested: usize,
}

fn counts(mapping: &Map<String, Value>) -> Counts {
    let children = |key: &str| {
        mapping
            .get(key)
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(Map::values)
            .filter_map(Value::as_object)
            .map(counts)
    };
    let mut total = Counts {
        fields: 1,
        depth: 1,
        nested: usize::from(mapping.get("type").and_then(Value::as_str) == Some("nested")),
    };
    // Multi-fields are fields of their own at the same level; properties are one level down.
    for child in children("fields") {
        total.fields += child.fields;
        total.nested += child.nested;
    }
    for child in children("properties") {
        total.fields += child.fields;
        total.depth = total.depth.max(child.depth + 1);
        total.nested += child.nested;
    }
    total
}

/// Calls `visit` with a mapping and with every mapping inside it (multi-fields, properties), each
/// with its pointer below the outermost.
fn each_mapping(
    mapping: &Map<String, Value>,
    at: &str,
    visit: &mut impl FnMut(&Map<String, Value>, &str),
) {
    visit(mapping, at);
    for key in ["fields", "properties"] {
        let children = mapping.get(key).and_then(Value::as_object).into_iter();
        for (name, child) in children.flatten() {
            if let Some(child) = child.as_object() {
                each_mapping(
                    child,
                    &format!("{at}/{key}/{}", pointer_segment(name)),
                    visit,
                );
            }
        }
    }
}

/// The `copy_to` targets of one mapping (not those inside it), with their pointers.
fn copy_targets(mapping: &Map<String, Value>, at: &str) -> Vec<(String, String)> {
    match mapping.get("copy_to") {
        Some(Value::String(target)) => vec![(format!("{at}/copy_to"), target.clone())],
        Some(Value::Array(targets)) => targets
            .iter()
            .enumerate()
            .map(|(i, target)| {
                let name = target.as_str().unwrap_or_default().to_owned();
                (format!("{at}/copy_to/{i}"), name)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether one mapping is a `keyword` without an `ignore_above` of at most
/// [`KEYWORD_IGNORE_ABOVE`].
fn unbounded_keyword(mapping: &Map<String, Value>) -> bool {
    let bound = mapping.get("ignore_above").and_then(Value::as_u64);
    mapping.get("type").and_then(Value::as_str) == Some("keyword")
        && bound.is_none_or(|n| n > KEYWORD_IGNORE_ABOVE)
}

/// Every override problem of a parsed blueprint, as field errors under `base/columns/<name>/elasticsearch`;
/// also a mapping that would pass Elasticsearch's field or depth limits. Overrides that would have
/// Elasticsearch refuse documents (a `copy_to` to no other column, an unbounded `keyword` of a
/// text) are refused when they are new or changed from the column's in `current` (the blueprint
/// now): a blueprint accepted before these checks existed can be put again unchanged.
pub fn check_overrides(
    input: &BlueprintInput,
    base: &str,
    current: Option<&Blueprint>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    // `id`, `project_version` and `links`.
    let (mut fields, mut nested) = (3, 0);
    for column in &input.columns {
        let Counts {
            fields: count,
            depth,
            nested: deep,
        } = counts(&column_mapping(&column.def));
        fields += count;
        nested += deep;
        if depth > MAX_DEPTH {
            errors.push(FieldError::new(
                format!(
                    "{base}/columns/{}/elasticsearch",
                    pointer_segment(column.name.as_str())
                ),
                format!("objects nested {depth} deep; Elasticsearch allows {MAX_DEPTH} (index.mapping.depth.limit)"),
            ));
        }
    }
    if fields > MAX_FIELDS {
        errors.push(FieldError::new(
            format!("{base}/columns"),
            format!("the Elasticsearch mapping would have {fields} fields (with multi-fields and object properties); Elasticsearch allows {MAX_FIELDS} (index.mapping.total_fields.limit)"),
        ));
    }
    if nested > MAX_NESTED {
        errors.push(FieldError::new(
            format!("{base}/columns"),
            format!("the Elasticsearch mapping would have {nested} nested fields; Elasticsearch allows {MAX_NESTED} (index.mapping.nested_fields.limit)"),
        ));
    }
    // The fields of the mapping: its columns, by the names they take.
    let names: Vec<&str> = input
        .columns
        .iter()
        .map(|c| c.rename_to.as_ref().unwrap_or(&c.name).as_str())
        .collect();
    for column in &input.columns {
        let Some(over) = &column.def.elasticsearch else {
            continue;
        };
        let at = |path: &str| {
            format!(
                "{base}/columns/{}/elasticsearch{path}",
                pointer_segment(column.name.as_str())
            )
        };
        let unchanged = current
            .and_then(|bp| bp.columns.get(column.name.as_str()))
            .is_some_and(|now| {
                now.def.elasticsearch.as_ref() == Some(over) && now.def.ty == column.def.ty
            });
        let problems = if unchanged {
            check_override_schema(column.def.ty, over)
        } else {
            check_override(column.def.ty, over)
        };
        for (path, message) in problems {
            errors.push(FieldError::new(at(&path), message));
        }
        if unchanged {
            continue;
        }
        let own = column.rename_to.as_ref().unwrap_or(&column.name).as_str();
        let mut targets = Vec::new();
        each_mapping(over, "", &mut |mapping, at| {
            targets.extend(copy_targets(mapping, at))
        });
        for (path, target) in targets {
            if target == own || !names.contains(&target.as_str()) {
                errors.push(FieldError::new(
                    at(&path),
                    format!(
                        "copies to {:?}, which is not another column of this blueprint: the \
                         strict mapping would refuse every document",
                        crate::blueprint::value::excerpt_str(&target)
                    ),
                ));
            }
        }
        // Lucene refuses a term over 32766 bytes, and the whole document with it.
        if matches!(column.def.ty.base(), BaseType::String | BaseType::Text) {
            let mut unbounded = Vec::new();
            each_mapping(&column_mapping(&column.def), "", &mut |mapping, at| {
                if unbounded_keyword(mapping) {
                    unbounded.push(at.to_owned());
                }
            });
            for path in unbounded {
                errors.push(FieldError::new(
                    at(&path),
                    format!(
                        "a keyword mapping of a text column needs ignore_above of at most \
                         {KEYWORD_IGNORE_ABOVE}: a longer value would be a term Lucene refuses, \
                         and Elasticsearch the whole document"
                    ),
                ));
            }
        }
    }
    errors
}

/// Who an index belongs to, kept in the mapping's `_meta` so dstore never touches an index of another
/// project whose name happens to match.
pub fn meta(project: &Ident, version: u32, name: &Ident, blueprint: &Blueprint) -> Value {
    json!({"dstore": {"project": project, "version": version, "blueprint": name, "type": blueprint.es_type}})
}

/// The mapping of one blueprint in one version: strict, with `id`, `project_version` and `links`.
pub fn type_mapping(project: &Ident, version: u32, name: &Ident, blueprint: &Blueprint) -> Value {
    let mut properties = Map::new();
    properties.insert("id".into(), json!({"type": "keyword"}));
    properties.insert("project_version".into(), json!({"type": "integer"}));
    properties.insert("links".into(), json!({"type": "keyword"}));
    for (column, definition) in &blueprint.columns {
        properties.insert(
            column.to_string(),
            Value::Object(column_mapping(&definition.def)),
        );
    }
    json!({"dynamic": "strict", "_meta": meta(project, version, name, blueprint), "properties": properties})
}

/// The body of the create-index request. Its `_meta` holds a digest of the mapping
/// ([`fingerprint`]).
pub fn index_body(project: &Ident, version: u32, name: &Ident, blueprint: &Blueprint) -> Value {
    let mut mappings = type_mapping(project, version, name, blueprint);
    mappings["_meta"]["dstore"]["mapping"] = json!(fingerprint(&mappings));
    json!({
        "settings": {"index": {"gc_deletes": GC_DELETES}},
        "mappings": mappings,
    })
}

/// A digest of a mapping as dstore sends it. Elasticsearch answers a mapping normalised
/// (parameters at their defaults left out, `"type": "object"` beside `properties` too, `dynamic`
/// as a string, `copy_to` as a list) but `_meta` as it was given: an index whose `_meta` holds the
/// digest of the wanted mapping was made from it, however its mapping reads back.
fn fingerprint(mapping: &Value) -> String {
    use sha2::{Digest, Sha256};
    crate::auth::hex(&Sha256::digest(mapping.to_string().as_bytes())[..16])
}

/// Whether `found` holds everything `wanted` says (a store may add defaults, never drop or change),
/// read as Elasticsearch answers a mapping: some booleans and numbers as strings, a single value
/// as a list of one, an object's `"type": "object"` left out.
pub fn includes(found: &Value, wanted: &Value) -> bool {
    match (found, wanted) {
        (Value::Object(found), Value::Object(wanted)) => {
            wanted.iter().all(|(k, w)| match found.get(k) {
                Some(f) => includes(f, w),
                None => k == "type" && w == "object" && found.contains_key("properties"),
            })
        }
        (Value::Number(f), Value::Number(w)) => f.as_f64() == w.as_f64(),
        (Value::String(f), Value::Bool(w)) => *f == w.to_string(),
        (Value::String(f), Value::Number(w)) => f.parse::<f64>().ok() == w.as_f64(),
        (Value::Array(f), w) if !w.is_array() => matches!(f.as_slice(), [one] if includes(one, w)),
        (found, wanted) => found == wanted,
    }
}

/// Where an existing index's mapping differs from the one dstore wants, for the error message;
/// `None` for an index made from it (its `_meta` holds the wanted [`fingerprint`]).
pub fn first_difference(found: &Value, wanted: &Value) -> Option<String> {
    let digest = &wanted["_meta"]["dstore"]["mapping"];
    if digest.is_string() && found["_meta"]["dstore"]["mapping"] == *digest {
        return None;
    }
    let wanted_properties = wanted["properties"].as_object()?;
    for (field, mapping) in wanted_properties {
        if found["properties"][field].is_null() {
            return Some(format!("field {field:?} is not mapped"));
        }
        if !includes(&found["properties"][field], mapping) {
            return Some(format!(
                "field {field:?} is mapped as {} instead of {mapping}",
                found["properties"][field]
            ));
        }
    }
    // An index made by an older dstore has no digest, or another one.
    let mut owner = wanted["_meta"].clone();
    if let Some(dstore) = owner.get_mut("dstore").and_then(Value::as_object_mut) {
        dstore.remove("mapping");
    }
    if !includes(&found["_meta"], &owner) {
        return Some(format!(
            "it belongs to {} instead of {owner}",
            found["_meta"]
        ));
    }
    if !includes(&found["dynamic"], &wanted["dynamic"]) {
        return Some(format!(
            "its dynamic mapping is {} instead of {}",
            found["dynamic"], wanted["dynamic"]
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overrides a real Elasticsearch 8 refuses at the index's creation, or that would have it
    /// refuse documents, are refused when the blueprint is put, at their path.
    #[test]
    fn overrides_that_would_fail_the_index_or_every_document_are_refused() {
        let parse = |body: Value| crate::blueprint::parse_blueprint(&body, "").unwrap();
        let paths = |columns: Value| -> Vec<String> {
            let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
                "columns": columns});
            check_overrides(&parse(body), "", None)
                .into_iter()
                .map(|e| e.path)
                .collect()
        };
        let all = json!({"type": "text"});
        assert_eq!(
            paths(json!({"all": all, "tag": {"type": "string",
                "elasticsearch": {"copy_to": ["all", "missing"]}}})),
            ["/columns/tag/elasticsearch/copy_to/1"]
        );
        assert_eq!(
            paths(json!({"tag": {"type": "string", "elasticsearch": {"copy_to": "tag"}}})),
            ["/columns/tag/elasticsearch/copy_to"]
        );
        assert_eq!(
            paths(json!({"tag": {"type": "string", "elasticsearch": {"type": "keyword"}}})),
            ["/columns/tag/elasticsearch"]
        );
        assert_eq!(
            paths(json!({"tag": {"type": "string", "elasticsearch": {"ignore_above": 10000}}})),
            ["/columns/tag/elasticsearch"]
        );
        assert_eq!(
            paths(json!({"body": {"type": "text", "elasticsearch":
                {"fields": {"raw": {"type": "keyword"}}}}})),
            ["/columns/body/elasticsearch/fields/raw"]
        );
        assert_eq!(
            paths(json!({"body": {"type": "text", "elasticsearch":
                {"fields": {"a.b": {"type": "keyword", "ignore_above": 10}}}}})),
            ["/columns/body/elasticsearch/fields/a.b"]
        );
        assert_eq!(
            paths(
                json!({"n": {"type": "integer", "elasticsearch": {"type": "exponential_histogram"}}})
            ),
            ["/columns/n/elasticsearch/type"]
        );
        let mut many = Map::new();
        for i in 0..51 {
            many.insert(
                format!("j{i}"),
                json!({"type": "json", "elasticsearch": {"type": "nested", "dynamic": true}}),
            );
        }
        assert_eq!(paths(Value::Object(many)), ["/columns"]);
        // An override accepted before these checks is accepted again unchanged, not changed.
        let unbounded = json!({"tag": {"type": "string", "elasticsearch": {"type": "keyword"}},
            "code": {"type": "string", "elasticsearch": {"type": "integer"}}});
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": unbounded});
        let now = crate::blueprint::apply_edit(None, parse(body.clone()), &mut 0, "").unwrap();
        assert!(check_overrides(&parse(body), "", Some(&now)).is_empty());
        let mut changed = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": unbounded});
        changed["columns"]["tag"]["elasticsearch"]["store"] = json!(true);
        changed["columns"]["code"]["elasticsearch"]["store"] = json!(true);
        assert_eq!(check_overrides(&parse(changed), "", Some(&now)).len(), 2);
        // What a real cluster takes.
        assert!(paths(
            json!({"all": all, "tag": {"type": "string", "elasticsearch":
            {"type": "keyword", "ignore_above": 256, "copy_to": "all"}},
            "body": {"type": "text", "elasticsearch":
                {"fields": {"raw": {"type": "keyword", "ignore_above": 8191}}}}})
        )
        .is_empty());
    }

    /// Elasticsearch answers a mapping normalised: `dynamic` as a string, an object's type left
    /// out, `copy_to` as a list, parameters at their defaults dropped. An index made from the
    /// wanted mapping (its digest in `_meta`) matches however it reads back; one an older dstore
    /// made is compared field by field, normalisations allowed.
    #[test]
    fn a_mapping_read_back_normalised_by_elasticsearch_still_matches() {
        let parse = |body: Value| {
            let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
            crate::blueprint::apply_edit(None, input, &mut 0, "").unwrap()
        };
        let blueprint = parse(
            json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": {"tag": {"type": "string", "elasticsearch":
                {"type": "keyword", "index": true, "copy_to": "all"}},
              "all": {"type": "text"}}}),
        );
        let (p, name) = (Ident::parse("p").unwrap(), Ident::parse("t").unwrap());
        let wanted = index_body(&p, 1, &name, &blueprint)["mappings"].clone();
        let mut found = wanted.clone();
        found["dynamic"] = json!("strict");
        found["properties"]["tag"] = json!({"type": "keyword", "copy_to": ["all"]});
        found["_meta"]["dstore"]["deployment"] = json!("d1");
        assert_eq!(first_difference(&found, &wanted), None);
        // An older dstore's index: no digest; field by field, the dropped default differs.
        found["_meta"]["dstore"]
            .as_object_mut()
            .unwrap()
            .remove("mapping");
        let difference = first_difference(&found, &wanted).expect("a difference");
        assert!(difference.contains("tag"), "{difference}");
        found["properties"]["tag"]["index"] = json!(true);
        assert_eq!(first_difference(&found, &wanted), None);
        assert!(includes(
            &json!({"dynamic": "false"}),
            &json!({"dynamic": false})
        ));
        assert!(includes(
            &json!({"o": {"properties": {}}}),
            &json!({"o": {"type": "object", "properties": {}}})
        ));
        assert!(!includes(
            &json!({"copy_to": ["a", "b"]}),
            &json!({"copy_to": "a"})
        ));
        // Another project's index differs, digest or not.
        let other =
            index_body(&Ident::parse("q").unwrap(), 1, &name, &blueprint)["mappings"].clone();
        assert!(first_difference(&other, &wanted).is_some());
    }

    /// Overrides that Elasticsearch would refuse at migration are refused when the blueprint is
    /// put: an unknown analyzer, more fields than an index takes, objects nested too deep.
    #[test]
    fn unknown_analyzers_and_mappings_past_the_index_limits_are_refused() {
        let parse = |body: Value| crate::blueprint::parse_blueprint(&body, "").unwrap();
        let text = |over: Value| {
            json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": {"body": {"type": "text", "elasticsearch": over}}})
        };
        let errors = check_overrides(&parse(text(json!({"analyzer": "nope"}))), "", None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "/columns/body/elasticsearch/analyzer");
        assert!(check_overrides(&parse(text(json!({"analyzer": "english"}))), "", None).is_empty());

        let mut columns = Map::new();
        for i in 0..600 {
            columns.insert(
                format!("c{i}"),
                json!({"type": "string", "elasticsearch":
                    {"fields": {"k": {"type": "keyword", "ignore_above": 100}}}}),
            );
        }
        let many = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"}, "columns": columns});
        let errors = check_overrides(&parse(many), "", None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "/columns");
        assert!(
            errors[0].message.contains("1203 fields"),
            "{}",
            errors[0].message
        );

        let mut deep = json!({"type": "keyword"});
        for _ in 0..21 {
            deep = json!({"type": "object", "properties": {"a": deep}});
        }
        let deep = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": {"doc": {"type": "json", "elasticsearch": deep}}});
        let errors = check_overrides(&parse(deep), "", None);
        assert!(
            errors.iter().any(|e| e.message.contains("nested 22 deep")),
            "{errors:?}"
        );
    }

    #[test]
    fn every_column_type_gets_a_mapping_that_passes_the_allow_list() {
        for ty in ColumnType::all() {
            let mapping = generated(ty);
            assert_eq!(
                schema::check_property(&mapping, None),
                Vec::new(),
                "{ty}: {mapping:?}"
            );
        }
    }

    #[test]
    fn an_override_without_a_type_adjusts_the_generated_mapping() {
        let mut def = ColumnDef::of_type(ColumnType::One(BaseType::String));
        def.elasticsearch = json!({"ignore_above": 10}).as_object().cloned();
        assert_eq!(
            Value::Object(column_mapping(&def)),
            json!({"type": "keyword", "ignore_above": 10})
        );
        def.elasticsearch = json!({"type": "text"}).as_object().cloned();
        assert_eq!(Value::Object(column_mapping(&def)), json!({"type": "text"}));
    }

    #[test]
    fn an_override_naming_a_parameter_of_another_type_is_refused() {
        let over = json!({"format": "yyyy"});
        let problems = check_override(
            ColumnType::One(BaseType::Integer),
            over.as_object().expect("object"),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "/format");
    }

    /// An override whose field would refuse some of the column's values is refused: Elasticsearch
    /// would refuse those items for ever while every other store took them.
    #[test]
    fn an_override_that_cannot_take_the_columns_values_is_refused() {
        let check = |base: BaseType, over: Value| {
            check_override(ColumnType::One(base), over.as_object().expect("object"))
        };
        for (base, over, path) in [
            (BaseType::String, json!({"type": "integer"}), "/type"),
            (BaseType::String, json!({"type": "boolean"}), "/type"),
            (BaseType::Integer, json!({"type": "byte"}), "/type"),
            (BaseType::Point, json!({"type": "keyword"}), "/type"),
            (BaseType::Json, json!({"enabled": true}), "/enabled"),
            (
                BaseType::Json,
                json!({"type": "object", "dynamic": "strict"}),
                "/enabled",
            ),
            (BaseType::Json, json!({"type": "flattened"}), "/type"),
            (BaseType::Date, json!({"format": "epoch_millis"}), "/format"),
            (BaseType::DateTime, json!({"type": "date"}), "/type"),
            (BaseType::Json, json!({"type": "nested"}), "/properties"),
            (
                BaseType::Json,
                json!({"type": "object", "properties": {}}),
                "/enabled",
            ),
            (
                BaseType::String,
                json!({"fields": {"n": {"type": "integer"}}}),
                "/fields/n/type",
            ),
            (
                BaseType::Integer,
                json!({"script": {"source": "emit(1)"}}),
                "/script",
            ),
        ] {
            let problems = check(base, over.clone());
            assert_eq!(problems.len(), 1, "{base:?} {over}: {problems:?}");
            assert_eq!(problems[0].0, path, "{base:?} {over}");
        }
        for (base, over) in [
            (BaseType::String, json!({"type": "text"})),
            (BaseType::Integer, json!({"type": "long"})),
            (
                BaseType::Date,
                json!({"format": "yyyy-MM-dd||epoch_millis"}),
            ),
            (BaseType::Date, json!({"type": "date"})),
            (BaseType::Point, json!({"type": "geo_shape"})),
            (BaseType::Json, json!({"enabled": false})),
            (BaseType::Json, json!({"type": "object", "dynamic": true})),
            (BaseType::Json, json!({"type": "nested", "dynamic": true})),
            (
                BaseType::String,
                json!({"fields": {"raw": {"type": "keyword", "ignore_above": 256}}}),
            ),
        ] {
            assert_eq!(check(base, over.clone()), Vec::new(), "{base:?} {over}");
        }
    }

    /// Parameters Elasticsearch checks only when it makes the index are refused at once: the
    /// index's creation would fail for good after the freeze, holding the project.
    #[test]
    fn an_override_that_would_fail_the_index_is_refused() {
        for (base, over, path) in [
            (
                BaseType::String,
                json!({"normalizer": "no_such"}),
                "/normalizer",
            ),
            (
                BaseType::Text,
                json!({"similarity": "classic"}),
                "/similarity",
            ),
            (BaseType::Integer, json!({"type": "scaled_float"}), "/type"),
            (
                BaseType::Text,
                json!({"type": "search_as_you_type", "max_shingle_size": 10}),
                "/max_shingle_size",
            ),
        ] {
            let problems = check_override(ColumnType::One(base), over.as_object().unwrap());
            assert_eq!(problems.len(), 1, "{over}: {problems:?}");
            assert_eq!(problems[0].0, path, "{over}");
        }
        for (base, over) in [
            (BaseType::String, json!({"normalizer": "lowercase"})),
            (BaseType::Text, json!({"similarity": "boolean"})),
            (
                BaseType::Integer,
                json!({"type": "scaled_float", "scaling_factor": 100}),
            ),
        ] {
            let problems = check_override(ColumnType::One(base), over.as_object().unwrap());
            assert_eq!(problems, Vec::new(), "{over}");
        }
    }

    #[test]
    fn a_mapping_with_added_defaults_still_counts_as_the_same() {
        let wanted = json!({"dynamic": "strict", "properties": {"a": {"type": "keyword", "ignore_above": 8191}}});
        let found = json!({"dynamic": "strict", "properties": {"a": {"type": "keyword", "ignore_above": 8191.0, "index": true}}});
        assert!(includes(&found, &wanted));
        assert_eq!(first_difference(&found, &wanted), None);
        let other = json!({"dynamic": "strict", "properties": {"a": {"type": "text"}}});
        assert!(first_difference(&other, &wanted).is_some_and(|d| d.contains("\"a\"")));
    }
}
