//! The catalog's edits as pure functions of a project: what every storage backend applies under its
//! own lock and persists as the [`Write`]s they list.
//!
//! Each function either fails without touching the project or changes it and says which records
//! changed; the backend persists exactly those, atomically, before anyone sees the new state.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::{CatalogError, Compatibility, MigrationState, Project, Version, VersionStatus};
use crate::blueprint::parse::PATTERN_COST;
use crate::blueprint::{
    apply_edit, diff, BlueprintInput, Blueprints, Change, FieldError, Ident, Pattern,
    MAX_PATTERNS_MEMORY,
};

/// Most blueprints a project holds: each is a table (with its indexes) in the one transaction of a
/// PostgreSQL migration, and an Elasticsearch index for every live version, where a node holds
/// 1000 shards by default.
pub const MAX_BLUEPRINTS: usize = 200;

/// Most `index` or `unique` columns a project's blueprints hold together. PostgreSQL makes a
/// version's tables and indexes in one transaction, which holds a lock on each until it commits,
/// out of the lock table every session of the server shares (`max_locks_per_transaction` ×
/// `max_connections`: 6400 by default); past it the migration fails for good, and each retry
/// fills the table for every other session. 2000 indexes, with a few more relations per table,
/// leave most of it to the rest.
pub const MAX_INDEXES: usize = 2000;

/// Most bytes a project's blueprints take as JSON. Every node keeps every version of every project
/// in memory, each with its own copy of its blueprints, and reads them all at start: 200 blueprints
/// of 900 columns with long comments took 2 GB and more at each freeze, and a restart past a
/// 4 GB memory limit. Far more than any real schema needs (about 50,000 plain columns).
pub const MAX_BLUEPRINTS_BYTES: usize = 4 << 20;

/// Most live (frozen, not retired) versions a project has: every item write is transformed,
/// stored and projected once per live version that holds its blueprint.
pub const MAX_LIVE_VERSIONS: usize = 32;

/// Most versions a project is frozen into, retired ones included: each is kept, read at every
/// start and reached by every delete of an item of its blueprints. A version a day for almost
/// three years; a loop of freezes and retirements stops here.
pub const MAX_VERSIONS: usize = 1000;

/// Most bytes all of a project's versions take as JSON (their blueprints, with the changes and
/// edits each recorded), the one a freeze would add included: every node keeps every version in
/// memory and reads them all at start, so freezing and retiring near [`MAX_BLUEPRINTS_BYTES`]
/// blueprints in a loop would otherwise grow what a restart reads by 4 MiB or more each time,
/// until it no longer fits. A few versions of the largest blueprints, thousands of ordinary ones.
pub const MAX_VERSIONS_BYTES: usize = 16 * MAX_BLUEPRINTS_BYTES;

/// Refuses a freeze of a project that has [`MAX_LIVE_VERSIONS`] live versions already, or whose
/// versions would pass [`MAX_VERSIONS`] or [`MAX_VERSIONS_BYTES`] (checked again before a freeze
/// counts its items, which could take long only to be refused).
pub fn room_for_a_version(p: &Project) -> Result<(), CatalogError> {
    let live = p.live_versions().count();
    if live >= MAX_LIVE_VERSIONS {
        return Err(CatalogError::Conflict(format!(
            "project {:?} has {live} live versions, the most it may: every write is stored and projected once per live version; retire the versions no client writes at any more (GET /{}/_version/{{n}} shows a version's use) before freezing another",
            p.name.as_str(),
            p.name.as_str()
        )));
    }
    let frozen = p.versions.len();
    if frozen >= MAX_VERSIONS {
        return Err(CatalogError::Conflict(format!(
            "project {:?} was frozen {frozen} times, the most a project may be (retired versions \
             count: each is kept and reached by deletes); keep evolving the schema in a new \
             project",
            p.name.as_str()
        )));
    }
    let empty = Blueprints::new();
    let previous = p.latest().map_or(&empty, |v| &v.blueprints);
    let mut bytes = json_bytes(&p.working.blueprints)
        + json_bytes(&diff(previous, &p.working.blueprints))
        + json_bytes(&p.working.edits);
    for version in &p.versions {
        bytes += json_bytes(&version.blueprints)
            + json_bytes(&version.changes)
            + json_bytes(&version.edits);
        if bytes > MAX_VERSIONS_BYTES {
            return Err(CatalogError::Conflict(format!(
                "project {:?}'s {frozen} versions and this freeze (their blueprints, with the \
                 changes each records) would take more than {MAX_VERSIONS_BYTES} bytes as JSON, \
                 the most a project's versions may (every node keeps them all in memory, retired \
                 ones included); shorten comments, patterns and enums, or keep evolving the \
                 schema in a new project",
                p.name.as_str()
            )));
        }
    }
    Ok(())
}

