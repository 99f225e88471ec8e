//! Parsing a blueprint body into typed values, reporting every problem at once.
//!
//! The parser walks the JSON by hand instead of deriving `Deserialize` so that it can keep going after
//! the first error and name each problem by its JSON pointer (`/columns/title/type`).

use indexmap::IndexMap;
use serde_json::{Map, Value};

use super::check::{check_column_value, check_index_entry};
use super::ident::Ident;
use super::model::{ColumnDef, Convert, Pattern, Validation};
use super::types::{BaseType, ColumnType};
use super::value::{check_text, excerpt_str};
use super::FieldError;

/// Most columns a blueprint may have: PostgreSQL tables stop at 1600 columns and Elasticsearch
/// indexes at 1000 mapped fields by default, and dstore adds a few of its own.
pub const MAX_COLUMNS: usize = 900;

/// Longest column comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 1024;

/// Longest new `pattern`, in bytes: a regular expression a person writes fits, and what the check
/// of every item costs stays small (checked by `apply_edit`, which lets a stored one stay).
pub const MAX_PATTERN_BYTES: usize = 1024;

/// The most memory the distinct patterns of a project's blueprints may compile to, and the new
/// patterns of one blueprint put (checked as it is parsed, and by the catalog's edit for the whole
/// project, which lets a project that holds more already keep them). A short pattern of Unicode
/// classes (`\w{16}`) compiles to about a mebibyte: without it, a small body could make the node
/// hold gigabytes.
pub const MAX_PATTERNS_MEMORY: usize = 16 << 20;

/// What makes a pattern cost much, as a refusal past [`MAX_PATTERNS_MEMORY`] says it.
pub const PATTERN_COST: &str = "\\w and \\d match all of Unicode and compile large; (?-u:\\w) and \
                                [0-9] match ASCII and cost little";

/// Most values a new `enum` lists: every item's value is looked for among them (checked by
/// `apply_edit`, which lets a stored one stay).
pub const MAX_ENUM_VALUES: usize = 1000;

/// Longest new column `default`, in bytes of JSON: an item that leaves the column out stores the
/// default in full, so a large one would make every short write large (checked by `apply_edit`,
/// which lets a stored one stay).
pub const MAX_DEFAULT_BYTES: usize = 4096;

/// A blueprint as a client sent it: columns in body order, with their rename instructions.
#[derive(Clone, Debug, PartialEq)]
pub struct BlueprintInput {
    pub table: Ident,
    pub es_type: Ident,
    pub columns: Vec<ColumnInput>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ColumnInput {
    /// The key in the body: the current name of the column.
    pub name: Ident,
    /// `column_id`: the name the column is renamed to.
    pub rename_to: Option<Ident>,
    pub def: ColumnDef,
}

impl ColumnInput {
    /// The name the column has once the edit is applied.
    pub fn target(&self) -> &Ident {
        self.rename_to.as_ref().unwrap_or(&self.name)
    }
}

/// Escapes a key for use in a JSON pointer (RFC 6901).
pub fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSON pointer (from `at`) of the first key or string in `value` holding a NUL character.
fn find_nul(value: &Value, at: String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(at),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item, format!("{at}/{i}"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let at = format!("{at}/{}", pointer_segment(key));
            match key.contains('\0') {
                true => Some(at),
                false => find_nul(item, at),
            }
        }),
        _ => None,
    }
}

struct Errors<'a> {
    base: &'a str,
    list: Vec<FieldError>,
    /// The memory of the patterns compiled for this blueprint that the process did not hold.
    fresh_patterns: usize,
}

impl Errors<'_> {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.list
            .push(FieldError::new(format!("{}{path}", self.base), message));
    }

    fn unknown_keys(&mut self, path: &str, object: &Map<String, Value>, known: &[&str]) {
        for key in object.keys().filter(|k| !known.contains(&k.as_str())) {
            self.push(
                &format!("{path}/{}", pointer_segment(&excerpt_str(key))),
                format!("unknown key; expected one of {}", known.join(", ")),
            );
        }
    }
}

/// Parses the public form of one blueprint; `base` prefixes every error path.
pub fn parse_blueprint(body: &Value, base: &str) -> Result<BlueprintInput, Vec<FieldError>> {
    parse_blueprint_within(body, base, &mut 0)
}

