#!/usr/bin/env bash
# Fuzzes what clients send: the blueprint parser, the item checker and the `_bulk` reader (targets
# in fuzz/fuzz_targets/, built against the dstore-model crate only, so no RocksDB build). Not part of
# the test command: run it by hand, e.g. after touching model/. Each target runs for
# ${FUZZ_SECONDS:-60} seconds; a crash stops the run and leaves its input under
# fuzz/artifacts/<target>/. Turn each crash into an ordinary regression test (model/tests/) before
# fixing it.
#
#   scripts/fuzz.sh              # every target
#   scripts/fuzz.sh item bulk    # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_build_deps
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(blueprint item bulk)
# The fuzz build has its own target directory: sanitizer flags change every artifact.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/dstore-fuzz-target}"
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${FUZZ_SECONDS:-60}s"
    mkdir -p "fuzz/corpus/$target"
    # The seeds (committed) start each run from valid inputs; the corpus grows beside them.
    cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="${FUZZ_SECONDS:-60}" -max_len=65536 -timeout=10 -rss_limit_mb=2048
done