/// Most projects a deployment holds unless `storage.max_projects` says otherwise: every edit of the
/// catalog copies the list of projects, every node keeps each in memory, and each live version of
/// each is a PostgreSQL schema and Elasticsearch indexes. An existing project is always edited;
/// only a new one is refused.
pub const MAX_PROJECTS: usize = 10_000;

/// Most bytes, as JSON, the whole catalog takes unless `storage.max_catalog_bytes` says
/// otherwise: every node keeps every project's blueprints and versions in memory (about four
/// times what they take as JSON) and reads them all at start, so a catalog grown past what a
/// node's memory holds would stop it from starting at all. The per-project limits
/// ([`MAX_BLUEPRINTS_BYTES`], [`MAX_VERSIONS_BYTES`]) times [`MAX_PROJECTS`] are far past it.
pub const MAX_CATALOG_BYTES: usize = 256 << 20;

/// What a project takes in the catalog as JSON: its working copy and its versions.
pub fn project_bytes(p: &Project) -> usize {
    json_bytes(&p.working) + p.versions.iter().map(|v| v.json_bytes()).sum::<usize>()
}

/// About what [`project_bytes`] would be once `p`'s working copy is frozen: the new version
/// holds its blueprints and the change from the latest version (its edits move into it).
pub fn frozen_bytes(p: &Project) -> usize {
    let empty = Blueprints::new();
    let previous = p.latest().map_or(&empty, |v| &v.blueprints);
    project_bytes(p)
        + json_bytes(&p.working.blueprints)
        + json_bytes(&diff(previous, &p.working.blueprints))
}

/// Refuses an edit that grows project `name` from `before` to `after` bytes ([`project_bytes`])
/// while the other projects take `others`, past `max` (`storage.max_catalog_bytes`). An edit
/// that does not grow the project is always made, so a catalog past the limit (one made before
/// it, or a limit lowered since) can still be trimmed.
pub fn room_in_catalog(
    name: &Ident,
    others: usize,
    (before, after): (usize, usize),
    max: usize,
) -> Result<(), CatalogError> {
    let total = others.saturating_add(after);
    if after <= before || total <= max {
        return Ok(());
    }
    Err(CatalogError::Conflict(format!(
        "this edit of project {name:?} would grow the deployment's catalog to {total} bytes as \
         JSON, more than the {max} it may hold (storage.max_catalog_bytes): every node keeps \
         every project's blueprints and versions in memory and reads them all at start; drop \
         projects no one uses (an edit records what it changed, so only a drop gives room back), \
         or raise the setting where the nodes' memory allows"
    )))
}

/// The refusal of a new project once the deployment holds `max` (`storage.max_projects`).
pub fn too_many_projects(name: &Ident, max: usize) -> String {
    format!(
        "cannot make project {name:?}: this deployment holds {max} projects, the most it holds \
         (storage.max_projects); drop one first"
    )
}

/// Most changes the working copy records one by one; past it, what it records is the net change
/// since the last frozen version, so editing a blueprint back and forth cannot grow the project's
/// record (rewritten whole by every edit) without bound.
pub const MAX_EDITS: usize = 100;

/// Most bytes, as JSON, of the changes the working copy records one by one (see [`MAX_EDITS`]): a
/// change that makes or removes a blueprint holds its whole definition, so a hundred of them
/// could be a hundred times [`MAX_BLUEPRINTS_BYTES`]. The net change that replaces them takes at
/// most the blueprints before and after it.
pub const MAX_EDITS_BYTES: usize = MAX_BLUEPRINTS_BYTES;

