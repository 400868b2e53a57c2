# syntax=docker/dockerfile:1
# One image, both programs: /usr/local/bin/egress-webhook and /usr/local/bin/egress-proxy.
#   docker build -t ghcr.io/egress-gate/egress-gate:0.1.0 .
# The manifests in deploy/ pick the program with `command:`.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The image carries no debug info (webhook 41 -> 20 MB, proxy 18 -> 7 MB); symbols stay, so a
# panic's backtrace still names functions. Profiling builds come from the repository instead.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Cache mounts keep the registry and build artefacts between builds; the binaries are copied
# out of the cached target directory so the next stage can see them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin egress-webhook --bin egress-proxy \
 && mkdir -p /out \
 && cp target/release/egress-webhook target/release/egress-proxy /out/

# distroless/cc: glibc and CA certificates, no shell, no package manager; runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/egress-webhook /out/egress-proxy /usr/local/bin/
USER 65532:65532
EXPOSE 8443 9443 3128 9090
CMD ["/usr/local/bin/egress-webhook", "--help"]
