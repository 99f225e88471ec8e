//! A stand-in for Elasticsearch that answers with scripted statuses and bodies, for the failures a
//! real server will not produce on demand (429, 503, a bulk with mixed results).

use serde_json::Value;

/// A stand-in for Elasticsearch that answers every request with `answer(method, path, body)`.
pub async fn elasticsearch(answer: fn(&str, &str, &str) -> (u16, Value)) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("an address"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                // Read the head and as much body as its content-length announces.
                let (head, body_length) = loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0usize);
                        break (head, end + 4 + length);
                    }
                };
                while request.len() < body_length {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buffer[..n]);
                }
                let mut words = head.split_whitespace();
                let (method, path) = (
                    words.next().unwrap_or_default(),
                    words.next().unwrap_or_default(),
                );
                let sent = String::from_utf8_lossy(&request[(head.len() + 4).min(request.len())..]);
                let (status, body) = answer(method, path, &sent);
                let body = body.to_string();
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}