/// Refuses to make a project PostgreSQL could never hold: its schemas are named after it
/// (`{project}_v{n}`), and PostgreSQL reserves schema names starting with `pg_`, which `pg` and
/// every name starting with `pg_` make. A project made before this rule is still edited.
fn check_new_name(p: &Project) -> Result<(), CatalogError> {
    let new = p.versions.is_empty() && p.working.blueprints.is_empty();
    let name = p.name.as_str();
    if new && (name == "pg" || name.starts_with("pg_")) {
        return Err(CatalogError::Invalid(vec![FieldError::new(
            "",
            format!(
                "project name {name:?} makes schema names that start with pg_ ({name}_v1), which \
                 PostgreSQL keeps for its own schemas: the project's tables could never be made"
            ),
        )]));
    }
    Ok(())
}

/// Refuses an edit that grows a project past [`MAX_BLUEPRINTS`]; one that keeps or shrinks the
/// count of a project made before the limit goes on.
fn check_count(before: usize, next: usize) -> Result<(), CatalogError> {
    if next <= MAX_BLUEPRINTS || next <= before {
        return Ok(());
    }
    Err(CatalogError::Invalid(vec![FieldError::new(
        "",
        format!("a project holds at most {MAX_BLUEPRINTS} blueprints; this edit would make {next}"),
    )]))
}

