#!/usr/bin/env python3
"""The worker's engine against llama.cpp on the same GGUF and thread count, side by side, one run.

Measures prefill tokens/s on a 2,048-token prompt, decode tokens/s at batch 1, aggregate decode
tokens/s at batch 8, and TTFT of a 4,096-token prompt whose first 4,032 tokens are cached vs cold
(ours only: that is the prefix cache). Prints a table with our/llama.cpp ratios and the goals of
issue #3.

llama.cpp side: llama-cpp-python (see bench/llama_cpp_agreement.py for installing it). Batch-8
decode uses eight sequences in one llama_batch through the low-level API, as llama.cpp's own
batched-bench does.

Run: ~/.cache/tidelock/bench-venv/bin/python bench/engine_vs_llama_cpp.py [MODEL.gguf]
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = pathlib.Path.home() / ".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def tokens(n, seed):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(17, 20_017, size=n)]


def llama_cpp_side(model, threads):
    ctx_params = dict(n_ctx=8192, n_batch=2048, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
    llm = llama_cpp.Llama(model_path=str(model), **ctx_params)
    prompt = tokens(2048, 1)
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = 2048 / (time.perf_counter() - t)

    # Decode at batch 1: 128 single-token evals after a short prompt.
    llm.reset()
    llm.eval(tokens(32, 2))
    t = time.perf_counter()
    for tok in tokens(128, 3):
        llm.eval([tok])
    decode1 = 128 / (time.perf_counter() - t)

    # Decode at batch 8 with the low-level API: 8 sequences, one token each per decode call.
    # A context of its own with room for eight sequences.
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 4096
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = 8
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    assert ctx, "llama.cpp could not create a context for 8 sequences"
    batch = llama_cpp.llama_batch_init(512, 0, 8)
    try:
        def submit(entries):
            batch.n_tokens = len(entries)
            for i, (tok, pos, seq, logits) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            assert llama_cpp.llama_decode(ctx, batch) == 0
        for s in range(8):
            p = tokens(32, 10 + s)
            submit([(tok, i, s, i == 31) for i, tok in enumerate(p)])
        steps = 128
        t = time.perf_counter()
        for step in range(steps):
            submit([(20 + step, 32 + step, s, True) for s in range(8)])
        decode8 = 8 * steps / (time.perf_counter() - t)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return dict(prefill_tokens_per_s=prefill, decode_tokens_per_s_batch1=decode1,
                decode_tokens_per_s_batch8=decode8)


def main():
    model = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TIDELOCK_MODEL", DEFAULT_MODEL))
    threads = os.cpu_count() or 1
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tidelock-worker",
                    "--example", "bench_engine"], cwd=ROOT, check=True)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    ours = json.loads(subprocess.run([str(target / "release/examples/bench_engine"), str(model)],
                                     capture_output=True, text=True, check=True).stdout)
    print("tidelock:", json.dumps(ours), file=sys.stderr)
    ref = llama_cpp_side(model, threads)
    print(f"model {model.name}, {threads} threads, llama.cpp {llama_cpp.__version__}")
    print(f"{'measure':<34}{'tidelock':>12}{'llama.cpp':>12}{'ratio':>8}  goal")
    for key, goal in [("prefill_tokens_per_s", 0.7), ("decode_tokens_per_s_batch1", 0.7),
                      ("decode_tokens_per_s_batch8", 1.0)]:
        r = ours[key] / ref[key]
        print(f"{key:<34}{ours[key]:>12.1f}{ref[key]:>12.1f}{r:>8.2f}  >= {goal}: {'met' if r >= goal else 'NOT met'}")
    r = ours["ttft_cached_s"] / ours["ttft_cold_s"]
    print(f"{'ttft 4096 (4032 cached) / cold':<34}{ours['ttft_cached_s']:>11.3f}s{ours['ttft_cold_s']:>11.3f}s{r:>8.3f}  <= 0.05: {'met' if r <= 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
