//! Load generator for dstore: drives item PUTs at a chosen concurrency, or `_bulk` requests, with fresh
//! uuids, and prints items/s, latency percentiles and error counts.
//!
//! `dstore-bench --embedded` starts a dstore in-process on a temporary directory first, so one command
//! measures the embedded default; without it, `--address` names a running server.
//!
//! `--mode hostile` sends the worst requests a client can (tens of thousands of unknown keys, a `_bulk`
//! line of twenty million numbers, nesting past the limit, many bodies at once) and prints the
//! process's peak RSS after each, so the memory bounds are measured, not assumed. Its figures are the
//! whole process's: with `--embedded`, client and server together.
//!
//! `--mode followers` opens `--followers` idle server-sent-event connections to the change feed and
//! prints the memory they cost, then writes one item and prints how long every follower took to get
//! it. The client side keeps only its sockets, so with `--embedded` the growth is the server's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use uuid::Uuid;

/// See `dstore::allocator`.
#[global_allocator]
static GLOBAL: dstore::allocator::Allocator = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    Put,
    Bulk,
    Hostile,
    Followers,
}

#[derive(Parser, Debug)]
#[command(name = "dstore-bench", about = "Load generator for dstore")]
struct Args {
    /// Server address (host:port) when not --embedded.
    #[arg(long, default_value = "127.0.0.1:2020")]
    address: String,
    /// Start a dstore in this process on a temporary directory.
    #[arg(long)]
    embedded: bool,
    /// Journal durability of the embedded server: sync or buffered.
    #[arg(long, default_value = "sync")]
    durability: String,
    #[arg(long, value_enum, default_value = "put")]
    mode: Mode,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Items per `_bulk` request.
    #[arg(long, default_value_t = 1000)]
    bulk_size: usize,
    #[arg(long, default_value = "bench")]
    project: String,
    /// HTTP worker threads of the embedded server (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Give each item a polygon of this many vertices (0: none), to measure geometry checks.
    #[arg(long, default_value_t = 0)]
    polygon: usize,
    /// `--mode followers`: idle change feed followers to open.
    #[arg(long, default_value_t = 1000)]
    followers: usize,
}

/// A minimal HTTP/1.1 keep-alive connection: the client must not cost more CPU than the server.
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    async fn open(address: &str) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(stream),
            host: address.to_string(),
        })
    }

    /// Sends a request and returns the status code and body.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

fn blueprint() -> serde_json::Value {
    json!({
        "postgresql": {"table": "articles"},
        "elasticsearch": {"type": "article"},
        "columns": {
            "title": {"type": "string"},
            "body": {"type": "text"},
            "views": {"type": "integer"},
            "date_created": {"type": "datetime", "validation": {"required": true}},
            "location": {"type": "point"},
            "area": {"type": "polygon"},
            "extra": {"type": "json"}
        }
    })
}

fn item(id: Uuid, version: u64, polygon: usize) -> serde_json::Value {
    let mut item = json!({
        "id": id,
        "project_version": version,
        "title": "A benchmark article",
        "body": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "views": 42,
        "date_created": "2026-11-22 10:00:00",
        "location": {"type": "Point", "coordinates": [8.54, 47.37]}
    });
    if polygon >= 3 {
        // A regular polygon around Zürich: valid, so the check runs to the end.
        let mut ring: Vec<serde_json::Value> = (0..polygon)
            .map(|i| {
                let angle = i as f64 / polygon as f64 * std::f64::consts::TAU;
                json!([8.54 + 0.01 * angle.cos(), 47.37 + 0.01 * angle.sin()])
            })
            .collect();
        ring.push(ring[0].clone());
        item["area"] = json!({"type": "Polygon", "coordinates": [ring]});
    }
    item
}

