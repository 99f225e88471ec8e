//! Names and literals in SQL text: the only place anything is written into a statement.
//!
//! [`quote`] is the one function that puts a name into SQL. It refuses what PostgreSQL would silently
//! truncate (more than 63 bytes) or cannot hold (empty, NUL) and double-quotes the rest, doubling any
//! embedded quote, so a name can never end the identifier early. Names dstore derives itself (schemas,
//! indexes) are built here and shortened with a stable hash so they always fit and never collide by
//! truncation. [`literal`] quotes the few values DDL cannot take as bind parameters (defaults,
//! comments); every value of an item reaches PostgreSQL as a bind parameter instead.

use thiserror::Error;

use crate::blueprint::Ident;

/// Longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1).
pub const MAX_NAME_BYTES: usize = 63;

/// Projects whose names are longer than this get a hashed schema prefix, so `{prefix}_v{version}`
/// still fits in 63 bytes for every `u32` version.
const MAX_PLAIN_PREFIX: usize = 50;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{name:?} cannot be a postgresql identifier: {reason}")]
    Identifier { name: String, reason: &'static str },
    #[error("a postgresql literal cannot contain a NUL character")]
    NulInLiteral,
}

/// Validates `name` and returns it double-quoted, ready to be written into SQL.
pub fn quote(name: &str) -> Result<String, NameError> {
    let refuse = |reason| {
        Err(NameError::Identifier {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse("it is longer than 63 bytes and postgresql would truncate it");
    }
    if name.contains('\0') {
        return refuse("it contains a NUL character");
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `schema.table`, both quoted.
pub fn qualified(schema: &str, table: &str) -> Result<String, NameError> {
    Ok(format!("{}.{}", quote(schema)?, quote(table)?))
}

/// A string literal in standard SQL quoting (`standard_conforming_strings` is on since 9.1).
pub fn literal(value: &str) -> Result<String, NameError> {
    if value.contains('\0') {
        return Err(NameError::NulInLiteral);
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

/// The part of a project's schema names before `_v{version}`: the project name itself, or for very
/// long names a 34-byte head, `_` and a 64-bit hash of the whole name (51 bytes, so never equal to a
/// plain prefix). Two long names share a prefix only if their hashes collide (about one chance in
/// 10^19 per pair); the schema's comment names its project, and dstore refuses to use or drop a
/// schema whose comment names another.
pub fn schema_prefix(project: &Ident) -> String {
    let name = project.as_str();
    if name.len() <= MAX_PLAIN_PREFIX {
        name.to_owned()
    } else {
        format!("{}_{:016x}", &name[..34], fnv1a64(name))
    }
}

/// The schema name a long project name had before its hash grew to 64 bits; migrations rename such
/// a schema to [`schema_name`]. `None` for names that never changed.
pub fn legacy_schema_name(project: &Ident, version: u32) -> Option<String> {
    let name = project.as_str();
    (name.len() > MAX_PLAIN_PREFIX)
        .then(|| format!("{}_{:08x}_v{version}", &name[..42], fnv1a(name)))
}

/// The comment every schema dstore makes carries: it names the schema's project and version and,
/// once known, the deployment that made it (see `projector::Deployment`); dstore checks it (with
/// [`comment_owner`]) before it writes into, renames or drops a schema.
pub fn schema_comment(project: &Ident, version: u32, deployment: Option<&str>) -> String {
    match deployment {
        Some(id) => format!("dstore project {project}, version {version}, deployment {id}"),
        None => format!("dstore project {project}, version {version}"),
    }
}

/// Whose a schema is, by its comment: `Some(Some(id))` when dstore made it for this project
/// version in deployment `id`, `Some(None)` when an older dstore made it without naming the
/// deployment, `None` when it is not dstore's schema of this project version.
pub fn comment_owner<'a>(
    comment: &'a str,
    project: &Ident,
    version: u32,
) -> Option<Option<&'a str>> {
    let rest = comment.strip_prefix(&schema_comment(project, version, None))?;
    if rest.is_empty() {
        return Some(None);
    }
    rest.strip_prefix(", deployment ")
        .filter(|id| !id.is_empty())
        .map(Some)
}

/// The schema holding one version of a project: `myblog_v2`.
pub fn schema_name(project: &Ident, version: u32) -> String {
    format!("{}_v{version}", schema_prefix(project))
}

/// A regular expression matching exactly the schema names of `project`, today's and the legacy
/// ones; safe to bind as a parameter since identifiers hold only `[a-z0-9_]`.
pub fn schema_pattern(project: &Ident) -> String {
    match legacy_schema_name(project, 0) {
        Some(legacy) => format!(
            "^({}|{})_v[0-9]+$",
            schema_prefix(project),
            legacy.trim_end_matches("_v0")
        ),
        None => format!("^{}_v[0-9]+$", schema_prefix(project)),
    }
}

/// A name dstore derives from others (an index name): kept as is when it fits, otherwise shortened
/// to 54 bytes plus `_` and a hash of the whole name.
pub fn derived_name(parts: &[&str]) -> String {
    let name = parts.join("_");
    if name.len() <= MAX_NAME_BYTES {
        name
    } else {
        format!("{}_{:08x}", &name[..54], fnv1a(&name))
    }
}

/// FNV-1a: tiny, and stable across Rust releases (unlike `DefaultHasher`), which names must be.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// FNV-1a with 64 bits.
fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_embedded_quotes_and_refuses_what_postgresql_would_mangle() {
        assert_eq!(quote("articles").unwrap(), "\"articles\"");
        assert_eq!(quote("my\"db").unwrap(), "\"my\"\"db\"");
        assert!(quote("").is_err());
        assert!(quote("a\0b").is_err());
        assert!(quote(&"x".repeat(64)).is_err());
        assert!(quote(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn literals_double_single_quotes_and_refuse_nul() {
        assert_eq!(literal("it's").unwrap(), "'it''s'");
        assert_eq!(literal("a\0"), Err(NameError::NulInLiteral));
    }

    #[test]
    fn a_schema_comment_names_its_project_version_and_deployment() {
        let blog = Ident::parse("blog").unwrap();
        let ours = schema_comment(&blog, 1, Some("d1"));
        assert_eq!(ours, "dstore project blog, version 1, deployment d1");
        assert_eq!(comment_owner(&ours, &blog, 1), Some(Some("d1")));
        let unmarked = schema_comment(&blog, 1, None);
        assert_eq!(comment_owner(&unmarked, &blog, 1), Some(None));
        assert_eq!(comment_owner(&ours, &blog, 12), None);
        assert_eq!(
            comment_owner(&schema_comment(&blog, 12, None), &blog, 1),
            None
        );
        let other = Ident::parse("blogs").unwrap();
        assert_eq!(comment_owner(&ours, &other, 1), None);
        assert_eq!(
            comment_owner("dstore project blog, version 1, deployment ", &blog, 1),
            None
        );
        assert_eq!(comment_owner("somebody's schema", &blog, 1), None);
    }

    #[test]
    fn schema_names_fit_in_63_bytes_for_every_project_and_version() {
        let short = Ident::parse("myblog").unwrap();
        assert_eq!(schema_name(&short, 2), "myblog_v2");
        let long = Ident::parse(&"p".repeat(63)).unwrap();
        let name = schema_name(&long, u32::MAX);
        assert!(name.len() <= MAX_NAME_BYTES, "{name}");
        assert!(quote(&name).is_ok());
        let other = Ident::parse(&format!("{}q", "p".repeat(62))).unwrap();
        assert_ne!(schema_prefix(&long), schema_prefix(&other));
    }

    #[test]
    fn a_project_pattern_does_not_match_the_schemas_of_a_project_with_a_longer_name() {
        let pattern = regex::Regex::new(&schema_pattern(&Ident::parse("a").unwrap())).unwrap();
        assert!(pattern.is_match("a_v1") && pattern.is_match("a_v12"));
        assert!(
            !pattern.is_match("a_v1_v1") && !pattern.is_match("ab_v1") && !pattern.is_match("a_v")
        );
    }

    #[test]
    fn derived_names_are_shortened_with_a_hash() {
        assert_eq!(
            derived_name(&["articles", "title", "idx"]),
            "articles_title_idx"
        );
        let long = derived_name(&[&"t".repeat(63), &"c".repeat(63), "idx"]);
        assert_eq!(long.len(), MAX_NAME_BYTES);
        assert_ne!(
            long,
            derived_name(&[&"t".repeat(63), &"c".repeat(62), "idx"])
        );
    }
}
