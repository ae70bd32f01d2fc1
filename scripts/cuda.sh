#!/usr/bin/env bash
# A CUDA toolkit for building the worker with `--features cuda` on a machine that has none (and no
# GPU): NVIDIA's PyPI wheels, installed once into the cache, laid out as a CUDA root.
#
#   scripts/cuda.sh cargo build -p tidelock-worker --features cuda   # runs the command with it
#   source scripts/cuda.sh                                           # sets it in this shell
#   eval "$(scripts/cuda.sh)"                                        # the same, printed as exports
#
# What the build needs, and why (read from the build scripts of candle-kernels, cudaforge and
# cudarc): nvcc with cicc, ptxas, fatbinary and the crt and cccl headers (candle-kernels compiles
# its kernels to PTX and a static library); the version nvcc reports (cudarc picks its bindings by
# it: CUDARC_CUDA_VERSION says it without running nvcc); and for the link step libcudart,
# libcublas, libcublasLt, libcurand and libnvrtc (unversioned names, as the linker looks for
# them) and libcuda, the driver, which no wheel ships: lib/stubs/libcuda.so is a stub made here
# from cuda.h's declarations (every function returns CUDA_ERROR_STUB_LIBRARY), with the driver's
# soname, so the binary asks for libcuda.so.1 and gets the real driver on a GPU node. The stub is
# never on a loader path.
#
# Only the wheels of CUDA 13 carry nvcc itself (the -cu12 ones hold ptxas and libnvvm only), so
# this is CUDA 13. CUDA_WHEELS_VERSION is the cuda-toolkit meta-package's version, which pins every
# component wheel; Dockerfile.cuda's CUDA_VERSION is the same (tests/images.rs checks it).
#
# Environment:
#   TIDELOCK_CACHE     the cache (default: $XDG_CACHE_HOME/tidelock or ~/.cache/tidelock); the
#                      toolkit goes to $TIDELOCK_CACHE/cuda/<version> (~1.1 GB, ~0.7 GB download)
#   CUDA_COMPUTE_CAP   the GPUs' compute capability the kernels are compiled for, without the dot
#                      (default 90: H100/H200; 80 A100, 89 L4/L40S); no GPU is visible here
#
# Sourced, it leaves the options of the calling shell as they were (the install runs in a
# subshell) and returns non-zero where the toolkit cannot be installed.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
fi

CUDA_WHEELS_VERSION="13.0.2"
# The meta-package's extras: nvcc and what it runs (crt headers, nvvm's cicc), the runtime's
# headers and libcudart, cccl's headers, and the libraries cudarc links.
CUDA_WHEELS_EXTRAS="nvcc,crt,nvvm,cudart,cccl,nvrtc,cublas,curand"

TIDELOCK_CACHE="${TIDELOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidelock}"
export TIDELOCK_CACHE
TIDELOCK_CUDA_ROOT="$TIDELOCK_CACHE/cuda/$CUDA_WHEELS_VERSION/nvidia/cu${CUDA_WHEELS_VERSION%%.*}"

# What the build reads from the toolkit, relative to its root.
CUDA_NEEDED_FILES=(
  bin/nvcc bin/ptxas bin/fatbinary bin/cudafe++ nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc
  include/cuda.h include/cuda_runtime.h include/cuda_fp16.h include/cuda_bf16.h include/cuda_fp8.h
  include/crt/host_config.h include/cccl/cuda/std/type_traits include/cccl/cub/cub.cuh
  lib/libcudart.so lib/libcublas.so lib/libcublasLt.so lib/libcurand.so lib/libnvrtc.so
  lib/stubs/libcuda.so
)

