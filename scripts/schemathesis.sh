#!/usr/bin/env bash
# A bounded schemathesis run against an already built dstore binary: checks that what the server
# answers matches its own OpenAPI document (/_openapi.json), and that generated requests never get a
# 5xx. Starts the binary with a fresh temporary data directory on a free local port (embedded RocksDB
# store only), seeds project "myblog" with blueprint "article" (frozen as version 1) and one item so
# the document's examples hit real resources, then runs schemathesis in two passes: first every
# operation except the destructive ones, then only those (DELETE /_project, DELETE /{project}/_project,
# POST /{project}/_version/{version}/_retire), so the seed survives the first pass. Stops the server
# at the end and exits non-zero when schemathesis reports a failure.
#
#   scripts/schemathesis.sh [path/to/dstore] [extra schemathesis run options...]
#
# The binary defaults to ${CARGO_TARGET_DIR:-$HOME/.cache/dstore-target}/release/dstore; nothing is
# built here. SCHEMATHESIS_MAX_EXAMPLES (default 50) bounds the generated cases per operation and
# phase; SCHEMATHESIS_SEED makes a run reproducible. schemathesis (SCHEMATHESIS_VERSION, default
# 4.32.5) is installed with pip into ~/.cache/dstore-schemathesis-venv when missing; its 3.x command
# line is supported too.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/dstore-target}/release/dstore}
shift || true
EXTRA=("$@")
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-50}
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
DESTRUCTIVE='^(deleteAllProjects|deleteProject|retireVersion)$'

say() { echo "== schemathesis: $*" >&2; }

if [ ! -x "$BIN" ]; then
    say "no dstore binary at $BIN (build it first, or pass its path as the first argument)"
    exit 2
fi
for tool in python3 curl; do
    command -v "$tool" >/dev/null || { say "$tool is required"; exit 2; }
done

# --- schemathesis ------------------------------------------------------------------------------------
# A pinned version in a virtual environment of its own, so every run checks the same way.
VERSION=${SCHEMATHESIS_VERSION:-4.32.5}
VENV="$HOME/.cache/dstore-schemathesis-venv"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        say "installing python3-venv"
        if [ "$(id -u)" -eq 0 ]; then apt-get install -y -qq python3-venv >/dev/null; else sudo apt-get install -y -qq python3-venv >/dev/null; fi
    fi
    say "installing schemathesis $VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi
ST="$VENV/bin/schemathesis"
ST_VERSION=$("$ST" --version | grep -oE '[0-9]+(\.[0-9]+)+' | head -n1)
ST_MAJOR=${ST_VERSION%%.*}
if [ "$ST_MAJOR" -lt 3 ] || { [ "$ST_MAJOR" -eq 3 ] && [ "$(echo "$ST_VERSION" | cut -d. -f2)" -lt 30 ]; }; then
    say "schemathesis $ST_VERSION is too old (3.30 or newer is needed for --exclude-operation-id-regex)"
    exit 2
fi

# --- the server --------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dstore-schemathesis.XXXXXX")
SERVER_PID=
# shellcheck disable=SC2329 # called by the EXIT trap
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
mkdir -p "$WORK/data"
# Only the embedded store: settings for other stores, a configuration file or another data directory
# in the environment must not leak into a test server.
env -u DSTORE_CONFIG -u DSTORE_CATALOG_DIR -u PROJECT_FILE_PATH -u LEVEL_PATH -u PORT -u RUST_LOG \
    -u POSTGRESQL_HOST -u POSTGRESQL_PORT -u POSTGRESQL_USER -u POSTGRESQL_PASSWORD \
    -u POSTGRESQL_DATABASE -u DATABASE_URL -u DSTORE_POSTGRESQL_URL \
    -u DSTORE_ELASTICSEARCH_URL -u ELASTICSEARCH_HOST -u DSTORE_ELASTICSEARCH_INDEX_PREFIX \
    -u DSTORE_QUEUE_URL -u QUEUE_CONNECTIONSTRING \
    DSTORE_HOST=127.0.0.1 DSTORE_PORT="$PORT" DSTORE_DATA_DIR="$WORK/data" DSTORE_LOG=warn \
    "$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

server_log() {
    say "last lines of the server log:"
    tail -n 40 "$WORK/server.log" >&2 || true
}

for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null "$BASE/_health" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        say "dstore exited before it answered GET /_health"
        server_log
        exit 1
    fi
    sleep 0.2
done
curl -fsS -o /dev/null "$BASE/_health" || { say "dstore did not answer GET /_health within 60 s"; server_log; exit 1; }

