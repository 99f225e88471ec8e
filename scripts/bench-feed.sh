#!/usr/bin/env bash
# What followers reading the change feed as fast as they can cost the writers: PUT rate and p99
# latency of dstore embedded alone, then while BENCH_FEED_PAGERS clients read `_changes` pages of
# `limit=10000` (each up to feed::PAGE_BYTES of items) from since=0 in a loop, and the ratio.
# The writers and the followers share the HTTP workers: a page read, transformed and encoded on a
# worker stalls every request on it.
# Then the other side: BENCH_FEED_LIVE NDJSON followers (50; 0: skip) follow from `since=now`
# while wrk PUTs at 64 connections; one more writes what it gets to a file: how many of the
# writes it had when the load ended, and how long after it it got the last (a marker item).
#
#   scripts/bench-feed.sh                   # the built dstore
#   scripts/bench-feed.sh OLD NEW           # several dstore binaries, one after the other, same load
#
# BENCH_SECONDS (10), BENCH_CONNECTIONS (16), BENCH_FEED_PAGERS (16), BENCH_FEED_ITEMS (20000 items
# of 2 KiB), BENCH_FEED_LIVE (50). Only the ratios within one run mean anything on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
command -v wrk >/dev/null || apt_install wrk
if [ $# -eq 0 ]; then
    cargo build --release --bin dstore --quiet
    set -- "$CARGO_TARGET_DIR/release/dstore"
fi
SECONDS_EACH=${BENCH_SECONDS:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
PAGERS=${BENCH_FEED_PAGERS:-16}
ITEMS=${BENCH_FEED_ITEMS:-20000}
LIVE=${BENCH_FEED_LIVE:-50}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dstore-bench-feed.XXXXXX")
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"

# wrk's PUT load as "rate p99_ms requests" (at $1 connections, $CONNECTIONS by default).
put_load() {
    wrk -t 2 -c "${1:-$CONNECTIONS}" -d "${SECONDS_EACH}s" --latency -s scripts/bench/put.lua "$url" -- bench 2>&1 |
        awk '/Requests\/sec/ {rate=$2}
             $1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v}
             / requests in / {requests=$1}
             END {printf "%.0f %.2f %d", rate, p99, requests}'
}

# Followers paging from since=0 until $WORK/stop exists; prints "pages MiB" when they end.
pagers() {
    python3 - "$url" "$PAGERS" "$WORK/stop" <<'EOF'
import http.client, os, sys, threading, urllib.parse
url, n, stop = urllib.parse.urlparse(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
totals = [0, 0]
lock = threading.Lock()
def follow():
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    while not os.path.exists(stop):
        conn.request("GET", "/bench/_changes?since=0&limit=10000")
        body = conn.getresponse().read()
        with lock:
            totals[0] += 1
            totals[1] += len(body)
threads = [threading.Thread(target=follow) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(totals[0], totals[1] >> 20)
EOF
}

# Starts dstore $1 on a fresh data directory with the bench project's blueprint frozen.
start() {
    rm -rf "$WORK/data" "$WORK/stop"
    DSTORE_HOST=127.0.0.1 DSTORE_PORT=$port DSTORE_DATA_DIR="$WORK/data" DSTORE_LOG=warn "$1" serve >"$WORK/log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do curl -fsS -o /dev/null "$url/_health" 2>/dev/null && break; sleep 0.1; done
    curl -fsS -o /dev/null -X PUT "$url/bench/article/_blueprint" -d '{
        "postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
        "columns": {"title": {"type": "string"}, "views": {"type": "integer"},
                    "date_created": {"type": "datetime", "validation": {"required": true}}}}'
    curl -fsS -o /dev/null -X POST "$url/bench/_version"
}

stop() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
echo "== PUT: wrk, 2 threads, $CONNECTIONS connections, $SECONDS_EACH s; $PAGERS followers of $ITEMS items of 2 KiB"
printf '%-40s %10s %9s %10s %9s %7s %10s\n' binary "PUT/s" "p99 ms" "+feed/s" "p99 ms" ratio "pages MiB"
for bin in "$@"; do
    start "$bin"
    python3 - "$ITEMS" >"$WORK/bulk" <<'EOF'
import json, sys, uuid
text = "x" * 2048
for i in range(int(sys.argv[1])):
    print(json.dumps({"put": {"blueprint": "article", "id": str(uuid.UUID(int=i + 1))}}))
    print(json.dumps({"project_version": 1, "title": text, "views": i, "date_created": "2026-12-05"}))
EOF
    split -l 2000 "$WORK/bulk" "$WORK/part."
    for part in "$WORK"/part.*; do curl -fsS -o /dev/null -X POST "$url/bench/_bulk" --data-binary "@$part"; done
    rm -f "$WORK"/part.* "$WORK/bulk"
    read -r alone alone_p99 _ <<<"$(put_load)"
    pagers >"$WORK/pages" &
    paging=$!
    sleep 1
    read -r loaded loaded_p99 _ <<<"$(put_load)"
    touch "$WORK/stop"
    wait "$paging"
    stop
    printf '%-40s %10s %9s %10s %9s %7s %10s\n' "$(basename "$(dirname "$bin")")/$(basename "$bin")" \
        "$alone" "$alone_p99" "$loaded" "$loaded_p99" \
        "$(awk -v a="$alone" -v b="$loaded" 'BEGIN {printf "%.2f", (a > 0 ? b / a : 0)}')" "$(cat "$WORK/pages")"
done

[ "$LIVE" -gt 0 ] || exit 0
marker=00000000-0000-4000-8000-00000000beef
echo "== live: $LIVE NDJSON followers from since=now, and one counted; PUT by wrk, 2 threads, 64 connections, $SECONDS_EACH s"
printf '%-40s %10s %9s %12s %12s\n' binary "PUT/s" "p99 ms" "had at end" "last after s"
for bin in "$@"; do
    start "$bin"
    followers=()
    for _ in $(seq 1 "$LIVE"); do
        curl -sN -o /dev/null "$url/bench/_changes?feed=ndjson&since=now" &
        followers+=($!)
    done
    curl -sN -o "$WORK/followed" "$url/bench/_changes?feed=ndjson&since=now" &
    followers+=($!)
    sleep 1
    read -r rate p99 requests <<<"$(put_load 64)"
    had=$(grep -c '"op"' "$WORK/followed" || true)
    ended=$(date +%s.%N)
    curl -fsS -o /dev/null -X PUT "$url/bench/article/$marker" \
        -d '{"project_version": 1, "title": "marker", "date_created": "2026-12-05"}'
    after=never
    for _ in $(seq 1 1200); do
        if grep -q "$marker" "$WORK/followed"; then
            after=$(awk -v a="$ended" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
            break
        fi
        sleep 0.1
    done
    kill "${followers[@]}" 2>/dev/null || true
    stop
    printf '%-40s %10s %9s %12s %12s\n' "$(basename "$(dirname "$bin")")/$(basename "$bin")" \
        "$rate" "$p99" "$had/$requests" "$after"
done
