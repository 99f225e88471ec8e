//! The column type table of docs/design.md §2 as one enum.
//!
//! Every store maps [`BaseType`] with a `match` that has no catch-all arm, so adding a type does not
//! compile until every store handles it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The twelve scalar kinds a column can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BaseType {
    Uuid,
    String,
    Text,
    Point,
    LineString,
    Polygon,
    Date,
    DateTime,
    Float,
    Integer,
    Boolean,
    Json,
}

impl BaseType {
    pub const ALL: [BaseType; 12] = [
        BaseType::Uuid,
        BaseType::String,
        BaseType::Text,
        BaseType::Point,
        BaseType::LineString,
        BaseType::Polygon,
        BaseType::Date,
        BaseType::DateTime,
        BaseType::Float,
        BaseType::Integer,
        BaseType::Boolean,
        BaseType::Json,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BaseType::Uuid => "uuid",
            BaseType::String => "string",
            BaseType::Text => "text",
            BaseType::Point => "point",
            BaseType::LineString => "linestring",
            BaseType::Polygon => "polygon",
            BaseType::Date => "date",
            BaseType::DateTime => "datetime",
            BaseType::Float => "float",
            BaseType::Integer => "integer",
            BaseType::Boolean => "boolean",
            BaseType::Json => "json",
        }
    }

    pub fn is_geometry(self) -> bool {
        matches!(
            self,
            BaseType::Point | BaseType::LineString | BaseType::Polygon
        )
    }

    pub fn is_textual(self) -> bool {
        matches!(self, BaseType::String | BaseType::Text)
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, BaseType::Float | BaseType::Integer)
    }
}

/// A column type: one of the 24 types of the type table, a scalar or an array of a scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    One(BaseType),
    Many(BaseType),
}

impl ColumnType {
    pub fn base(self) -> BaseType {
        match self {
            ColumnType::One(base) | ColumnType::Many(base) => base,
        }
    }

    pub fn is_array(self) -> bool {
        matches!(self, ColumnType::Many(_))
    }

    /// All 24 types, scalars first.
    pub fn all() -> impl Iterator<Item = ColumnType> {
        BaseType::ALL
            .into_iter()
            .map(ColumnType::One)
            .chain(BaseType::ALL.into_iter().map(ColumnType::Many))
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::One(base) => f.write_str(base.name()),
            ColumnType::Many(base) => write!(f, "{}[]", base.name()),
        }
    }
}

impl FromStr for ColumnType {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (name, array) = match raw.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (raw, false),
        };
        let base = BaseType::ALL
            .into_iter()
            .find(|base| base.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown type {:?}; expected one of {}",
                    super::value::excerpt_str(raw),
                    ColumnType::all()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        Ok(if array {
            ColumnType::Many(base)
        } else {
            ColumnType::One(base)
        })
    }
}

impl Serialize for ColumnType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_24_types_round_trip_through_their_names() {
        let all: Vec<ColumnType> = ColumnType::all().collect();
        assert_eq!(all.len(), 24);
        for ty in all {
            assert_eq!(ty.to_string().parse::<ColumnType>(), Ok(ty));
        }
    }

    #[test]
    fn unknown_types_are_refused_with_the_list_of_known_ones() {
        let err = "varchar".parse::<ColumnType>().unwrap_err();
        assert!(
            err.contains("varchar") && err.contains("linestring[]"),
            "{err}"
        );
        assert!("string[][]".parse::<ColumnType>().is_err());
    }
}
