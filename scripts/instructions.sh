#!/usr/bin/env bash
# Instructions dstore executes per write, by kind of thread, counted by callgrind: a figure that does
# not move with what else the machine is doing, unlike rates and CPU time (scripts/bench.sh). Use it
# to compare two builds of the write path; the rates themselves come from scripts/bench.sh.
#
#   scripts/instructions.sh [dstore binary] [seconds]
#   INSTRUCTIONS_LOAD=bulk INSTRUCTIONS_POSTGRES=postgres://postgres@127.0.0.1:5432/dstore_cg \
#       scripts/instructions.sh
#
# dstore runs under valgrind; wrk PUTs new items at 8 connections for 20 s (scripts/bench/put.lua),
# or, with INSTRUCTIONS_LOAD=bulk, posts `_bulk` requests of 1000 new items at 2 connections
# (scripts/bench/bulk.lua); counting starts when the load does. With INSTRUCTIONS_POSTGRES (a
# database the script creates and drops) dstore also projects into PostgreSQL, and counting stops
# once PostgreSQL has every row, so the projector's work is counted in full. Under valgrind dstore
# is ~50x slower, so its batches are smaller than at full speed and the journal writer's share is
# larger. KEEP=<dir> keeps callgrind's files there, one per thread, for callgrind_annotate.
# INSTRUCTIONS_POSTGRES is a URL without parameters; its last segment names the database.
# valgrind counts each byte of a `rep stos`/`rep movs` as an instruction: the HTTP decoder's 3 KiB
# memset of its header table counts ~19k per request that take ~100 cycles. Compare builds, not
# kinds of work.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
for tool in valgrind wrk; do
    command -v "$tool" >/dev/null || apt_install "$tool"
done
BIN=${1:-}
if [ -z "$BIN" ]; then
    cargo build --release --bin dstore --quiet
    BIN="$CARGO_TARGET_DIR/release/dstore"
fi
SECONDS_EACH=${2:-20}
LOAD=${INSTRUCTIONS_LOAD:-put}
PG_URL=${INSTRUCTIONS_POSTGRES:-}
case "$LOAD" in
    put) WRK=(-t 1 -c 8 -s scripts/bench/put.lua); ARGS=(bench 1); UNIT=PUT ;;
    bulk) WRK=(-t 1 -c 2 -s scripts/bench/bulk.lua); ARGS=(bench 1000); UNIT="_bulk item" ;;
    *) echo "INSTRUCTIONS_LOAD is put or bulk, not $LOAD" >&2; exit 2 ;;
esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dstore-instructions.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/ || true; fi
    rm -rf "$WORK"
    [ -n "$PG_URL" ] && psql -q "${PG_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS ${PG_URL##*/} WITH (FORCE)" 2>/dev/null || true
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ -n "$PG_URL" ]; then
    psql -q "${PG_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS ${PG_URL##*/} WITH (FORCE)"
    psql -q "${PG_URL%/*}/postgres" -c "CREATE DATABASE ${PG_URL##*/}"
fi
DSTORE_POSTGRESQL_URL=$PG_URL DSTORE_HOST=127.0.0.1 DSTORE_PORT=$PORT DSTORE_DATA_DIR="$WORK/data" DSTORE_LOG=warn \
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$WORK/out" "$BIN" serve \
    >"$WORK/log" 2>&1 &
PID=$!
for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/_health" 2>/dev/null && break
    sleep 0.2
done
curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$PORT/bench/article/_blueprint" -d '{
    "postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
    "columns": {"title": {"type": "string"}, "views": {"type": "integer"},
                "date_created": {"type": "datetime", "validation": {"required": true}}}}'
curl -fsS -o /dev/null -X POST "http://127.0.0.1:$PORT/bench/_version"
callgrind_control -z "$PID" >/dev/null
OUT=$(wrk "${WRK[@]}" -d "${SECONDS_EACH}s" "http://127.0.0.1:$PORT" -- "${ARGS[@]}" 2>&1)
if [ -n "$PG_URL" ]; then
    caught_up=
    for _ in $(seq 1 1200); do
        curl -fsS "http://127.0.0.1:$PORT/_health/ready" |
            python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(p["progress"]["pending"]==0 for p in d["projectors"].values()) else 1)' &&
            caught_up=1 && break
        sleep 0.5
    done
    [ -n "$caught_up" ] || echo "warning: PostgreSQL had not every row after 10 minutes; counted anyway" >&2
fi
callgrind_control -d "$PID" >/dev/null
REQUESTS=$(echo "$OUT" | awk '/requests in/ {print $1}')
if [ -z "$REQUESTS" ] || [ "$REQUESTS" -eq 0 ]; then
    echo "wrk completed no request:" >&2
    echo "$OUT" >&2
    exit 1
fi
[ "$LOAD" = bulk ] && REQUESTS=$((REQUESTS * 1000))
kill -INT "$PID"
wait "$PID" || true
PID=

# The last dump holds the counts since the load started, one file per thread; each thread's kind is
# told by the function it runs.
kind() {
    if grep -q 'fn=.*journal::writer::Writer::run' "$1"; then echo "journal writer"
    elif grep -q 'fn=.*actix_server::service::StreamService' "$1"; then echo "HTTP workers"
    elif grep -q 'fn=.*blocking::pool::Inner::run' "$1"; then echo "blocking threads (_bulk preparation)"
    elif grep -q 'fn=.*projector::postgres' "$1"; then echo "runtime (projection, audit log)"
    elif grep -q 'fn=.*auth::audit::write' "$1"; then echo "runtime (projection, audit log)"
    elif grep -q 'fn=.*journal::Journal::pending_from' "$1"; then echo "projection's task reads"
    elif grep -q 'fn=.*rocksdb::' "$1"; then echo "RocksDB flushes and compactions"
    else echo "other"
    fi
}
last=$(ls "$WORK"/out.* | sed -E 's/.*out\.([0-9]+)-.*/\1/' | sort -n | tail -1)
echo "== $REQUESTS ${UNIT}s in ${SECONDS_EACH} s under callgrind${PG_URL:+, projected into PostgreSQL}; $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
for file in "$WORK"/out."$last"-*; do
    echo "$(kind "$file")|$(awk '/^summary:/ {print $2}' "$file")"
done | awk -F'|' -v n="$REQUESTS" -v u="$UNIT" '
    { sum[$1] += $2; total += $2 }
    END {
        for (k in sum) if (sum[k] / n >= 50) printf "%-36s %8.1f k instructions per %s\n", k, sum[k] / n / 1000, u | "sort"
        close("sort")
        printf "%-36s %8.1f k instructions per %s\n", "all", total / n / 1000, u
    }'
