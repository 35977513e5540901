#!/usr/bin/env bash
# Writes the e2e node's base images as OCI archives, without a registry or a container engine:
#   pause.oci.tar    keybroker.local/pause:3.10.2, Kubernetes' own build/pause/linux/pause.c from
#                    the pinned k8s.io/kubernetes module, linked statically
#   busybox.oci.tar  keybroker.local/busybox:1, Debian's busybox-static with a link per applet,
#                    /etc/passwd and /etc/group (root, nobody, and uids 1000-1002 for tests), /tmp
# crane builds them: `crane append` writes the layer, but image configs (entrypoint, platform)
# are only edited in a registry, so crane's own in-memory registry serves on loopback for the
# length of this script. The archives are OCI image layouts, imported with
# `ctr images import --index-name <name>`.
#
#   build-images.sh OUT_DIR CRANE K8S_MODULE_SOURCE
set -euo pipefail
out=$1 crane=$2 k8s_src=$3
work=$(mktemp -d)
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Reproducible layer tars: root-owned, fixed times, sorted.
layer() { tar --owner=0 --group=0 --numeric-owner --mtime=@0 --sort=name -C "$1" -cf "$2" .; }

mkdir -p "$work/pause"
gcc -static -Os -DVERSION=v3.10.2 -o "$work/pause/pause" "$k8s_src/build/pause/linux/pause.c"
strip "$work/pause/pause"
layer "$work/pause" "$work/pause.tar"

root=$work/busybox
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/home"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home:/bin/sh
other:x:1001:1001:other:/home:/bin/sh
sidecar:x:1002:1002:sidecar:/home:/bin/sh
nobody:x:65534:65534:nobody:/:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
app:x:1000:
other:x:1001:
sidecar:x:1002:
nogroup:x:65534:
GROUP
chmod 1777 "$root/tmp"
layer "$root" "$work/busybox.tar"

"$crane" registry serve --address 127.0.0.1:0 2>"$work/registry.log" &
registry_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$work/registry.log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "crane registry did not start:"; cat "$work/registry.log"; exit 1; }
reg=127.0.0.1:$port

# image NAME LAYER ENTRYPOINT...: pushed to the loopback registry, configured, then pulled out
# as an OCI layout and archived.
image() {
  local name=$1 layer_tar=$2; shift 2
  local entrypoint
  entrypoint=$(IFS=,; echo "$*")
  "$crane" append --insecure --oci-empty-base -f "$layer_tar" -t "$reg/$name:layer"
  "$crane" mutate --insecure "$reg/$name:layer" --set-platform linux/amd64 \
    --entrypoint "$entrypoint" -t "$reg/$name:final"
  "$crane" pull --insecure --format oci "$reg/$name:final" "$work/$name-layout"
  tar --owner=0 --group=0 --numeric-owner --mtime=@0 --sort=name -C "$work/$name-layout" \
    -cf "$out/$name.oci.tar" .
}
image pause "$work/pause.tar" /pause
image busybox "$work/busybox.tar" /bin/sh
ls -l "$out"
