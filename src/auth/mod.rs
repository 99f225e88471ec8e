//! Who may do what: master keys, API keys scoped to actions and projects, and the audit log.
//!
//! Invariants:
//! - A secret is never stored, logged or answered in clear after its creation: API keys are kept as
//!   the SHA-256 of a 256-bit random secret (enough for a secret that cannot be guessed; no slow hash
//!   needed), and every comparison of secrets or digests takes constant time.
//! - An API key reads `dstore_<id>_<secret>`: the id (public, 16 hex digits) names the key in logs,
//!   audit entries and URLs, and finds its record; the prefix lets secret scanners spot a leaked key.
//! - Master keys only manage keys (`keys.manage`): an operator makes an API key for everything else.
//! - Every route has exactly one [`Requirement`] ([`requirement`]), in one table beside the route
//!   table, so no route can be reached without deciding who may reach it.

pub mod audit;
pub mod keys;
pub mod limit;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blueprint::Ident;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    /// Read blueprints, versions and projects.
    #[serde(rename = "blueprints.read")]
    BlueprintsRead,
    /// Edit blueprints, freeze and retire versions.
    #[serde(rename = "blueprints.write")]
    BlueprintsWrite,
    #[serde(rename = "items.read")]
    ItemsRead,
    /// Put, create and delete items, `_bulk`.
    #[serde(rename = "items.write")]
    ItemsWrite,
    #[serde(rename = "projects.delete")]
    ProjectsDelete,
    /// Dead letters and their retry, detailed health, metrics, `_catalog`, the audit log.
    #[serde(rename = "operations")]
    Operations,
    #[serde(rename = "keys.manage")]
    KeysManage,
    /// Everything.
    #[serde(rename = "*")]
    All,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::BlueprintsRead,
        Action::BlueprintsWrite,
        Action::ItemsRead,
        Action::ItemsWrite,
        Action::ProjectsDelete,
        Action::Operations,
        Action::KeysManage,
        Action::All,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::BlueprintsRead => "blueprints.read",
            Action::BlueprintsWrite => "blueprints.write",
            Action::ItemsRead => "items.read",
            Action::ItemsWrite => "items.write",
            Action::ProjectsDelete => "projects.delete",
            Action::Operations => "operations",
            Action::KeysManage => "keys.manage",
            Action::All => "*",
        }
    }

    pub fn parse(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether a route needing this action may change something. A request on a route that only
    /// reads (a `POST /{project}/_changes`, which the router answers 404 or 405) changes nothing
    /// even when it passes: the audit log records it as it records a refusal.
    pub fn may_change(self) -> bool {
        !matches!(self, Action::BlueprintsRead | Action::ItemsRead)
    }
}

/// Which projects a key reaches: names, `prefix*` patterns, or `*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProjectPattern(String);

impl ProjectPattern {
    /// `*`, an identifier, or an identifier's start followed by `*`.
    pub fn parse(raw: &str) -> Result<ProjectPattern, String> {
        let valid = raw == "*"
            || Ident::parse(raw).is_ok()
            || raw
                .strip_suffix('*')
                .is_some_and(|head| Ident::parse(head).is_ok());
        if valid {
            Ok(ProjectPattern(raw.to_string()))
        } else {
            Err(format!(
                "{:?} is not a project name, a name followed by *, or *",
                crate::blueprint::value::excerpt_str(raw)
            ))
        }
    }

    pub fn matches(&self, project: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(head) => project.starts_with(head),
            None => self.0 == project,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An API key as stored: never its secret, only the secret's digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub actions: Vec<Action>,
    pub projects: Vec<ProjectPattern>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// The secret replaced by the last rotation, still valid until its time.
    #[serde(default)]
    pub previous: Option<PreviousSecret>,
}

impl ApiKey {
    /// Whether `other` is this key, when it was last used aside (recorded apart from changes).
    pub fn same_apart_from_use(&self, other: &ApiKey) -> bool {
        let unused = |key: &ApiKey| ApiKey {
            last_used_at: None,
            ..key.clone()
        };
        unused(self) == unused(other)
    }
}

/// Which secret of a key a request carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    Current,
    /// The one a rotation replaced, within its grace period.
    Previous,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub hash: String,
    pub valid_until: DateTime<Utc>,
}

impl ApiKey {
    /// Which of this key's secrets `secret` is: its current one, or its previous one within its
    /// grace period; `None` for neither.
    pub fn accepts(&self, secret: &str, now: DateTime<Utc>) -> Option<SecretKind> {
        let digest = digest(secret);
        let current = constant_time_eq(digest.as_bytes(), self.hash.as_bytes());
        let previous = self.previous.as_ref().is_some_and(|p| {
            p.valid_until > now && constant_time_eq(digest.as_bytes(), p.hash.as_bytes())
        });
        match (current, previous) {
            (true, _) => Some(SecretKind::Current),
            (false, true) => Some(SecretKind::Previous),
            (false, false) => None,
        }
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    pub fn allows(&self, action: Action, project: Option<&str>) -> bool {
        let acts = self
            .actions
            .iter()
            .any(|a| *a == action || *a == Action::All);
        let reaches = match project {
            Some(project) => self.projects.iter().any(|p| p.matches(project)),
            None => true,
        };
        acts && reaches
    }

    /// Whether the key reaches every project (what acting on all projects at once needs).
    pub fn reaches_all(&self) -> bool {
        self.projects.iter().any(|p| p.as_str() == "*")
    }

    /// The public form: everything but the digests.
    pub fn to_public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "actions": self.actions,
            "projects": self.projects,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "previous_secret_valid_until": self.previous.as_ref().map(|p| p.valid_until),
        })
    }
}

