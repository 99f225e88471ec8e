#!/usr/bin/env bash
# Builds and runs dstore with the embedded default (journal, catalog and RocksDB keyspaces under
# ./data, serving on :2020). Arguments are passed to dstore, e.g. `scripts/run.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_build_deps
exec cargo run --release --bin dstore -- "$@"
