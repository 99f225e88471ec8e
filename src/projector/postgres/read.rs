//! Reading one stored item back as JSON, for checks and tests.
//!
//! A version's schema records, per blueprint, its table and column types (`_blueprints`), so a read
//! needs no catalog and still works for a version the catalog has forgotten. Geometries come back
//! through `ST_AsGeoJSON` with 15 decimals, enough for every coordinate dstore accepts. A missing schema, table or row is `None`, never an error.

use serde::{Deserialize, Serialize};

use super::ddl::is_geometry;
use super::ident::{qualified, quote, NameError};
use crate::blueprint::{Blueprint, ColumnType};

/// What a schema records about one blueprint (the `definition` column of `_blueprints`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Shape {
    pub table: String,
    pub columns: Vec<(String, ColumnType)>,
}

impl Shape {
    pub fn of(blueprint: &Blueprint) -> Shape {
        Shape {
            table: blueprint.table.to_string(),
            columns: blueprint
                .columns
                .iter()
                .map(|(name, c)| (name.to_string(), c.def.ty))
                .collect(),
        }
    }
}

/// `SELECT to_jsonb(r) FROM (SELECT … FROM schema.table WHERE id = $1) r`.
pub fn select_sql(schema: &str, shape: &Shape) -> Result<String, NameError> {
    let mut columns = vec!["id".to_owned(), "project_version".into(), "links".into()];
    for (name, ty) in &shape.columns {
        let q = quote(name)?;
        columns.push(if is_geometry(*ty) {
            format!("ST_AsGeoJSON({q}, 15)::jsonb AS {q}")
        } else {
            q
        });
    }
    Ok(format!(
        "SELECT to_jsonb(r) FROM (SELECT {} FROM {} WHERE id = $1) r",
        columns.join(", "),
        qualified(schema, &shape.table)?
    ))
}
