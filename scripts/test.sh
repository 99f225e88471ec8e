#!/usr/bin/env bash
# The whole test suite: installs and starts what the tests need when it is missing (the build tools,
# PostgreSQL with PostGIS, RabbitMQ, an Elasticsearch API), then runs the
# format check, clippy with warnings denied, every test (the dstore crate and the pure dstore-model
# crate), a bounded schemathesis run against the OpenAPI document (scripts/schemathesis.sh), and the
# package test (scripts/test-package.sh: builds the .deb, installs, upgrades, removes and purges it).
# `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_build_deps
ensure_postgres
ensure_rabbitmq

# The shared target directory keeps dependencies (RocksDB takes long to build) between checkouts;
# dstore's own artifacts are rebuilt, since cargo identifies them the same way in every checkout.
cargo clean --release --package dstore --package dstore-model --quiet

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== cargo test"
ensure_elasticsearch
cargo test --release --workspace -- --test-threads=4
echo "== schemathesis against /_openapi.json"
SCHEMATHESIS_MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-30}" bash scripts/schemathesis.sh "$CARGO_TARGET_DIR/release/dstore"
echo "== package test"
bash scripts/test-package.sh
