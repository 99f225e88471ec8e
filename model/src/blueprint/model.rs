//! The typed blueprint: what a PUT body becomes once parsed, and what versions freeze.
//!
//! Blueprints and columns carry a `uid`: a project-wide number given when they are created and kept
//! through renames and edits. It never appears in the public form; it is how two versions of a
//! blueprint are matched column by column (see `diff` and `transform`).

use std::collections::BTreeMap;

use indexmap::IndexMap;
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

/// The most a pattern's automata may take ([`regex_automata::meta::Config::nfa_size_limit`], as
/// `regex::RegexBuilder::size_limit` sets it): a stored pattern compiled under it stays valid.
const PATTERN_NFA_LIMIT: usize = 1 << 20;

/// The most each thread's lazy DFA cache of one pattern may grow to: past it the cache is cleared
/// or the match falls back to a slower engine, with memory bounded either way.
const PATTERN_CACHE_CAPACITY: usize = 1 << 20;

/// A `pattern`, compared and stored by its source text, and compiled once per node for each source
/// text, when first needed: the working copy, every version and every project that hold the same
/// pattern share one compiled regex, and a version's patterns that nothing checks against (a
/// retired version's, a catalog just read at start or from another node) are not compiled at all.
/// A client's new pattern is compiled as its blueprint is parsed ([`Pattern::compile`]), so it is
/// refused there if invalid and its memory is known ([`Pattern::memory`]).
#[derive(Clone, Debug)]
pub struct Pattern(std::sync::Arc<Shared>);

#[derive(Debug)]
struct Shared {
    source: Box<str>,
    compiled: std::sync::OnceLock<Result<regex_automata::meta::Regex, String>>,
}

/// The patterns this process holds, by source text; entries whose patterns are all gone are swept
/// as the map grows.
fn interned(
) -> &'static std::sync::Mutex<std::collections::HashMap<Box<str>, std::sync::Weak<Shared>>> {
    static INTERNED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Box<str>, std::sync::Weak<Shared>>>,
    > = std::sync::OnceLock::new();
    INTERNED.get_or_init(Default::default)
}

/// `source` compiled as `regex::Regex::new` would, with the limits above.
fn build(source: &str) -> Result<regex_automata::meta::Regex, String> {
    use regex_automata::meta;
    let config = meta::Config::new()
        .nfa_size_limit(Some(PATTERN_NFA_LIMIT))
        .hybrid_cache_capacity(PATTERN_CACHE_CAPACITY)
        .match_kind(regex_automata::MatchKind::LeftmostFirst)
        .utf8_empty(true);
    meta::Builder::new()
        .configure(config)
        .syntax(regex_automata::util::syntax::Config::new().utf8(true))
        .build(source)
        .map_err(|error| {
            // The regex crate's own words for what is wrong (a syntax error pointed at, a size
            // limit named), which the meta engine's error does not give.
            let said = regex::RegexBuilder::new(source)
                .size_limit(PATTERN_NFA_LIMIT)
                .build()
                .err()
                .map_or_else(|| error.to_string(), |e| e.to_string());
            format!("is not a valid regular expression: {said}")
        })
}

