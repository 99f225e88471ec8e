//! Compatibility of two blueprint versions: for each column that differs, and each direction an item
//! can travel between them, whether values survive the move (`transform`).
//!
//! Verdicts, per column and direction:
//! - `lossless`: every value the source can hold arrives (kept, or converted as the column's
//!   declared `convert` says);
//! - `lossy`: some values arrive as null;
//! - `breaking`: some items arrive with a null the target does not allow (no default): those are
//!   not in the target version (`transform::forbidden_null`), in any store.
//!
//! The verdicts are decided from the definitions alone; [`lost`] tells, for one stored value,
//! whether the move loses it, which is how the freeze report counts real items. Property tests check
//! that a `lossless` verdict never loses a generated value.

use serde::Serialize;
use serde_json::Value;

use super::check::{check_index_entry, MAX_INDEXED_TEXT_BYTES};
use super::ident::Ident;
use super::model::{Blueprints, Column, ColumnDef, Convert, Validation};
use super::transform::convert;
use super::types::{BaseType, ColumnType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Lossless,
    Lossy,
    Breaking,
}

/// A verdict and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assessment {
    pub verdict: Verdict,
    pub reason: String,
}

impl Assessment {
    fn new(verdict: Verdict, reason: impl Into<String>) -> Assessment {
        Assessment {
            verdict,
            reason: reason.into(),
        }
    }
}

/// Moving a stored value from `from` to `to`, converted once: whether it is [`lost`] and whether
/// the item is [`refused`].
/// A value that arrives too large for `to`'s index entry ([`outgrows_index`]) refuses its item
/// too: PostgreSQL's index refuses its row, so it is not in the version's table.
pub fn outcome(value: &Value, from: &ColumnDef, to: &ColumnDef) -> (bool, bool) {
    let converted = convert(from, to, value);
    let arrives_null = value.is_null() || converted.is_null();
    let outgrows = !arrives_null
        && outgrows_index(from, to).is_some()
        && check_index_entry(to, &converted).is_err();
    (
        !value.is_null() && arrives_null,
        (arrives_null && !to.nullable && to.default.is_none()) || outgrows,
    )
}

/// Whether moving a stored value from `from` to `to` loses it (it arrives as null; a declared
/// conversion that gives a value, the default included, loses nothing).
pub fn lost(value: &Value, from: &ColumnDef, to: &ColumnDef) -> bool {
    outcome(value, from, to).0
}

/// Whether an item arrives with a null where `to` allows none (it is not in that version).
pub fn refused(value: &Value, from: &ColumnDef, to: &ColumnDef) -> bool {
    outcome(value, from, to).1
}

/// Values of `from` moving to `to` (the same column, matched by uid, in two versions).
pub fn assess(from: &ColumnDef, to: &ColumnDef) -> Assessment {
    let how = to.convert.or(from.convert);
    let conversion = types(from, to, how);
    let rules = match &conversion {
        Ok(_) => rules(from, to),
        Err(_) => None,
    };
    let loss = match (conversion, rules) {
        (Err(reason), _) | (Ok(_), Some(reason)) => Some(reason),
        (Ok(_), None) => None,
    };
    // Values that do not convert take the default instead of null.
    let loss = loss.filter(|_| !(how == Some(Convert::Default) && to.default.is_some()));
    let nulls_refused = !to.nullable && to.default.is_none() && (from.nullable || loss.is_some());
    match loss {
        _ if nulls_refused => Assessment::new(
            Verdict::Breaking,
            match &loss {
                Some(reason) => format!("{reason}, and the column allows no null (no default): those items are not in the version"),
                None => "the column allows no null (no default) but the other version's allows null: items without a value are not in the version".into(),
            },
        ),
        Some(reason) if !to.nullable && to.default.is_some() => Assessment::new(
            Verdict::Lossy,
            format!("{reason}: those take the default"),
        ),
        Some(reason) => Assessment::new(Verdict::Lossy, format!("{reason}: those become null")),
        None => Assessment::new(
            Verdict::Lossless,
            match how.filter(|_| from.ty != to.ty) {
                Some(how) => format!("every value converts ({})", how.name()),
                None => "every value arrives".into(),
            },
        ),
    }
}

