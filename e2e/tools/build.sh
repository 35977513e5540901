#!/usr/bin/env bash
# Builds the real components the e2e tests run (kube-apiserver, kube-controller-manager, kubectl,
# etcd, MinIO with its IAM helper, helm; for the node: kubelet, kube-proxy, kube-scheduler,
# containerd with its runc shim, the CNI plugins, CoreDNS, crane and the base images; for the
# gateway tests: go-httpbin and Gitea) from the Go module proxy, through the wrapper modules
# beside this script. Binaries are cached outside the repository, keyed by tool version and a
# hash of the wrapper's go.mod/go.sum/*.go (and images/*.sh), and rebuilt only when missing. The
# node also needs Debian packages (runc, iptables, nftables, conntrack, busybox-static); they are
# installed with apt-get when missing.
#
#   build.sh [TOOL...]   build what is missing (default: all tools)
#   build.sh --locate    print KEYBROKER_BIN_<NAME>=<path> lines; fail if anything is missing
#
# Cache root: $KEYBROKER_TOOLS_DIR, default ${XDG_CACHE_HOME:-~/.cache}/keybroker/tools.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KEYBROKER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/tools}
all_tools=(etcd kube kubectl minio helm node containerd cni coredns crane images httpbin gitea)

export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly
export NO_PROXY=127.0.0.1,localhost

# tool -> the module whose version names the cache entry
main_module() {
  case $1 in
    etcd) echo go.etcd.io/etcd/server/v3 ;;
    kube) echo k8s.io/kubernetes ;;
    kubectl) echo k8s.io/kubectl ;;
    minio) echo github.com/minio/minio ;;
    helm) echo helm.sh/helm/v3 ;;
    node) echo k8s.io/kubernetes ;;
    containerd) echo github.com/containerd/containerd/v2 ;;
    cni) echo github.com/containernetworking/plugins ;;
    coredns) echo github.com/coredns/coredns ;;
    crane) echo github.com/google/go-containerregistry ;;
    images) echo k8s.io/kubernetes ;;
    httpbin) echo github.com/mccutchen/go-httpbin/v2 ;;
    gitea) echo gitea.dev ;;   # Gitea's own module name; the wrapper replaces it with code.gitea.io/gitea
    *) echo "unknown tool '$1' (known: ${all_tools[*]})" >&2; return 1 ;;
  esac
}

# tool -> "binary=package" lines (an empty package: a file or directory the tool's build writes
# some other way)
binaries() {
  case $1 in
    etcd) echo "etcd=go.etcd.io/etcd/server/v3" ;;
    kube) echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver"
          echo "kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager" ;;
    kubectl) echo "kubectl=keybroker.dev/e2e/tools/kubectl" ;;
    minio) echo "minio=github.com/minio/minio"
           echo "minio-iam=keybroker.dev/e2e/tools/minio/iam" ;;
    helm) echo "helm=helm.sh/helm/v3/cmd/helm" ;;
    node) echo "kubelet=k8s.io/kubernetes/cmd/kubelet"
          echo "kube-proxy=k8s.io/kubernetes/cmd/kube-proxy"
          echo "kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler" ;;
    containerd) echo "containerd=github.com/containerd/containerd/v2/cmd/containerd"
                echo "containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
                echo "ctr=github.com/containerd/containerd/v2/cmd/ctr" ;;
    cni) echo "bridge=github.com/containernetworking/plugins/plugins/main/bridge"
         echo "host-local=github.com/containernetworking/plugins/plugins/ipam/host-local"
         echo "loopback=github.com/containernetworking/plugins/plugins/main/loopback"
         echo "portmap=github.com/containernetworking/plugins/plugins/meta/portmap" ;;
    coredns) echo "coredns=github.com/coredns/coredns" ;;
    crane) echo "crane=github.com/google/go-containerregistry/cmd/crane" ;;
    images) echo "pause.oci.tar=" ; echo "busybox.oci.tar=" ;;
    httpbin) echo "go-httpbin=github.com/mccutchen/go-httpbin/v2/cmd/go-httpbin" ;;
    gitea) echo "gitea=gitea.dev"
           echo "gitea-static=" ;;   # its STATIC_ROOT_PATH, see add_extras
  esac
}

# tool -> the directory of its wrapper module (the node's binaries come from the control plane's
# module, so both are always the same Kubernetes version)
module_dir() {
  case $1 in
    node|images) echo "$here/kube" ;;
    *) echo "$here/$1" ;;
  esac
}

