# Shared by scripts/run.sh and scripts/test.sh: installs what building and testing dstore needs when
# it is missing, on Debian or Ubuntu. Sourced, not run.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "dstore: need root (or sudo) to run: $*" >&2; return 1
    fi
}

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    echo "${missing[@]:-}"
}

# A C/C++ toolchain and libclang for the RocksDB bindings, and a Rust toolchain.
ensure_build_deps() {
    local missing
    missing=$(missing_packages clang libclang-dev g++ make pkg-config ca-certificates curl)
    if [ -n "$missing" ]; then
        echo "dstore: installing build dependencies: $missing" >&2
        # shellcheck disable=SC2086
        apt_install $missing
    fi
    if ! command -v cargo >/dev/null; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "dstore: installing the Rust toolchain with rustup" >&2
            curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
    fi
}

# Build products are kept between runs (and between clones) so RocksDB is compiled once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstore-target}"
