//! The client commands of the `dstore` binary against a real server: what they print and how they exit.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::helpers::{article, spawn_app, TestApp};

/// Runs the built binary with `args` against `app` (via DSTORE_SERVER), feeding `stdin`.
async fn dstore(app: &TestApp, args: &[&str], stdin: Option<&str>) -> Output {
    dstore_at(&app.address, args, stdin).await
}

/// Runs the built binary with `args` against the server at `address`.
async fn dstore_at(address: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let (address, args, stdin) = (
        address.to_string(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        stdin.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dstore"))
            .args(&args)
            .env("DSTORE_SERVER", address)
            .env_remove("DSTORE_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            // A command that refuses its input may end before reading all of it.
            if let Err(error) = input.write_all(text.as_bytes()) {
                assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
            }
        }
        drop(input);
        child.wait_with_output().expect("the binary ends")
    })
    .await
    .expect("the blocking task ends")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

fn write_file(dir: &tempfile::TempDir, name: &str, body: &Value) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, body.to_string()).expect("the file is written");
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn cli_puts_a_blueprint_freezes_and_writes_reads_and_deletes_an_item() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let blueprint = write_file(&dir, "article.json", &article());

    let put = dstore(
        &app,
        &["blueprint", "put", "myblog", "article", &blueprint],
        None,
    )
    .await;
    assert_success(&put);
    assert_eq!(
        stdout(&put),
        "myblog/article: 1 change in the working copy; `dstore freeze myblog` makes it a version\n  blueprint.create article\n"
    );

    let again = dstore(
        &app,
        &["blueprint", "put", "myblog", "article", &blueprint],
        None,
    )
    .await;
    assert_success(&again);
    assert!(stdout(&again).contains("unchanged"), "{}", stdout(&again));

    let mut edited = article();
    edited["columns"]["summary"] = json!({"type": "text"});
    edited["columns"]["title"]["validation"] = json!({"max_length": 200});
    let edited = serde_json::to_string(&edited).unwrap();
    let edit = dstore(
        &app,
        &["blueprint", "put", "myblog", "article", "-"],
        Some(&edited),
    )
    .await;
    assert_success(&edit);
    let text = stdout(&edit);
    assert!(
        text.contains(": 2 changes in the working copy")
            && text.contains("\n  column.create article.summary")
            && text.contains("\n  column.update article.title validation"),
        "{text}"
    );

    let freeze = dstore(&app, &["freeze", "myblog"], None).await;
    assert_success(&freeze);
    assert_eq!(stdout(&freeze).trim(), "myblog: frozen as version 1");

    let got = dstore(
        &app,
        &["blueprint", "get", "myblog", "article", "--version", "1"],
        None,
    )
    .await;
    assert_success(&got);
    let got: Value = serde_json::from_slice(&got.stdout).expect("blueprint get prints JSON");
    assert_eq!(got["columns"]["title"]["type"], "string");

    let id = "0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01";
    let item =
        json!({"id": id, "project_version": 1, "title": "Hello", "date_created": "2020-01-02"});
    let put = dstore(
        &app,
        &["item", "put", "myblog", "article", "-", "--wait"],
        Some(&item.to_string()),
    )
    .await;
    assert_success(&put);
    assert!(
        stdout(&put).starts_with(&format!("myblog/article/{id}: written (revision "))
            && stdout(&put).contains("in every store"),
        "{}",
        stdout(&put)
    );

    let generated = write_file(
        &dir,
        "new.json",
        &json!({"project_version": 1, "date_created": "2020-01-03"}),
    );
    let create = dstore(
        &app,
        &["item", "put", "myblog", "article", &generated],
        None,
    )
    .await;
    assert_success(&create);
    assert!(
        stdout(&create).contains(": created (revision "),
        "{}",
        stdout(&create)
    );

    let read = dstore(&app, &["item", "get", "myblog", "article", id], None).await;
    assert_success(&read);
    let read: Value = serde_json::from_slice(&read.stdout).expect("item get prints JSON");
    assert_eq!(read["title"], "Hello");

    let delete = dstore(&app, &["item", "delete", "myblog", "article", id], None).await;
    assert_success(&delete);
    assert!(stdout(&delete).contains(": deleted"), "{}", stdout(&delete));
    let missing = app.get(&format!("/myblog/article/{id}")).await;
    assert_eq!(missing.status, 404);

    let versions = dstore(&app, &["versions", "myblog"], None).await;
    assert_success(&versions);
    let text = stdout(&versions);
    assert!(
        text.contains("myblog: newest version 1")
            && text.contains("version 1")
            && text.contains("blueprints: article")
            && text.contains("changes: blueprint.create article")
            && text.contains("rocksdb done"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cli_versions_watch_waits_for_the_backfill_and_draws_a_full_bar() {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;
    let mut bulk = String::new();
    for day in 1..=28 {
        bulk.push_str("{\"create\": {\"blueprint\": \"article\"}}\n");
        bulk.push_str(&format!(
            "{{\"project_version\": 1, \"date_created\": \"2020-02-{day:02}\"}}\n"
        ));
    }
    let written = app
        .send(reqwest::Method::POST, "/myblog/_bulk", Some(bulk))
        .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let mut next = article();
    next["columns"]["summary"] = json!({"type": "text"});
    app.put_and_freeze("myblog", "article", &next).await;

    let watch = dstore(
        &app,
        &["versions", "myblog", "--watch", "--timeout", "30"],
        None,
    )
    .await;
    assert_success(&watch);
    let text = stdout(&watch);
    assert!(
        text.contains(&format!("[{}] 100%  28/28 items, finished", "#".repeat(30))),
        "{text}"
    );
    assert!(text.contains("myblog: newest version 2"), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn cli_prints_the_servers_errors_and_exits_non_zero() {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;

    let invalid =
        json!({"id": "0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e02", "project_version": 1, "title": 5});
    let put = dstore(
        &app,
        &["item", "put", "myblog", "article", "-"],
        Some(&invalid.to_string()),
    )
    .await;
    assert_eq!(put.status.code(), Some(1), "{}", stdout(&put));
    let message = stderr(&put);
    assert!(
        message.starts_with("dstore: the server answered 422 Unprocessable Entity: invalid item")
            && message.contains("\n  /title: ")
            && message.contains("\n  /date_created: "),
        "{message}"
    );

    let nothing = dstore(&app, &["freeze", "myblog"], None).await;
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        stderr(&nothing).contains("409 Conflict: nothing changed since version 1"),
        "{}",
        stderr(&nothing)
    );

    let unknown = dstore(&app, &["versions", "nosuchproject"], None).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("404 Not Found"),
        "{}",
        stderr(&unknown)
    );

    let not_json = dstore(
        &app,
        &["blueprint", "put", "myblog", "article", "-"],
        Some("{oops"),
    )
    .await;
    assert_eq!(not_json.status.code(), Some(1));
    assert!(
        stderr(&not_json)
            .starts_with("dstore: - is not valid JSON: key must be a string at line 1"),
        "{}",
        stderr(&not_json)
    );

    let no_file = dstore(
        &app,
        &["item", "put", "myblog", "article", "/no/such/file.json"],
        None,
    )
    .await;
    assert_eq!(no_file.status.code(), Some(1));
    assert!(
        stderr(&no_file).starts_with("dstore: cannot read /no/such/file.json: "),
        "{}",
        stderr(&no_file)
    );
    app.stop().await;
}

#[tokio::test]
async fn cli_says_when_no_server_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("http://127.0.0.1:{port}");
    let output = dstore_at(
        "http://127.0.0.1:1",
        &["freeze", "myblog", "--server", &down],
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with(&format!(
            "dstore: cannot reach the dstore server at {down}/: "
        )) && message.contains("is it running?"),
        "{message}"
    );
    let bad = dstore_at(
        "http://127.0.0.1:1",
        &["freeze", "myblog", "--server", "localhost"],
        None,
    )
    .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("is not an http(s) URL"),
        "{}",
        stderr(&bad)
    );
}

