//! The `_bulk` reader: no body panics it, and every item it hands out parses within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ops) = dstore_model::bulk::parse(data) else {
        return;
    };
    for op in &ops {
        if op.item.is_some() {
            let _ = op.parse_item(1 << 20);
        }
    }
});