/// [`parse_blueprint`] for one blueprint of a request of several: `fresh_patterns` is the memory
/// of the new patterns compiled for the request so far, which this one adds to, so the request's
/// patterns together are held to [`MAX_PATTERNS_MEMORY`] as they are compiled.
pub fn parse_blueprint_within(
    body: &Value,
    base: &str,
    fresh_patterns: &mut usize,
) -> Result<BlueprintInput, Vec<FieldError>> {
    let mut errors = Errors {
        base,
        list: Vec::new(),
        fresh_patterns: *fresh_patterns,
    };
    let parsed = parse_with(body, &mut errors);
    *fresh_patterns = errors.fresh_patterns;
    parsed
}

fn parse_with(body: &Value, errors: &mut Errors) -> Result<BlueprintInput, Vec<FieldError>> {
    // The catalog is stored as JSON in PostgreSQL in cluster mode, and PostgreSQL's text cannot
    // hold NUL: anywhere in a blueprint (a pattern, an Elasticsearch option, a key), it is refused.
    if let Some(at) = find_nul(body, String::new()) {
        errors.push(
            &at,
            "contains the NUL character (\\u0000), which PostgreSQL cannot store",
        );
        return Err(std::mem::take(&mut errors.list));
    }
    let Value::Object(top) = body else {
        errors.push("", "a blueprint must be a JSON object");
        return Err(std::mem::take(&mut errors.list));
    };
    errors.unknown_keys("", top, &["postgresql", "elasticsearch", "columns"]);
    let table = named_section(errors, top, "postgresql", "table");
    let es_type = named_section(errors, top, "elasticsearch", "type");
    let columns = match top.get("columns") {
        None => Vec::new(),
        Some(Value::Object(columns)) if columns.len() > MAX_COLUMNS => {
            errors.push(
                "/columns",
                format!(
                    "has {} columns; a blueprint holds at most {MAX_COLUMNS}",
                    columns.len()
                ),
            );
            Vec::new()
        }
        Some(Value::Object(columns)) => columns
            .iter()
            .filter_map(|(name, column)| parse_column(errors, name, column))
            .collect(),
        Some(_) => {
            errors.push("/columns", "must be an object of column definitions");
            Vec::new()
        }
    };
    check_column_names(errors, &columns);
    match (table, es_type) {
        (Some(table), Some(es_type)) if errors.list.is_empty() => Ok(BlueprintInput {
            table,
            es_type,
            columns,
        }),
        _ => Err(std::mem::take(&mut errors.list)),
    }
}

/// Reads `{"postgresql": {"table": "…"}}`-shaped sections.
fn named_section(
    errors: &mut Errors,
    top: &Map<String, Value>,
    section: &str,
    key: &str,
) -> Option<Ident> {
    let path = format!("/{section}");
    let Some(value) = top.get(section) else {
        errors.push(&path, format!("is required: {{\"{key}\": \"<name>\"}}"));
        return None;
    };
    let Value::Object(object) = value else {
        errors.push(
            &path,
            format!("must be an object like {{\"{key}\": \"<name>\"}}"),
        );
        return None;
    };
    errors.unknown_keys(&path, object, &[key]);
    ident_at(errors, &format!("{path}/{key}"), object.get(key))
}

fn ident_at(errors: &mut Errors, path: &str, value: Option<&Value>) -> Option<Ident> {
    match value {
        None => errors.push(path, "is required"),
        Some(Value::String(name)) => match Ident::parse(name) {
            Ok(ident) => return Some(ident),
            Err(reason) => errors.push(path, format!("{:?} {reason}", excerpt_str(name))),
        },
        Some(_) => errors.push(path, "must be a string"),
    }
    None
}

const COLUMN_KEYS: &[&str] = &[
    "type",
    "column_id",
    "nullable",
    "default",
    "validation",
    "index",
    "unique",
    "comment",
    "elasticsearch",
    "convert",
];

