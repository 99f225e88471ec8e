//! The pure model of blueprints: identifiers, the column type table, parsing and validation of
//! blueprints and items, the change log differ, and transforms of items between versions.
//!
//! This module does no I/O and knows nothing of stores, queues or HTTP; everything in it is a plain
//! function of its arguments, tested without a server.

pub mod check;
pub mod compat;
pub mod diff;
pub mod geometry;
pub mod ident;
pub mod model;
pub mod parse;
pub mod transform;
pub mod types;
pub mod unique;
pub mod value;

use serde::Serialize;

pub use diff::{apply_edit, diff, Change};
pub use ident::Ident;
pub use model::{Blueprint, Blueprints, Column, ColumnDef, Convert, Pattern, Uid};
pub use parse::{parse_blueprint, BlueprintInput, MAX_PATTERNS_MEMORY};
pub use types::{BaseType, ColumnType};

/// One problem with a client's input: where (a JSON pointer) and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Most problems an answer lists; the rest are counted in one last entry, so an error body stays
/// small whatever the input.
pub const MAX_ERRORS: usize = 100;

/// Keeps the first [`MAX_ERRORS`] problems and says how many more there were.
pub fn cap_errors(mut errors: Vec<FieldError>) -> Vec<FieldError> {
    if errors.len() > MAX_ERRORS {
        let more = errors.len() - MAX_ERRORS;
        errors.truncate(MAX_ERRORS);
        errors.push(FieldError::new(
            "",
            format!("{more} more problem(s) not listed"),
        ));
    }
    errors
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod proptests;
