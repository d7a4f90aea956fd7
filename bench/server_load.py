"""Continuous batching under load: 1, 2, 4 and 8 concurrent streaming clients, each at its
own lam, against the server with --parallel 8 and against the one-at-a-time server
(--parallel 1), started in the same run on the same machine.

    python bench/server_load.py [--clients 1,2,4,8 --tokens 64 --runs 3]

Each client is closed-loop (its next request starts when its last one ends) for
--duration seconds per round. Per setting: aggregate generated tokens/s (all clients'
tokens / wall time, median of --runs rounds), time to first token and inter-token
latency (p50/p95 over every request and gap of all rounds). Default pair: the built-in
SmolLM2 pair.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import machine, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import start_server  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe a walk through a market.",
    "What makes a good friend?",
    "Tell me about the history of bread.",
    "How do bicycles stay upright?",
    "Describe the ocean at night.",
    "Why do leaves change colour?",
]


def stream_one(port: int, question: str, lam: float, tokens: int, seed: int) -> dict:
    """One streaming chat request; returns its first-token time, chunk gaps, tokens."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "dera_lambda": lam,
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    arrivals, usage = [], None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.perf_counter())
    connection.close()
    return {
        "ttft": arrivals[0] - started if arrivals else float("nan"),
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "tokens": usage["completion_tokens"] if usage else len(arrivals),
    }


def load_round(
    port: int, clients: int, tokens: int, seed: int, duration: float
) -> tuple[float, list[dict]]:
    """`clients` closed-loop clients: each sends its next request as soon as its last one
    ends, until `duration` seconds have passed (requests started by then finish). A
    steady load, so a round's rate is not set by its single longest answer."""
    results: list[list[dict]] = [[] for _ in range(clients)]
    deadline = time.perf_counter() + duration

    def client(i: int) -> None:
        lam = [0.0, 0.5, 1.0, 1.5, 2.0, 0.25, 0.75, 1.25][i % 8]
        n = 0
        while time.perf_counter() < deadline:
            question = QUESTIONS[(i + n) % len(QUESTIONS)]
            results[i].append(stream_one(port, question, lam, tokens, seed + 100 * i + n))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for mine in results for r in mine]
    return sum(r["tokens"] for r in done) / wall, done


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per round")
    parser.add_argument("--server-args", default="", help="e.g. '-m A.gguf -mr R.gguf'")
    parser.add_argument(
        "--baseline-checkout",
        help="also run the one-at-a-time server of another checkout of dera-local (e.g. "
        "`git worktree add /tmp/before <commit>`), with this checkout's compiled hook",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    extra = args.server_args.split()
    rows: list[list] = []
    baseline: dict[int, float] = {}  # the one-at-a-time server's rate, per client count
    servers: list[tuple[str, list[str], dict]] = []
    if args.baseline_checkout:
        checkout = Path(args.baseline_checkout).resolve()
        for native in Path(__file__).resolve().parents[1].glob("dera_local/_native*.so"):
            shutil.copy(native, checkout / "dera_local")
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        label = f"before batching ({args.baseline_checkout})"
        servers.append(
            (label, [*extra, "-c", "1024", "--max-queue", "64"], {"cwd": str(checkout), "env": env})
        )
    for parallel in (1, max(counts)):
        label = "one at a time" if parallel == 1 else f"--parallel {parallel}"
        server_args = [*extra, "-c", str(1024 * parallel), "--parallel", str(parallel),
                       "--max-queue", "64"]  # fmt: skip
        servers.append((label, server_args, {}))
    for label, server_args, where in servers:
        process, base = start_server(server_args, **where)
        port = int(base.rsplit(":", 1)[1])
        try:
            load_round(port, 1, 8, 0, 0.0)  # warm-up: one short request
            for clients in counts:
                rates, ttfts, gaps = [], [], []
                for run in range(args.runs):
                    rate, results = load_round(
                        port, clients, args.tokens, 1000 * run, args.duration
                    )
                    rates.append(rate)
                    ttfts += [r["ttft"] for r in results]
                    gaps += [g for r in results for g in r["gaps"]]
                rate = statistics.median(rates)
                if label == "one at a time":
                    baseline[clients] = rate
                rows.append([
                    label, str(clients), rate,
                    f"{1000 * percentile(ttfts, 0.5):.0f} / {1000 * percentile(ttfts, 0.95):.0f}",
                    f"{1000 * percentile(gaps, 0.5):.0f} / {1000 * percentile(gaps, 0.95):.0f}",
                ])  # fmt: skip
                print(f"  {label}, {clients} clients: {rate:.1f} tok/s", file=sys.stderr)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"## Server under load (closed-loop clients for {args.duration:g} s, up to "
          f"{args.tokens} tokens per request, temperature 0.8, a lam per client; median of "
          f"{args.runs} rounds)\n\nMachine: {machine()}\n")  # fmt: skip
    headers = ["server", "clients", "tokens/s (all clients)", "vs one at a time",
               "time to first token p50 / p95 (ms)", "inter-token p50 / p95 (ms)"]  # fmt: skip
    shown = [
        [label, clients, f"{rate:.1f}", f"{rate / baseline[int(clients)]:.2f}x", *latencies]
        for label, clients, rate, *latencies in rows
    ]
    print(table(headers, shown))


if __name__ == "__main__":
    main()
