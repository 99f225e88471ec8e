//! Parsing JSON bodies with one nesting limit, so whatever dstore accepts it can always store, decode
//! and restart from.
//!
//! dstore wraps what a client sends in records of its own (a task wraps an item in about seven
//! levels, a catalog record wraps a column default in about six), and `serde_json` refuses to decode
//! anything nested deeper than 128 levels. A body nested at most [`MAX_DEPTH`] levels therefore
//! leaves more than fifty levels to spare in every internal encoding. serde stops by itself at 128
//! levels, so what it builds of a hostile body is bounded by the body; the levels of the value it
//! built are counted, and the bytes are scanned to name where the limit was passed only for a body
//! that is refused ([`check_depth`] scans bytes alone).
//!
//! Text that is JSON already (dstore serialized it, or checked it when it arrived) is followed by
//! scanners that find where a value ends without checking it again (`skip_space`, `string_end`,
//! `value_end`); they say nothing useful about text that is not JSON.

use std::cell::RefCell;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::blueprint::parse::pointer_segment;
use crate::blueprint::FieldError;

/// Maps with at most this many keys are searched by comparing keys in order (see [`field`]).
pub const SCAN: usize = 16;

/// The value of `key` in `object`. Items have a few keys, each looked up once per write: comparing
/// them in order costs less than hashing the key (SipHash, the map's hasher), which a larger object
/// still gets, so a hostile body with thousands of keys is not searched key by key.
pub fn field<'m>(object: &'m serde_json::Map<String, Value>, key: &str) -> Option<&'m Value> {
    if object.len() <= SCAN {
        object
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    } else {
        object.get(key)
    }
}

/// Whether `byte` is JSON whitespace (space, tab, line feed, carriage return; not the other ASCII
/// spaces, which JSON refuses).
pub fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// The first position from `at` that is not JSON whitespace.
pub fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| is_space(*b)) {
        at += 1;
    }
    at
}

/// The position just after the string that starts (with its quote) at `at`. (Looking at a short
/// string's first bytes one by one before memchr cost more, not less: 1.5k → 4.2k instructions a
/// row of framing tasks, 2026-12-03.)
pub fn string_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    at += 1;
    loop {
        at += memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?;
        match bytes[at] {
            b'"' => return Some(at + 1),
            _ => at += 2,
        }
    }
}

