#!/usr/bin/env python3
"""Calibrates the router's TTFT model against a real worker.

The router predicts a worker's time to first token as (queued prefill tokens + uncached prompt
tokens) / prefill_speed, with prefill_speed the moving average each worker measures over its
engine steps and reports in GET /v1/load (`prefill_tokens_per_second`). This script starts one
worker on the real model, sends prompts of growing length (fresh token ids each time, so nothing
is cached, one at a time, so nothing is queued), measures TTFT on the client (streaming, first
content chunk), reads the worker's reported speed after each, and prints measured vs predicted.

    python3 bench/ttft_model.py [--worker-bin target/release/tidelock-worker] [--model GGUF]

Standard library only. The worker is stopped at the end, also on errors.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

DEFAULT_MODEL = os.path.expanduser("~/.cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def ttft(base, tokens):
    """Seconds from sending a streaming completion to its first data line."""
    body = json.dumps({"model": MODEL, "prompt": tokens, "max_tokens": 1, "stream": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                first = time.perf_counter() - start
                r.read()
                return first
    raise RuntimeError("no data line")


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--worker-bin", default="target/release/tidelock-worker")
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--lengths", default="64,128,256,512,1024,2048,4096")
args = p.parse_args()
MODEL = os.path.splitext(os.path.basename(args.model))[0]
port = free_port()
base = f"http://127.0.0.1:{port}"
worker = subprocess.Popen(
    [args.worker_bin, "--model", args.model, "--listen", f"127.0.0.1:{port}", "--kv-cache", "1GiB",
     "--no-cluster-auth"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
)
try:
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200:
                break
        except OSError:
            pass
        if worker.poll() is not None or time.time() > deadline:
            sys.exit("the worker did not become ready")
        time.sleep(0.2)
    rng = random.Random(7)
    fresh = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731
    ttft(base, fresh(256))  # warm-up, and a first speed measurement
    print(f"{'prompt':>7} {'measured ms':>12} {'reported tok/s':>15} {'predicted ms':>13} {'pred/meas':>10}")
    for n in [int(x) for x in args.lengths.split(",")]:
        speed = get(f"{base}/v1/load")["prefill_tokens_per_second"]
        measured = ttft(base, fresh(n))
        predicted = n / speed
        print(f"{n:>7} {measured * 1e3:>12.1f} {speed:>15.0f} {predicted * 1e3:>13.1f} {predicted / measured:>10.2f}")
finally:
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
