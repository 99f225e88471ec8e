//! Authentication and authorization: every route with no key, a key for another project, a key
//! without the action, an expired key, a revoked key and the right key; master keys, rotation,
//! listings filtered by key, cross-site writes, the audit log, and secrets never written down.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{article, spawn_app_with, TestApp};
use crate::process::{free_port, Server};

const MASTER: &str = "master-key-for-tests-0123456789";

async fn secured() -> TestApp {
    spawn_app_with(|s| s.auth.master_keys = vec![MASTER.into()]).await
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = app.client.request(method, format!("{}{path}", app.address));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Makes a key with the master key; answers its secret and id. An expiry in the past is set
/// once the key is made (a key is never made expired).
async fn key(
    app: &TestApp,
    actions: &[&str],
    projects: &[&str],
    expires_at: Option<&str>,
) -> (String, String) {
    let body = json!({"name": "test", "actions": actions, "projects": projects});
    let (status, answer) = call(
        app,
        Method::POST,
        "/_keys",
        Some(MASTER),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    if let Some(at) = expires_at {
        let body = json!({ "expires_at": at });
        let path = format!("/_keys/{id}");
        let (status, changed) = call(
            app,
            Method::PATCH,
            &path,
            Some(MASTER),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{changed}");
    }
    (answer["key"].as_str().unwrap().to_string(), id)
}

const ACTIONS: [&str; 7] = [
    "blueprints.read",
    "blueprints.write",
    "items.read",
    "items.write",
    "projects.delete",
    "operations",
    "keys.manage",
];

/// One route: method, path, body, the action it needs, whether it is scoped to project `p`, and
/// whether it needs every project.
struct Route {
    method: Method,
    path: String,
    body: Option<String>,
    action: &'static str,
    scoped: bool,
    everything: bool,
}

fn route(
    method: Method,
    path: &str,
    body: Option<Value>,
    action: &'static str,
    scoped: bool,
) -> Route {
    Route {
        method,
        path: path.to_string(),
        body: body.map(|b| b.to_string()),
        action,
        scoped,
        everything: false,
    }
}

/// Every route of the API, the destructive ones last.
fn routes(id: Uuid) -> Vec<Route> {
    let item = json!({"project_version": 1, "title": "x", "date_created": "2020-01-02"});
    let bulk = format!(
        "{}\n{item}\n",
        json!({"put": {"blueprint": "article", "id": Uuid::new_v4()}})
    );
    // Operations and key management on the whole service need a key that reaches every project.
    let everywhere = |method, path, action| Route {
        everything: true,
        ..route(method, path, None, action, false)
    };
    let mut routes = vec![
        everywhere(Method::GET, "/_health/ready", "operations"),
        everywhere(Method::GET, "/_metrics", "operations"),
        route(
            Method::GET,
            "/_openapi.json",
            None,
            "blueprints.read",
            false,
        ),
        everywhere(Method::GET, "/_dead_letters", "operations"),
        everywhere(Method::POST, "/_dead_letters/_retry", "operations"),
        everywhere(Method::GET, "/_audit", "operations"),
        everywhere(Method::GET, "/_keys", "keys.manage"),
        route(Method::GET, "/_version", None, "blueprints.read", false),
        route(Method::GET, "/_project", None, "blueprints.read", false),
        route(
            Method::PUT,
            "/_project",
            Some(json!({"p": {"article": article()}})),
            "blueprints.write",
            false,
        ),
        route(Method::GET, "/p/_blueprint", None, "blueprints.read", true),
        route(
            Method::PUT,
            "/p/_blueprint",
            Some(json!({"article": article()})),
            "blueprints.write",
            true,
        ),
        route(
            Method::GET,
            "/p/_blueprint/1",
            None,
            "blueprints.read",
            true,
        ),
        route(
            Method::GET,
            "/p/article/_blueprint",
            None,
            "blueprints.read",
            true,
        ),
        route(
            Method::PUT,
            "/p/article/_blueprint",
            Some(article()),
            "blueprints.write",
            true,
        ),
        route(
            Method::GET,
            "/p/article/_blueprint/1",
            None,
            "blueprints.read",
            true,
        ),
        route(Method::GET, "/p/_version", None, "blueprints.read", true),
        route(Method::POST, "/p/_version", None, "blueprints.write", true),
        route(Method::GET, "/p/_catalog", None, "operations", true),
        route(Method::GET, "/p/_dead_letters", None, "operations", true),
        route(
            Method::POST,
            "/p/_dead_letters/_retry",
            None,
            "operations",
            true,
        ),
        route(Method::GET, "/p/_project", None, "blueprints.read", true),
        route(
            Method::PUT,
            "/p/_project",
            Some(json!({"article": article()})),
            "blueprints.write",
            true,
        ),
        route(
            Method::PUT,
            &format!("/p/article/{id}"),
            Some(item.clone()),
            "items.write",
            true,
        ),
        route(
            Method::GET,
            &format!("/p/article/{id}"),
            None,
            "items.read",
            true,
        ),
        route(
            Method::POST,
            "/p/article",
            Some(item.clone()),
            "items.write",
            true,
        ),
        route(
            Method::DELETE,
            &format!("/p/article/{id}"),
            None,
            "items.write",
            true,
        ),
        route(
            Method::GET,
            "/p/article/_blueprint/1",
            None,
            "blueprints.read",
            true,
        ),
        route(
            Method::DELETE,
            "/p/article/_blueprint",
            None,
            "blueprints.write",
            true,
        ),
        route(
            Method::POST,
            "/p/_version/1/_retire",
            None,
            "blueprints.write",
            true,
        ),
        route(Method::DELETE, "/p/_project", None, "projects.delete", true),
    ];
    routes.insert(
        24,
        Route {
            body: Some(bulk),
            ..route(Method::POST, "/p/_bulk", None, "items.write", true)
        },
    );
    let at = routes
        .iter()
        .position(|r| r.path == "/p/_catalog")
        .expect("the catalog route")
        + 1;
    let evolution_and_feed = [
        route(Method::GET, "/p/_version/1", None, "blueprints.read", true),
        route(
            Method::GET,
            "/p/_diff?from=1&to=1",
            None,
            "blueprints.read",
            true,
        ),
        route(Method::GET, "/p/_settings", None, "blueprints.read", true),
        route(
            Method::PUT,
            "/p/_settings",
            Some(json!({"compatibility": "lossless"})),
            "blueprints.write",
            true,
        ),
        route(Method::GET, "/p/_changes", None, "items.read", true),
        route(
            Method::GET,
            "/p/_changes?feed=longpoll&timeout=0",
            None,
            "items.read",
            true,
        ),
    ];
    for (offset, route) in evolution_and_feed.into_iter().enumerate() {
        routes.insert(at + offset, route);
    }
    routes.push(Route {
        everything: true,
        ..route(Method::DELETE, "/_project", None, "projects.delete", false)
    });
    routes
}

#[tokio::test]
async fn every_route_answers_401_without_a_valid_key_403_without_its_action_or_project_and_serves_the_right_key(
) {
    let app = secured().await;
    let (admin, _) = key(&app, &["*"], &["*"], None).await;
    // The project exists, frozen, before the matrix runs.
    let (status, body) = call(
        &app,
        Method::PUT,
        "/p/article/_blueprint",
        Some(&admin),
        Some(&article().to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(&app, Method::POST, "/p/_version", Some(&admin), None)
            .await
            .0,
        200
    );

    struct Keys {
        right: String,
        right_everywhere: String,
        other_project: String,
        other_action: String,
        expired: String,
        revoked: String,
    }
    let mut keys = std::collections::HashMap::new();
    for action in ACTIONS {
        let others: Vec<&str> = ACTIONS.iter().copied().filter(|a| *a != action).collect();
        let (revoked, revoked_id) = key(&app, &[action], &["p"], None).await;
        let (status, _) = call(
            &app,
            Method::DELETE,
            &format!("/_keys/{revoked_id}"),
            Some(MASTER),
            None,
        )
        .await;
        assert_eq!(status, 200);
        keys.insert(
            action,
            Keys {
                right: key(&app, &[action], &["p"], None).await.0,
                right_everywhere: key(&app, &[action], &["*"], None).await.0,
                other_project: key(&app, &[action], &["other"], None).await.0,
                other_action: key(&app, &others, &["*"], None).await.0,
                expired: key(&app, &[action], &["p"], Some("2020-01-01T00:00:00Z"))
                    .await
                    .0,
                revoked,
            },
        );
    }

    let id = Uuid::new_v4();
    for route in routes(id) {
        let keys = &keys[route.action];
        let what = format!("{} {}", route.method, route.path);
        let send = |key: Option<String>| {
            let (method, path, body) =
                (route.method.clone(), route.path.clone(), route.body.clone());
            let app = &app;
            async move { call(app, method, &path, key.as_deref(), body.as_deref()).await }
        };
        let (status, body) = send(None).await;
        if route.path == "/_health/ready" {
            // A load balancer's question: the status alone, nothing of projects or stores.
            assert_eq!(status, 200, "{what} without a key: {body}");
            assert_eq!(body, json!({"status": "ready"}), "{what} without a key");
        } else {
            assert_eq!(status, 401, "{what} without a key: {body}");
        }
        assert_eq!(
            send(Some(keys.expired.clone())).await.0,
            401,
            "{what} with an expired key"
        );
        assert_eq!(
            send(Some(keys.revoked.clone())).await.0,
            401,
            "{what} with a revoked key"
        );
        assert_eq!(
            send(Some(keys.other_action.clone())).await.0,
            403,
            "{what} with a key without {}",
            route.action
        );
        if route.scoped || route.everything {
            assert_eq!(
                send(Some(keys.other_project.clone())).await.0,
                403,
                "{what} with another project's key"
            );
        }
        let right = if route.everything {
            &keys.right_everywhere
        } else {
            &keys.right
        };
        let (status, body) = send(Some(right.clone())).await;
        assert!(
            status != 401 && status != 403 && status < 500,
            "{what} with the right key: {status} {body}"
        );
        if route.path == "/_health/ready" {
            assert!(
                body["projectors"].is_object(),
                "{what} with the right key: {body}"
            );
        }
    }
    app.stop().await;
}

/// A request carrying two `Authorization` headers has no key dstore takes, whichever comes first:
/// a proxy in front could read the other one.
#[tokio::test]
async fn a_request_with_two_authorization_headers_has_no_key() {
    let app = secured().await;
    let (secret, _) = key(&app, &["*"], &["*"], None).await;
    let url = format!("{}/_project", app.address);
    let valid = format!("Bearer {secret}");
    let alone = app
        .client
        .get(&url)
        .header("authorization", &valid)
        .send()
        .await
        .unwrap();
    assert_eq!(alone.status(), 200);
    for pair in [
        [valid.as_str(), "Bearer nothing"],
        ["Bearer nothing", valid.as_str()],
    ] {
        let answer = app
            .client
            .get(&url)
            .header("authorization", pair[0])
            .header("authorization", pair[1])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401, "{pair:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn master_keys_only_manage_keys_and_two_may_be_valid_while_rotating() {
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into(), "the-previous-master-key-0123".into()];
    })
    .await;
    assert_eq!(
        call(&app, Method::GET, "/_keys", Some(MASTER), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            &app,
            Method::GET,
            "/_keys",
            Some("the-previous-master-key-0123"),
            None
        )
        .await
        .0,
        200
    );
    let (status, body) = call(&app, Method::GET, "/_version", Some(MASTER), None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        call(
            &app,
            Method::GET,
            "/_keys",
            Some("not-the-master-key-0123456"),
            None
        )
        .await
        .0,
        401
    );
    app.stop().await;
}

#[tokio::test]
async fn a_secret_replaced_by_a_rotation_works_through_its_grace_but_manages_no_keys() {
    let app = secured().await;
    let (old, id) = key(&app, &["*"], &["*"], None).await;
    let (status, rotated) = call(
        &app,
        Method::POST,
        &format!("/_keys/{id}/_rotate?grace=3600"),
        Some(MASTER),
        None,
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["key"].as_str().unwrap().to_string();
    // The old secret keeps the clients that still send it working…
    let (status, body) = call(
        &app,
        Method::PUT,
        "/blog/article/_blueprint",
        Some(&old),
        Some(&article().to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // …but whoever holds it (it may have leaked) cannot rotate the key to a secret of their own,
    // make a key, change or revoke one.
    let made = json!({"name": "mine", "actions": ["*"], "projects": ["*"], "expires_at": null});
    for (method, path, body) in [
        (Method::POST, format!("/_keys/{id}/_rotate?grace=0"), None),
        (Method::POST, "/_keys".to_string(), Some(made.to_string())),
        (
            Method::PATCH,
            format!("/_keys/{id}"),
            Some(r#"{"name": "x"}"#.to_string()),
        ),
        (Method::DELETE, format!("/_keys/{id}"), None),
        (Method::GET, "/_keys".to_string(), None),
    ] {
        let (status, answer) = call(&app, method.clone(), &path, Some(&old), body.as_deref()).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(
            answer["status"]
                .as_str()
                .unwrap()
                .contains("with the secret its last rotation replaced"),
            "{answer}"
        );
    }
    // The current secret still works, and may manage keys.
    let (status, body) = call(&app, Method::GET, "/_keys", Some(&new), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&app, Method::GET, "/blog/_blueprint", Some(&old), None).await;
    assert_eq!(status, 200, "{body}");
    // The audit log tells the replaced secret's uses from the current one's: who still sends
    // it (a leaked copy, say) is seen before the grace ends.
    let mut names = Vec::new();
    for _ in 0..50 {
        let entries =
            call(&app, Method::GET, "/_audit", Some(&new), None).await.1["entries"].clone();
        names = entries
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["path"] == "/blog/article/_blueprint")
            .map(|e| e["key_name"].as_str().unwrap().to_string())
            .collect();
        if !names.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names, ["test (its replaced secret)"]);
    app.stop().await;
}

/// `GET /_keys` answers at most 1000 keys a page, oldest first, with the next page's `after`;
/// `dstore keys list` follows the pages to the end.
#[tokio::test]
async fn keys_are_listed_a_page_at_a_time_and_the_cli_reads_every_page() {
    let app = secured().await;
    for chunk in 0..21 {
        let made = (0..50).map(|n| {
            let app = &app;
            async move {
                let name = json!({"name": format!("k{chunk}-{n}"), "actions": ["items.read"],
                    "projects": ["*"]});
                call(
                    app,
                    Method::POST,
                    "/_keys",
                    Some(MASTER),
                    Some(&name.to_string()),
                )
                .await
            }
        });
        for (status, body) in futures::future::join_all(made).await {
            assert_eq!(status, 201, "{body}");
        }
    }
    let (status, first) = call(&app, Method::GET, "/_keys", Some(MASTER), None).await;
    assert_eq!(status, 200);
    assert_eq!(first["keys"].as_array().unwrap().len(), 1000);
    let next = first["next"].as_str().expect("a next page").to_string();
    let (status, last) = call(
        &app,
        Method::GET,
        &format!("/_keys?after={next}"),
        Some(MASTER),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(last["keys"].as_array().unwrap().len(), 50);
    assert!(last.get("next").is_none(), "{}", last["next"]);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=0123456789abcdef", "after"),
    ] {
        let (status, body) = call(
            &app,
            Method::GET,
            &format!("/_keys?{query}"),
            Some(MASTER),
            None,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.to_string().contains(field), "{query}: {body}");
    }
    let (address, key) = (app.address.clone(), MASTER.to_string());
    let listed = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dstore"))
            .args(["keys", "list", "--json"])
            .env("DSTORE_SERVER", address)
            .env("DSTORE_API_KEY", key)
            .env_remove("DSTORE_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let body: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(body["keys"].as_array().unwrap().len(), 1050);
    assert!(body.get("next").is_none());
    app.stop().await;
}

/// The two answers that carry a new secret (a key made, a key rotated) tell every cache on the
/// way not to keep them.
#[tokio::test]
async fn answers_carrying_a_secret_are_never_stored_by_caches() {
    let app = secured().await;
    let made = app
        .client
        .post(format!("{}/_keys", app.address))
        .bearer_auth(MASTER)
        .json(&json!({"name": "k", "actions": ["items.read"], "projects": ["*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    assert_eq!(made.headers()["cache-control"], "no-store");
    let id = made.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = app
        .client
        .post(format!("{}/_keys/{id}/_rotate", app.address))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);
    assert_eq!(rotated.headers()["cache-control"], "no-store");
    app.stop().await;
}

#[tokio::test]
async fn keys_are_shown_once_listed_without_secrets_rotated_with_a_grace_and_scoped_listings() {
    let app = secured().await;
    let (admin, _) = key(&app, &["*"], &["*"], None).await;
    for project in ["blog", "shop_eu", "shop_us"] {
        let (status, _) = call(
            &app,
            Method::PUT,
            &format!("/{project}/article/_blueprint"),
            Some(&admin),
            Some(&article().to_string()),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (reader, reader_id) = key(&app, &["blueprints.read"], &["shop_*"], None).await;
    let (status, listed) = call(&app, Method::GET, "/_project", Some(&reader), None).await;
    assert_eq!(status, 200);
    let mut names: Vec<&String> = listed.as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["shop_eu", "shop_us"],
        "a key lists only the projects it may read"
    );

    let (_, keys) = call(&app, Method::GET, "/_keys", Some(MASTER), None).await;
    let text = keys.to_string();
    assert!(
        !text.contains(&reader[24..]),
        "listings never show a secret"
    );
    let (_, shown) = call(
        &app,
        Method::GET,
        &format!("/_keys/{reader_id}"),
        Some(MASTER),
        None,
    )
    .await;
    assert!(
        shown.get("key").is_none() && shown["projects"] == json!(["shop_*"]),
        "{shown}"
    );

    // Rotation: the new secret works at once, the old one until its grace ends.
    let (status, rotated) = call(
        &app,
        Method::POST,
        &format!("/_keys/{reader_id}/_rotate?grace=5"),
        Some(MASTER),
        None,
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new, reader);
    assert_eq!(
        call(&app, Method::GET, "/shop_eu/_version", Some(&new), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, Method::GET, "/shop_eu/_version", Some(&reader), None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(5200)).await;
    assert_eq!(
        call(&app, Method::GET, "/shop_eu/_version", Some(&reader), None)
            .await
            .0,
        401
    );

    // A key's actions and projects can change; last use shows.
    let (status, changed) = call(
        &app,
        Method::PATCH,
        &format!("/_keys/{reader_id}"),
        Some(MASTER),
        Some(r#"{"projects": ["blog"]}"#),
    )
    .await;
    assert_eq!((status, &changed["projects"]), (200, &json!(["blog"])));
    assert_eq!(
        call(&app, Method::GET, "/shop_eu/_blueprint", Some(&new), None)
            .await
            .0,
        403
    );
    let (status, invalid) = call(
        &app,
        Method::POST,
        "/_keys",
        Some(MASTER),
        Some(r#"{"name": "x", "actions": ["items.fly"], "projects": ["Bad Name"]}"#),
    )
    .await;
    assert_eq!(status, 422, "{invalid}");
    let paths: Vec<&str> = invalid["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/actions/0", "/projects/0"]);
    app.stop().await;
}

/// A key's name and description are shown in terminals (`dstore keys list`) and the audit log: an
/// escape sequence or a bidirectional override is refused, naming the field; a description may
/// hold lines.
#[tokio::test]
async fn a_key_name_with_a_control_character_or_an_override_is_refused() {
    let app = secured().await;
    let key = |name: &str, description: &str| {
        json!({"name": name, "description": description, "actions": ["items.read"], "projects": ["*"]})
            .to_string()
    };
    for (body, field) in [
        (key("a\u{1b}]0;owned\u{7}", ""), "/name"),
        (key("admin\u{202e}txt", ""), "/name"),
        (key("two\nlines", ""), "/name"),
        (key("a\u{2028}b\u{200f}\u{feff}", ""), "/name"),
        (key("n", "\u{9b}31m"), "/description"),
    ] {
        let (status, refused) = call(&app, Method::POST, "/_keys", Some(MASTER), Some(&body)).await;
        assert_eq!(status, 422, "{body}: {refused}");
        assert_eq!(refused["errors"][0]["path"], field, "{refused}");
    }
    let body = key("n", "line one\r\n\tline two");
    let (status, made) = call(&app, Method::POST, "/_keys", Some(MASTER), Some(&body)).await;
    assert_eq!(status, 201, "{made}");
    // A body that is no object is refused as such, without the name of a type inside dstore.
    let id = made["id"].as_str().unwrap().to_string();
    for body in ["null", "[]", "7", "\"name\""] {
        for (method, path) in [
            (Method::POST, "/_keys".to_string()),
            (Method::PATCH, format!("/_keys/{id}")),
        ] {
            let (status, refused) = call(&app, method, &path, Some(MASTER), Some(body)).await;
            assert_eq!(status, 422, "{body}: {refused}");
            let message = refused["errors"][0]["message"].as_str().unwrap();
            assert!(
                message.starts_with("must be an object") && !message.contains("KeyInput"),
                "{body}: {refused}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn every_change_is_audited_with_its_key_and_refused_ones_too() {
    let app = secured().await;
    let (writer, writer_id) = key(&app, &["blueprints.write"], &["blog"], None).await;
    let (ops, _) = key(&app, &["operations"], &["*"], None).await;
    call(
        &app,
        Method::PUT,
        "/blog/article/_blueprint",
        Some(&writer),
        Some(&article().to_string()),
    )
    .await;
    call(
        &app,
        Method::PUT,
        "/shop/article/_blueprint",
        Some(&writer),
        Some(&article().to_string()),
    )
    .await;
    call(
        &app,
        Method::PUT,
        "/blog/article/_blueprint",
        None,
        Some(&article().to_string()),
    )
    .await;
    // A method the server does not know is audited under its own name.
    let purge = Method::from_bytes(b"PURGE").unwrap();
    call(&app, purge, "/blog/article/_blueprint", Some(&writer), None).await;
    let mut entries = Value::Null;
    for _ in 0..50 {
        entries = call(&app, Method::GET, "/_audit", Some(&ops), None).await.1["entries"].clone();
        if entries.as_array().is_some_and(|e| e.len() >= 6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<(String, String, String, u64)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key_id"].as_str().unwrap().to_string(),
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for expected in [
        (
            "master".to_string(),
            "POST".to_string(),
            "/_keys".to_string(),
            201,
        ),
        (
            writer_id.clone(),
            "PUT".into(),
            "/blog/article/_blueprint".into(),
            200,
        ),
        (
            writer_id.clone(),
            "PUT".into(),
            "/shop/article/_blueprint".into(),
            403,
        ),
        (
            "-".into(),
            "PUT".into(),
            "/blog/article/_blueprint".into(),
            401,
        ),
        (
            writer_id.clone(),
            "PURGE".into(),
            "/blog/article/_blueprint".into(),
            405,
        ),
    ] {
        assert!(seen.contains(&expected), "{expected:?} in {seen:?}");
    }
    // A key's creation records the new key's id, which its path cannot name.
    let created: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/_keys" && e["status"] == 201)
        .filter_map(|e| e["created"].as_str())
        .collect();
    assert!(created.contains(&writer_id.as_str()), "{entries}");
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["path"] == "/_keys" || e.get("created").is_none()),
        "{entries}"
    );
    assert_eq!(
        call(&app, Method::GET, "/_audit", Some(&writer), None)
            .await
            .0,
        403
    );
    let (status, _) = call(
        &app,
        Method::GET,
        "/_audit?since=yesterday",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(status, 400);
    app.stop().await;
}

/// A key that manages keys reaches every project and grants, widens, rotates or revokes no key
/// holding an action it lacks; hostile key bodies are refused naming the member, briefly.
#[tokio::test]
async fn a_key_manager_grants_no_more_than_it_holds() {
    let app = secured().await;
    let (admin, admin_id) = key(&app, &["*"], &["*"], None).await;
    let (scoped, _) = key(&app, &["keys.manage"], &["blog"], None).await;
    let (manager, _) = key(&app, &["keys.manage", "items.write"], &["*"], None).await;
    let body = |actions: &[&str]| {
        Some(json!({"name": "made", "actions": actions, "projects": ["*"]}).to_string())
    };
    let post = |key: String, actions: &'static [&'static str]| {
        let app = &app;
        async move {
            call(
                app,
                Method::POST,
                "/_keys",
                Some(&key),
                body(actions).as_deref(),
            )
            .await
        }
    };
    // A manager of one project's keys could make a key for every project: refused.
    assert_eq!(post(scoped.clone(), &["items.write"]).await.0, 403);
    assert_eq!(
        call(&app, Method::GET, "/_keys", Some(&scoped), None)
            .await
            .0,
        403
    );
    let (status, made) = post(manager.clone(), &["items.write"]).await;
    assert_eq!(status, 201, "{made}");
    let made_id = made["id"].as_str().unwrap().to_string();
    for actions in [
        &["*"][..],
        &["blueprints.write"],
        &["keys.manage", "operations"],
    ] {
        let (status, answer) = post(manager.clone(), actions).await;
        assert_eq!(status, 403, "{actions:?}: {answer}");
    }
    let widen = json!({"actions": ["*"]}).to_string();
    let rename = json!({"name": "renamed"}).to_string();
    for (method, path, body, expected) in [
        (
            Method::PATCH,
            format!("/_keys/{made_id}"),
            Some(&widen),
            403,
        ),
        (
            Method::PATCH,
            format!("/_keys/{made_id}"),
            Some(&rename),
            200,
        ),
        (
            Method::PATCH,
            format!("/_keys/{admin_id}"),
            Some(&rename),
            403,
        ),
        (
            Method::POST,
            format!("/_keys/{admin_id}/_rotate"),
            None,
            403,
        ),
        (Method::DELETE, format!("/_keys/{admin_id}"), None, 403),
        (Method::POST, format!("/_keys/{made_id}/_rotate"), None, 200),
        (Method::DELETE, format!("/_keys/{made_id}"), None, 200),
    ] {
        let (status, answer) = call(
            &app,
            method.clone(),
            &path,
            Some(&manager),
            body.map(|b| b.as_str()),
        )
        .await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
    }
    // The admin key is untouched and still works.
    assert_eq!(
        call(&app, Method::GET, "/_keys", Some(&admin), None)
            .await
            .0,
        200
    );
    // A manager that expires makes no key that outlives it, nor prolongs itself.
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let sooner = (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339();
    let (brief, brief_id) = key(&app, &["keys.manage", "items.read"], &["*"], Some(&soon)).await;
    for (method, path, body, expected) in [
        (
            Method::POST,
            "/_keys".to_string(),
            json!({"name": "n", "actions": ["items.read"], "projects": ["*"]}),
            403,
        ),
        (
            Method::POST,
            "/_keys".to_string(),
            json!({"name": "n", "actions": ["items.read"], "projects": ["*"], "expires_at": sooner}),
            201,
        ),
        (
            Method::PATCH,
            format!("/_keys/{brief_id}"),
            json!({"expires_at": null}),
            403,
        ),
    ] {
        let (status, answer) = call(
            &app,
            method.clone(),
            &path,
            Some(&brief),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, expected, "{method} {path} {body}: {answer}");
    }

    // Hostile bodies: named by member, never repeated whole.
    let long = "x".repeat(100_000);
    let patterns: Vec<String> = (0..101).map(|i| format!("p{i}")).collect();
    for (body, path) in [
        (json!({ long.clone(): 1 }), "/xxxx"),
        (
            json!({"name": "a", "actions": long, "projects": ["*"]}),
            "/actions",
        ),
        (
            json!({"name": "a", "actions": ["items.read"], "projects": patterns}),
            "/projects",
        ),
    ] {
        let (status, answer) = call(
            &app,
            Method::POST,
            "/_keys",
            Some(MASTER),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 422, "{path}");
        let text = answer.to_string();
        assert!(text.len() < 2000, "{path}: {} bytes", text.len());
        let named = answer["errors"][0]["path"].as_str().unwrap();
        assert!(named.starts_with(path), "{named} for {path}");
    }
    let (status, answer) = call(
        &app,
        Method::GET,
        &format!("/_keys/{}", &long[..10_000]),
        Some(MASTER),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert!(answer.to_string().len() < 2000);
    // An expiry outside the years 1 to 9999 in UTC could not be written in RFC 3339; a key is
    // never made expired, which could never be used.
    for (expires_at, expected) in [
        ("9999-12-31T23:59:59-23:59", 422),
        ("0000-01-01T00:00:00+23:59", 422),
        ("0000-12-31T23:59:59Z", 422),
        ("0001-01-01T00:00:00Z", 422),
        ("2020-01-01T00:00:00Z", 422),
        ("9999-12-31T00:00:00Z", 201),
    ] {
        let body = json!({"name": "a", "actions": ["items.read"], "projects": ["*"],
            "expires_at": expires_at});
        let (status, answer) = call(
            &app,
            Method::POST,
            "/_keys",
            Some(MASTER),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, expected, "{expires_at}: {answer}");
    }
    // A projector that is not enabled is named as such, for a listing as for a retry.
    for (method, path) in [
        (Method::GET, "/_dead_letters?projector=nope"),
        (Method::POST, "/_dead_letters/_retry?projector=nope"),
    ] {
        assert_eq!(
            call(&app, method, path, Some(&admin), None).await.0,
            404,
            "{path}"
        );
    }
    app.stop().await;
}

/// A write is journaled before it waits for the stores: a client that leaves while it waits
/// (its connection reset) leaves an entry all the same, with status 499, since what it asked was
/// done. Before, the entry was made only once the handler answered, and was lost with it.
#[tokio::test]
async fn a_write_whose_client_left_before_the_answer_is_audited() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let stalled = crate::projectors::Broken::default();
    stalled.fixed.store(true, Ordering::SeqCst);
    stalled.down.store(true, Ordering::SeqCst);
    let app = crate::helpers::spawn_app_with_projectors(
        |s| s.auth.master_keys = vec![MASTER.into()],
        vec![std::sync::Arc::new(stalled.clone())],
    )
    .await;
    let (admin, _) = key(&app, &["*"], &["*"], None).await;
    let blueprint = article().to_string();
    let path = "/blog/article/_blueprint";
    let (status, _) = call(&app, Method::PUT, path, Some(&admin), Some(&blueprint)).await;
    assert_eq!(status, 200);
    let (status, answer) = call(&app, Method::POST, "/blog/_version", Some(&admin), None).await;
    assert_eq!(status, 200, "{answer}");
    let (writer, writer_id) = key(&app, &["items.write"], &["blog"], None).await;
    let (ops, _) = key(&app, &["operations"], &["*"], None).await;
    let id = Uuid::new_v4();
    let item = json!({"project_version": 1, "title": "left", "date_created": "2020-01-02"});
    let body = item.to_string();
    let address = app.address.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.set_zero_linger().unwrap();
    let mut stream = stream;
    let request = format!(
        "PUT /blog/article/{id}?wait=true&timeout=600 HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {writer}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let item_path = format!("/blog/article/{id}");
    let mut written = false;
    for _ in 0..100 {
        if call(&app, Method::GET, &item_path, Some(&admin), None)
            .await
            .0
            == 200
        {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written, "the write was not journaled");
    // Reset, not closed: the server reads the reset while the write waits for the stores.
    drop(stream);
    let mut found = Value::Null;
    for _ in 0..100 {
        let (_, answer) = call(&app, Method::GET, "/_audit?limit=1000", Some(&ops), None).await;
        found = answer["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == item_path.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        if !found.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found["status"], 499, "{found}");
    assert_eq!(found["key_id"], writer_id.as_str(), "{found}");
    assert_eq!(found["method"], "PUT", "{found}");
    stalled.down.store(false, Ordering::SeqCst);
    app.stop().await;
}

/// Reads the audit log (with `ops`, a key for `operations`) until it accounts for the `sent`
/// requests without a key a test made (recorded one by one: the entries `alone` picks; or counted
/// in a summary of requests without a valid key) and for `keyed` entries of `ops`' own, and that
/// some were counted rather than recorded one by one. Every entry passes `check`.
async fn accounted(
    app: &TestApp,
    (ops, ops_id): (&str, &str),
    (sent, keyed): (u64, u64),
    alone: impl Fn(&Value) -> bool,
    check: impl Fn(&Value),
) {
    let (mut one_by_one, mut counted, mut by_key) = (0, 0, 0);
    for _ in 0..60 {
        let (_, answer) = call(app, Method::GET, "/_audit?limit=1000", Some(ops), None).await;
        (one_by_one, counted, by_key) = (0, 0, 0);
        for entry in answer["entries"].as_array().unwrap() {
            check(entry);
            let path = entry["path"].as_str().unwrap();
            if entry["key_id"] == ops_id {
                by_key += 1;
            } else if alone(entry) {
                one_by_one += 1;
            } else if let Some((n, rest)) = path.split_once(' ') {
                assert!(
                    rest.starts_with("more requests without a valid key"),
                    "{path}"
                );
                counted += n.parse::<u64>().unwrap();
            }
        }
        if one_by_one + counted == sent && by_key == keyed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        one_by_one + counted,
        sent,
        "{one_by_one} recorded, {counted} counted"
    );
    assert_eq!(by_key, keyed);
    // A few a second are recorded alone: the requests took less than ten seconds, even on a
    // loaded machine, so some were counted instead.
    assert!(
        counted > 0,
        "{one_by_one} of {sent} recorded one by one, none counted"
    );
}

/// A flood of writes without a key grows the audit log by a bounded number of entries a second:
/// a few one by one, the rest counted in one entry per second; a key's own writes are all there.
#[tokio::test]
async fn refusals_without_a_key_are_recorded_a_few_a_second_and_the_rest_counted() {
    let app = secured().await;
    let (ops, ops_id) = key(&app, &["operations", "blueprints.write"], &["*"], None).await;
    let sent = 100;
    for i in 0..sent {
        let path = format!("/flood/article/_blueprint?n={i}");
        let (status, _) = call(&app, Method::PUT, &path, None, Some("{}")).await;
        assert_eq!(status, 401);
    }
    let blueprint = article().to_string();
    for _ in 0..3 {
        let path = "/flood/article/_blueprint";
        let (status, _) = call(&app, Method::PUT, path, Some(&ops), Some(&blueprint)).await;
        assert_eq!(status, 200);
    }
    // Every refusal is either recorded or counted, once its second is over.
    let alone = |entry: &Value| {
        let path = entry["path"].as_str().unwrap();
        path.starts_with("/flood/article/_blueprint") && entry["status"] == 401
    };
    accounted(&app, (&ops, &ops_id), (sent, 3), alone, |_| {}).await;
    app.stop().await;
}

/// A key refused the action it asks for changes nothing either: its refusals are recorded a few a
/// second and the rest counted, so a key that may only read cannot fill the disk with the log.
#[tokio::test]
async fn refusals_of_a_key_are_recorded_a_few_a_second_and_the_rest_counted() {
    let app = secured().await;
    let (ops, ops_id) = key(&app, &["operations", "blueprints.write"], &["*"], None).await;
    let (reader, _) = key(&app, &["items.read"], &["*"], None).await;
    let sent = 100;
    for i in 0..sent {
        let path = format!("/flood/article/_blueprint?n={i}");
        let (status, _) = call(&app, Method::PUT, &path, Some(&reader), Some("{}")).await;
        assert_eq!(status, 403);
    }
    let blueprint = article().to_string();
    let path = "/flood/article/_blueprint";
    let (status, _) = call(&app, Method::PUT, path, Some(&ops), Some(&blueprint)).await;
    assert_eq!(status, 200);
    let alone = |entry: &Value| {
        let path = entry["path"].as_str().unwrap();
        path.starts_with("/flood/article/_blueprint") && entry["status"] == 403
    };
    accounted(&app, (&ops, &ops_id), (sent, 1), alone, |_| {}).await;
    app.stop().await;
}

/// A key that may only read, sending requests that pass its check to routes that only read (a
/// `POST` to `_changes` or `_version`, answered 404 or 405), vouches for nothing either: recorded
/// a few a second, the rest counted, so it cannot fill the disk with the log.
#[tokio::test]
async fn a_reading_key_s_requests_to_reading_routes_are_recorded_a_few_a_second() {
    let app = secured().await;
    let (ops, ops_id) = key(&app, &["operations"], &["*"], None).await;
    let (reader, _) = key(&app, &["items.read", "blueprints.read"], &["*"], None).await;
    let sent = 100;
    for i in 0..sent {
        let path = if i % 2 == 0 {
            format!("/flood/_changes{}", "/".repeat(i))
        } else {
            "/_version".to_string()
        };
        let (status, _) = call(&app, Method::POST, &path, Some(&reader), None).await;
        assert!([404, 405].contains(&status), "{path}: {status}");
    }
    let alone = |entry: &Value| {
        let path = entry["path"].as_str().unwrap();
        (path.starts_with("/flood/_changes") || path == "/_version")
            && [404, 405].contains(&entry["status"].as_u64().unwrap())
    };
    accounted(&app, (&ops, &ops_id), (sent as u64, 0), alone, |_| {}).await;
    app.stop().await;
}

/// Requests without a key to an open route (`/_health`) vouch for nothing either: recorded a few
/// a second like refusals, the rest counted; a method of any length is kept cut short.
#[tokio::test]
async fn requests_without_a_key_to_open_routes_are_recorded_a_few_a_second_methods_cut() {
    let app = secured().await;
    let (ops, ops_id) = key(&app, &["operations"], &["*"], None).await;
    let long = Method::from_bytes("A".repeat(10_000).as_bytes()).unwrap();
    let (status, _) = call(&app, long, "/_health", None, None).await;
    assert!((400..500).contains(&status), "{status}");
    let sent = 101;
    for _ in 1..sent {
        let (status, _) = call(&app, Method::POST, "/_health", None, None).await;
        assert_eq!(status, 405);
    }
    let short = |entry: &Value| {
        let method = entry["method"].as_str().unwrap();
        assert!(method.len() <= 40, "{} bytes of method", method.len());
        assert!(entry["path"].as_str().unwrap().len() < 200, "{entry}");
    };
    let alone = |entry: &Value| entry["path"] == "/_health";
    accounted(&app, (&ops, &ops_id), (sent, 0), alone, short).await;
    app.stop().await;
}

/// Without a master key every route is open, on a loopback address only: a browser's page whose
/// own name a DNS rebinding points at 127.0.0.1 sends that name, same-origin, so only the name
/// tells it apart. Requests naming another host are refused; this machine's names are served.
#[tokio::test]
async fn without_a_master_key_only_requests_naming_this_machine_are_served() {
    let app = crate::helpers::spawn_app().await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    let send = |host: String| {
        app.client
            .delete(format!("{}/_project", app.address))
            .header("Host", host.clone())
            .header("Origin", format!("http://{host}"))
            .header("Sec-Fetch-Site", "same-origin")
            .send()
    };
    for host in [
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
    ] {
        let answer = send(format!("{host}:{port}")).await.unwrap();
        assert_eq!(answer.status().as_u16(), 403, "{host}");
        let body: Value = answer.json().await.unwrap();
        assert!(
            body["status"].as_str().unwrap().contains("master key"),
            "{body}"
        );
    }
    for host in [
        "localhost",
        "127.0.0.1",
        "127.0.0.2",
        "[::1]",
        "dstore.localhost",
    ] {
        let answer = send(format!("{host}:{port}")).await.unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{host}");
    }
    // A target in absolute form names its host, whatever the header says (HTTP's rule).
    for (target, expected) in [
        ("http://evil.example/_version", "403"),
        ("http://localhost/_version", "200"),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected}")),
            "{target}: {answer}"
        );
    }
    app.stop().await;
}

/// With authentication off, `auth.allowed_hosts` is what stops a page whose name a DNS rebinding
/// points at dstore: a request naming another host is refused, whatever it asks; listed names (any
/// case, any port) and requests without `Host` are served.
#[tokio::test]
async fn with_authentication_off_only_allowed_hosts_are_served() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.auth.disabled = true;
        s.auth.allowed_hosts = vec!["localhost".into(), "dstore".into()];
    })
    .await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    let send = |host: String| {
        app.client
            .delete(format!("{}/_project", app.address))
            .header("Host", host.clone())
            .header("Origin", format!("http://{host}"))
            .header("Sec-Fetch-Site", "same-origin")
            .send()
    };
    for host in ["evil.example", "dstore.evil.example", "127.0.0.1"] {
        let answer = send(format!("{host}:{port}")).await.unwrap();
        assert_eq!(answer.status().as_u16(), 403, "{host}");
        let body: Value = answer.json().await.unwrap();
        assert!(
            body["status"].as_str().unwrap().contains("allowed_hosts"),
            "{body}"
        );
    }
    for host in [
        "localhost".to_string(),
        format!("DSTORE:{port}"),
        format!("localhost:{port}"),
    ] {
        let answer = send(host.clone()).await.unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{host}");
    }
    app.stop().await;
}

/// A verb spelled with a percent-escape (`%5F` is `_`) reaches the route the decoded path names,
/// so it needs that route's action: an item writer cannot freeze, edit or drop a project that way,
/// nor can a key scoped to one project drop every project.
#[tokio::test]
async fn a_percent_encoded_verb_needs_the_action_of_the_route_it_reaches() {
    let app = secured().await;
    let (admin, _) = key(&app, &["*"], &["*"], None).await;
    let blueprint = article().to_string();
    let (status, body) = call(
        &app,
        Method::PUT,
        "/p/article/_blueprint",
        Some(&admin),
        Some(&blueprint),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (writer, _) = key(&app, &["items.write", "items.read"], &["p"], None).await;
    let (scoped_all, _) = key(&app, &["*"], &["p"], None).await;
    for (method, path, body, who) in [
        (Method::DELETE, "/p/%5Fproject", None, &writer),
        (Method::DELETE, "/p/%5fproject", None, &writer),
        (Method::POST, "/p/%5Fversion", None, &writer),
        (
            Method::PUT,
            "/p/article/%5Fblueprint",
            Some(blueprint.as_str()),
            &writer,
        ),
        (Method::DELETE, "/p/article/%5Fblueprint", None, &writer),
        (Method::PUT, "/p/%5Fsettings", Some("{}"), &writer),
        (Method::GET, "/p/%5Fcatalog", None, &writer),
        (Method::DELETE, "/%5Fproject", None, &scoped_all),
    ] {
        let (status, answer) = call(&app, method.clone(), path, Some(who), body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }
    // Nothing was dropped or frozen, and the blueprint is still there.
    let (status, answer) = call(
        &app,
        Method::GET,
        "/p/article/_blueprint",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = call(&app, Method::GET, "/p/_version", Some(&admin), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["versions"].as_array().map(Vec::len),
        Some(0),
        "{answer}"
    );
    // With the route's own action, the encoded spelling works as the plain one does.
    let (dropper, _) = key(&app, &["projects.delete"], &["p"], None).await;
    let (status, answer) = call(&app, Method::DELETE, "/p/%5Fproject", Some(&dropper), None).await;
    assert_eq!(status, 200, "{answer}");
    app.stop().await;
}

/// Made-up key ids in well-formed tokens are refused, and however many arrive at once, each costs
/// a read of its one key, never a read of every key.
#[tokio::test]
async fn unknown_key_ids_read_one_key_each_and_never_all_of_them() {
    // More made-up tokens than one address may send a minute: their cost is measured here, their
    // limit below.
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.auth.failed_logins_per_minute = 0;
    })
    .await;
    let started = std::time::Instant::now();
    let sends = (0..300).map(|i| {
        let token = format!("dstore_{i:016x}_{}", "ab".repeat(32));
        let app = &app;
        async move {
            call(app, Method::GET, "/_version", Some(&token), None)
                .await
                .0
        }
    });
    let statuses = futures::future::join_all(sends).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let (operator, _) = key(&app, &["operations"], &["*"], None).await;
    let reads = app
        .metric(Some(&operator), "dstore_auth_unknown_key_reads_total")
        .await;
    assert_eq!(reads, 0.0, "{reads} reads of every key in {elapsed:.2} s");
    // A key made now is known at once.
    let (made, _) = key(&app, &["blueprints.read"], &["*"], None).await;
    assert_eq!(
        call(&app, Method::GET, "/_version", Some(&made), None)
            .await
            .0,
        200
    );
    app.stop().await;
}

/// One address sends tokens that are no key: past a minute's worth it is answered 429 with
/// `Retry-After`, for a made-up key and for the right master key alike (a right guess looks like
/// a wrong one), while a valid API key the node knows still works from it; a missing token costs
/// nothing; the 429s are counted.
#[tokio::test]
async fn failed_logins_from_one_address_are_limited_but_known_keys_are_not() {
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.auth.failed_logins_per_minute = 20;
    })
    .await;
    let (operator, _) = key(&app, &["operations", "blueprints.read"], &["*"], None).await;
    for _ in 0..50 {
        assert_eq!(
            call(&app, Method::GET, "/_version", None, None).await.0,
            401
        );
    }
    let wrong = format!("dstore_{:016x}_{}", 7, "ab".repeat(32));
    for n in 0..20 {
        let (status, body) = call(&app, Method::GET, "/_version", Some(&wrong), None).await;
        assert_eq!(status, 401, "guess {n}: {body}");
    }
    for token in [wrong.as_str(), "a-guess-at-the-master-key-0000", MASTER] {
        let response = app
            .client
            .get(format!("{}/_keys", app.address))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 429, "{token}");
        let after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&after), "{after}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["status"]
                .as_str()
                .unwrap()
                .contains("failed_logins_per_minute"),
            "{body}"
        );
    }
    assert_eq!(
        call(&app, Method::GET, "/_version", Some(&operator), None)
            .await
            .0,
        200
    );
    let limited = app
        .metric(Some(&operator), "dstore_auth_failed_logins_limited_total")
        .await;
    assert_eq!(limited, 3.0);
    // Guesses sent at once share none: each takes its own before it is checked.
    let burst = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.auth.failed_logins_per_minute = 10;
    })
    .await;
    let guesses = (0..40).map(|i| {
        let token = format!("dstore_{i:016x}_{}", "cd".repeat(32));
        let burst = &burst;
        async move {
            call(burst, Method::GET, "/_version", Some(&token), None)
                .await
                .0
        }
    });
    let statuses = futures::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        checked <= 11 && statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    burst.stop().await;
    // Three seconds give back a guess a second: the master key works again.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        call(&app, Method::GET, "/_keys", Some(MASTER), None)
            .await
            .0,
        200
    );
    app.stop().await;
}

/// Behind a trusted proxy (here the loopback address the test connects from), failed logins are
/// counted by the client `X-Forwarded-For` names: one client using up its guesses leaves the
/// master key working for another, and what a client writes before the proxy's entry is not
/// believed. Without the proxy trusted, the header is not read: every client is the proxy.
#[tokio::test]
async fn behind_a_trusted_proxy_failed_logins_are_counted_per_client() {
    let guess = |app: &TestApp, forwarded_for: &str, token: &str| {
        app.client
            .get(format!("{}/_keys", app.address))
            .bearer_auth(token)
            .header("X-Forwarded-For", forwarded_for)
            .send()
    };
    let wrong = format!("dstore_{:016x}_{}", 9, "ef".repeat(32));
    for trusted in [true, false] {
        let app = spawn_app_with(|s| {
            s.auth.master_keys = vec![MASTER.into()];
            s.auth.failed_logins_per_minute = 5;
            if trusted {
                s.auth.trusted_proxies = vec!["127.0.0.0/8".into(), "::1".into()];
            }
        })
        .await;
        for _ in 0..5 {
            let response = guess(&app, "192.0.2.66", &wrong).await.unwrap();
            assert_eq!(response.status().as_u16(), 401);
        }
        // The same client, whatever it makes up before the proxy's entry.
        let again = guess(&app, "198.51.100.7, 192.0.2.66", &wrong)
            .await
            .unwrap();
        assert_eq!(again.status().as_u16(), 429, "trusted: {trusted}");
        // Another client.
        let other = guess(&app, "192.0.2.77", MASTER).await.unwrap();
        let expected = if trusted { 200 } else { 429 };
        assert_eq!(other.status().as_u16(), expected, "trusted: {trusted}");
        // A header value that is not text, after the one the client made up: the walk stops at
        // it, and the request counts for the proxy that sent it, not for the made-up client.
        let unreadable = app
            .client
            .get(format!("{}/_keys", app.address))
            .bearer_auth(MASTER)
            .header("X-Forwarded-For", "192.0.2.66")
            .header(
                "X-Forwarded-For",
                reqwest::header::HeaderValue::from_bytes(b"\x80, 198.51.100.9").unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(unreadable.status().as_u16(), expected, "trusted: {trusted}");
        app.stop().await;
    }
}

#[tokio::test]
async fn a_cross_site_form_post_is_refused_with_or_without_authentication() {
    for app in [secured().await, crate::helpers::spawn_app().await] {
        let response = app
            .client
            .post(format!("{}/p/_version", app.address))
            .header("Origin", "https://evil.example")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("a=b")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status == 401 || status == 403, "{status}");
        let fetch = app
            .client
            .delete(format!("{}/_project", app.address))
            .header("Sec-Fetch-Site", "cross-site")
            .send()
            .await
            .unwrap();
        assert_eq!(fetch.status().as_u16(), 403);
        app.stop().await;
    }
}

#[tokio::test]
async fn public_routes_open_what_auth_public_lists() {
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.auth.public = vec!["ready".into(), "docs".into()];
    })
    .await;
    assert_eq!(call(&app, Method::GET, "/_health", None, None).await.0, 200);
    assert_eq!(call(&app, Method::GET, "/_docs", None, None).await.0, 200);
    assert_eq!(
        call(&app, Method::GET, "/_health/ready", None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, Method::GET, "/_openapi.json", None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, Method::GET, "/_metrics", None, None).await.0,
        401
    );
    assert_eq!(
        call(&app, Method::GET, "/nothing/here/at/all", None, None)
            .await
            .0,
        401
    );
    app.stop().await;
}

/// Readiness and metrics that `auth.public` opens cost the stores one report a second, however
/// many anonymous requests ask: they share it. A request with a key gets its own.
#[tokio::test]
async fn public_readiness_and_metrics_share_one_report_a_second() {
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.auth.public = vec!["ready".into(), "metrics".into()];
    })
    .await;
    let text = |key: Option<&'static str>| {
        let app = &app;
        async move {
            let mut request = app.client.get(format!("{}/_metrics", app.address));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    // The requests counted so far are in the text: a text made again would count the first.
    let first = text(None).await;
    let second = text(None).await;
    assert_eq!(first, second, "one text a second for anonymous requests");
    // A made-up token is no key: it shares the anonymous report, never makes one of its own.
    assert_eq!(
        text(Some("made-up")).await,
        first,
        "a token that is no key shares"
    );
    let keyed = text(Some(MASTER)).await;
    assert_ne!(keyed, first, "a request with a key gets its own");
    let ready = call(&app, Method::GET, "/_health/ready", None, None).await;
    assert_eq!(ready.0, 200);
    assert!(ready.1["projectors"].is_object(), "{}", ready.1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_ne!(text(None).await, first, "made again after a second");
    app.stop().await;
}

#[tokio::test]
async fn dstore_refuses_to_start_with_a_short_master_key_or_open_on_a_public_address() {
    let start = crate::helpers::build_with;
    let short = start(|s| s.auth.master_keys = vec!["short".into()]).await;
    assert!(short.unwrap_err().contains("16 bytes"));
    let plain = start(|s| s.auth.master_keys = vec!["aaaaaaaaaaaaaaaaaaaaaaaa".into()]).await;
    assert!(plain.unwrap_err().contains("distinct characters"));
    let open = start(|s| s.server.host = "0.0.0.0".into()).await;
    let error = open.unwrap_err();
    assert!(
        error.contains("without authentication") && error.contains("DSTORE_MASTER_KEY"),
        "{error}"
    );
    assert!(start(|s| {
        s.server.host = "0.0.0.0".into();
        s.auth.disabled = true;
    })
    .await
    .is_ok());
    assert!(start(|s| s.server.host = "127.0.0.1".into()).await.is_ok());
    // Authentication off beside a master key: the key would close nothing.
    let both = start(|s| {
        s.auth.disabled = true;
        s.auth.master_keys = vec![MASTER.into()];
    })
    .await;
    let error = both.unwrap_err();
    assert!(
        error.contains("auth.disabled") && error.contains("master key"),
        "{error}"
    );
    // A master key file holding no key is refused, not read as "no master key" (open routes).
    fn blank_key_file() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("dstore-blank-master-key-{}", std::process::id()))
    }
    std::fs::write(blank_key_file(), " \n\n").unwrap();
    let blank = start(|s| s.auth.master_key_file = Some(blank_key_file())).await;
    let _ = std::fs::remove_file(blank_key_file());
    assert!(blank.unwrap_err().contains("holds no key"));
    let workers = start(|s| s.server.workers = 513).await;
    assert!(workers.unwrap_err().contains("server.workers"));
    let grace = start(|s| s.auth.rotation_grace_secs = u64::MAX).await;
    assert!(grace.unwrap_err().contains("auth.rotation_grace_secs"));
}

#[tokio::test]
async fn secrets_never_reach_the_data_directory_or_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key_file = dir.path().join("master.key");
    std::fs::write(&key_file, format!("{MASTER}\n")).unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with(
        &data,
        port,
        &[
            ("DSTORE_MASTER_KEY_FILE", key_file.display().to_string()),
            ("DSTORE_LOG", "debug".into()),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let made: Value = client
        .post(server.url("/_keys"))
        .bearer_auth(MASTER)
        .body(r#"{"name": "n", "actions": ["*"], "projects": ["*"]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = made["key"].as_str().unwrap().to_string();
    let answer = client
        .put(server.url("/p/article/_blueprint"))
        .bearer_auth(&secret)
        .body(article().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // A master key pasted where a key id belongs: not an id, so a 404, and not kept either.
    for path in [
        format!("/_keys/{MASTER}"),
        format!("/%5Fkeys/{MASTER}/_rotate"),
    ] {
        let pasted = client
            .delete(server.url(&path))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert!(pasted.status().is_client_error(), "{}", pasted.status());
    }
    server.stop().await;
    let secret_part = secret.rsplit('_').next().unwrap().to_string();
    let mut found = Vec::new();
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        if text.contains(&secret_part) || text.contains(MASTER) {
            found.push(entry.display().to_string());
        }
    }
    assert!(found.is_empty(), "a secret was written to {found:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Reads NDJSON lines from a stream until it ends (or 10 seconds pass); heartbeats left out.
async fn lines_until_the_end(response: reqwest::Response) -> Vec<Value> {
    use futures::StreamExt;
    let mut stream = response.bytes_stream();
    let mut bytes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await {
        bytes.extend_from_slice(&chunk.expect("the stream reads"));
    }
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("a JSON line"))
        .collect()
}

/// A change feed followed with a key, by a stream or a long poll, ends with the 401 or 403 the key
/// would get now once it is revoked or narrowed: no change written after reaches it.
#[tokio::test]
async fn a_followed_change_feed_ends_when_its_key_is_revoked_or_narrowed() {
    let app = secured().await;
    let (writer, _) = key(&app, &["blueprints.write", "items.write"], &["blog"], None).await;
    let blueprint = article().to_string();
    let put = "/blog/article/_blueprint";
    assert_eq!(
        call(&app, Method::PUT, put, Some(&writer), Some(&blueprint))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&app, Method::POST, "/blog/_version", Some(&writer), None)
            .await
            .0,
        200
    );
    let write = || {
        let item = json!({"project_version": 1, "title": "after", "date_created": "2020-01-02"});
        let path = format!("/blog/article/{}", Uuid::new_v4());
        let (app, writer) = (&app, &writer);
        async move {
            let (status, body) = call(
                app,
                Method::PUT,
                &path,
                Some(writer),
                Some(&item.to_string()),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    for (change, code) in [("revoke", 401), ("narrow", 403)] {
        let (reader, id) = key(&app, &["items.read"], &["blog"], None).await;
        let response = app
            .client
            .get(format!(
                "{}/blog/_changes?feed=ndjson&heartbeat=1&since=now",
                app.address
            ))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let changed = if change == "revoke" {
            call(
                &app,
                Method::DELETE,
                &format!("/_keys/{id}"),
                Some(MASTER),
                None,
            )
            .await
        } else {
            let narrower = json!({"projects": ["shop"]}).to_string();
            let path = format!("/_keys/{id}");
            call(&app, Method::PATCH, &path, Some(MASTER), Some(&narrower)).await
        };
        assert_eq!(changed.0, 200, "{}", changed.1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write().await;
        let lines = lines_until_the_end(response).await;
        assert_eq!(lines.len(), 1, "{change}: {lines:?}");
        assert_eq!(lines[0]["code"], code, "{change}: {lines:?}");
    }

    let (reader, id) = key(&app, &["items.read"], &["blog"], None).await;
    let head = call(&app, Method::GET, "/blog/_changes", Some(&reader), None)
        .await
        .1;
    let since = head["last_revision"].as_u64().unwrap();
    let poll = app
        .client
        .get(format!(
            "{}/blog/_changes?feed=longpoll&timeout=10&since={since}",
            app.address
        ))
        .bearer_auth(&reader)
        .send();
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let path = format!("/_keys/{id}");
        assert_eq!(
            call(&app, Method::DELETE, &path, Some(MASTER), None)
                .await
                .0,
            200
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write().await;
    };
    let (answer, ()) = tokio::join!(poll, revoke);
    let answer = answer.unwrap();
    assert_eq!(answer.status(), 401, "{:?}", answer.text().await);
    app.stop().await;
}

/// One API key holds at most a quarter of a node's change feed followers: a tenant that opens
/// long polls and leaves them cannot take every place from another key's followers.
#[tokio::test]
async fn one_key_holds_at_most_a_quarter_of_the_followers() {
    let app = spawn_app_with(|s| {
        s.auth.master_keys = vec![MASTER.into()];
        s.changes.max_followers = 4;
    })
    .await;
    let (greedy, _) = key(&app, &["blueprints.write", "items.read"], &["*"], None).await;
    let (other, _) = key(&app, &["items.read"], &["*"], None).await;
    let blueprint = article().to_string();
    let (status, body) = call(
        &app,
        Method::PUT,
        "/p/article/_blueprint",
        Some(&greedy),
        Some(&blueprint),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&app, Method::POST, "/p/_version", Some(&greedy), None).await;
    assert_eq!(status, 200, "{body}");
    let url = format!("{}/p/_changes?feed=longpoll&timeout=30", app.address);
    let wait = || {
        let (client, greedy, url) = (app.client.clone(), greedy.clone(), url.clone());
        tokio::spawn(async move { client.get(url).bearer_auth(greedy).send().await })
    };
    // The key's long poll takes its one place; a probe that came first takes it for a moment and
    // refuses the long poll, which is then sent again.
    let probe = "/p/_changes?feed=longpoll&timeout=0";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut waiting = wait();
    let refused = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if waiting.is_finished() {
            waiting = wait();
            continue;
        }
        let (status, body) = call(&app, Method::GET, probe, Some(&greedy), None).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the key's long poll took no place"
        );
    };
    assert!(
        refused.to_string().contains("this key already holds 1"),
        "{refused}"
    );
    let (status, body) = call(&app, Method::GET, probe, Some(&other), None).await;
    assert_eq!(status, 200, "another key's follower gets a place: {body}");
    waiting.abort();
    app.stop().await;
}
