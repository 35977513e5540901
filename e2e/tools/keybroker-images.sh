#!/usr/bin/env bash
# Writes keybroker's own images for the e2e node as OCI archives, without a registry or a
# container engine, and caches them keyed by their inputs:
#   operator.oci.tar  keybroker.local/keybroker-operator:dev  the static musl binary from
#                     `make release-static`, as the Dockerfile's `operator` stage ships it
#                     (/keybroker-operator, mode 0555, USER 65532:65532, that binary as
#                     ENTRYPOINT), plus CA certificates and /etc/passwd with nonroot like
#                     distroless static
#   sidecar.oci.tar   keybroker.local/keybroker-sidecar:dev   the same for the sidecar stage
#   app.oci.tar       keybroker.local/app-boto3:1             Debian's python3 with its dependency
#                     closure (as installed on this machine: dpkg's file lists), boto3 and the AWS
#                     CLI from PyPI (images/app-requirements.txt, pinned), busybox for a shell;
#                     entrypoint python3, user app (1000); an unmodified boto3 application
# The Dockerfile stays the release path: when it changes user, entrypoint or the binary's path or
# mode, change them here (e2e/tests/images.rs fails while the two differ).
# crane edits image configs only in a registry, so its in-memory registry serves on loopback
# for the length of this script (as in images/build-images.sh).
#
#   keybroker-images.sh CACHE_ROOT CRANE OPERATOR_BIN SIDECAR_BIN
# prints the cache directory holding the three archives.
set -euo pipefail
cache_root=$1 crane=$2 operator=$3 sidecar=$4

requirements=$(dirname "$0")/images/app-requirements.txt
app_packages=(python3 python3.11 python3-minimal python3.11-minimal libpython3.11-stdlib)
missing=()
for p in "${app_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "keybroker-images: installing ${missing[*]}" >&2
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
fi
closure=$(apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${app_packages[@]}" | grep -v '^ ' | grep -v '^<' | sort -u)
# Packages a Python process never touches (maintainer tooling).
closure=$(echo "$closure" | grep -vxE 'debconf|dpkg|tar|readline-common|openssl')

hash=$( (cat "$0" "$operator" "$sidecar" "$requirements" /bin/busybox
  for p in $closure; do dpkg-query -W -f='${Package}=${Version}\n' "$p"; done) | sha256sum | cut -c1-12)
dir=$cache_root/keybroker-images-$hash
mkdir -p "$cache_root"
# One build at a time across processes (parallel test binaries); the others then find it.
exec 9>"$cache_root/.keybroker-images.lock"
flock 9
# A hit marks the entry as in use (its mtime), so the pruning below keeps it.
if [ -f "$dir/app.oci.tar" ]; then touch "$dir"; echo "$dir"; exit 0; fi

work=$(mktemp -d)
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
started=$(date +%s)

layer() { tar --owner=0 --group=0 --numeric-owner --mtime=@0 --sort=name -C "$1" -cf "$2" .; }

# Like distroless static:nonroot: passwd/group with root, nonroot 65532 and nobody, CA bundle.
base_files() {
  mkdir -p "$1/etc/ssl/certs" "$1/tmp" "$1/home/nonroot"
  cat >"$1/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
app:x:1000:1000:app:/home:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  cat >"$1/etc/group" <<'GROUP'
root:x:0:
app:x:1000:
nogroup:x:65534:
nonroot:x:65532:
GROUP
  cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"
  chmod 1777 "$1/tmp"
}

for b in operator sidecar; do
  root=$work/$b
  mkdir -p "$root"
  base_files "$root"
  src=$operator; [ "$b" = sidecar ] && src=$sidecar
  install -m 0555 "$src" "$root/keybroker-$b"
  layer "$root" "$work/$b.tar"
done

root=$work/app
mkdir -p "$root"
# Debian is merged-/usr: the top-level links first, then every regular file and link of the
# closure's packages.
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64"
for l in bin sbin lib lib64; do [ -L "/$l" ] && cp -a "/$l" "$root/$l"; done
for p in $closure; do
  dpkg -L "$p" | while read -r f; do
    if [ -f "$f" ] || [ -L "$f" ]; then
      case $f in /usr/share/doc/*|/usr/share/man/*|/usr/share/lintian/*) continue ;; esac
      cp -a --parents "$f" "$root/" 2>/dev/null || true
    fi
  done
done
# cp --parents creates directories with mode 0700; images need them readable by any user.
find "$root" -type d -exec chmod 0755 {} +
[ -e "$root/usr/bin/python3" ] || { echo "keybroker-images: python3 missing from the app root" >&2; exit 1; }
# boto3 and the AWS CLI from PyPI, where Debian's python3 looks first (/usr/local/lib/python3.11/
# dist-packages); the CLI's script with the image's own interpreter.
python3 -m venv "$work/venv" >&2
site=$root/usr/local/lib/python3.11/dist-packages
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-compile \
  --target "$site" -r "$requirements" >&2
mkdir -p "$root/usr/local/bin"
{ echo '#!/usr/bin/python3'; tail -n +2 "$site/bin/aws"; } >"$root/usr/local/bin/aws"
chmod 0755 "$root/usr/local/bin/aws"
rm -rf "$site/bin"
# A shell and coreutils (examples/ run `sh -c`): Debian's static busybox, a link per applet that
# the closure does not already have.
install -m 0755 /bin/busybox "$root/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$root/usr/bin/$applet" ] || [ -L "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
done
base_files "$root"
# MinIO behind a cluster DNS name serves path-style requests only (bucket.minio.minio.svc does
# not resolve): what `aws configure set default.s3.addressing_style path` writes, in the app
# user's home (HOME comes from /etc/passwd: /home).
mkdir -p "$root/home/.aws"
printf '[default]\ns3 =\n    addressing_style = path\n' >"$root/home/.aws/config"
layer "$root" "$work/app.tar"

"$crane" registry serve --address 127.0.0.1:0 2>"$work/registry.log" &
registry_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$work/registry.log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "crane registry did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
reg=127.0.0.1:$port

mkdir -p "$work/out"
# image NAME LAYER USER ENTRYPOINT
image() {
  local name=$1 layer_tar=$2 user=$3 entrypoint=$4
  "$crane" append --insecure --oci-empty-base -f "$layer_tar" -t "$reg/$name:layer" >&2
  "$crane" mutate --insecure "$reg/$name:layer" --set-platform linux/amd64 \
    --user "$user" --entrypoint "$entrypoint" -t "$reg/$name:final" >&2
  "$crane" pull --insecure --format oci "$reg/$name:final" "$work/$name-layout"
  tar --owner=0 --group=0 --numeric-owner --mtime=@0 --sort=name -C "$work/$name-layout" \
    -cf "$work/out/$name.oci.tar" .
}
image operator "$work/operator.tar" 65532:65532 /keybroker-operator
image sidecar "$work/sidecar.tar" 65532:65532 /keybroker-sidecar
image app "$work/app.tar" 1000:1000 /usr/bin/python3

mkdir -p "$cache_root"
rm -rf "$dir.tmp"
mv "$work/out" "$dir.tmp"
mv "$dir.tmp" "$dir"
# The operator and sidecar binaries are inputs, so every commit makes a new entry (~130 MB):
# drop the ones no run has used for an hour.
find "$cache_root" -maxdepth 1 -name 'keybroker-images-*' ! -path "$dir" -mmin +60 -exec rm -rf {} + 2>/dev/null || true
echo "keybroker-images: built in $(( $(date +%s) - started ))s ($(du -sh "$dir" | cut -f1))" >&2
echo "$dir"
