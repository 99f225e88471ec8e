//! Which mapping parameters Elasticsearch accepts, per field type, and the check of a column's
//! `elasticsearch` override against them.
//!
//! The table below is vendored from the official mapping schemas (`_types.mapping.Property` and the
//! schemas its discriminator selects) of elastic/elasticsearch-specification, Apache-2.0; a copy of
//! that file is kept in `tests/data/elasticsearch-mapping.schema.json` and a unit test checks that the
//! table says exactly what the schemas say, minus the parameters Elasticsearch 8 refuses although a
//! schema still lists them ([`REFUSED`]). Keys a schema does not list are refused. This module is pure:
//! it runs when a blueprint is PUT, whether or not Elasticsearch is configured.

use serde_json::{Map, Value};

use crate::blueprint::parse::pointer_segment;

/// What a mapping parameter's value must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Number,
    Str,
    /// One of these strings (`"true"`/`"false"` in the list also admit JSON booleans).
    OneOf(&'static [&'static str]),
    Object,
    Array,
    /// A map of sub-field name to field mapping (`properties`, `fields`), checked recursively.
    Properties,
    Any,
}

pub type Param = (&'static str, Kind);

/// A field type (`"type": "keyword"`) and the parameters its schema lists, `type` aside.
pub struct FieldType {
    pub name: &'static str,
    pub bases: &'static [&'static [Param]],
    pub own: &'static [Param],
}

impl FieldType {
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.bases
            .iter()
            .flat_map(|b| b.iter())
            .chain(self.own.iter())
    }

    pub fn param(&self, key: &str) -> Option<Kind> {
        self.params()
            .find(|(name, _)| *name == key)
            .map(|(_, kind)| *kind)
    }
}

/// Legacy `geo_shape` prefix-tree parameters, and index-time `boost`: Elasticsearch 8 refuses them
/// in a new index although the schemas still list `strategy` and `boost`.
pub const REFUSED: &[&str] = &[
    "boost",
    "tree",
    "precision",
    "tree_levels",
    "strategy",
    "distance_error_pct",
    "points_only",
];

/// Types the schema lists that Elasticsearch 8 does not have (they came in 9).
pub const REFUSED_TYPES: &[&str] = &["exponential_histogram"];

pub fn field_type(name: &str) -> Option<&'static FieldType> {
    FIELD_TYPES.iter().find(|t| t.name == name)
}

/// Checks one field mapping. `implicit_type` is the type used when the mapping has no `type` key
/// (`object` inside `properties`). Returns `(JSON pointer below the mapping, message)` per problem.
pub fn check_property(
    mapping: &Map<String, Value>,
    implicit_type: Option<&str>,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    check_into(mapping, implicit_type, "", &mut problems);
    problems
}

