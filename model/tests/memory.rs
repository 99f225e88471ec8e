//! What the in-flight budget counts for a parsed body (`json::heap_bytes`,
//! `Document::heap_bytes`) against what parsing it allocated, measured by this test binary's own
//! counting allocator: the budget bounds dstore's memory only if the count is not below it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dstore_model::document::Document;
use serde_json::json;

/// Counts the bytes allocations ask for and have not given back.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a count is kept beside.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::SeqCst);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::SeqCst);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests in this binary run on several threads, which would count each other's allocations.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Parses `body`; answers what the parsed document holds by the allocator's count and by its own.
fn measured(body: &str) -> (usize, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    let document = Document::parse(body.as_bytes()).expect("a valid body");
    let allocated = LIVE.load(Ordering::SeqCst) - before;
    let counted = document.heap_bytes();
    drop(document);
    (allocated, counted)
}

#[test]
fn a_parsed_body_is_counted_at_least_at_what_it_allocated() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    let digits: Vec<u32> = (0..100_000).map(|i| i % 10).collect();
    let keys: serde_json::Map<String, serde_json::Value> =
        (0..3000).map(|i| (format!("k{i}"), json!(i))).collect();
    let points: Vec<[f64; 2]> = (0..20_000).map(|i| [i as f64 / 1000.0, 1.5]).collect();
    let bodies = [
        (
            "flat",
            json!({"project_version": 1, "title": "a", "views": 7, "at": "2026-01-01"}),
        ),
        ("numbers", json!({"project_version": 1, "n": digits})),
        (
            "long string",
            json!({"project_version": 1, "text": "x".repeat(500_000)}),
        ),
        ("many keys", json!({"project_version": 1, "extra": keys})),
        (
            "points",
            json!({"project_version": 1, "p": {"type": "MultiPoint", "coordinates": points}}),
        ),
        (
            "nested",
            json!({"project_version": 1, "extra": [[{"a": [1, {"b": "c"}]}], {"d": null}]}),
        ),
    ];
    for (name, body) in bodies {
        let text = body.to_string();
        let (allocated, counted) = measured(&text);
        println!(
            "{name}: {} bytes of text, {allocated} allocated, {counted} counted",
            text.len()
        );
        assert!(
            counted >= allocated,
            "{name}: counted {counted} < allocated {allocated}"
        );
        // Not so far above that the budget refuses what it could hold.
        assert!(
            counted <= 2 * allocated + 1024,
            "{name}: counted {counted} > 2 × allocated {allocated}"
        );
    }
}