# Debian packages the node needs at run time: runc (containerd's runtime), iptables/nftables
# (kube-proxy and the CNI portmap/bridge plugins), conntrack (kube-proxy), busybox-static (the
# test image's userland), tini (init of the node's PID namespace: reaps orphans, and its death
# kills every process of the node); for keybroker's own images, musl-tools (musl-gcc: aws-lc in
# the static builds of `make release-static`) and python3-venv (pip for the app image's boto3);
# git for Gitea (the gateway tests' upstream keeps its repositories with it).
node_debs=(runc iptables nftables conntrack busybox-static tini musl-tools python3-venv git)
ensure_debs() {
  local missing=() pkg
  for pkg in "${node_debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  (( ${#missing[@]} == 0 )) && return 0
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "tools: the node needs Debian packages: apt-get install ${missing[*]}" >&2; return 1; }
    sudo=(sudo)
  fi
  echo "tools: installing Debian packages the node needs: ${missing[*]}"
  exec 8>"$cache/.apt.lock"
  flock 8
  "${sudo[@]}" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  flock -u 8
}

version_of() {
  local mod
  mod=$(main_module "$1")
  awk -v m="$mod" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' \
    "$(module_dir "$1")/go.mod"
}

entry_dir() {
  local hash
  if [ "$1" = images ]; then
    # The images' inputs: their script, the Kubernetes source (pause.c) and crane versions, and
    # Debian's busybox build.
    hash=$( (cat "$here/images/"*.sh "$here/kube/go.mod" "$here/crane/go.mod"
             dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) | sha256sum | cut -c1-12)
  else
    hash=$(cd "$(module_dir "$1")" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-12)
  fi
  echo "$cache/$1-$(version_of "$1")-$hash"
}

tags_for() {
  case $1 in
    # No snapshotters for file systems this node does not use; overlayfs and native stay.
    containerd) echo "no_btrfs no_zfs no_devmapper" ;;
    *) echo "" ;;
  esac
}

ldflags_for() {
  case $1 in
    kube) local v
          v=$(version_of kube)
          local minor=${v#v1.}; minor=${minor%%.*}
          echo "-s -w -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" ;;
    node) ldflags_for kube ;;
    containerd) echo "-s -w -X github.com/containerd/containerd/v2/version.Version=$(version_of containerd)" ;;
    gitea) local v
           v=$(version_of gitea)
           echo "-s -w -X main.Version=${v#v} -X main.Tags=" ;;
    *) echo "-s -w" ;;
  esac
}

# Reads `go build -v` output (one line per compiled package) and reports every 15 s.
progress() {
  local tool=$1 bin=$2 total=$3 t0=$4 n=0 last=0 now
  while IFS= read -r _; do
    n=$((n + 1)); now=$(date +%s)
    if (( now - last >= 15 )); then
      echo "tools: $tool: $bin compiling, $n/$total packages done, $((now - t0))s"
      last=$now
    fi
  done
}

# Files a tool's entry needs besides its binaries. Gitea built without the `bindata` tag (which
# needs a generate step on a writable copy of its source) reads its locales and templates from
# STATIC_ROOT_PATH at run time, and its API refuses to start without them ("translation is
# missing"): they are copied from the module cache into <entry>/gitea-static.
add_extras() {
  local tool=$1 tmp=$2 src
  case $tool in
    gitea)
      src=$(cd "$(module_dir gitea)" && go list -m -f '{{.Dir}}' gitea.dev)
      [ -d "$src/options/locale" ] || { echo "tools: no options/locale in $src" >&2; return 1; }
      mkdir -p "$tmp/gitea-static"
      cp -R "$src/options" "$src/templates" "$tmp/gitea-static/"
      chmod -R u+w "$tmp/gitea-static"   # the module cache is read-only; prune_stale must remove it
      ;;
  esac
}

# Removes the tool's entries for other versions or wrapper hashes once a new one is complete:
# every change to a wrapper module makes a new entry, and a machine that runs CI for every
# commit would otherwise keep them all (the node's alone is ~700 MB).
prune_stale() {
  local tool=$1 keep=$2 old
  for old in "$cache/$tool"-v*; do
    [ -d "$old" ] && [ "$old" != "$keep" ] || continue
    case $old in *.tmp.*) continue ;; esac
    echo "tools: removing the stale entry $old"
    rm -rf "$old"
  done
}