/// The position just after the JSON value that starts at `at`: a string, an object or array
/// (strings inside followed, so their brackets do not count), or a scalar, which ends before the
/// next separator or space.
pub fn value_end(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = at;
            loop {
                match bytes.get(at)? {
                    b'"' => {
                        at = string_end(bytes, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        }
        _ => {
            let len = bytes[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || is_space(*b))
                .unwrap_or(bytes.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// The members of the JSON object that starts `text` (after any space), in order: each name's text
/// between its quotes (escapes as written) and its value's text. Only the object's own structure is
/// followed, as the scanners above follow it; nothing inside a name or a value is checked. After the
/// last member, [`Members::end`] is where the object ends. A name given twice comes twice.
pub fn members(text: &str) -> Result<Members<'_>, MemberError<'_>> {
    let bytes = text.as_bytes();
    let at = skip_space(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return Err(MemberError::NotObject);
    }
    let at = skip_space(bytes, at + 1);
    let state = match bytes.get(at) {
        Some(b'}') => Reading::Ended(at + 1),
        _ => Reading::At(at),
    };
    Ok(Members { text, state })
}

/// The iterator of [`members`].
pub struct Members<'a> {
    text: &'a str,
    state: Reading,
}

enum Reading {
    /// The next member's name starts here.
    At(usize),
    /// The object ended just before here.
    Ended(usize),
    /// A member was broken: nothing more is read.
    Broken,
}

/// Where [`members`] found the object's structure broken; a name is the text between its quotes.
#[derive(Debug, PartialEq)]
pub enum MemberError<'a> {
    NotObject,
    NoName,
    NameNotEnded,
    NoValue(&'a str),
    ValueNotEnded(&'a str),
    NotFollowed(&'a str),
}

impl<'a> Members<'a> {
    /// Just after the object's closing `}`, once every member was read.
    pub fn end(&self) -> Option<usize> {
        match self.state {
            Reading::Ended(end) => Some(end),
            _ => None,
        }
    }

    /// The member at `at`, and what reading goes on with.
    fn member(&self, at: usize) -> Result<((&'a str, &'a str), Reading), MemberError<'a>> {
        let (text, bytes) = (self.text, self.text.as_bytes());
        if bytes.get(at) != Some(&b'"') {
            return Err(MemberError::NoName);
        }
        let name_end = string_end(bytes, at).ok_or(MemberError::NameNotEnded)?;
        let name = &text[at + 1..name_end - 1];
        let at = skip_space(bytes, name_end);
        if bytes.get(at) != Some(&b':') {
            return Err(MemberError::NoValue(name));
        }
        let start = skip_space(bytes, at + 1);
        let end = value_end(bytes, start).ok_or(MemberError::ValueNotEnded(name))?;
        let at = skip_space(bytes, end);
        let next = match bytes.get(at) {
            Some(b',') => Reading::At(skip_space(bytes, at + 1)),
            Some(b'}') => Reading::Ended(at + 1),
            _ => return Err(MemberError::NotFollowed(name)),
        };
        Ok(((name, &text[start..end]), next))
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = Result<(&'a str, &'a str), MemberError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let Reading::At(at) = self.state else {
            return None;
        };
        Some(match self.member(at) {
            Ok((member, next)) => {
                self.state = next;
                Ok(member)
            }
            Err(error) => {
                self.state = Reading::Broken;
                Err(error)
            }
        })
    }
}

/// Appends `value`'s JSON text to `out`, byte for byte what `serde_json` writes (a proptest checks).
/// Strings with nothing to escape, as most are, are copied whole: serde looks up every byte of
/// every string and key in a table (about 150 instructions a string of an item;
/// docs/performance.md).
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map.iter().map(|(key, item)| (key.as_str(), item))),
        scalar => serde_json::to_writer(out, scalar).expect("a Vec takes every write"),
    }
}

/// Appends the JSON object of `fields`, in their order, as [`write_value`] writes a map.
pub fn write_object<'v>(out: &mut Vec<u8>, fields: impl IntoIterator<Item = (&'v str, &'v Value)>) {
    out.push(b'{');
    for (i, (key, item)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, item);
    }
    out.push(b'}');
}

/// Appends `text` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, text: &str) {
    // Folded without stopping early, so the compiler checks many bytes at once.
    let escaped = text.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escaped {
        serde_json::to_writer(out, text).expect("a Vec takes every write");
    } else {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// The deepest nesting of arrays and objects a request body may have; the body itself is level 1.
pub const MAX_DEPTH: usize = 64;

/// One container the scan is inside: where in it the scan stands.
enum Place {
    /// An object, with the raw text of its current key.
    Object(Option<(usize, usize)>),
    /// An array, with the index of its current element.
    Array(usize),
}

/// Refuses `bytes` when arrays and objects nest deeper than `limit`, naming where (a JSON pointer).
/// Malformed JSON is left for the parser to describe. Every body is first scanned counting levels
/// only; the keys and indexes of the way down are followed only for a body that is refused.
pub fn check_depth(bytes: &[u8], limit: usize) -> Result<(), FieldError> {
    if !deeper_than(bytes, limit) {
        return Ok(());
    }
    pointed_depth(bytes, limit)
}

/// Whether arrays and objects in `bytes` nest deeper than `limit` (brackets in strings do not count).
fn deeper_than(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// [`check_depth`]'s refusal, naming where the limit was passed.
fn pointed_depth(bytes: &[u8], limit: usize) -> Result<(), FieldError> {
    match pointed(bytes, limit, false) {
        Some((_, path)) => Err(too_deep(path, limit)),
        None => Ok(()),
    }
}

/// Whether `token`, a JSON number, is a whole number written without a fraction or exponent that
/// no 64-bit integer holds: serde reads it as the nearest float, another number than the one sent.
pub fn wide_integer(token: &str) -> bool {
    let digits = token.strip_prefix('-').unwrap_or(token);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && if digits.len() == token.len() {
            token.parse::<u64>().is_err()
        } else {
            token.parse::<i64>().is_err()
        }
}

/// Whether `token`, a JSON number, is not zero but closer to zero than any double: serde reads it
/// as 0.
pub fn underflows(token: &str) -> bool {
    let mantissa = token.split(['e', 'E']).next().unwrap_or(token);
    mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b)) && token.parse::<f64>() == Ok(0.0)
}

/// Whether the decimal number `token` (as Rust reads it: digits, a point, an exponent) is a whole
/// number, read from its digits: `"4.9999999999999999"` is not, though the nearest double to it
/// is 5.
pub fn whole_decimal(token: &str) -> bool {
    let (mantissa, exponent) = match token.find(['e', 'E']) {
        Some(at) => (&token[..at], token[at + 1..].parse::<i64>().unwrap_or(0)),
        None => (token, 0),
    };
    let mantissa = mantissa.trim_start_matches(['-', '+']);
    let (int, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // The digits past the point once the exponent moved it.
    let point = int.len() as i64 + exponent.clamp(-(1 << 20), 1 << 20);
    int.bytes()
        .chain(fraction.bytes())
        .enumerate()
        .all(|(at, digit)| (at as i64) < point || digit == b'0')
}

/// Whether `token`, a JSON number with a fraction or an exponent, is not a whole number though
/// serde reads it as one: `4.9999999999999999` has more digits than a double holds, and reads as
/// 5, which an `integer` column would then take as sent.
pub fn rounded_whole(token: &str) -> bool {
    token.parse::<f64>().is_ok_and(|f| f.fract() == 0.0) && !whole_decimal(token)
}

/// Whether serde may have read a [`changed_number`] as `value`: it reads a whole number no 64-bit
/// integer holds as a float (at least 2^63 away from zero), as it reads `1e19`; a number too
/// close to zero for a double as 0, as it reads `0.0`; and a [`rounded_whole`] as the whole number
/// it is nearest, as it reads `5.0`: only the text tells them apart.
pub fn may_have_changed(value: f64) -> bool {
    value.fract() == 0.0
}

/// Whether serde reads the JSON number `token` as another number: a [`wide_integer`], one that
/// [`underflows`], or a [`rounded_whole`].
pub fn changed_number(token: &str) -> bool {
    // Most numbers are short and have no exponent: a whole number beyond 64 bits has 20 digits,
    // and one closer to zero than a double written without an exponent over 300.
    let exponent = || token.bytes().any(|b| b == b'e' || b == b'E');
    let fraction = || token.bytes().any(|b| b == b'.');
    // A fraction a double rounds to a whole number has at least 17 significant digits.
    (token.len() >= 19 && wide_integer(token))
        || ((token.len() > 300 || exponent()) && underflows(token))
        || (token.len() >= 17 && (fraction() || exponent()) && rounded_whole(token))
}

/// The refusal of a [`changed_number`] at `path`.
fn changed(path: String, token: &[u8]) -> FieldError {
    let text = String::from_utf8_lossy(token);
    let shown = crate::blueprint::value::excerpt_str(&text);
    let message = if underflows(&text) {
        format!(
            "{shown} is closer to zero than any double, which dstore would keep as 0; send it as \
             a string"
        )
    } else if !wide_integer(&text) {
        format!(
            "{shown} is not a whole number, but has more digits than a double holds, which \
             dstore would keep as the whole number nearest to it; send at most 15 significant \
             digits, or send it as a string"
        )
    } else {
        format!(
            "{shown} is a whole number beyond 64 bits, which dstore would keep only as the nearest \
             float, changing its digits; send it as a string (or with an exponent, 1.5e30, where \
             a rounded number is meant)"
        )
    };
    FieldError::new(path, message)
}

/// What [`pointed`] stopped at.
#[derive(Debug, PartialEq)]
enum Stop {
    /// Arrays and objects nested deeper than the limit.
    Deep,
    /// A [`changed_number`] (looked for only when asked).
    Changed(std::ops::Range<usize>),
}

/// Follows the keys and indexes of `bytes`' arrays and objects, and stops, with the JSON pointer of
/// where, at the first place they nest deeper than `limit` or, when `numbers`, at the first
/// [`changed_number`]. Text that is not JSON is followed as far as it goes.
fn pointed(bytes: &[u8], limit: usize, numbers: bool) -> Option<(Stop, String)> {
    let mut stack: Vec<Place> = Vec::new();
    let mut last_string = (0, 0);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i + 1;
                i = start;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                last_string = (start, i.min(bytes.len()));
            }
            b':' => {
                if let Some(Place::Object(key)) = stack.last_mut() {
                    *key = Some(last_string);
                }
            }
            b',' => match stack.last_mut() {
                Some(Place::Array(index)) => *index += 1,
                Some(Place::Object(key)) => *key = None,
                None => {}
            },
            open @ (b'[' | b'{') => {
                if stack.len() >= limit {
                    return Some((Stop::Deep, pointer(bytes, &stack)));
                }
                stack.push(if open == b'[' {
                    Place::Array(0)
                } else {
                    Place::Object(None)
                });
            }
            b']' | b'}' => {
                stack.pop();
            }
            b'-' | b'0'..=b'9' if numbers => {
                let end = value_end(bytes, i).unwrap_or(bytes.len());
                if std::str::from_utf8(&bytes[i..end]).is_ok_and(changed_number) {
                    return Some((Stop::Changed(i..end), pointer(bytes, &stack)));
                }
                i = end - 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn too_deep(path: String, limit: usize) -> FieldError {
    FieldError::new(
        path,
        format!("nested deeper than {limit} levels of arrays and objects; dstore accepts at most {limit}"),
    )
}

/// Most bytes of a key, as written, that a pointer shows: enough for
/// [`EXCERPT_CHARS`](crate::blueprint::value::EXCERPT_CHARS) characters however they are written
/// (`\u0001` takes six bytes).
const KEY_SHOWN_BYTES: usize = 6 * crate::blueprint::value::EXCERPT_CHARS;

/// The JSON pointer of the place the scan stands at: each key as written, cut after a few dozen
/// characters, and the pointer cut after a few hundred bytes, so that a refusal never repeats a
/// large input (a key of a megabyte made an answer of megabytes).
fn pointer(bytes: &[u8], stack: &[Place]) -> String {
    let mut out = String::new();
    for place in stack {
        match place {
            Place::Object(Some((from, to))) => {
                let key = &bytes[*from..*to];
                let shown = &key[..key.len().min(KEY_SHOWN_BYTES)];
                let mut segment =
                    crate::blueprint::value::excerpt_str(&String::from_utf8_lossy(shown));
                if shown.len() < key.len() && !segment.ends_with('…') {
                    segment.push('…');
                }
                out.push('/');
                out.push_str(&pointer_segment(&segment));
            }
            Place::Object(None) => {}
            Place::Array(index) => {
                out.push('/');
                out.push_str(&index.to_string());
            }
        }
        if out.len() > 200 {
            out.push_str("/…");
            break;
        }
    }
    out
}

/// Parses a request body: nested at most [`MAX_DEPTH`] levels, each object naming a key once, every
/// number one serde reads as it is (not a [`changed_number`]), and not empty.
///
/// A key an object names twice is refused, naming it, as Elasticsearch refuses it: serde (and
/// PostgreSQL's `jsonb`) would keep the last value and drop the other without a word, and a client
/// that sends two values for one field meant something it would not get.
pub fn parse(bytes: &[u8]) -> Result<Value, FieldError> {
    parse_nested(bytes, MAX_DEPTH)
}

/// [`parse`] with another nesting limit: a value that becomes part of an item (text turned into a
/// `json` column's value, or a `json[]` element) nests less deep than a body may.
pub fn parse_nested(bytes: &[u8], limit: usize) -> Result<Value, FieldError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(FieldError::new(
            "",
            "the request body is empty; a JSON document is expected",
        ));
    }
    // serde stops by itself at 128 levels, so what it builds is bounded by the body; the levels of
    // what it built are counted (a few nodes for an item), and the bytes scanned to name where only
    // for a body that is refused. A body too deep and malformed (or repeating a key) too is refused
    // for its depth, as when the bytes were scanned first.
    let seen = Seen::default();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = Unique(&seen)
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        // The scan refuses what nests deeper (a proptest checks both count alike).
        Ok(value) if nests_deeper(&value, limit) => Err(pointed_depth(bytes, limit)
            .err()
            .unwrap_or_else(|| too_deep(String::new(), limit))),
        // A float a number serde changed may have become: the text tells whether one did.
        Ok(value) if seen.changed.get() => match pointed(bytes, limit, true) {
            Some((Stop::Changed(token), path)) => Err(changed(path, &bytes[token])),
            _ => Ok(value),
        },
        Ok(value) => Ok(value),
        Err(e) => {
            check_depth(bytes, limit)?;
            match seen.repeated.into_inner() {
                Some(trail) => Err(repeated_key(trail)),
                None => Err(FieldError::new("", format!("malformed JSON: {e}"))),
            }
        }
    }
}

