//! The change feed: pages, long polls, server-sent events (read by an EventSource parser) and
//! NDJSON, resumed after dropped connections and restarts, compaction, slow followers.

use std::time::{Duration, Instant};

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with, Answer, TestApp};

/// The note blueprint, its text column named `column`.
fn note(column: &str) -> Value {
    json!({"postgresql": {"table": "notes"}, "elasticsearch": {"type": "note"},
        "columns": {column: {"type": "string"}}})
}

/// A project `p` with blueprint `note` (a title) frozen at version 1.
async fn project(app: &TestApp) {
    app.put_and_freeze("p", "note", &note("title")).await;
}

async fn put(app: &TestApp, id: Uuid, title: &str) -> u64 {
    let answer = app
        .put(
            &format!("/p/note/{id}"),
            &json!({"id": id, "project_version": 1, "title": title}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["revision"].as_u64().expect("a revision")
}

async fn delete(app: &TestApp, id: Uuid) -> u64 {
    let answer = app.delete(&format!("/p/note/{id}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["revision"].as_u64().expect("a revision")
}

fn revisions(page: &Value) -> Vec<u64> {
    page["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|c| c["revision"].as_u64().unwrap())
        .collect()
}

/// An SSE connection to the feed, read by an EventSource parser.
async fn sse(
    address: &str,
    query: &str,
    last_event_id: Option<u64>,
) -> impl Stream<Item = Event> + Unpin {
    let mut request = reqwest::Client::new()
        .get(format!("{address}/p/_changes?{query}"))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.expect("connected");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        response.headers()
    );
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|event| event.expect("a well-formed event")),
    )
}

/// The next `n` change events (heartbeats are comments, which the parser skips).
async fn next_changes(events: &mut (impl Stream<Item = Event> + Unpin), n: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    while out.len() < n {
        let Ok(event) = tokio::time::timeout(Duration::from_secs(10), events.next()).await else {
            let so_far: Vec<&Value> = out.iter().map(|c| &c["revision"]).collect();
            panic!(
                "no event within 10 s; {} of {n} came: {so_far:?}",
                out.len()
            );
        };
        let event = event.expect("the stream goes on");
        assert_eq!(event.event, "message", "{event:?}");
        let change: Value = serde_json::from_str(&event.data).expect("JSON data");
        // The revision, and below the horizon the horizon too.
        let revision = change["revision"].to_string();
        assert!(
            event.id == revision || event.id.starts_with(&format!("{revision}/")),
            "{event:?}"
        );
        out.push(change);
    }
    out
}

#[tokio::test]
async fn a_page_lists_the_latest_change_of_each_item_in_revision_order_as_a_version_sees_it() {
    let app = spawn_app().await;
    project(&app).await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    put(&app, a, "a").await;
    put(&app, b, "b").await;
    let a2 = put(&app, a, "a again").await;
    let b_gone = delete(&app, b).await;
    let c1 = put(&app, c, "c").await;

    let page = app.get("/p/_changes").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(revisions(&page.body), vec![a2, b_gone, c1], "{}", page.body);
    let results = &page.body["results"];
    assert_eq!(results[0]["op"], "put");
    assert_eq!(results[0]["item"]["title"], "a again");
    assert_eq!(
        results[1],
        json!({"revision": b_gone, "blueprint": "note", "id": b, "op": "delete"})
    );
    assert_eq!(page.body["last_revision"], c1);
    assert_eq!(page.body["version"], 1);

    // After a revision: only what changed since; pages of one.
    let after = app.get(&format!("/p/_changes?since={a2}")).await.body;
    assert_eq!(revisions(&after), vec![b_gone, c1]);
    let one = app
        .get(&format!("/p/_changes?since={a2}&limit=1"))
        .await
        .body;
    assert_eq!(revisions(&one), vec![b_gone]);
    assert_eq!(one["last_revision"], b_gone);
    let none = app.get(&format!("/p/_changes?since={c1}")).await.body;
    assert_eq!(
        (revisions(&none), &none["last_revision"]),
        (vec![], &json!(c1))
    );

    // Version 2 renames the title: each version's followers see their own shape.
    let mut v2 = note("title");
    v2["columns"]["title"]["column_id"] = json!("headline");
    app.put("/p/note/_blueprint", &v2).await;
    assert_eq!(app.post("/p/_version", None).await.status, 200);
    let newest = app.get("/p/_changes").await.body;
    assert_eq!(newest["version"], 2);
    assert_eq!(newest["results"][0]["item"]["headline"], "a again");
    assert_eq!(newest["results"][0]["item"]["project_version"], 2);
    let old = app.get("/p/_changes?version=1").await.body;
    assert_eq!(old["results"][0]["item"]["title"], "a again");
    assert!(old["results"][0]["item"].get("headline").is_none());

    // A blueprint filter; names a version lacks and unknown versions are refused.
    let other = json!({"postgresql": {"table": "tags"}, "elasticsearch": {"type": "tag"},
        "columns": {"name": {"type": "string"}}});
    app.put_and_freeze("p", "tag", &other).await;
    let tag = Uuid::new_v4();
    let answer = app
        .put(
            &format!("/p/tag/{tag}"),
            &json!({"project_version": 3, "name": "x"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tags = app.get("/p/_changes?blueprint=tag").await.body;
    assert_eq!(tags["results"].as_array().unwrap().len(), 1, "{tags}");
    assert_eq!(tags["results"][0]["blueprint"], "tag");
    let at_v1 = app.get("/p/_changes?version=1").await.body;
    assert!(
        at_v1["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["blueprint"] == "note"),
        "version 1 has no tag blueprint: {at_v1}"
    );
    let refused = app.get("/p/_changes?version=1&blueprint=tag").await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.paths(), vec!["blueprint"]);
    assert_eq!(app.get("/p/_changes?version=9").await.status, 404);
    assert_eq!(app.get("/nothing/_changes").await.status, 404);
    assert_eq!(app.post("/p/_version/1/_retire", None).await.status, 200);
    let retired = app.get("/p/_changes?version=1").await;
    assert_eq!(retired.status, 422, "{}", retired.body);
    assert_eq!(retired.paths(), vec!["version"]);
    // The newest version retired, the default is the newest live one.
    let mut v4 = app.get("/p/note/_blueprint").await.body;
    v4["columns"]["extra"] = json!({"type": "string"});
    assert_eq!(app.put_and_freeze("p", "note", &v4).await, 4);
    assert_eq!(app.post("/p/_version/4/_retire", None).await.status, 200);
    let default = app.get("/p/_changes").await;
    assert_eq!(default.status, 200, "{}", default.body);
    assert_eq!(default.body["version"], 3, "{}", default.body);
    app.stop().await;
}

/// Retiring the version a follower reads ends its stream and its long poll at once, not at the
/// next heartbeat or at the timeout.
#[tokio::test]
async fn retiring_the_followed_version_ends_its_streams_and_long_polls_at_once() {
    let app = spawn_app().await;
    project(&app).await;
    let mut v2 = note("title");
    v2["columns"]["extra"] = json!({"type": "string"});
    assert_eq!(app.put_and_freeze("p", "note", &v2).await, 2);
    let stream = app
        .client
        .get(format!(
            "{}/p/_changes?feed=ndjson&version=1&heartbeat=60",
            app.address
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (client, url) = (
        app.client.clone(),
        format!(
            "{}/p/_changes?feed=longpoll&version=1&timeout=60",
            app.address
        ),
    );
    let poll = tokio::spawn(async move {
        let answer = client.get(url).send().await.unwrap();
        (
            answer.status().as_u16(),
            answer.json::<Value>().await.unwrap(),
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.post("/p/_version/1/_retire", None).await.status, 200);

    let body = tokio::time::timeout(Duration::from_secs(10), stream.bytes())
        .await
        .expect("the stream ends at once")
        .unwrap();
    let last = body
        .split(|b| *b == b'\n')
        .rfind(|line| !line.is_empty())
        .expect("the stream says why it ends");
    let last: Value = serde_json::from_slice(last).unwrap();
    assert_eq!(last["code"], 404, "{last}");
    assert!(
        last["status"]
            .as_str()
            .is_some_and(|s| s.contains("retired")),
        "{last}"
    );
    let (status, answer) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll answers at once")
        .unwrap();
    assert_eq!(status, 404, "{answer}");
    app.stop().await;
}

/// How long a request sent on a connection that reads nothing may take to be in place (a place
/// taken, a page built) on a loaded machine: less than a stalled stream is given (10 s).
const WHILE_IN_PLACE: Duration = Duration::from_secs(5);

/// A follower that takes a place for a moment only, to see whether one is free.
const PROBE: &str = "/p/_changes?feed=longpoll&timeout=0";

/// A connection that asked for `path` and reads nothing of the answer.
async fn unread(app: &TestApp, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let host = app.address.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    socket
}

/// A long poll whose client hung up gives its follower's place back within seconds, not at its
/// time-out: clients that open long polls and leave at once cannot hold every place.
#[tokio::test]
async fn a_long_poll_whose_client_left_gives_its_place_back() {
    let app = spawn_app_with(|s| s.changes.max_followers = 1).await;
    project(&app).await;
    let socket = unread(&app, "/p/_changes?feed=longpoll&timeout=120").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = refused_within(&app, PROBE, WHILE_IN_PLACE).await;
    assert!(
        taken.body.to_string().contains("max_followers"),
        "the one place is taken: {}",
        taken.body
    );
    drop(socket);
    a_place_within(&app, Duration::from_secs(10)).await;
    app.stop().await;
}

/// Asks `path` until it answers 200 (refused with 503 meanwhile), for at most `limit`.
async fn served_within(app: &TestApp, path: &str, limit: Duration) -> Answer {
    answered_within(app, path, (200, 503), limit).await
}

/// Asks `path` until it is refused with 503 (served while the request that takes what it needs is
/// not in place yet), for at most `limit`; answers the refusal.
async fn refused_within(app: &TestApp, path: &str, limit: Duration) -> Answer {
    answered_within(app, path, (503, 200), limit).await
}

/// Asks `path` until it answers `wanted`, answering `meanwhile` until then, for at most `limit`.
async fn answered_within(
    app: &TestApp,
    path: &str,
    (wanted, meanwhile): (u16, u16),
    limit: Duration,
) -> Answer {
    let started = Instant::now();
    loop {
        let answer = app.get(path).await;
        if answer.status == wanted {
            return answer;
        }
        assert_eq!(answer.status, meanwhile, "{}", answer.body);
        assert!(
            started.elapsed() < limit,
            "{path} still answers {meanwhile} after {:?}: {}",
            started.elapsed(),
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a follower gets a place (a long poll is served), for at most `limit`.
async fn a_place_within(app: &TestApp, limit: Duration) {
    served_within(app, "/p/_changes?feed=longpoll&timeout=1", limit).await;
}

/// Blueprint `tag` (a name) frozen beside `note`, as version 2.
async fn with_tags(app: &TestApp) {
    let tag = json!({"postgresql": {"table": "tags"}, "elasticsearch": {"type": "tag"},
        "columns": {"name": {"type": "string"}}});
    app.put_and_freeze("p", "tag", &tag).await;
}

/// An SSE stream of `tag`'s changes from now on, with a heartbeat every second.
async fn tags_followed(app: &TestApp) -> reqwest::Response {
    app.client
        .get(format!(
            "{}/p/_changes?feed=sse&since=now&heartbeat=1&blueprint=tag",
            app.address
        ))
        .send()
        .await
        .unwrap()
}

/// Reads an SSE connection's raw text until it holds `needle`; answers all of it.
async fn sse_text_until(
    bytes: &mut (impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    needle: &str,
) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), bytes.next())
            .await
            .unwrap_or_else(|_| panic!("{needle:?} in time; got {text:?}"))
            .expect("the stream goes on")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

/// An SSE stream names the revision it reads from before any change, and its heartbeats move it
/// past changes the filter hid: a reconnect with that `Last-Event-ID` misses nothing.
#[tokio::test]
async fn an_sse_stream_names_where_it_reads_from_before_any_change() {
    let app = spawn_app().await;
    project(&app).await;
    put(&app, Uuid::new_v4(), "before").await;
    let head = app.get("/p/_changes?since=now").await.body["last_revision"]
        .as_u64()
        .unwrap();
    let response = app
        .client
        .get(format!(
            "{}/p/_changes?feed=sse&since=now&heartbeat=1",
            app.address
        ))
        .send()
        .await
        .unwrap();
    let mut bytes = response.bytes_stream();
    sse_text_until(&mut bytes, &format!("id: {head}\n\n")).await;
    drop(bytes);
    // A change while the follower was away, then the reconnect with the id it was given.
    let missed = put(&app, Uuid::new_v4(), "while away").await;
    let mut events = sse(&app.address, "heartbeat=1", Some(head)).await;
    assert_eq!(next_changes(&mut events, 1).await[0]["revision"], missed);

    // Filtered to another blueprint, the heartbeat moves the id past the hidden change.
    with_tags(&app).await;
    let response = tags_followed(&app).await;
    let mut bytes = response.bytes_stream();
    sse_text_until(&mut bytes, "\n\n").await;
    let hidden = put(&app, Uuid::new_v4(), "not followed").await;
    let text = sse_text_until(&mut bytes, &format!("id: {hidden}\n: heartbeat\n\n")).await;
    assert!(!text.contains("data:"), "{text}");
    app.stop().await;
}

/// A stream whose filter hides a busy project's changes still tells its client how far it read,
/// at once and at least every heartbeat, and gives its place back soon after the client left: the
/// wake-ups of changes it does not show never silence it (each one started its heartbeat's wait
/// over, and a client that left was never written to, so never noticed).
#[tokio::test]
async fn a_filtered_stream_of_a_busy_project_sends_heartbeats_and_notices_its_client_left() {
    let app = spawn_app_with(|s| s.changes.max_followers = 1).await;
    project(&app).await;
    with_tags(&app).await;
    // Notes written every 100 ms, for as long as the test runs.
    let writer = {
        let (client, address) = (app.client.clone(), app.address.clone());
        tokio::spawn(async move {
            loop {
                let id = Uuid::new_v4();
                let _ = client
                    .put(format!("{address}/p/note/{id}"))
                    .json(&json!({"project_version": 2, "title": "not followed"}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let response = tags_followed(&app).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    sse_text_until(&mut bytes, "\n\n").await;
    let hidden = put(&app, Uuid::new_v4(), "not followed either").await;
    // The id moves past the hidden change although notes keep waking the stream.
    let mut text = String::new();
    let started = Instant::now();
    loop {
        text.push_str(&sse_text_until(&mut bytes, ": heartbeat\n\n").await);
        let past = text
            .lines()
            .filter_map(|line| line.strip_prefix("id: "))
            .filter_map(|id| id.split('/').next()?.parse::<u64>().ok())
            .any(|id| id >= hidden);
        if past {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{text}");
    }
    assert!(!text.contains("data:"), "{text}");
    // The client leaves while notes keep coming: its place is free within a few heartbeats.
    drop(bytes);
    a_place_within(&app, Duration::from_secs(5)).await;
    // So is a filtered long poll's, whose look at its client the wake-ups never put off.
    let socket = unread(&app, "/p/_changes?feed=longpoll&timeout=120&blueprint=tag").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = refused_within(&app, PROBE, WHILE_IN_PLACE).await;
    assert!(
        taken.body.to_string().contains("max_followers"),
        "the one place is taken: {}",
        taken.body
    );
    drop(socket);
    a_place_within(&app, Duration::from_secs(5)).await;
    writer.abort();
    app.stop().await;
}

#[tokio::test]
async fn hostile_parameters_get_a_400_naming_the_parameter() {
    let app = spawn_app().await;
    project(&app).await;
    for (query, field) in [
        ("since=-1", "since"),
        ("since=99999999999999999999999", "since"),
        ("version=0x1", "version"),
        ("version=0", "version"),
        ("version=-1", "version"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("feed=websocket", "feed"),
        ("feed=longpoll&timeout=3601", "timeout"),
        ("feed=sse&heartbeat=0", "heartbeat"),
        ("blueprint=Note", "blueprint"),
        ("blueprint=a,,b", "blueprint"),
        ("other=1", "other"),
    ] {
        let answer = app.get(&format!("/p/_changes?{query}")).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert_eq!(
            answer.paths(),
            vec![field.to_string()],
            "{query}: {}",
            answer.body
        );
    }
    let many = vec!["note"; 101].join(",");
    let answer = app.get(&format!("/p/_changes?blueprint={many}")).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let bad_id = app
        .client
        .get(format!("{}/p/_changes?feed=sse", app.address))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_id.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_answers_at_the_next_change_or_when_its_timeout_passes() {
    let app = spawn_app().await;
    project(&app).await;
    let first = put(&app, Uuid::new_v4(), "first").await;

    let started = Instant::now();
    let empty = app
        .get(&format!(
            "/p/_changes?feed=longpoll&since={first}&timeout=1"
        ))
        .await;
    assert_eq!(empty.status, 200);
    assert_eq!(revisions(&empty.body), Vec::<u64>::new());
    assert!(started.elapsed() >= Duration::from_millis(900));

    // since=now: nothing of the past.
    let now = app.get("/p/_changes?since=now").await.body;
    assert_eq!(revisions(&now), Vec::<u64>::new());
    assert!(now["last_revision"].as_u64().unwrap() >= first, "{now}");

    let url = format!(
        "{}/p/_changes?feed=longpoll&since=now&timeout=30",
        app.address
    );
    let mut waiting = tokio::spawn(async move {
        let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        body
    });
    // A change after the poll is in place answers it; on a loaded machine the poll may reach the
    // server after a write, so writes go on until it answers, well before its timeout.
    let mut written = Vec::new();
    let body = loop {
        assert!(
            written.len() < 10,
            "the long poll never answered: {written:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        written.push(put(&app, Uuid::new_v4(), "second").await);
        if let Ok(body) = tokio::time::timeout(Duration::from_secs(2), &mut waiting).await {
            break body.unwrap();
        }
    };
    let answered = revisions(&body);
    assert!(
        !answered.is_empty() && answered.iter().all(|r| written.contains(r)),
        "{answered:?} of {written:?}"
    );
    app.stop().await;
}

/// A long poll filtered to one blueprint reads on past pages of other blueprints' changes at
/// once: it answers with the matching change in the backlog, not an empty page at its timeout.
#[tokio::test]
async fn a_filtered_long_poll_reads_past_other_blueprints_changes() {
    let app = spawn_app().await;
    project(&app).await;
    with_tags(&app).await;
    for _ in 0..3 {
        put(&app, Uuid::new_v4(), "not followed").await;
    }
    let answer = app
        .put(
            &format!("/p/tag/{}", Uuid::new_v4()),
            &json!({"project_version": 2, "name": "followed"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tagged = answer.body["revision"].as_u64().unwrap();
    let page = app
        .get("/p/_changes?feed=longpoll&blueprint=tag&limit=1&since=0&timeout=20")
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(revisions(&page.body), vec![tagged], "{}", page.body);
    app.stop().await;
}

/// A filtered long poll reads on through a bounded stretch of changes it does not see, then
/// answers an empty page whose `last_revision` moved, from where its client reads on: with
/// `limit=1` behind a long history of another blueprint's changes, it took a blocking thread for
/// a page per change, back to back, for as long as its timeout.
#[tokio::test]
async fn a_filtered_long_poll_answers_after_a_bounded_stretch_of_hidden_changes() {
    let app = spawn_app().await;
    project(&app).await;
    with_tags(&app).await;
    let mut hidden = Vec::new();
    for _ in 0..40 {
        hidden.push(put(&app, Uuid::new_v4(), "not followed").await);
    }
    let page = app
        .get("/p/_changes?feed=longpoll&blueprint=tag&limit=1&since=0&timeout=5")
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(revisions(&page.body), Vec::<u64>::new(), "{}", page.body);
    let last = page.body["last_revision"].as_u64().unwrap();
    assert!(
        hidden[..30].contains(&last),
        "read on to {last} of {hidden:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn sse_followers_get_every_change_once_and_resume_from_last_event_id() {
    let app = spawn_app().await;
    project(&app).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = sse(&app.address, "heartbeat=1", None).await;
    let ra = put(&app, a, "a").await;
    let rb = put(&app, b, "b").await;
    let seen = next_changes(&mut events, 2).await;
    let got: Vec<u64> = seen
        .iter()
        .map(|c| c["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![ra, rb]);
    // Deleted only once its put was seen: the feed keeps each item's latest change, so a stream
    // that read after the delete would never show the put.
    let gone = delete(&app, a).await;
    let seen = next_changes(&mut events, 1).await;
    assert_eq!(seen[0]["revision"], gone);
    assert_eq!(seen[0]["op"], "delete");
    assert!(seen[0].get("item").is_none());

    // The connection drops; writes go on; the follower comes back with the last id it saw.
    drop(events);
    let rb2 = put(&app, b, "b again").await;
    let rc = put(&app, Uuid::new_v4(), "c").await;
    let mut events = sse(&app.address, "heartbeat=1", Some(gone)).await;
    let resumed = next_changes(&mut events, 2).await;
    let got: Vec<u64> = resumed
        .iter()
        .map(|c| c["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![rb2, rc]);
    assert_eq!(resumed[0]["item"]["title"], "b again");
    // Live again, and nothing twice: the next event is the next write.
    let rd = put(&app, Uuid::new_v4(), "d").await;
    let live = next_changes(&mut events, 1).await;
    assert_eq!(live[0]["revision"], rd);

    // With the default heartbeat of 15 s an idle stream stays open; a heartbeat of 1 s keeps
    // coming as comments, which EventSource parsers skip: the stream is still alive after 2.5 s.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), events.next()).await;
    assert!(quiet.is_err(), "no event while nothing changes: {quiet:?}");
    let re = put(&app, Uuid::new_v4(), "e").await;
    assert_eq!(next_changes(&mut events, 1).await[0]["revision"], re);
    app.stop().await;
}

/// `_bulk` lines: `put` with a title, or `delete`.
fn bulk_lines(ops: &[(Uuid, Option<&str>)]) -> String {
    let mut body = String::new();
    for (id, title) in ops {
        match title {
            Some(title) => body.push_str(&format!(
                "{{\"put\": {{\"blueprint\": \"note\", \"id\": \"{id}\"}}}}\n{}\n",
                json!({"project_version": 1, "title": title})
            )),
            None => body.push_str(&format!(
                "{{\"delete\": {{\"blueprint\": \"note\", \"id\": \"{id}\"}}}}\n"
            )),
        }
    }
    body
}

/// Every change of the project as (id, op, title), and checks each item is listed once.
async fn latest_changes(app: &TestApp) -> Vec<(String, String, Value)> {
    let page = app.get("/p/_changes?since=0&limit=1000").await.body;
    let changes: Vec<(String, String, Value)> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let id = c["id"].as_str().unwrap().to_string();
            (
                id,
                c["op"].as_str().unwrap().to_string(),
                c["item"]["title"].clone(),
            )
        })
        .collect();
    let mut ids: Vec<&String> = changes.iter().map(|c| &c.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), changes.len(), "an item listed twice: {page}");
    changes
}

#[tokio::test]
async fn bulks_that_rewrite_delete_and_revive_items_leave_one_change_per_item() {
    let app = spawn_app().await;
    project(&app).await;
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for id in &ids[..8] {
        put(&app, *id, "first").await;
    }
    for id in &ids[4..8] {
        delete(&app, *id).await;
    }
    // Rewrites (0..4), revivals (4..8), new items (8..12), an item written twice in one request
    // and one deleted after its put in the same request.
    let mut ops: Vec<(Uuid, Option<&str>)> = ids.iter().map(|id| (*id, Some("bulk"))).collect();
    ops.push((ids[0], Some("twice")));
    ops.push((ids[1], None));
    let bulk = app
        .send(reqwest::Method::POST, "/p/_bulk", Some(bulk_lines(&ops)))
        .await;
    assert_eq!(bulk.status, 200, "{}", bulk.body);
    assert_eq!(bulk.body["errors"], false, "{}", bulk.body);
    let changes = latest_changes(&app).await;
    assert_eq!(changes.len(), 12);
    for (id, op, title) in &changes {
        let expected = match id {
            id if *id == ids[0].to_string() => ("put", json!("twice")),
            id if *id == ids[1].to_string() => ("delete", Value::Null),
            _ => ("put", json!("bulk")),
        };
        assert_eq!((op.as_str(), title), (expected.0, &expected.1), "{id}");
    }

    // All deleted in one request, then all written again in another.
    let deletes: Vec<(Uuid, Option<&str>)> = ids.iter().map(|id| (*id, None)).collect();
    let bulk = app
        .send(
            reqwest::Method::POST,
            "/p/_bulk",
            Some(bulk_lines(&deletes)),
        )
        .await;
    assert_eq!(bulk.body["errors"], false, "{}", bulk.body);
    let changes = latest_changes(&app).await;
    assert_eq!(changes.len(), 12);
    assert!(changes.iter().all(|c| c.1 == "delete"), "{changes:?}");
    let again: Vec<(Uuid, Option<&str>)> = ids.iter().map(|id| (*id, Some("again"))).collect();
    let bulk = app
        .send(reqwest::Method::POST, "/p/_bulk", Some(bulk_lines(&again)))
        .await;
    assert_eq!(bulk.body["errors"], false, "{}", bulk.body);
    let changes = latest_changes(&app).await;
    assert_eq!(changes.len(), 12);
    assert!(
        changes.iter().all(|c| c.1 == "put" && c.2 == "again"),
        "{changes:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_ndjson_follower_that_stays_behind_gets_everything_once_in_order() {
    let app = spawn_app().await;
    project(&app).await;
    let response = app
        .client
        .get(format!(
            "{}/p/_changes?feed=ndjson&heartbeat=1",
            app.address
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    // Write 4000 items while the follower reads nothing.
    for chunk in 0..4 {
        let mut body = String::new();
        for i in 0..1000 {
            body.push_str(&format!(
                "{{\"create\": {{\"blueprint\": \"note\"}}}}\n{{\"project_version\": 1, \"title\": \"{chunk}-{i}\"}}\n"
            ));
        }
        let bulk = app
            .send(reqwest::Method::POST, "/p/_bulk", Some(body))
            .await;
        assert_eq!(bulk.status, 200);
        assert_eq!(bulk.body["errors"], false);
    }
    // The server kept serving others meanwhile.
    assert_eq!(app.get("/p/_changes?limit=1").await.status, 200);
    let got = ndjson_revisions(response, 4000).await;
    assert_eq!(got.len(), 4000);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in revision order, once"
    );
    app.stop().await;
}

/// Stops the app, asserting the stop did not wait for its followers (actix gives a connection
/// 30 s to finish).
async fn stop_without_waiting(app: TestApp) {
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_follower_resumes_after_a_server_restart_and_a_stop_does_not_wait_for_followers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (first, last_seen) = {
        let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
        project(&app).await;
        let mut events = sse(&app.address, "", None).await;
        let first = put(&app, Uuid::new_v4(), "before").await;
        let seen = next_changes(&mut events, 1).await;
        // The follower is still connected: the stop ends its stream rather than waiting for it.
        stop_without_waiting(app).await;
        let ended = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(
            matches!(ended, Ok(None)),
            "the stream ends with the server: {ended:?}"
        );
        (first, seen[0]["revision"].as_u64().unwrap())
    };
    assert_eq!(first, last_seen);
    let app = spawn_app_with(|s| s.storage.data_dir = path.clone()).await;
    let after = put(&app, Uuid::new_v4(), "after").await;
    let mut events = sse(&app.address, "", Some(last_seen)).await;
    let resumed = next_changes(&mut events, 1).await;
    assert_eq!(resumed[0]["revision"], after);
    assert_eq!(resumed[0]["item"]["title"], "after");
    stop_without_waiting(app).await;
}

/// A follower whose client stopped reading is not polled (its connection waits to write), so it
/// never sees the stop: the stop cuts its connection rather than waiting for it as long as actix
/// lets connections finish (30 s).
#[tokio::test]
async fn a_stop_does_not_wait_for_a_follower_that_stopped_reading() {
    let app = spawn_app().await;
    project(&app).await;
    let title = "x".repeat(500_000);
    for _ in 0..40 {
        put(&app, Uuid::new_v4(), &title).await;
    }
    // 20 MB to send, more than the connection's buffers hold; the client reads none of it.
    let stuck = unread(&app, "/p/_changes?since=0&feed=ndjson").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_without_waiting(app).await;
    drop(stuck);
}

/// A page shared between readers (for a second) holds the horizon it was read under: a reader
/// given a newer horizon by a compaction meanwhile is not refused for it, nor handed the older one.
/// An app with project `p` whose deletes are compacted within about a second.
async fn compacting() -> TestApp {
    let app = spawn_app_with(|s| {
        s.changes.tombstone_retention_secs = 0;
        s.changes.compact_interval_secs = 1;
    })
    .await;
    project(&app).await;
    app
}

#[tokio::test]
async fn a_shared_page_read_before_a_compaction_does_not_refuse_a_reader_holding_the_new_horizon() {
    let app = compacting().await;
    let mut kept = Vec::new();
    for i in 0..5 {
        kept.push(put(&app, Uuid::new_v4(), &format!("kept {i}")).await);
    }
    // A place below every delete to come: a full page of two kept items after it.
    let since = kept[0];
    let mut h0 = 0;
    let mut raced = 0;
    for attempt in 0..10 {
        let gone = Uuid::new_v4();
        put(&app, gone, "gone").await;
        delete(&app, gone).await;
        // The delete is purged about a second after it: read half-way.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A reader holding the current horizon reads the place; its page is kept for others.
        let first = app
            .get(&format!("/p/_changes?since={since}&limit=2&horizon={h0}"))
            .await;
        let read_at = Instant::now();
        h0 = first.body["horizon"].as_u64().unwrap();
        if first.status == 410 {
            // Compacted since this test last looked: it holds the new horizon now.
            continue;
        }
        assert_eq!(first.status, 200, "{}", first.body);
        // The next compaction moves the horizon (seen by fresh reads: another limit each time).
        let mut limit = 2;
        let h1 = loop {
            limit += 1;
            // Past 0, a reader without a pass is handed the project's horizon (refused or not).
            let now = app
                .get(&format!("/p/_changes?since=1&limit={limit}"))
                .await
                .body;
            let h = now["horizon"].as_u64().unwrap();
            if h > h0 {
                break h;
            }
            assert!(read_at.elapsed() < Duration::from_secs(10), "no compaction");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The same place, with the new horizon: the page read under the old one is shared for a
        // second at most.
        let answer = app
            .get(&format!("/p/_changes?since={since}&limit=2&horizon={h1}"))
            .await;
        if read_at.elapsed() >= Duration::from_millis(950) {
            h0 = h1;
            continue;
        }
        raced += 1;
        assert_eq!(answer.status, 200, "attempt {attempt}: {}", answer.body);
        assert_eq!(
            answer.body["horizon"].as_u64(),
            Some(h1),
            "attempt {attempt}: {}",
            answer.body
        );
        h0 = h1;
        if raced == 3 {
            break;
        }
    }
    assert!(
        raced > 0,
        "the compaction never came within a second of a read"
    );
    app.stop().await;
}

#[tokio::test]
async fn compacted_deletes_answer_410_and_since_0_gives_the_latest_state() {
    let app = compacting().await;
    let (kept, gone) = (Uuid::new_v4(), Uuid::new_v4());
    let before = put(&app, kept, "kept").await;
    put(&app, gone, "gone").await;
    let deleted = delete(&app, gone).await;
    // Within a few seconds the delete is purged and the horizon passes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let answer = app.get(&format!("/p/_changes?since={before}")).await;
        if answer.status == 410 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refused.status, 410, "{}", refused.body);
    assert!(refused.body["horizon"].as_u64().unwrap() >= deleted);
    assert!(
        refused.body["status"].as_str().unwrap().contains("since=0"),
        "{}",
        refused.body
    );
    assert_eq!(refused.paths(), vec!["since"]);
    // Streams are refused the same way before they start.
    let stream = app
        .client
        .get(format!("{}/p/_changes?feed=sse", app.address))
        .header("last-event-id", before.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 410);
    // since=0: the latest state of every item; the deleted one is simply absent.
    let resync = app.get("/p/_changes?since=0").await.body;
    let ids: Vec<&str> = resync["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![kept.to_string()]);
    let horizon = refused.body["horizon"].as_u64().unwrap();
    assert_eq!(
        app.get(&format!("/p/_changes?since={horizon}"))
            .await
            .status,
        200
    );

    // A scan from 0 goes on below the horizon, page after page, passing back each page's horizon
    // with its last revision; without it, its second page would be a 410.
    let first = app.get("/p/_changes?since=0&limit=1").await.body;
    assert_eq!(first["horizon"], horizon, "{first}");
    let last = first["last_revision"].as_u64().unwrap();
    assert_eq!(last, before);
    assert_eq!(
        app.get(&format!("/p/_changes?since={last}")).await.status,
        410
    );
    let next = app
        .get(&format!("/p/_changes?since={last}&horizon={horizon}"))
        .await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(revisions(&next.body), Vec::<u64>::new());
    // A horizon passed back that is not the project's any more is no pass.
    let stale = app
        .get(&format!("/p/_changes?since={last}&horizon={}", horizon - 1))
        .await;
    assert_eq!(stale.status, 410, "{}", stale.body);
    // Nor is one past the project's last revision, which no page handed out.
    let made_up = app
        .get(&format!("/p/_changes?since={last}&horizon={}", u64::MAX))
        .await;
    assert_eq!(made_up.status, 410, "{}", made_up.body);
    // A stream from 0 reads on past the horizon by itself, and goes on following.
    let mut events = sse(&app.address, "since=0&heartbeat=1", None).await;
    let scanned = next_changes(&mut events, 1).await;
    assert_eq!(scanned[0]["revision"], before);
    let after = put(&app, Uuid::new_v4(), "after").await;
    let followed = next_changes(&mut events, 1).await;
    assert_eq!(followed[0]["revision"], after);
    // Below its pass (the last revision when it began), an event's id carries it: a client that
    // reconnects there with that Last-Event-ID goes on, where the revision alone is a 410.
    let raw = app
        .client
        .get(format!("{}/p/_changes?feed=sse&since=0", app.address))
        .send()
        .await
        .unwrap();
    let mut bytes = raw.bytes_stream();
    // The pass: the last revision when the read began (its first page may be another
    // follower's of a moment ago).
    let text = sse_text_until(&mut bytes, &format!("id: {before}/")).await;
    let pass = text[text.find(&format!("id: {before}/")).unwrap()..]
        .lines()
        .next()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(pass >= horizon, "{text}");
    let id = format!("{before}/{pass}");
    let resumed = app
        .client
        .get(format!("{}/p/_changes?feed=sse&timeout=1", app.address))
        .header("last-event-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let text = resumed.text().await.unwrap();
    assert!(text.contains(&format!("id: {after}\n")), "{text}");
    let malformed = app
        .client
        .get(format!("{}/p/_changes?feed=sse", app.address))
        .header("last-event-id", format!("{before}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    app.stop().await;
}

/// The project's horizon, as a reader past 0 without a pass is handed it (refused or not).
async fn project_horizon(app: &TestApp) -> u64 {
    app.get("/p/_changes?since=1&limit=1").await.body["horizon"]
        .as_u64()
        .unwrap()
}

/// A read from 0 goes on below the horizon however often compaction moves it meanwhile, as long
/// as every delete compacted was made before the read began: it never gave those items. Before,
/// any compaction during the read refused its next page, and a project whose read from 0 took
/// longer than the compaction interval while deletes kept coming could never be read whole. A
/// delete made after the read began is still a 410 once compacted.
#[tokio::test]
async fn a_read_from_0_goes_on_while_older_deletes_are_compacted() {
    let app = spawn_app_with(|s| {
        s.changes.tombstone_retention_secs = 2;
        s.changes.compact_interval_secs = 1;
    })
    .await;
    project(&app).await;
    for i in 0..3 {
        put(&app, Uuid::new_v4(), &format!("kept {i}")).await;
    }
    let old = Uuid::new_v4();
    put(&app, old, "old").await;
    let old_delete = delete(&app, old).await;
    // The read begins, a change a page.
    let first = app.get("/p/_changes?since=0&limit=1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let pass = first.body["horizon"].as_u64().unwrap();
    let last = first.body["last_revision"].as_u64().unwrap();
    assert!(pass >= old_delete, "{}", first.body);
    let young = Uuid::new_v4();
    put(&app, young, "young").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while project_horizon(&app).await < old_delete {
        assert!(
            Instant::now() < deadline,
            "the old delete was never compacted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = app
        .get(&format!("/p/_changes?since={last}&limit=1&horizon={pass}"))
        .await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.body["horizon"].as_u64(), Some(pass), "{}", next.body);
    assert_eq!(
        app.get(&format!("/p/_changes?since={last}&limit=1"))
            .await
            .status,
        410,
        "without its pass"
    );
    // A delete made after the read began: once compacted, the read may have given its item.
    let young_delete = delete(&app, young).await;
    while project_horizon(&app).await < young_delete {
        assert!(
            Instant::now() < deadline,
            "the young delete was never compacted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = app
        .get(&format!("/p/_changes?since={last}&limit=1&horizon={pass}"))
        .await;
    assert_eq!(refused.status, 410, "{}", refused.body);
    app.stop().await;
}

#[tokio::test]
async fn a_since_past_the_last_revision_starts_the_follower_over() {
    let app = spawn_app().await;
    project(&app).await;
    let head = put(&app, Uuid::new_v4(), "only").await;
    assert_eq!(
        app.get(&format!("/p/_changes?since={head}")).await.status,
        200
    );
    // A cursor from another history (a restored backup): waiting from it would pass over every
    // change up to it, for every kind of follower.
    let ahead = head + 1000;
    for feed in ["normal", "longpoll", "sse", "ndjson"] {
        let answer = app
            .get(&format!("/p/_changes?since={ahead}&feed={feed}&timeout=1"))
            .await;
        assert_eq!(answer.status, 410, "{feed}: {}", answer.body);
        assert_eq!(answer.paths(), vec!["since"]);
        let status = answer.body["status"].as_str().unwrap();
        assert!(status.contains("since=0"), "{status}");
        assert!(
            status.contains(&format!("last revision {head}")),
            "{status}"
        );
    }
    let stream = app
        .client
        .get(format!("{}/p/_changes?feed=sse", app.address))
        .header("last-event-id", ahead.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 410);
    app.stop().await;
}

#[tokio::test]
async fn a_dropped_project_ends_its_followers_and_its_history() {
    let app = spawn_app().await;
    project(&app).await;
    let seen = put(&app, Uuid::new_v4(), "old").await;
    let mut events = sse(&app.address, "", Some(seen)).await;
    assert_eq!(app.delete("/p/_project").await.status, 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the follower hears of the drop")
        .expect("an event");
    assert_eq!(ended.event, "gone", "{ended:?}");
    let body: Value = serde_json::from_str(&ended.data).unwrap();
    assert!(matches!(body["code"].as_u64(), Some(404 | 410)), "{body}");
    // Made again under the same name, it does not replay the old project to old followers.
    project(&app).await;
    let fresh = put(&app, Uuid::new_v4(), "new").await;
    assert_eq!(
        app.get(&format!("/p/_changes?since={seen}")).await.status,
        410
    );
    assert_eq!(revisions(&app.get("/p/_changes").await.body), vec![fresh]);
    app.stop().await;
}

/// A page waiting to be sent counts against `server.max_inflight_bytes`: clients that ask for
/// large pages and never read them are answered 503 once they hold that much, instead of growing
/// the process; a page taken in gives its share back.
#[tokio::test]
async fn pages_nobody_reads_hold_the_request_memory_budget() {
    let app = spawn_app_with(|s| s.server.max_inflight_bytes = 16_000_000).await;
    project(&app).await;
    // A page of about 8.5 MB (a page ends after 8 MiB of items): more than the sockets' buffers
    // take, less than the budget, and two of them more.
    let title = "x".repeat(300_000);
    for _ in 0..30 {
        put(&app, Uuid::new_v4(), &title).await;
    }
    let stuck = unread(&app, "/p/_changes?since=0").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = refused_within(&app, "/p/_changes?since=0", WHILE_IN_PLACE).await;
    assert!(
        refused.body.to_string().contains("max_inflight_bytes"),
        "{}",
        refused.body
    );
    // A small page still fits.
    assert_eq!(app.get("/p/_changes?since=0&limit=1").await.status, 200);
    drop(stuck);
    let answer = served_within(&app, "/p/_changes?since=0", Duration::from_secs(10)).await;
    assert!(answer.body["results"].as_array().unwrap().len() >= 27);
    app.stop().await;
}

/// Answers nobody reads hold at most three quarters of `server.max_inflight_bytes`: a client
/// that asks for pages and never reads them is refused before writes are, and a write still gets
/// the memory its body needs.
#[tokio::test]
async fn pages_nobody_reads_leave_writes_a_quarter_of_the_request_memory_budget() {
    let app = spawn_app_with(|s| s.server.max_inflight_bytes = 40_000_000).await;
    project(&app).await;
    // Pages of about 8.5 MB, more than the sockets' buffers take: four would hold 34 MB.
    let title = "x".repeat(300_000);
    for _ in 0..30 {
        put(&app, Uuid::new_v4(), &title).await;
    }
    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(unread(&app, "/p/_changes?since=0").await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = app.get("/p/_changes?since=0").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    // A write whose body holds about 7 MB while it is handled still fits.
    put(&app, Uuid::new_v4(), &"y".repeat(200_000)).await;
    // The refusals are counted apart from the budget's.
    let answers = app
        .metric(
            None,
            "dstore_request_memory_refused_total{held_by=\"answers\"}",
        )
        .await;
    assert!(answers >= 1.0, "{answers}");
    drop(stuck);
    app.stop().await;
}

/// A page is bounded by its items as the followed version presents them, not as they are stored:
/// a version that adds columns with long defaults makes every item written before it far larger
/// there, and a page of them ends after 8 MiB (and one item) of them, its `last_revision` the
/// last change it holds; the next pages give the rest, each item once.
#[tokio::test]
async fn a_page_is_bounded_by_its_items_as_the_followed_version_presents_them() {
    let app = spawn_app().await;
    project(&app).await;
    let mut written = Vec::new();
    for n in 0..60 {
        written.push(put(&app, Uuid::new_v4(), &format!("t{n}")).await);
    }
    // Each item at version 2: about 200 KB, against a few bytes stored.
    let mut wide = note("title");
    for c in 0..50 {
        wide["columns"][format!("c{c}")] = json!({"type": "string", "default": "d".repeat(4000)});
    }
    assert_eq!(app.put_and_freeze("p", "note", &wide).await, 2);
    let path = "/p/_changes?since=0&version=2&limit=10000";
    let text = app
        .client
        .get(format!("{}{path}", app.address))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(text.len() < 9 << 20, "a page of {} bytes", text.len());
    let page: Value = serde_json::from_slice(&text).unwrap();
    let shown = revisions(&page);
    assert!(shown.len() > 30 && shown.len() < 60, "{}", shown.len());
    assert_eq!(page["last_revision"].as_u64(), shown.last().copied());
    assert_eq!(
        page["results"][0]["item"]["c49"].as_str().map(str::len),
        Some(4000)
    );
    // The rest follows, each item once.
    let mut seen = shown;
    let mut since = page["last_revision"].as_u64().unwrap();
    while seen.len() < written.len() {
        let next = app
            .get(&format!("/p/_changes?since={since}&version=2&limit=10000"))
            .await;
        let more = revisions(&next.body);
        assert!(!more.is_empty(), "{}", next.body["last_revision"]);
        seen.extend(more);
        since = next.body["last_revision"].as_u64().unwrap();
    }
    assert_eq!(seen, written);
    app.stop().await;
}

/// A client that opens streams and never reads them (its host still acknowledging TCP) does not
/// keep their places, and the pages they hold, for ever: a stream not polled for three heartbeats
/// (at least 10 s) has its connection shut down, and the next follower gets a place.
#[tokio::test]
async fn streams_whose_clients_read_nothing_give_their_places_back() {
    let app = spawn_app_with(|s| s.changes.max_followers = 2).await;
    project(&app).await;
    // More than the sockets' buffers hold, so the server's writes stop.
    let title = "x".repeat(900_000);
    for _ in 0..24 {
        put(&app, Uuid::new_v4(), &title).await;
    }
    let stuck = [
        unread(&app, "/p/_changes?feed=sse&since=0&heartbeat=1").await,
        unread(&app, "/p/_changes?feed=ndjson&since=0&heartbeat=1").await,
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = refused_within(&app, PROBE, WHILE_IN_PLACE).await;
    assert!(
        taken.body.to_string().contains("max_followers"),
        "both places are taken: {}",
        taken.body
    );
    // Clients that read nothing do not hold every place.
    a_place_within(&app, Duration::from_secs(40)).await;
    drop(stuck);
    app.stop().await;
}

#[tokio::test]
async fn past_max_followers_a_node_answers_503_and_a_leaving_follower_frees_its_place() {
    let app = spawn_app_with(|s| s.changes.max_followers = 1).await;
    project(&app).await;
    // Heartbeats every second: a write to the closed connection is at the latest how a server
    // notices a follower left.
    let first = sse(&app.address, "heartbeat=1", None).await;
    let refused = reqwest::get(format!("{}/p/_changes?feed=ndjson", app.address))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["status"]
            .as_str()
            .unwrap()
            .contains("changes.max_followers"),
        "{body}"
    );
    // A plain page is not a follower: it is always served.
    assert_eq!(app.get("/p/_changes").await.status, 200);
    drop(first);
    a_place_within(&app, Duration::from_secs(10)).await;
    app.stop().await;
}

/// A page of the change feed counts its items as they take memory decoded, not as stored: items
/// of 100,000 small numbers (about 200 KB stored, over 3 MB decoded) make pages of a few, and
/// following the pages reads every change once.
#[tokio::test]
async fn a_page_counts_items_as_decoded_so_arrays_of_small_numbers_make_short_pages() {
    let app = spawn_app().await;
    let blueprint = json!({"postgresql": {"table": "series"}, "elasticsearch": {"type": "series"},
        "columns": {"points": {"type": "integer[]"}}});
    app.put_and_freeze("p", "series", &blueprint).await;
    let points = vec![1; 100_000];
    let mut written = Vec::new();
    for _ in 0..20 {
        let id = Uuid::new_v4();
        let put = app
            .put(
                &format!("/p/series/{id}"),
                &json!({"project_version": 1, "points": points}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        written.push(id.to_string());
    }
    let mut seen = Vec::new();
    let mut since = 0;
    let mut longest = 0;
    loop {
        let page = app
            .get(&format!("/p/_changes?since={since}&limit=1000"))
            .await
            .body;
        let results = page["results"].as_array().unwrap();
        if results.is_empty() {
            break;
        }
        longest = longest.max(results.len());
        seen.extend(
            results
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
        since = page["last_revision"].as_u64().unwrap();
    }
    assert_eq!(seen, written);
    assert!((1..=4).contains(&longest), "pages of {longest} changes");
    app.stop().await;
}

/// The revisions of the changes an NDJSON follower gets, until it has `n`.
async fn ndjson_revisions(response: reqwest::Response, n: usize) -> Vec<u64> {
    let mut lines = response.bytes_stream();
    let (mut pending, mut got) = (Vec::new(), Vec::new());
    while got.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(20), lines.next())
            .await
            .expect("data in time")
            .expect("the stream goes on")
            .unwrap();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.len() > 1 {
                let change: Value = serde_json::from_slice(&line).unwrap();
                got.push(change["revision"].as_u64().unwrap());
            }
        }
    }
    got
}

#[tokio::test]
async fn followers_reading_together_get_every_change_and_a_writer_reads_its_writes_at_once() {
    let app = spawn_app().await;
    project(&app).await;
    let mut written = Vec::new();
    for i in 0..3 {
        written.push(put(&app, Uuid::new_v4(), &format!("before {i}")).await);
    }
    // Followers from the same place read the same pages about the same time (they share them).
    let mut followers = Vec::new();
    for _ in 0..20 {
        let response = app
            .client
            .get(format!("{}/p/_changes?feed=ndjson&since=0", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        followers.push(response);
    }
    const WRITES: usize = 200;
    let readers: Vec<_> = followers
        .into_iter()
        .map(|response| tokio::spawn(ndjson_revisions(response, 3 + WRITES)))
        .collect();
    // Each write is in the very next page read from the same place, and in the next long poll.
    for i in 0..WRITES {
        let revision = put(&app, Uuid::new_v4(), &format!("during {i}")).await;
        written.push(revision);
        if i % 10 == 0 {
            let page = app.get("/p/_changes?since=0&limit=10000").await;
            assert_eq!(
                revisions(&page.body).last(),
                Some(&revision),
                "a page read after a write holds it"
            );
            let since = written[written.len() - 2];
            let polled = app
                .get(&format!(
                    "/p/_changes?feed=longpoll&since={since}&timeout=5"
                ))
                .await;
            assert_eq!(revisions(&polled.body), vec![revision]);
        }
    }
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            written,
            "every change, once, in order"
        );
    }
    app.stop().await;
}

/// An NDJSON stream says where it reads from (`since=now` resolved) in its headers: a follower
/// whose stream drops before any change reconnects from there and misses nothing written
/// meanwhile.
#[tokio::test]
async fn a_ndjson_stream_from_now_says_where_it_reads_from() {
    let app = spawn_app().await;
    project(&app).await;
    let head = put(&app, Uuid::new_v4(), "before").await;
    let open = |since: String| {
        let app = &app;
        async move {
            app.client
                .get(format!(
                    "{}/p/_changes?feed=ndjson&version=1&since={since}",
                    app.address
                ))
                .send()
                .await
                .unwrap()
        }
    };
    let first = open("now".into()).await;
    assert_eq!(first.status(), 200);
    let since = first.headers()["x-dstore-since"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(since, head.to_string());
    assert!(first.headers().contains_key("x-dstore-horizon"));
    drop(first);
    let missed = put(&app, Uuid::new_v4(), "while away").await;
    let again = open(since).await;
    assert_eq!(ndjson_revisions(again, 1).await, vec![missed]);
    app.stop().await;
}