/// Whether `to` holds its values in index entries of at most [`MAX_INDEXED_TEXT_BYTES`] that
/// `from` did not bound: a unique JSON value, line, polygon or array is one entry whole, an
/// indexed `json[]`'s elements one each (`check::check_index_entry`, which a client's own value
/// meets on its way in; a value already stored never did). A point is small enough always. The
/// definitions alone do not say whether a stored value is that large: a freeze counts them on
/// the stored items ([`outcome`]).
pub fn outgrows_index(from: &ColumnDef, to: &ColumnDef) -> Option<String> {
    let whole = |d: &ColumnDef| {
        d.unique
            && match d.ty {
                ColumnType::One(base) => {
                    base == BaseType::Json || (base.is_geometry() && base != BaseType::Point)
                }
                ColumnType::Many(_) => true,
            }
    };
    let elements = |d: &ColumnDef| d.index && d.ty == ColumnType::Many(BaseType::Json);
    if whole(to) && !whole(from) {
        return Some(format!(
            "values over {MAX_INDEXED_TEXT_BYTES} bytes, the most a unique {} holds in its index",
            to.ty
        ));
    }
    (elements(to) && !elements(from) && !whole(from)).then(|| {
        format!("elements over {MAX_INDEXED_TEXT_BYTES} bytes, the most an indexed json[] holds in its index")
    })
}

/// Items moving to a version whose column the source version does not have.
pub fn assess_absent(to: &ColumnDef) -> Assessment {
    if to.default.is_some() {
        Assessment::new(Verdict::Lossless, "items without it take the default")
    } else if to.nullable {
        Assessment::new(Verdict::Lossless, "items without it read null")
    } else {
        Assessment::new(
            Verdict::Breaking,
            "the column allows no null and has no default: items without it are not in the version",
        )
    }
}

/// Whether the type conversion keeps every value: `Ok(description)` or `Err(what is lost)`.
fn types(from: &ColumnDef, to: &ColumnDef, how: Option<Convert>) -> Result<(), String> {
    use ColumnType::*;
    if from.ty == to.ty {
        return Ok(());
    }
    let (a, b) = (from.ty.base(), to.ty.base());
    match (from.ty, to.ty) {
        (Many(_), One(_)) => Err(format!(
            "a {} holding other than exactly one element has no {}",
            from.ty, to.ty
        )),
        _ => scalar(a, b, from, how),
    }
}

fn scalar(a: BaseType, b: BaseType, from: &ColumnDef, how: Option<Convert>) -> Result<(), String> {
    use BaseType::*;
    if a == b {
        return Ok(());
    }
    // An enum of the source says exactly which values there are.
    if let Some(allowed) = &from.validation.one_of {
        let to = ColumnDef::of_type(ColumnType::One(b));
        let mut source = ColumnDef::of_type(ColumnType::One(a));
        source.convert = how;
        let mut target = to;
        target.convert = how;
        return match allowed
            .iter()
            .find(|v| convert(&source, &target, v).is_null())
        {
            None => Ok(()),
            Some(v) => Err(format!("the allowed value {v} has no {} form", b.name())),
        };
    }
    match (a, b) {
        (_, String | Text | Json) | (Integer, Float) | (Date, DateTime) => Ok(()),
        (Float, Integer) if matches!(how, Some(Convert::Round | Convert::Truncate)) => {
            within_integers(&from.validation).map_err(|_| "floats beyond the integer range".into())
        }
        (Float, Integer) => Err("floats with a fraction or beyond the integer range".into()),
        (DateTime, Date) if matches!(how, Some(Convert::Round | Convert::Truncate)) => Ok(()),
        (DateTime, Date) => Err("datetimes other than midnight".into()),
        (String | Text, _) => Err(format!("texts that do not read as {}", b.name())),
        (Json, _) => Err(format!("JSON values that are not {}", b.name())),
        _ => Err(format!("{} values have no {} form", a.name(), b.name())),
    }
}