fn parse_column(errors: &mut Errors, name: &str, column: &Value) -> Option<ColumnInput> {
    let path = format!("/columns/{}", pointer_segment(&excerpt_str(name)));
    let before = errors.list.len();
    let ident = Ident::parse(name)
        .map_err(|reason| {
            errors.push(
                &path,
                format!("column name {:?} {reason}", excerpt_str(name)),
            )
        })
        .ok();
    let Value::Object(object) = column else {
        errors.push(&path, "a column must be an object with at least a \"type\"");
        return None;
    };
    errors.unknown_keys(&path, object, COLUMN_KEYS);
    let ty = match object.get("type") {
        None => {
            errors.push(&format!("{path}/type"), "is required");
            None
        }
        Some(Value::String(raw)) => raw
            .parse::<ColumnType>()
            .map_err(|reason| errors.push(&format!("{path}/type"), reason))
            .ok(),
        Some(_) => {
            errors.push(
                &format!("{path}/type"),
                "must be a string such as \"string\" or \"point[]\"",
            );
            None
        }
    };
    let rename_to = object
        .get("column_id")
        .and_then(|v| ident_at(errors, &format!("{path}/column_id"), Some(v)));
    let flag = |errors: &mut Errors, key: &str, default: bool| match object.get(key) {
        None => default,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(&format!("{path}/{key}"), "must be true or false");
            default
        }
    };
    let nullable = flag(errors, "nullable", true);
    let index = flag(errors, "index", false);
    let unique = flag(errors, "unique", false);
    let comment = match object.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let checked = check_text(s).and_then(|()| {
                if s.chars().count() > MAX_COMMENT_CHARS {
                    Err(format!("is longer than {MAX_COMMENT_CHARS} characters"))
                } else {
                    Ok(())
                }
            });
            match checked {
                Ok(()) => Some(s.clone()),
                Err(reason) => {
                    errors.push(&format!("{path}/comment"), reason);
                    None
                }
            }
        }
        Some(_) => {
            errors.push(&format!("{path}/comment"), "must be a string");
            None
        }
    };
    let elasticsearch = match object.get("elasticsearch") {
        None => None,
        Some(Value::Object(mapping)) => Some(mapping.clone()),
        Some(_) => {
            errors.push(
                &format!("{path}/elasticsearch"),
                "must be an object of mapping parameters",
            );
            None
        }
    };
    let convert = match object.get("convert") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            let found = Convert::ALL.into_iter().find(|c| c.name() == name);
            if found.is_none() {
                errors.push(
                    &format!("{path}/convert"),
                    format!(
                        "unknown conversion {:?}; expected one of {}",
                        excerpt_str(name),
                        Convert::ALL.map(Convert::name).join(", ")
                    ),
                );
            }
            found
        }
        Some(_) => {
            errors.push(
                &format!("{path}/convert"),
                "must be the name of a conversion",
            );
            None
        }
    };
    let ty = ty?;
    let validation = match object.get("validation") {
        None => Validation::default(),
        Some(v) => parse_validation(errors, &format!("{path}/validation"), ty, v),
    };
    let mut def = ColumnDef {
        ty,
        nullable,
        default: None,
        validation,
        index,
        unique,
        comment,
        elasticsearch,
        convert,
    };
    if let Some(default) = object.get("default") {
        def.default = parse_default(errors, &format!("{path}/default"), &def, default);
    }
    if errors.list.len() > before {
        return None;
    }
    Some(ColumnInput {
        name: ident?,
        rename_to,
        def,
    })
}

fn parse_default(
    errors: &mut Errors,
    path: &str,
    def: &ColumnDef,
    default: &Value,
) -> Option<Value> {
    if def.validation.required {
        errors.push(
            path,
            "contradicts validation.required: a required column never uses its default",
        );
        return None;
    }
    if default.is_null() {
        if !def.nullable {
            errors.push(path, "null contradicts nullable: false");
        }
        return None;
    }
    // Held to what a client's own value is held to, the index's bound too: every item that
    // leaves the column out takes the default, and PostgreSQL would refuse each of them for good.
    check_column_value(def, default)
        .and_then(|value| check_index_entry(def, &value).map(|()| value))
        .map_err(|reason| errors.push(path, reason))
        .ok()
}

const VALIDATION_KEYS: &[&str] = &[
    "required",
    "min",
    "max",
    "min_length",
    "max_length",
    "pattern",
    "enum",
];

