# syntax=docker/dockerfile:1
# dstore in a container: `docker build -t dstore .`, or `docker compose up` for the full local stack
# (docker-compose.yml). The image runs as the unprivileged dstore user with its data in the
# /var/lib/dstore volume; configure it with the environment variables of /etc/default/dstore.

# --- build: RocksDB's C++ needs clang and libclang for its bindings
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Everything but what .dockerignore leaves out (assets compiled into the binary live beside src/).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && install -D -m 0755 -s target/release/dstore target/release/dstore-bench -t /out/

# --- run
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 999 dstore \
    && useradd --system --uid 999 --gid dstore --home-dir /var/lib/dstore --no-create-home \
        --shell /usr/sbin/nologin dstore \
    && install -d -m 0750 -o dstore -g dstore /var/lib/dstore
COPY --from=builder /out/dstore /out/dstore-bench /usr/bin/
COPY deploy/dstore.toml /etc/dstore/dstore.toml
ENV DSTORE_CONFIG=/etc/dstore/dstore.toml
USER dstore
WORKDIR /var/lib/dstore
VOLUME /var/lib/dstore
EXPOSE 2020
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD curl -fsS "http://127.0.0.1:${PORT:-2020}/_health" >/dev/null || exit 1
ENTRYPOINT ["/usr/bin/dstore"]
CMD ["serve"]
