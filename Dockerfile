# syntax=docker/dockerfile:1
# Multi-stage build of the `tollgate` binary. CPU image by default:
#   docker build -t tollgate .
# Models are not baked in: mount them at /models (see models.toml and the README).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY runtime runtime
COPY gateway gateway
COPY tollgate tollgate
ARG CARGO_FEATURES=""
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate ${CARGO_FEATURES:+--features $CARGO_FEATURES} \
    && cp target/release/tollgate /usr/local/bin/tollgate

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=build /usr/local/bin/tollgate /usr/local/bin/tollgate
COPY deploy/models.toml /etc/tollgate/models.toml
USER tollgate
WORKDIR /var/lib/tollgate
VOLUME ["/models", "/var/lib/tollgate"]
ENV TOLLGATE_CONFIG=/etc/tollgate/models.toml \
    TOLLGATE_LISTEN=0.0.0.0:8080 \
    HF_HOME=/var/lib/tollgate/hf
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
