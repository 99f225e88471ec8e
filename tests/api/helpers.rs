//! Starts the real service on a random port with its own temporary data directory.

use std::sync::Arc;

use dstore::config::Settings;
use dstore::projector::rocksdb::RocksProjector;
use dstore::projector::Projector;
use dstore::startup::Application;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use tempfile::TempDir;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub rocksdb: Option<Arc<RocksProjector>>,
    /// The embedded journal; none in cluster mode.
    pub journal: Option<Arc<dstore::journal::Journal>>,
    _dir: TempDir,
    handle: dstore::startup::StopHandle,
    running: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Whether the service builds with the default settings as `configure` leaves them (a
/// temporary data directory, any port): its start-up error as text otherwise. Nothing is served.
pub async fn build_with(configure: fn(&mut Settings)) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.storage.data_dir = dir.path().to_path_buf();
    configure(&mut settings);
    Application::build(settings)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with_projectors(configure, Vec::new()).await
}

pub async fn spawn_app_with_projectors(
    configure: impl FnOnce(&mut Settings),
    extra: Vec<Arc<dyn Projector>>,
) -> TestApp {
    // DSTORE_TEST_LOG=debug (a tracing filter) shows the service's logs of a failing test.
    if let Ok(level) = std::env::var("DSTORE_TEST_LOG") {
        dstore::telemetry::init(&dstore::config::LogSettings { level, json: false });
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::default();
    settings.server.host = "127.0.0.1".into();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.storage.data_dir = dir.path().to_path_buf();
    settings.projection.wait_timeout_secs = 10;
    configure(&mut settings);
    let app = Application::build_with(settings, extra)
        .await
        .expect("the service starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let rocksdb = app.rocksdb();
    let journal = app.journal();
    let handle = app.handle();
    let running = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::new(),
        rocksdb,
        journal,
        _dir: dir,
        handle,
        running,
    }
}

/// A response's status and JSON body (Null when the body is not JSON).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub async fn from(response: Response) -> Answer {
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body }
    }

    /// The messages of the error body, joined, for assertions.
    pub fn messages(&self) -> String {
        self.body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["path"].as_str().unwrap_or_default(),
                            e["message"].as_str().unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    pub fn paths(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| e["path"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl TestApp {
    /// The text of `GET /_metrics`.
    pub async fn metrics(&self) -> String {
        self.metrics_read_with(None).await
    }

    /// The text of `GET /_metrics`, asked with `key` when given.
    async fn metrics_read_with(&self, key: Option<&str>) -> String {
        let mut request = self.client.get(format!("{}/_metrics", self.address));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request
            .send()
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("a metrics text")
    }

    /// The value of the metric series `series` (its name, and its labels if it has any), read
    /// with `key` when given.
    pub async fn metric(&self, key: Option<&str>, series: &str) -> f64 {
        let prefix = format!("{series} ");
        self.metrics_read_with(key)
            .await
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_string))
            .expect("the series is exported")
            .parse()
            .unwrap()
    }

    /// Stops the service and waits until it has released its stores.
    pub async fn stop(self) {
        drop(self.rocksdb);
        drop(self.journal);
        self.handle.stop(true).await;
        self.running
            .await
            .expect("the server task ends")
            .expect("the server stops cleanly");
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<String>) -> Answer {
        let idempotent = method == Method::GET;
        let build = || {
            let request = self
                .client
                .request(method.clone(), format!("{}{path}", self.address));
            match &body {
                Some(body) => request.body(body.clone()),
                None => request,
            }
        };
        let sent = match build().send().await {
            // A kept-alive connection the server closed while the test's thread was blocked (a
            // broker command it waited for) fails the next request on it before any answer: a
            // GET is sent again, once, on a new connection.
            Err(error) if idempotent && error.is_request() => build().send().await,
            sent => sent,
        };
        Answer::from(sent.expect("the request is sent")).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        self.send(Method::PUT, path, Some(body.to_string())).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Answer {
        self.send(Method::POST, path, body.map(Value::to_string))
            .await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None).await
    }

    /// Writes with `?wait=true` in `path` and asserts every projector applied the write.
    pub async fn put_projected(&self, path: &str, body: &Value) -> Answer {
        let put = self.put(path, body).await;
        assert_eq!(
            (put.status, &put.body["projected"]),
            (200, &json!(true)),
            "{}",
            put.body
        );
        put
    }

    /// Puts a blueprint and freezes; returns the new version.
    pub async fn put_and_freeze(&self, project: &str, blueprint: &str, body: &Value) -> u64 {
        let put = self
            .put(&format!("/{project}/{blueprint}/_blueprint"), body)
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        // A test may make the wait for projection short; on a loaded machine the migration can
        // outlast it, and the freeze asked again answers once it is done.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let frozen = loop {
            let frozen = self.post(&format!("/{project}/_version"), None).await;
            let pending = frozen.status == 503
                && frozen.body["status"]
                    .as_str()
                    .is_some_and(|s| s.contains("still pending"));
            if !pending || std::time::Instant::now() > deadline {
                break frozen;
            }
        };
        assert_eq!(frozen.status, 200, "{}", frozen.body);
        frozen.body["project_version"]
            .as_u64()
            .expect("a version number")
    }
}

/// The article blueprint as GET returns it: options at their default (`nullable: true`) are omitted.
pub fn article_normal() -> Value {
    let mut normal = article();
    normal["columns"]["location"] = json!({"type": "point"});
    normal
}

/// The seed's article blueprint.
pub fn article() -> Value {
    json!({
        "postgresql": {"table": "articles"},
        "elasticsearch": {"type": "article"},
        "columns": {
            "title": {"type": "string"},
            "date_created": {"type": "datetime", "validation": {"required": true}},
            "location": {"type": "point", "nullable": true}
        }
    })
}
