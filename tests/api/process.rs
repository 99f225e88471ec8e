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
