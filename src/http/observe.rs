//! Request observation: request ids, per-route metrics and request logs.
//!
//! Every response carries `x-request-id` (the client's, when it sent a sane one, else a new one), and
//! every log line written while handling the request is inside a span holding it. Requests are counted
//! by method (a closed set), route pattern (never the raw path, so ids do not explode the label set)
//! and status, with
//! a latency histogram, and rendered in the Prometheus text format by `/_metrics`.
//!
//! A failed request (5xx) is logged as a warning, with why when dstore refused it (503); refusals
//! at most once a second, with how many went unlogged since: under overload every request may be
//! refused, and a line each would take the time the server lacks and bury the rest of the log.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web;
use tracing::Instrument;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Series {
    count: AtomicU64,
    micros: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
}

/// The series of one route, by method and status.
type Route = HashMap<(&'static str, u16), Arc<Series>, foldhash::fast::RandomState>;

/// Request counters and latency histograms by method, route and status. Keyed by route first, so
/// recording a request looks its series up with borrowed text and allocates nothing. Hashed with
/// foldhash: the keys are the route table's patterns, a method and a status, never a client's text,
/// and SipHash's two look-ups were about 0.4k instructions per request.
#[derive(Default)]
pub struct RequestMetrics {
    series: RwLock<HashMap<String, Route, foldhash::fast::RandomState>>,
}

impl RequestMetrics {
    fn record(&self, method: &'static str, route: &str, status: u16, seconds: f64) {
        let existing = self
            .series
            .read()
            .expect("metrics lock")
            .get(route)
            .and_then(|r| r.get(&(method, status)))
            .cloned();
        let series = match existing {
            Some(series) => series,
            None => self
                .series
                .write()
                .expect("metrics lock")
                .entry(route.to_string())
                .or_default()
                .entry((method, status))
                .or_default()
                .clone(),
        };
        series.count.fetch_add(1, Ordering::Relaxed);
        series
            .micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            series.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition of the request series.
    pub fn render(&self, out: &mut String) {
        let routes = self.series.read().expect("metrics lock");
        let mut keys: Vec<(&str, &str, u16, &Series)> = routes
            .iter()
            .flat_map(|(route, by)| {
                by.iter()
                    .map(move |((method, status), s)| (*method, route.as_str(), *status, &**s))
            })
            .collect();
        keys.sort_by_key(|(method, route, status, _)| (*method, *route, *status));
        out.push_str(
            "# HELP dstore_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE dstore_http_requests_total counter\n");
        for (method, route, status, s) in &keys {
            let _ = writeln!(
                out,
                "dstore_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                s.count.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP dstore_http_request_duration_seconds Time to answer an HTTP request.\n",
        );
        out.push_str("# TYPE dstore_http_request_duration_seconds histogram\n");
        for (method, route, status, s) in &keys {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            let mut cumulative = 0;
            for (bound, bucket) in BUCKETS.iter().zip(&s.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(out, "dstore_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let count = s.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "dstore_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let sum = s.micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "dstore_http_request_duration_seconds_sum{{{labels}}} {sum}"
            );
            let _ = writeln!(
                out,
                "dstore_http_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A request id: the client's when it is short and printable, else process start time and a counter.
fn request_id(request: &ServiceRequest) -> String {
    let given = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => id.to_string(),
        None => {
            static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
            let start = START.get_or_init(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            });
            let mut id = String::with_capacity(32);
            push_hex(&mut id, *start);
            id.push('-');
            push_hex(&mut id, NEXT_ID.fetch_add(1, Ordering::Relaxed));
            id
        }
    }
}

/// `value` in lowercase hexadecimal, as `{:x}` writes it (without the formatter: once per request).
fn push_hex(out: &mut String, value: u64) {
    let digits = (64 - value.leading_zeros()).div_ceil(4).max(1);
    for place in (0..digits).rev() {
        out.push(char::from(
            b"0123456789abcdef"[(value >> (place * 4)) as usize & 15],
        ));
    }
}

/// The method as a metric label, from a closed set: a client inventing methods must not create
/// series.
pub(super) fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Why dstore refused a request (503), for its log line: set on the response by the error.
#[derive(Clone, Debug)]
pub struct Refusal(pub String);

/// Refusals are logged at most once a second (see the module docs).
static REFUSALS: Throttle = Throttle::new();

/// Lets one event a second through, counting those it holds back.
struct Throttle {
    /// The second (since the process's first event) of the last event let through, plus one.
    last: AtomicU64,
    unlogged: AtomicU64,
}

impl Throttle {
    const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// How many events were held back since the last one let through, when this one is let
    /// through; `None` when it is held back.
    fn log(&self) -> Option<u64> {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        self.log_at(START.get_or_init(Instant::now).elapsed().as_secs() + 1)
    }

    fn log_at(&self, second: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Acquire);
        if second > last
            && self
                .last
                .compare_exchange(last, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::AcqRel));
        }
        self.unlogged.fetch_add(1, Ordering::AcqRel);
        None
    }
}

/// The middleware: id, span, metrics, log line.
pub async fn observe(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&request);
    let metrics = request.app_data::<web::Data<RequestMetrics>>().cloned();
    let span = tracing::info_span!("request", id = %id, method = %request.method(), path = %crate::auth::audit::Logged(request.path()));
    let mut response = next.call(request).instrument(span.clone()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let method = method_label(response.request().method());
    let route = super::route_label(response.request());
    if let Some(metrics) = metrics {
        metrics.record(method, &route, status, elapsed);
    }
    span.in_scope(|| {
        if status == 503 {
            if let Some(unlogged) = REFUSALS.log() {
                let reason = response.response().extensions().get::<Refusal>().cloned();
                let reason = reason.map_or_else(String::new, |refusal| refusal.0);
                tracing::warn!(status, %reason, unlogged, "request refused");
            }
        } else if status >= 500 {
            tracing::warn!(status, elapsed_ms = elapsed * 1e3, "request failed");
        } else {
            tracing::debug!(status, elapsed_ms = elapsed * 1e3, "request");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_let_through_once_a_second_with_the_count_held_back() {
        let throttle = Throttle::new();
        assert_eq!(throttle.log_at(1), Some(0));
        assert_eq!(throttle.log_at(1), None);
        assert_eq!(throttle.log_at(1), None);
        assert_eq!(throttle.log_at(2), Some(2));
        assert_eq!(throttle.log_at(5), Some(0));
        assert_eq!(throttle.log_at(5), None);
    }

    #[test]
    fn hexadecimal_ids_are_written_as_the_formatter_writes_them() {
        for value in [0, 1, 15, 16, 0xdead_beef, u64::MAX] {
            let mut out = String::new();
            push_hex(&mut out, value);
            assert_eq!(out, format!("{value:x}"));
        }
    }

    #[test]
    fn series_are_rendered_in_label_order_with_their_counts() {
        let metrics = RequestMetrics::default();
        metrics.record("PUT", "/{project}/{blueprint}/{id}", 200, 0.0004);
        metrics.record("PUT", "/{project}/{blueprint}/{id}", 200, 0.003);
        metrics.record("GET", "/_health", 200, 0.0001);
        metrics.record("PUT", "/{project}/{blueprint}/{id}", 422, 0.0001);
        let mut out = String::new();
        metrics.render(&mut out);
        let counts: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("dstore_http_requests_total{"))
            .collect();
        assert_eq!(
            counts,
            [
                "dstore_http_requests_total{method=\"GET\",route=\"/_health\",status=\"200\"} 1",
                "dstore_http_requests_total{method=\"PUT\",route=\"/{project}/{blueprint}/{id}\",status=\"200\"} 2",
                "dstore_http_requests_total{method=\"PUT\",route=\"/{project}/{blueprint}/{id}\",status=\"422\"} 1",
            ]
        );
        assert!(out.contains("dstore_http_request_duration_seconds_bucket{method=\"PUT\",route=\"/{project}/{blueprint}/{id}\",status=\"200\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("dstore_http_request_duration_seconds_bucket{method=\"PUT\",route=\"/{project}/{blueprint}/{id}\",status=\"200\",le=\"0.005\"} 2\n"));
    }
}
