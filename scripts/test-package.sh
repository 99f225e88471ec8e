#!/usr/bin/env bash
# Tests the Debian package as an administrator would use it, on this machine (as root):
# builds it with cargo-deb, installs it with dpkg, starts the installed binary as the dstore user with
# the installed configuration, puts a blueprint, freezes, writes an item (with the installed CLI),
# upgrades, removes the package and checks the data survived, then purges and checks it is gone. Also
# checks that the Dockerfile and docker-compose.yml wire what they should. `scripts/test.sh` runs it
# after the cargo tests. Without systemd (containers, CI) the binary is started directly, as the
# unit would start it. DSTORE_DEB=<file> tests a package built before instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    # dpkg -i and starting dstore as another user need root; CI runs as root and must not skip.
    if [ "${CI:-}" = "true" ]; then
        echo "== package: FAILED: the package test must run as root (it installs a .deb)" >&2
        exit 1
    fi
    echo "== package: SKIPPED: run as root to test the .deb (it installs and purges dstore)" >&2
    exit 0
fi
. scripts/deps.sh
ensure_build_deps

# One package test per machine at a time: they share dpkg, /usr/bin/dstore and /var/lib/dstore.
exec 9>/tmp/dstore-package-test.lock
if ! flock -w 900 9; then
    echo "== package: FAILED: another package test held /tmp/dstore-package-test.lock for 15 minutes" >&2
    exit 1
fi

passed=0
step() { echo "== package: $*"; }
ok() {
    echo "   ok: $*"
    passed=$((passed + 1))
}
fail() {
    echo "   FAILED: $*" >&2
    echo "package: $passed passed, 1 failed"
    exit 1
}

work=$(mktemp -d)
server_pid=""
installed_by_us=""
cleanup() {
    local status=$?
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ] && [ -s "$work/dstore.log" ]; then
        echo "--- last lines of the server log:" >&2
        tail -n 30 "$work/dstore.log" >&2
    fi
    if [ -n "$installed_by_us" ]; then
        as_root dpkg --purge dstore >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# --- the container files
step "Dockerfile and docker-compose.yml"
if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install --quiet PyYAML 2>/dev/null || apt_install python3-yaml
fi
python3 scripts/check-compose.py || fail "the Dockerfile or docker-compose.yml (see above)"
ok "Dockerfile and docker-compose.yml"

# --- a machine we may install on
if dpkg-query -W -f='${Status}' dstore 2>/dev/null | grep -q "ok installed\|config-files" ||
    [ -e /var/lib/dstore ]; then
    if [ "${CI:-}" = "true" ] || [ "${DSTORE_PACKAGE_TEST_REPLACE:-}" = "1" ]; then
        echo "   replacing the dstore package and /var/lib/dstore already on this machine"
        as_root dpkg --purge dstore >/dev/null 2>&1 || true
        as_root rm -rf /var/lib/dstore
    else
        fail "dstore is already installed here (or /var/lib/dstore exists); this test installs and purges it. Run with DSTORE_PACKAGE_TEST_REPLACE=1 to let it replace them"
    fi
fi

# --- build
step "build the .deb with cargo-deb (or take DSTORE_DEB)"
if [ -z "${DSTORE_DEB:-}" ] && ! cargo deb --version >/dev/null 2>&1; then
    echo "   installing cargo-deb"
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
deb="$work/dstore.deb"
if [ -n "${DSTORE_DEB:-}" ]; then
    cp "$DSTORE_DEB" "$deb" # a package built before, e.g. a release artifact
else
    cargo deb --quiet --output "$deb" >/dev/null
fi
[ -s "$deb" ] || fail "cargo deb made no package"
ok "$(dpkg-deb -f "$deb" Package Version Architecture | tr '\n' ' ')"

step "package contents"
contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/dstore ./usr/bin/dstore-bench ./etc/dstore/dstore.toml ./etc/default/dstore \
    ./lib/systemd/system/dstore.service; do
    grep -q " $path\$" <<<"$contents" || fail "$path is not in the package"
done
if grep -q " ./var/lib/dstore" <<<"$contents"; then
    fail "the package ships /var/lib/dstore; dpkg would delete the data on removal"
fi
ok "binaries, unit and configuration are in; /var/lib/dstore is not"
dpkg-deb -e "$deb" "$work/control"
for conffile in /etc/dstore/dstore.toml /etc/default/dstore; do
    grep -qx "$conffile" "$work/control/conffiles" || fail "$conffile is not a conffile"