async fn setup(address: &str, project: &str) -> Result<u64, String> {
    let mut c = Connection::open(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let path = format!("/{project}/article/_blueprint");
    let (status, body) = c
        .request("PUT", &path, blueprint().to_string().as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!(
            "PUT {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let (_, _) = c
        .request("POST", &format!("/{project}/_version"), b"")
        .await
        .map_err(|e| e.to_string())?;
    let (_, body) = c
        .request("GET", &format!("/{project}/_version"), b"")
        .await
        .map_err(|e| e.to_string())?;
    let versions: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    versions["project_version"]
        .as_u64()
        .ok_or_else(|| "no version".to_string())
}

/// Request bodies built once and given fresh ids in place, so the client spends its CPU on sending.
struct Template {
    unit: Vec<u8>,
    /// Where the id placeholder sits in `unit`.
    slots: Vec<usize>,
}

const PLACEHOLDER: &str = "00000000-0000-4000-8000-000000000000";

impl Template {
    fn new(mode: Mode, version: u64, polygon: usize) -> Template {
        let id: Uuid = PLACEHOLDER.parse().expect("a uuid");
        let mut unit = Vec::new();
        if mode == Mode::Bulk {
            unit.extend_from_slice(
                json!({"put": {"blueprint": "article", "id": id}})
                    .to_string()
                    .as_bytes(),
            );
            unit.push(b'\n');
        }
        unit.extend_from_slice(item(id, version, polygon).to_string().as_bytes());
        unit.push(b'\n');
        let slots = unit
            .windows(PLACEHOLDER.len())
            .enumerate()
            .filter(|(_, w)| *w == PLACEHOLDER.as_bytes())
            .map(|(i, _)| i)
            .collect();
        Template { unit, slots }
    }

    fn body(&self, units: usize) -> Vec<u8> {
        self.unit.repeat(units)
    }

    /// Writes a fresh id into the `index`-th unit of `body` and returns it.
    fn fill(&self, body: &mut [u8], index: usize) -> Uuid {
        let id = Uuid::new_v4();
        let mut text = [0u8; 36];
        id.hyphenated().encode_lower(&mut text);
        let base = index * self.unit.len();
        for slot in &self.slots {
            body[base + slot..base + slot + 36].copy_from_slice(&text);
        }
        id
    }
}

#[derive(Default)]
struct Totals {
    items: AtomicU64,
    errors: AtomicU64,
}

async fn worker(
    args: Arc<Args>,
    address: String,
    version: u64,
    stop: Arc<AtomicBool>,
    totals: Arc<Totals>,
) -> Histogram<u64> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let template = Template::new(args.mode, version, args.polygon);
    let mut body = template.body(if args.mode == Mode::Bulk {
        args.bulk_size
    } else {
        1
    });
    let Ok(mut connection) = Connection::open(&address).await else {
        totals.errors.fetch_add(1, Ordering::Relaxed);
        return histogram;
    };
    while !stop.load(Ordering::Relaxed) {
        let method = if args.mode == Mode::Put {
            "PUT"
        } else {
            "POST"
        };
        let (path, count) = match args.mode {
            Mode::Put | Mode::Hostile | Mode::Followers => {
                let id = template.fill(&mut body, 0);
                (format!("/{}/article/{id}", args.project), 1)
            }
            Mode::Bulk => {
                for i in 0..args.bulk_size {
                    template.fill(&mut body, i);
                }
                (format!("/{}/_bulk", args.project), args.bulk_size as u64)
            }
        };
        let started = Instant::now();
        match connection.request(method, &path, &body).await {
            Ok((200 | 201, response)) => {
                let failed = args.mode == Mode::Bulk
                    && response.windows(14).any(|w| w == b"\"errors\":true");
                if failed {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    totals.items.fetch_add(count, Ordering::Relaxed);
                }
            }
            Ok(_) => {
                totals.errors.fetch_add(count, Ordering::Relaxed);
            }
            Err(_) => {
                totals.errors.fetch_add(count, Ordering::Relaxed);
                match Connection::open(&address).await {
                    Ok(c) => connection = c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                continue;
            }
        }
        let _ = histogram.record(started.elapsed().as_micros() as u64);
    }
    histogram
}

fn main() -> std::process::ExitCode {
    dstore::allocator::tune();
    let args = Arc::new(Args::parse());
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let mut _dir = None;
        let mut server = None;
        let address = if args.embedded {
            let dir = tempfile_dir();
            let mut settings = dstore::config::Settings::default();
            settings.server.host = "127.0.0.1".into();
            settings.server.port = 0;
            settings.server.workers = args.workers;
            settings.storage.data_dir = dir.clone();
            settings.storage.durability = match args.durability.as_str() {
                "buffered" => dstore::journal::Durability::Buffered,
                _ => dstore::journal::Durability::Sync,
            };
            settings.log.level = "warn".into();
            dstore::telemetry::init(&settings.log);
            let app = dstore::startup::Application::build(settings)
                .await
                .expect("dstore starts");
            let address = format!("127.0.0.1:{}", app.port());
            server = Some((app.handle(), tokio::spawn(app.run_until_stopped())));
            _dir = Some(dir);
            address
        } else {
            args.address.clone()
        };
        let version = match setup(&address, &args.project).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("dstore-bench: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        if args.mode == Mode::Hostile {
            hostile(&address, &args.project, version).await;
        } else if args.mode == Mode::Followers {
            followers(&address, &args.project, version, args.followers).await;
        } else {
            load(args.clone(), &address, version).await;
        }
        if let Some((handle, running)) = server {
            handle.stop(true).await;
            let _ = running.await;
        }
        if let Some(dir) = _dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::ExitCode::SUCCESS
    })
}

/// Drives the load of `--mode put|bulk` and prints its figures.
async fn load(args: Arc<Args>, address: &str, version: u64) {
    let address = address.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                args.clone(),
                address.clone(),
                version,
                stop.clone(),
                totals.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for w in workers {
        if let Ok(h) = w.await {
            let _ = histogram.add(h);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let items = totals.items.load(Ordering::Relaxed);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "mode={:?} concurrency={} durability={} duration={elapsed:.1}s",
        args.mode,
        args.concurrency,
        if args.embedded {
            args.durability.as_str()
        } else {
            "server's"
        }
    );
    println!(
        "items={items} items/s={:.0} requests={} errors={}",
        items as f64 / elapsed,
        histogram.len(),
        totals.errors.load(Ordering::Relaxed)
    );
    println!(
        "latency_ms p50={:.2} p95={:.2} p99={:.2} max={:.2}",
        ms(0.5),
        ms(0.95),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
}

/// This process's resident memory now and at its peak since the last reset, in MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts a new peak (Linux: writing 5 to clear_refs resets VmHWM).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One worst case: its name, method, path and body.
type Case = (&'static str, &'static str, String, Vec<u8>);

/// The worst cases, each built only when it is sent, so the client holds one at a time.
fn hostile_case(index: usize, project: &str, version: u64) -> Option<Case> {
    let put = || format!("/{project}/article/{}", Uuid::new_v4());
    Some(match index {
        0 => {
            let mut unknown = item(Uuid::new_v4(), version, 0);
            for i in 0..30_000 {
                unknown[format!("unknown_{i}")] = json!(i);
            }
            (
                "30,000 unknown keys",
                "PUT",
                put(),
                unknown.to_string().into_bytes(),
            )
        }
        1 => {
            let action = json!({"put": {"blueprint": "article", "id": Uuid::new_v4()}});
            let mut body = format!("{action}\n{{\"project_version\": {version}, \"extra\": [");
            body.push_str(&"1,".repeat(20_000_000));
            body.push_str("1]}\n");
            (
                "_bulk line of 20 million numbers",
                "POST",
                format!("/{project}/_bulk"),
                body.into_bytes(),
            )
        }
        2 => {
            let deep = format!(
                "{{\"project_version\": {version}, \"extra\": {}1{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            (
                "nesting 100,000 levels deep",
                "PUT",
                put(),
                deep.into_bytes(),
            )
        }
        3 => {
            let mut many = String::new();
            for _ in 0..50_000 {
                many.push_str(
                    &json!({"put": {"blueprint": "article", "id": Uuid::new_v4()}}).to_string(),
                );
                many.push('\n');
                many.push_str(&item(Uuid::new_v4(), version, 0).to_string());
                many.push('\n');
            }
            (
                "_bulk of 50,000 valid items",
                "POST",
                format!("/{project}/_bulk"),
                many.into_bytes(),
            )
        }
        _ => return None,
    })
}

/// Sends each worst case and prints the status it got and the peak RSS while it ran.
async fn hostile(address: &str, project: &str, version: u64) {
    let (idle, _) = rss();
    println!("idle | | {idle:.0} |");
    println!("case | status | RSS after (MiB) | peak RSS (MiB)");
    for index in 0.. {
        reset_peak();
        let Some((name, method, path, body)) = hostile_case(index, project, version) else {
            break;
        };
        let status = match Connection::open(address).await {
            Ok(mut c) => c.request(method, &path, &body).await.map_or(0, |(s, _)| s),
            Err(_) => 0,
        };
        drop(body);
        let (now, peak) = rss();
        println!("{name} | {status} | {now:.0} | {peak:.0}");
    }
    // 64 clients at once, each with a 1 MiB body of one-digit numbers: the densest JSON there is.
    reset_peak();
    let dense = Arc::new(
        format!(
            "{{\"project_version\": {version}, \"extra\": [{}1]}}",
            "1,".repeat(500_000)
        )
        .into_bytes(),
    );
    let statuses: Vec<String> = futures::future::join_all((0..64).map(|_| {
        let (dense, address) = (dense.clone(), address.to_string());
        let path = format!("/{project}/article/{}", Uuid::new_v4());
        async move {
            match Connection::open(&address).await {
                Ok(mut c) => match c.request("PUT", &path, &dense).await {
                    Ok((status, _)) => status.to_string(),
                    Err(e) => format!("cut off ({})", e.kind()),
                },
                Err(e) => format!("refused ({})", e.kind()),
            }
        }
    }))
    .await;
    let (now, peak) = rss();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for status in &statuses {
        *counts.entry(status.as_str()).or_default() += 1;
    }
    println!("64 x 1 MiB of numbers at once | {counts:?} | {now:.0} | {peak:.0}");
}

/// Opens `count` idle SSE followers of the project's change feed; prints what they cost and how
/// long one write takes to reach them all.
async fn followers(address: &str, project: &str, version: u64, count: usize) {
    let request = format!(
        "GET /{project}/_changes?since=now HTTP/1.1\r\nHost: {address}\r\n\
         Accept: text/event-stream\r\n\r\n"
    );
    // Let the server settle (its first requests allocate pools and caches).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, _) = rss();
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(e) => {
                println!("followers: connection {} refused: {e}", streams.len());
                break;
            }
        };
        stream.write_all(request.as_bytes()).await.expect("sent");
        // The headers and the `retry:` line: the follower is in.
        let mut seen = Vec::new();
        let mut buffer = [0u8; 512];
        while !seen.windows(6).any(|w| w == b"retry:") {
            let n = stream.read(&mut buffer).await.expect("read");
            assert!(n > 0, "the server closed a follower");
            seen.extend_from_slice(&buffer[..n]);
        }
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = rss();
    println!(
        "{} idle SSE followers: RSS {before:.0} MiB before, {after:.0} MiB after: {:.1} KiB each",
        streams.len(),
        (after - before) * 1024.0 / streams.len().max(1) as f64
    );
    // One write reaches every follower.
    let started = Instant::now();
    let id = Uuid::new_v4();
    let item = serde_json::to_vec(&item(id, version, 0)).expect("JSON");
    let path = format!("/{project}/article/{id}");
    let status = match Connection::open(address).await {
        Ok(mut c) => c.request("PUT", &path, &item).await.map_or(0, |(s, _)| s),
        Err(_) => 0,
    };
    let waits = futures::future::join_all(streams.iter_mut().map(|stream| async move {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 512];
        let reading = async {
            while !seen.windows(5).any(|w| w == b"data:") {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => seen.extend_from_slice(&buffer[..n]),
                }
            }
            Some(started.elapsed())
        };
        tokio::time::timeout(Duration::from_secs(30), reading)
            .await
            .ok()
            .flatten()
    }))
    .await;
    let got: Vec<Duration> = waits.iter().flatten().copied().collect();
    let (now, _) = rss();
    println!(
        "one write (status {status}) reached {}/{} followers; the last after {:.0} ms; RSS {now:.0} MiB",
        got.len(),
        streams.len(),
        got.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dstore-bench-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}
