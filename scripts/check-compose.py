#!/usr/bin/env python3
"""Checks, without a Docker engine, that docker-compose.yml and the Dockerfile wire what they should.

docker-compose.yml must parse and run dstore (built from the Dockerfile) with PostgreSQL+PostGIS,
Elasticsearch 8 (single node, security off) and RabbitMQ, each with a healthcheck that dstore waits for,
and hand dstore every store through its original environment variable names. The Dockerfile must build
in a Rust stage with clang and run on debian:bookworm-slim as a non-root user with the data volume.
Prints what it checked; exits 1 with every problem found.
"""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
problems = []


def check(condition, what):
    if condition:
        print(f"   ok: {what}")
    else:
        problems.append(what)
        print(f"   FAILED: {what}", file=sys.stderr)


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def host_of(url_or_host):
    """`http://es:9200` -> `es`, `es:9200` -> `es`, `amqp://u:p@mq:5672/%2f` -> `mq`."""
    rest = url_or_host.split("://", 1)[-1]
    rest = rest.rsplit("@", 1)[-1]
    return re.split(r"[:/]", rest, maxsplit=1)[0]


def check_compose():
    try:
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    except (OSError, yaml.YAMLError) as error:
        check(False, f"docker-compose.yml parses ({error})")
        return
    check(isinstance(compose, dict), "docker-compose.yml parses as a mapping")
    services = compose.get("services") or {}
    for name in ("dstore", "postgres", "elasticsearch", "rabbitmq"):
        check(name in services, f"service {name} is defined")
    if problems:
        return
    dstore = services["dstore"]
    build = dstore.get("build")
    check(build in (".", {"context": "."}) or (isinstance(build, dict) and build.get("context") == "."),
          "dstore is built from the Dockerfile at the repository root")
    check(any(str(p).endswith("2020:2020") for p in dstore.get("ports", [])), "dstore publishes port 2020")
    env_dstore = environment(dstore)
    open_port = any(str(p) == "2020:2020" for p in dstore.get("ports", []))
    check(not (open_port and env_dstore.get("DSTORE_AUTH_DISABLED") == "true"),
          "dstore without authentication is published on 127.0.0.1 only")
    check(any(str(v).endswith(":/var/lib/dstore") for v in dstore.get("volumes", [])),
          "dstore keeps its data in a volume at /var/lib/dstore")
    check(bool(dstore.get("healthcheck", {}).get("test")), "dstore has a healthcheck")

    depends = dstore.get("depends_on") or {}
    for name in ("postgres", "elasticsearch", "rabbitmq"):
        condition = depends.get(name, {}).get("condition") if isinstance(depends, dict) else None
        check(condition == "service_healthy", f"dstore waits for {name} to be healthy")
        check(bool(services[name].get("healthcheck", {}).get("test")), f"{name} has a healthcheck")

    env = environment(dstore)
    check(env.get("PORT") == "2020", "PORT=2020")
    check(env.get("LEVEL_PATH") == "/var/lib/dstore", "LEVEL_PATH is the data volume")
    check(host_of(env.get("POSTGRESQL_HOST", "")) == "postgres", "POSTGRESQL_HOST names the postgres service")
    check(host_of(env.get("ELASTICSEARCH_HOST", "")) == "elasticsearch",
          "ELASTICSEARCH_HOST names the elasticsearch service")
    check(host_of(env.get("QUEUE_CONNECTIONSTRING", "")) == "rabbitmq",
          "QUEUE_CONNECTIONSTRING names the rabbitmq service")

    worker = services.get("postgres-worker") or {}
    command = [str(c) for c in worker.get("command") or []]
    check(command[:3] == ["worker", "--projector", "postgresql"],
          "postgres-worker runs `dstore worker --projector postgresql` (the image's entrypoint is dstore)")
    check("--server" in command and host_of(command[command.index("--server") + 1]) == "dstore",
          "postgres-worker reads the catalog from the dstore service")
    worker_env = environment(worker)
    check(worker_env.get("QUEUE_CONNECTIONSTRING") == env.get("QUEUE_CONNECTIONSTRING"),
          "postgres-worker uses dstore's broker")
    check(host_of(worker_env.get("POSTGRESQL_HOST", "")) == "postgres", "postgres-worker writes to postgres")
    check(env.get("DSTORE_QUEUE_EXTERNAL") == "postgresql",
          "dstore leaves postgresql to the worker (DSTORE_QUEUE_EXTERNAL)")

    postgres = services["postgres"]
    pg_env = environment(postgres)
    check(str(postgres.get("image", "")).startswith("postgis/postgis:"), "postgres runs the postgis/postgis image")
    check(env.get("POSTGRESQL_USER") == pg_env.get("POSTGRES_USER")
          and env.get("POSTGRESQL_PASSWORD") == pg_env.get("POSTGRES_PASSWORD")
          and env.get("POSTGRESQL_DATABASE", "dstore") == pg_env.get("POSTGRES_DB", pg_env.get("POSTGRES_USER")),
          "dstore's PostgreSQL user, password and database match the postgres service")

    es = services["elasticsearch"]
    es_env = environment(es)
    check(re.search(r"elasticsearch:8\.", str(es.get("image", ""))) is not None, "elasticsearch runs version 8")
    check(es_env.get("discovery.type") == "single-node", "elasticsearch is a single node")
    check(es_env.get("xpack.security.enabled") == "false", "elasticsearch security is disabled for local use")

    mq = services["rabbitmq"]
    mq_env = environment(mq)
    check(str(mq.get("image", "")).startswith("rabbitmq:"), "rabbitmq runs the rabbitmq image")
    credentials = f"{mq_env.get('RABBITMQ_DEFAULT_USER', 'guest')}:{mq_env.get('RABBITMQ_DEFAULT_PASS', 'guest')}@"
    check(credentials in env.get("QUEUE_CONNECTIONSTRING", ""), "QUEUE_CONNECTIONSTRING carries rabbitmq's credentials")

    declared = set((compose.get("volumes") or {}).keys())
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                check(source in declared, f"volume {source} of {name} is declared")