done
ok "conffiles: $(tr '\n' ' ' <"$work/control/conffiles")"
for script in postinst prerm postrm; do
    [ -x "$work/control/$script" ] || fail "the package has no executable $script"
    sh -n "$work/control/$script" || fail "$script has a syntax error"
done
ok "maintainer scripts postinst, prerm, postrm"

# --- install
dpkg_quietly() {
    # No terminal: a maintainer script or a conffile question that prompts fails instead of hanging.
    as_root env DEBIAN_FRONTEND=noninteractive dpkg "$@" </dev/null >"$work/dpkg.log" 2>&1 ||
        {
            cat "$work/dpkg.log" >&2
            fail "dpkg $*"
        }
}

step "install with dpkg -i"
installed_by_us=1
dpkg_quietly -i "$deb"
[ -x /usr/bin/dstore ] || fail "/usr/bin/dstore is missing"
getent passwd dstore >/dev/null || fail "no dstore user"
[ "$(stat -c %U:%G /var/lib/dstore)" = "dstore:dstore" ] || fail "/var/lib/dstore is not owned by dstore"
[ "$(stat -c %G:%a /etc/dstore/dstore.toml)" = "dstore:640" ] ||
    fail "/etc/dstore/dstore.toml is $(stat -c %U:%G:%a /etc/dstore/dstore.toml), not root:dstore 640"
ok "dstore user, /var/lib/dstore owned by dstore, configuration readable by the dstore group only"
[ "$(stat -c %U:%G:%a /etc/dstore/master.key)" = "root:dstore:640" ] ||
    fail "/etc/dstore/master.key is $(stat -c %U:%G:%a /etc/dstore/master.key 2>/dev/null), not root:dstore 640"
grep -q "master key was made in /etc/dstore/master.key" "$work/dpkg.log" ||
    fail "the installation does not say where the master key is"
master_key=$(as_root cat /etc/dstore/master.key)
[ "${#master_key}" -ge 32 ] || fail "the master key is too short"
ok "a random master key in /etc/dstore/master.key, root:dstore 640, and the installation says so"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /lib/systemd/system/dstore.service 2>"$work/verify.log" ||
        {
            cat "$work/verify.log" >&2
            fail "systemd-analyze verify dstore.service"
        }
    ok "systemd-analyze verify dstore.service"
fi
/usr/bin/dstore --version >/dev/null || fail "/usr/bin/dstore --version"
# With the service's environment (dstore.service names the master key file): serving on every
# address needs it, and check-config makes every check serve makes.
runuser -u dstore -- env DSTORE_MASTER_KEY_FILE=/etc/dstore/master.key \
    /usr/bin/dstore --config /etc/dstore/dstore.toml check-config >/dev/null ||
    fail "dstore check-config with the installed configuration, as the dstore user"
ok "dstore check-config with /etc/dstore/dstore.toml as the dstore user"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server="http://127.0.0.1:$port"
export DSTORE_SERVER="$server"

start_server() {
    # As systemd would: a clean environment plus /etc/default/dstore, the dstore user, the installed
    # configuration. Each program execs the next, so $! is dstore itself and SIGTERM reaches it.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 NO_COLOR=1 TEST_PORT="$port" \
        setpriv --reuid=dstore --regid=dstore --init-groups \
        /bin/sh -c 'cd / && set -a && . /etc/default/dstore && set +a &&
            PORT=$TEST_PORT DSTORE_HOST=127.0.0.1 DSTORE_MASTER_KEY_FILE=/etc/dstore/master.key \
            exec /usr/bin/dstore --config /etc/dstore/dstore.toml serve' \
        >>"$work/dstore.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 200); do
        if curl -fsS "$server/_health" >/dev/null 2>&1; then
            ok "the installed dstore answers on $server/_health (pid $server_pid)"
            return
        fi
        kill -0 "$server_pid" 2>/dev/null || fail "dstore exited at start-up"
        sleep 0.1
    done
    fail "dstore did not answer on $server/_health within 20 s"
}

stop_server() {
    kill -TERM "$server_pid"
    local status=0
    wait "$server_pid" || status=$?
    server_pid=""
    [ "$status" -eq 0 ] || fail "dstore exited with $status on SIGTERM"
    ok "dstore stopped cleanly on SIGTERM"
}

step "start the installed binary as the dstore user"
start_server

