//! An item body as the write path reads it: a flat object's members as they came, or any JSON value.
//!
//! Most items are one object of strings, numbers, booleans and nulls. [`Document::parse`] reads such
//! a body member by member with the scanners of [`crate::json`], without building serde's map
//! (which hashes every key with SipHash to keep their order) and without decoding a string that has
//! nothing to unescape. Anything else — a nested array or object, an escape in a key or string, a
//! repeated key (refused), more than [`json::SCAN`] members, malformed or non-UTF-8 text — is read by
//! [`json::parse`] as before, so what is accepted, refused and how errors read does not depend on
//! which way a body took (a proptest compares both on the same bodies).

use serde_json::{Map, Value};

use crate::blueprint::FieldError;
use crate::json::{self, skip_space};

/// A parsed item body.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    /// A flat object's members in body order, each key once.
    Members(Vec<(String, Value)>),
    /// Any other body, as [`json::parse`] reads it.
    Value(Value),
}

impl Document {
    /// Parses a body under [`json::parse`]'s rules.
    pub fn parse(bytes: &[u8]) -> Result<Self, FieldError> {
        match flat_members(bytes) {
            Some(members) => Ok(Self::Members(members)),
            None => json::parse(bytes).map(Self::Value),
        }
    }

    /// The heap memory the parsed body holds (see [`json::heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Members(members) => {
                members.capacity() * std::mem::size_of::<(String, Value)>()
                    + members
                        .iter()
                        .map(|(key, value)| key.capacity() + json::heap_bytes(value))
                        .sum::<usize>()
            }
            Self::Value(value) => json::heap_bytes(value),
        }
    }
}

impl From<Value> for Document {
    fn from(value: Value) -> Self {
        Self::Value(value)
    }
}

/// What an item's fields are read from: the members of a body, whichever way it was parsed.
pub trait AsFields {
    /// The object's fields; `None` when the body is not an object.
    fn fields(&self) -> Option<Fields<'_>>;
}

impl AsFields for Document {
    fn fields(&self) -> Option<Fields<'_>> {
        match self {
            Self::Members(members) => Some(Fields::Members(members)),
            Self::Value(value) => value.fields(),
        }
    }
}

impl AsFields for Value {
    fn fields(&self) -> Option<Fields<'_>> {
        self.as_object().map(Fields::Map)
    }
}

/// An object's fields, looked up by name.
#[derive(Clone, Copy, Debug)]
pub enum Fields<'a> {
    /// At most [`json::SCAN`] members, each key once: searched in order.
    Members(&'a [(String, Value)]),
    Map(&'a Map<String, Value>),
}

impl<'a> Fields<'a> {
    /// The value of `key` (see [`json::field`]).
    pub fn get(self, key: &str) -> Option<&'a Value> {
        match self {
            Self::Members(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Self::Map(map) => json::field(map, key),
        }
    }

    /// The keys in body order.
    pub fn keys(self) -> impl Iterator<Item = &'a str> {
        let (members, map) = match self {
            Self::Members(members) => (Some(members), None),
            Self::Map(map) => (None, Some(map)),
        };
        let members = members.into_iter().flatten().map(|(k, _)| k.as_str());
        members.chain(map.into_iter().flat_map(|m| m.keys().map(String::as_str)))
    }
}

impl<'a> From<&'a Map<String, Value>> for Fields<'a> {
    fn from(map: &'a Map<String, Value>) -> Self {
        Self::Map(map)
    }
}

/// The members of a body that is one flat object of at most [`json::SCAN`] distinct keys, none of
/// them nor any string value with an escape; `None` for any other body, which [`json::parse`] then
/// reads (and refuses, if it is not JSON).
fn flat_members(bytes: &[u8]) -> Option<Vec<(String, Value)>> {
    // serde checks the UTF-8 of strings, and bytes outside strings are ASCII in any JSON text.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut object = json::members(text).ok()?;
    let mut members: Vec<(String, Value)> = Vec::with_capacity(8);
    for member in object.by_ref() {
        let (name, value) = member.ok()?;
        let (name, value) = (plain(name)?, scalar(value)?);
        if members.len() == json::SCAN || members.iter().any(|(k, _)| k == name) {
            return None;
        }
        members.push((name.to_owned(), value));
    }
    (skip_space(bytes, object.end()?) == bytes.len()).then_some(members)
}

/// A string's text between its quotes, when it has no escape and no control character (which JSON
/// refuses unescaped).
fn plain(inner: &str) -> Option<&str> {
    // Folded without stopping early, so the compiler checks many bytes at once.
    let odd = inner
        .bytes()
        .fold(false, |any, b| any | (b < 0x20) | (b == b'\\'));
    (!odd).then_some(inner)
}

