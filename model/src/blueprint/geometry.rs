//! GeoJSON geometries: strict checks and the one canonical form every store is given.
//!
//! A `point`, `linestring` or `polygon` value is a GeoJSON object of that type with WGS 84
//! positions (longitude in -180..180, latitude in -90..90). A geometry array (`point[]` …) takes
//! either a JSON array of such objects or the matching GeoJSON Multi* object (`MultiPoint` …, the
//! form the original dstore took); both are stored and answered as the JSON array of single
//! geometries, so every store and every reader sees one form. Positions are compared as numbers
//! (`[0, 0]` closes a ring opened with `[0.0, 0]`), and polygons must be valid as OGC Simple Features
//! define it (closed rings of at least four positions, no self-intersection, holes inside the
//! shell), checked with the `geo` crate, because PostGIS would store an invalid polygon that
//! Elasticsearch refuses, and the stores would disagree. A ring whose positions all lie on one line
//! is refused here, since that check lets three of them pass, and so are rings that touch each other
//! in a cycle (a hole touching the shell at two points, or holes in a chain from the shell back to
//! it), which cut the interior in pieces: that check allows rings to touch at single points.

use geo::algorithm::Validation;
use serde_json::{Map, Number, Value};

use super::types::BaseType;
use super::value::{excerpt_str, kind};

/// The GeoJSON type name of a geometry column's values.
fn type_name(base: BaseType) -> &'static str {
    match base {
        BaseType::Point => "Point",
        BaseType::LineString => "LineString",
        _ => "Polygon",
    }
}

/// Checks one geometry of `base` (a geometry type) and returns its canonical form.
pub fn single(base: BaseType, value: &Value) -> Result<Value, String> {
    let expected = type_name(base);
    let object = object_of_type(value, expected)?;
    let coordinates = object
        .get("coordinates")
        .ok_or_else(|| format!("GeoJSON {expected} has no \"coordinates\""))?;
    let canonical = normalize_numbers(coordinates);
    match base {
        BaseType::Point => {
            position(&canonical)?;
        }
        BaseType::LineString => {
            let line = line_string(&canonical, 2, "a LineString")?;
            line.check_validation()
                .map_err(|e| format!("invalid LineString: {e}"))?;
        }
        _ => polygon(&canonical)?,
    }
    let mut out = Map::new();
    out.insert("type".into(), Value::String(expected.into()));
    out.insert("coordinates".into(), canonical);
    Ok(Value::Object(out))
}

/// Checks a geometry array: a JSON array of single geometries or the matching Multi* object.
/// Answers the canonical form, the array.
pub fn many(base: BaseType, value: &Value) -> Result<Value, String> {
    let expected = type_name(base);
    match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                if item.is_null() {
                    return Err(format!(
                        "element {i} is null; array elements cannot be null"
                    ));
                }
                single(base, item).map_err(|e| format!("element {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(_) => {
            let multi = format!("Multi{expected}");
            let object = object_of_type(value, &multi).map_err(|_| {
                format!(
                    "expected a GeoJSON {multi} or an array of {expected}s, found a {}",
                    excerpt_str(
                        value
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("object")
                    )
                )
            })?;
            let Some(Value::Array(members)) = object.get("coordinates") else {
                return Err(format!("GeoJSON {multi} coordinates must be an array"));
            };
            members
                .iter()
                .enumerate()
                .map(|(i, coordinates)| {
                    let mut one = Map::new();
                    one.insert("type".into(), Value::String(expected.into()));
                    one.insert("coordinates".into(), coordinates.clone());
                    single(base, &Value::Object(one)).map_err(|e| format!("member {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        other => Err(format!(
            "expected a GeoJSON Multi{expected} or an array of {expected}s, found {}",
            kind(other)
        )),
    }
}

fn object_of_type<'a>(value: &'a Value, expected: &str) -> Result<&'a Map<String, Value>, String> {
    let Value::Object(object) = value else {
        return Err(format!(
            "expected a GeoJSON {expected}, found {}",
            kind(value)
        ));
    };
    match object.get("type").and_then(Value::as_str) {
        Some(t) if t == expected => Ok(object),
        Some(t) => Err(format!(
            "expected a GeoJSON {expected}, found a {}",
            excerpt_str(t)
        )),
        None => Err(format!(
            "expected a GeoJSON {expected} with a \"type\" member"
        )),
    }
}

/// Numbers as floats, so equal positions compare equal whatever their spelling.
fn normalize_numbers(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(normalize_numbers).collect()),
        Value::Number(n) => n
            .as_f64()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| value.clone()),
        other => other.clone(),
    }
}