step "an API key made with the master key"
status=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$server/packagetest/article/_blueprint" -d '{}')
[ "$status" = "401" ] || fail "a request without a key answered $status, not 401"
DSTORE_API_KEY="$master_key" /usr/bin/dstore keys create package-test --actions '*' --projects '*' \
    >"$work/key.out" || fail "dstore keys create with the master key"
DSTORE_API_KEY=$(grep '^dstore_' "$work/key.out") || fail "dstore keys create printed no key"
export DSTORE_API_KEY
ok "401 without a key; an API key made with the master key through the installed CLI"

step "blueprint, version and item through the installed CLI"
cat >"$work/article.json" <<'JSON'
{"postgresql": {"table": "articles"}, "elasticsearch": {"type": "article"},
 "columns": {"title": {"type": "string"},
             "date_created": {"type": "datetime", "validation": {"required": true}}}}
JSON
id=0b7a1dd1-56a2-4b7e-8dc5-3f1c2a8c9e01
cat >"$work/item.json" <<JSON
{"id": "$id", "project_version": 1, "title": "Hello", "date_created": "2020-01-02 03:04:05"}
JSON
/usr/bin/dstore blueprint put packagetest article "$work/article.json" | sed 's/^/   /'
/usr/bin/dstore freeze packagetest | tee "$work/freeze.out" | sed 's/^/   /'
grep -q "frozen as version 1" "$work/freeze.out" || fail "freeze did not answer version 1"
/usr/bin/dstore item put packagetest article "$work/item.json" --wait | sed 's/^/   /'
/usr/bin/dstore versions packagetest | sed 's/^/   /'
curl -fsS -H "Authorization: Bearer $DSTORE_API_KEY" "$server/packagetest/article/$id" | grep -q '"title":"Hello"' ||
    fail "the item cannot be read back"
ok "the item reads back over HTTP"
stop_server
[ -d /var/lib/dstore/journal ] || fail "no journal under /var/lib/dstore"
[ -z "$(find /var/lib/dstore ! -user dstore -print -quit)" ] || fail "files under /var/lib/dstore not owned by dstore"
ok "the journal is under /var/lib/dstore, owned by dstore"

step "upgrade (the same files as a newer version) keeps the data and a changed conffile"
echo "# changed by the administrator" | as_root tee -a /etc/dstore/dstore.toml >/dev/null
mkdir "$work/next"
dpkg-deb -R "$deb" "$work/next"
version=$(dpkg-deb -f "$deb" Version)
sed -i "s/^Version: .*/Version: ${version}+next/" "$work/next/DEBIAN/control"
dpkg-deb -Zgzip -z1 --build --root-owner-group "$work/next" "$work/dstore-next.deb" >/dev/null
dpkg_quietly -i "$work/dstore-next.deb"
[ "$(dpkg-query -W -f='${Version}' dstore)" = "${version}+next" ] || fail "the upgrade did not install"
grep -q "changed by the administrator" /etc/dstore/dstore.toml || fail "the upgrade replaced the changed conffile"
ok "upgraded to ${version}+next without a question; the changed /etc/dstore/dstore.toml is kept"
start_server
[ "$(as_root cat /etc/dstore/master.key)" = "$master_key" ] || fail "the upgrade changed the master key"
curl -fsS -H "Authorization: Bearer $DSTORE_API_KEY" "$server/packagetest/article/$id" | grep -q '"title":"Hello"' ||
    fail "the item (or the API key) is gone after the upgrade"
ok "the item is still there after the upgrade"
stop_server

step "dpkg -r keeps the data"
dpkg_quietly -r dstore
[ ! -e /usr/bin/dstore ] || fail "/usr/bin/dstore is still there after removal"
[ -d /var/lib/dstore/journal ] && [ -d /var/lib/dstore/catalog ] || fail "/var/lib/dstore lost its data on removal"
[ -e /etc/dstore/dstore.toml ] || fail "removal deleted the conffile (only purge may)"
ok "binary gone; /var/lib/dstore ($(du -sh /var/lib/dstore | cut -f1)) and /etc/dstore/dstore.toml kept"

step "dpkg --purge deletes the data"
dpkg_quietly --purge dstore
installed_by_us=""
[ ! -e /var/lib/dstore ] || fail "/var/lib/dstore is still there after purge"
[ ! -e /etc/dstore ] || fail "/etc/dstore (or its master key) is still there after purge"
[ ! -e /etc/default/dstore ] || fail "/etc/default/dstore is still there after purge"
ok "/var/lib/dstore, /etc/dstore and /etc/default/dstore are gone"

echo "package: $passed passed, 0 failed"
