//! Property tests of the differ and the transformer.

use indexmap::IndexMap;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::check::check_item;
use super::diff::{apply_edit, diff, Change};
use super::model::{Blueprint, Blueprints, Column, ColumnDef};
use super::parse::parse_blueprint;
use super::transform::transform;
use super::types::{BaseType, ColumnType};
use super::Ident;

fn base_type() -> impl Strategy<Value = BaseType> {
    proptest::sample::select(BaseType::ALL.to_vec())
}

fn column_type() -> impl Strategy<Value = ColumnType> {
    (base_type(), any::<bool>()).prop_map(|(b, many)| {
        if many {
            ColumnType::Many(b)
        } else {
            ColumnType::One(b)
        }
    })
}

fn position() -> impl Strategy<Value = Value> {
    (-179i32..=179, -90i32..=90, 0u8..4)
        .prop_map(|(x, y, q)| json!([x as f64 + q as f64 / 4.0 * 0.5, y as f64 * 0.5]))
}

fn scalar(base: BaseType) -> BoxedStrategy<Value> {
    match base {
        BaseType::Uuid => any::<u128>()
            .prop_map(|n| json!(Uuid::from_u128(n)))
            .boxed(),
        BaseType::String | BaseType::Text => "[a-z ]{0,12}".prop_map(Value::from).boxed(),
        BaseType::Point => position()
            .prop_map(|p| json!({"type": "Point", "coordinates": p}))
            .boxed(),
        // Distinct positions, so every generated line is valid.
        BaseType::LineString => (-179i32..=170, -80i32..=80, 2usize..4)
            .prop_map(|(x, y, n)| {
                let ps: Vec<Value> = (0..n)
                    .map(|i| json!([x as f64 + i as f64, y as f64]))
                    .collect();
                json!({"type": "LineString", "coordinates": ps})
            })
            .boxed(),
        // Rectangles and triangles: simple rings, so every generated polygon is valid.
        BaseType::Polygon => (-179i32..=170, -80i32..=80, 1u8..=4, any::<bool>())
            .prop_map(|(x, y, size, triangle)| {
                let (x, y, d) = (x as f64, y as f64, size as f64 * 0.5);
                let mut ring = vec![json!([x, y]), json!([x + d, y]), json!([x + d, y + d])];
                if !triangle {
                    ring.push(json!([x, y + d]));
                }
                ring.push(json!([x, y]));
                json!({"type": "Polygon", "coordinates": [ring]})
            })
            .boxed(),
        BaseType::Date => (0i64..80_000)
            .prop_map(|d| {
                let date = chrono::NaiveDate::from_ymd_opt(1900, 1, 1).unwrap()
                    + chrono::Duration::days(d);
                json!(date.format("%Y-%m-%d").to_string())
            })
            .boxed(),
        BaseType::DateTime => (0i64..4_000_000_000)
            .prop_map(|s| {
                json!(chrono::DateTime::from_timestamp(s, 0)
                    .unwrap()
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string())
            })
            .boxed(),
        BaseType::Float => (-1.0e6f64..1.0e6).prop_map(|f| json!(f)).boxed(),
        BaseType::Integer => any::<i32>().prop_map(Value::from).boxed(),
        BaseType::Boolean => any::<bool>().prop_map(Value::from).boxed(),
        BaseType::Json => ("[a-z]{1,5}", any::<i16>())
            .prop_map(|(k, v)| json!({ k: [v, null, "x"] }))
            .boxed(),
    }
}

fn value(ty: ColumnType) -> BoxedStrategy<Value> {
    match ty {
        ColumnType::One(b) => prop_oneof![1 => Just(Value::Null), 4 => scalar(b)].boxed(),
        ColumnType::Many(b) => proptest::collection::vec(scalar(b), 0..3)
            .prop_map(Value::Array)
            .boxed(),
    }
}

fn ident(name: &str) -> Ident {
    Ident::parse(name).unwrap()
}

/// A blueprint with `n` columns named `c0…`, uids 1…n.
fn blueprint(types: &[ColumnType]) -> Blueprint {
    let columns = types
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            (
                ident(&format!("c{i}")),
                Column {
                    uid: i as u64 + 1,
                    def: ColumnDef::of_type(*ty),
                },
            )
        })
        .collect();
    Blueprint {
        uid: 100,
        table: ident("t"),
        es_type: ident("t"),
        columns,
    }
}