/// Whether a float column's own bounds keep it within the integer range.
fn within_integers(rules: &Validation) -> Result<(), ()> {
    let (min, max) = (rules.min.ok_or(())?, rules.max.ok_or(())?);
    (min >= f64::from(i32::MIN) && max <= f64::from(i32::MAX))
        .then_some(())
        .ok_or(())
}

/// What the target's rules refuse that the source's allow: `Some(what)` or `None`.
fn rules(from: &ColumnDef, to: &ColumnDef) -> Option<String> {
    let (f, t) = (&from.validation, &to.validation);
    // `string` and `text` hold the same values: one's rules speak for the other's.
    let (a, b) = (from.ty.base(), to.ty.base());
    let same_kind = a == b || (a.is_textual() && b.is_textual());
    let tighter_min = |a: Option<f64>, b: Option<f64>| b.is_some_and(|b| a.is_none_or(|a| a < b));
    let tighter_max = |a: Option<f64>, b: Option<f64>| b.is_some_and(|b| a.is_none_or(|a| a > b));
    if tighter_min(f.min.filter(|_| same_kind), t.min) {
        return Some(format!(
            "values below the new minimum {}",
            t.min.unwrap_or_default()
        ));
    }
    if tighter_max(f.max.filter(|_| same_kind), t.max) {
        return Some(format!(
            "values above the new maximum {}",
            t.max.unwrap_or_default()
        ));
    }
    let as_f = |n: Option<u64>| n.map(|n| n as f64);
    if tighter_min(as_f(f.min_length).filter(|_| same_kind), as_f(t.min_length)) {
        return Some("texts shorter than the new min_length".into());
    }
    let cut = to.convert.or(from.convert) == Some(Convert::Truncate);
    if tighter_max(as_f(f.max_length).filter(|_| same_kind), as_f(t.max_length)) {
        if !cut {
            return Some("texts longer than the new max_length".into());
        }
        // A text cut to fit is checked again: one that no longer matches the pattern, or is no
        // value of the enum, arrives as null.
        if t.pattern.is_some() || t.one_of.is_some() {
            return Some(
                "texts longer than the new max_length, which cut to fit may no longer match its \
                 pattern or enum"
                    .into(),
            );
        }
    }
    if t.pattern.is_some() && (f.pattern != t.pattern || !same_kind) {
        return Some("texts that do not match the new pattern".into());
    }
    // An indexed or unique text holds at most MAX_INDEXED_TEXT_BYTES (`check_rules`): a column
    // becoming one loses longer texts, unless its characters were few enough to fit already.
    // Numbers, dates, uuids and booleans become short texts; JSON and geometries may not.
    // A `truncate` to a max_length that short cuts every text to fit.
    let indexed = |d: &ColumnDef| (d.index || d.unique) && d.ty.base().is_textual();
    let fits = |max: Option<u64>| {
        max.is_some_and(|max| max.saturating_mul(4) <= MAX_INDEXED_TEXT_BYTES as u64)
    };
    let long = !(cut && fits(t.max_length))
        && match from.ty.base() {
            base if base.is_textual() => !fits(f.max_length),
            base => base == BaseType::Json || base.is_geometry(),
        };
    if indexed(to) && !indexed(from) && long {
        return Some(format!(
            "texts over {MAX_INDEXED_TEXT_BYTES} bytes, the most an indexed or unique column holds"
        ));
    }
    if let Some(allowed) = &t.one_of {
        let kept = f.one_of.as_ref().filter(|_| same_kind).is_some_and(|old| {
            old.iter().all(|v| {
                allowed.iter().any(|a| match (a.as_f64(), v.as_f64()) {
                    (Some(x), Some(y)) => x == y,
                    _ => a == v,
                })
            })
        });
        if !kept {
            return Some("values outside the new enum".into());
        }
    }
    None
}