/// What blueprints (or changes) take as JSON, the measure of [`MAX_BLUEPRINTS_BYTES`],
/// [`MAX_EDITS_BYTES`] and [`MAX_VERSIONS_BYTES`]; counted as written, nothing kept.
pub fn json_bytes(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

/// Refuses an edit that grows a project's blueprints past [`MAX_BLUEPRINTS_BYTES`]; one that keeps
/// or shrinks those of a project made before the limit goes on.
fn check_bytes(before: &Blueprints, next: &Blueprints) -> Result<(), CatalogError> {
    let will = json_bytes(next);
    if will <= MAX_BLUEPRINTS_BYTES || will <= json_bytes(before) {
        return Ok(());
    }
    Err(CatalogError::Invalid(vec![FieldError::new(
        "",
        format!(
            "a project's blueprints take at most {MAX_BLUEPRINTS_BYTES} bytes as JSON (every node \
             keeps every version of them in memory); this edit would make {will}: split the \
             project, or shorten comments, patterns and enums"
        ),
    )]))
}

/// Refuses an edit that brings in a pattern the project did not hold when the distinct patterns
/// of its blueprints, in the working copy and its live versions (those items are checked
/// against), would then compile to more than [`MAX_PATTERNS_MEMORY`] (patterns shared by several
/// columns or versions count once, as the node holds them once); an edit that brings in none goes
/// on, so a project that holds more already keeps them. `named`: the error's path starts with the
/// blueprint's name (an edit of several).
fn check_patterns(p: &Project, next: &Blueprints, named: bool) -> Result<(), CatalogError> {
    let live: Vec<&Blueprints> = p.live_versions().map(|v| &v.blueprints).collect();
    let held: HashSet<&str> = std::iter::once(&p.working.blueprints)
        .chain(live.iter().copied())
        .flat_map(patterns)
        .map(|(_, _, p)| p.as_str())
        .collect();
    let Some((blueprint, column, _)) = patterns(next).find(|(_, _, p)| !held.contains(p.as_str()))
    else {
        return Ok(());
    };
    let mut seen = HashSet::new();
    let total: usize = std::iter::once(next)
        .chain(live.iter().copied())
        .flat_map(patterns)
        .filter(|(_, _, p)| seen.insert(p.as_str()))
        .map(|(_, _, p)| p.memory())
        .sum();
    if total <= MAX_PATTERNS_MEMORY {
        return Ok(());
    }
    let base = if named {
        format!("/{blueprint}")
    } else {
        String::new()
    };
    Err(CatalogError::Invalid(vec![FieldError::new(
        format!("{base}/columns/{column}/validation/pattern"),
        format!(
            "the project's distinct patterns, in its working copy and its live versions, would \
             compile to {total} bytes, more than the {MAX_PATTERNS_MEMORY} they may (retire the \
             versions no client writes at any more; {PATTERN_COST})"
        ),
    )]))
}

/// Each pattern of `blueprints`, with its blueprint and column.
fn patterns(blueprints: &Blueprints) -> impl Iterator<Item = (&Ident, &Ident, &Pattern)> {
    blueprints.iter().flat_map(|(name, bp)| {
        bp.columns.iter().filter_map(move |(column, c)| {
            c.def.validation.pattern.as_ref().map(|p| (name, column, p))
        })
    })
}

/// The `index` or `unique` columns of `blueprints`.
fn indexes(blueprints: &Blueprints) -> usize {
    blueprints
        .values()
        .flat_map(|bp| bp.columns.values())
        .filter(|c| c.def.index || c.def.unique)
        .count()
}

/// Refuses an edit that grows a project's indexes past [`MAX_INDEXES`]; one that keeps or
/// shrinks those of a project made before the limit goes on.
fn check_indexes(before: &Blueprints, next: &Blueprints) -> Result<(), CatalogError> {
    let (was, will) = (indexes(before), indexes(next));
    if will <= MAX_INDEXES || will <= was {
        return Ok(());
    }
    Err(CatalogError::Invalid(vec![FieldError::new(
        "",
        format!(
            "a project's blueprints hold at most {MAX_INDEXES} index or unique columns together \
             (PostgreSQL makes a version's indexes in one transaction, locking each until it \
             commits); this edit would make {will}"
        ),
    )]))
}

/// Creates or edits one blueprint of the working copy; answers the changes it recorded.
pub fn put_blueprint(
    p: &mut Project,
    name: &Ident,
    input: BlueprintInput,
    writes: &mut Vec<Write>,
) -> Result<Vec<Change>, CatalogError> {
    check_new_name(p)?;
    let mut next = p.working.blueprints.clone();
    let current = next.get(name);
    let mut edited =
        apply_edit(current, input, &mut p.working.last_uid, "").map_err(CatalogError::Invalid)?;
    if current.is_none() {
        keep_frozen_uid(p, name, &mut edited);
    }
    next.insert(name.clone(), edited);
    check_count(p.working.blueprints.len(), next.len())?;
    check_indexes(&p.working.blueprints, &next)?;
    check_bytes(&p.working.blueprints, &next)?;
    check_patterns(p, &next, false)?;
    check_unique_names(&next, Some(name))?;
    check_rows(&next, Some(name))?;
    Ok(record_edit(p, next, writes))
}

/// Replaces every blueprint of the working copy; those not in `inputs` are removed.
pub fn put_blueprints(
    p: &mut Project,
    inputs: Vec<(Ident, BlueprintInput)>,
    writes: &mut Vec<Write>,
) -> Result<Vec<Change>, CatalogError> {
    check_new_name(p)?;
    check_count(p.working.blueprints.len(), inputs.len())?;
    let mut next = Blueprints::new();
    let mut errors = Vec::new();
    for (name, input) in inputs {
        let base = format!("/{name}");
        let made = !p.working.blueprints.contains_key(&name);
        match apply_edit(
            p.working.blueprints.get(&name),
            input,
            &mut p.working.last_uid,
            &base,
        ) {
            Ok(mut bp) => {
                if made {
                    keep_frozen_uid(p, &name, &mut bp);
                }
                next.insert(name, bp);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(CatalogError::Invalid(errors));
    }
    check_indexes(&p.working.blueprints, &next)?;
    check_bytes(&p.working.blueprints, &next)?;
    check_patterns(p, &next, true)?;
    check_unique_names(&next, None)?;
    check_rows(&next, None)?;
    Ok(record_edit(p, next, writes))
}

/// A blueprint made under a name that a frozen version gives a blueprint (removed from the working
/// copy, then made again) keeps that blueprint's uid, with new columns: items are kept by name, and
/// two blueprints under one name in live versions would share them, a write or a delete through
/// one leaving the other's copies in its versions' stores for good.
fn keep_frozen_uid(p: &Project, name: &Ident, made: &mut crate::blueprint::Blueprint) {
    if let Some(uid) = p
        .versions
        .iter()
        .rev()
        .find_map(|v| v.blueprints.get(name).map(|bp| bp.uid))
    {
        made.uid = uid;
    }
}

pub fn delete_blueprint(
    p: &mut Project,
    name: &Ident,
    writes: &mut Vec<Write>,
) -> Result<Vec<Change>, CatalogError> {
    let mut next = p.working.blueprints.clone();
    if next.remove(name).is_none() {
        return Err(CatalogError::NotFound(format!(
            "blueprint {name:?} does not exist in the working copy of {:?}",
            p.name.as_str()
        )));
    }
    Ok(record_edit(p, next, writes))
}

/// What a freeze's compatibility was judged on: the working copy, against the versions there were
/// (and which of them were live) and under the project's compatibility setting. Another request
/// changing any of them between the judgment and the freeze (an edit, a freeze, a retirement, the
/// setting) would have the freeze go through unjudged: a retirement moves the newest live version
/// whose unique indexes the duplicate count took as refusing already.
#[derive(Clone, Debug)]
pub struct Judged {
    blueprints: Blueprints,
    versions: usize,
    retired: Vec<u32>,
    compatibility: Compatibility,
    /// The project of the name it was (one dropped and made again has another).
    born: u64,
}

impl Judged {
    /// The project as a freeze's judgment reads it.
    pub fn of(p: &Project) -> Judged {
        Judged {
            blueprints: p.working.blueprints.clone(),
            versions: p.versions.len(),
            retired: retired(p),
            compatibility: p.working.compatibility,
            born: p.working.born,
        }
    }

    /// Whether `p` is still as it was judged.
    pub fn holds(&self, p: &Project) -> bool {
        self.blueprints == p.working.blueprints
            && self.versions == p.versions.len()
            && self.retired == retired(p)
            && self.compatibility == p.working.compatibility
            && self.born == p.working.born
    }
}

/// The numbers of `p`'s retired versions, in order.
fn retired(p: &Project) -> Vec<u32> {
    p.versions
        .iter()
        .map(|v| v.number)
        .filter(|&number| p.is_retired(number))
        .collect()
}

/// Freezes the working copy as the next version. `projectors` start with a pending migration,
/// `done` with a finished one. `judged`, what the caller judged the freeze's compatibility on,
/// refuses the freeze when the project is no longer so (an edit, a freeze or a change of the
/// compatibility setting made in between would have it frozen unjudged).
pub fn freeze(
    p: &mut Project,
    projectors: &[&str],
    done: &[&str],
    forced: bool,
    judged: Option<&Judged>,
    writes: &mut Vec<Write>,
) -> Result<Arc<Version>, CatalogError> {
    if judged.is_some_and(|judged| !judged.holds(p)) {
        return Err(CatalogError::Conflict(
            "the project changed while this freeze was being checked (another request edited \
             it, froze it, retired a version or changed its compatibility setting): send the \
             freeze again, and it is checked against the project as it is now"
                .into(),
        ));
    }
    if !p.has_unfrozen_changes() {
        return Err(CatalogError::Conflict(match p.latest() {
            Some(v) => format!("nothing changed since version {}", v.number),
            None => "the working copy has no blueprints to freeze".into(),
        }));
    }
    room_for_a_version(p)?;
    let empty = Blueprints::new();
    let previous = p.latest().map_or(&empty, |v| &v.blueprints);
    let number = p.versions.len() as u32 + 1;
    let version = Version {
        number,
        changes: diff(previous, &p.working.blueprints),
        blueprints: p.working.blueprints.clone(),
        edits: std::mem::take(&mut p.working.edits),
        frozen_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        forced,
        size: Default::default(),
    };
    let status = VersionStatus {
        retired: false,
        migrations: projectors
            .iter()
            .map(|name| (name.to_string(), MigrationState::Pending))
            .chain(
                done.iter()
                    .map(|name| (name.to_string(), MigrationState::Done)),
            )
            .collect(),
    };
    p.versions.push(Arc::new(version));
    p.status.insert(number, status);
    writes.extend([
        Write::Version(number),
        Write::Status(number),
        Write::WorkingCopy,
    ]);
    Ok(p.versions[number as usize - 1].clone())
}

/// Records how `projector`'s migration of version `number` went. `task`, the seq of the
/// `Migrate` task it ran for: at or below the project's `born`, it migrated an earlier project of
/// the name, dropped since, and says nothing of this one (recorded, it would mark a version
/// migrated that was not, and have the earlier project's drop taken for one delivered again).
pub fn set_migration(
    p: &mut Project,
    number: u32,
    projector: &str,
    (state, task): (MigrationState, Option<u64>),
    writes: &mut Vec<Write>,
) -> Result<(), CatalogError> {
    if task.is_some_and(|seq| seq <= p.working.born) {
        return Ok(());
    }
    let status = p
        .status
        .get_mut(&number)
        .ok_or_else(|| CatalogError::NotFound(format!("version {number} does not exist")))?;
    // A migration failing again the same way changes nothing: writing it would move the epoch, so
    // every write prepared meanwhile would be prepared again, on every retry.
    if status.migrations.get(projector) == Some(&state) {
        return Ok(());
    }
    status.migrations.insert(projector.to_string(), state);
    writes.push(Write::Status(number));
    Ok(())
}

/// Sets the project's compatibility setting.
pub fn set_compatibility(
    p: &mut Project,
    compatibility: Compatibility,
    writes: &mut Vec<Write>,
) -> Result<(), CatalogError> {
    if p.working.compatibility != compatibility {
        p.working.compatibility = compatibility;
        writes.push(Write::WorkingCopy);
    }
    Ok(())
}

/// Stops projecting into a version; reads of it keep working.
pub fn retire(p: &mut Project, number: u32, writes: &mut Vec<Write>) -> Result<(), CatalogError> {
    let status = p
        .status
        .get_mut(&number)
        .ok_or_else(|| CatalogError::NotFound(format!("version {number} does not exist")))?;
    if status.retired {
        return Ok(());
    }
    status.retired = true;
    writes.push(Write::Status(number));
    // Its patterns are let go compiled: a project that freezes and retires version after version
    // of new patterns would otherwise hold every one of them compiled, past the budget
    // `check_patterns` keeps for what is live.
    if let Some(version) = p.versions.iter_mut().find(|v| v.number == number) {
        let mut kept = Version::clone(version);
        for column in kept
            .blueprints
            .values_mut()
            .flat_map(|blueprint| blueprint.columns.values_mut())
        {
            if let Some(pattern) = &mut column.def.validation.pattern {
                *pattern = pattern.dormant();
            }
        }
        *version = Arc::new(kept);
    }
    Ok(())
}

/// What an edit wants persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The working copy (`project/{name}`).
    WorkingCopy,
    /// A frozen version, written once.
    Version(u32),
    /// A version's status (retired, migrations).
    Status(u32),
}

impl Write {
    /// Whether the write changes the set of live versions (and so the project's epoch).
    pub fn moves_epoch(self) -> bool {
        !matches!(self, Write::WorkingCopy)
    }
}

fn record_edit(p: &mut Project, next: Blueprints, writes: &mut Vec<Write>) -> Vec<Change> {
    let changes = diff(&p.working.blueprints, &next);
    if !changes.is_empty() {
        if p.working.edits.len() + changes.len() > MAX_EDITS
            || json_bytes(&p.working.edits) + json_bytes(&changes) > MAX_EDITS_BYTES
        {
            let empty = Blueprints::new();
            let frozen = p.latest().map_or(&empty, |v| &v.blueprints);
            p.working.edits = diff(frozen, &next);
        } else {
            p.working.edits.extend(changes.iter().cloned());
        }
        p.working.blueprints = next;
        writes.push(Write::WorkingCopy);
    }
    changes
}

/// A blueprint whose defaults alone overflow a PostgreSQL row ("row is too big") would have every
/// item that leaves those columns out refused for ever, and every item moved into its version
/// from an older one (which takes the defaults of the columns it adds): refused here, before a
/// freeze, instead of item by item after it (`write::prepare` checks each item's own row).
fn check_rows(blueprints: &Blueprints, edited: Option<&Ident>) -> Result<(), CatalogError> {
    use crate::projector::postgres::{row_past_limit, MAX_ROW_BYTES};
    let errors: Vec<FieldError> = blueprints
        .iter()
        .filter(|(name, _)| edited.is_none_or(|e| e == *name))
        .filter_map(|(name, bp)| {
            let defaults: Vec<serde_json::Value> =
                bp.columns.values().map(|c| c.def.fallback()).collect();
            let least = row_past_limit(bp, defaults.iter())?;
            let base = match edited {
                Some(_) => String::new(),
                None => format!("/{name}"),
            };
            Some(FieldError::new(
                format!("{base}/columns"),
                format!(
                    "with only its defaults, an item takes at least {least} bytes in a \
                     PostgreSQL row, more than the {MAX_ROW_BYTES} a row may: give fewer \
                     columns a default"
                ),
            ))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Invalid(errors))
    }
}

/// Two blueprints of a project may not share a PostgreSQL table or an Elasticsearch type, nor may
/// any of the names a blueprint's table takes in PostgreSQL (its indexes') be another's.
fn check_unique_names(blueprints: &Blueprints, edited: Option<&Ident>) -> Result<(), CatalogError> {
    let mut errors = Vec::new();
    let mut tables: BTreeMap<&Ident, &Ident> = BTreeMap::new();
    let mut types: BTreeMap<&Ident, &Ident> = BTreeMap::new();
    let mut relations: BTreeMap<String, (&Ident, String)> = BTreeMap::new();
    // The edited blueprint comes last: a name it takes is another's, which the error names.
    let others = blueprints.iter().filter(|(name, _)| Some(*name) != edited);
    let last = edited.and_then(|name| blueprints.get_key_value(name));
    for (name, bp) in others.chain(last) {
        let base = if edited.is_some() {
            String::new()
        } else {
            format!("/{name}")
        };
        if let Some(other) = tables.insert(&bp.table, name) {
            errors.push(FieldError::new(
                format!("{base}/postgresql/table"),
                format!(
                    "table {:?} is already used by blueprint {:?}",
                    bp.table.as_str(),
                    other.as_str()
                ),
            ));
        } else {
            for (relation, what) in crate::projector::postgres::relation_names(bp) {
                match relations.get(&relation) {
                    Some((other, theirs)) if *other != name => errors.push(FieldError::new(
                        format!("{base}/postgresql/table"),
                        format!(
                            "PostgreSQL would name {what} {relation:?}, already the name of {theirs} of blueprint {:?}",
                            other.as_str()
                        ),
                    )),
                    _ => {
                        relations.insert(relation, (name, what));
                    }
                }
            }
        }
        if let Some(other) = types.insert(&bp.es_type, name) {
            errors.push(FieldError::new(
                format!("{base}/elasticsearch/type"),
                format!(
                    "type {:?} is already used by blueprint {:?}",
                    bp.es_type.as_str(),
                    other.as_str()
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Invalid(errors))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A blueprint `name` of `columns`, its table and type named after it.
    fn blueprint(name: &str, columns: serde_json::Value) -> serde_json::Value {
        json!({"postgresql": {"table": name}, "elasticsearch": {"type": name}, "columns": columns})
    }

    /// Freezes `p`'s working copy with `title`'s comment set to `comment`, then retires it.
    fn freeze_and_retire(p: &mut Project, comment: &str) -> Result<(), CatalogError> {
        let body = blueprint(
            "article",
            json!({"title": {"type": "string", "comment": comment}}),
        );
        let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
        let article = Ident::parse("article").unwrap();
        put_blueprint(p, &article, input, &mut Vec::new())?;
        let version = freeze(p, &[], &[], false, None, &mut Vec::new())?;
        retire(p, version.number, &mut Vec::new())
    }

    /// A retired version holds its patterns uncompiled: freezing and retiring new patterns in a
    /// loop held every one of them compiled, outside the budget of what is live.
    #[test]
    fn a_retired_version_lets_its_compiled_patterns_go() {
        let mut p = Project::new(Ident::parse("patterns").unwrap());
        let article = Ident::parse("article").unwrap();
        let source = "^[a-z]{3}-retired-[0-9]{4}$";
        let body = blueprint(
            "article",
            json!({"code": {"type": "string", "validation": {"pattern": source}}}),
        );
        let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
        put_blueprint(&mut p, &article, input, &mut Vec::new()).unwrap();
        let version = freeze(&mut p, &[], &[], false, None, &mut Vec::new()).unwrap();
        let pattern = |p: &Project| {
            p.versions[0].blueprints[&article].columns["code"]
                .def
                .validation
                .pattern
                .clone()
                .unwrap()
        };
        assert!(pattern(&p).is_compiled(), "compiled as it was put");
        // The working copy moves on to another pattern; the version is retired.
        let body = blueprint("article", json!({"code": {"type": "string"}}));
        let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
        put_blueprint(&mut p, &article, input, &mut Vec::new()).unwrap();
        retire(&mut p, version.number, &mut Vec::new()).unwrap();
        let kept = pattern(&p);
        assert!(!kept.is_compiled());
        assert_eq!(kept.as_str(), source);
        assert!(
            kept.is_match("abc-retired-1234"),
            "still a working pattern when used"
        );
    }

    /// Freezing and retiring in a loop keeps no more than [`MAX_VERSIONS`] versions; a refused
    /// freeze changes nothing.
    #[test]
    fn versions_are_bounded_in_number_retired_ones_included() {
        let mut p = Project::new(Ident::parse("loop").unwrap());
        for n in 0..MAX_VERSIONS {
            freeze_and_retire(&mut p, &n.to_string()).unwrap();
        }
        let refused = freeze_and_retire(&mut p, "one more").unwrap_err();
        assert!(matches!(refused, CatalogError::Conflict(_)), "{refused}");
        assert!(
            refused.to_string().contains("frozen 1000 times"),
            "{refused}"
        );
        assert_eq!(p.versions.len(), MAX_VERSIONS);
    }

    /// A blueprint `name` of about 800 KB as JSON: 800 columns with long comments.
    fn large(name: &str) -> BlueprintInput {
        let mut columns = serde_json::Map::new();
        for c in 0..800 {
            columns.insert(
                format!("c{c}"),
                json!({"type": "string", "comment": "x".repeat(1000)}),
            );
        }
        crate::blueprint::parse_blueprint(&blueprint(name, json!(columns)), "").unwrap()
    }

    /// Versions of large blueprints stop at [`MAX_VERSIONS_BYTES`] however many are retired.
    #[test]
    fn versions_are_bounded_in_bytes_retired_ones_included() {
        let mut p = Project::new(Ident::parse("big").unwrap());
        // Four blueprints of about 1 MB each: 4 MB a version (12 MB the first, which records
        // them made, in its changes and in its edits).
        for name in ["a", "b", "c", "d"] {
            put_blueprint(
                &mut p,
                &Ident::parse(name).unwrap(),
                large(name),
                &mut Vec::new(),
            )
            .unwrap();
        }
        let mut frozen = 0;
        let refused = loop {
            if frozen > 0 {
                edit_small(&mut p, frozen);
            }
            match freeze(&mut p, &[], &[], false, None, &mut Vec::new()) {
                Ok(version) => retire(&mut p, version.number, &mut Vec::new()).unwrap(),
                Err(refused) => break refused,
            }
            frozen += 1;
            assert!(frozen < 100, "never refused");
        };
        assert!(refused.to_string().contains("bytes as JSON"), "{refused}");
        // The thirteenth or so would pass 64 MiB with the working copy.
        assert!((11..=14).contains(&frozen), "{frozen}");
        assert_eq!(p.versions.len(), frozen);
    }

    /// Making and removing a large blueprint over and over keeps at most [`MAX_EDITS_BYTES`] of
    /// edits, in the working copy and in the version frozen from it: each such edit records the
    /// whole definition, and a hundred of them, about 80 MB, were kept and rewritten by every
    /// edit.
    #[test]
    fn edits_are_bounded_in_bytes() {
        let mut p = Project::new(Ident::parse("cycles").unwrap());
        let a = Ident::parse("a").unwrap();
        for _ in 0..30 {
            put_blueprint(&mut p, &a, large("a"), &mut Vec::new()).unwrap();
            delete_blueprint(&mut p, &a, &mut Vec::new()).unwrap();
        }
        let kept = json_bytes(&p.working.edits);
        assert!(kept <= MAX_EDITS_BYTES, "{kept} bytes of edits");
        edit_small(&mut p, 1);
        let version = freeze(&mut p, &[], &[], false, None, &mut Vec::new()).unwrap();
        let kept = json_bytes(&version.edits);
        assert!(kept <= MAX_EDITS_BYTES, "{kept} bytes of edits");
        assert!(!version.edits.is_empty());
    }

    /// Changes a small blueprint of `p`, so the working copy differs from the last version.
    fn edit_small(p: &mut Project, n: usize) {
        let body = blueprint(
            "e",
            json!({"title": {"type": "string", "comment": n.to_string()}}),
        );
        let input = crate::blueprint::parse_blueprint(&body, "").unwrap();
        put_blueprint(p, &Ident::parse("e").unwrap(), input, &mut Vec::new()).unwrap();
    }
}