# The install and its checks; run in a subshell, so `die` leaves a sourcing shell alone.
cuda_install() {
  set -euo pipefail
  # step, note, die, ensure_venv and apt_install.
  # shellcheck source=scripts/prereqs.sh
  . "$(dirname "${BASH_SOURCE[0]}")/prereqs.sh"

  local version="$CUDA_WHEELS_VERSION" root="$TIDELOCK_CUDA_ROOT"
  local dir="$TIDELOCK_CACHE/cuda/$version"
  local spec="cuda-toolkit[$CUDA_WHEELS_EXTRAS]==$version"

  ensure_cxx_toolchain
  if [ -f "$dir/stamp" ] && [ "$(cat "$dir/stamp")" = "$spec" ] && cuda_files_present "$root"; then
    note "CUDA $version toolkit (PyPI wheels): $root ($(cuda_nvcc_release "$root/bin/nvcc"))"
    return 0
  fi

  # Another version's tree, or a broken one: the cache keeps one toolkit.
  local old
  for old in "$TIDELOCK_CACHE"/cuda/*; do
    [ -e "$old" ] || continue
    note "removing $old (not a complete CUDA $version toolkit)"
    rm -rf "$old"
  done
  ensure_venv
  mkdir -p "$TIDELOCK_CACHE/cuda"
  local partial
  partial="$(mktemp -d "$dir.partial.XXXXXX")"
  note "installing the CUDA $version toolkit from PyPI wheels into $dir"
  note "($spec: ~0.7 GB download, ~1.1 GB installed; once)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
    --progress-bar on --target "$partial" "$spec"; then
    rm -rf "$partial"
    die "pip could not install $spec"
  fi
  local proot="$partial/nvidia/cu${version%%.*}"
  # Unneeded by the build: the alternative NVRTC builds, the static runtimes, NVBLAS.
  rm -f "$proot"/lib/*.alt.so* "$proot"/lib/libcudart_static.a "$proot"/lib/libcudadevrt.a \
    "$proot"/lib/libnvblas.so*
  cuda_link_names "$proot"
  cuda_driver_stub "$proot" || { rm -rf "$partial"; die "could not build the libcuda stub"; }
  if ! cuda_files_present "$proot" verbose; then
    rm -rf "$partial"
    die "the wheels of $spec lack files the build needs (listed above)"
  fi
  cuda_check_compiles "$proot" || { rm -rf "$partial"; die "the CUDA $version toolkit from $spec cannot compile or link (see above)"; }
  echo "$spec" >"$partial/stamp"
  rm -rf "$dir"
  mv -T "$partial" "$dir"
  note "CUDA $version toolkit (PyPI wheels): $root ($(cuda_nvcc_release "$root/bin/nvcc"), $(du -sh "$dir" | cut -f1))"
}

# nvcc compiles with the host's g++ (C++17 with libstdc++'s headers), and candle-kernels links
# libstdc++: checked by compiling and linking a C++ file, not by looking for a binary.
cxx_toolchain_works() {
  local dir rc=0
  dir="$(mktemp -d)"
  printf '#include <cmath>\n#include <cstdint>\n#include <type_traits>\nint check(std::int64_t x) { return (int)std::sqrt((double)x); }\n' >"$dir/check.cpp"
  g++ -std=c++17 -fPIC -shared -o "$dir/libcheck.so" "$dir/check.cpp" -lstdc++ >/dev/null 2>&1 || rc=$?
  rm -rf "$dir"
  return "$rc"
}

ensure_cxx_toolchain() {
  if ! cxx_toolchain_works; then
    note "no working C++ compiler with libstdc++ (nvcc needs one): installing g++"
    apt_install g++
  fi
  cxx_toolchain_works || die "g++ cannot compile and link a C++17 file against libstdc++: install g++ (Debian: g++)"
}

# "release 13.0, V13.0.88" from `nvcc --version`.
cuda_nvcc_release() {
  "$1" --version 2>/dev/null | sed -n 's/.*\(release [0-9.]*, V[0-9.]*\).*/nvcc \1/p'
}

# Every file of CUDA_NEEDED_FILES, and an nvcc that runs and is of this version.
cuda_files_present() {
  local root="$1" verbose="${2:-}" f ok=0
  for f in "${CUDA_NEEDED_FILES[@]}"; do
    if [ ! -e "$root/$f" ]; then
      [ -z "$verbose" ] || note "missing: $root/$f"
      ok=1
    fi
  done
  [ "$ok" -eq 0 ] || return 1
  local want="${CUDA_WHEELS_VERSION%.*}"
  if ! "$root/bin/nvcc" --version 2>/dev/null | grep -q "release $want,"; then
    [ -z "$verbose" ] || note "$root/bin/nvcc does not run, or is not CUDA $want"
    return 1
  fi
}

# The linker looks for libNAME.so; the wheels ship only the sonames (libNAME.so.13).
cuda_link_names() {
  local lib="$1/lib" f
  for f in "$lib"/lib*.so.*; do
    [ -e "$f" ] || continue
    ln -sfn "$(basename "$f")" "${f%%.so.*}.so"
  done
}

