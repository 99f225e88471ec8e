//! The installed binary as a user runs it: environment variables, signals.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_binary_honours_the_original_variables_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (data, catalog) = (dir.path().join("level"), dir.path().join("project-file"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .env("PORT", port.to_string())
        .env("LEVEL_PATH", &data)
        .env("PROJECT_FILE_PATH", &catalog)
        .env("DSTORE_HOST", "127.0.0.1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/_health"))
            .send()
            .await
        {
            assert_eq!(response.status(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "dstore did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The journal keeps the local keyspaces: no database of their own.
    assert!(data.join("journal").is_dir() && !data.join("keyspaces").exists());
    assert!(catalog.is_dir());
    // The allocator's tuning ran: no transparent huge pages (dstore::allocator).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(status.contains("THP_enabled:\t0"), "{status}");
    // A second process on the same data directory is refused, saying why.
    let second = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .env("PORT", free_port().to_string())
        .env("LEVEL_PATH", &data)
        .env("PROJECT_FILE_PATH", &catalog)
        .env("DSTORE_HOST", "127.0.0.1")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{printed}");
    assert!(
        printed.contains("another dstore process using this data directory"),
        "{printed}"
    );

    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "dstore did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    // Why every route is open is said once.
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log.matches("no master key").count(), 1, "{log}");
}

/// `check-config` refuses what `serve` would refuse, naming the setting, before checking stores.
#[test]
fn check_config_refuses_the_settings_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value, named) in [
        ("DSTORE_STORAGE_BACKEND", "postgresql", "storage.url"),
        ("DSTORE_MASTER_KEY", "short", "16 bytes"),
        (
            "DSTORE_MASTER_KEY",
            "passwordpassword",
            "distinct characters",
        ),
        (
            "DSTORE_MASTER_KEY",
            "long enough but with spaces",
            "visible ASCII",
        ),
        (
            "DSTORE_MASTER_KEY",
            "0123456789abcdef\u{e9}",
            "visible ASCII",
        ),
        ("DSTORE_HOST", "0.0.0.0", "DSTORE_MASTER_KEY"),
        ("DSTORE_MASTER_KEY", "", "DSTORE_MASTER_KEY"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_dstore"))
            .arg("check-config")
            .env("LEVEL_PATH", dir.path())
            .env(name, value)
            .env_remove("DSTORE_CONFIG")
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {printed}");
        assert!(printed.contains(named), "{name}={value}: {printed}");
        assert!(
            !printed.contains("ok      journal"),
            "{name}={value}: {printed}"
        );
    }
}

#[tokio::test]
async fn check_config_reports_each_store_and_fails_when_one_does_not_answer() {
    // Not while a test restarts the broker.
    let _broker = crate::rabbitmq::BROKER.read().await;
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .arg("check-config")
        .env("LEVEL_PATH", dir.path())
        .env("POSTGRESQL_HOST", "127.0.0.1")
        .env("POSTGRESQL_DATABASE", "postgres")
        // The test server trusts local connections, so any password logs in.
        .env("POSTGRESQL_PASSWORD", "pg-s3cret")
        .env("ELASTICSEARCH_HOST", "http://elastic:es-s3cret@127.0.0.1:9")
        .env("QUEUE_CONNECTIONSTRING", crate::rabbitmq::broker_url())
        .env_remove("DSTORE_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}");
    for printed in [&stdout, &stderr] {
        assert!(
            !printed.contains("s3cret") && !printed.contains(":guest@"),
            "no secret is printed: {printed}"
        );
    }
    assert!(stdout.contains("password = \"***\""), "{stdout}");
    assert!(stdout.contains("ok      journal"), "{stdout}");
    assert!(stdout.contains("ok      postgresql"), "{stdout}");
    assert!(stdout.contains("FAILING elasticsearch"), "{stdout}");
    assert!(stdout.contains("ok      rabbitmq"), "{stdout}");
    assert!(
        stdout.contains("guest:***@"),
        "the broker password is not repeated: {stdout}"
    );
    assert!(
        stdout.contains("ELASTICSEARCH_HOST"),
        "the failing line names the setting: {stdout}"
    );
    assert!(
        stdout.contains("port = 2020"),
        "the settings in effect are printed: {stdout}"
    );
}

pub(crate) struct Server {
    child: std::process::Child,
    pub(crate) port: u16,
}