fn check_into(
    mapping: &Map<String, Value>,
    implicit_type: Option<&str>,
    at: &str,
    problems: &mut Vec<(String, String)>,
) {
    let type_name = match mapping.get("type") {
        Some(Value::String(name)) => name.as_str(),
        Some(_) => {
            return problems.push((
                format!("{at}/type"),
                "must be a string naming a field type".into(),
            ))
        }
        None => match implicit_type {
            Some(name) => name,
            None => return problems.push((format!("{at}/type"), "is required".into())),
        },
    };
    let Some(field_type) = field_type(type_name) else {
        let known: Vec<&str> = FIELD_TYPES.iter().map(|t| t.name).collect();
        let message = format!(
            "{type_name:?} is not an Elasticsearch 8 field type; expected one of {}",
            known.join(", ")
        );
        return problems.push((format!("{at}/type"), message));
    };
    if type_name == "scaled_float" && !mapping.contains_key("scaling_factor") {
        problems.push((
            format!("{at}/type"),
            "a scaled_float field needs a scaling_factor: Elasticsearch refuses the index \
             without one"
                .into(),
        ));
    }
    for (key, value) in mapping {
        let path = format!("{at}/{}", pointer_segment(key));
        if key == "type" {
            continue;
        }
        if REFUSED.contains(&key.as_str()) {
            problems.push((
                path,
                format!("{key:?} is a legacy parameter that Elasticsearch 8 refuses"),
            ));
            continue;
        }
        let Some(kind) = field_type.param(key) else {
            problems.push((
                path,
                format!("{key:?} is not a mapping parameter of a {type_name} field"),
            ));
            continue;
        };
        check_value(kind, value, &path, problems);
        if key == "meta" {
            check_meta(type_name, value, &path, problems);
            continue;
        }
        // Names an index has only with settings of its own (dstore defines none), and bounds
        // Elasticsearch checks only when it makes the index: each would fail the index's creation
        // for good, after the freeze.
        let refused = match key.as_str() {
            "normalizer" if value.as_str() != Some("lowercase") => {
                Some("is not a normalizer every index has: the one built in is \"lowercase\"")
            }
            "similarity" if !matches!(value.as_str(), Some("BM25" | "boolean")) => {
                Some("is not a similarity every index has: the built-in ones are \"BM25\" and \"boolean\"")
            }
            "max_shingle_size" if !value.as_u64().is_some_and(|n| (2..=4).contains(&n)) => {
                Some("must be 2, 3 or 4")
            }
            _ => None,
        };
        if let Some(reason) = refused {
            problems.push((
                path,
                format!("{} {reason}", crate::blueprint::value::excerpt(value)),
            ));
            continue;
        }
        if key.ends_with("analyzer") {
            if let Some(name) = value.as_str().filter(|name| !ANALYZERS.contains(name)) {
                problems.push((
                    path,
                    format!(
                        "{:?} is not an analyzer every Elasticsearch index has (dstore defines no custom ones); expected one of {}",
                        crate::blueprint::value::excerpt_str(name),
                        ANALYZERS.join(", ")
                    ),
                ));
            }
        }
    }
}

/// The analyzers an index has without settings of its own: Elasticsearch 8's built-in and
/// language analyzers, and those of its analysis plugins Elastic ships (ICU, Kuromoji, Nori,
/// SmartCN, Stempel, Ukrainian), which an index has only where the plugin is installed. An
/// unknown name would make the index's creation fail for good, after the freeze.
pub const ANALYZERS: &[&str] = &[
    "default",
    "standard",
    "simple",
    "whitespace",
    "stop",
    "keyword",
    "pattern",
    "fingerprint",
    "arabic",
    "armenian",
    "basque",
    "bengali",
    "brazilian",
    "bulgarian",
    "catalan",
    "cjk",
    "czech",
    "danish",
    "dutch",
    "english",
    "estonian",
    "finnish",
    "french",
    "galician",
    "german",
    "greek",
    "hindi",
    "hungarian",
    "indonesian",
    "irish",
    "italian",
    "latvian",
    "lithuanian",
    "norwegian",
    "persian",
    "portuguese",
    "romanian",
    "russian",
    "serbian",
    "sorani",
    "spanish",
    "swedish",
    "thai",
    "turkish",
    "icu_analyzer",
    "kuromoji",
    "nori",
    "smartcn",
    "polish",
    "ukrainian",
];

/// Elasticsearch's rules for a field's `meta`, which it checks only when it makes the index: at
/// most 5 entries, keys of at most 20 characters, string values of at most 50 (counted as Java
/// counts, in UTF-16 units), and none on an `object` or `nested` field.
fn check_meta(type_name: &str, value: &Value, path: &str, problems: &mut Vec<(String, String)>) {
    let Value::Object(entries) = value else {
        return; // `check_value` named it
    };
    if matches!(type_name, "object" | "nested") {
        return problems.push((
            path.to_owned(),
            format!("Elasticsearch takes no meta on an {type_name} field"),
        ));
    }
    if entries.len() > 5 {
        problems.push((
            path.to_owned(),
            format!(
                "has {} entries; Elasticsearch takes at most 5",
                entries.len()
            ),
        ));
    }
    let units = |s: &str| s.encode_utf16().count();
    for (key, entry) in entries {
        let at = format!("{path}/{}", pointer_segment(key));
        if units(key) > 20 {
            problems.push((
                at,
                "Elasticsearch takes meta keys of at most 20 characters".into(),
            ));
        } else if entry.as_str().is_none_or(|s| units(s) > 50) {
            problems.push((
                at,
                "Elasticsearch takes meta values that are strings of at most 50 characters".into(),
            ));
        }
    }
}