# A link-time libcuda: every function cuda.h declares (after its macros, so cuMemAlloc is
# cuMemAlloc_v2 as in the driver), each returning CUDA_ERROR_STUB_LIBRARY (34).
cuda_driver_stub() {
  local root="$1" dir
  dir="$(mktemp -d)"
  local headers=("$root/include/cuda.h")
  [ ! -f "$root/include/cudaProfiler.h" ] || headers+=("$root/include/cudaProfiler.h")
  printf '#include "%s"\n' "${headers[@]}" >"$dir/all.h"
  if ! gcc -E -P -I "$root/include" "$dir/all.h" >"$dir/pre.h"; then
    rm -rf "$dir"
    return 1
  fi
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$dir/pre.h" | tr -d ' \t(' | sort -u \
    | sed 's/.*/int &(void) { return 34; }/' >"$dir/stub.c"
  mkdir -p "$root/lib/stubs"
  local rc=0
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$dir/stub.c" || rc=$?
  [ "$rc" -ne 0 ] || note "libcuda stub: $(wc -l <"$dir/stub.c") driver functions (soname libcuda.so.1)"
  rm -rf "$dir"
  return "$rc"
}

# What the build does, in small: nvcc compiles a kernel that uses fp16, bf16 and cccl to PTX and to
# an object for the target GPU, and a program links every library cudarc and candle-kernels link.
cuda_check_compiles() {
  local root="$1" dir rc=0
  dir="$(mktemp -d)"
  cat >"$dir/check.cu" <<'CU'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/type_traits>
#include <stdint.h>
extern "C" __global__ void check(const __half *a, __nv_bfloat16 *b, uint32_t n) {
  static_assert(cuda::std::is_same<uint32_t, unsigned int>::value, "uint32_t");
  uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) b[i] = __float2bfloat16(__half2float(a[i]));
}
CU
  cat >"$dir/main.c" <<'C'
#include <cuda.h>
#include <cuda_runtime_api.h>
int cublasCreate_v2(void **); int cublasLtCreate(void **); int curandCreateGenerator(void **, int);
int nvrtcVersion(int *, int *);
int main(void) {
  int a, b; void *h;
  return cuInit(0) + cudaGetDeviceCount(&a) + cublasCreate_v2(&h) + cublasLtCreate(&h)
    + curandCreateGenerator(&h, 100) + nvrtcVersion(&a, &b);
}
C
  local arch="compute_${CUDA_COMPUTE_CAP:-90}"
  {
    "$root/bin/nvcc" -std=c++17 --expt-relaxed-constexpr -arch="$arch" --ptx -o "$dir/check.ptx" "$dir/check.cu" \
      && "$root/bin/nvcc" -std=c++17 -arch=sm_"${CUDA_COMPUTE_CAP:-90}" -Xcompiler -fPIC -c -o "$dir/check.o" "$dir/check.cu" \
      && gcc -I "$root/include" -o "$dir/main" "$dir/main.c" "$dir/check.o" -L "$root/lib" -L "$root/lib/stubs" \
        -lcuda -lcudart -lcublas -lcublasLt -lcurand -lnvrtc -lstdc++
  } || rc=$?
  rm -rf "$dir"
  [ "$rc" -ne 0 ] || note "checked: nvcc compiles a fp16/bf16/cccl kernel for $arch; the CUDA libraries link"
  return "$rc"
}

# The variables the build reads. Nothing goes on PATH or LD_LIBRARY_PATH: NVCC names the compiler
# (candle-kernels' cudaforge) and CUDARC_CUDA_VERSION its version (cudarc, which would otherwise
# run `nvcc` from PATH); CUDA_HOME and CUDA_ROOT are where cudarc's link step looks (lib, lib/stubs).
# cudaforge runs nvcc on half the cores unless CUDAFORGE_THREADS says otherwise: all of them here,
# as nothing else builds while candle-kernels' 26 kernels compile (candle-core waits for them).
cuda_export() {
  local major="${CUDA_WHEELS_VERSION%%.*}" minor
  minor="${CUDA_WHEELS_VERSION#*.}"
  minor="${minor%%.*}"
  export CUDA_HOME="$TIDELOCK_CUDA_ROOT"
  export CUDA_ROOT="$TIDELOCK_CUDA_ROOT"
  export NVCC="$TIDELOCK_CUDA_ROOT/bin/nvcc"
  export CUDARC_CUDA_VERSION="${major}0${minor}0"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
  export CUDAFORGE_THREADS
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced.
  if (cuda_install) >&2; then
    cuda_export
  else
    return 1
  fi
else
  (cuda_install) >&2
  cuda_export
  if [ "$#" -eq 0 ]; then
    for var in CUDA_HOME CUDA_ROOT NVCC CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP CUDAFORGE_THREADS; do
      printf 'export %s=%q\n' "$var" "${!var}"
    done
  else
    exec "$@"
  fi
fi