/// `[longitude, latitude]` or with an altitude; answers the coordinate (altitude dropped).
fn position(value: &Value) -> Result<geo::Coord<f64>, String> {
    let Some(position) = value.as_array() else {
        return Err("a position must be an array [longitude, latitude]".into());
    };
    if position.len() < 2 || position.len() > 3 {
        return Err(format!(
            "a position has 2 or 3 numbers, found {}",
            position.len()
        ));
    }
    let numbers: Vec<f64> = position
        .iter()
        .map(|n| n.as_f64().filter(|f| f.is_finite()))
        .collect::<Option<_>>()
        .ok_or("a position must hold only numbers")?;
    // Each as JSON writes it (1e+308, not 309 digits): an error never repeats a large input back.
    if !(-180.0..=180.0).contains(&numbers[0]) {
        return Err(format!("longitude {} is outside -180..180", position[0]));
    }
    if !(-90.0..=90.0).contains(&numbers[1]) {
        return Err(format!("latitude {} is outside -90..90", position[1]));
    }
    Ok(geo::Coord {
        x: numbers[0],
        y: numbers[1],
    })
}

fn line_string(value: &Value, min: usize, what: &str) -> Result<geo::LineString<f64>, String> {
    let Some(items) = value.as_array() else {
        return Err(format!("{what} coordinates must be an array of positions"));
    };
    if items.len() < min {
        return Err(format!(
            "{what} needs at least {min} positions, found {}",
            items.len()
        ));
    }
    let line = items
        .iter()
        .enumerate()
        .map(|(i, p)| position(p).map_err(|e| format!("position {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(geo::LineString::new)?;
    one_dimension(items, dimension(&items[0]))?;
    Ok(line)
}

/// How many numbers a checked position has: 2, or 3 with an altitude.
fn dimension(position: &Value) -> usize {
    position.as_array().map_or(0, Vec::len)
}

/// Refuses positions of one geometry that do not all have an altitude, or all none, as
/// `dimension` of its first: Elasticsearch refuses such a geometry, which PostGIS would store.
fn one_dimension(positions: &[Value], first: usize) -> Result<(), String> {
    match positions.iter().position(|p| dimension(p) != first) {
        Some(i) => Err(format!(
            "position {i} has {} numbers where the geometry's first has {first}: a geometry's \
             positions all have an altitude or none do",
            dimension(&positions[i])
        )),
        None => Ok(()),
    }
}

/// The most positions a polygon may have, all its rings together. Checking a polygon compares
/// each segment of a ring with every other and each hole with every other, so its cost grows with
/// the square of its size: the bounds keep the check of any polygon to milliseconds (see
/// `polygon_checks_stay_fast_at_the_bounds`), whatever a client sends.
pub const MAX_POLYGON_POSITIONS: usize = 1024;
/// The most linear rings (the shell and its holes) a polygon may have.
pub const MAX_POLYGON_RINGS: usize = 32;

fn polygon(value: &Value) -> Result<(), String> {
    let Some(rings) = value.as_array() else {
        return Err("Polygon coordinates must be an array of linear rings".into());
    };
    if rings.is_empty() {
        return Err("a Polygon needs at least one linear ring".into());
    }
    if rings.len() > MAX_POLYGON_RINGS {
        return Err(format!(
            "a Polygon may have at most {MAX_POLYGON_RINGS} linear rings, found {}",
            rings.len()
        ));
    }
    let positions: usize = rings.iter().map(|r| r.as_array().map_or(0, Vec::len)).sum();
    if positions > MAX_POLYGON_POSITIONS {
        return Err(format!(
            "a Polygon may have at most {MAX_POLYGON_POSITIONS} positions in all its rings, found {positions}"
        ));
    }
    let mut lines = Vec::with_capacity(rings.len());
    let mut first = None;
    for (i, ring) in rings.iter().enumerate() {
        let line = line_string(ring, 4, "a linear ring").map_err(|e| format!("ring {i}: {e}"))?;
        let positions = ring.as_array().map_or(&[][..], Vec::as_slice);
        let first = *first.get_or_insert(dimension(&positions[0]));
        one_dimension(positions, first).map_err(|e| format!("ring {i}: {e}"))?;
        // Whole positions, altitude included (numbers were made floats, so `[0, 0]` closes a
        // ring opened with `[0.0, 0]`): Elasticsearch refuses a ring whose ends differ in it.
        if positions.first() != positions.last() {
            return Err(format!(
                "ring {i} is not closed: its first and last positions differ"
            ));
        }
        // Positions all on one line: its edges go out and back over each other, which the
        // self-intersection check below lets pass when they are three.
        if on_one_line(&line) {
            return Err(format!(
                "ring {i} encloses no area: its positions are all on one line"
            ));
        }
        lines.push(line);
    }
    let exterior = lines.remove(0);
    let polygon = geo::Polygon::new(exterior, lines);
    polygon
        .check_validation()
        .map_err(|e| format!("invalid Polygon: {e}"))?;
    let rings: Vec<&geo::LineString<f64>> = std::iter::once(polygon.exterior())
        .chain(polygon.interiors())
        .collect();
    interior_is_connected(&rings)
}

/// Refuses rings that touch in a cycle, which OGC Simple Features forbid because it cuts the
/// polygon's interior in pieces: a hole that touches the shell (or another hole) at two points, or
/// holes touching one after the other from the shell back to it. Rings and the points where they
/// touch form a graph (a ring is joined to each point on it where another ring touches it); the
/// interior is in one piece exactly when that graph has no cycle. Runs after `geo`'s validation,
/// so rings meet only at single points, never along a line or across each other.
fn interior_is_connected(rings: &[&geo::LineString<f64>]) -> Result<(), String> {
    use geo::algorithm::line_intersection::{line_intersection, LineIntersection};
    use geo::{BoundingRect, Intersects};
    if rings.len() < 2 {
        return Ok(());
    }
    let bounds: Vec<_> = rings.iter().map(|r| r.bounding_rect()).collect();
    // Nodes: the rings (0..rings.len()), then each touch point once, by its exact coordinates.
    let mut points: std::collections::HashMap<(u64, u64), usize> = Default::default();
    let mut joined: std::collections::HashSet<(usize, usize)> = Default::default();
    let mut parent: Vec<usize> = (0..rings.len()).collect();
    fn root(parent: &mut [usize], mut node: usize) -> usize {
        while parent[node] != node {
            parent[node] = parent[parent[node]];
            node = parent[node];
        }
        node
    }
    for i in 0..rings.len() {
        for j in i + 1..rings.len() {
            let (Some(a), Some(b)) = (bounds[i], bounds[j]) else {
                continue;
            };
            if !a.intersects(&b) {
                continue;
            }
            for (first, second) in rings[i]
                .lines()
                .flat_map(|first| rings[j].lines().map(move |second| (first, second)))
            {
                // `geo` has refused crossings and shared stretches: what is left are touch points,
                // given as the exact position of one ring lying on the other.
                let Some(LineIntersection::SinglePoint { intersection, .. }) =
                    line_intersection(first, second)
                else {
                    continue;
                };
                // `+ 0.0` turns -0 into 0: one point, one key.
                let key = (
                    (intersection.x + 0.0).to_bits(),
                    (intersection.y + 0.0).to_bits(),
                );
                let next = rings.len() + points.len();
                let point = *points.entry(key).or_insert_with(|| {
                    parent.push(next);
                    next
                });
                for ring in [i, j] {
                    if !joined.insert((ring, point)) {
                        continue;
                    }
                    let (r, p) = (root(&mut parent, ring), root(&mut parent, point));
                    if r == p {
                        return Err(format!(
                            "invalid Polygon: ring {i} and ring {j} touch at [{}, {}], closing a \
                             cycle of rings that touch each other, which cuts the interior in \
                             pieces (rings may touch, but not around a part of the interior)",
                            intersection.x, intersection.y
                        ));
                    }
                    parent[r] = p;
                }
            }
        }
    }
    Ok(())
}

/// Whether every position of a ring lies on one straight line.
fn on_one_line(ring: &geo::LineString<f64>) -> bool {
    let Some(&origin) = ring.0.first() else {
        return true;
    };
    let Some(&other) = ring.0.iter().find(|c| **c != origin) else {
        return true;
    };
    let (dx, dy) = (other.x - origin.x, other.y - origin.y);
    ring.0
        .iter()
        .all(|c| dx * (c.y - origin.y) - dy * (c.x - origin.x) == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A ring of `n` positions on a circle (closed: n - 1 distinct ones), valid and convex, the
    /// costliest shape for the self-intersection check since no pair is ruled out early.
    fn circle(n: usize, cx: f64, cy: f64, r: f64) -> Value {
        let mut ring: Vec<Value> = (0..n - 1)
            .map(|i| {
                let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
                json!([cx + r * a.cos(), cy + r * a.sin()])
            })
            .collect();
        ring.push(ring[0].clone());
        Value::Array(ring)
    }

    #[test]
    fn a_position_out_of_range_is_named_as_json_writes_it() {
        let far = json!({"type": "Point", "coordinates": [1e308, 0.0]});
        let error = single(BaseType::Point, &far).unwrap_err();
        assert_eq!(error, "longitude 1e+308 is outside -180..180");
        let high = json!({"type": "Point", "coordinates": [0.0, -1e300]});
        let error = single(BaseType::Point, &high).unwrap_err();
        assert_eq!(error, "latitude -1e+300 is outside -90..90");
    }

    /// The bounds hold, and a polygon at them is checked in milliseconds, not seconds (the figure
    /// is printed; a timed assertion would fail on a busy machine, so the bound is generous).
    #[test]
    fn polygon_checks_stay_fast_at_the_bounds() {
        let at_bound = json!({"type": "Polygon", "coordinates": [circle(MAX_POLYGON_POSITIONS, 0.0, 0.0, 10.0)]});
        let started = std::time::Instant::now();
        assert!(single(BaseType::Polygon, &at_bound).is_ok());
        let shell = started.elapsed();
        let mut rings = vec![circle(
            MAX_POLYGON_POSITIONS - 4 * (MAX_POLYGON_RINGS - 1),
            0.0,
            0.0,
            80.0,
        )];
        for i in 0..MAX_POLYGON_RINGS - 1 {
            let (x, y) = ((i % 8) as f64 * 10.0 - 35.0, (i / 8) as f64 * 10.0 - 35.0);
            rings.push(json!([[x, y], [x + 1.0, y], [x + 1.0, y + 1.0], [x, y]]));
        }
        let holes = json!({"type": "Polygon", "coordinates": rings});
        let started = std::time::Instant::now();
        assert_eq!(single(BaseType::Polygon, &holes).map(|_| ()), Ok(()));
        let with_holes = started.elapsed();
        println!(
            "a polygon at the bounds: one ring {shell:?}, {MAX_POLYGON_RINGS} rings {with_holes:?}"
        );
        let over = json!({"type": "Polygon", "coordinates": [circle(MAX_POLYGON_POSITIONS + 1, 0.0, 0.0, 10.0)]});
        let error = single(BaseType::Polygon, &over).unwrap_err();
        assert!(error.contains("at most 1024 positions"), "{error}");
        let mut many = rings.clone();
        many.push(json!([
            [40.0, 40.0],
            [41.0, 40.0],
            [41.0, 41.0],
            [40.0, 40.0]
        ]));
        let error = single(
            BaseType::Polygon,
            &json!({"type": "Polygon", "coordinates": many}),
        )
        .unwrap_err();
        assert!(error.contains("at most 32 linear rings"), "{error}");
    }

    #[test]
    fn rings_close_by_number_and_bow_ties_are_refused() {
        let closed = json!({"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0.0,0]]]});
        assert!(single(BaseType::Polygon, &closed).is_ok());
        let bow_tie = json!({"type": "Polygon", "coordinates": [[[0,0],[1,1],[1,0],[0,1],[0,0]]]});
        let error = single(BaseType::Polygon, &bow_tie).unwrap_err();
        assert!(error.contains("invalid Polygon"), "{error}");
        let hole_outside = json!({"type": "Polygon", "coordinates": [
            [[0,0],[1,0],[1,1],[0,1],[0,0]],
            [[5,5],[6,5],[6,6],[5,6],[5,5]]]});
        assert!(single(BaseType::Polygon, &hole_outside).is_err());
        // Three distinct positions on one line: edges that run back over each other.
        let flat = json!({"type": "Polygon", "coordinates": [[[0,0],[1,0],[2,0],[0,0]]]});
        let error = single(BaseType::Polygon, &flat).unwrap_err();
        assert!(error.contains("ring 0 encloses no area"), "{error}");
        let flat_hole = json!({"type": "Polygon", "coordinates": [
            [[0,0],[10,0],[10,10],[0,10],[0,0]],
            [[2,2],[4,4],[6,6],[2,2]]]});
        let error = single(BaseType::Polygon, &flat_hole).unwrap_err();
        assert!(error.contains("ring 1 encloses no area"), "{error}");
    }

    /// OGC's rule that a polygon's interior is one piece: rings may touch at single points, but
    /// not in a cycle around part of the interior.
    #[test]
    fn rings_touching_in_a_cycle_are_refused_single_touches_pass() {
        let shell = json!([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]);
        let polygon = |holes: Vec<Value>| {
            let mut rings = vec![shell.clone()];
            rings.extend(holes);
            single(
                BaseType::Polygon,
                &json!({"type": "Polygon", "coordinates": rings}),
            )
        };
        // One touch each: the shell at a corner of a hole, two holes at one point, three rings
        // at the same point, and a hole's corner on the middle of the shell's edge.
        let touches_shell = json!([[0, 5], [5, 2], [6, 5], [5, 8], [0, 5]]);
        assert!(polygon(vec![touches_shell.clone()]).is_ok());
        let left = json!([[0, 5], [2.5, 4], [5, 5], [2.5, 6], [0, 5]]);
        let right_inside = json!([[5, 5], [7.5, 4], [9, 5], [7.5, 6], [5, 5]]);
        assert!(polygon(vec![left.clone(), right_inside]).is_ok());
        let below = json!([[0, 5], [3, 1], [4, 2], [0, 5]]);
        let above = json!([[0, 5], [3, 8], [4, 7], [0, 5]]);
        assert!(polygon(vec![below, above]).is_ok());
        // Twice: a hole across the shell from edge to edge, and a chain of holes doing the same.
        let across = json!([[0, 5], [5, 2], [10, 5], [5, 8], [0, 5]]);
        let error = polygon(vec![across]).unwrap_err();
        assert!(error.contains("cuts the interior in pieces"), "{error}");
        assert!(error.contains("ring 0 and ring 1"), "{error}");
        let right_to_shell = json!([[5, 5], [7.5, 4], [10, 5], [7.5, 6], [5, 5]]);
        let error = polygon(vec![left, right_to_shell]).unwrap_err();
        assert!(error.contains("cuts the interior in pieces"), "{error}");
        // Two holes touching each other at two points enclose a piece between them.
        let upper = json!([[2, 5], [5, 8], [8, 5], [5, 6], [2, 5]]);
        let lower = json!([[2, 5], [5, 4], [8, 5], [5, 2], [2, 5]]);
        let error = polygon(vec![upper, lower]).unwrap_err();
        assert!(error.contains("ring 1 and ring 2"), "{error}");
    }

    #[test]
    fn multi_objects_and_arrays_give_the_same_canonical_array() {
        let multi = json!({"type": "MultiPoint", "coordinates": [[1, 2], [3.5, 4]]});
        let array = json!([
            {"type": "Point", "coordinates": [1.0, 2.0]},
            {"type": "Point", "coordinates": [3.5, 4]}
        ]);
        let canonical = many(BaseType::Point, &multi).unwrap();
        assert_eq!(canonical, many(BaseType::Point, &array).unwrap());
        assert_eq!(
            canonical[0],
            json!({"type": "Point", "coordinates": [1.0, 2.0]})
        );
        let polygons =
            json!({"type": "MultiPolygon", "coordinates": [[[[0,0],[1,0],[1,1],[0,0]]]]});
        assert_eq!(
            many(BaseType::Polygon, &polygons)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let wrong = json!({"type": "MultiLineString", "coordinates": []});
        assert!(many(BaseType::Point, &wrong)
            .unwrap_err()
            .contains("MultiPoint"));
        let bad_member = json!({"type": "MultiPoint", "coordinates": [[1, 2], [500, 1]]});
        assert!(many(BaseType::Point, &bad_member)
            .unwrap_err()
            .contains("member 1"));
    }

    /// Elasticsearch refuses a geometry mixing positions with and without an altitude, and a ring
    /// whose ends differ in altitude alone; PostGIS drops the altitude and takes both.
    #[test]
    fn a_geometry_s_positions_share_one_dimension_and_rings_close_in_it() {
        let line = |coordinates: Value| {
            single(
                BaseType::LineString,
                &json!({"type": "LineString", "coordinates": coordinates}),
            )
        };
        let polygon = |coordinates: Value| {
            single(
                BaseType::Polygon,
                &json!({"type": "Polygon", "coordinates": coordinates}),
            )
        };
        let error = line(json!([[0, 0], [1, 1, 10]])).unwrap_err();
        assert!(error.contains("position 1 has 3 numbers"), "{error}");
        assert!(line(json!([[0, 0, 5], [1, 1, 10]])).is_ok());
        let error = polygon(json!([[[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 2]]])).unwrap_err();
        assert!(error.contains("not closed"), "{error}");
        assert!(polygon(json!([[[0, 0, 1], [1, 0, 1], [1, 1, 1], [0.0, 0, 1.0]]])).is_ok());
        let shell = json!([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]);
        let hole = json!([[1, 1, 0], [2, 1, 0], [2, 2, 0], [1, 1, 0]]);
        let error = polygon(json!([shell, hole])).unwrap_err();
        assert!(error.starts_with("ring 1: position 0 has 3"), "{error}");
    }

    #[test]
    fn a_linestring_needs_two_distinct_positions() {
        let flat = json!({"type": "LineString", "coordinates": [[1, 1], [1.0, 1]]});
        assert!(single(BaseType::LineString, &flat).is_err());
    }
}
