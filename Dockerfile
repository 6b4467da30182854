# One image for Remora, all roles: the sidecar proxy, its capture init container (`remora init`), and
# the control plane with the sidecar injector are the same binary.
#
#   docker build -t remora .
#   docker run --rm -p 15000:15000 -p 15001:15001 remora proxy --config /etc/remora/config.yaml
#   docker run --rm -p 15010:15010 -v "$PWD/mesh:/mesh:ro" remora control --config-dir /mesh --listen 0.0.0.0:15010
#   deploy/image/check.sh    # builds it with podman and runs every role from it (see the README)
#
# Build stage: the same toolchain as CI; the lockfile pins every crate.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin remora && strip target/release/remora

# `remora init` drives iptables-restore and iptables-save. Gather exactly those (the nf_tables
# flavour, which writes the kernel's nftables, and the legacy one for old nodes), the libraries they
# load and their match/target extensions, so the runtime image needs no package manager or shell.
FROM debian:bookworm-slim AS iptables
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
 && mkdir -p /out/usr/sbin /out/usr/lib/x86_64-linux-gnu /out/lib/x86_64-linux-gnu \
 && cp -a /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /out/usr/sbin/ \
 && for tool in iptables ip6tables; do \
      for mode in nft legacy; do \
        for suffix in "" -restore -save; do ln -s "xtables-$mode-multi" "/out/usr/sbin/$tool-$mode$suffix"; done; \
      done; \
      for suffix in "" -restore -save; do ln -s "$tool-nft$suffix" "/out/usr/sbin/$tool$suffix"; done; \
    done \
 && cp -a /usr/lib/x86_64-linux-gnu/xtables /out/usr/lib/x86_64-linux-gnu/ \
 && cp -aL /lib/x86_64-linux-gnu/libxtables.so.12 /lib/x86_64-linux-gnu/libip4tc.so.2 \
      /lib/x86_64-linux-gnu/libip6tc.so.2 /lib/x86_64-linux-gnu/libmnl.so.0 /lib/x86_64-linux-gnu/libnftnl.so.11 \
      /out/lib/x86_64-linux-gnu/

# Runtime: distroless with glibc and CA certificates, no shell and no package manager. Remora runs as
# uid 1337, the uid the capture rules exempt so the proxy's own traffic is never captured; the
# injected init container alone runs as root, with NET_ADMIN, to install them.
FROM gcr.io/distroless/cc-debian12
COPY --from=iptables /out/ /
COPY --from=build /src/target/release/remora /usr/local/bin/remora
USER 1337:1337
# admin, outbound, inbound, control plane, sidecar injector
EXPOSE 15000 15001 15006 15010 15017
ENTRYPOINT ["/usr/local/bin/remora"]
CMD ["proxy"]