fn parse_validation(errors: &mut Errors, path: &str, ty: ColumnType, value: &Value) -> Validation {
    let mut out = Validation::default();
    let Value::Object(object) = value else {
        errors.push(path, "must be an object");
        return out;
    };
    errors.unknown_keys(path, object, VALIDATION_KEYS);
    let base = ty.base();
    let applies = |errors: &mut Errors, key: &str, ok: bool, to: &str| {
        if !ok && object.contains_key(key) {
            errors.push(
                &format!("{path}/{key}"),
                format!("applies only to {to} columns, not {ty}"),
            );
        }
        ok
    };
    let numeric = applies(errors, "min", base.is_numeric(), "integer and float")
        & applies(errors, "max", base.is_numeric(), "integer and float");
    let textual = applies(errors, "min_length", base.is_textual(), "string and text")
        & applies(errors, "max_length", base.is_textual(), "string and text")
        & applies(errors, "pattern", base.is_textual(), "string and text");
    let enumerable = !matches!(
        base,
        BaseType::Json
            | BaseType::Boolean
            | BaseType::Point
            | BaseType::LineString
            | BaseType::Polygon
    );
    applies(
        errors,
        "enum",
        enumerable,
        "uuid, string, text, date, datetime, integer and float",
    );

    for (key, value) in object {
        let at = format!("{path}/{key}");
        match key.as_str() {
            "required" => match value {
                Value::Bool(b) => out.required = *b,
                _ => errors.push(&at, "must be true or false"),
            },
            "min" | "max" if numeric => match value.as_f64().filter(|f| f.is_finite()) {
                Some(f) if key == "min" => out.min = Some(f),
                Some(f) => out.max = Some(f),
                None => errors.push(&at, "must be a number"),
            },
            "min_length" | "max_length" if textual => match value.as_u64() {
                Some(n) if key == "min_length" => out.min_length = Some(n),
                Some(n) => out.max_length = Some(n),
                None => errors.push(&at, "must be a whole number of characters, zero or more"),
            },
            "pattern" if textual => match value {
                // Past the budget, no more new patterns are compiled: the request is refused, and
                // what it would hold must not be built first.
                Value::String(_) if errors.fresh_patterns > MAX_PATTERNS_MEMORY => {}
                Value::String(source) => match Pattern::compile_counted(source) {
                    Ok((pattern, fresh)) => {
                        if fresh {
                            errors.fresh_patterns += pattern.memory();
                        }
                        if errors.fresh_patterns > MAX_PATTERNS_MEMORY {
                            errors.push(
                                &at,
                                format!(
                                "compiles to {} bytes, which takes the new patterns of this request \
                                 past the {MAX_PATTERNS_MEMORY} bytes a project's patterns may \
                                 compile to ({PATTERN_COST})",
                                pattern.memory()
                            ),
                            );
                        }
                        out.pattern = Some(pattern);
                    }
                    Err(reason) => errors.push(&at, format!("{:?} {reason}", excerpt_str(source))),
                },
                _ => errors.push(&at, "must be a regular expression in a string"),
            },
            "enum" if enumerable => out.one_of = parse_enum(errors, &at, base, value),
            _ => {}
        }
    }
    if let (Some(min), Some(max)) = (out.min, out.max) {
        if min > max {
            errors.push(
                &format!("{path}/min"),
                format!("min {min} is greater than max {max}"),
            );
        }
    }
    if let (Some(min), Some(max)) = (out.min_length, out.max_length) {
        if min > max {
            errors.push(
                &format!("{path}/min_length"),
                format!("min_length {min} is greater than max_length {max}"),
            );
        }
    }
    if base == BaseType::String && out.max_length == Some(0) {
        errors.push(&format!("{path}/max_length"), "must be at least 1");
    }
    out
}

fn parse_enum(
    errors: &mut Errors,
    path: &str,
    base: BaseType,
    value: &Value,
) -> Option<Vec<Value>> {
    let Value::Array(items) = value else {
        errors.push(path, "must be an array of allowed values");
        return None;
    };
    if items.is_empty() {
        errors.push(path, "must list at least one allowed value");
        return None;
    }
    let mut allowed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match super::value::canonicalize_scalar(base, item) {
            Ok(v) => allowed.push(v),
            Err(reason) => errors.push(&format!("{path}/{i}"), reason),
        }
    }
    Some(allowed)
}

/// Two columns may not end up with the same name.
fn check_column_names(errors: &mut Errors, columns: &[ColumnInput]) {
    let mut seen: IndexMap<&Ident, &Ident> = IndexMap::new();
    for column in columns {
        if let Some(first) = seen.insert(column.target(), &column.name) {
            errors.push(
                &format!("/columns/{}", column.name),
                format!(
                    "would be named {:?}, which column {:?} is already named",
                    column.target().as_str(),
                    first.as_str()
                ),
            );
        }
        if ["id", "project_version", "links"].contains(&column.target().as_str()) {
            errors.push(
                &format!("/columns/{}", column.name),
                format!(
                    "{:?} is reserved: every item carries it",
                    column.target().as_str()
                ),
            );
        }
    }
}