fn check_value(kind: Kind, value: &Value, path: &str, problems: &mut Vec<(String, String)>) {
    let fits = match (kind, value) {
        (Kind::Any, _) => true,
        (Kind::Bool, Value::Bool(_))
        | (Kind::Number, Value::Number(_))
        | (Kind::Str, Value::String(_)) => true,
        (Kind::Object, Value::Object(_)) | (Kind::Array, Value::Array(_)) => true,
        (Kind::OneOf(options), Value::String(s)) => options.contains(&s.as_str()),
        (Kind::OneOf(options), Value::Bool(b)) => {
            options.contains(&if *b { "true" } else { "false" })
        }
        (Kind::Properties, Value::Object(fields)) => {
            for (name, field) in fields {
                let at = format!("{path}/{}", pointer_segment(name));
                // An empty name is no field; a multi-field's may not hold a dot (a property's
                // dotted name is a path of objects, which Elasticsearch makes).
                if name.is_empty() || (name.contains('.') && path.ends_with("/fields")) {
                    problems.push((
                        at,
                        "a sub-field's name must not be empty, nor a multi-field's hold a dot"
                            .into(),
                    ));
                    continue;
                }
                match field {
                    // A sub-field without a type is an object inside `properties`; `fields` need one.
                    Value::Object(field) => {
                        let implicit = path.ends_with("/properties").then_some("object");
                        check_into(field, implicit, &at, problems);
                    }
                    _ => problems.push((at, "must be an object of mapping parameters".into())),
                }
            }
            true
        }
        _ => false,
    };
    if !fits {
        problems.push((path.to_string(), format!("must be {}", describe(kind))));
    }
}

fn describe(kind: Kind) -> String {
    match kind {
        Kind::Bool => "a boolean".into(),
        Kind::Number => "a number".into(),
        Kind::Str => "a string".into(),
        Kind::OneOf(options) => format!("one of {}", options.join(", ")),
        Kind::Object | Kind::Properties => "an object".into(),
        Kind::Array => "an array".into(),
        Kind::Any => "a JSON value".into(),
    }
}

use Kind::{Any, Array, Bool, Number, Object, OneOf, Properties, Str};

