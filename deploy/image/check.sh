#!/usr/bin/env bash
# Builds the image from the repository's Dockerfile with podman and checks what docs/kubernetes.md says of
# it, each role run from the image the way Kubernetes runs it:
#
#   - its size, and that it runs as uid/gid 1337 and holds no shell;
#   - the sidecar (`remora proxy`, built-in defaults) comes up ready in a network namespace of its
#     own, its process uid 1337, and exits 0 on SIGTERM after draining;
#   - the control plane (`remora control --config-dir`, deploy/mesh mounted) serves a second proxy
#     from the image, whose /config_dump shows the control plane connected;
#   - the init container (`remora init`, root with NET_ADMIN and NET_RAW) installs the capture
#     rules in a pod-like network namespace with the image's own iptables, and `--cleanup`
#     removes them.
#
# With BASES=offline (the default) the Dockerfile's bases are the stand-ins of offline-bases.sh;
# with BASES=pull they are pulled from their registries. Needs root, podman, runc, iproute2,
# iptables and python3. Usage: deploy/image/check.sh   (IMAGE=name to choose the tag)
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-localhost/remora:check}
BASES=${BASES:-offline}
netns=remora-image-$$
containers=()

fail() { echo "image check: FAILED: $*" >&2; exit 1; }
cleanup() {
  for c in "${containers[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done
  for ns in "$netns-pod" "$netns-init"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

# crun refuses this kind of machine's hybrid cgroup layout, and podman asks for more open files
# than its hard limit; runc with cgroupfs and explicit limits run anywhere a root podman does.
run=(podman run --runtime runc --cgroup-manager cgroupfs --ulimit nofile=4096:4096 --ulimit nproc=1024:1024)

get() { # URL in the pod namespace -> body; fails on a non-2xx answer
  ip netns exec "$netns-pod" python3 -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
}
wait_ready() { # URL
  for _ in $(seq 100); do get "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

if [[ $BASES == offline ]]; then deploy/image/offline-bases.sh; pull=never; else pull=missing; fi
echo "image check: building $IMAGE"
started=$(date +%s)
log=$(mktemp)
podman build --pull="$pull" --isolation chroot --network host -t "$IMAGE" . >"$log" 2>&1 \
  || { tail -30 "$log"; rm -f "$log"; fail "podman build"; }
rm -f "$log"
echo "image check: built in $(($(date +%s) - started)) s"

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[[ $user == 1337:1337 ]] || fail "the image's user is '$user', not 1337:1337"
mnt=$(podman image mount "$IMAGE")
shells=$(cd "$mnt" && ls bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/dash 2>/dev/null || true)
binary=$(stat -c %s "$mnt/usr/local/bin/remora")
podman image unmount "$IMAGE" >/dev/null
[[ -z $shells ]] || fail "the image holds a shell: $shells"
echo "image check: $IMAGE is $((size / 1000)) kB (the remora binary $((binary / 1000)) kB), user $user, no shell"

"${run[@]}" --rm "$IMAGE" --version | grep -q '^remora ' || fail "remora --version"

# The sidecar, alone in a pod-like namespace.
ip netns add "$netns-pod"
ip -n "$netns-pod" link set lo up
containers+=("$netns-proxy")
"${run[@]}" -d --name "$netns-proxy" --network "ns:/run/netns/$netns-pod" "$IMAGE" >/dev/null
wait_ready http://127.0.0.1:15000/ready || fail "the proxy never became ready: $(podman logs "$netns-proxy" 2>&1 | tail -5)"
pid=$(podman inspect --format '{{.State.Pid}}' "$netns-proxy")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[[ $uid == 1337 ]] || fail "the proxy runs as uid $uid"
podman stop --time 10 "$netns-proxy" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$netns-proxy")
[[ $code == 0 ]] || fail "the proxy exited $code on SIGTERM"
echo "image check: the proxy was ready, ran as uid $uid, and exited $code on SIGTERM"

# The control plane serving a proxy, both from the image, in the same namespace.
containers+=("$netns-control" "$netns-meshproxy")
"${run[@]}" -d --name "$netns-control" --network "ns:/run/netns/$netns-pod" \
  -v "$PWD/deploy/mesh:/mesh:ro" "$IMAGE" control --config-dir /mesh >/dev/null
"${run[@]}" -d --name "$netns-meshproxy" --network "ns:/run/netns/$netns-pod" \
  "$IMAGE" proxy --control http://127.0.0.1:15010 --node-id image-check >/dev/null
wait_ready http://127.0.0.1:15000/ready || fail "the proxy never took its config from the control plane: $(podman logs "$netns-meshproxy" 2>&1 | tail -5)"
get http://127.0.0.1:15000/config_dump | python3 -c 'import json, sys
cp = json.load(sys.stdin)["control_plane"]
sys.exit(0 if cp["connected"] else 1)' || fail "/config_dump does not show the control plane connected"
echo "image check: the control plane served a proxy (/ready 200, control plane connected)"

# The init container, in a namespace of its own.
ip netns add "$netns-init"
"${run[@]}" --rm --network "ns:/run/netns/$netns-init" --user 0 --cap-add NET_ADMIN --cap-add NET_RAW \
  "$IMAGE" init >/dev/null
rules=$(ip netns exec "$netns-init" iptables-save -t nat | grep -c -- '-j REDIRECT --to-ports 1500[16]' || true)
[[ $rules == 2 ]] || fail "remora init installed $rules REDIRECT rules, not 2"
"${run[@]}" --rm --network "ns:/run/netns/$netns-init" --user 0 --cap-add NET_ADMIN --cap-add NET_RAW \
  "$IMAGE" init --cleanup >/dev/null
left=$(ip netns exec "$netns-init" iptables-save | grep -c REMORA || true)
[[ $left == 0 ]] || fail "remora init --cleanup left $left lines"
echo "image check: remora init installed the capture rules and --cleanup removed them"
echo "image check: passed"