#[tokio::test]
async fn cli_help_describes_every_client_command() {
    let none = "http://127.0.0.1:1";
    let help = dstore_at(none, &["--help"], None).await;
    assert_success(&help);
    let text = stdout(&help);
    for command in [
        "serve",
        "check-config",
        "blueprint",
        "freeze",
        "diff",
        "changes",
        "versions",
        "item",
        "DSTORE_SERVER",
    ] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
    let item = dstore_at(none, &["item", "--help"], None).await;
    assert!(stdout(&item).contains("--server"), "{}", stdout(&item));
    let wrong = dstore_at(none, &["item", "put", "myblog"], None).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(stderr(&wrong).contains("<BLUEPRINT>"), "{}", stderr(&wrong));
}

#[tokio::test]
async fn cli_freeze_dry_run_prints_the_report_and_diff_prints_the_verdicts() {
    let app = spawn_app().await;
    let product = |price: &str| {
        json!({"postgresql": {"table": "products"}, "elasticsearch": {"type": "product"},
            "columns": {"price": {"type": price}}})
    };
    app.put_and_freeze("shop", "product", &product("float"))
        .await;
    for price in [1.5, 2.0] {
        let id = uuid::Uuid::new_v4();
        let put = app
            .put(
                &format!("/shop/product/{id}"),
                &json!({"id": id, "project_version": 1, "price": price}),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
    }
    app.put("/shop/product/_blueprint", &product("integer"))
        .await;

    let dry = dstore(&app, &["freeze", "shop", "--dry-run"], None).await;
    let text = stdout(&dry);
    assert_eq!(dry.status.code(), Some(1), "{text}");
    assert!(
        stderr(&dry).contains("would be refused") && stderr(&dry).contains("--force"),
        "{}",
        stderr(&dry)
    );
    assert!(
        text.contains("freezing would make version 2")
            && text.contains("counted on 2 stored items"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|line| line.trim_start().starts_with("product.price"))
        .unwrap_or_else(|| panic!("no product.price row in:\n{text}"));
    assert!(
        row.contains("lossless") && row.contains("lossy: 1 lose a value"),
        "{row}"
    );
    assert!(text.contains("rocksdb would run:"), "{text}");

    // The refused freeze shows the same table, and --force freezes.
    let refused = dstore(&app, &["freeze", "shop"], None).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stdout(&refused).contains("product.price"),
        "{}",
        stdout(&refused)
    );
    assert!(stderr(&refused).contains("409"), "{}", stderr(&refused));
    let forced = dstore(&app, &["freeze", "shop", "--force"], None).await;
    assert_success(&forced);
    assert_eq!(stdout(&forced).trim(), "shop: frozen as version 2");

    let diff = dstore(&app, &["diff", "shop", "1", "2"], None).await;
    assert_success(&diff);
    let text = stdout(&diff);
    assert!(text.starts_with("shop: version 1 → 2: 1 change"), "{text}");
    assert!(
        text.contains("column.update product.price type: float -> integer"),
        "{text}"
    );
    assert!(
        text.contains("FROM READS TO") && text.contains("lossy"),
        "{text}"
    );
    let missing = dstore(&app, &["diff", "shop", "1", "9"], None).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));
    app.stop().await;
}

