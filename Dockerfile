# kube-audience-proxy: the processor binary only. Pair it with the Envoy image
# of the version the tests run, envoyproxy/envoy:v1.40.0 (scripts/install-envoy
# pins the same Envoy; tests/dockerfile.rs keeps the manifests' Envoy image in
# step with it).
#
#   docker build -t kube-audience-proxy .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The build CI runs (.ci/run: --locked), for the one binary.
RUN cargo build --release --locked --bin kube-audience-proxy

# glibc and libgcc only, no shell, user nonroot (65532, the UID the manifests
# run as).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kube-audience-proxy /usr/local/bin/kube-audience-proxy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kube-audience-proxy"]
