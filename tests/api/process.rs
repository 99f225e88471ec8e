//! The installed binary as a user runs it: environment variables, signals.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
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
        .stderr(Stdio::null())
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
    assert!(data.join("journal").is_dir() && data.join("keyspaces").is_dir());
    assert!(catalog.is_dir());

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
}

#[test]
fn check_config_reports_each_store_and_fails_when_one_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_dstore"))
        .arg("check-config")
        .env("LEVEL_PATH", dir.path())
        .env("POSTGRESQL_HOST", "127.0.0.1")
        .env("POSTGRESQL_DATABASE", "postgres")
        .env("ELASTICSEARCH_HOST", "http://127.0.0.1:9")
        .env_remove("DSTORE_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("ok      journal"), "{stdout}");
    assert!(stdout.contains("ok      postgresql"), "{stdout}");
    assert!(stdout.contains("FAILING elasticsearch"), "{stdout}");
    assert!(
        stdout.contains("ELASTICSEARCH_HOST"),
        "the failing line names the setting: {stdout}"
    );
    assert!(
        stdout.contains("port = 2020"),
        "the settings in effect are printed: {stdout}"
    );
}
