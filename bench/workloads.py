#!/usr/bin/env python3
"""Generates request traces (Mooncake format) for overload scenarios (issue #22).

`tidelock bench compare trace --trace FILE` replays them. Each trace is a set of conversations:
a prompt is an optional shared prefix (one of a few "system prompt" families, drawn Zipf-like),
the conversation's own context (a document: long-tailed, lognormal), then, turn after turn, the
previous prompt plus the previous answer plus a new message. So the reusable tokens are the
families' prefixes and each conversation's earlier turns, as in a real chat or agent trace.

The arrival rate is set from the offered work, not by hand: `--load 1.5` means the prompt tokens
left to compute with an unlimited prefix cache (the trace's own reuse, as `bench trace` counts
it) arrive at 1.5x `--capacity-tps`, the cluster's prefill tokens per second. A cache smaller
than the working set, or a router that places requests away from their prefix, adds work on top.
Shapes (`--shape`):

- `steady`: conversations start as a Poisson process;
- `bursts`: the same mean rate, arriving in bursts: `--burst-secs` at `--burst-factor` times
  the mean, then quiet until the cycle's mean is met;
- `ramp`: the rate rises linearly from 0 to twice the mean over the run.

Prompt sizes: `--doc-mean` and `--doc-max` (tokens) set the document's lognormal
(`--doc-sigma`), so `--doc-mean 12000 --doc-max 120000` gives long prompts with a heavy tail.
Conversations have a geometric number of turns (`--turns-mean`), think times exponential
(`--think-mean`, seconds). Output lengths are short by default: the scenarios stress prefill.

Prints what it made (requests, prompt tokens, the trace's unlimited-cache hit rate, the offered
load over the arrival span) to stderr; writes the trace to `--out`. Deterministic for a seed.
No third-party modules.
"""

import argparse
import json
import math
import random
import sys

BLOCK = 512  # tokens per hash id, the Mooncake format's


def lognormal(rng, mean, sigma, lo, hi):
    """A lognormal draw with the given mean, clamped to [lo, hi]."""
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(hi, max(lo, rng.lognormvariate(mu, sigma))))


def blocks(tokens):
    return max(1, math.ceil(tokens / BLOCK))


class Ids:
    def __init__(self):
        self.next = 0

    def take(self, n):
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def conversations(args, rng, ids):
    """Each conversation's requests, as (offset from its start in seconds, request) pairs, with
    timestamps filled in later."""
    families = [
        ids.take(blocks(rng.randint(args.family_min, args.family_max)))
        for _ in range(args.families)
    ]
    # Zipf-like popularity over the families (1/rank).
    weights = [1.0 / (r + 1) for r in range(args.families)]
    convs = []
    for _ in range(args.conversations):
        prefix = []
        if args.families and rng.random() < args.family_share:
            prefix = list(rng.choices(families, weights)[0])
        doc = ids.take(blocks(lognormal(rng, args.doc_mean, args.doc_sigma, 1, args.doc_max)))
        history = prefix + doc
        turns = 1
        while rng.random() > 1.0 / args.turns_mean:
            turns += 1
        at, reqs = 0.0, []
        for t in range(turns):
            if t > 0:
                answer = ids.take(blocks(previous_output))
                message = ids.take(blocks(lognormal(rng, args.message_mean, 1.0, 16, 8 * args.message_mean)))
                history = history + answer + message
                at += rng.expovariate(1.0 / args.think_mean)
            if len(history) * BLOCK > args.max_prompt:
                break
            input_length = len(history) * BLOCK - rng.randrange(BLOCK)
            previous_output = max(1, int(rng.expovariate(1.0 / args.output_mean)))
            reqs.append(
                (
                    at,
                    {
                        "input_length": input_length,
                        "output_length": previous_output,
                        "hash_ids": list(history),
                    },
                )
            )
        convs.append(reqs)
    return convs