/// What happens to each column of A in B.
#[derive(Clone, Debug)]
enum Fate {
    Keep,
    Rename,
    Remove,
    ToText,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        Just(Fate::Keep),
        Just(Fate::Rename),
        Just(Fate::Remove),
        Just(Fate::ToText)
    ]
}

/// B derived from A: columns renamed, removed or turned into text, plus `added` new columns.
fn evolve(a: &Blueprint, fates: &[Fate], added: &[ColumnType]) -> Blueprint {
    let mut columns = IndexMap::new();
    for ((name, column), fate) in a.columns.iter().zip(fates) {
        let mut column = column.clone();
        let name = match fate {
            Fate::Keep => name.clone(),
            Fate::Rename => ident(&format!("r{}", column.uid)),
            Fate::Remove => continue,
            Fate::ToText => {
                if let ColumnType::One(b) = column.def.ty {
                    if b != BaseType::Json {
                        column.def.ty = ColumnType::One(BaseType::Text);
                    }
                }
                name.clone()
            }
        };
        columns.insert(name, column);
    }
    for (i, ty) in added.iter().enumerate() {
        columns.insert(
            ident(&format!("n{i}")),
            Column {
                uid: 1000 + i as u64,
                def: ColumnDef::of_type(*ty),
            },
        );
    }
    Blueprint {
        columns,
        ..a.clone()
    }
}