#[tokio::test]
async fn cli_changes_prints_the_feed_as_ndjson_and_follows_it() {
    let app = spawn_app().await;
    app.put_and_freeze("myblog", "article", &article()).await;
    let item = |title: &str| json!({"project_version": 1, "title": title, "date_created": "2020-01-02 03:04:05"});
    let first = app.post("/myblog/article", Some(&item("first"))).await;
    assert_eq!(first.status, 201, "{}", first.body);

    let page = dstore(&app, &["changes", "myblog"], None).await;
    assert_success(&page);
    let lines: Vec<Value> = stdout(&page)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON change per line"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", stdout(&page));
    assert_eq!(lines[0]["item"]["title"], "first");

    // --follow keeps printing as writes arrive.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dstore"))
        .args(["changes", "myblog", "--version", "1", "--follow"])
        .env("DSTORE_SERVER", &app.address)
        .env_remove("DSTORE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout_pipe = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout_pipe)
            .lines()
            .take(3)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for title in ["second", "third"] {
        let put = app.post("/myblog/article", Some(&item(title))).await;
        assert_eq!(put.status, 201, "{}", put.body);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let lines = reader.join().unwrap();
    let titles: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["item"]["title"].to_string())
        .collect();
    assert_eq!(titles, ["\"first\"", "\"second\"", "\"third\""]);

    let missing = dstore(&app, &["changes", "nothing"], None).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));
    app.stop().await;
}

