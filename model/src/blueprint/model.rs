//! The typed blueprint: what a PUT body becomes once parsed, and what versions freeze.
//!
//! Blueprints and columns carry a `uid`: a project-wide number given when they are created and kept
//! through renames and edits. It never appears in the public form; it is how two versions of a
//! blueprint are matched column by column (see `diff` and `transform`).

use std::collections::BTreeMap;

use indexmap::IndexMap;
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::ident::Ident;
use super::types::ColumnType;

/// Stable identity of a blueprint or a column inside one project.
pub type Uid = u64;

/// All blueprints of a project at one moment (a working copy or a frozen version).
pub type Blueprints = BTreeMap<Ident, Blueprint>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Blueprint {
    pub uid: Uid,
    /// `postgresql.table`
    pub table: Ident,
    /// `elasticsearch.type`
    pub es_type: Ident,
    pub columns: IndexMap<Ident, Column>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub uid: Uid,
    #[serde(flatten)]
    pub def: ColumnDef,
}

/// Everything a client says about a column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnDef {
    #[serde(rename = "type")]
    pub ty: ColumnType,
    pub nullable: bool,
    pub default: Option<Value>,
    pub validation: Validation,
    pub index: bool,
    pub unique: bool,
    pub comment: Option<String>,
    /// Elasticsearch mapping parameters that replace the generated ones.
    pub elasticsearch: Option<Map<String, Value>>,
    /// How values of another type become this column's when an item moves between versions
    /// (see `transform`); without it a value that does not convert without loss becomes null.
    #[serde(default)]
    pub convert: Option<Convert>,
}

/// A declared conversion (the `convert` column option): a closed set, each defined for some pairs
/// of types (`docs/evolution.md` has the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Convert {
    /// float → integer: to the nearest whole number (halves away from zero); datetime → date: to
    /// the nearest midnight.
    Round,
    /// float → integer: toward zero; datetime → date: the date part; text → a string column with
    /// `max_length`: cut to that length.
    Truncate,
    /// text → number, boolean, date, datetime: read leniently (`" 12 kg"` → 12, `yes` → true,
    /// `2020/01/02` → 2020-01-02).
    Parse,
    /// date, datetime → text: RFC 3339 (`2020-01-02T03:04:05Z`) instead of `2020-01-02 03:04:05`.
    Format,
    /// Whatever does not convert takes the column's default instead of null.
    Default,
}

impl Convert {
    pub const ALL: [Convert; 5] = [
        Convert::Round,
        Convert::Truncate,
        Convert::Parse,
        Convert::Format,
        Convert::Default,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Convert::Round => "round",
            Convert::Truncate => "truncate",
            Convert::Parse => "parse",
            Convert::Format => "format",
            Convert::Default => "default",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub pattern: Option<Pattern>,
    #[serde(rename = "enum")]
    pub one_of: Option<Vec<Value>>,
}

/// A compiled `pattern`, compared and stored by its source text.
#[derive(Clone, Debug)]
pub struct Pattern(pub Regex);

impl Pattern {
    /// Compiles `source`, bounding the compiled size so a hostile pattern cannot exhaust memory.
    pub fn compile(source: &str) -> Result<Pattern, String> {
        regex::RegexBuilder::new(source)
            .size_limit(1 << 20)
            .build()
            .map(Pattern)
            .map_err(|e| format!("is not a valid regular expression: {e}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Pattern::compile(&source).map_err(serde::de::Error::custom)
    }
}

impl Validation {
    pub fn is_empty(&self) -> bool {
        self == &Validation::default()
    }

    fn to_public(&self) -> Value {
        let mut out = Map::new();
        if self.required {
            out.insert("required".into(), Value::Bool(true));
        }
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                out.insert(key.into(), value);
            }
        };
        put("min", self.min.map(number));
        put("max", self.max.map(number));
        put("min_length", self.min_length.map(Value::from));
        put("max_length", self.max_length.map(Value::from));
        put(
            "pattern",
            self.pattern.as_ref().map(|p| Value::from(p.as_str())),
        );
        put("enum", self.one_of.clone().map(Value::Array));
        Value::Object(out)
    }
}

/// Writes whole floats as integers so `min: 1` reads back as `1`, not `1.0`.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        json!(f)
    }
}

impl ColumnDef {
    pub fn of_type(ty: ColumnType) -> ColumnDef {
        ColumnDef {
            ty,
            nullable: true,
            default: None,
            validation: Validation::default(),
            index: false,
            unique: false,
            comment: None,
            elasticsearch: None,
            convert: None,
        }
    }

    /// The public form: options left at their defaults are omitted, so a GET body PUT back is a no-op.
    pub fn to_public(&self) -> Value {
        let mut out = Map::new();
        out.insert("type".into(), Value::String(self.ty.to_string()));
        if !self.nullable {
            out.insert("nullable".into(), Value::Bool(false));
        }
        if let Some(default) = &self.default {
            out.insert("default".into(), default.clone());
        }
        if !self.validation.is_empty() {
            out.insert("validation".into(), self.validation.to_public());
        }
        if self.index {
            out.insert("index".into(), Value::Bool(true));
        }
        if self.unique {
            out.insert("unique".into(), Value::Bool(true));
        }
        if let Some(comment) = &self.comment {
            out.insert("comment".into(), Value::String(comment.clone()));
        }
        if let Some(es) = &self.elasticsearch {
            out.insert("elasticsearch".into(), Value::Object(es.clone()));
        }
        if let Some(convert) = self.convert {
            out.insert("convert".into(), Value::from(convert.name()));
        }
        Value::Object(out)
    }

    /// Each option as `(name, public value)`, the unit of a `column.update` change.
    pub fn options(&self) -> Vec<(&'static str, Value)> {
        let public = self.to_public();
        let get = |key: &str| public.get(key).cloned().unwrap_or(Value::Null);
        vec![
            ("type", get("type")),
            ("nullable", Value::Bool(self.nullable)),
            ("default", get("default")),
            (
                "validation",
                public.get("validation").cloned().unwrap_or(json!({})),
            ),
            ("index", Value::Bool(self.index)),
            ("unique", Value::Bool(self.unique)),
            ("comment", get("comment")),
            ("elasticsearch", get("elasticsearch")),
            ("convert", get("convert")),
        ]
    }

    /// The value an item gets when it does not say: the default, else null.
    pub fn fallback(&self) -> Value {
        self.default.clone().unwrap_or(Value::Null)
    }
}

impl Blueprint {
    /// Whether the blueprint has a column `name`: compared in order when there are few, as
    /// [`crate::json::field`] does, hashed otherwise.
    pub fn has_column(&self, name: &str) -> bool {
        if self.columns.len() <= crate::json::SCAN {
            self.columns.keys().any(|c| c.as_str() == name)
        } else {
            self.columns.contains_key(name)
        }
    }

    pub fn to_public(&self) -> Value {
        let columns: Map<String, Value> = self
            .columns
            .iter()
            .map(|(name, column)| (name.to_string(), column.def.to_public()))
            .collect();
        json!({
            "postgresql": {"table": self.table},
            "elasticsearch": {"type": self.es_type},
            "columns": columns,
        })
    }

    pub fn column_by_uid(&self, uid: Uid) -> Option<(&Ident, &Column)> {
        self.columns.iter().find(|(_, c)| c.uid == uid)
    }
}

/// The public form of all blueprints of a project.
pub fn blueprints_to_public(blueprints: &Blueprints) -> Value {
    Value::Object(
        blueprints
            .iter()
            .map(|(name, bp)| (name.to_string(), bp.to_public()))
            .collect(),
    )
}
