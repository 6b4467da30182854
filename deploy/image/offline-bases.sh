#!/usr/bin/env bash
# Makes local stand-ins for the three base images the Dockerfile names, for a builder that reaches
# Debian's package mirror and crates.io but no container registry (an air-gapped CI runner, or this
# project's development machines). Each stand-in is made from what the real one is made from:
#
#   debian:bookworm-slim           debootstrap --variant=minbase bookworm, apt caches emptied
#   rust:1.95-slim-bookworm        that, plus Debian's gcc and libc6-dev and this machine's own
#                                  Rust toolchain (`rustc --print sysroot`), and any extra CA
#                                  certificates this machine trusts (an egress proxy's), so cargo in
#                                  the build stage can reach crates.io the way the host does
#   gcr.io/distroless/cc-debian12  the files of the Debian packages distroless's cc image holds
#                                  (base-files, netbase, tzdata, CA certificates, libc6, libssl3,
#                                  libgcc-s1, libstdc++6, libgomp1) and its passwd and group
#                                  files, documentation dropped; no shell, no package manager
#
# The images are tagged with the real names, so `podman build --pull=never .` uses them unchanged.
# An image that already exists is kept; REBUILD=1 makes all three again. Needs root, podman and
# debootstrap (Debian packages). Usage: deploy/image/offline-bases.sh
set -euo pipefail

DEBIAN=docker.io/library/debian:bookworm-slim
RUST=docker.io/library/rust:1.95-slim-bookworm
DISTROLESS=gcr.io/distroless/cc-debian12:latest
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

missing() { [[ ${REBUILD:-0} == 1 ]] || ! podman image exists "$1"; }

if missing "$DEBIAN"; then
  echo "offline-bases: $DEBIAN from debootstrap ($MIRROR)"
  debootstrap --variant=minbase bookworm "$work/debian" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
  rm -rf "$work"/debian/var/cache/apt/archives/*.deb "$work"/debian/var/lib/apt/lists/*
  tar -C "$work/debian" -c . | podman import --change 'CMD ["bash"]' - "$DEBIAN" >/dev/null
  rm -rf "$work/debian"
fi

if missing "$RUST"; then
  sysroot=$(rustc --print sysroot)
  echo "offline-bases: $RUST from $DEBIAN and $sysroot ($(rustc --version))"
  mkdir -p "$work/rust/certs" "$work/rust/toolchain"
  tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$work/rust/toolchain" -x
  cp /usr/local/share/ca-certificates/*.crt "$work/rust/certs/" 2>/dev/null || true
  cat >"$work/rust/Containerfile" <<EOF
FROM $DEBIAN
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY toolchain /usr/local/rust
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version
EOF
  podman build --quiet --pull=never --isolation chroot --network host -t "$RUST" "$work/rust" >/dev/null
  rm -rf "$work/rust"
fi

if missing "$DISTROLESS"; then
  echo "offline-bases: $DISTROLESS from Debian's packages"
  mkdir -p "$work/debs" "$work/root"
  (cd "$work/debs" && apt-get download base-files netbase tzdata libc6 libssl3 libgcc-s1 libstdc++6 libgomp1 >/dev/null)
  for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done
  root=$work/root
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian"
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  tar -C "$root" -c . | podman import - "$DISTROLESS" >/dev/null
fi

podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'debian|rust|distroless'
