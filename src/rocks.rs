//! RocksDB's memory in this process: one memtable budget and one block cache, shared by every
//! database dstore opens here (the catalog, which also holds the audit log; the journal, which
//! holds the local keyspaces; with a broker, the keyspaces' own database).
//!
//! Memtables are most of what RocksDB holds; with a budget per database the process needed the sum
//! of all budgets under a load that writes to every database at once (`_bulk`: the journal and the
//! keyspaces). One write-buffer manager flushes the largest memtable of whichever database crosses
//! the shared budget. Each table file's index and bloom filter live in the block cache too, cut
//! into partitions of 4 KiB under a small top level, so the process holds about
//! `MEMTABLES + BLOCK_CACHE` of RocksDB memory however many databases it opens, whatever the load
//! and however many items the journal holds (`/_metrics`: `dstore_rocksdb_memory_bytes`).

use std::sync::OnceLock;

use rocksdb::{BlockBasedIndexType, BlockBasedOptions, Cache, Options, WriteBufferManager};

/// What every memtable of the process may hold together, the catalog's (and so the audit log's)
/// included. Once the catalog's memtable counted here, 48 MiB kept PUT's rate where 32 MiB lost 4 %
/// of it; RSS after a PUT run fell from about 126 to 82 MiB all the same (README, Performance).
pub const MEMTABLES: usize = 48 << 20;
/// The most one column family's memtable holds before it is flushed.
pub const MEMTABLE: usize = 16 << 20;
/// The block cache every database of the process shares: data blocks, and every table file's
/// index and filter partitions.
pub const BLOCK_CACHE: usize = 16 << 20;
/// The size of an index or filter partition.
const METADATA_BLOCK: usize = 4096;

struct Shared {
    memtables: WriteBufferManager,
    cache: Cache,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        // No stall: past the budget RocksDB flushes; writers wait only on RocksDB's own stall rules.
        memtables: WriteBufferManager::new_write_buffer_manager(MEMTABLES, false),
        cache: Cache::new_lru_cache(BLOCK_CACHE),
    })
}

/// What RocksDB holds in this process now: (memtable bytes, block cache bytes).
pub fn usage() -> (usize, usize) {
    let shared = shared();
    (shared.memtables.get_usage(), shared.cache.get_usage())
}

/// Database options that count the database's memtables in the process's budget.
pub fn db_options() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_manager(&shared().memtables);
    options
}

/// Sets a column family's memtables to at most `MEMTABLE` and its table blocks, index and filter
/// blocks included, in the shared cache; `tables` adds the family's own table options.
///
/// Held outside the cache, indexes and filters grew with the data, about 7.5 bytes per journal
/// item: over a journal of 18-19 M items, 65-79 MiB of them and a peak RSS of 224-231 MiB. Whole
/// in a 16 MiB cache, each file's one filter block was evicted and read again by the next look-up
/// (`_bulk` with PostgreSQL fell to a third). Partitioned, only the 4 KiB partitions that look-ups
/// touch are cached; the top levels and the files of level 0, which every look-up reads, stay
/// pinned. Over the same journals: peak RSS 148-162 MiB, `_bulk` and PUT 6-17 % faster (the
/// partitions fit the CPU's caches where whole filters did not); on a fresh journal, unchanged
/// (README, Performance).
pub fn family(options: &mut Options, tables: impl FnOnce(&mut BlockBasedOptions)) {
    options.set_write_buffer_size(MEMTABLE);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&shared().cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(METADATA_BLOCK);
    tables(&mut table);
    options.set_block_based_table_factory(&table);
}

/// Level-0 files that start a compaction in a family keyed by item ids (RocksDB's default is 4).
pub const ITEM_LEVEL0_FILES: i32 = 8;

/// Compaction for a family keyed by item ids. Clients choose ids at random, so every flushed file
/// spans the whole key range and each compaction out of level 0 rewrites the whole level below it
/// (until that level outgrows `max_bytes_for_level_base`, every item of the family): merging twice
/// as many flushed files at once halves that work. Under sustained `_bulk` (two 20 s runs back to
/// back, four alternating runs), compactions took 32 % less CPU per item (RocksDB's LOG; README,
/// Performance); a read, or a write's look-up of the item's previous change, probes up to twice as
/// many bloom filters, held in memory.
pub fn keyed_by_item(options: &mut Options) {
    options.set_level_zero_file_num_compaction_trigger(ITEM_LEVEL0_FILES);
}
