#!/usr/bin/env python3
"""Router overhead with 16 simulated workers: ours vs sglang-router and vllm-router, one run.

What it measures
    The latency a router adds to a request and the requests/s it sustains, when it fronts the same
    simulated workers as its peers. Each router is measured in the same invocation, so every
    figure printed is a ratio against peers that ran on the same machine, minutes apart.

Method
    1. Start N simulated workers (`tidelock-worker --engine sim`, default 16) on free loopback
       ports and poll `/readyz` on each until ready (with a deadline). The simulator's timing
       model is left at its defaults, which are all zero (`--sim-step-ms 0`,
       `--sim-prefill-tokens-per-s 0`, `--sim-decode-ms-per-sequence 0`, passed explicitly): a
       request costs only the worker's HTTP, tokenizer, scheduler and detokenizer work, so what a
       router adds is not hidden under model time.
    2. For each router and policy in turn (ours if `--ours` supports `--worker`; sglang-router
       with cache_aware and round_robin; vllm-router with round_robin and cache_aware, its
       default): the router is started fronting all the workers and polled until it reports
       every worker healthy (`/workers` for the peers, `/readyz` for ours). Then `--rounds`
       rounds, each of one load sent *direct* (the same client straight to the workers,
       round-robin by request index) and the same load sent through the router, alternating
       which goes first. Each load is
         - a warm-up (not recorded; it also checks that answers come back 200),
         - a fixed load: `--requests` short non-streaming `/v1/completions` (max_tokens 1..4,
           short prompts from a fixed list) at a fixed concurrency (`--concurrency`): per-request
           latency percentiles and requests/s,
         - an idle phase: `--idle-requests` at concurrency 1: the hop's own latency, without
           the queueing that CPU contention adds at concurrency 32,
         - a closed-loop max-throughput phase: `--max-requests` of the same requests at a higher
           concurrency (`--max-concurrency`): requests/s, and the router process's CPU time
           (user + system, all threads, from /proc) per request answered.
       Latency is the client's wall time from sending a request to having read the whole body.
       Each router has its own direct baseline from the same rounds (paired, pooled over the
       rounds), so slow drift of the machine affects both alike. Added latency at a percentile =
       router percentile - direct percentile.
    3. The router is stopped with SIGTERM (SIGKILL after a grace period), and its ports are checked
       to be free again. All workers are killed at the end, also on Ctrl-C, SIGTERM or an error:
       every child runs in its own process group, and only those groups are signalled.
    4. One table (router, policy, p50/p99 latency, p50/p99 added latency, requests/s), the ratios
       ours vs each peer with the goals (lower p99 added latency than each peer; >= 1.5x each
       peer's max-throughput requests/s), and a JSON file (`--out`).

    Every request carries `Authorization: Bearer <key>` (ours checks it against the tenants file
    the script writes, `{"bench": {"key_hashes": [blake3 hex of the key], "cache_salt": <random hex>}}`; peers and workers
    ignore it), so all targets receive the same bytes.

Caveats
    Client, router and workers share this machine's cores, so requests/s is the whole system's and
    the client's own cost is in every figure alike; compare ratios, not absolute numbers. No
    router can exceed the direct requests/s here, so the ratio table also prints that ceiling
    (direct / peer); where it is below 1.5 the 1.5x goal cannot show in requests/s, and the
    router's CPU time per request (ratio <= 0.67 for 1.5x the router-bound throughput) is the
    measure that can. On a busy machine p99 differences of a few ms are noise: run --rounds 3+
    and compare runs.

    The peers are started with HF_ENDPOINT pointing at a closed loopback port and
    HF_HUB_OFFLINE=1: at registration sglang-router tries to fetch a tokenizer for the workers'
    model name, and that attempt stays on this machine (it fails, which sglang-router only logs
    as a warning). vllm-router's cache_aware policy tokenizes every request through the workers
    (POST /v1/completions/render, then POST /tokenize where that answers 404, on each worker), so
    its figures include those calls.

Run (see bench/README.md for the venv):
    ~/.cache/tidelock/router-bench-venv/bin/python bench/router_overhead.py \\
        --worker-bin target/debug/tidelock-worker [--ours target/debug/tidelock-router]
"""

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf"
HOST = "127.0.0.1"
PEER_POLICIES = ["sglang:cache_aware", "sglang:round_robin", "vllm:round_robin", "vllm:cache_aware"]
# Short prompts, some sharing prefixes (so cache_aware has something to match), cycled by index.
PROMPTS = [
    f"{head} {tail}"
    for head in ("Hello there.", "Tell me about", "Write one word on", "Summarise")
    for tail in ("the sea", "mountains", "rivers", "a city at night", "tea", "trains", "rain",
                 "a small dog")
]
# Peers must not reach outside the machine: their hub look-ups go to a closed loopback port.
PEER_ENV = {"HF_ENDPOINT": f"http://{HOST}:9", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# Processes and ports


class Children:
    """Every process the script starts, each in its own session (process group), with its log."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        full_env = dict(os.environ, **(env or {}))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 6) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line[:300] for line in text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, grace_s: float = 10.0) -> dict:
        """SIGTERM to the child's process group, SIGKILL after `grace_s`. Returns how it went."""
        out = {"signal": "SIGTERM", "killed": False}
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
                out["killed"] = True
        else:
            out["signal"] = None
        out["exit_code"] = proc.returncode
        self.procs = [(n, p) for n, p in self.procs if p is not proc]
        return out

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        # start_new_session=True: the child leads its own group, whose id is its pid.
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for _, proc in list(self.procs):
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in list(self.procs):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self.procs = []


_taken_ports: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never handed out twice in this run."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _taken_ports:
            _taken_ports.add(port)
            return port


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port (SO_REUSEADDR: closed connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


def wait_until(check, deadline_s: float, proc: subprocess.Popen, what: str, children: Children):
    """Polls `check()` until it returns a truthy value, the process dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    interval = 0.02
    while True:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with code {proc.returncode} before it was ready "
                               f"(log {children.logdir / proc.bench_name}.log); its last lines:\n"
                               f"{children.log_tail(proc.bench_name)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {deadline_s:.0f} s (log "
                               f"{children.logdir / proc.bench_name}.log); its last lines:\n"
                               f"{children.log_tail(proc.bench_name)}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


# ---------------------------------------------------------------------------------------------
# Workers


def start_workers(children: Children, args) -> list[str]:
    procs, urls = [], []
    for i in range(args.workers):
        port = free_port()
        argv = [str(args.worker_bin), "--engine", "sim", "--model", str(args.model),
                "--listen", f"{HOST}:{port}", "--kv-cache", args.worker_kv_cache,
                "--sim-step-ms", "0", "--sim-prefill-tokens-per-s", "0",
                "--sim-decode-ms-per-sequence", "0",
                # The other routers cannot send our cluster credential (loopback, one run).
                "--no-cluster-auth"]
        procs.append(children.start(f"worker-{i:02d}", argv, env={"RUST_LOG": "warn"}))
        urls.append(f"http://{HOST}:{port}")
    for proc, url in zip(procs, urls):
        wait_until(lambda: http_get(url + "/readyz")[0] == 200, args.ready_timeout, proc,
                   f"worker {url}", children)
    return urls


def served_model(worker_url: str) -> str:
    status, body = http_get(worker_url + "/v1/models", timeout=5)
    if status != 200:
        raise RuntimeError(f"{worker_url}/v1/models answered {status}")
    return json.loads(body)["data"][0]["id"]


# ---------------------------------------------------------------------------------------------
# Routers


class Router:
    """One router and policy to measure: how to start it and how to tell it is ready."""

    def __init__(self, kind: str, label: str, policy: str, version: str | None):
        self.kind, self.label, self.policy, self.version = kind, label, policy, version

    def argv(self, args, port: int, metrics_port: int, workers: list[str], tenants: Path) -> list:
        py = sys.executable
        if self.kind == "ours":
            argv = [str(args.ours), "--listen", f"{HOST}:{port}"]
            for w in workers:
                argv += ["--worker", w]
            return argv + ["--tenants-file", str(tenants), "--policy", self.policy,
                           "--no-cluster-auth"]
        if self.kind == "sglang":
            return [py, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(port),
                    "--worker-urls", *workers, "--policy", self.policy,
                    "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
                    "--log-level", "warn"]
        if self.kind == "vllm":
            return [py, "-m", "vllm_router.launch_router", "--host", HOST, "--port", str(port),
                    "--worker-urls", *workers, "--policy", self.policy,
                    "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
                    "--log-level", "warning"]
        raise ValueError(self.kind)

    def env(self) -> dict:
        return {"RUST_LOG": "warn"} if self.kind == "ours" else dict(PEER_ENV)

    def ready(self, base: str, workers: list[str]) -> bool:
        if self.kind == "ours":
            return http_get(base + "/readyz")[0] == 200
        # Peers register workers (sglang-router in the background): ready when all are healthy.
        status, body = http_get(base + "/workers")
        if status != 200:
            return False
        try:
            listed = json.loads(body).get("workers", [])
        except ValueError:
            return False
        healthy = {w.get("url") for w in listed if w.get("is_healthy", True)}
        return healthy >= set(workers)


def ours_support(path: Path) -> tuple[bool, str]:
    """Whether the binary takes `--worker`; else why not, in its own words where it has any."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return False, f"{path} is not an executable file"
    try:
        r = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`{path} --help` failed: {e}"
    text = r.stdout + r.stderr
    if "--worker" in text:
        return True, ""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return False, f"`{path} --help` lists no --worker option (it says: {first!r})"


def peer_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Load


def request_bodies(model: str) -> list[bytes]:
    return [json.dumps({"model": model, "prompt": p, "max_tokens": 1 + i % 4, "temperature": 0,
                        "stream": False}).encode()
            for i, p in enumerate(PROMPTS)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def load(session: aiohttp.ClientSession, urls: list[str], bodies: list[bytes],
               headers: dict, n: int, concurrency: int, cpu_pid: int | None = None) -> dict:
    """`n` requests from `concurrency` closed-loop clients; request i goes to urls[i % len].

    Returns the raw latencies of the requests answered 200 (ms), the wall time, the errors and
    the CPU time process `cpu_pid` (the router) spent meanwhile."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = iter(range(n))

    async def client():
        for i in next_index:
            url, body = urls[i % len(urls)], bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                status, data = type(e).__name__, b""
            dt = time.perf_counter() - t0
            if status == 200:
                latencies.append(dt * 1000)
            else:
                key = f"{status} {data[:200].decode(errors='replace')}".strip()
                errors[key] = errors.get(key, 0) + 1

    # No collector pauses inside the timed window (the load allocates little).
    gc.collect()
    gc.disable()
    cpu0 = cpu_seconds(cpu_pid)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        gc.enable()
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(cpu_pid)
    return {"lat_ms": latencies, "wall_s": wall, "requests": n, "concurrency": concurrency,
            "errors": errors, "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0}


def summarize(parts: list[dict]) -> dict:
    """Pools the rounds of one phase: percentiles over all latencies, requests/s = ok / wall."""
    ms = sorted(x for p in parts for x in p["lat_ms"])
    wall = sum(p["wall_s"] for p in parts)
    cpu = None if any(p["cpu_s"] is None for p in parts) else sum(p["cpu_s"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "requests": sum(p["requests"] for p in parts), "ok": len(ms),
        "errors": sum(errors.values()), "error_kinds": errors,
        "concurrency": parts[0]["concurrency"], "rounds": len(parts), "wall_s": wall,
        "req_per_s": len(ms) / wall if wall else 0.0,
        "req_per_s_by_round": [len(p["lat_ms"]) / p["wall_s"] for p in parts],
        "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"), "max_ms": ms[-1] if ms else None,
        "router_cpu_s": cpu,
        "router_cpu_us_per_req": cpu / len(ms) * 1e6 if cpu is not None and ms else None,
    }


PHASES = ("idle", "fixed", "max")


async def measure(urls: list[str], bodies: list[bytes], headers: dict, args,
                  cpu_pid: int | None = None) -> dict:
    """One round against `urls` on a fresh connection pool: warm-up, then each phase."""
    limit = max(args.concurrency, args.max_concurrency)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = await load(session, urls, bodies, headers, args.warmup, args.concurrency)
        if not warm["lat_ms"]:
            raise RuntimeError(f"every warm-up request failed: {warm['errors']}")
        return {
            "idle": await load(session, urls, bodies, headers, args.idle_requests, 1, cpu_pid),
            "fixed": await load(session, urls, bodies, headers, args.requests, args.concurrency,
                                cpu_pid),
            "max": await load(session, urls, bodies, headers, args.max_requests,
                              args.max_concurrency, cpu_pid),
        }


def run_router(router: Router, children: Children, workers: list[str], bodies, headers,
               tenants: Path, args) -> dict:
    """Starts the router, then `--rounds` rounds of (direct, through the router), alternating
    which goes first, then stops it and checks its ports are free."""
    port, metrics_port = free_port(), free_port()
    argv = router.argv(args, port, metrics_port, workers, tenants)
    result = {"router": router.label, "policy": router.policy, "version": router.version,
              "command": argv, "env": router.env()}
    base = f"http://{HOST}:{port}"
    name = f"{router.kind}-{router.policy}"
    targets = {"direct": [w + "/v1/completions" for w in workers],
               "through": [base + "/v1/completions"]}
    rounds: dict[str, list[dict]] = {"direct": [], "through": []}
    t0 = time.monotonic()
    proc = children.start(name, argv, env=router.env())
    try:
        wait_until(lambda: router.ready(base, workers), args.ready_timeout, proc,
                   f"{router.label} ({router.policy})", children)
        result["ready_s"] = time.monotonic() - t0
        for k in range(args.rounds):
            for side in (("direct", "through") if k % 2 == 0 else ("through", "direct")):
                pid = proc.pid if side == "through" else None
                rounds[side].append(asyncio.run(measure(targets[side], bodies, headers, args,
                                                        pid)))
            if proc.poll() is not None:
                raise RuntimeError(f"{router.label} ({router.policy}) exited with code "
                                   f"{proc.returncode} during the load")
    finally:
        result["stop"] = children.stop(proc)
        ports = [port] + ([metrics_port] if router.kind != "ours" else [])
        free_deadline = time.monotonic() + 10
        while not all(port_is_free(p) for p in ports) and time.monotonic() < free_deadline:
            time.sleep(0.05)
        result["ports_free_after_stop"] = {str(p): port_is_free(p) for p in ports}
        result["log"] = str(children.logdir / f"{name}.log")
    for side in ("direct", "through"):
        result[side] = {ph: summarize([r[ph] for r in rounds[side]]) for ph in PHASES}
    for ph in ("idle", "fixed"):
        d, r = result["direct"][ph], result["through"][ph]
        result[f"added_{ph}"] = {"p50_ms": r["p50_ms"] - d["p50_ms"],
                                 "p99_ms": r["p99_ms"] - d["p99_ms"]}
    return result


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def ratios(results: list[dict]) -> list[dict]:
    """Ours against each peer that ran. Ratios are ours / peer."""
    ran = [r for r in results if "through" in r]
    ours = [r for r in ran if r["router"] == "tidelock-router"]
    peers = [r for r in ran if r["router"] != "tidelock-router"]
    out = []
    for o in ours:
        for p in peers:
            row = {"ours_policy": o["policy"], "peer": p["router"], "peer_policy": p["policy"]}
            for ph in ("fixed", "idle"):
                a, b = o[f"added_{ph}"]["p99_ms"], p[f"added_{ph}"]["p99_ms"]
                row[f"added_p99_{ph}_ours_ms"], row[f"added_p99_{ph}_peer_ms"] = a, b
                row[f"added_p99_{ph}_ratio"] = a / b if a > 0 and b > 0 else None
                row[f"added_p99_{ph}_lower"] = a < b
            for ph in ("max", "fixed"):
                row[f"req_per_s_{ph}_ratio"] = (o["through"][ph]["req_per_s"]
                                                / p["through"][ph]["req_per_s"])
            row["req_per_s_max_goal_met"] = row["req_per_s_max_ratio"] >= 1.5
            # The most a router costing nothing could have shown against this peer here.
            row["req_per_s_max_ceiling"] = (o["direct"]["max"]["req_per_s"]
                                            / p["through"]["max"]["req_per_s"])
            a = o["through"]["max"]["router_cpu_us_per_req"]
            b = p["through"]["max"]["router_cpu_us_per_req"]
            row["router_cpu_per_req_ratio"] = a / b if a is not None and b else None
            out.append(row)
    return out


def report(results: list[dict], skipped: list[str], args) -> str:
    c, mc = args.concurrency, args.max_concurrency
    out = [
        f"Router overhead: {args.workers} simulated workers; /v1/completions, non-streaming, "
        f"max_tokens 1..4; per router, rounds of (direct, through the router): {args.rounds}.",
        f"Latency: {args.requests} requests/round at concurrency {c}; idle: {args.idle_requests} "
        f"at concurrency 1; req/s: {args.max_requests} at concurrency {mc} (closed loop).",
        "direct = the same load from the same client straight to the workers, in the same "
        "rounds; +pXX = router pXX - direct pXX (ms).",
        "",
    ]
    header = ["router", "policy", f"p50 @{c}", f"p99 @{c}", "direct p50", "direct p99",
              "+p50", "+p99", "idle +p50", "idle +p99", f"req/s @{c}", f"req/s @{mc}",
              f"direct req/s @{mc}", f"router CPU us/req @{mc}", "errors"]
    rows = []
    for r in results:
        if "through" not in r:
            rows.append([r["router"], r["policy"]] + ["-"] * (len(header) - 3) + ["FAILED"])
            continue
        t, d = r["through"], r["direct"]
        rows.append([r["router"], r["policy"], fmt(t["fixed"]["p50_ms"]),
                     fmt(t["fixed"]["p99_ms"]), fmt(d["fixed"]["p50_ms"]),
                     fmt(d["fixed"]["p99_ms"]), fmt(r["added_fixed"]["p50_ms"]),
                     fmt(r["added_fixed"]["p99_ms"]), fmt(r["added_idle"]["p50_ms"]),
                     fmt(r["added_idle"]["p99_ms"]), fmt(t["fixed"]["req_per_s"], 0),
                     fmt(t["max"]["req_per_s"], 0), fmt(d["max"]["req_per_s"], 0),
                     fmt(t["max"]["router_cpu_us_per_req"], 0),
                     str(sum(t[ph]["errors"] + d[ph]["errors"] for ph in PHASES))])
    out.append(table(rows, header))
    out += [f"FAILED {r['router']} ({r['policy']}): {r['error'].splitlines()[0]}"
            for r in results if "through" not in r]
    if any(r["router"] == "vllm-router" and r["policy"] == "cache_aware" and "through" in r
           for r in results):
        out.append("note: vllm-router cache_aware tokenizes each request through the workers "
                   "(POST /v1/completions/render, then POST /tokenize where render answers 404, "
                   "on each worker); its figures include those calls.")
    out.append("note: client, router and workers share the cores, so no router can exceed "
               "the direct req/s; router CPU us/req is the router process's CPU time (all "
               "threads) over the max phase per request answered, its own cost.")
    if "debug" in Path(args.worker_bin).parts:
        out.append(f"note: the workers are a debug build ({args.worker_bin}).")
    out += [f"skipped: {s}" for s in skipped]
    rs = ratios(results)
    if rs:
        out += ["", "Ours vs each peer, same run (ratio = ours / peer). Goals: p99 added latency "
                    f"at concurrency {c} lower than the peer's; req/s at concurrency {mc} >= 1.5x "
                    "the peer's."]
        rrows = [[f"ours ({x['ours_policy']})", f"{x['peer']} ({x['peer_policy']})",
                  fmt(x["added_p99_fixed_ours_ms"]), fmt(x["added_p99_fixed_peer_ms"]),
                  "yes" if x["added_p99_fixed_lower"] else "NO",
                  fmt(x["added_p99_idle_ratio"]), fmt(x["req_per_s_max_ratio"]),
                  "yes" if x["req_per_s_max_goal_met"] else "NO",
                  fmt(x["req_per_s_max_ceiling"]), fmt(x["req_per_s_fixed_ratio"]),
                  fmt(x["router_cpu_per_req_ratio"])]
                 for x in rs]
        out.append(table(rrows, ["ours", "peer", "ours +p99", "peer +p99", "lower?",
                                 "idle +p99 ratio", f"req/s @{mc} ratio", ">= 1.5x?",
                                 "ceiling here", f"req/s @{c} ratio", "router CPU/req ratio"]))
        out.append("ceiling here = direct req/s / peer req/s: the most any router could show "
                   "against that peer on this machine. router CPU/req ratio <= 0.67 is the "
                   "router-bound form of the 1.5x goal.")
    else:
        out.append("No ratios: ours did not run.")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--worker-bin", type=Path, default=ROOT / "target/debug/tidelock-worker",
                   help="tidelock-worker binary (copy it first if a build may replace it)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="GGUF the simulated workers take their tokenizer and shape from")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--worker-kv-cache", default="256MiB",
                   help="--kv-cache of each worker (the simulator keeps no tensors, only blocks)")
    p.add_argument("--ours", type=Path, default=None,
                   help="tidelock-router binary; skipped with a message when it has no --worker")
    p.add_argument("--ours-policy", action="append", default=None,
                   help="policy for ours (repeatable); default: ttft and round_robin")
    p.add_argument("--peers", default=",".join(PEER_POLICIES),
                   help="comma-separated ROUTER:POLICY for the peers (ROUTER: sglang or vllm); "
                        "empty for none")
    p.add_argument("--requests", type=int, default=2000, help="fixed-load requests per target")
    p.add_argument("--concurrency", type=int, default=32, help="fixed-load concurrency")
    p.add_argument("--max-requests", type=int, default=2000,
                   help="requests in the max-throughput phase")
    p.add_argument("--max-concurrency", type=int, default=128,
                   help="concurrency of the max-throughput phase")
    p.add_argument("--idle-requests", type=int, default=500,
                   help="requests at concurrency 1 (the hop's own latency, no queueing)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up requests per target and round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (direct, router) per router, alternating which goes first")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds a worker or router may take to become ready")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: /tmp/router_overhead-<time>.json)")
    args = p.parse_args()
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = Path(tempfile.gettempdir()) / f"router_overhead-{stamp}.json"
    args.ours_policy = args.ours_policy or ["ttft", "round_robin"]
    return args


def routers_to_run(args, skipped: list[str]) -> list[Router]:
    routers = []
    if args.ours is not None:
        ok, why = ours_support(args.ours)
        if ok:
            routers += [Router("ours", "tidelock-router", pol, None) for pol in args.ours_policy]
        else:
            skipped.append(f"ours: {why}")
    else:
        skipped.append("ours: no --ours binary given")
    dists = {"sglang": "sglang-router", "vllm": "vllm-router"}
    for spec in filter(None, (s.strip() for s in args.peers.split(","))):
        kind, _, policy = spec.partition(":")
        if kind not in dists or not policy:
            raise SystemExit(f"--peers: {spec!r} is not ROUTER:POLICY with ROUTER sglang or vllm")
        version = peer_version(dists[kind])
        if version is None:
            skipped.append(f"{dists[kind]} ({policy}): not installed in {sys.prefix}")
            continue
        routers.append(Router(kind, dists[kind], policy, version))
    return routers


def on_sigterm(signum, frame):
    """SIGTERM ends the run as Ctrl-C does: through the `finally` that stops every child."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    for path, what in ((args.worker_bin, "--worker-bin"), (args.model, "--model")):
        if not path.exists():
            raise SystemExit(f"{what}: {path} does not exist")
    skipped: list[str] = []
    routers = routers_to_run(args, skipped)

    logdir = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    children = Children(logdir)
    key = "tl-bench-" + secrets.token_hex(16)
    tenants = logdir / "tenants.json"
    if any(r.kind == "ours" for r in routers):
        import blake3  # only ours needs it

        tenants.write_text(json.dumps({"bench": {
            "key_hashes": [blake3.blake3(key.encode()).hexdigest()],
            "cache_salt": secrets.token_hex(16)}}))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    results: list[dict] = []
    try:
        t0 = time.monotonic()
        workers = start_workers(children, args)
        print(f"{len(workers)} simulated workers ready in {time.monotonic() - t0:.1f} s "
              f"(logs in {logdir})", flush=True)
        model = served_model(workers[0])
        bodies = request_bodies(model)
        for router in routers:
            print(f"-- {router.label} ({router.policy})", flush=True)
            try:
                r = run_router(router, children, workers, bodies, headers, tenants, args)
            except RuntimeError as e:
                if router.kind == "ours" and "not implemented" in str(e):
                    first = str(e).splitlines()[0]
                    skipped.append(f"ours ({router.policy}): not implemented, it says; {first}")
                    print(f"   skipped: {first}", flush=True)
                    continue
                r = {"router": router.label, "policy": router.policy, "error": str(e)}
                print(f"   failed: {e}", flush=True)
            else:
                t = r["through"]
                print(f"   ready in {r['ready_s']:.1f} s; p50 {fmt(t['fixed']['p50_ms'])} ms, "
                      f"p99 {fmt(t['fixed']['p99_ms'])} ms, {fmt(t['max']['req_per_s'], 0)} "
                      f"req/s; stopped by {r['stop']['signal']}"
                      f"{' then SIGKILL' if r['stop']['killed'] else ''}, ports free after: "
                      f"{all(r['ports_free_after_stop'].values())}", flush=True)
            results.append(r)
    finally:
        children.stop_all()
    text = report(results, skipped, args)
    print()
    print(text)
    doc = {
        "benchmark": "router_overhead", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workers": workers, "model": model, "prompts": PROMPTS,
        "results": results, "ratios": ratios(results), "skipped": skipped, "table": text,
    }
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"\nJSON: {args.out}")
    failed = [r for r in results if "through" not in r]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every router and worker this run started has been stopped",
              file=sys.stderr)
        sys.exit(130)
