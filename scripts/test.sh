#!/usr/bin/env bash
# The whole test suite: installs and starts what the tests need when it is missing (the build tools,
# PostgreSQL with PostGIS, RabbitMQ, an Elasticsearch API), then runs the
# format check, clippy with warnings denied, every test, and the package test
# (scripts/test-package.sh: builds the .deb, installs, upgrades, removes and purges it here).
# `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_build_deps
ensure_postgres
ensure_rabbitmq

# The shared target directory keeps dependencies (RocksDB takes long to build) between checkouts;
# dstore's own artifacts are rebuilt, since cargo identifies them the same way in every checkout.
cargo clean --release --package dstore --quiet

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
ensure_elasticsearch
cargo test --release -- --test-threads=4
echo "== package test"
bash scripts/test-package.sh
