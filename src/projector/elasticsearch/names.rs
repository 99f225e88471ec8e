//! Index and alias names: `{prefix}{project}_v{version}_{blueprint}` and `{prefix}{project}_{blueprint}`.
//!
//! Invariant: every name dstore sends to Elasticsearch is built here, from validated identifiers
//! (`[a-z][a-z0-9_]*`) and a prefix checked once at start-up, so names are always lowercase and legal.
//! Because identifiers may contain `_`, a name alone does not say which project owns an index; the
//! index's `_meta` does (see `mapping::meta`), and dstore checks it before it moves or deletes anything.

use super::client::EsError;
use crate::blueprint::Ident;

/// Elasticsearch refuses index names over 255 bytes; identifiers take up to 63 each.
const MAX_PREFIX: usize = 100;

#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Result<Names, EsError> {
        let refuse = |reason| {
            Err(EsError::Prefix {
                prefix: prefix.into(),
                reason,
            })
        };
        if prefix.len() > MAX_PREFIX {
            return refuse("longer than 100 characters");
        }
        if !prefix.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        }) {
            return refuse(
                "only lowercase letters, digits, '_', '-' and '.' are allowed in index names",
            );
        }
        if prefix.starts_with(['_', '-', '.']) {
            return refuse("index names cannot start with '_', '-' or '.'");
        }
        Ok(Names {
            prefix: prefix.into(),
        })
    }

    pub fn index(&self, project: &Ident, version: u32, blueprint: &Ident) -> String {
        format!("{}{project}_v{version}_{blueprint}", self.prefix)
    }

    pub fn alias(&self, project: &Ident, blueprint: &Ident) -> String {
        format!("{}{project}_{blueprint}", self.prefix)
    }

    /// A wildcard that matches every index of `project` (and possibly of other projects whose name
    /// starts the same way: filter by `_meta`).
    pub fn project_indexes(&self, project: &Ident) -> String {
        format!("{}{project}_v*", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(s: &str) -> Ident {
        Ident::parse(s).expect("an identifier")
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        let names = Names::new("test-").expect("a valid prefix");
        assert_eq!(
            names.index(&ident("myblog"), 2, &ident("article")),
            "test-myblog_v2_article"
        );
        assert_eq!(
            names.alias(&ident("myblog"), &ident("article")),
            "test-myblog_article"
        );
        assert_eq!(names.project_indexes(&ident("myblog")), "test-myblog_v*");
    }

    #[test]
    fn prefixes_elasticsearch_would_refuse_are_refused_at_start() {
        for bad in ["Upper", "_x", "-x", ".x", "a b", "a*", &"x".repeat(101)] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
        assert!(Names::new("").is_ok() && Names::new("dstore.prod-").is_ok());
    }
}
