#!/usr/bin/env bash
# One run that compares dstore's write path with what bounds it, all driven by the same external load
# generator (wrk, with scripts/bench/*.lua) at the same concurrency, and prints rates and ratios:
#
#   ceiling     an actix-web handler that parses the item and answers (dstore-baseline ceiling)
#   embedded    dstore with its default embedded storage and RocksDB keyspaces
#   buffered    the same with `durability = "buffered"` (no fsync before the answer): what the
#               fsync costs, beside what the CPU per item costs
#   +postgres   the same with the PostgreSQL projector, until PostgreSQL has every row
#   floor       one durable PostgreSQL upsert per request (dstore-baseline floor)
#   cluster N   N dstore nodes on one PostgreSQL storage (behind haproxy when N > 1), N = 1, 2, 3
#   COPY        PostgreSQL COPY of the same rows into a table of their shape: `_bulk`'s ceiling there
#
# Machines that are shared move 2-3x between days: only the ratios within one run mean anything.
# The machine's state (cores, load, memory) is printed with the figures, with the share of the
# machine left idle during each load (a load that leaves it idle waits on something other than the
# CPU: fsyncs, locks), the server process's CPU time per item (the floor's excludes PostgreSQL's)
# and, with PostgreSQL on this machine, its processes' CPU per row; the PostgreSQL rows also say
# which share of the rows went in by COPY rather than by the upsert.
#
#   scripts/bench.sh                      # BENCH_SECONDS=10 BENCH_CONNECTIONS=64 BENCH_CLUSTER="1 2 3"
#   BENCH_ROUNDS=3 scripts/bench.sh       # the single-node runs three times over, alternating, then the
#                                         # spread of each ratio
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_build_deps
ensure_postgres
for tool in wrk haproxy; do
    command -v "$tool" >/dev/null || apt_install "$tool"
