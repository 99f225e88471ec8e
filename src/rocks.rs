//! RocksDB's memory in this process: one memtable budget and one block cache, shared by every
//! database dstore opens here (the catalog, which also holds the audit log; the journal, which
//! holds the local keyspaces; with a broker, the keyspaces' own database).
//!
//! Memtables are most of what RocksDB holds; with a budget per database the process needed the sum
//! of all budgets under a load that writes to every database at once (`_bulk`: the journal and the
//! keyspaces). One write-buffer manager flushes the largest memtable of whichever database crosses
//! the shared budget. Each table file's index and bloom filter live in the block cache too, cut
//! into partitions of 4 KiB under a small top level, so the process holds about
//! `MEMTABLES + BLOCK_CACHE` of RocksDB memory however many databases it opens and however many
//! items the journal holds (`/_metrics`: `dstore_rocksdb_memory_bytes`).
//!
//! The memtable budget starts flushes; it does not stop writes. While flushes lag behind the
//! writes (a CPU the host takes half of, `_bulk` at 16 × 5000 with PostgreSQL), memtables waiting
//! for their flush count on top, up to RocksDB's own stall of two per column family: 76 MiB
//! measured (docs/performance.md). RocksDB's stalling budget (`allow_stall`) would hold writes at
//! the budget instead; it stays off, since a stall that never ended was found with several column
//! families, where a flush of the oldest one freed too little (speedb-io/speedb#859, a RocksDB
//! fork), and a journal write that never returns stops every write of the process.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, BottommostLevelCompaction, Cache, CompactOptions,
    Options, WriteBufferManager, DB,
};

/// What every memtable of the process may hold together, the catalog's (and so the audit log's)
/// included. Once the catalog's memtable counted here, 48 MiB kept PUT's rate where 32 MiB lost 4 %
/// of it; RSS after a PUT run fell from about 126 to 82 MiB all the same (docs/performance.md).
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
/// pinned. Over the same journals: peak RSS 148-162 MiB, `_bulk` and PUT 6-17 % faster (not
/// profiled; small partitions may stay in the CPU's caches where whole filters did not); on a
/// fresh journal, unchanged (docs/performance.md).
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
/// back, four alternating runs), compactions took 32 % less CPU per item (RocksDB's LOG;
/// docs/performance.md); a read, or a write's look-up of the item's previous change, probes up to twice as
/// many bloom filters, held in memory.
pub fn keyed_by_item(options: &mut Options) {
    options.set_level_zero_file_num_compaction_trigger(ITEM_LEVEL0_FILES);
}

/// Set, in a database's marker family, once every table file it holds has the partitioned indexes
/// and filters of [`family`].
const PARTITIONED: &[u8] = b"tables_partitioned";