/// Names a URL would drop (empty, `.`, `..`) are refused before anything is sent, and an endless
/// input is read only up to the most a request may hold.
#[tokio::test]
async fn cli_refuses_names_a_url_drops_and_endless_input() {
    let none = "http://127.0.0.1:1";
    for args in [
        &["blueprint", "put", "blog", "..", "-"][..],
        &["blueprint", "get", "blog", "."],
        &["versions", ""],
        &["keys", "revoke", ".."],
    ] {
        let output = dstore_at(none, args, Some("{}")).await;
        assert!(!output.status.success(), "{args:?}: {}", stdout(&output));
        assert!(
            stderr(&output).contains("is not a name"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let endless = dstore_at(none, &["item", "put", "blog", "article", "/dev/zero"], None).await;
    assert!(!endless.status.success());
    assert!(
        stderr(&endless).contains("larger than 64 MiB"),
        "{}",
        stderr(&endless)
    );
}

/// `changes --follow` against a server that refuses with 503 first, then cuts a stream in the
/// middle of an event, then ends the next stream with a 503 `gone`: the command waits each 503
/// out, prints only the event it received whole, reconnects from that event's id (never from the
/// cut one's), and ends only on a refusal that is not a 503.
#[tokio::test]
async fn cli_follow_goes_on_from_the_last_whole_event_and_waits_out_503s() {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let stream_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-dstore-version: 1\r\nconnection: close\r\n\r\n";
    let answers = [
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"status\":\"busy\",\"errors\":[],\"code\":503}"
            .to_string(),
        format!("{stream_head}id: 41\ndata: {{\"revision\":41}}\n\nid: 42\ndata: {{\"revi"),
        format!("{stream_head}event: gone\ndata: {{\"status\":\"storage away\",\"code\":503}}\n\n"),
        format!("{stream_head}event: gone\ndata: {{\"status\":\"compacted\",\"code\":410}}\n\n"),
    ];
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heard = asked.clone();
    std::thread::spawn(move || {
        for answer in answers {
            let (mut socket, _) = listener.accept().unwrap();
            let mut request_line = String::new();
            let mut reader = BufReader::new(socket.try_clone().unwrap());
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
            }
            heard.lock().unwrap().push(request_line.trim().to_string());
            socket.write_all(answer.as_bytes()).unwrap();
        }
    });
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        dstore_at(&address, &["changes", "p", "--follow"], None),
    )
    .await
    .expect("the command ends on the 410");
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 4, "{asked:?}\n{}", stderr(&output));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "{\"revision\":41}\n",
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("compacted"), "{}", stderr(&output));
    assert!(!asked[1].contains("since=4"), "{asked:?}");
    for reconnect in &asked[2..] {
        assert!(
            reconnect.contains("since=41&") || reconnect.ends_with("since=41 HTTP/1.1"),
            "{asked:?}"
        );
        assert!(reconnect.contains("version=1"), "{asked:?}");
    }
}
