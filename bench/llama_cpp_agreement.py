#!/usr/bin/env python3
"""Teacher-forced agreement of Tidelock's worker runtime with llama.cpp on the same GGUF.

For each fixed English text in bench/texts/ (each >= 512 tokens), llama.cpp tokenizes it and
scores every position (logits_all=True); the worker's runtime scores the same token ids
(worker/examples/teacher_forced.rs). Prints, per text and overall, how often the two engines'
next-token argmax agree, and how far their logits are apart. The last line is the noise floor:
llama.cpp against itself with the other KV cache precision (f16 vs f32), which moves its logits
about as far as the worker's are from them.

Needs llama-cpp-python (compiles from source, ~20 min on 2 cores; not part of CI):
    python3 -m venv ~/.cache/tidelock/bench-venv
    ~/.cache/tidelock/bench-venv/bin/pip install llama-cpp-python numpy
Where the native build dies with "Illegal instruction" (seen on a Xeon that reports AMX, whose
tile instructions the machine did not run), build it for AVX-512 without AMX:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        ~/.cache/tidelock/bench-venv/bin/pip install --no-cache-dir --force-reinstall llama-cpp-python
Run:
    [KV=f32|f16] [WEIGHTS=f32|quantized] \
        ~/.cache/tidelock/bench-venv/bin/python bench/llama_cpp_agreement.py [MODEL.gguf]
"""

import json
import os
import pathlib
import subprocess
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = pathlib.Path.home() / ".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 0.97
KEEP = 64  # logits per row compared by value


def llama_cpp_scores(model, kv, docs_tokens):
    """llama.cpp's logits for every position of every document, with a KV cache of type kv."""
    ref = Llama(model_path=str(model), logits_all=True, n_ctx=4096, n_batch=512,
                n_threads=os.cpu_count() or 1, verbose=False, type_k=kv, type_v=kv)
    out = []
    for tokens in docs_tokens:
        ref.reset()
        ref.eval(tokens)
        out.append(np.array(ref.scores[: len(tokens)], dtype=np.float32))
    return out


def main() -> int:
    model = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TIDELOCK_MODEL", DEFAULT_MODEL))
    texts = sorted((ROOT / "bench/texts").glob("*.txt"))
    threads = os.cpu_count() or 1
    kv_type = os.environ.get("KV", "f32")
    # GGML type ids: 0 = f32, 1 = f16 (llama.cpp's default KV cache type).
    kv = {"f32": 0, "f16": 1}[kv_type]
    ref = Llama(model_path=str(model), logits_all=True, n_ctx=4096, n_batch=512,
                n_threads=threads, verbose=False, type_k=kv, type_v=kv)
    print(f"llama.cpp {llama_cpp.__version__}, KV cache {kv_type}", file=sys.stderr)
    docs = []
    for path in texts:
        tokens = ref.tokenize(path.read_text().encode(), add_bos=False, special=False)
        assert len(tokens) >= 512, f"{path.name}: only {len(tokens)} tokens"
        ref.reset()
        ref.eval(tokens)
        scores = np.array(ref.scores[: len(tokens)], dtype=np.float32)
        docs.append((path.name, tokens, scores))

    print("building and running the worker runtime...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tidelock-worker",
                    "--example", "teacher_forced"], cwd=ROOT, check=True)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    stdin = "".join(json.dumps({"tokens": t}) + "\n" for _, t, _ in docs)
    weights = os.environ.get("WEIGHTS", "f32")
    # f32: dequantized weights, f32 GEMMs (the runtime's default); quantized: candle's quantized
    # matmul. (Emulating ggml's 8-bit activation rounding op by op was tried and agreed less: see
    # worker/README.md.)
    extra = {"f32": [], "quantized": ["--quantized"]}[weights]
    run = subprocess.run([str(target / "release/examples/teacher_forced"), str(model),
                          "--logits", str(KEEP), *extra], input=stdin, capture_output=True,
                         text=True, check=True)
    print(run.stderr.strip(), file=sys.stderr)
    ours = [json.loads(line) for line in run.stdout.splitlines()]

    total = agree = 0
    print(f"{'text':<24}{'tokens':>8}{'agree':>8}{'rate':>8}{'max|dlogit|':>13}{'mean|dlogit|':>14}")
    for (name, tokens, scores), mine in zip(docs, ours):
        a = np.array(mine["argmax"])
        b = scores.argmax(axis=1)
        same = int((a == b).sum())
        diff = np.abs(np.array(mine["logits"], dtype=np.float32) - scores[:, :KEEP])
        print(f"{name:<24}{len(tokens):>8}{same:>8}{same / len(tokens):>8.4f}"
              f"{diff.max():>13.4f}{diff.mean():>14.5f}")
        total += len(tokens)
        agree += same
    rate = agree / total
    print(f"{'all':<24}{total:>8}{agree:>8}{rate:>8.4f}   goal >= {GOAL}: {'met' if rate >= GOAL else 'NOT met'}")

    # The noise floor: llama.cpp against itself with the other KV cache precision. Its rounding of
    # activations to 8 bits makes its output chaotic at the level of f32 rounding differences.
    other_type = {"f32": "f16", "f16": "f32"}[kv_type]
    other = llama_cpp_scores(model, {"f32": 0, "f16": 1}[other_type], [t for _, t, _ in docs])
    same = sum(int((s.argmax(axis=1) == o.argmax(axis=1)).sum()) for (_, _, s), o in zip(docs, other))
    diff = np.concatenate([np.abs(s[:, :KEEP] - o[:, :KEEP]) for (_, _, s), o in zip(docs, other)])
    print(f"{'llama.cpp KV ' + other_type:<24}{total:>8}{same:>8}{same / total:>8.4f}"
          f"{diff.max():>13.4f}{diff.mean():>14.5f}   (llama.cpp against itself)")
    return 0 if rate >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
