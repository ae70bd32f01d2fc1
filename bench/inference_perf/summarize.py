#!/usr/bin/env python3
"""Print the key numbers of an inference-perf report folder, one line per stage.

  summarize.py REPORT_DIR

Reads stage_N_lifecycle_metrics.json and summary_lifecycle_metrics.json (written by
inference-perf's request_lifecycle report). Times in ms; standard library only.
"""

import glob
import json
import os
import re
import sys


def pct(d: dict, key: str, name: str) -> float:
    v = (d.get("latency", {}).get(key) or {}).get(name)
    return float("nan") if v is None else v * 1000.0


def row(label: str, r: dict) -> str:
    load = r.get("load_summary", {})
    ok = r.get("successes", {})
    fail = r.get("failures", {})
    thr = ok.get("throughput", {})
    pt = ok.get("prompt_tokens", {})
    cached = pt.get("cached") or 0.0
    total = pt.get("total") or 0.0
    sched = (load.get("schedule_delay") or {}).get("p90")
    return (
        f"{label:>7} {load.get('requested_rate') or float('nan'):>6.1f} {load.get('achieved_rate') or thr.get('requests_per_sec', 0):>6.2f}"
        f" {ok.get('count', 0):>5} {fail.get('count', 0):>4}"
        f" {pct(ok, 'time_to_first_token', 'median'):>8.1f} {pct(ok, 'time_to_first_token', 'p90'):>8.1f}"
        f" {pct(ok, 'time_per_output_token', 'median'):>7.1f} {pct(ok, 'time_per_output_token', 'p90'):>7.1f}"
        f" {pct(ok, 'inter_token_latency', 'median'):>7.1f}"
        f" {pct(ok, 'request_latency', 'median'):>8.0f} {pct(ok, 'request_latency', 'p90'):>8.0f}"
        f" {thr.get('output_tokens_per_sec', 0):>7.1f} {thr.get('total_tokens_per_sec', 0):>7.0f}"
        f" {(100.0 * cached / total) if total else 0:>6.1f}"
        f" {(sched or 0) * 1000:>7.0f}"
    )


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    stages = sorted(
        glob.glob(os.path.join(out, "stage_*_lifecycle_metrics.json")),
        key=lambda p: int(re.search(r"stage_(\d+)_", p).group(1)),
    )
    summary = os.path.join(out, "summary_lifecycle_metrics.json")
    if not stages and not os.path.exists(summary):
        sys.exit(f"no *_lifecycle_metrics.json in {out}")
    print(
        f"{'stage':>7} {'rate':>6} {'got':>6} {'ok':>5} {'fail':>4}"
        f" {'TTFT50':>8} {'TTFT90':>8} {'TPOT50':>7} {'TPOT90':>7} {'ITL50':>7}"
        f" {'E2E50':>8} {'E2E90':>8} {'out/s':>7} {'tok/s':>7} {'cache%':>6} {'sched90':>7}"
    )
    for path in stages:
        n = re.search(r"stage_(\d+)_", path).group(1)
        with open(path) as f:
            print(row(n, json.load(f)))
    if os.path.exists(summary):
        with open(summary) as f:
            print(row("all", json.load(f)))
    print(
        "rate: requested QPS, got: achieved QPS, times in ms, out/s and tok/s: output and"
        " total tokens per second, cache%: server-reported cached prompt tokens,"
        " sched90: p90 client scheduling delay (high = the client fell behind)"
    )


if __name__ == "__main__":
    main()