/// What parsing noticed on the way.
#[derive(Default)]
struct Seen {
    /// Where a repeated key was found (see [`Trail`]).
    repeated: Trail,
    /// Whether a float was read that a [`changed_number`] could have become.
    changed: std::cell::Cell<bool>,
}

/// Where a repeated key was found: the segments from it up to the top of the body, the repeated
/// key first; set only when a key repeats.
type Trail = RefCell<Option<Vec<String>>>;

/// Reads any JSON value as `serde_json::Value`'s own `Deserialize` does, but refuses an object
/// naming a key twice, noting where in the [`Trail`].
#[derive(Clone, Copy)]
struct Unique<'t>(&'t Seen);

impl Unique<'_> {
    /// Adds the segment of a container's member to the trail, when the member's error is a
    /// repeated key.
    fn within(self, segment: impl FnOnce() -> String) {
        if let Some(trail) = self.0.repeated.borrow_mut().as_mut() {
            trail.push(segment());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        if may_have_changed(value) {
            self.0.changed.set(true);
        }
        Ok(serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(self) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    self.within(|| items.len().to_string());
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match object.entry(key) {
                serde_json::map::Entry::Occupied(entry) => {
                    *self.0.repeated.borrow_mut() = Some(vec![entry.key().clone()]);
                    return Err(serde::de::Error::custom("a key is repeated"));
                }
                serde_json::map::Entry::Vacant(entry) => match map.next_value_seed(self) {
                    Ok(value) => {
                        entry.insert(value);
                    }
                    Err(e) => {
                        self.within(|| entry.key().clone());
                        return Err(e);
                    }
                },
            }
        }
        Ok(Value::Object(object))
    }
}

