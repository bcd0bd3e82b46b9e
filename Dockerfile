# sluice: one binary, `serve` (embedded, the default), `api` or `ingest` (distributed).
#
#   docker build -t sluice .
#   docker run -p 8080:8080 -v sluice-data:/var/lib/sluice sluice
#
# Build stage: a release build of the locked dependency graph. SQLite, librdkafka and jemalloc
# are built from source by their crates, so the toolchain image's C compiler and make are all it
# needs.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked --package sluice --bin sluice \
    && cp target/release/sluice /usr/local/bin/sluice

# Runtime stage: Debian slim with CA certificates (for https:// clusters) and curl (for the
# health check), a non-root user, the data dir as a volume.
FROM debian:bookworm-slim
# Unpinned on purpose: the slim image's security updates are wanted on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --shell /usr/sbin/nologin sluice \
    && mkdir -p /var/lib/sluice /etc/sluice \
    && chown sluice:sluice /var/lib/sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
# Listen on every interface of the container; state under the volume. Both can be overridden
# with the same variables, a config file (--config) or flags.
ENV SLUICE_LISTEN=0.0.0.0:8080 \
    SLUICE_DATA_DIR=/var/lib/sluice
USER 10001:10001
WORKDIR /var/lib/sluice
VOLUME ["/var/lib/sluice"]
EXPOSE 8080
# /healthz: the process answers (readiness, /readyz, is for the orchestrator's traffic).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
# SIGTERM drains: in-flight requests and batches finish within shutdown_timeout (30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