def check_dockerfile():
    try:
        text = (ROOT / "Dockerfile").read_text()
    except OSError as error:
        check(False, f"Dockerfile is readable ({error})")
        return
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    check(len(stages) >= 2 and stages[0][0].startswith("rust:"), "Dockerfile builds in a rust stage")
    check("clang" in text and "libclang-dev" in text, "the build stage installs clang and libclang-dev")
    check(stages and stages[-1][0] == "debian:bookworm-slim", "the image runs on debian:bookworm-slim")
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    check(bool(users) and users[-1] not in ("root", "0"), "the image runs as a non-root user")
    check(re.search(r"^VOLUME\s+\[?\"?/var/lib/dstore", text, re.MULTILINE) is not None,
          "the image declares the /var/lib/dstore volume")
    check(re.search(r"^EXPOSE\s+2020\b", text, re.MULTILINE) is not None, "the image exposes 2020")
    ignored = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    check("target" in ignored and ".git" in ignored, ".dockerignore leaves out target/ and .git")


def check_cluster_profile():
    """The `cluster` profile: nodes on the PostgreSQL storage behind haproxy, which lists them all."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose.get("services", {})
    nodes = [name for name, s in services.items()
             if "cluster" in (s.get("profiles") or []) and name != "haproxy"]
    check(len(nodes) >= 2, "the cluster profile runs at least two nodes")
    for name in nodes:
        env = environment(services[name])
        check(env.get("DSTORE_STORAGE_BACKEND") == "postgresql",
              f"cluster node {name} keeps its catalog and journal in PostgreSQL")
        check(host_of(env.get("DSTORE_STORAGE_URL", "")) == "postgres",
              f"cluster node {name} reaches the postgres service")
        check("RABBITMQ" not in " ".join(env) and "QUEUE_CONNECTIONSTRING" not in env,
              f"cluster node {name} reads its tasks from PostgreSQL, not a broker")
    names = {s["environment"].get("DSTORE_NODE") for n, s in services.items() if n in nodes}
    check(len(names) == len(nodes), "every cluster node has its own DSTORE_NODE")
    haproxy = services.get("haproxy", {})
    check("cluster" in (haproxy.get("profiles") or []), "haproxy runs in the cluster profile")
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    for name in nodes:
        check(re.search(rf"^\s*server\s+{name}\s+{name}:2020", config, re.MULTILINE) is not None,
              f"haproxy balances over {name}")
    check("httpchk GET /_health/ready" in config, "haproxy checks each node's readiness")


check_compose()
check_cluster_profile()
check_dockerfile()
if problems:
    print(f"docker files: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