/// The refusal of a repeated key, named by its pointer (`trail`, innermost first).
fn repeated_key(trail: Vec<String>) -> FieldError {
    let mut path = String::new();
    for segment in trail.iter().rev() {
        path.push('/');
        path.push_str(&pointer_segment(&crate::blueprint::value::excerpt_str(
            segment,
        )));
        if path.len() > 400 {
            path.push_str("/…");
            break;
        }
    }
    FieldError::new(
        path,
        "the key appears twice in one object; name each key once (dstore keeps no value a \
         client sent without a word, and could not say which one was meant)",
    )
}

/// The heap memory a parsed value holds, in bytes, as its allocations ask for it: what the
/// in-flight budget counts for a parsed body, since a value's text says little of it (a number in
/// an array takes 72 bytes for its 2 bytes of text, a long string about its length). An object's
/// entries are counted at twice their number, the most its growth leaves allocated (serde's map
/// keeps its capacity to itself). `model/tests/memory.rs` checks it against an allocator's count.
pub fn heap_bytes(value: &Value) -> usize {
    match value {
        Value::String(text) => text.capacity(),
        Value::Array(items) => {
            items.capacity() * std::mem::size_of::<Value>()
                + items.iter().map(heap_bytes).sum::<usize>()
        }
        Value::Object(map) => object_heap_bytes(map),
        _ => 0,
    }
}