/// Whether values of column `from` may arrive in column `to` holding one value where they held
/// several: `Some(how)`. A conversion that cuts, rounds or falls back to the default does, once it
/// has values to convert (the type or the rules differ); so does a text read as a number, a
/// boolean or a date (`01` and `1`), a whole number kept as a float, and a null that takes the
/// default of a column that allows none.
fn merges(from: &ColumnDef, to: &ColumnDef) -> Option<&'static str> {
    let how = to.convert.or(from.convert);
    let (a, b) = (from.ty.base(), to.ty.base());
    // Each conversion only where it has values to change: a whole number or a day cut from a
    // float or a datetime, a text cut to a shorter max_length, a value with no form taking the
    // default.
    let narrows = matches!(
        (a, b),
        (BaseType::Float, BaseType::Integer) | (BaseType::DateTime, BaseType::Date)
    );
    let shortens = b.is_textual()
        && to.validation.max_length.is_some_and(|max| {
            !a.is_textual() || from.validation.max_length.is_none_or(|f| f > max)
        });
    let converted = match how {
        Some(Convert::Truncate) => narrows || shortens,
        Some(Convert::Round) => narrows,
        Some(Convert::Default) => types(from, to, how).is_err() || rules(from, to).is_some(),
        _ => false,
    };
    if converted {
        return Some("its values are cut, rounded or replaced by the default on the way");
    }
    if a.is_textual() && !b.is_textual() {
        return Some("texts are read as other values on the way");
    }
    // `"5"` and `5`, `"true"` and `true`, two spellings of one uuid or instant: JSON keeps them
    // apart, a column of another type holds them as one value.
    if a == BaseType::Json && b != BaseType::Json {
        return Some("JSON values of different kinds are read as one value on the way");
    }
    if a == BaseType::Integer && b == BaseType::Float {
        return Some("whole numbers become floats on the way");
    }
    if from.nullable && !to.nullable && to.default.is_some() {
        return Some("nulls take its default on the way");
    }
    None
}

/// One column as it is in two versions (matched by uid): either side may lack it.
#[derive(Clone, Debug)]
pub struct ColumnPair<'a> {
    pub blueprint: &'a Ident,
    pub old: Option<(&'a Ident, &'a Column)>,
    pub new: Option<(&'a Ident, &'a Column)>,
}

impl ColumnPair<'_> {
    /// Items of the old version read by clients of the new one.
    pub fn to_new(&self) -> Assessment {
        match (self.old, self.new) {
            (Some((_, old)), Some((_, new))) => assess(&old.def, &new.def),
            (None, Some((_, new))) => assess_absent(&new.def),
            (_, None) => Assessment::new(Verdict::Lossless, "the new version has no such column"),
        }
    }

    /// Items of the new version read by clients of the old one. A column unique in the old version
    /// and not in the new one lets new clients write a value another item holds, which the old
    /// version's unique index (PostgreSQL) refuses: those items are not in its store.
    pub fn to_old(&self) -> Assessment {
        match (self.old, self.new) {
            (Some((_, old)), Some((_, new))) if old.def.unique && !new.def.unique => {
                let assessed = assess(&new.def, &old.def);
                Assessment::new(
                    Verdict::Breaking,
                    format!(
                        "{}; the column is unique in the old version and not in the new one: an \
                         item new clients write with a value another item holds is refused by the \
                         old version's unique index (PostgreSQL; dead letters)",
                        assessed.reason
                    ),
                )
            }
            (Some((_, old)), Some((_, new))) if old.def.unique => {
                let assessed = assess(&new.def, &old.def);
                match merges(&new.def, &old.def) {
                    Some(how) => Assessment::new(
                        Verdict::Breaking,
                        format!(
                            "{}; the column is unique in the old version, and {how}: items new \
                             clients write with distinct values may arrive there holding one, \
                             which the old version's unique index (PostgreSQL) refuses (dead \
                             letters)",
                            assessed.reason
                        ),
                    ),
                    None => assessed,
                }
            }
            (Some((_, old)), Some((_, new))) => assess(&new.def, &old.def),
            (Some((_, old)), None) if old.def.unique && old.def.default.is_some() => {
                Assessment::new(
                    Verdict::Breaking,
                    "the column is unique in the old version and the new one has none: every \
                     item new clients write arrives there holding its default, which the old \
                     version's unique index (PostgreSQL) refuses for all but one (dead letters)",
                )
            }
            (Some((_, old)), None) => assess_absent(&old.def),
            (None, _) => Assessment::new(Verdict::Lossless, "the old version has no such column"),
        }
    }

    /// Whether the new version's unique index of this column could meet two stored items holding
    /// one value where the old version's indexes never did: the column is new and unique, becomes
    /// unique, or is unique and changes how values arrive in it (type, conversion, default,
    /// nullability or rules). Only then does the freeze report count the items it would refuse.
    pub fn uniqueness_at_stake(&self) -> bool {
        match (self.old, self.new) {
            (_, None) => false,
            (_, Some((_, new))) if !new.def.unique => false,
            (None, Some(_)) => true,
            (Some((_, old)), Some((_, new))) => {
                let (old, new) = (&old.def, &new.def);
                !old.unique
                    || old.ty != new.ty
                    || old.convert != new.convert
                    || old.default != new.default
                    || old.nullable != new.nullable
                    || old.validation != new.validation
            }
        }
    }

    /// What differs, in words: `type float → integer`, `renamed from title`, `added`.
    pub fn describe(&self) -> String {
        match (self.old, self.new) {
            (None, Some(_)) => "added".into(),
            (Some(_), None) => "removed".into(),
            (Some((old_name, old)), Some((new_name, new))) => {
                let mut parts = Vec::new();
                if old_name != new_name {
                    parts.push(format!("renamed from {old_name}"));
                }
                for ((option, a), (_, b)) in old.def.options().into_iter().zip(new.def.options()) {
                    if a != b {
                        parts.push(format!("{option} {a} → {b}"));
                    }
                }
                parts.join("; ")
            }
            (None, None) => String::new(),
        }
    }
}