/// Rewrites, once and in the background, the table files a database kept from before [`family`]
/// put indexes and filters in the block cache. Such a file's filter is one block, which the cache
/// takes whole: over a journal of 20 M items made that way, the filters outgrew the cache and each
/// look-up read one back (`_bulk` fell from about 150k to 35k items/s until the files were
/// rewritten). Compacting each of `families` down to its last level writes them anew, partitioned;
/// then `marker` gets [`PARTITIONED`]. A database with no table files yet is marked at once. A
/// rewrite cut short (the process stopped, or dropped the database) is done again at the next
/// start; until it ends, the database serves as before, only slower.
pub fn partition_old_tables(
    db: &Arc<DB>,
    families: &[&'static str],
    marker: &'static str,
) -> Result<(), rocksdb::Error> {
    let cf = db.cf_handle(marker).expect("the marker's family exists");
    if db.get_cf(cf, PARTITIONED)?.is_some() {
        return Ok(());
    }
    if db.live_files()?.is_empty() {
        return db.put_cf(cf, PARTITIONED, [1]);
    }
    let weak = Arc::downgrade(db);
    let families = families.to_vec();
    let rewrite = move || {
        let started = Instant::now();
        tracing::info!("rewriting table files made before indexes and filters were partitioned");
        for name in families {
            // The database is only borrowed for one family at a time: dropped meanwhile, the
            // rewrite stops there.
            let Some(db) = weak.upgrade() else { return };
            let Some(cf) = db.cf_handle(name) else {
                continue;
            };
            let mut options = CompactOptions::default();
            options.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
            // Flushes and the compactions writes need go on meanwhile: held back, level 0 would
            // fill until RocksDB stalls every write.
            options.set_exclusive_manual_compaction(false);
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &options);
        }
        let Some(db) = weak.upgrade() else { return };
        let marked = db.put_cf(
            db.cf_handle(marker).expect("the marker's family exists"),
            PARTITIONED,
            [1],
        );
        match marked {
            Ok(()) => tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "table files rewritten with partitioned indexes and filters"
            ),
            Err(error) => tracing::warn!(%error, "could not mark the table files rewritten"),
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("rocksdb-rewrite".into())
        .spawn(rewrite)
    {
        tracing::warn!(%error, "cannot start the rewrite of old table files; it runs at the next start");
    }
    Ok(())
}

/// What to do about a RocksDB error, appended to its message: another process holding the data
/// directory's lock, or a full disk.
pub fn hint(error: &rocksdb::Error) -> &'static str {
    let message = error.as_ref();
    if message.contains("While lock file") {
        "; is another dstore process using this data directory? (one process per data directory)"
    } else if message.contains("No space left on device") {
        "; the disk is full: free space on it (a running dstore writes again by itself once at \
         least 64 MiB is free; one that could not start, when started again)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAMILY: &str = "items";

    fn table_readers(db: &DB) -> u64 {
        let cf = db.cf_handle(FAMILY).unwrap();
        db.property_int_value_cf(cf, "rocksdb.estimate-table-readers-mem")
            .unwrap()
            .unwrap_or(0)
    }

    fn table_properties(db: &DB) -> String {
        let cf = db.cf_handle(FAMILY).unwrap();
        db.property_value_cf(cf, "rocksdb.aggregated-table-properties")
            .unwrap()
            .unwrap_or_default()
    }

    fn open(path: &std::path::Path, tables: Options) -> Arc<DB> {
        let mut options = db_options();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = [rocksdb::ColumnFamilyDescriptor::new(FAMILY, tables)];
        Arc::new(DB::open_cf_descriptors(&options, path, families).unwrap())
    }

    #[test]
    fn table_files_made_with_whole_filters_are_rewritten_partitioned_once() {
        let dir = tempfile::tempdir().unwrap();
        // A database as dstore made it before: whole filters, held outside the cache.
        let mut before = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        before.set_block_based_table_factory(&table);
        let db = open(dir.path(), before);
        let cf = db.cf_handle(FAMILY).unwrap();
        for i in 0u32..50_000 {
            db.put_cf(cf, i.to_be_bytes(), b"an item").unwrap();
        }
        db.flush_cf(cf).unwrap();
        assert!(table_readers(&db) > 32 << 10, "{}", table_readers(&db));
        drop(db);

        let mut now = Options::default();
        family(&mut now, |tables| tables.set_bloom_filter(10.0, false));
        let db = open(dir.path(), now);
        assert!(!table_properties(&db).contains("index partitions"));
        let marker = rocksdb::DEFAULT_COLUMN_FAMILY_NAME;
        partition_old_tables(&db, &[FAMILY], marker).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let default = db.cf_handle(marker).unwrap();
        while db.get_cf(default, PARTITIONED).unwrap().is_none() {
            assert!(Instant::now() < deadline, "the rewrite did not end");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(table_properties(&db).contains("# index partitions="));
        let readers = table_readers(&db);
        assert!(
            readers < 8 << 10,
            "table readers still hold {readers} bytes"
        );
        let cf = db.cf_handle(FAMILY).unwrap();
        assert_eq!(
            db.get_cf(cf, 49_999u32.to_be_bytes()).unwrap().as_deref(),
            Some(&b"an item"[..])
        );
        // Marked: the next start rewrites nothing.
        partition_old_tables(&db, &[FAMILY], marker).unwrap();
    }

    #[test]
    fn a_database_without_table_files_is_marked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut now = Options::default();
        family(&mut now, |_| {});
        let db = open(dir.path(), now);
        let marker = rocksdb::DEFAULT_COLUMN_FAMILY_NAME;
        partition_old_tables(&db, &[FAMILY], marker).unwrap();
        let default = db.cf_handle(marker).unwrap();
        assert!(db.get_cf(default, PARTITIONED).unwrap().is_some());
    }
}