# --- the seed ----------------------------------------------------------------------------------------
# request STATUS METHOD PATH [BODY]: fails unless the answer has STATUS.
request() {
    local want=$1 method=$2 path=$3 got
    local args=(-sS -o "$WORK/response" -w '%{http_code}' -X "$method" -H 'content-type: application/json')
    if [ $# -ge 4 ]; then
        args+=(--data-binary "$4")
    fi
    got=$(curl "${args[@]}" "$BASE$path") || got=000
    if [ "$got" != "$want" ]; then
        say "seed: $method $path answered $got, expected $want: $(head -c 2000 "$WORK/response" 2>/dev/null)"
        server_log
        exit 1
    fi
}
request 200 PUT /myblog/article/_blueprint '{"postgresql":{"table":"articles"},"elasticsearch":{"type":"article"},"columns":{"title":{"type":"string"},"date_created":{"type":"datetime","validation":{"required":true}},"location":{"type":"point","nullable":true}}}'
request 200 POST /myblog/_version
request 200 PUT '/myblog/article/0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01?wait=true' '{"project_version":1,"title":"Hello","date_created":"2020-01-02 03:04:05","location":{"type":"Point","coordinates":[8.54,47.37]}}'

# --- schemathesis ------------------------------------------------------------------------------------
# _bulk takes application/x-ndjson, which schemathesis cannot serialize by itself: send generated
# strings as they are (anything else as one JSON line).
mkdir -p "$WORK/hooks"
cat >"$WORK/hooks/dstore_schemathesis_hooks.py" <<'EOF'
import json

import schemathesis


def _ndjson(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return (json.dumps(value) + "\n").encode("utf-8")


# The change feed streams (feed=sse, ndjson) and long-polls until `timeout` passes: keep generated
# ones to a second, so every request ends.
if hasattr(schemathesis, "hook"):

    @schemathesis.hook
    def map_query(context, query):
        if query and "feed" in query:
            query["timeout"] = 1
        return query


if hasattr(schemathesis.serializer, "alias"):  # 4.x: a function (context, value) -> bytes

    @schemathesis.serializer("application/x-ndjson")
    def ndjson(context, value):
        return _ndjson(value)

else:  # 3.x: a class per transport

    @schemathesis.serializer("application/x-ndjson")
    class NdjsonSerializer:
        def as_requests(self, context, value):
            return {"data": _ndjson(value)}

        def as_werkzeug(self, context, value):
            return {"data": _ndjson(value)}
EOF

if [ "$ST_MAJOR" -ge 4 ]; then
    COMMON=(run "$BASE/_openapi.json" --url "$BASE" --checks "$CHECKS"
        --max-examples "$MAX_EXAMPLES" --request-timeout 120)
    [ -n "${SCHEMATHESIS_SEED:-}" ] && COMMON+=(--seed "$SCHEMATHESIS_SEED")
else
    COMMON=(run "$BASE/_openapi.json" --base-url "$BASE" --checks "$CHECKS"
        --hypothesis-max-examples "$MAX_EXAMPLES" --request-timeout 120000
        --data-generation-method all)
    [ -n "${SCHEMATHESIS_SEED:-}" ] && COMMON+=(--hypothesis-seed "$SCHEMATHESIS_SEED")
fi

# Runs from the work directory, so schemathesis' files (.hypothesis, a schemathesis.toml) stay out of
# the repository.
run_schemathesis() {
    (cd "$WORK" && PYTHONPATH="$WORK/hooks${PYTHONPATH:+:$PYTHONPATH}" \
        SCHEMATHESIS_HOOKS=dstore_schemathesis_hooks "$ST" "${COMMON[@]}" "$@" ${EXTRA[@]+"${EXTRA[@]}"})
}

say "schemathesis $ST_VERSION against $BIN on $BASE, at most $MAX_EXAMPLES examples per operation"
say "pass 1: every operation but $DESTRUCTIVE"
say "$ST ${COMMON[*]} --exclude-operation-id-regex '$DESTRUCTIVE' ${EXTRA[*]-}"
PASS1=0
run_schemathesis --exclude-operation-id-regex "$DESTRUCTIVE" || PASS1=$?
say "pass 2: the destructive operations $DESTRUCTIVE"
say "$ST ${COMMON[*]} --include-operation-id-regex '$DESTRUCTIVE' ${EXTRA[*]-}"
PASS2=0
run_schemathesis --include-operation-id-regex "$DESTRUCTIVE" || PASS2=$?

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "dstore is no longer running"
    server_log
    if [ "$PASS2" -eq 0 ]; then
        PASS2=1
    fi
fi
if [ "$PASS1" -eq 0 ] && [ "$PASS2" -eq 0 ]; then
    echo "schemathesis $ST_VERSION: PASSED (max $MAX_EXAMPLES examples per operation; checks $CHECKS)"
    exit 0
fi
server_log
echo "schemathesis $ST_VERSION: FAILED (pass 1 exit $PASS1, destructive pass exit $PASS2; max $MAX_EXAMPLES examples per operation; checks $CHECKS)"
exit 1
