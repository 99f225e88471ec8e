//! Identifiers for projects, blueprints, tables and columns.
//!
//! An [`Ident`] can only be built through [`Ident::parse`], so holding one proves the name matches
//! `^[a-z][a-z0-9_]{0,62}$`: it is safe as a path segment, a PostgreSQL identifier (once quoted) and a
//! part of an Elasticsearch index name. Every store relies on this invariant.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest identifier, in bytes (PostgreSQL truncates identifiers at 63).
pub const MAX_IDENT_LEN: usize = 63;

/// A validated identifier.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ident(String);

impl Ident {
    /// Validates `name`, explaining what is wrong when it is not an identifier.
    pub fn parse(name: &str) -> Result<Ident, String> {
        let bytes = name.as_bytes();
        if bytes.is_empty() {
            return Err("must not be empty".into());
        }
        if bytes.len() > MAX_IDENT_LEN {
            return Err(format!("must be at most {MAX_IDENT_LEN} characters long"));
        }
        if !bytes[0].is_ascii_lowercase() {
            return Err("must start with a lowercase letter (a-z)".into());
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            return Err(format!(
                "must contain only lowercase letters, digits and underscores, found {bad:?}"
            ));
        }
        Ok(Ident(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name in quotes, as messages show a name: `project "myblog" does not exist`.
impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for Ident {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Ident {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Ident {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Ident::parse(&raw).map_err(|reason| {
            serde::de::Error::custom(format!("{:?} {reason}", super::value::excerpt_str(&raw)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_show_the_name_in_quotes() {
        let name = Ident::parse("myblog").unwrap();
        assert_eq!(
            format!("project {name:?} does not exist"),
            "project \"myblog\" does not exist"
        );
    }

    #[test]
    fn accepts_the_documented_shape() {
        for ok in ["a", "myblog", "date_created", "a1_b2", &"x".repeat(63)] {
            assert!(Ident::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_hostile_and_malformed_names() {
        for bad in [
            "",
            "1abc",
            "_x",
            "Abc",
            "a-b",
            "a.b",
            "..",
            "a/b",
            "a\"b",
            "a'b",
            "é",
            "a b",
            "a\0",
            &"x".repeat(64),
        ] {
            assert!(Ident::parse(bad).is_err(), "{bad:?}");
        }
    }
}