/// The scalar `token`: a plain string, `true`, `false`, `null` or a number as serde reads it;
/// `None` for anything else.
fn scalar(token: &str) -> Option<Value> {
    match token.as_bytes()[0] {
        b'"' => plain(&token[1..token.len() - 1]).map(|s| Value::String(s.to_owned())),
        // A whole number of up to 18 digits without a leading zero fits a u64, which is what serde
        // makes of it; any other number is read by serde.
        b'1'..=b'9' if token.len() <= 18 && token.bytes().all(|b| b.is_ascii_digit()) => {
            Some(Value::from(
                token
                    .bytes()
                    .fold(0u64, |n, b| n * 10 + u64::from(b - b'0')),
            ))
        }
        // A number serde would change (beyond 64 bits, or closer to zero than a double) is
        // refused by `json::parse`, naming the member.
        b'-' | b'0'..=b'9' => match serde_json::from_str(token) {
            Ok(Value::Number(number))
                if !(number.is_f64()
                    && number.as_f64().is_some_and(json::may_have_changed)
                    && json::changed_number(token)) =>
            {
                Some(Value::Number(number))
            }
            _ => None,
        },
        _ => match token {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            "null" => Some(Value::Null),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed body as what the write path sees of it: an object's keys in order, each with what
    /// `Fields::get` finds for it, or any other value.
    fn seen(document: &Document) -> Result<Vec<(String, Value)>, Value> {
        match document.fields() {
            Some(fields) => Ok(fields
                .keys()
                .map(|k| (k.to_owned(), fields.get(k).cloned().unwrap_or_default()))
                .collect()),
            None => match document {
                Document::Value(value) => Err(value.clone()),
                Document::Members(_) => unreachable!("members are an object's"),
            },
        }
    }

    /// What the write path sees of a body parsed by `json::parse`, and by `Document::parse`.
    #[allow(clippy::type_complexity)]
    fn both(
        bytes: &[u8],
    ) -> (
        Result<Result<Vec<(String, Value)>, Value>, FieldError>,
        Result<Result<Vec<(String, Value)>, Value>, FieldError>,
    ) {
        (
            json::parse(bytes).map(|v| seen(&Document::Value(v))),
            Document::parse(bytes).map(|d| seen(&d)),
        )
    }

    /// A number whose digits are not whole but whose nearest double is (4.9999999999999999 reads
    /// as 5) is refused by both readers, naming its member: an `integer` column took it as the
    /// whole number. Whole numbers in any notation are numbers as before.
    #[test]
    fn a_fraction_a_double_rounds_to_a_whole_number_is_refused() {
        for (body, path) in [
            (&br#"{"n":4.9999999999999999}"#[..], "/n"),
            (br#"{"title":"x","n":1.0000000000000001}"#, "/n"),
            (br#"{"n":2147483647.00000001}"#, "/n"),
            (br#"{"a":[1, 4.9999999999999999e0]}"#, "/a/1"),
            (br#"{"n":123456789012345678.5}"#, "/n"),
        ] {
            let (general, flat) = both(body);
            for error in [general.unwrap_err(), flat.unwrap_err()] {
                assert_eq!(error.path, path, "{}", String::from_utf8_lossy(body));
                assert!(error.message.contains("not a whole number"), "{error:?}");
            }
        }
        for body in [
            &br#"{"n":5.0}"#[..],
            br#"{"n":5e0}"#,
            br#"{"n":50e-1}"#,
            br#"{"n":1200e-2}"#,
            br#"{"n":-0.0}"#,
            br#"{"n":0.1}"#,
            br#"{"n":4.999999999999999}"#,
            br#"{"n":1.5e300}"#,
            br#"{"a":[2.5, 1e3, 18446744073709551616.0]}"#,
        ] {
            let (general, flat) = both(body);
            assert_eq!(
                general.unwrap(),
                flat.unwrap(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A double printed the shortest way reads back as that double, by both readers (serde's
        // quicker float reading took 0.9999999999999999 for 1, which an integer column took).
        for text in [
            "0.9999999999999999",
            "0.30000000000000004",
            "2.2250738585072014e-308",
            "1.7976931348623157e308",
            "9007199254740.993",
            "123456.78901234567",
        ] {
            let body = format!(r#"{{"n":{text}}}"#);
            let (general, flat) = both(body.as_bytes());
            let expected = text.parse::<f64>().unwrap();
            for read in [general.unwrap().unwrap(), flat.unwrap().unwrap()] {
                assert_eq!(read[0].1.as_f64(), Some(expected), "{text}");
            }
        }
    }

    #[test]
    fn a_flat_object_is_read_member_by_member_and_anything_else_as_before() {
        let flat =
            br#" { "title" : "A", "views":42, "ok":true, "no":false, "gone":null, "n":-1.5e3 } "#;
        assert!(matches!(Document::parse(flat), Ok(Document::Members(m)) if m.len() == 6));
        for other in [
            &br#"{"a":[1]}"#[..],
            br#"{"a":{"b":1}}"#,
            br#"{"a":"x\"y"}"#,
            br#"{"a\u0041":1}"#,
            br#"[1]"#,
            br#""x""#,
        ] {
            assert!(
                matches!(Document::parse(other), Ok(Document::Value(_))),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        // A repeated key leaves the member reading too, and is refused as `json::parse` refuses it.
        assert_eq!(Document::parse(br#"{"a":1,"a":2}"#).unwrap_err().path, "/a");
        let many: String = format!(
            "{{{}}}",
            (0..=json::SCAN)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(matches!(
            Document::parse(many.as_bytes()),
            Ok(Document::Value(_))
        ));
    }

    #[test]
    fn a_flat_member_beyond_64_bits_is_refused_naming_it() {
        let error = Document::parse(br#"{"id":"x","n":18446744073709551616}"#).unwrap_err();
        assert_eq!(error.path, "/n");
        assert!(error.message.contains("64 bits"), "{}", error.message);
        let error = Document::parse(br#"{"id":"x","tiny":1e-400}"#).unwrap_err();
        assert_eq!(error.path, "/tiny");
        let edge =
            Document::parse(br#"{"id":"x","n":18446744073709551615,"f":1e30,"z":0.0}"#).unwrap();
        assert!(matches!(edge, Document::Members(_)));
    }

    #[test]
    fn refusals_read_as_json_parse_words_them() {
        for bad in [
            &b""[..],
            b"   ",
            b"{",
            b"{\"a\":1,}",
            b"{\"a\":1} x",
            b"{\"a\" 1}",
            b"{\"a\":tru}",
            b"{\"a\":1e999}",
            b"{\"a\":01}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":-}",
            b"{a:1}",
        ] {
            let (expected, got) = both(bad);
            assert!(expected.is_err(), "{}", String::from_utf8_lossy(bad));
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn fields_look_up_and_list_keys_alike_for_members_and_maps() {
        let members = Document::parse(br#"{"b":1,"a":2}"#).unwrap();
        let Document::Members(list) = &members else {
            panic!("a flat object is read member by member")
        };
        let value = Value::Object(list.iter().cloned().collect());
        for fields in [members.fields().unwrap(), value.fields().unwrap()] {
            assert_eq!(fields.get("a"), Some(&Value::from(2)));
            assert_eq!(fields.get("c"), None);
            assert_eq!(fields.keys().collect::<Vec<_>>(), ["b", "a"]);
        }
        assert!(Value::from(1).fields().is_none());
    }

    /// One of `texts`, as an owned string.
    fn pieces(texts: &[&'static str]) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        proptest::sample::select(texts.to_vec()).prop_map(str::to_owned)
    }

    proptest::proptest! {
        /// Bodies made of JSON's pieces, valid or not: the member-by-member reading accepts and
        /// refuses exactly what `json::parse` does, with the same value or error.
        #[test]
        fn the_member_reading_agrees_with_json_parse(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    pieces(&["{", "}", ",", ":", " ", "[1]", "true", "null"]),
                    "-?[0-9]{1,3}(\\.[0-9]{1,2})?(e[0-9])?",
                    "\"[a-c\\\\\"é\u{1}]{0,3}\"",
                ],
                0..14,
            ),
        ) {
            let text = pieces.concat();
            let (expected, got) = both(text.as_bytes());
            proptest::prop_assert_eq!(got, expected, "{}", text);
        }

        /// Flat objects, keys repeated or not, numbers of any length, strings with and without
        /// escapes and control characters: members in the order serde keeps them, or its error.
        #[test]
        fn flat_objects_read_as_serde_reads_them(
            members in proptest::collection::vec(("[a-d]{1,2}", proptest::prop_oneof![
                pieces(&["1", "\"s\"", "false", "2.5"]),
                "-?[0-9]{1,22}",
                "\"[a-z\u{1}\u{1f}\\\\\"é]{0,12}\"",
            ]), 0..20),
        ) {
            let text = format!(
                "{{{}}}",
                members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            );
            let (expected, got) = both(text.as_bytes());
            proptest::prop_assert_eq!(got, expected, "{}", text);
        }
    }
}
