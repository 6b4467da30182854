# One image for Remora, both roles: the sidecar proxy and the control plane are the same binary.
#
#   docker build -t remora .
#   docker run --rm -p 15000:15000 -p 15001:15001 remora proxy --config /etc/remora/config.yaml
#   docker run --rm -p 15010:15010 -v "$PWD/mesh:/mesh:ro" remora control --config-dir /mesh --listen 0.0.0.0:15010
#
# Build stage: the same toolchain as CI; the lockfile pins every crate.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin remora && strip target/release/remora

# Runtime: distroless with glibc and CA certificates, no shell and no package manager. Remora runs as
# uid 1337, the uid the iptables capture rules exempt so the proxy's own traffic is never captured.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/remora /usr/local/bin/remora
USER 1337:1337
# admin, outbound, inbound, control plane
EXPOSE 15000 15001 15006 15010
ENTRYPOINT ["/usr/local/bin/remora"]
CMD ["proxy"]