impl Pattern {
    /// The pattern of `source`, shared with one this process holds already, else new and not
    /// compiled yet.
    fn shared(source: &str) -> Pattern {
        let mut map = interned().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get(source).and_then(std::sync::Weak::upgrade) {
            return Pattern(held);
        }
        let pattern = std::sync::Arc::new(Shared {
            source: source.into(),
            compiled: std::sync::OnceLock::new(),
        });
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, held| held.strong_count() > 0);
        }
        map.insert(source.into(), std::sync::Arc::downgrade(&pattern));
        Pattern(pattern)
    }

    /// Compiles `source` now (unless this process holds it compiled already), answering why it is
    /// not a valid pattern, and whether compiling it took memory this process did not hold
    /// before. The compiled size is bounded so a hostile pattern cannot exhaust memory.
    pub fn compile_counted(source: &str) -> Result<(Pattern, bool), String> {
        let pattern = Pattern::shared(source);
        let mut fresh = false;
        let compiled = pattern.0.compiled.get_or_init(|| {
            fresh = true;
            build(source)
        });
        match compiled {
            Ok(_) => Ok((pattern, fresh)),
            Err(reason) => Err(reason.clone()),
        }
    }

    /// [`Pattern::compile_counted`], without the count.
    pub fn compile(source: &str) -> Result<Pattern, String> {
        Pattern::compile_counted(source).map(|(pattern, _)| pattern)
    }

    fn compiled(&self) -> Result<&regex_automata::meta::Regex, &str> {
        self.0
            .compiled
            .get_or_init(|| build(&self.0.source))
            .as_ref()
            .map_err(String::as_str)
    }

    /// Whether `text` matches. A stored pattern this build cannot compile (a later library with
    /// lower limits) matches nothing, so what it guards is refused rather than let through.
    pub fn is_match(&self, text: &str) -> bool {
        self.compiled().is_ok_and(|regex| regex.is_match(text))
    }

    /// The heap memory of the compiled pattern (compiling it when it is not yet), shared by every
    /// holder of the same source text; each thread that matches against it adds a cache of at
    /// most [`PATTERN_CACHE_CAPACITY`].
    pub fn memory(&self) -> usize {
        self.compiled().map_or(0, |regex| regex.memory_usage())
    }

    pub fn as_str(&self) -> &str {
        &self.0.source
    }

    /// The same pattern, not compiled and shared with no other holder: what a retired version
    /// keeps, so the memory its compiled form takes is given back once nothing live holds it
    /// (a retired version is matched against no more, as after a restart, where patterns are
    /// compiled when first used).
    pub fn dormant(&self) -> Pattern {
        Pattern(std::sync::Arc::new(Shared {
            source: self.0.source.clone(),
            compiled: std::sync::OnceLock::new(),
        }))
    }

    /// Whether this pattern's compiled form is held.
    pub fn is_compiled(&self) -> bool {
        self.0.compiled.get().is_some()
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
    /// A stored pattern was checked when its blueprint was put: it is compiled when first used,
    /// not as the catalog is read.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(Pattern::shared(&source))
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
    /// The most bytes of JSON text a copy of an item at this blueprint takes beyond the item's
    /// own values: each column's name, and its default (or null) where the item has no value.
    /// A copy made for another version is bounded by the item and this; a version that adds
    /// columns with long defaults makes a copy of a small item many times its size.
    pub fn copy_overhead(&self) -> usize {
        self.columns
            .iter()
            .map(|(name, column)| {
                let default = column
                    .def
                    .default
                    .as_ref()
                    .and_then(|value| serde_json::to_vec(value).ok())
                    .map_or(4, |text| text.len());
                name.as_str().len() + default + 4
            })
            .sum()
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blueprint::parse::{parse_blueprint, MAX_PATTERNS_MEMORY};

    /// Every holder of one source text shares one compiled pattern: a catalog read again (each
    /// version, each node's reload) compiles nothing, and compiles only what is matched against.
    #[test]
    fn one_source_is_compiled_once_and_a_stored_one_only_when_used() {
        let source = r"^shared-[a-z]{3}\d$";
        let (first, fresh) = Pattern::compile_counted(source).unwrap();
        assert!(fresh);
        let (again, fresh) = Pattern::compile_counted(source).unwrap();
        assert!(!fresh, "compiled once");
        assert!(std::sync::Arc::ptr_eq(&first.0, &again.0));
        let read: Pattern = serde_json::from_value(json!(source)).unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&first.0, &read.0),
            "a read pattern shares it"
        );
        assert!(read.is_match("shared-abc1") && !read.is_match("shared-abc"));

        let stored = r"^stored-only-[a-z]+$";
        let read: Pattern = serde_json::from_value(json!(stored)).unwrap();
        assert!(
            read.0.compiled.get().is_none(),
            "not compiled as it is read"
        );
        assert!(read.is_match("stored-only-x"));
        assert!(read.0.compiled.get().is_some());
        // Gone with its last holder: a later compile is fresh again.
        drop(read);
        assert!(Pattern::compile_counted(stored).unwrap().1);
    }

    /// A stored pattern this build cannot compile does not stop the catalog from being read; it
    /// matches nothing.
    #[test]
    fn a_stored_pattern_that_does_not_compile_is_read_and_matches_nothing() {
        let read: Pattern = serde_json::from_value(json!("(unclosed")).unwrap();
        assert!(!read.is_match("(unclosed"));
        assert_eq!(read.memory(), 0);
        let refused = Pattern::compile("(unclosed").unwrap_err();
        assert!(refused.contains("unclosed group"), "{refused}");
    }

    /// Short patterns of Unicode classes compile to about a mebibyte each: a small blueprint of
    /// many of them is refused at the first past the budget, naming it, and no more of them are
    /// compiled.
    #[test]
    fn a_blueprint_whose_new_patterns_compile_too_large_is_refused_at_the_pattern() {
        let columns: Map<String, Value> = (0..900)
            .map(|i| {
                let column = json!({"type": "string",
                    "validation": {"pattern": format!(r"\w{{16}}budget{i}")}});
                (format!("c{i}"), column)
            })
            .collect();
        let body = json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
            "columns": columns});
        assert!(body.to_string().len() < 80_000, "a small body");
        let errors = parse_blueprint(&body, "").unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let at: usize = errors[0].path["/columns/c".len()..]
            .trim_end_matches("/validation/pattern")
            .parse()
            .unwrap();
        let each = Pattern::compile(r"\w{16}budget0").unwrap().memory();
        assert!(each > 100_000, "{each}");
        assert!(
            (MAX_PATTERNS_MEMORY / each).abs_diff(at) <= 1,
            "{each}: {errors:?}"
        );
        assert!(errors[0].message.contains("compiles to"), "{errors:?}");
        let held = interned().lock().unwrap();
        assert!(
            !held.contains_key(format!(r"\w{{16}}budget{}", at + 1).as_str()),
            "nothing past the budget was compiled"
        );
    }
}