/// A server a test forgot (or a test that failed) is killed, never left running.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(data: &std::path::Path, port: u16) -> Server {
        Server::start_with(data, port, &[]).await
    }

    /// Starts the binary with `env` added to the variables of [`Server::start`].
    pub(crate) async fn start_with(
        data: &std::path::Path,
        port: u16,
        env: &[(&str, String)],
    ) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dstore"));
        // The log goes beside the data, so a node that does not start can say why.
        std::fs::create_dir_all(data).unwrap();
        let log = data.join(format!("dstore-{port}.log"));
        command
            .env("PORT", port.to_string())
            .env("LEVEL_PATH", data)
            .env("DSTORE_HOST", "127.0.0.1")
            .env_remove("DSTORE_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let client = reqwest::Client::new();
        let started = Instant::now();
        while client
            .get(format!("http://127.0.0.1:{port}/_health"))
            .send()
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "dstore did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server { child, port }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub(crate) fn kill(self) {
        drop(self);
    }

    pub(crate) async fn stop(mut self) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "dstore did not stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9_and_reaches_the_keyspace_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(dir.path(), port).await;
    let client = reqwest::Client::new();
    let blueprint = serde_json::json!({"postgresql": {"table": "t"}, "elasticsearch": {"type": "t"},
        "columns": {"n": {"type": "integer"}}});
    client
        .put(server.url("/p/thing/_blueprint"))
        .body(blueprint.to_string())
        .send()
        .await
        .unwrap();
    client.post(server.url("/p/_version")).send().await.unwrap();

    // Writers run until the process disappears under them.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, base) = (client.clone(), server.url(""));
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0.. {
                    let id = uuid::Uuid::new_v4();
                    let body = serde_json::json!({"project_version": 1, "n": w * 1_000_000 + n});
                    match client
                        .put(format!("{base}/p/thing/{id}"))
                        .body(body.to_string())
                        .send()
                        .await
                    {
                        Ok(response) if response.status() == 200 => acknowledged.push(id),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill(); // SIGKILL
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(
        acknowledged.len() > 100,
        "the load ran: {} writes",
        acknowledged.len()
    );

    let server = Server::start(dir.path(), port).await;
    let mut in_journal = 0;
    for id in &acknowledged {
        let response = client
            .get(server.url(&format!("/p/thing/{id}")))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            in_journal += 1;
        }
    }
    // A last write with wait=true returns once the keyspace projector has caught up behind it.
    let body = serde_json::json!({"project_version": 1, "n": -1});
    let last = client
        .put(server.url(&format!("/p/thing/{}?wait=true", uuid::Uuid::new_v4())))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), 200);
    server.stop().await;

    let keyspaces =
        dstore::projector::rocksdb::RocksProjector::open_journal(&dir.path().join("journal"))
            .unwrap();
    let (project, blueprint) = (
        dstore::blueprint::Ident::parse("p").unwrap(),
        dstore::blueprint::Ident::parse("thing").unwrap(),
    );
    let in_keyspace = acknowledged
        .iter()
        .filter(|id| keyspaces.get(&project, 1, &blueprint, id).is_some())
        .count();
    println!(
        "kill -9: acknowledged {}, in the journal after restart {in_journal}, in the RocksDB keyspace {in_keyspace}",
        acknowledged.len()
    );
    assert_eq!(
        in_journal,
        acknowledged.len(),
        "an acknowledged write was lost from the journal"
    );
    assert_eq!(
        in_keyspace,
        acknowledged.len(),
        "an acknowledged write never reached the keyspace"
    );
}

#[tokio::test]
async fn with_every_store_and_the_broker_each_acknowledged_write_survives_kill_9() {
    use crate::faults::{self, Tally, WriteLoad};
    let broker = crate::rabbitmq::TestBroker::new().await;
    let db = crate::postgres::TestDatabase::create().await;
    let es = crate::elasticsearch::Es::new().await;
    let prefix = crate::elasticsearch::unique_prefix();
    let env = [
        ("QUEUE_CONNECTIONSTRING", crate::rabbitmq::broker_url()),
        ("DSTORE_QUEUE_NAMESPACE", broker.namespace.clone()),
        (
            "DATABASE_URL",
            db.settings().url.unwrap().expose().to_string(),
        ),
        ("ELASTICSEARCH_HOST", es.url.clone()),
        ("DSTORE_ELASTICSEARCH_INDEX_PREFIX", prefix.clone()),
        ("DSTORE_WAIT_TIMEOUT_SECS", "120".into()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start_with(dir.path(), port, &env).await;
    let client = reqwest::Client::new();
    let put = client
        .put(server.url("/p/thing/_blueprint"))
        .body(faults::thing().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let frozen = client.post(server.url("/p/_version")).send().await.unwrap();
    assert_eq!(frozen.status(), 200, "{}", frozen.text().await.unwrap());

    let load = WriteLoad::start(&server.url(""), 8);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill(); // SIGKILL, in the middle of the load
    let expected = load.stop().await;
    assert!(expected.acknowledged > 100, "the load ran");

    let server = Server::start_with(dir.path(), port, &env).await;
    let mut in_journal = 0;
    for (id, n) in &expected.items {
        let read = client
            .get(server.url(&format!("/p/thing/{id}")))
            .send()
            .await
            .unwrap();
        let found = match read.status().as_u16() {
            200 => read.json::<serde_json::Value>().await.unwrap()["n"].as_i64(),
            _ => None,
        };
        in_journal += usize::from(found == *n);
    }
    let last = client
        .put(server.url(&format!(
            "/p/thing/{}?wait=true&timeout=120",
            uuid::Uuid::new_v4()
        )))
        .body(serde_json::json!({"project_version": 1, "n": -1}).to_string())
        .send()
        .await
        .unwrap();
    let last: serde_json::Value = last.json().await.unwrap();
    assert_eq!(last["projected"], true, "the stores caught up: {last}");
    let postgresql = Tally::of("postgresql", &expected, &faults::postgres_items(&db).await);
    let elasticsearch = Tally::of(
        "elasticsearch",
        &expected,
        &faults::elasticsearch_items(&es, &prefix).await,
    );
    server.stop().await;
    let keyspaces =
        dstore::projector::rocksdb::RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
    let rocksdb = Tally::of(
        "rocksdb",
        &expected,
        &faults::keyspace_items(&keyspaces, &expected),
    );
    println!(
        "kill -9 with every store and the broker: {} acknowledged writes, {} requests cut off by the kill; \
         {}/{} items as acknowledged in the journal after restart",
        expected.acknowledged,
        expected.errors.len(),
        in_journal,
        expected.items.len()
    );
    assert_eq!(in_journal, expected.items.len(), "the journal lost a write");
    let mut expected = expected;
    // The requests the kill cut off are the only ones allowed to fail.
    expected.errors.clear();
    faults::report(
        "kill -9 with every store and the broker",
        &expected,
        &[rocksdb, postgresql, elasticsearch],
    );
    broker.clean_up().await;
    db.drop().await;
    es.clean_up(&prefix).await;
}
