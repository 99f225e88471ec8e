//! dstore's pure model: everything a client sends, checked and shaped without any I/O.
//!
//! `blueprint` holds identifiers, the column type table, blueprint parsing, item checks, the change
//! differ and transforms between versions; `json` parses request bodies under one nesting limit;
//! `document` reads an item body (a flat object without serde's map); `bulk` reads `_bulk` bodies
//! one operation at a time. Nothing here knows of stores, queues or HTTP, so every function is a plain function of its arguments, tested (and fuzzed, see `fuzz/`) without a
//! server. The `dstore` crate re-exports these modules under the same names.

pub mod blueprint;
pub mod bulk;
pub mod document;
pub mod json;
