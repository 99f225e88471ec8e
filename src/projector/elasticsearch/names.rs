//! Index and alias names: `{prefix}{project}-v{version}-{blueprint}` and `{prefix}{project}-{blueprint}`.
//!
//! Invariant: every name dstore sends to Elasticsearch is built here, from validated identifiers
//! (`[a-z][a-z0-9_]*`) and a prefix checked once at start-up, so names are always lowercase and legal.
//! The parts are joined by `-`, which identifiers cannot contain, so a name says exactly which project,
//! version and blueprint it belongs to: `blog` + `post_comment` and `blog_post` + `comment` never
//! share a name, and no alias can equal an index name (an alias has one `-` after the prefix, an index
//! two). dstore still checks an index's `_meta` (see `mapping::meta`) before it moves or deletes it,
//! since the prefix may be shared with indexes dstore did not make.

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
        format!("{}{project}-v{version}-{blueprint}", self.prefix)
    }

    pub fn alias(&self, project: &Ident, blueprint: &Ident) -> String {
        format!("{}{project}-{blueprint}", self.prefix)
    }

    /// A wildcard that matches every index of `project` and of no other project.
    pub fn project_indexes(&self, project: &Ident) -> String {
        format!("{}{project}-v*", self.prefix)
    }

    /// The name an index had before `-` joined the parts; an upgrade re-creates such an index under
    /// today's name and then deletes it.
    pub fn legacy_index(&self, project: &Ident, version: u32, blueprint: &Ident) -> String {
        format!("{}{project}_v{version}_{blueprint}", self.prefix)
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
            "test-myblog-v2-article"
        );
        assert_eq!(
            names.alias(&ident("myblog"), &ident("article")),
            "test-myblog-article"
        );
        assert_eq!(names.project_indexes(&ident("myblog")), "test-myblog-v*");
    }

    #[test]
    fn names_of_different_projects_and_blueprints_never_collide() {
        let names = Names::new("").expect("a valid prefix");
        assert_ne!(
            names.alias(&ident("blog"), &ident("post_comment")),
            names.alias(&ident("blog_post"), &ident("comment"))
        );
        // Blueprints `b` and `v1_b`: the alias of the second is not the index of the first.
        assert_ne!(
            names.alias(&ident("p"), &ident("v1_b")),
            names.index(&ident("p"), 1, &ident("b"))
        );
        let pattern = names.project_indexes(&ident("blog"));
        let other = names.index(&ident("blog_post"), 1, &ident("comment"));
        assert!(!other.starts_with(pattern.trim_end_matches('*')));
    }

    #[test]
    fn prefixes_elasticsearch_would_refuse_are_refused_at_start() {
        for bad in ["Upper", "_x", "-x", ".x", "a b", "a*", &"x".repeat(101)] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
        assert!(Names::new("").is_ok() && Names::new("dstore.prod-").is_ok());
    }
}