build_one() {
  local tool=$1 dir tmp log started
  dir=$(entry_dir "$tool")
  if [ -f "$dir/.complete" ]; then
    echo "tools: $tool $(version_of "$tool") cached in $dir"
    return 0
  fi
  mkdir -p "$cache"
  exec 9>"$cache/.$tool.lock"
  flock 9
  if [ -f "$dir/.complete" ]; then flock -u 9; return 0; fi   # another run built it meanwhile
  tmp="$dir.tmp.$$"
  log="$cache/$tool-build.log"
  rm -rf "$tmp"; mkdir -p "$tmp"
  started=$(date +%s)
  echo "tools: building $tool $(version_of "$tool") (first time only; kube takes 10-20 min on 2 cores)"
  if [ "$tool" = images ]; then
    (cd "$here/kube" && go mod download k8s.io/kubernetes) >"$log" 2>&1 || { tail -20 "$log" >&2; return 1; }
    if ! bash "$here/images/build-images.sh" "$tmp" "$(entry_dir crane)/crane" \
        "$(go env GOMODCACHE)/k8s.io/kubernetes@$(version_of kube)" >>"$log" 2>&1; then
      echo "tools: building the images failed; last lines of $log:" >&2
      tail -30 "$log" >&2
      return 1
    fi
    touch "$tmp/.complete"
    rm -rf "$dir"; mv "$tmp" "$dir"
    prune_stale "$tool" "$dir"
    flock -u 9
    echo "tools: images built in $(( $(date +%s) - started ))s -> $dir"
    return 0
  fi
  local mdir
  mdir=$(module_dir "$tool")
  (cd "$mdir" && go mod download) >"$log" 2>&1 || { tail -20 "$log" >&2; return 1; }
  local pkgs=() line name pkg
  while IFS= read -r line; do
    if [ -n "${line#*=}" ]; then pkgs+=("${line#*=}"); fi
  done < <(binaries "$tool")
  local total
  total=$(cd "$mdir" && go list -tags "$(tags_for "$tool")" -deps "${pkgs[@]}" | wc -l)
  while IFS= read -r line; do
    name=${line%%=*}; pkg=${line#*=}
    [ -n "$pkg" ] || continue
    if ! (cd "$mdir" && go build -v -trimpath -tags "$(tags_for "$tool")" -ldflags "$(ldflags_for "$tool")" -o "$tmp/$name" "$pkg") 2>&1 |
      tee -a "$log" | progress "$tool" "$name" "$total" "$started" || [ ! -x "$tmp/$name" ]; then
      echo "tools: building $name failed; last lines of $log:" >&2
      tail -30 "$log" >&2
      return 1
    fi
  done < <(binaries "$tool")
  add_extras "$tool" "$tmp" >>"$log" 2>&1 || { echo "tools: completing $tool failed; last lines of $log:" >&2; tail -20 "$log" >&2; return 1; }
  touch "$tmp/.complete"
  rm -rf "$dir"; mv "$tmp" "$dir"
  prune_stale "$tool" "$dir"
  flock -u 9
  echo "tools: $tool built in $(( $(date +%s) - started ))s -> $dir"
}

locate() {
  local tool line name dir missing=0
  for tool in "${all_tools[@]}"; do
    dir=$(entry_dir "$tool")
    if [ ! -f "$dir/.complete" ]; then
      echo "tools: $tool $(version_of "$tool") is not built (expected in $dir); run 'make tools'" >&2
      missing=1; continue
    fi
    while IFS= read -r line; do
      name=${line%%=*}
      echo "KEYBROKER_BIN_$(echo "$name" | tr 'a-z.-' 'A-Z__')=$dir/$name"
    done < <(binaries "$tool")
  done
  local bin
  for bin in runc iptables nft conntrack; do
    if bin=$(PATH=$PATH:/usr/sbin:/sbin command -v "$bin"); then
      echo "KEYBROKER_BIN_$(basename "$bin" | tr 'a-z-' 'A-Z_')=$bin"
    else
      echo "tools: $bin is not installed (Debian: ${node_debs[*]}); run 'make tools'" >&2
      missing=1
    fi
  done
  return $missing
}

if [ "${1:-}" = "--locate" ]; then locate; exit; fi
command -v go >/dev/null || { echo "tools: Go is required to build the test components" >&2; exit 1; }
command -v flock >/dev/null || { echo "tools: flock (util-linux) is required" >&2; exit 1; }
mkdir -p "$cache"
for t in "${@:-${all_tools[@]}}"; do
  main_module "$t" >/dev/null
  case $t in node|containerd|cni|coredns|images) ensure_debs ;; esac
  build_one "$t"
done
