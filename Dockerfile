# syntax=docker/dockerfile:1
# Multi-stage build of the `tollgate` binary. CPU image by default:
#   docker build -t tollgate .
# CUDA image (candle's CUDA backend; kernels for CUDA_COMPUTE_CAP, default 90 = H100/H200; the
# host needs an NVIDIA driver >= 580 and the NVIDIA container toolkit, `docker run --gpus all`):
#   docker build -t tollgate:cuda \
#     --build-arg RUST_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04 \
#     --build-arg CARGO_FEATURES=cuda --build-arg CUDA_COMPUTE_CAP=90 .
# Models are not baked in: mount them at /models (see models.toml and the README).
# Kubernetes manifests and the operator guide: deploy/kubernetes/, deploy/README.md.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# The rust image has cargo; a CUDA devel image gets a minimal stable toolchain here.
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN if ! command -v cargo >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ libc6-dev \
        && rm -rf /var/lib/apt/lists/* \
        && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --no-modify-path; \
    fi
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY runtime runtime
COPY metering metering
COPY gateway gateway
COPY tollgate tollgate
# Not built into the image, but workspace members (and testkit a dev-dependency of the gateway):
# cargo loads every member's manifest.
COPY testkit testkit
COPY bench/Cargo.toml bench/Cargo.toml
COPY bench/src bench/src
ARG CARGO_FEATURES=""
# Only read by the CUDA build (candle's kernels); there is no GPU to detect while building.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
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