done
cargo build --release --bins --quiet
BIN="$CARGO_TARGET_DIR/release"
SECONDS_EACH=${BENCH_SECONDS:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
BULK_CONNECTIONS=${BENCH_BULK_CONNECTIONS:-8}
BULK_SIZE=${BENCH_BULK_SIZE:-1000}
CLUSTER=${BENCH_CLUSTER-1 2 3}
ROUNDS=${BENCH_ROUNDS:-1}
SERVER=${DSTORE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dstore-bench.XXXXXX")
# Unique beyond this machine's process ids: runs from several machines may share one server.
RUN=bench_$$_$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
PIDS=()

psql_admin() { psql "$SERVER/postgres" -qAtc "$1" >/dev/null; }
# Every database this run made (`database` runs in a subshell: they are found by their names).
drop_databases() {
    local db
    for db in $(psql "$SERVER/postgres" -qAtc "SELECT datname FROM pg_database WHERE starts_with(datname, '${RUN}_')"); do
        psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    done
}
cleanup() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    drop_databases
    rm -rf "$WORK"
}
trap cleanup EXIT

database() { # a fresh database, dropped at the end
    local name="${RUN}_$1"
    psql_admin "DROP DATABASE IF EXISTS $name WITH (FORCE)"
    psql_admin "CREATE DATABASE $name"
    echo "$SERVER/$name"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { # port
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "http://127.0.0.1:$1/_health" 2>/dev/null && return 0
        curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$1/bench/article/00000000-0000-4000-8000-000000000000" \
            -d '{"project_version":1,"date_created":"2026-01-01"}' 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench: nothing answers on port $1" >&2
    return 1
}

start() { # port log command... ; env from the caller
    local port=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
    SERVER_PID=$!
    wait_http "$port"
}

stop() { # pid: killed, and waited for, so its last flushes are not the next load's
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Before each durable load: what earlier loads left dirty (PostgreSQL's shared buffers after a
# million rows, dstore's flushed tables) is written out first, so a checkpoint does not land in the
# middle of the next load and stall its fsyncs (it did, as 125-149 ms p99 of embedded PUT in the
# second round, on 2026-12-03).
quiet() {
    psql_admin "CHECKPOINT" || true
    sync
}

blueprint() { # port: the benchmark blueprint, frozen
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$1/bench/article/_blueprint" -d '{
        "postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
        "columns": {"title": {"type": "string"}, "views": {"type": "integer"},
                    "date_created": {"type": "datetime", "validation": {"required": true}}}}'
    curl -fsS -o /dev/null -X POST "http://127.0.0.1:$1/bench/_version"
}

# CPU time counters of the machine, "all idle" in clock ticks (idle counts iowait too).
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat; }
# CPU time of this machine's PostgreSQL processes, in clock ticks (0 when the server is elsewhere).
postgres_ticks() {
    local total=0 pid
    for pid in $(pgrep -x postgres || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
# µs of PostgreSQL's CPU per row since `postgres_ticks` gave $1, for $2 rows.
postgres_us_per_row() { awk -v t="$(( $(postgres_ticks) - $1 ))" -v hz="$(getconf CLK_TCK)" -v r="$2" 'BEGIN {printf "%.1f", (r > 0 ? t / hz * 1e6 / r : 0)}'; }

# CPU time of one process (all its threads), in clock ticks.
process_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# wrk's answer as "rate p99_ms errors": requests/s (items/s for _bulk), the 99th percentile latency.
# The share of the machine left idle during the load goes to $WORK/idle; the CPU time the server
# (process `SERVER_PID`) spent per item, in µs, to $WORK/cpu: with the idle share it tells a load
# bound by the CPU from one that waits (a server that needs twice the ceiling's CPU per item can
# reach at most about half its rate).
drive() { # port script connections [size]
    local port=$1 script=$2 connections=$3 size=${4:-1}
    local out before after ticks
    before=$(machine_ticks)
    ticks=$(process_ticks "$SERVER_PID")
    out=$(wrk -t 2 -c "$connections" -d "${SECONDS_EACH}s" --latency -s "scripts/bench/$script" \
        "http://127.0.0.1:$port" -- bench "$size" 2>&1)
    after=$(machine_ticks)
    awk -v b="$before" -v a="$after" 'BEGIN {split(b, x, " "); split(a, y, " "); printf "%.0f", 100 * (y[2] - x[2]) / (y[1] - x[1])}' >"$WORK/idle"
    ticks=$(( $(process_ticks "$SERVER_PID") - ticks ))
    local rate p99 errors
    rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}')
    errors=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v r="$rate" -v s="$size" -v d="$SECONDS_EACH" \
        'BEGIN {n = r * s * d; printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}' >"$WORK/cpu"
    echo "$(awk -v r="$rate" -v s="$size" 'BEGIN {printf "%.0f", r * s}') ${p99:-0} ${errors:-0}"
}

# Rows the PostgreSQL projector of the dstore on `port` wrote by COPY since it started.
rows_copied() {
    curl -fsS "http://127.0.0.1:$1/_metrics" | awk '$1 == "dstore_postgresql_rows_copied_total" {print $2; found=1} END {if (!found) print 0}'
}
# "n % by COPY": the share of `rows` that went in by COPY, from the counter at $2 to now.
copied_share() { # port copied_before rows
    awk -v a="$(rows_copied "$1")" -v b="$2" -v r="$3" 'BEGIN {printf "%.0f %% by COPY", (r > 0 ? 100 * (a - b) / r : 0)}'
}

rss_mb() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

# Seconds until every projector of the dstore on `port` has applied everything.
catch_up() {
    local port=$1 started
    started=$(date +%s.%N)
    for _ in $(seq 1 600); do
        if curl -fsS "http://127.0.0.1:$port/_health/ready" |
            python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(p["progress"]["pending"]==0 for p in d["projectors"].values()) else 1)'; then
            awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}'
            return
        fi
        sleep 0.1
    done
    echo "never"
}

ROWS=()
row() { ROWS+=("$*"); }

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(free -g | awk '/Mem/ {print $7}') GiB available, $(date -u +%FT%TZ)"
echo "== each run: wrk, 2 threads, $SECONDS_EACH s; PUT at $CONNECTIONS connections; _bulk $BULK_CONNECTIONS x $BULK_SIZE"

# One round: the ceiling, dstore embedded, dstore + PostgreSQL, COPY and the floor, one after the
# other; each round adds its rows and its ratios.
single_round() {
    quiet
    port=$(free_port)
    start "$port" "$WORK/ceiling.log" "$BIN/dstore-baseline" ceiling --port "$port"
    read -r ceiling ceiling_p99 _ <<<"$(drive "$port" put.lua "$CONNECTIONS")"
    row "ceiling (parse and answer)|PUT|$ceiling|$ceiling_p99|1.00|$(cat "$WORK/cpu")|$(rss_mb "$LAST_PID")|$(cat "$WORK/idle")"
    stop "$LAST_PID"

    quiet
    port=$(free_port)
    DSTORE_HOST=127.0.0.1 DSTORE_PORT=$port DSTORE_DATA_DIR="$WORK/embedded$round" DSTORE_LOG=warn \
        start "$port" "$WORK/embedded.log" "$BIN/dstore" serve
    blueprint "$port"
    pid=$LAST_PID
    read -r embedded embedded_p99 errors <<<"$(drive "$port" put.lua "$CONNECTIONS")"
    row "dstore embedded|PUT|$embedded|$embedded_p99|$(awk -v a="$embedded" -v b="$ceiling" 'BEGIN {printf "%.2f", a / b}')|$(cat "$WORK/cpu")|$(rss_mb "$pid")|$(cat "$WORK/idle")"
    read -r bulk _ _ <<<"$(drive "$port" bulk.lua "$BULK_CONNECTIONS" "$BULK_SIZE")"
    row "dstore embedded|_bulk|$bulk||$(awk -v a="$bulk" -v b="$embedded" 'BEGIN {printf "%.1f x PUT", a / b}')|$(cat "$WORK/cpu")|$(rss_mb "$pid")|$(cat "$WORK/idle")"
    stop "$pid"

    # The same without waiting for the disk (`durability = "buffered"`: no fsync before the
    # answer): how much of the gap to the ceiling is the fsync, and how much the CPU per item.
    quiet
    port=$(free_port)
    DSTORE_HOST=127.0.0.1 DSTORE_PORT=$port DSTORE_DATA_DIR="$WORK/buffered$round" DSTORE_LOG=warn DSTORE_DURABILITY=buffered \
        start "$port" "$WORK/buffered.log" "$BIN/dstore" serve
    blueprint "$port"
    read -r buffered buffered_p99 _ <<<"$(drive "$port" put.lua "$CONNECTIONS")"
    row "dstore embedded, durability buffered|PUT|$buffered|$buffered_p99|$(awk -v a="$buffered" -v b="$ceiling" 'BEGIN {printf "%.2f", a / b}')|$(cat "$WORK/cpu")|$(rss_mb "$LAST_PID")|$(cat "$WORK/idle")"
    stop "$LAST_PID"

    url=$(database projector)
    quiet
    port=$(free_port)
    DSTORE_HOST=127.0.0.1 DSTORE_PORT=$port DSTORE_DATA_DIR="$WORK/pg$round" DSTORE_LOG=warn DATABASE_URL="$url" \
        start "$port" "$WORK/pg.log" "$BIN/dstore" serve
    blueprint "$port"
    pid=$LAST_PID
    pg_ticks=$(postgres_ticks)
    read -r pg pg_p99 _ <<<"$(drive "$port" put.lua "$CONNECTIONS")"
    lag=$(catch_up "$port")
    rows=$(psql "$url" -qAtc "SELECT count(*) FROM bench_v1.articles")
    row "dstore + PostgreSQL projector|PUT|$pg|$pg_p99|$(awk -v a="$pg" -v b="$embedded" 'BEGIN {printf "%.2f", a / b}') of embedded; caught up ${lag}s after; PostgreSQL $(postgres_us_per_row "$pg_ticks" "$rows") µs/row, $(copied_share "$port" 0 "$rows")|$(cat "$WORK/cpu")|$(rss_mb "$pid")|$(cat "$WORK/idle")"
    rows_before=$rows
    copied_before=$(rows_copied "$port")
    started=$(date +%s.%N)
    pg_ticks=$(postgres_ticks)
    read -r ingest _ _ <<<"$(drive "$port" bulk.lua "$BULK_CONNECTIONS" "$BULK_SIZE")"
    lag=$(catch_up "$port")
    elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {print e - s}')
    rows=$(( $(psql "$url" -qAtc "SELECT count(*) FROM bench_v1.articles") - rows_before ))
    bulk_pg=$(awk -v r="$rows" -v t="$elapsed" 'BEGIN {printf "%.0f", r / t}')
    row "dstore + PostgreSQL projector|_bulk, end to end|$bulk_pg||rows in PostgreSQL / s (taken at $ingest/s, caught up ${lag}s after); PostgreSQL $(postgres_us_per_row "$pg_ticks" "$rows") µs/row, $(copied_share "$port" "$copied_before" "$rows")|$(cat "$WORK/cpu") during ingest|$(rss_mb "$pid")|$(cat "$WORK/idle") during ingest"
    stop "$pid"

    # COPY of the same rows into a table of the same shape: the ceiling of `_bulk` into PostgreSQL.
    # The table is dstore's own (its definition dumped from the projector's database: the same
    # columns, types, constraints and indexes, `_revision` and `links` included), and as many rows as
    # `_bulk` wrote, so both fill a table and an index of the same size (a COPY of a tenth as many
    # ran at 0.8-1.6x the rate in alternating runs).
    projector_url=$url
    url=$(database copy)
    quiet
    psql "$url" -qc "CREATE SCHEMA bench_v1"
    pg_dump --schema-only --no-owner -t bench_v1.articles "$projector_url" | psql "$url" -q -v ON_ERROR_STOP=1 >/dev/null
    python3 -c '
import uuid, sys
w = sys.stdout.write
for i in range(int(sys.argv[1])):
    w("%s,%d,1,{},A benchmark article,42,2026-11-22 10:00:00+00\n" % (uuid.uuid4(), i + 1))
' "$rows" >"$WORK/rows.csv"
    started=$(date +%s.%N)
    psql "$url" -qc "\\copy bench_v1.articles (id, _revision, project_version, links, title, views, date_created) FROM '$WORK/rows.csv' WITH (FORMAT csv)"
    copy=$(awk -v s="$started" -v e="$(date +%s.%N)" -v r="$rows" 'BEGIN {printf "%.0f", r / (e - s)}')
    row "PostgreSQL COPY, same rows|rows|$copy||bulk end to end = $(awk -v a="$bulk_pg" -v b="$copy" 'BEGIN {printf "%.2f", a / b}') of COPY|||"

    url=$(database floor)
    quiet
    port=$(free_port)
    start "$port" "$WORK/floor.log" "$BIN/dstore-baseline" floor --port "$port" --url "$url"
    read -r floor floor_p99 _ <<<"$(drive "$port" put.lua "$CONNECTIONS")"
    row "floor (one upsert per request)|PUT|$floor|$floor_p99|$(awk -v a="$floor" -v b="$ceiling" 'BEGIN {printf "%.2f", a / b}')|$(cat "$WORK/cpu")|$(rss_mb "$LAST_PID")|$(cat "$WORK/idle")"
    stop "$LAST_PID"
    # The round's databases are dropped and its journals removed: PostgreSQL's autovacuum of the
    # million rows just copied and upserted would otherwise run during the next round's loads.
    drop_databases
    rm -rf "$WORK/embedded$round" "$WORK/buffered$round" "$WORK/pg$round"
    RATIOS+=("$(awk -v e="$embedded" -v c="$ceiling" -v ep="$embedded_p99" -v cp="$ceiling_p99" -v p="$pg" -v bp="$bulk_pg" -v k="$copy" -v b="$bulk" \
        'BEGIN {printf "%.2f %.1f %.2f %.2f %.1f", e / c, ep / cp, p / e, bp / k, b / e}')")
}

RATIOS=()
for round in $(seq 1 "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && row "round $round of $ROUNDS|||||||"
    single_round
done

for n in $CLUSTER; do
    storage=$(database "cluster$n")
    projector=$(database "cluster${n}_store")
    ports=()
    for i in $(seq 1 "$n"); do
        port=$(free_port)
        ports+=("$port")
        DSTORE_HOST=127.0.0.1 DSTORE_PORT=$port DSTORE_DATA_DIR="$WORK/c$n-$i" DSTORE_LOG=warn \
            DSTORE_STORAGE_BACKEND=postgresql DSTORE_STORAGE_URL="$storage" DSTORE_NODE="node$i" \
            DATABASE_URL="$projector" start "$port" "$WORK/c$n-$i.log" "$BIN/dstore" serve
    done
    front=${ports[0]}
    if [ "$n" -gt 1 ]; then
        front=$(free_port)
        {
            printf 'defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n'
            printf 'frontend f\n  bind 127.0.0.1:%s\n  default_backend b\nbackend b\n  balance roundrobin\n' "$front"
            for i in "${!ports[@]}"; do printf '  server n%s 127.0.0.1:%s\n' "$i" "${ports[$i]}"; done
        } >"$WORK/haproxy-$n.cfg"
        haproxy -f "$WORK/haproxy-$n.cfg" >"$WORK/haproxy-$n.log" 2>&1 &
        PIDS+=($!)
        haproxy_pid=$!
        sleep 0.5
    fi
    blueprint "$front"
    read -r rate p99 _ <<<"$(drive "$front" put.lua "$CONNECTIONS")"
    row "cluster, $n node(s)$([ "$n" -gt 1 ] && echo ' + haproxy')|PUT|$rate|$p99|$(awk -v a="$rate" -v b="$embedded" 'BEGIN {printf "%.2f", a / b}') of embedded|||$(cat "$WORK/idle")"
    read -r bulk_c _ _ <<<"$(drive "$front" bulk.lua "$BULK_CONNECTIONS" "$BULK_SIZE")"
    row "cluster, $n node(s)|_bulk|$bulk_c||$(awk -v a="$bulk_c" -v b="$bulk" 'BEGIN {printf "%.2f", a / b}') of embedded|||$(cat "$WORK/idle")"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
done

echo
echo "| run | workload | items/s | p99 ms | compared | server CPU µs/item | peak RSS MiB | machine idle % |"
echo "|---|---|---|---|---|---|---|---|"
for r in "${ROWS[@]}"; do echo "| ${r//|/ | } |"; done
if [ "$ROUNDS" -gt 1 ]; then
    # The spread of each ratio the targets name, over the rounds.
    printf '%s\n' "${RATIOS[@]}" | awk '
        { for (i = 1; i <= 5; i++) { if (NR == 1 || $i < lo[i]) lo[i] = $i; if (NR == 1 || $i > hi[i]) hi[i] = $i } }
        END {
            printf "\n== over %d rounds: embedded PUT %s-%s of the ceiling, its p99 %s-%s x the ceiling'"'"'s; PUT with PostgreSQL %s-%s of embedded; _bulk into PostgreSQL %s-%s of COPY; embedded _bulk %s-%s x PUT\n",
                NR, lo[1], hi[1], lo[2], hi[2], lo[3], hi[3], lo[4], hi[4], lo[5], hi[5]
        }'
fi
