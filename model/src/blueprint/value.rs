//! Strict checking and canonical forms of column values (docs/design.md §2).
//!
//! [`canonicalize`] either refuses a JSON value with a reason or returns the one form every store is
//! given: integers as whole numbers in the `i32` range (PostgreSQL INTEGER), floats as finite numbers,
//! uuids lowercase and hyphenated, dates as `YYYY-MM-DD`, datetimes as `YYYY-MM-DD HH:MM:SS[.ffffff]` in
//! UTC (a time without an offset is UTC, whatever the server's time zone), geometries as GeoJSON of the
//! declared type with valid WGS 84 coordinates. It never looks at anything but its arguments.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Timelike, Utc};
use serde_json::Value;

use super::types::{BaseType, ColumnType};

/// Checks `value` against `ty`; `null` is handled by the caller (nullability is a column option).
pub fn canonicalize(ty: ColumnType, value: &Value) -> Result<Value, String> {
    match ty {
        ColumnType::One(base) => canonicalize_scalar(base, value),
        ColumnType::Many(base) if base.is_geometry() => super::geometry::many(base, value),
        ColumnType::Many(base) => {
            let Value::Array(items) = value else {
                return Err(format!(
                    "expected an array of {}, found {}",
                    base.name(),
                    kind(value)
                ));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    if item.is_null() {
                        return Err(format!(
                            "element {i} is null; array elements cannot be null"
                        ));
                    }
                    canonicalize_scalar(base, item).map_err(|e| format!("element {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
    }
}

/// Checks one scalar value.
pub fn canonicalize_scalar(base: BaseType, value: &Value) -> Result<Value, String> {
    match base {
        BaseType::Uuid => {
            let raw = expect_str(value, "a uuid")?;
            uuid::Uuid::parse_str(raw)
                .map(|u| Value::String(u.hyphenated().to_string()))
                .map_err(|_| format!("{:?} is not a uuid", excerpt_str(raw)))
        }
        BaseType::String | BaseType::Text => {
            let text = expect_str(value, "a string")?;
            check_text(text)?;
            Ok(Value::String(text.into()))
        }
        BaseType::Integer => integer(value),
        BaseType::Float => float(value),
        BaseType::Boolean => match value {
            Value::Bool(_) => Ok(value.clone()),
            other => Err(format!("expected true or false, found {}", kind(other))),
        },
        BaseType::Date => {
            let raw = expect_str(value, "a date (YYYY-MM-DD)")?;
            parse_date(raw).map(|d| {
                use chrono::Datelike;
                Value::String(format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()))
            })
        }
        BaseType::DateTime => {
            let raw = expect_str(value, "a datetime")?;
            // The most common input is its own canonical text but for a `T` between date and
            // time: once checked, it is kept rather than written again from its parts.
            if plain_datetime(raw).is_some() {
                let mut text = raw.to_owned();
                if text.as_bytes()[10] == b'T' {
                    text.replace_range(10..11, " ");
                }
                return Ok(Value::String(text));
            }
            parse_datetime(raw).map(|t| Value::String(format_datetime(&t)))
        }
        BaseType::Json => check_json_text(value).map(|()| value.clone()),
        BaseType::Point | BaseType::LineString | BaseType::Polygon => {
            super::geometry::single(base, value)
        }
    }
}

/// At most [`EXCERPT_CHARS`] characters of a client's text, for error messages: an error never
/// repeats a large input back.
pub fn excerpt_str(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// A JSON value as error messages show it: at most [`EXCERPT_CHARS`] characters of its text.
pub fn excerpt(value: &Value) -> String {
    excerpt_str(&value.to_string())
}

/// How much of a client's input an error message repeats.
pub const EXCERPT_CHARS: usize = 64;

/// Refuses text PostgreSQL cannot store: `text` and `jsonb` never hold U+0000.
pub fn check_text(text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err("contains the NUL character (\\u0000), which PostgreSQL cannot store".into());
    }
    Ok(())
}

/// [`check_text`] for every string and key inside a JSON value.
fn check_json_text(value: &Value) -> Result<(), String> {
    match value {
        Value::String(s) => check_text(s),
        Value::Array(items) => items.iter().try_for_each(check_json_text),
        Value::Object(map) => map.iter().try_for_each(|(key, value)| {
            check_text(key)
                .map_err(|e| format!("key {:?} {e}", excerpt_str(key)))
                .and_then(|()| check_json_text(value))
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// How a JSON value is described in error messages ("a string", "null" …).
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expect_str<'a>(value: &'a Value, what: &str) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected {what}, found {}", kind(value)))
}

fn integer(value: &Value) -> Result<Value, String> {
    let Value::Number(n) = value else {
        return Err(format!("expected a whole number, found {}", kind(value)));
    };
    let out_of_range = || {
        format!(
            "{n} is out of the integer range {}..={}",
            i32::MIN,
            i32::MAX
        )
    };
    if let Some(i) = n.as_i64() {
        return i32::try_from(i)
            .map(Value::from)
            .map_err(|_| out_of_range());
    }
    if n.is_u64() {
        return Err(out_of_range());
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.fract() != 0.0 {
        return Err(format!("{n} is not a whole number"));
    }
    if f < i32::MIN as f64 || f > i32::MAX as f64 {
        return Err(out_of_range());
    }
    Ok(Value::from(f as i32))
}

fn float(value: &Value) -> Result<Value, String> {
    match value {
        Value::Number(n) => match n.as_f64() {
            // A 32-bit float must hold it: PostgreSQL's `real` refuses a value that overflows
            // (rounded to the nearest 32-bit float, as PostgreSQL and Elasticsearch read it, so
            // 3.4028235e38 is the largest one) or that rounds to zero from a non-zero one.
            Some(f) if (f as f32).is_finite() => {
                if f != 0.0 && f as f32 == 0.0 {
                    return Err(format!(
                        "{n} is too close to zero for a float (it rounds to 0)"
                    ));
                }
                Ok(value.clone())
            }
            _ => Err(format!("{n} is out of the float range")),
        },
        other => Err(format!("expected a number, found {}", kind(other))),
    }
}

/// The years an item's dates and datetimes (in UTC) may name: those every store reads back as
/// written. PostgreSQL's text input has no year 0 (1 BC is `0001-01-01 BC`), and years past 9999
/// or before year 1 are not four-digit years, which Elasticsearch's default date format expects.
pub const YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

fn check_year(year: i32, raw: &str) -> Result<(), String> {
    if YEARS.contains(&year) {
        Ok(())
    } else {
        Err(format!(
            "{:?} is out of range: the year must be 0001 to 9999",
            excerpt_str(raw)
        ))
    }
}

/// Parses `YYYY-MM-DD`, a year of [`YEARS`].
pub fn parse_date(raw: &str) -> Result<NaiveDate, String> {
    use chrono::Datelike;
    let date = NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map_err(|_| format!("{:?} is not a date; expected YYYY-MM-DD", excerpt_str(raw)))?;
    check_year(date.year(), raw)?;
    Ok(date)
}

/// Parses RFC 3339 or `YYYY-MM-DD[ HH:MM:SS[.fff]]` (also with `T`); no offset means UTC. The year,
/// in UTC, must be one of [`YEARS`].
pub fn parse_datetime(raw: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if let Some(t) = plain_datetime(raw) {
        return Ok(t);
    }
    let parsed = DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(raw, format).ok())
                .map(|t| t.and_utc())
        })
        .or_else(|| {
            NaiveDate::parse_from_str(raw, "%Y-%m-%d")
                .ok()
                .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
        });
    if let Some(t) = parsed {
        check_year(t.year(), raw)?;
        // chrono keeps a leap second as the second before it, PostgreSQL reads it as the second
        // after it: the stores would disagree.
        if t.nanosecond() >= 1_000_000_000 {
            return Err(format!(
                "{:?} is a leap second (:60), which the stores read as different times; send the \
                 second after it",
                excerpt_str(raw)
            ));
        }
        return Ok(t);
    }
    Err(format!(
        "{:?} is not a datetime; expected RFC 3339 or YYYY-MM-DD[ HH:MM:SS]",
        excerpt_str(raw)
    ))
}

/// `YYYY-MM-DD HH:MM:SS` (or with `T`), the most common input, without chrono's format parser;
/// `None` for year 0 too, which [`parse_datetime`] then refuses.
fn plain_datetime(raw: &str) -> Option<DateTime<Utc>> {
    let b = raw.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let year = number(0, 4).filter(|&year| year > 0)?;
    let date = NaiveDate::from_ymd_opt(year as i32, number(5, 7)?, number(8, 10)?)?;
    let time = date.and_hms_opt(number(11, 13)?, number(14, 16)?, number(17, 19)?)?;
    Some(time.and_utc())
}

/// The canonical datetime text: UTC, seconds, microseconds only when present (PostgreSQL's precision).
/// Written digit by digit (every datetime of every item goes through here); a year outside
/// 0000-9999 goes through the formatter.
pub fn format_datetime(t: &DateTime<Utc>) -> String {
    use chrono::Datelike;
    let digits = |out: &mut String, value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
        }
    };
    let mut out = String::with_capacity(26);
    match u32::try_from(t.year()) {
        Ok(year) if year <= 9999 => digits(&mut out, year, 4),
        _ => {
            use std::fmt::Write;
            let _ = write!(out, "{:04}", t.year());
        }
    }
    for (separator, value) in [
        ('-', t.month()),
        ('-', t.day()),
        (' ', t.hour()),
        (':', t.minute()),
        (':', t.second()),
    ] {
        out.push(separator);
        digits(&mut out, value, 2);
    }
    let micros = t.nanosecond() / 1_000 % 1_000_000;
    if micros != 0 {
        out.push('.');
        digits(&mut out, micros, 6);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn datetimes_are_written_as_the_formatter_writes_them() {
        use chrono::TimeZone;
        for (text, micros) in [
            ("2026-11-22 10:00:00", 0),
            ("0000-01-01 00:00:00", 1),
            ("9999-12-31 23:59:59", 999_999),
            ("1970-01-01 00:00:00", 120),
        ] {
            let t = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
                .unwrap()
                .and_utc()
                + chrono::Duration::microseconds(micros);
            let expected = if micros == 0 {
                text.to_string()
            } else {
                format!("{text}.{micros:06}")
            };
            assert_eq!(format_datetime(&t), expected);
        }
        let far = Utc.with_ymd_and_hms(12345, 6, 7, 8, 9, 10).unwrap();
        assert_eq!(format_datetime(&far), "12345-06-07 08:09:10");
        let before = Utc.with_ymd_and_hms(-44, 3, 15, 0, 0, 0).unwrap();
        assert_eq!(format_datetime(&before), "-044-03-15 00:00:00");
    }

    fn one(base: BaseType, v: Value) -> Result<Value, String> {
        canonicalize(ColumnType::One(base), &v)
    }

    proptest::proptest! {
        /// A `YYYY-MM-DD HH:MM:SS` input (or with `T`), kept as it came, is what parsing and
        /// writing it from its parts gives, and any such text that is no datetime is refused.
        #[test]
        fn a_plain_datetime_kept_as_it_came_is_its_canonical_text(
            year in 0u32..10_000, month in 0u32..14, day in 0u32..33,
            hour in 0u32..25, minute in 0u32..61, second in 0u32..62, t in proptest::bool::ANY,
        ) {
            let sep = if t { 'T' } else { ' ' };
            let raw = format!("{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{second:02}");
            let expected = parse_datetime(&raw).map(|t| Value::String(format_datetime(&t)));
            proptest::prop_assert_eq!(one(BaseType::DateTime, json!(raw)), expected);
        }
    }

    /// Every store reads a date back as written only for years 0001 to 9999 (in UTC for a
    /// datetime); a float must not round to zero in 32 bits from a non-zero value.
    #[test]
    fn dates_keep_to_four_digit_years_and_floats_to_what_32_bits_hold() {
        for ok in ["0001-01-01", "9999-12-31"] {
            assert_eq!(one(BaseType::Date, json!(ok)), Ok(json!(ok)));
        }
        for refused in ["0000-01-01", "-0001-01-01", "+10000-01-01", "10000-01-01"] {
            let error = one(BaseType::Date, json!(refused)).unwrap_err();
            assert!(
                error.contains("year") || error.contains("not a date"),
                "{refused}: {error}"
            );
        }
        assert!(one(BaseType::Date, json!("0000-01-01"))
            .unwrap_err()
            .contains("0001 to 9999"));
        for ok in [
            "0001-01-01 00:00:00",
            "9999-12-31T23:59:59",
            "0001-01-01T00:30:00-01:00",
        ] {
            assert!(one(BaseType::DateTime, json!(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "0000-06-01 12:00:00",
            "0000-06-01T12:00:00Z",
            "0001-01-01T00:30:00+01:00",
            "9999-12-31T23:30:00-01:00",
            "+12345-01-01 00:00:00",
            "0000-01-01",
        ] {
            let error = one(BaseType::DateTime, json!(refused)).unwrap_err();
            assert!(error.contains("0001 to 9999"), "{refused}: {error}");
        }
        for ok in [
            json!(0.0),
            json!(-0.0),
            json!(1e-40),
            json!(-1.5e-45),
            json!(3.4e38),
        ] {
            assert_eq!(one(BaseType::Float, ok.clone()), Ok(ok));
        }
        for taken in [json!(3.4028235e38), json!(-3.4028235e38)] {
            assert!(one(BaseType::Float, taken.clone()).is_ok(), "{taken}");
        }
        for refused in [
            json!(1e-50),
            json!(-5e-324),
            json!(3.5e38),
            json!(3.4028236e38),
        ] {
            assert!(one(BaseType::Float, refused.clone()).is_err(), "{refused}");
        }
        assert!(one(BaseType::Float, json!(1e-50))
            .unwrap_err()
            .contains("rounds to 0"));
    }

    #[test]
    fn integers_must_be_whole_and_in_range() {
        assert_eq!(one(BaseType::Integer, json!(42)), Ok(json!(42)));
        assert_eq!(one(BaseType::Integer, json!(42.0)), Ok(json!(42)));
        assert!(one(BaseType::Integer, json!(4.5))
            .unwrap_err()
            .contains("whole"));
        assert!(one(BaseType::Integer, json!(3_000_000_000u64))
            .unwrap_err()
            .contains("range"));
        assert!(one(BaseType::Integer, json!(u64::MAX))
            .unwrap_err()
            .contains("range"));
        assert!(one(BaseType::Integer, json!("1")).is_err());
    }

    #[test]
    fn datetimes_without_offset_are_utc_and_offsets_are_applied() {
        assert_eq!(
            one(BaseType::DateTime, json!("2020-01-02 03:04:05")),
            Ok(json!("2020-01-02 03:04:05"))
        );
        assert_eq!(
            one(BaseType::DateTime, json!("2020-01-02T03:04:05+02:00")),
            Ok(json!("2020-01-02 01:04:05"))
        );
        assert_eq!(
            one(BaseType::DateTime, json!("2020-01-02T03:04:05.25Z")),
            Ok(json!("2020-01-02 03:04:05.250000"))
        );
        assert!(one(BaseType::DateTime, json!("2020-13-02 03:04:05")).is_err());
        for leap in [
            "2016-12-31T23:59:60Z",
            "2016-12-31 23:59:60",
            "2016-12-31T23:59:60.5Z",
        ] {
            let refused = one(BaseType::DateTime, json!(leap)).unwrap_err();
            assert!(refused.contains("leap second"), "{leap}: {refused}");
        }
        assert!(one(BaseType::DateTime, json!("2021-02-29T00:00:00")).is_err());
        assert!(one(BaseType::DateTime, json!("2021-02-28 24:00:00")).is_err());
        assert!(one(BaseType::DateTime, json!("2021-02-28 2a:00:00")).is_err());
        assert_eq!(
            one(BaseType::DateTime, json!("2021-02-28T23:59:59")),
            Ok(json!("2021-02-28 23:59:59"))
        );
        assert!(one(BaseType::Date, json!("2020-02-30")).is_err());
        assert_eq!(
            one(BaseType::Date, json!("2020-02-29")),
            Ok(json!("2020-02-29"))
        );
    }

    #[test]
    fn geometries_must_have_the_declared_type_and_valid_coordinates() {
        let p = json!({"type": "Point", "coordinates": [8.5, 47.3]});
        assert_eq!(one(BaseType::Point, p.clone()), Ok(p));
        assert!(one(
            BaseType::Point,
            json!({"type": "Point", "coordinates": [200, 1]})
        )
        .is_err());
        assert!(one(
            BaseType::LineString,
            json!({"type": "Point", "coordinates": [1, 1]})
        )
        .is_err());
        assert!(one(
            BaseType::LineString,
            json!({"type": "LineString", "coordinates": [[1, 1]]})
        )
        .is_err());
        let open = json!({"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,1]]]});
        assert!(one(BaseType::Polygon, open).unwrap_err().contains("closed"));
        let closed = json!({"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]]});
        assert!(one(BaseType::Polygon, closed).is_ok());
    }

    #[test]
    fn arrays_check_every_element() {
        let ty = ColumnType::Many(BaseType::Uuid);
        assert!(canonicalize(ty, &json!(["not-a-uuid"]))
            .unwrap_err()
            .contains("element 0"));
        assert!(canonicalize(ty, &json!([null])).is_err());
        assert!(canonicalize(ty, &json!("x")).is_err());
        let u = "3F2504E0-4F89-11D3-9A0C-0305E82C3301";
        assert_eq!(canonicalize(ty, &json!([u])), Ok(json!([u.to_lowercase()])));
    }
}
