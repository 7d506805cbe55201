# syntax=docker/dockerfile:1
# One image with every devfleet binary: the seven services and the CLI.
# The compose file and the Kubernetes manifests pick the binary with the
# container command, e.g. `command: ["scheduler"]`.
#
#   docker build -t devfleet:latest .
#   docker run --rm devfleet:latest devfleet --help
#
# Needs BuildKit (the default of `docker build` and `docker compose`; with
# the old docker-compose 1.x set DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds (BuildKit);
# the binaries are copied out in the same step because the cache is not part
# of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && for bin in devfleet analyzer scheduler dev-worker qa-worker router canary metrics-gateway; do \
         cp "target/release/$bin" /out/; \
       done

FROM debian:bookworm-slim
# ca-certificates: TLS to model providers and webhooks. python3, nodejs: the
# languages the qa-worker checks. bubblewrap: its sandbox. procps: `ps` for
# operators.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 nodejs bubblewrap procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/devfleet devfleet
COPY --from=builder /out/ /usr/local/bin/
COPY --chmod=0755 deploy/probe.sh /usr/local/bin/devfleet-probe
WORKDIR /home/devfleet
USER 10001:10001
# Inside a container the gateway must listen beyond loopback.
ENV DEVFLEET_GATEWAY_ADDR=0.0.0.0:7070 \
    RUST_LOG=info
EXPOSE 7070
CMD ["devfleet", "--help"]
