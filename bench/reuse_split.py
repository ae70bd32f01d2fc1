#!/usr/bin/env python3
"""Where a replay's prefix reuse went: for each request of a trace that could reuse leading
blocks an earlier request computed, whether that earlier request had its first token (its prefix
computed) when this one was sent, and how much of the reusable prefix the run found cached.

    python3 bench/reuse_split.py TRACE.jsonl RUN.json [RUN.json ...]

RUN.json is what `tidelock bench trace --out` (or each target of `bench compare`) writes. Under
overload, requests sent before their prefix is computed are the ones a router that learns about
blocks only from the workers' events cannot place well (issue #22). No third-party modules.
"""

import json
import sys

BLOCK = 512  # tokens per hash id (the Mooncake format's)


def split(trace, run):
    outcomes = {r["index"]: r for r in run["requests"]}
    computed_at = {
        i: r["sent_at_s"] + r["ttft_s"] for i, r in outcomes.items() if r.get("ttft_s") is not None
    }
    first = {}  # prefix -> index of the first request whose prompt had it
    out = {"ready": [0, 0, 0], "not ready": [0, 0, 0]}
    for i, t in enumerate(trace):
        ids, full = t["hash_ids"], t["input_length"] // BLOCK
        k, source = 0, None
        while k < full and tuple(ids[: k + 1]) in first:
            source = first[tuple(ids[: k + 1])]
            k += 1
        r = outcomes.get(i, {})
        if k > 0:
            ready = source in computed_at and computed_at[source] <= r.get("sent_at_s", 0)
            row = out["ready" if ready else "not ready"]
            row[0] += 1
            row[1] += k * BLOCK
            row[2] += r.get("cached_tokens", 0)
        for n in range(1, len(ids) + 1):
            first.setdefault(tuple(ids[:n]), i)
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    trace = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    print("| run | hit rate | prefix computed when sent: requests, reusable tokens, found cached | not yet computed: requests, reusable tokens, found cached |")
    print("|---|---|---|---|")
    for path in sys.argv[2:]:
        run = json.load(open(path))
        reqs = run["requests"]
        prompt = sum(r.get("prompt_tokens", 0) for r in reqs)
        cached = sum(r.get("cached_tokens", 0) for r in reqs)
        cells, parts = [], split(trace, run)
        for key in ("ready", "not ready"):
            n, reusable, found = parts[key]
            cells.append(f"{n}, {reusable:,}, {found / max(reusable, 1):.3f}")
        print(f"| {path} | {cached / max(prompt, 1):.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