fn scenario() -> impl Strategy<Value = (Blueprint, Blueprint, Map<String, Value>)> {
    proptest::collection::vec(column_type(), 1..8)
        .prop_flat_map(|types| {
            let values: Vec<BoxedStrategy<Value>> = types.iter().map(|t| value(*t)).collect();
            let n = types.len();
            (
                Just(types),
                values,
                proptest::collection::vec(fate(), n),
                proptest::collection::vec(column_type(), 0..3),
            )
        })
        .prop_map(|(types, values, fates, added)| {
            let a = blueprint(&types);
            let b = evolve(&a, &fates, &added);
            let body: Map<String, Value> = a
                .columns
                .keys()
                .zip(values)
                .map(|(name, v)| (name.to_string(), v))
                .collect();
            let item = check_item(&a, 1, Uuid::nil(), &body)
                .expect("generated items are valid")
                .into_map();
            (a, b, item)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn going_to_a_version_and_back_keeps_every_shared_column((a, b, item) in scenario()) {
        let there = transform(&item, &a, &b, 2);
        let back = transform(&there, &b, &a, 1);
        for (name, column) in &a.columns {
            if b.column_by_uid(column.uid).is_some() {
                prop_assert_eq!(&back[name.as_str()], &item[name.as_str()], "column {} lost on the way", name);
            }
        }
        // The target version's view holds exactly its columns plus the item keys.
        prop_assert_eq!(there.len(), b.columns.len() + 3);
    }

    #[test]
    fn diff_in_one_direction_mirrors_the_other((a, b, _item) in scenario()) {
        let (sa, sb): (Blueprints, Blueprints) = ([(ident("x"), a)].into(), [(ident("x"), b)].into());
        let forward = diff(&sa, &sb);
        let backward = diff(&sb, &sa);
        let count = |changes: &[Change], kind: &str| changes.iter().filter(|c| serde_json::to_value(c).unwrap()["kind"] == kind).count();
        prop_assert_eq!(count(&forward, "column.create"), count(&backward, "column.remove"));
        prop_assert_eq!(count(&forward, "column.remove"), count(&backward, "column.create"));
        prop_assert_eq!(count(&forward, "column.rename"), count(&backward, "column.rename"));
        prop_assert_eq!(count(&forward, "column.update"), count(&backward, "column.update"));
        prop_assert!(diff(&sa, &sa).is_empty());
    }

    #[test]
    fn resending_the_public_form_changes_nothing((a, b, _item) in scenario()) {
        for bp in [a, b] {
            let input = parse_blueprint(&bp.to_public(), "").expect("the public form parses");
            let mut uids = 5000u64;
            let edited = apply_edit(Some(&bp), input, &mut uids, "").expect("a re-send applies");
            prop_assert_eq!(&edited, &bp);
        }
    }
}

#[test]
fn a_rename_plus_a_type_change_is_two_changes() {
    let a = blueprint(&[ColumnType::One(BaseType::Integer)]);
    let mut b = a.clone();
    let (_, mut column) = b.columns.shift_remove_entry(&ident("c0")).unwrap();
    column.def.ty = ColumnType::One(BaseType::Float);
    b.columns.insert(ident("renamed"), column);
    let changes = diff(&[(ident("x"), a)].into(), &[(ident("x"), b)].into());
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(matches!(&changes[0], Change::ColumnRename { to, .. } if to.as_str() == "renamed"));
    assert!(matches!(&changes[1], Change::ColumnUpdate { option, .. } if option == "type"));
}

#[test]
fn lossy_type_changes_become_null_and_lossless_ones_convert() {
    use super::transform::convert;
    let def = |t: &str| ColumnDef::of_type(t.parse().unwrap());
    assert_eq!(convert(&def("integer"), &def("float"), &json!(3)), json!(3));
    assert_eq!(
        convert(&def("float"), &def("integer"), &json!(3.5)),
        Value::Null
    );
    assert_eq!(
        convert(&def("float"), &def("integer"), &json!(3.0)),
        json!(3)
    );
    assert_eq!(
        convert(&def("date"), &def("datetime"), &json!("2020-01-02")),
        json!("2020-01-02 00:00:00")
    );
    assert_eq!(
        convert(
            &def("datetime"),
            &def("date"),
            &json!("2020-01-02 10:00:00")
        ),
        Value::Null
    );
    assert_eq!(
        convert(&def("integer"), &def("string"), &json!(7)),
        json!("7")
    );
    assert_eq!(
        convert(&def("string"), &def("integer"), &json!("x7")),
        Value::Null
    );
    assert_eq!(
        convert(&def("uuid"), &def("uuid[]"), &json!(Uuid::nil())),
        json!([Uuid::nil()])
    );
    assert_eq!(
        convert(&def("boolean"), &def("point"), &json!(true)),
        Value::Null
    );
}

/// A null arriving at a column that allows none takes the column's default, as the report counts
/// on (a value that was null, one the conversion could not keep, either direction).
#[test]
fn a_null_arriving_at_a_column_that_allows_no_null_takes_its_default() {
    use super::compat::{assess, refused, Verdict};
    let ty = |t: &str| t.parse::<ColumnType>().unwrap();
    let nullable = blueprint(&[ty("integer")]);
    let mut strict = blueprint(&[ty("integer")]);
    strict.columns[0].def.nullable = false;
    strict.columns[0].def.default = Some(json!(7));
    let item = |v: Value| {
        let mut item = Map::new();
        item.insert("c0".into(), v);
        item
    };
    for (from, to) in [(&nullable, &strict), (&strict, &nullable)] {
        let (from_def, to_def) = (&from.columns[0].def, &to.columns[0].def);
        assert_eq!(assess(from_def, to_def).verdict, Verdict::Lossless);
        assert!(!refused(&Value::Null, from_def, to_def));
    }
    assert_eq!(
        transform(&item(Value::Null), &nullable, &strict, 2)["c0"],
        json!(7)
    );
    assert_eq!(
        transform(&item(json!(3)), &nullable, &strict, 2)["c0"],
        json!(3)
    );
    // Into a column that allows null, a null stays one.
    assert_eq!(
        transform(&item(Value::Null), &strict, &nullable, 2)["c0"],
        Value::Null
    );
    // A value that does not convert, into a float column made integer that allows no null.
    let floats = blueprint(&[ty("float")]);
    assert_eq!(
        transform(&item(json!(2.5)), &floats, &strict, 2)["c0"],
        json!(7)
    );
}

/// Without a default, a null arriving where the column allows none is named by `forbidden_null`,
/// exactly when the report counts the item as refused: such an item is not in that version.
#[test]
fn a_forbidden_null_is_named_exactly_when_the_report_counts_the_item_refused() {
    use super::compat::refused;
    use super::transform::forbidden_null;
    let ty = |t: &str| t.parse::<ColumnType>().unwrap();
    let floats = blueprint(&[ty("float")]);
    let mut strict = blueprint(&[ty("integer")]);
    strict.columns[0].def.nullable = false;
    let item = |v: Value| {
        let mut item = Map::new();
        item.insert("c0".into(), v);
        item
    };
    for (value, named) in [(json!(3.0), false), (json!(2.5), true), (Value::Null, true)] {
        let moved = transform(&item(value.clone()), &floats, &strict, 2);
        let refused = refused(&value, &floats.columns[0].def, &strict.columns[0].def);
        assert_eq!(refused, named, "{value}");
        assert_eq!(
            forbidden_null(&strict, &moved),
            named.then_some("c0"),
            "{value}"
        );
    }
    // A column the item's version does not have at all, allowing no null and without a default.
    let mut added = strict.clone();
    added.columns[0].uid = strict.columns[0].uid + 1;
    let moved = transform(&item(json!(3)), &strict, &added, 2);
    assert_eq!(forbidden_null(&added, &moved), Some("c0"));
    assert_eq!(forbidden_null(&strict, &item(json!(3))), None);
}

/// A text moved into a json column that is JSON is read as it (as versions frozen before read
/// it), others stay strings, and so does `null`, which would arrive as no value: nothing is lost.
/// The last day there is rounds to itself.
#[test]
fn texts_moved_into_json_are_read_as_json_never_as_null_and_the_last_day_rounds_to_itself() {
    use super::model::Convert;
    use super::transform::convert;
    let def = |t: &str| ColumnDef::of_type(t.parse().unwrap());
    for (text, json) in [
        ("[1, 2]", json!([1, 2])),
        ("true", json!(true)),
        ("{\"a\": 1}", json!({"a": 1})),
        ("null", json!("null")),
        ("007", json!("007")),
        ("not json", json!("not json")),
    ] {
        assert_eq!(
            convert(&def("string"), &def("json"), &json!(text)),
            json,
            "{text}"
        );
        assert_eq!(
            convert(&def("text"), &def("json"), &json!(text)),
            json,
            "{text}"
        );
    }
    let mut round = def("date");
    round.convert = Some(Convert::Round);
    assert_eq!(
        convert(&def("datetime"), &round, &json!("9999-12-31 23:59:59")),
        json!("9999-12-31")
    );
    assert_eq!(
        convert(&def("datetime"), &round, &json!("2020-01-02 12:00:00")),
        json!("2020-01-03")
    );
}

fn convert_option() -> impl Strategy<Value = Option<super::model::Convert>> {
    use super::model::Convert;
    prop_oneof![
        3 => Just(None),
        1 => proptest::sample::select(Convert::ALL.to_vec()).prop_map(Some),
    ]
}

/// A column of type `a` becomes a column of type `b` (the same uid), perhaps with a declared
/// conversion, with values for either side.
#[allow(clippy::type_complexity)]
fn retyped() -> impl Strategy<
    Value = (
        ColumnType,
        ColumnType,
        Option<super::model::Convert>,
        Vec<Value>,
        Vec<Value>,
    ),
> {
    (column_type(), column_type(), convert_option()).prop_flat_map(|(a, b, how)| {
        (
            Just(a),
            Just(b),
            Just(how),
            proptest::collection::vec(value(a), 1..6),
            proptest::collection::vec(value(b), 1..6),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Over every pair of column types (and declared conversions): what the report calls lossless
    /// never loses a value in the transform, in either direction, and what it counts as lost is
    /// exactly what the transform of a whole item turns into null.
    #[test]
    fn lossless_verdicts_never_lose_a_value_and_counted_losses_are_real(
        (a, b, how, a_values, b_values) in retyped(),
    ) {
        use super::compat::{assess, lost, Verdict};
        let old = blueprint(&[a]);
        let mut new = blueprint(&[b]);
        new.columns[0].def.convert = how;
        for (from, to, values) in [(&old, &new, &a_values), (&new, &old, &b_values)] {
            let (from_def, to_def) = (&from.columns[0].def, &to.columns[0].def);
            let verdict = assess(from_def, to_def).verdict;
            for v in values {
                let mut body = Map::new();
                body.insert("c0".into(), v.clone());
                let Ok(item) = check_item(from, 1, Uuid::nil(), &body) else { continue };
                let item = item.into_map();
                let stored = &item["c0"];
                let moved = transform(&item, from, to, 2);
                let is_lost = lost(stored, from_def, to_def);
                prop_assert_eq!(is_lost, !stored.is_null() && moved["c0"].is_null(),
                    "{} → {}: {}", from_def.ty, to_def.ty, stored);
                if verdict == Verdict::Lossless {
                    prop_assert!(!is_lost, "{} → {} (convert {:?}) called lossless lost {}",
                        from_def.ty, to_def.ty, how, stored);
                }
            }
        }
    }
}