// Generated from the schemas by `the_allow_list_says_what_the_official_schemas_say` (it prints the
// table when they differ). One line per schema keeps the table readable.
#[rustfmt::skip]
mod table {
    use super::*;
    pub(super) const CORE_PROPERTY_BASE: &[Param] = &[("copy_to", Any), ("store", Bool)];
    pub(super) const DOC_VALUES_PROPERTY_BASE: &[Param] = &[("doc_values", Any)];
    pub(super) const NUMBER_PROPERTY_BASE: &[Param] = &[("coerce", Bool), ("ignore_malformed", Bool), ("index", Bool), ("on_script_error", OneOf(&["fail", "continue"])), ("script", Object), ("time_series_dimension", Bool), ("time_series_metric", OneOf(&["gauge", "counter", "summary", "histogram", "position"]))];
    pub(super) const PROPERTY_BASE: &[Param] = &[("dynamic", OneOf(&["strict", "runtime", "true", "false"])), ("fields", Properties), ("ignore_above", Number), ("meta", Object), ("properties", Properties), ("synthetic_source_keep", OneOf(&["none", "arrays", "all"]))];
    pub(super) const RANGE_PROPERTY_BASE: &[Param] = &[("coerce", Bool), ("index", Bool)];
    pub(super) const FIELD_TYPES: &[FieldType] = &[
        FieldType { name: "aggregate_metric_double", bases: &[PROPERTY_BASE], own: &[("default_metric", Str), ("ignore_malformed", Bool), ("metrics", Array), ("time_series_metric", OneOf(&["gauge", "counter", "summary", "histogram", "position"]))] },
        FieldType { name: "alias", bases: &[PROPERTY_BASE], own: &[("path", Str)] },
        FieldType { name: "binary", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[] },
        FieldType { name: "boolean", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("fielddata", Object), ("ignore_malformed", Bool), ("index", Bool), ("null_value", Bool), ("on_script_error", OneOf(&["fail", "continue"])), ("script", Object), ("time_series_dimension", Bool)] },
        FieldType { name: "byte", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "completion", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("analyzer", Str), ("contexts", Array), ("max_input_length", Number), ("preserve_position_increments", Bool), ("preserve_separators", Bool), ("search_analyzer", Str)] },
        FieldType { name: "constant_keyword", bases: &[PROPERTY_BASE], own: &[("value", Object)] },
        FieldType { name: "counted_keyword", bases: &[PROPERTY_BASE], own: &[("index", Bool)] },
        FieldType { name: "date", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("fielddata", Object), ("format", Str), ("ignore_malformed", Bool), ("index", Bool), ("locale", Str), ("null_value", Any), ("on_script_error", OneOf(&["fail", "continue"])), ("precision_step", Number), ("script", Object)] },
        FieldType { name: "date_nanos", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("format", Str), ("ignore_malformed", Bool), ("index", Bool), ("null_value", Any), ("on_script_error", OneOf(&["fail", "continue"])), ("precision_step", Number), ("script", Object)] },
        FieldType { name: "date_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[("format", Str)] },
        FieldType { name: "dense_vector", bases: &[PROPERTY_BASE], own: &[("dims", Number), ("element_type", OneOf(&["bit", "byte", "float"])), ("index", Bool), ("index_options", Object), ("similarity", OneOf(&["cosine", "dot_product", "l2_norm", "max_inner_product"]))] },
        FieldType { name: "double", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "double_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[] },
        FieldType { name: "flattened", bases: &[PROPERTY_BASE], own: &[("depth_limit", Number), ("doc_values", Bool), ("eager_global_ordinals", Bool), ("index", Bool), ("index_options", OneOf(&["docs", "freqs", "positions", "offsets"])), ("null_value", Str), ("preserve_leaf_arrays", OneOf(&["lossy", "exact"])), ("similarity", Str), ("split_queries_on_whitespace", Bool), ("time_series_dimensions", Array)] },
        FieldType { name: "float", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "float_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[] },
        FieldType { name: "geo_point", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("ignore_malformed", Bool), ("ignore_z_value", Bool), ("index", Bool), ("null_value", Any), ("on_script_error", OneOf(&["fail", "continue"])), ("script", Object), ("time_series_metric", OneOf(&["gauge", "counter", "position"]))] },
        FieldType { name: "geo_shape", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("coerce", Bool), ("ignore_malformed", Bool), ("ignore_z_value", Bool), ("index", Bool), ("orientation", OneOf(&["right", "RIGHT", "counterclockwise", "ccw", "left", "LEFT", "clockwise", "cw"]))] },
        FieldType { name: "half_float", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "histogram", bases: &[PROPERTY_BASE], own: &[("ignore_malformed", Bool), ("time_series_metric", OneOf(&["gauge", "counter", "summary", "histogram", "position"]))] },
        FieldType { name: "icu_collation_keyword", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("alternate", OneOf(&["shifted", "non-ignorable"])), ("case_first", OneOf(&["lower", "upper"])), ("case_level", Bool), ("country", Str), ("decomposition", OneOf(&["no", "identical"])), ("hiragana_quaternary_mode", Bool), ("index", Bool), ("index_options", OneOf(&["docs", "freqs", "positions", "offsets"])), ("language", Str), ("norms", Bool), ("null_value", Str), ("numeric", Bool), ("rules", Str), ("strength", OneOf(&["primary", "secondary", "tertiary", "quaternary", "identical"])), ("variable_top", Str), ("variant", Str)] },
        FieldType { name: "integer", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "integer_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[] },
        FieldType { name: "ip", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("ignore_malformed", Bool), ("index", Bool), ("null_value", Str), ("on_script_error", OneOf(&["fail", "continue"])), ("script", Object), ("time_series_dimension", Bool)] },
        FieldType { name: "ip_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[] },
        FieldType { name: "join", bases: &[PROPERTY_BASE], own: &[("eager_global_ordinals", Bool), ("relations", Object)] },
        FieldType { name: "keyword", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("eager_global_ordinals", Bool), ("index", Bool), ("index_options", OneOf(&["docs", "freqs", "positions", "offsets"])), ("normalizer", Str), ("norms", Bool), ("null_value", Str), ("on_script_error", OneOf(&["fail", "continue"])), ("script", Object), ("similarity", Any), ("split_queries_on_whitespace", Bool), ("time_series_dimension", Bool)] },
        FieldType { name: "long", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "long_range", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, RANGE_PROPERTY_BASE], own: &[] },
        FieldType { name: "match_only_text", bases: &[], own: &[("copy_to", Any), ("fields", Properties), ("meta", Object)] },
        FieldType { name: "murmur3", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[] },
        FieldType { name: "nested", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE], own: &[("enabled", Bool), ("include_in_parent", Bool), ("include_in_root", Bool)] },
        FieldType { name: "object", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE], own: &[("enabled", Bool), ("subobjects", OneOf(&["true", "false"]))] },
        FieldType { name: "passthrough", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE], own: &[("enabled", Bool), ("priority", Number), ("time_series_dimension", Bool)] },
        FieldType { name: "percolator", bases: &[PROPERTY_BASE], own: &[] },
        FieldType { name: "point", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("ignore_malformed", Bool), ("ignore_z_value", Bool), ("null_value", Str)] },
        FieldType { name: "rank_feature", bases: &[PROPERTY_BASE], own: &[("positive_score_impact", Bool)] },
        FieldType { name: "rank_features", bases: &[PROPERTY_BASE], own: &[("positive_score_impact", Bool)] },
        FieldType { name: "rank_vectors", bases: &[PROPERTY_BASE], own: &[("dims", Number), ("element_type", OneOf(&["byte", "float", "bit"]))] },
        FieldType { name: "scaled_float", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number), ("scaling_factor", Number)] },
        FieldType { name: "search_as_you_type", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE], own: &[("analyzer", Str), ("index", Bool), ("index_options", OneOf(&["docs", "freqs", "positions", "offsets"])), ("max_shingle_size", Number), ("norms", Bool), ("search_analyzer", Str), ("search_quote_analyzer", Str), ("similarity", Any), ("term_vector", OneOf(&["no", "yes", "with_offsets", "with_positions", "with_positions_offsets", "with_positions_offsets_payloads", "with_positions_payloads"]))] },
        FieldType { name: "semantic_text", bases: &[], own: &[("chunking_settings", Any), ("fields", Properties), ("index_options", Object), ("inference_id", Str), ("meta", Object), ("search_inference_id", Str)] },
        FieldType { name: "shape", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("coerce", Bool), ("ignore_malformed", Bool), ("ignore_z_value", Bool), ("orientation", OneOf(&["right", "RIGHT", "counterclockwise", "ccw", "left", "LEFT", "clockwise", "cw"]))] },
        FieldType { name: "short", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "sparse_vector", bases: &[PROPERTY_BASE], own: &[("index_options", Object), ("store", Bool)] },
        FieldType { name: "text", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE], own: &[("analyzer", Str), ("eager_global_ordinals", Bool), ("fielddata", Bool), ("fielddata_frequency_filter", Object), ("index", Bool), ("index_options", OneOf(&["docs", "freqs", "positions", "offsets"])), ("index_phrases", Bool), ("index_prefixes", Any), ("norms", Bool), ("position_increment_gap", Number), ("search_analyzer", Str), ("search_quote_analyzer", Str), ("similarity", Any), ("term_vector", OneOf(&["no", "yes", "with_offsets", "with_positions", "with_positions_offsets", "with_positions_offsets_payloads", "with_positions_payloads"]))] },
        FieldType { name: "token_count", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("analyzer", Str), ("enable_position_increments", Bool), ("index", Bool), ("null_value", Number)] },
        FieldType { name: "unsigned_long", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE, NUMBER_PROPERTY_BASE], own: &[("null_value", Number)] },
        FieldType { name: "version", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[] },
        FieldType { name: "wildcard", bases: &[PROPERTY_BASE, CORE_PROPERTY_BASE, DOC_VALUES_PROPERTY_BASE], own: &[("null_value", Str)] },
    ];
}
use table::FIELD_TYPES;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    use super::*;

    fn schemas() -> Value {
        let text = include_str!("../../../tests/data/elasticsearch-mapping.schema.json");
        let mut all: Value = serde_json::from_str(text).expect("the vendored schema is JSON");
        all["openapi_components_schemas"].take()
    }

    fn name_of(reference: &Value) -> &str {
        reference
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .expect("a $ref")
    }

    /// The kind of a parameter as the schema describes it, by the rules the table follows.
    fn kind_of(schemas: &Value, p: &Value) -> String {
        if let Some([single]) = p.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
            if let Some(r) = single.get("$ref") {
                return kind_of(schemas, &schemas[name_of(r)]);
            }
        }
        if let Some(r) = p.get("$ref") {
            return kind_of(schemas, &schemas[name_of(r)]);
        }
        if let Some(options) = p.get("enum") {
            return format!("OneOf({options})");
        }
        let to_property = p["additionalProperties"]["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("_types.mapping.Property"));
        match p.get("type").and_then(Value::as_str) {
            Some("object") if to_property => "Properties".into(),
            Some("boolean") => "Bool".into(),
            Some("number") => "Number".into(),
            Some("string") => "Str".into(),
            Some("array") => "Array".into(),
            Some("object") => "Object".into(),
            _ => "Any".into(),
        }
    }

    /// Every parameter of a schema, following `allOf` into its bases.
    fn params_of(schemas: &Value, name: &str, out: &mut BTreeMap<String, String>) {
        let schema = &schemas[name];
        for part in schema["allOf"].as_array().into_iter().flatten() {
            match part.get("$ref") {
                Some(r) => params_of(schemas, name_of(r), out),
                None => collect(schemas, &part["properties"], out),
            }
        }
        collect(schemas, &schema["properties"], out);
    }

    fn collect(schemas: &Value, properties: &Value, out: &mut BTreeMap<String, String>) {
        for (key, p) in properties.as_object().into_iter().flatten() {
            out.insert(key.clone(), kind_of(schemas, p));
        }
    }

    fn describe_kind(kind: Kind) -> String {
        match kind {
            Kind::OneOf(options) => format!(
                "OneOf({})",
                serde_json::to_string(options).expect("strings")
            ),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn the_allow_list_says_what_the_official_schemas_say() {
        let schemas = schemas();
        let discriminator = schemas["_types.mapping.Property"]["discriminator"]["mapping"]
            .as_object()
            .expect("a discriminator");
        let mut differences = Vec::new();
        for (name, reference) in discriminator {
            if name == "{dynamic_type}" {
                continue; // only meaningful inside dynamic templates
            }
            if REFUSED_TYPES.contains(&name.as_str()) {
                assert!(field_type(name).is_none(), "{name} is not an 8.x type");
                continue;
            }
            let mut expected = BTreeMap::new();
            params_of(&schemas, name_of(reference), &mut expected);
            expected.remove("type");
            expected.retain(|key, _| !REFUSED.contains(&key.as_str()));
            let actual: BTreeMap<String, String> = field_type(name)
                .map(|t| {
                    t.params()
                        .map(|(k, kind)| (k.to_string(), describe_kind(*kind)))
                        .collect()
                })
                .unwrap_or_default();
            if actual != expected {
                differences.push(format!(
                    "{name}: the schema says {expected:?}\n  the table says {actual:?}"
                ));
            }
        }
        for t in FIELD_TYPES {
            if !discriminator.contains_key(t.name) {
                differences.push(format!("{}: not a type of the schema", t.name));
            }
        }
        assert!(differences.is_empty(), "{}", differences.join("\n"));
    }

    /// The paths of what `check_property` finds in `mapping` (of a keyword column), sorted.
    fn problems(mapping: Value) -> Vec<String> {
        let mut found: Vec<String> =
            check_property(mapping.as_object().expect("object"), Some("keyword"))
                .into_iter()
                .map(|(p, _)| p)
                .collect();
        found.sort();
        found
    }

    #[test]
    fn legacy_and_unknown_parameters_are_named_by_their_path() {
        assert_eq!(
            problems(json!({"type": "geo_shape", "tree": "quadtree", "precision": "1m"})),
            ["/precision", "/tree"]
        );
        assert_eq!(
            problems(json!({"index": "not_analyzed", "include_in_all": true})),
            ["/include_in_all", "/index"]
        );
        assert_eq!(problems(json!({"type": "string"})), ["/type"]);
        assert_eq!(
            problems(
                json!({"fields": {"raw": {"ignore_above": 3}, "bad": {"type": "text", "zzz": 1}}})
            ),
            ["/fields/bad/zzz", "/fields/raw/type"]
        );
        assert_eq!(
            problems(json!({"type": "object", "properties": {"a": {"enabled": "no"}}})),
            ["/properties/a/enabled"]
        );
        assert_eq!(problems(json!({"boost": 2})), ["/boost"]);
        assert_eq!(problems(json!({"type": "text", "boost": 1.5})), ["/boost"]);
    }

    /// Elasticsearch checks a field's `meta` only when it makes the index, which would fail for
    /// good after the freeze.
    #[test]
    fn meta_is_held_to_elasticsearch_s_limits() {
        let fine = json!({"meta": {"unit": "ms", "metric_type": "gauge", "k": "é".repeat(50)}});
        assert!(problems(fine).is_empty());
        assert_eq!(problems(json!({"meta": {"unit": 5}})), ["/meta/unit"]);
        assert_eq!(
            problems(json!({"meta": {"k": "x".repeat(51), "a".repeat(21): "v", "ok": "v"}})),
            ["/meta/aaaaaaaaaaaaaaaaaaaaa", "/meta/k"]
        );
        assert_eq!(
            problems(json!({"meta": {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}})),
            ["/meta"]
        );
        // An astral character is two units to Java.
        assert_eq!(
            problems(json!({"meta": {"k": "😀".repeat(26)}})),
            ["/meta/k"]
        );
        assert_eq!(
            problems(json!({"type": "object", "meta": {"unit": "ms"}})),
            ["/meta"]
        );
    }

    #[test]
    fn valid_overrides_pass() {
        for mapping in [
            json!({"ignore_above": 256, "fields": {"text": {"type": "text", "analyzer": "standard"}}}),
            json!({"type": "geo_shape", "orientation": "ccw", "ignore_malformed": true}),
            json!({"type": "object", "dynamic": false, "properties": {"a": {"type": "keyword"}, "b": {}}}),
            json!({"type": "date", "format": "yyyy", "null_value": "1970"}),
        ] {
            assert_eq!(
                check_property(mapping.as_object().expect("object"), Some("keyword")),
                Vec::<(String, String)>::new(),
                "{mapping}"
            );
        }
    }
}