/// [`heap_bytes`] of an object's members and index.
pub fn object_heap_bytes(map: &serde_json::Map<String, Value>) -> usize {
    2 * map.len().max(2) * OBJECT_ENTRY
        + OBJECT_INDEX
        + map
            .iter()
            .map(|(key, value)| key.capacity() + heap_bytes(value))
            .sum::<usize>()
}

/// What an object's index takes beside its entries, at the least.
const OBJECT_INDEX: usize = 64;

/// What one entry of an object takes beside its key's text and its value's heap: the key and the
/// value themselves, the entry's hash and its place in the index.
const OBJECT_ENTRY: usize =
    std::mem::size_of::<String>() + std::mem::size_of::<Value>() + 2 * std::mem::size_of::<usize>();

/// Whether arrays and objects in `value` nest deeper than `limit` (the value itself is level 1).
fn nests_deeper(value: &Value, limit: usize) -> bool {
    match value {
        Value::Array(items) => limit == 0 || items.iter().any(|v| nests_deeper(v, limit - 1)),
        Value::Object(map) => limit == 0 || map.values().any(|v| nests_deeper(v, limit - 1)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn the_level_count_refuses_exactly_what_the_pointed_scan_refuses(
            text in "[\\[\\]{}\"\\\\a:,]{0,40}",
            limit in 0usize..6,
        ) {
            let bytes = text.as_bytes();
            proptest::prop_assert_eq!(
                deeper_than(bytes, limit),
                pointed_depth(bytes, limit).is_err()
            );
        }
    }

    proptest::proptest! {
        /// Counting the levels of the value serde built refuses what the scan of the bytes refuses,
        /// with the same error, whether the body is well formed or not.
        #[test]
        fn parsing_refuses_exactly_what_the_scan_refuses(
            opens in proptest::collection::vec(proptest::bool::ANY, MAX_DEPTH - 2..MAX_DEPTH + 3),
            key in "[a-z/~]{0,3}",
            tail in proptest::sample::select(vec!["", "]", "x"]),
        ) {
            let mut body = String::new();
            for object in &opens {
                body.push_str(if *object { "{\"" } else { "[" });
                if *object {
                    body.push_str(&key);
                    body.push_str("\":");
                }
            }
            body.push('1');
            for object in opens.iter().rev() {
                body.push(if *object { '}' } else { ']' });
            }
            body.push_str(tail);
            let scanned = check_depth(body.as_bytes(), MAX_DEPTH);
            match parse(body.as_bytes()) {
                Ok(_) => proptest::prop_assert!(scanned.is_ok()),
                Err(error) => match scanned {
                    Err(expected) => proptest::prop_assert_eq!(error, expected),
                    Ok(()) => proptest::prop_assert!(error.message.contains("malformed")),
                },
            }
        }
    }

    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = "(\\PC|[\u{0}-\u{1f}\"\\\\\u{7f}\u{2028}]){0,40}";
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text.prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((text, inner), 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn values_are_written_as_serde_writes_them(value in any_value()) {
            let mut out = Vec::new();
            write_value(&mut out, &value);
            proptest::prop_assert_eq!(out, serde_json::to_vec(&value).unwrap());
        }

        /// The scanners find the end of what serde wrote, compact or pretty, strings of any length
        /// with escapes anywhere.
        #[test]
        fn values_end_where_serde_wrote_them_end(value in any_value(), pretty in proptest::bool::ANY) {
            let text = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            let mut padded = text.clone();
            padded.extend_from_slice(b" ,");
            proptest::prop_assert_eq!(value_end(&padded, 0), Some(text.len()));
        }
    }

    #[test]
    fn members_follow_an_object_and_stop_where_it_breaks() {
        let text = r#" { "a" : [1, "]"] , "b\"c":{"d":2},"a":null } tail"#;
        let mut object = members(text).unwrap();
        let found: Vec<_> = object.by_ref().collect();
        assert_eq!(
            found,
            [
                Ok(("a", r#"[1, "]"]"#)),
                Ok((r#"b\"c"#, r#"{"d":2}"#)),
                Ok(("a", "null"))
            ]
        );
        assert_eq!(&text[object.end().unwrap()..], " tail");
        assert_eq!(members("{}").unwrap().end(), Some(2));
        assert!(matches!(members("[1]"), Err(MemberError::NotObject)));
        for (broken, error) in [
            ("{1}", MemberError::NoName),
            (r#"{"a"}"#, MemberError::NoValue("a")),
            (r#"{"a":"x}"#, MemberError::ValueNotEnded("a")),
            (r#"{"a":1 "b":2}"#, MemberError::NotFollowed("a")),
        ] {
            let mut object = members(broken).unwrap();
            assert_eq!(object.next(), Some(Err(error)), "{broken}");
            assert_eq!(object.next(), None);
            assert_eq!(object.end(), None);
        }
    }

    #[test]
    fn fields_are_found_in_small_and_large_objects_alike() {
        for size in [0, 1, 3, SCAN, SCAN + 1, 5000] {
            let object: serde_json::Map<String, Value> = (0..size)
                .map(|i| (format!("k{i}"), Value::from(i)))
                .collect();
            for i in 0..size {
                assert_eq!(field(&object, &format!("k{i}")), Some(&Value::from(i)));
            }
            assert_eq!(field(&object, "missing"), None);
            assert_eq!(field(&object, ""), None);
        }
    }

    fn nested(depth: usize) -> String {
        format!(
            "{{\"a\": {}1{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn bodies_up_to_the_limit_parse_and_deeper_ones_name_where() {
        assert!(parse(nested(MAX_DEPTH).as_bytes()).is_ok());
        let error = parse(nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(error.path.starts_with("/a/0/0"), "{}", error.path);
        assert!(error.message.contains("64"), "{}", error.message);
        // Past serde's own limit of 128 levels, and cut short, the depth is still what is named.
        for body in [nested(300), nested(300)[..400].to_owned()] {
            let error = parse(body.as_bytes()).unwrap_err();
            assert!(error.path.starts_with("/a/0/0"), "{}", error.path);
            assert!(error.message.contains("64"), "{}", error.message);
        }
    }

    #[test]
    fn a_repeated_key_is_refused_by_its_pointer_and_a_too_deep_body_for_its_depth() {
        for (body, path) in [
            (&br#"{"a":1,"a":2}"#[..], "/a"),
            (
                br#"{"x":[0,{"k":{"b":null,"b~/":1,"b~/":[]}}]}"#,
                "/x/1/k/b~0~1",
            ),
            (br#"[{"a":{}}, {"a":{"c":1}, "a":{"c":1}}]"#, "/1/a"),
        ] {
            let error = parse(body).unwrap_err();
            assert_eq!(error.path, path, "{}", String::from_utf8_lossy(body));
            assert!(error.message.contains("twice"), "{}", error.message);
        }
        // Keys alike only once unescaped are the same key.
        assert_eq!(parse(br#"{"a":1,"\u0061":2}"#).unwrap_err().path, "/a");
        // The same key in different objects is not a repeat.
        assert!(parse(br#"{"a":{"a":1},"b":{"a":2}}"#).is_ok());
        // Depth is named before a repeat, as before malformed text.
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        let body = format!("{{\"a\":1,\"a\":2,\"b\":{deep}}}");
        assert!(parse(body.as_bytes()).unwrap_err().path.starts_with("/b/0"));
    }

    #[test]
    fn parsed_values_are_what_serde_builds() {
        let body = br#"{"s":"\u00e9\n","i":-9223372036854775808,"u":18446744073709551615,
            "f":1.5e300,"big":1e30,"e":1E19,"fraction":10000000000000000000.0,"n":null,"t":true,
            "a":[[],{}]}"#;
        assert_eq!(
            parse(body).unwrap(),
            serde_json::from_slice::<Value>(body).unwrap()
        );
    }

    #[test]
    fn a_whole_number_beyond_64_bits_is_refused_by_its_pointer() {
        for (body, path, number) in [
            (&b"18446744073709551616"[..], "", "18446744073709551616"),
            (br#"{"n": -9223372036854775809}"#, "/n", "-9223372036854775809"),
            (
                br#"{"s":"123456789012345678901234567890","a":[1,{"b~":[2.5e30, 123456789012345678901234567890 ]}]}"#,
                "/a/1/b~0/1",
                "123456789012345678901234567890",
            ),
        ] {
            let error = parse(body).unwrap_err();
            assert_eq!(error.path, path, "{}", String::from_utf8_lossy(body));
            assert!(
                error.message.starts_with(number) && error.message.contains("64 bits"),
                "{}",
                error.message
            );
        }
        // The edges of the 64-bit integers, and floats as large, are numbers as before.
        for ok in [
            "-9223372036854775808",
            "18446744073709551615",
            "1e19",
            "-1.8446744073709552E19",
            "18446744073709551616.0",
            "9.2e18",
        ] {
            assert!(parse(ok.as_bytes()).is_ok(), "{ok}");
            assert!(!wide_integer(ok), "{ok}");
        }
        // Closer to zero than a double: serde read it as 0.
        let error = parse(br#"{"a":[0.0,0e-400,-0.000,4.9e-324,{"b":1E-400}]}"#).unwrap_err();
        assert_eq!(error.path, "/a/4/b");
        assert!(
            error.message.starts_with("1E-400 is closer to zero"),
            "{}",
            error.message
        );
        assert!(underflows("-2e-324") && !underflows("0e-999") && !underflows("5e-324"));
        for wide in [
            "18446744073709551616",
            "-9223372036854775809",
            "99999999999999999999999",
        ] {
            assert!(wide_integer(wide), "{wide}");
        }
    }

    /// A refusal's pointer shows a long key cut: a key of a megabyte, in a body too deep, not JSON
    /// or holding a number serde would change, was repeated whole in the answer.
    #[test]
    fn a_pointer_shows_long_keys_cut() {
        for key in [
            "\x01".repeat(1_000_000),
            "\\u0001".repeat(150_000),
            "/".repeat(1_000_000),
            "é".repeat(400_000),
        ] {
            let deep = format!("{{\"{key}\": {}{}}}", "[".repeat(70), "]".repeat(70));
            let wide = format!("{{\"{key}\": {{\"n\": 123456789012345678901234567890}}}}");
            for body in [deep, wide] {
                let error = parse(body.as_bytes()).unwrap_err();
                assert!(
                    error.path.len() < 1000,
                    "a path of {} bytes",
                    error.path.len()
                );
                // (A body that is not JSON is refused before its numbers are looked at.)
                assert!(
                    error.path.contains('…') || error.path.is_empty(),
                    "{}",
                    error.path
                );
            }
        }
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let body = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(200), "{".repeat(200));
        assert!(parse(body.as_bytes()).is_ok());
    }

    #[test]
    fn the_pointer_names_keys_and_indexes() {
        let body = br#"{"x": 1, "col/a": [0, {"k": [[[1]]]}]}"#;
        let error = check_depth(body, 4).unwrap_err();
        assert_eq!(error.path, "/col~1a/1/k/0");
    }

    #[test]
    fn what_the_limit_accepts_still_decodes_wrapped_in_dstores_own_records() {
        let body = nested(MAX_DEPTH);
        let wrapped = format!("{}{body}{}", "{\"w\":".repeat(50), "}".repeat(50));
        assert!(serde_json::from_str::<Value>(&wrapped).is_ok());
    }

    #[test]
    fn empty_and_malformed_bodies_are_refused() {
        assert!(parse(b"  \n").unwrap_err().message.contains("empty"));
        assert!(parse(b"{").unwrap_err().message.contains("malformed"));
    }
}
