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
    missing=$(missing_packages clang libclang-dev g++ make pkg-config ca-certificates curl openssl)
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

# PostgreSQL with PostGIS for the PostgreSQL projector's tests: installs a server when there is none,
# the PostGIS package matching its major version when missing, starts the cluster when it does not
# accept connections, and waits until it does. Tests reach it as DSTORE_TEST_POSTGRES_URL (default
# postgres://postgres@127.0.0.1:5432; the Debian cluster trusts local TCP connections only after
# pg_hba.conf says so, which this function arranges for 127.0.0.1 when it installed the server).
ensure_postgres() {
    local url="${DSTORE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
    export DSTORE_TEST_POSTGRES_URL="$url"
    if [ "$url" != "postgres://postgres@127.0.0.1:5432" ]; then
        echo "dstore: using the PostgreSQL server at DSTORE_TEST_POSTGRES_URL" >&2
        return 0
    fi
    local fresh=""
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "dstore: installing PostgreSQL" >&2
        apt_install postgresql
        fresh=1
    fi
    local major
    major=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if [ -n "$(missing_packages "postgresql-$major-postgis-3")" ]; then
        echo "dstore: installing PostGIS for PostgreSQL $major" >&2
        apt_install "postgresql-$major-postgis-3"
    fi
    if [ ! -d "/etc/postgresql/$major/main" ]; then
        as_root pg_createcluster "$major" main >/dev/null
        fresh=1
    fi
    local hba="/etc/postgresql/$major/main/pg_hba.conf"
    if [ -n "$fresh" ] && ! as_root grep -q "^host all postgres 127.0.0.1/32 trust" "$hba"; then
        # A throwaway test server: trust the postgres user over loopback, ahead of the defaults.
        as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$major" main reload >/dev/null 2>&1 || true
    fi
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        echo "dstore: starting PostgreSQL $major" >&2
        as_root pg_ctlcluster --skip-systemctl-redirect "$major" main start
    fi
    wait_until 30 "PostgreSQL $major did not start; see /var/log/postgresql/postgresql-$major-main.log" \
        pg_isready -q -h 127.0.0.1 -p 5432
}

# Runs the command after $1 and $2 every half second until it succeeds, for at most $1 seconds;
# then prints $2 and fails.
wait_until() {
    local seconds="$1" failure="$2" tries=0
    shift 2
    until "$@"; do
        tries=$((tries + 1))
        if [ "$tries" -gt $((seconds * 2)) ]; then
            echo "dstore: $failure" >&2
            return 1
        fi
        sleep 0.5
    done
}

# True when something accepts TCP connections on host $1, port $2.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# RabbitMQ for the broker tests: installs the Debian package when there is no server, starts it when
# nothing listens on 5672, and waits until it accepts connections. Tests reach it as
# DSTORE_TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2f, the package's own user,
# which may only log in from localhost). The restart test runs rabbitmqctl, so it needs this broker.
ensure_rabbitmq() {
    local url="${DSTORE_TEST_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
    export DSTORE_TEST_RABBITMQ_URL="$url"
    if [ "$url" != "amqp://guest:guest@127.0.0.1:5672/%2f" ]; then
        echo "dstore: using the RabbitMQ broker at DSTORE_TEST_RABBITMQ_URL" >&2
        return 0
    fi
    if port_open 127.0.0.1 5672; then
        return 0
    fi
    if [ -n "$(missing_packages rabbitmq-server)" ]; then
        echo "dstore: installing RabbitMQ" >&2
        apt_install rabbitmq-server
    fi
    if ! port_open 127.0.0.1 5672; then
        echo "dstore: starting RabbitMQ" >&2
        if [ -d /run/systemd/system ]; then
            as_root systemctl start rabbitmq-server
        else
            as_root service rabbitmq-server start >/dev/null
        fi
    fi
    wait_until 60 "RabbitMQ did not start; see /var/log/rabbitmq/" port_open 127.0.0.1 5672
}

# An Elasticsearch API for the tests. With ELASTICSEARCH_URL set, the tests use that cluster;
# otherwise osmem-server (an in-memory engine from PyPI) is installed into a virtualenv when missing
# and started on a fixed local port for as long as the calling script runs. Exports
# DSTORE_TEST_ELASTICSEARCH_URL either way.
ensure_elasticsearch() {
    if [ -n "${ELASTICSEARCH_URL:-}" ]; then
        export DSTORE_TEST_ELASTICSEARCH_URL="$ELASTICSEARCH_URL"
        echo "dstore: testing against the Elasticsearch cluster at $ELASTICSEARCH_URL" >&2
        return
    fi
    local port="${DSTORE_TEST_ELASTICSEARCH_PORT:-39200}"
    local url="http://127.0.0.1:$port"
    export DSTORE_TEST_ELASTICSEARCH_URL="$url"
    if curl -fsS -m 2 "$url" >/dev/null 2>&1; then
        echo "dstore: an Elasticsearch API already answers at $url" >&2
        return
    fi
    local venv="$HOME/.cache/dstore-osmem-venv"
    if ! "$venv/bin/python" -c 'import osmem_server' 2>/dev/null; then
        if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
            echo "dstore: installing python3 and venv for osmem-server" >&2
            apt_install python3 python3-venv
        fi
        echo "dstore: installing osmem-server from PyPI into $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check osmem-server
    fi
    local binary log
    binary=$("$venv/bin/python" -c 'import osmem_server; print(osmem_server.resolve_binary())')
    log="${TMPDIR:-/tmp}/dstore-osmem-$port.log"
    echo "dstore: starting osmem-server on $url (log: $log)" >&2
    # -no-stdin-watch: CI has no stdin; -parent-pid: it stops with the script that started it.
    nohup "$binary" -addr "127.0.0.1:$port" -no-stdin-watch -parent-pid "$$" >"$log" 2>&1 </dev/null &
    local waited=0
    until curl -fsS -m 2 "$url" >/dev/null 2>&1; do
        if [ "$waited" -ge 30 ]; then
            echo "dstore: osmem-server did not answer on $url within 30s; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}