def starts(args, rng, n, span):
    """Start times of n conversations over `span` seconds, by shape."""
    if args.shape == "steady":
        gaps = [rng.expovariate(1.0) for _ in range(n)]
        total = sum(gaps)
        out, t = [], 0.0
        for g in gaps:
            t += g * span / total
            out.append(t)
        return out
    if args.shape == "ramp":
        # Density proportional to t: inverse CDF sqrt(u).
        return sorted(span * math.sqrt(rng.random()) for _ in range(n))
    # bursts: each cycle is a burst of `burst_secs` at `burst_factor` x the mean rate, then quiet.
    cycle = args.burst_secs * args.burst_factor
    out = []
    for _ in range(n):
        t = rng.random() * span
        c = math.floor(t / cycle)
        out.append(c * cycle + (t - c * cycle) / args.burst_factor)
    return sorted(out)


def ideal_work(trace):
    """Prompt tokens left to compute with an unlimited cache, and the hit rate (leading full
    blocks seen before, as `tidelock bench trace` counts)."""
    seen = set()
    hit = total = 0
    for r in trace:
        ids = r["hash_ids"]
        full = r["input_length"] // BLOCK
        shared = 0
        while shared < full and tuple(ids[: shared + 1]) in seen:
            shared += 1
        hit += shared * BLOCK
        total += r["input_length"]
        for n in range(1, len(ids) + 1):
            seen.add(tuple(ids[:n]))
    return total - hit, total, hit / max(total, 1)


def build(args, span):
    rng = random.Random(args.seed)
    ids = Ids()
    convs = conversations(args, rng, ids)
    t0 = starts(args, rng, len(convs), span)
    trace = []
    for start, reqs in zip(t0, convs):
        for at, r in reqs:
            r = dict(r)
            r["timestamp"] = int(1000 * (start + at))
            trace.append(r)
    # Conversations still going at the end of the window are cut there: the load is the
    # window's.
    trace = [r for r in trace if r["timestamp"] <= 1000 * span]
    trace.sort(key=lambda r: r["timestamp"])
    return [
        {"timestamp": r["timestamp"], "input_length": r["input_length"],
         "output_length": r["output_length"], "hash_ids": r["hash_ids"]}
        for r in trace
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--load", type=float, default=1.0, help="offered work over capacity")
    p.add_argument("--capacity-tps", type=float, required=True,
                   help="the cluster's prefill tokens per second")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds over which conversations start")
    p.add_argument("--shape", choices=["steady", "bursts", "ramp"], default="steady")
    p.add_argument("--burst-secs", type=float, default=5.0)
    p.add_argument("--burst-factor", type=float, default=3.0)
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--family-share", type=float, default=0.5)
    p.add_argument("--family-min", type=int, default=1024)
    p.add_argument("--family-max", type=int, default=4096)
    p.add_argument("--doc-mean", type=float, default=6000)
    p.add_argument("--doc-sigma", type=float, default=1.0)
    p.add_argument("--doc-max", type=int, default=60000)
    p.add_argument("--max-prompt", type=int, default=126000)
    p.add_argument("--turns-mean", type=float, default=2.0)
    p.add_argument("--think-mean", type=float, default=10.0)
    p.add_argument("--message-mean", type=int, default=300)
    p.add_argument("--output-mean", type=float, default=64)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.load <= 0 or args.capacity_tps <= 0 or args.duration <= 0:
        sys.exit("--load, --capacity-tps and --duration must be above 0")
    # The number of conversations that offers the load: start from a guess, then scale by the
    # work measured (the trace's own reuse depends on how many conversations share families).
    args.conversations = 100
    for _ in range(4):
        trace = build(args, args.duration)
        work, _, _ = ideal_work(trace)
        want = args.load * args.capacity_tps * args.duration
        args.conversations = max(1, round(args.conversations * want / max(work, 1)))
    trace = build(args, args.duration)
    work, total, hit = ideal_work(trace)
    span = args.duration
    unique = len({h for r in trace for h in r["hash_ids"]}) * BLOCK
    with open(args.out, "w") as f:
        for r in trace:
            f.write(json.dumps(r) + "\n")
    lengths = sorted(r["input_length"] for r in trace)
    print(
        f"{args.out}: {len(trace)} requests in {args.conversations} conversations over {span:.0f} s "
        f"({args.shape}); prompts mean {total / len(trace):,.0f}, p50 {lengths[len(lengths) // 2]:,}, "
        f"max {lengths[-1]:,} tokens; unlimited-cache hit rate {hit:.3f}; "
        f"offered {work / span:,.0f} uncached tokens/s = {work / span / args.capacity_tps:.2f}x "
        f"capacity; {unique:,} unique tokens",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