/// Bytes as lowercase hex digits.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// SHA-256 of a secret, hex.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Compares without leaking where the first difference is (lengths are public: digests).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `given` is one of the master keys (given by their [`digest`]s), comparing digests in
/// constant time.
pub fn is_master_key(given: &str, master_digests: &[String]) -> bool {
    let given = digest(given);
    master_digests.iter().fold(false, |found, key| {
        found | constant_time_eq(given.as_bytes(), key.as_bytes())
    })
}

/// 32 random bytes as 64 hex digits, from the operating system's generator.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system's random generator works");
    hex(&buffer)
}

/// `dstore_<id>_<secret>` into its id and secret.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("dstore_")?;
    let (id, secret) = rest.split_once('_')?;
    (is_key_id(id) && hex_of(secret, 64)).then_some((id, secret))
}

/// Whether `id` has the form of a key id (16 hex digits).
pub fn is_key_id(id: &str) -> bool {
    hex_of(id, 16)
}

fn hex_of(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Authentication is off (`auth.disabled`, or no master key on a loopback address), or the
    /// route is open.
    Open,
    /// A request whose key was missing or not valid (for the audit log).
    Refused,
    Master,
    /// An API key, and which of its secrets the request carried: a secret a rotation replaced
    /// still does what the key may during its grace period, except manage keys, so that whoever
    /// holds a leaked old secret cannot rotate the key to a secret of their own, or make keys, and
    /// keep access past the grace.
    Key(Box<ApiKey>, SecretKind),
}

impl Caller {
    pub fn allows(&self, action: Action, project: Option<&str>) -> bool {
        match self {
            Caller::Open => true,
            Caller::Refused => false,
            Caller::Master => action == Action::KeysManage,
            Caller::Key(_, SecretKind::Previous) if action == Action::KeysManage => false,
            Caller::Key(key, _) => key.allows(action, project),
        }
    }

    /// Whether the caller reaches every project (the master key does, for the one action it has).
    pub fn reaches_all(&self) -> bool {
        match self {
            Caller::Open | Caller::Master => true,
            Caller::Refused => false,
            Caller::Key(key, _) => key.reaches_all(),
        }
    }

    /// The key id and name for the audit log.
    pub fn describe(&self) -> (audit::Text, audit::Text) {
        match self {
            Caller::Open => ("-".into(), "open".into()),
            Caller::Refused => ("-".into(), "no valid key".into()),
            Caller::Master => ("master".into(), "master key".into()),
            Caller::Key(key, SecretKind::Current) => {
                (key.id.clone().into(), key.name.clone().into())
            }
            // Who still uses a secret a rotation replaced (a leaked one, say) shows in the log.
            Caller::Key(key, SecretKind::Previous) => (
                key.id.clone().into(),
                format!("{} (its replaced secret)", key.name).into(),
            ),
        }
    }
}

/// What a route needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Open to anyone (`/_health`).
    Open,
    /// Open when `auth.public` names it (`ready`, `metrics`, `docs`), else `action` (on every
    /// project for `operations`: readiness and metrics name held projects and their errors).
    Public(&'static str, Action),
    /// An action, on the project named in the path when there is one.
    Action(Action, Option<String>),
    /// An action on every project (listings filter instead: see the handlers).
    Everything(Action),
}

