#!/usr/bin/env bash
# Builds the real components the e2e tests run (kube-apiserver, kube-controller-manager, kubectl,
# etcd, MinIO with its IAM helper, helm) from the Go module proxy, through the wrapper modules beside
# this script. Binaries are cached outside the repository, keyed by tool version and a hash of
# the wrapper's go.mod/go.sum, and rebuilt only when missing.
#
#   build.sh [TOOL...]   build what is missing (default: all tools)
#   build.sh --locate    print KEYBROKER_BIN_<NAME>=<path> lines; fail if anything is missing
#
# Cache root: $KEYBROKER_TOOLS_DIR, default ${XDG_CACHE_HOME:-~/.cache}/keybroker/tools.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KEYBROKER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/tools}
all_tools=(etcd kube kubectl minio helm)

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
    *) echo "unknown tool '$1' (known: ${all_tools[*]})" >&2; return 1 ;;
  esac
}

# tool -> "binary=package" lines
binaries() {
  case $1 in
    etcd) echo "etcd=go.etcd.io/etcd/server/v3" ;;
    kube) echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver"
          echo "kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager" ;;
    kubectl) echo "kubectl=keybroker.dev/e2e/tools/kubectl" ;;
    minio) echo "minio=github.com/minio/minio"
           echo "minio-iam=keybroker.dev/e2e/tools/minio/iam" ;;
    helm) echo "helm=helm.sh/helm/v3/cmd/helm" ;;
  esac
}

version_of() {
  local mod
  mod=$(main_module "$1")
  awk -v m="$mod" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' \
    "$here/$1/go.mod"
}

entry_dir() {
  local hash
  hash=$(cd "$here/$1" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-12)
  echo "$cache/$1-$(version_of "$1")-$hash"
}

ldflags_for() {
  case $1 in
    kube) local v
          v=$(version_of kube)
          local minor=${v#v1.}; minor=${minor%%.*}
          echo "-s -w -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" ;;
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
  (cd "$here/$tool" && go mod download) >"$log" 2>&1 || { tail -20 "$log" >&2; return 1; }
  local pkgs=() line name pkg
  while IFS= read -r line; do pkgs+=("${line#*=}"); done < <(binaries "$tool")
  local total
  total=$(cd "$here/$tool" && go list -deps "${pkgs[@]}" | wc -l)
  while IFS= read -r line; do
    name=${line%%=*}; pkg=${line#*=}
    if ! (cd "$here/$tool" && go build -v -trimpath -ldflags "$(ldflags_for "$tool")" -o "$tmp/$name" "$pkg") 2>&1 |
      tee -a "$log" | progress "$tool" "$name" "$total" "$started" || [ ! -x "$tmp/$name" ]; then
      echo "tools: building $name failed; last lines of $log:" >&2
      tail -30 "$log" >&2
      return 1
    fi
  done < <(binaries "$tool")
  touch "$tmp/.complete"
  rm -rf "$dir"; mv "$tmp" "$dir"
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
      echo "KEYBROKER_BIN_$(echo "$name" | tr 'a-z-' 'A-Z_')=$dir/$name"
    done < <(binaries "$tool")
  done
  return $missing
}

if [ "${1:-}" = "--locate" ]; then locate; exit; fi
command -v go >/dev/null || { echo "tools: Go is required to build the test components" >&2; exit 1; }
command -v flock >/dev/null || { echo "tools: flock (util-linux) is required" >&2; exit 1; }
for t in "${@:-${all_tools[@]}}"; do main_module "$t" >/dev/null; build_one "$t"; done
