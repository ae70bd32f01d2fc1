#!/usr/bin/env bash
# The GPU check of issue #20, one prepared script bounded to a few minutes: the `candle` backend
# on cuda:0 against the `cpu` backend (exactness), then its speed on the GPU (decode tokens/s at
# batch 1/32/128, prefill tokens/s at 4K, warm vs cold TTFT, decode attention's KV read bandwidth
# as a fraction of a device copy's, all measured in the same run: worker/examples/bench_device.rs).
#
#   bench/gpu/check.sh                  # on a GPU machine with Rust: builds with --features cuda
#                                       # (scripts/cuda.sh installs a toolkit where nvcc is
#                                       # missing), runs the candle tests on cuda:0, then the bench
#   bench/gpu/check.sh --prepare DIR    # on a machine without a GPU (this repo's CI machine):
#                                       # builds the same binaries and copies them, stripped, to DIR
#   bench/gpu/check.sh --prebuilt DIR   # on a GPU machine without Rust: runs DIR's binaries
#
# The real model is used where it is (TIDELOCK_MODEL, or the cache ./scripts/test fills); where it
# is not (a GPU machine that cannot fetch it), a model of its shape with seeded random weights
# stands in (bench_device --synthetic: the timings depend on the shape only), and the exactness
# checks are the tiny model's shard test and bench_device --exact on that stand-in.
#
# Environment: CUDA_COMPUTE_CAP (default 90, H100/H200), CHECK_DEVICE (default cuda:0), OUT (a
# folder for the log, default bench/gpu/out), CHECK_QUICK=1 (small sizes, for a dry run on the
# host with CHECK_DEVICE=cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=build
dir=""
case "${1:-}" in
  --prepare | --prebuilt)
    mode="${1#--}"
    dir="${2:?$1 needs a folder}"
    ;;
  "") ;;
  *)
    echo "usage: $0 [--prepare DIR | --prebuilt DIR]" >&2
    exit 2
    ;;
esac

device="${CHECK_DEVICE:-cuda:0}"
out="${OUT:-bench/gpu/out}"
mkdir -p "$out"
log="$out/gpu-check.log"
model="${TIDELOCK_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
features=(--features cuda)
[ "$device" != cpu ] || features=()

step() { printf '\n==> %s\n' "$*" | tee -a "$log"; }
run() { "$@" 2>&1 | tee -a "$log"; }

bench_args=(--device "$device" --exact)
if [ "${CHECK_QUICK:-}" = 1 ]; then
  bench_args+=(--context 256 --batches 1,8 --steps 4 --prefill 1024)
fi

# The test binaries and the bench, built with the CUDA feature; prints their paths.
build() {
  local cargo=(cargo)
  if [ "${#features[@]}" -gt 0 ] && ! command -v nvcc >/dev/null; then
    cargo=(scripts/cuda.sh cargo)
  fi
  "${cargo[@]}" build --release -p tidelock-worker "${features[@]}" --example bench_device >&2
  "${cargo[@]}" test --release -p tidelock-worker "${features[@]}" --test backends --test sharded \
    --test real_model --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])'
  echo "bench_device target/release/examples/bench_device"
}

if [ "$mode" = prepare ]; then
  mkdir -p "$dir"
  build | while read -r name path; do
    strip -o "$dir/$name" "$path"
    echo "$dir/$name ($(du -h "$dir/$name" | cut -f1))"
  done
  exit 0
fi

: >"$log"
step "machine"
run bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; nproc; date -u'

declare -A bin
if [ "$mode" = build ]; then
  step "build (${features[*]:-no CUDA feature: host only}, release)"
  while read -r name path; do bin[$name]="$path"; done < <(build)
else
  for name in backends sharded real_model bench_device; do bin[$name]="$dir/$name"; done
  # The CUDA libraries the binaries link (CUDA 13: libcublas.so.13 ...), from the machine's
  # toolkit or its Python packages' wheels.
  libs="$(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
dirs = set()
for r in roots:
    for pattern in ("**/libcublas.so.13*", "**/libcurand.so.10*", "**/libnvrtc.so.13*", "**/libcudart.so.13*"):
        for f in glob.glob(os.path.join(r, pattern), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)"
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  step "CUDA libraries: ${libs:-none found beside the driver}"
fi

status=0
export TIDELOCK_TEST_DEVICE="$device"
step "exactness: the candle backend on $device against the cpu backend"
if [ -f "$model" ]; then
  export TIDELOCK_MODEL="$model"
  run timeout 600 "${bin[backends]}" --test-threads 1 --nocapture || status=1
  run timeout 300 "${bin[real_model]}" candle --nocapture || status=1
else
  step "no model at $model: the tiny model's test and bench_device --exact on a stand-in"
fi
run timeout 300 "${bin[sharded]}" candle_backend --nocapture || status=1

step "bench_device on $device (f16 weights, f16 KV)"
if [ -f "$model" ]; then
  bench_args+=(--model "$model")
else
  bench_args+=(--synthetic)
fi
run timeout 600 "${bin[bench_device]}" "${bench_args[@]}" || status=1

step "done: $([ "$status" = 0 ] && echo passed || echo FAILED) (log: $log)"
exit "$status"