/// The requirement of a request, from its method and path: the same patterns as the route table
/// (`http::routes`), so `path` must be the path the router matches, percent-escapes decoded.
/// Unknown paths need a key too, so they answer 401 before 404.
pub fn requirement(method: &actix_web::http::Method, path: &str) -> Requirement {
    use actix_web::http::Method;
    use Action::*;
    // At most five segments, without allocating (this runs for every request): no pattern below
    // names more than four, so a longer path matches only patterns ending in `..`, as it would
    // whole.
    let mut parts = [""; 5];
    let mut count = 0;
    for (part, segment) in parts.iter_mut().zip(path.trim_matches('/').split('/')) {
        *part = segment;
        count += 1;
    }
    let segments = &parts[..count];
    let get = *method == Method::GET || *method == Method::HEAD;
    let project = |s: &str| Some(s.to_string());
    match segments {
        // The docs page is a static page with no data: a browser opens it without a header, and
        // the reader gives it a key for the document it loads.
        ["_health"] | ["_docs"] => Requirement::Open,
        ["_health", "ready"] => Requirement::Public("ready", Operations),
        ["_metrics"] => Requirement::Public("metrics", Operations),
        ["_openapi.json"] => Requirement::Public("docs", BlueprintsRead),
        // Dead letters hold whole items and the audit log every project's paths: a key scoped to
        // some projects reads neither (but reads its projects' letters, below).
        ["_dead_letters"] | ["_dead_letters", "_retry"] | ["_audit"] => {
            Requirement::Everything(Operations)
        }
        // A key may make keys for any project: only a key that reaches every project manages
        // them (and grants no action it lacks: `keys::KeyStore`).
        ["_keys", ..] => Requirement::Everything(KeysManage),
        ["_version"] => Requirement::Action(BlueprintsRead, None),
        ["_project"] if get => Requirement::Action(BlueprintsRead, None),
        ["_project"] if *method == Method::DELETE => Requirement::Everything(ProjectsDelete),
        // Checked per project in the body by the handler.
        ["_project"] => Requirement::Action(BlueprintsWrite, None),
        [p, "_catalog"] | [p, "_dead_letters"] | [p, "_dead_letters", "_retry"] => {
            Requirement::Action(Operations, project(p))
        }
        [p, "_project"] if *method == Method::DELETE => {
            Requirement::Action(ProjectsDelete, project(p))
        }
        [p, "_blueprint", ..]
        | [p, "_version", ..]
        | [p, "_project"]
        | [p, "_diff"]
        | [p, "_settings"]
        | [p, _, "_blueprint", ..] => Requirement::Action(
            if get { BlueprintsRead } else { BlueprintsWrite },
            project(p),
        ),
        [p, "_changes"] => Requirement::Action(ItemsRead, project(p)),
        [p, "_bulk"] | [p, _] => Requirement::Action(ItemsWrite, project(p)),
        [p, _, _] => Requirement::Action(if get { ItemsRead } else { ItemsWrite }, project(p)),
        _ => Requirement::Action(All, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::Method;

    #[test]
    fn keys_split_into_id_and_secret_only_when_well_formed() {
        let secret = "a".repeat(64);
        let key = format!("dstore_0123456789abcdef_{secret}");
        assert_eq!(split_key(&key), Some(("0123456789abcdef", secret.as_str())));
        assert_eq!(split_key("dstore_0123_abc"), None);
        assert_eq!(split_key(&format!("other_0123456789abcdef_{secret}")), None);
    }

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let p = |s: &str| ProjectPattern::parse(s).unwrap();
        assert!(p("shop_*").matches("shop_eu") && !p("shop_*").matches("blog"));
        assert!(p("*").matches("anything") && p("blog").matches("blog"));
        assert!(!p("blog").matches("blog_post"));
        assert!(ProjectPattern::parse("a*b").is_err() && ProjectPattern::parse("Blog").is_err());
    }

    #[test]
    fn every_route_has_its_requirement() {
        use Action::*;
        let on_blog = |action| Requirement::Action(action, Some("blog".into()));
        let item = "/blog/article/0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01";
        for (method, path, needed) in [
            (Method::GET, "/_health", Requirement::Open),
            (Method::GET, item, on_blog(ItemsRead)),
            (
                Method::PUT,
                "/blog/article/_blueprint",
                on_blog(BlueprintsWrite),
            ),
            (
                Method::POST,
                "/blog/_version/2/_retire",
                on_blog(BlueprintsWrite),
            ),
            (Method::GET, "/blog/_changes", on_blog(ItemsRead)),
            (Method::POST, "/blog/article", on_blog(ItemsWrite)),
            (Method::DELETE, "/blog/_project", on_blog(ProjectsDelete)),
            (
                Method::DELETE,
                "/_project",
                Requirement::Everything(ProjectsDelete),
            ),
            (Method::GET, "/blog/_catalog", on_blog(Operations)),
            (
                Method::PATCH,
                "/_keys/0123",
                Requirement::Everything(KeysManage),
            ),
            (Method::GET, "/_audit", Requirement::Everything(Operations)),
            (Method::GET, "/blog/_dead_letters", on_blog(Operations)),
            (
                Method::POST,
                "/blog/_dead_letters/_retry",
                on_blog(Operations),
            ),
            (
                Method::POST,
                "/_dead_letters/_retry",
                Requirement::Everything(Operations),
            ),
            // Paths longer than any pattern: only those ending in `..` take them.
            (
                Method::GET,
                "/blog/article/_blueprint/1/extra/more",
                on_blog(BlueprintsRead),
            ),
            (
                Method::GET,
                "/_keys/a/b/c/d/e",
                Requirement::Everything(KeysManage),
            ),
            (Method::PUT, "/a/b/c/d", Requirement::Action(All, None)),
            (Method::PUT, "/a/b/c/d/e", Requirement::Action(All, None)),
            (
                Method::PUT,
                "/a/b/c/d/e/f/g",
                Requirement::Action(All, None),
            ),
        ] {
            assert_eq!(requirement(&method, path), needed, "{method} {path}");
        }
    }

    #[test]
    fn master_keys_compare_by_digest() {
        let keys = vec![digest("0123456789abcdef-master")];
        assert!(is_master_key("0123456789abcdef-master", &keys));
        assert!(!is_master_key("0123456789abcdef-maste", &keys));
    }
}