/// Every column of a blueprint present in both versions that differs between them, or is only in
/// one of them.
pub fn changed_columns<'a>(old: &'a Blueprints, new: &'a Blueprints) -> Vec<ColumnPair<'a>> {
    let mut pairs = Vec::new();
    for (name, bp) in new {
        let Some(before) = old.values().find(|b| b.uid == bp.uid) else {
            continue;
        };
        for (old_name, column) in &before.columns {
            match bp.column_by_uid(column.uid) {
                Some((new_name, new)) if new_name != old_name || new.def != column.def => pairs
                    .push(ColumnPair {
                        blueprint: name,
                        old: Some((old_name, column)),
                        new: Some((new_name, new)),
                    }),
                Some(_) => {}
                None => pairs.push(ColumnPair {
                    blueprint: name,
                    old: Some((old_name, column)),
                    new: None,
                }),
            }
        }
        for (new_name, column) in &bp.columns {
            if before.column_by_uid(column.uid).is_none() {
                pairs.push(ColumnPair {
                    blueprint: name,
                    old: None,
                    new: Some((new_name, column)),
                });
            }
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(ty: &str) -> ColumnDef {
        ColumnDef::of_type(ty.parse().unwrap())
    }

    fn unique(mut def: ColumnDef) -> ColumnDef {
        def.unique = true;
        def
    }

    /// Uniqueness is at stake when the new side is unique and the old side's index did not hold
    /// the same values: not unique, absent, or arriving otherwise.
    #[test]
    fn uniqueness_is_at_stake_only_where_a_unique_index_meets_new_values() {
        let name = Ident::parse("code").unwrap();
        let column = |def: ColumnDef| Column { uid: 1, def };
        let at_stake = |old: Option<ColumnDef>, new: Option<ColumnDef>| {
            let (old, new) = (old.map(column), new.map(column));
            ColumnPair {
                blueprint: &name,
                old: old.as_ref().map(|c| (&name, c)),
                new: new.as_ref().map(|c| (&name, c)),
            }
            .uniqueness_at_stake()
        };
        let text = || def("string");
        assert!(at_stake(Some(text()), Some(unique(text()))));
        assert!(at_stake(None, Some(unique(text()))));
        assert!(at_stake(Some(unique(def("float"))), Some(unique(text()))));
        let mut defaulted = unique(text());
        defaulted.default = Some(json!("x"));
        assert!(at_stake(Some(unique(text())), Some(defaulted)));
        let mut commented = unique(text());
        commented.comment = Some("the coupon's code".into());
        assert!(!at_stake(Some(unique(text())), Some(commented)));
        assert!(!at_stake(Some(unique(text())), Some(text())));
        assert!(!at_stake(Some(unique(text())), None));
    }

    /// A JSON value, polygon or array made unique is one index entry of at most 2000 bytes, and an
    /// indexed json[]'s elements one each: stored values were never held to it, so a stored value
    /// larger refuses its item in the new version (PostgreSQL's index would); a smaller one
    /// arrives.
    #[test]
    fn a_whole_value_made_unique_or_a_json_array_made_indexed_refuses_what_outgrows_it() {
        let unique = |ty: &str| unique(def(ty));
        let big = json!({"k": "x".repeat(3000)});
        assert_eq!(outcome(&big, &def("json"), &unique("json")), (false, true));
        assert_eq!(
            outcome(&json!({"k": 1}), &def("json"), &unique("json")),
            (false, false)
        );
        assert_eq!(
            outcome(&big, &unique("json"), &unique("json")),
            (false, false)
        );
        let many = json!(["y".repeat(1500), "z".repeat(1500)]);
        assert_eq!(
            outcome(&many, &def("string[]"), &unique("string[]")),
            (false, true)
        );
        for ty in ["json", "polygon", "string[]", "point[]"] {
            assert!(outgrows_index(&def(ty), &unique(ty)).is_some(), "{ty}");
            assert!(outgrows_index(&unique(ty), &unique(ty)).is_none(), "{ty}");
        }
        assert!(outgrows_index(&def("point"), &unique("point")).is_none());
        let mut indexed = def("json[]");
        indexed.index = true;
        assert_eq!(
            outcome(&json!([big]), &def("json[]"), &indexed),
            (false, true)
        );
        assert!(outgrows_index(&unique("json[]"), &indexed).is_none());
    }

    /// A column unique in the old version that new clients' values reach through a conversion
    /// merging several into one is breaking for old clients: its unique index refuses the second.
    #[test]
    fn old_clients_unique_index_meeting_merged_values_is_breaking() {
        let name = Ident::parse("code").unwrap();
        let column = |def: ColumnDef| Column { uid: 1, def };
        let to_old = |old: ColumnDef, new: Option<ColumnDef>| {
            let (old, new) = (column(old), new.map(column));
            ColumnPair {
                blueprint: &name,
                old: Some((&name, &old)),
                new: new.as_ref().map(|c| (&name, c)),
            }
            .to_old()
            .verdict
        };
        let mut short = unique(def("string"));
        short.validation.max_length = Some(8);
        let mut wider = unique(def("string"));
        wider.validation.max_length = Some(16);
        wider.convert = Some(Convert::Truncate);
        assert_eq!(to_old(short.clone(), Some(wider)), Verdict::Breaking);
        // Without the cut, longer codes arrive as null, which a unique index takes any number of.
        let mut uncut = unique(def("string"));
        uncut.validation.max_length = Some(16);
        assert_eq!(to_old(short.clone(), Some(uncut)), Verdict::Lossy);
        assert_eq!(
            to_old(unique(def("integer")), Some(unique(def("string")))),
            Verdict::Breaking,
            "01 and 1"
        );
        for old in ["string", "uuid", "datetime", "float"] {
            assert_eq!(
                to_old(unique(def(old)), Some(unique(def("json")))),
                Verdict::Breaking,
                "\"5\" and 5 into {old}"
            );
        }
        assert_eq!(
            to_old(unique(def("string")), Some(unique(def("integer")))),
            Verdict::Lossless
        );
        // A cut that has nothing to cut: the new column's texts fit the old one's length.
        let mut narrower = unique(def("string"));
        narrower.validation.max_length = Some(4);
        narrower.convert = Some(Convert::Truncate);
        assert_eq!(to_old(short.clone(), Some(narrower)), Verdict::Lossless);
        let mut defaulted = short.clone();
        defaulted.default = Some(json!("none"));
        assert_eq!(to_old(defaulted, None), Verdict::Breaking);
        assert_eq!(to_old(short.clone(), Some(short)), Verdict::Lossless);
    }

    /// An indexed or unique text holds 2000 bytes: a text column becoming one is lossy, unless its
    /// texts were 500 characters at most or are cut to that many.
    #[test]
    fn a_text_column_becoming_indexed_is_lossy_unless_its_texts_fit() {
        let mut indexed = def("text");
        indexed.index = true;
        assert_eq!(assess(&def("text"), &indexed).verdict, Verdict::Lossy);
        assert_eq!(assess(&def("integer"), &indexed).verdict, Verdict::Lossless);
        let mut short = def("text");
        short.validation.max_length = Some(500);
        assert_eq!(assess(&short, &indexed).verdict, Verdict::Lossless);
        let mut cut = indexed.clone();
        cut.validation.max_length = Some(100);
        cut.convert = Some(Convert::Truncate);
        assert_eq!(assess(&def("text"), &cut).verdict, Verdict::Lossless);
        cut.validation.max_length = Some(501);
        assert_eq!(assess(&def("text"), &cut).verdict, Verdict::Lossy);
    }

    /// A text cut to a new max_length is checked against the column's pattern and enum again, and
    /// arrives as null where it fails them: not lossless, though the rules themselves are unchanged.
    #[test]
    fn a_cut_to_a_new_max_length_is_lossless_only_without_a_pattern_or_enum() {
        let mut email = def("string");
        email.validation.pattern =
            Some(crate::blueprint::Pattern::compile("^[^@]+@[^@]+[.][a-z]+$").unwrap());
        let mut cut = email.clone();
        cut.validation.max_length = Some(16);
        cut.convert = Some(Convert::Truncate);
        assert_eq!(assess(&email, &cut).verdict, Verdict::Lossy);
        let mut plain = def("string");
        plain.validation.max_length = Some(16);
        plain.convert = Some(Convert::Truncate);
        assert_eq!(assess(&def("string"), &plain).verdict, Verdict::Lossless);
    }

    /// `string` and `text` hold the same values: the same rules on both lose nothing.
    #[test]
    fn string_and_text_with_the_same_rules_lose_nothing() {
        let mut string = def("string");
        string.validation.max_length = Some(100);
        let mut text = def("text");
        text.validation.max_length = Some(100);
        assert_eq!(assess(&string, &text).verdict, Verdict::Lossless);
        assert_eq!(assess(&text, &string).verdict, Verdict::Lossless);
        text.validation.max_length = Some(50);
        assert_eq!(assess(&string, &text).verdict, Verdict::Lossy);
    }

    #[test]
    fn verdicts_follow_the_type_table_and_declared_conversions() {
        assert_eq!(
            assess(&def("integer"), &def("float")).verdict,
            Verdict::Lossless
        );
        assert_eq!(
            assess(&def("float"), &def("integer")).verdict,
            Verdict::Lossy
        );
        let mut rounded = def("integer");
        rounded.convert = Some(Convert::Round);
        let mut bounded = def("float");
        bounded.validation.min = Some(-1000.0);
        bounded.validation.max = Some(1000.0);
        assert_eq!(assess(&bounded, &rounded).verdict, Verdict::Lossless);
        assert_eq!(assess(&def("float"), &rounded).verdict, Verdict::Lossy);
        assert_eq!(
            assess(&def("text"), &def("integer")).verdict,
            Verdict::Lossy
        );
        assert_eq!(
            assess(&def("point"), &def("polygon")).verdict,
            Verdict::Lossy
        );
        let mut required = def("integer");
        required.nullable = false;
        assert_eq!(
            assess(&def("integer"), &required).verdict,
            Verdict::Breaking
        );
        assert_eq!(assess_absent(&required).verdict, Verdict::Breaking);
        assert_eq!(assess_absent(&def("text")).verdict, Verdict::Lossless);
    }

    #[test]
    fn counting_uses_the_transform_itself() {
        let (from, to) = (def("float"), def("integer"));
        assert!(lost(&json!(3.5), &from, &to));
        assert!(!lost(&json!(3.0), &from, &to));
        assert!(!lost(&Value::Null, &from, &to));
        let mut defaulted = def("integer");
        defaulted.convert = Some(Convert::Default);
        defaulted.default = Some(json!(0));
        assert!(!lost(&json!(3.5), &from, &defaulted));
        assert_eq!(assess(&from, &defaulted).verdict, Verdict::Lossless);
    }
}
