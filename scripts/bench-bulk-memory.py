#!/usr/bin/env python3
"""Peak resident memory of dstore embedded while it takes large `_bulk` bodies.

For each binary and each load, starts the binary on a fresh data directory, makes a project of
one version, sends N identical `_bulk` bodies of about MB megabytes at once, samples the process's
RSS every 20 ms, and prints the statuses, the time they took, the RSS before, at the peak and 3 s
after. Two shapes of body: `small` (about 90,000 items of 600 bytes in 58 MB, near the 100,000
operations a body may hold) and `large` (items of 900 kB, under the 1 MiB an item may be).

    scripts/bench-bulk-memory.py                 # the built dstore
    scripts/bench-bulk-memory.py OLD NEW OLD NEW # several binaries, one after the other

BENCH_BULK_MB (58), BENCH_BULK_LOADS ("small:1 large:1 small:2 small:3 large:3", shape:bodies at
once). The in-flight budget (server.max_inflight_bytes, 512 MiB) refuses with 503 what it cannot
hold; the figures say how far the process's real peak is from what the budget counted.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 2991


def request(method, path, body=b""):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=600) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def body_of(shape, megabytes):
    filler = "x" * (520 if shape == "small" else 900_000)
    lines, total = [], 0
    while total < megabytes * 1_000_000:
        item_id = str(uuid.uuid4())
        action = json.dumps({"put": {"blueprint": "doc", "id": item_id}})
        item = json.dumps({"project_version": 1, "title": "t", "n": 1, "body": filler})
        lines += [action, item]
        total += len(action) + len(item) + 2
    return ("\n".join(lines) + "\n").encode()


def run(binary, shape, bodies, body):
    data = tempfile.mkdtemp(prefix="dstore-bench-bulk-memory.")
    env = dict(os.environ, DSTORE_DATA_DIR=data, DSTORE_HOST="127.0.0.1", DSTORE_PORT=str(PORT),
               DSTORE_MIN_FREE_DISK_MB="200", RUST_LOG="warn")
    server = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if request("GET", "/_health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        blueprint = {"postgresql": {"table": "docs"}, "elasticsearch": {"type": "doc"},
                     "columns": {"title": {"type": "string"}, "n": {"type": "integer"},
                                 "body": {"type": "string"}}}
        assert request("PUT", "/mem/doc/_blueprint", json.dumps(blueprint).encode())[0] == 200
        assert request("POST", "/mem/_version")[0] == 200
        before = rss_mib(server.pid)
        peak, done = [before], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        statuses = []

        def send():
            status, answer = request("POST", "/mem/_bulk", body)
            statuses.append(status if status != 200 or b'"errors":false' in answer[:64] else -200)

        started = time.time()
        senders = [threading.Thread(target=send) for _ in range(bodies)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        took = time.time() - started
        time.sleep(3)
        done.set()
        sampler.join()
        return sorted(statuses), took, before, peak[0], rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


def main():
    binaries = sys.argv[1:]
    if not binaries:
        subprocess.run(["cargo", "build", "--release", "--bin", "dstore", "--quiet"], cwd=ROOT,
                       check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        binaries = [os.path.join(target, "release", "dstore")]
    megabytes = int(os.environ.get("BENCH_BULK_MB", "58"))
    loads = [load.split(":") for load in
             os.environ.get("BENCH_BULK_LOADS", "small:1 large:1 small:2 small:3 large:3").split()]
    bodies = {shape: body_of(shape, megabytes) for shape in {shape for shape, _ in loads}}
    print(f"load {os.getloadavg()[0]:.1f}; bodies of {megabytes} MB; statuses -200: an item failed")
    print("| binary | shape | bodies at once | statuses | s | RSS before | peak | 3 s after (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for binary in binaries:
        for shape, count in loads:
            statuses, took, before, peak, after = run(binary, shape, int(count), bodies[shape])
            print(f"| {binary} | {shape} | {count} | {statuses} | {took:.1f} | {before} | {peak} "
                  f"| {after} |", flush=True)


if __name__ == "__main__":
    main()
