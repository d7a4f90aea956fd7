"""Soak: long runs that would show leaks, crashes and slow drift. Not a CI test.

    python bench/soak.py [--generations 1000 --cycles 50 --requests 500]

1. The Python API on one pair (the built-in SmolLM2 pair): generations with random lam,
   sampling settings, stop strings, lengths, streams closed early and bad parameters.
2. Load/close cycles of the pair in the same process.
3. Requests through `dera-local serve` (a child process): streaming and not, some clients
   hanging up mid-stream, some bad requests.

Reports resident memory after warm-up and at the end (goal: < 5% growth), open file
descriptors and threads (goal: no growth), and every unexpected exception.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

from common import machine, table
from server_process import start_server

import dera_local
from dera_local import SamplingParams
from dera_local.chat import ChatTemplate
from dera_local.errors import BadParameterError
from dera_local.sources.default_pair import demo_pair

WARM_UP = 50  # generations (or requests) before the baseline is taken
PROMPTS = [
    "What is democracy?",
    "Explain photosynthesis to a child.",
    "List three uses of copper.",
    "Write a haiku about rain.",
    "Why is the sky blue?",
    "How do vaccines work?",
]


def process_stats(pid: int | str = "self") -> dict[str, int]:
    proc = Path(f"/proc/{pid}")
    rss_kb = next(
        int(line.split()[1])
        for line in (proc / "status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "rss_mb": rss_kb // 1024,
        "fds": len(os.listdir(proc / "fd")),
        "threads": len(os.listdir(proc / "task")),
    }


def random_call(rng: random.Random) -> tuple[dict, bool, int | None]:
    """Keyword arguments for pair.stream, whether the prompt is a chat turn, and after how
    many chunks to close the stream (None: read it to the end)."""
    sampling = SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.8, 1.0, 1.5]),
        top_k=rng.choice([0, 1, 10, 40]),
        top_p=rng.choice([0.5, 0.9, 1.0]),
        min_p=rng.choice([0.0, 0.05, 0.2]),
        repeat_penalty=rng.choice([1.0, 1.1]),
        seed=rng.randrange(2**31),
    )
    kwargs = {
        "lam": rng.choice([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, -0.5, 3.0]),
        "sampling": sampling,
        "max_tokens": rng.choice([1, 4, 16, 32, 64]),
        "stop": rng.choice([(), ("\n",), (".", "!"), ("the",)]),
        "logprobs": rng.random() < 0.2,
    }
    close_after = rng.choice([None, None, None, 1, 3])
    return kwargs, rng.random() < 0.7, close_after


def soak_api(pair, generations: int, rng: random.Random, errors: collections.Counter) -> dict:
    marks = {}
    template = ChatTemplate.for_pair(pair)
    for i in range(1, generations + 1):
        kwargs, chat, close_after = random_call(rng)
        prompt = rng.choice(PROMPTS)
        if chat:
            prompt = template.render([{"role": "user", "content": prompt}])
        try:
            if rng.random() < 0.03:  # bad input must fail cleanly and leave the pair usable
                kwargs["lam"] = float("nan")
            stream = pair.stream(prompt, **kwargs)
            for n, _ in enumerate(stream, 1):
                if close_after and n >= close_after:
                    stream.close()
                    break
        except BadParameterError:
            errors["expected: BadParameterError"] += 1
        except Exception as exc:  # anything else is a finding
            errors[f"{type(exc).__name__}: {exc}"] += 1
        if i == WARM_UP:
            marks["warm"] = process_stats()
        if i % 100 == 0:
            print(f"  api {i}/{generations} {process_stats()}", file=sys.stderr, flush=True)
    marks["end"] = process_stats()
    return marks


def soak_cycles(cycles: int, errors: collections.Counter) -> dict:
    reference, adapter = demo_pair()
    marks = {}
    for i in range(1, cycles + 1):
        try:
            with dera_local.load_pair(None, reference, lora=adapter, n_ctx=512) as pair:
                pair.generate("Hello", max_tokens=4)
        except Exception as exc:
            errors[f"{type(exc).__name__}: {exc}"] += 1
        if i == 5:
            marks["warm"] = process_stats()
    marks["end"] = process_stats()
    return marks


def _request(port: int, body: dict, hang_up_after: int | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        if hang_up_after is not None and body.get("stream"):
            for _ in range(hang_up_after):
                response.readline()
            return response.status  # closed below, mid-stream
        response.read()
        return response.status
    finally:
        connection.close()


def soak_server(requests: int, rng: random.Random, errors: collections.Counter) -> dict:
    server, base = start_server(["-c", "2048"])
    port = int(base.rsplit(":", 1)[1])
    try:
        marks, statuses = {}, collections.Counter()
        for i in range(1, requests + 1):
            body = {
                "model": "dera-local",
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.choice([1, 8, 32]),
                "temperature": rng.choice([0, 0.7, 1.2]),
                "stream": rng.random() < 0.5,
                "dera_lambda": rng.choice([0.0, 0.5, 1.0, 2.0]),
            }
            if rng.random() < 0.05:
                body["dera_lambda"] = "lots"  # a bad request: 400, nothing else
            hang_up = rng.choice([None, None, None, 2])
            try:
                statuses[_request(port, body, hang_up)] += 1
            except Exception as exc:
                errors[f"server client {type(exc).__name__}: {exc}"] += 1
            if i == WARM_UP:
                marks["warm"] = process_stats(server.pid)
            if i % 100 == 0:
                print(f"  server {i}/{requests} {process_stats(server.pid)}", file=sys.stderr)
        time.sleep(1)  # let the last hung-up streams be noticed and cancelled
        marks["end"] = process_stats(server.pid)
        marks["statuses"] = dict(statuses)
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    if "Traceback" in log:
        errors["server log has a traceback"] += 1
    marks["exit"] = server.returncode
    return marks


def _growth(marks: dict) -> str:
    warm, end = marks["warm"]["rss_mb"], marks["end"]["rss_mb"]
    return f"{100 * (end - warm) / warm:+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    warnings.simplefilter("ignore")  # lam < 0 and > 1 warn once each; not findings
    errors: collections.Counter = collections.Counter()
    started = time.monotonic()

    reference, adapter = demo_pair()
    with dera_local.load_pair(None, reference, lora=adapter, n_ctx=2048) as pair:
        api = soak_api(pair, args.generations, rng, errors)
    cycles = soak_cycles(args.cycles, errors)
    server = soak_server(args.requests, rng, errors)

    rows = []
    for name, marks in (
        (f"API, {args.generations} generations", api),
        (f"load/close, {args.cycles} cycles", cycles),
        (f"server, {args.requests} requests", server),
    ):
        warm, end = marks["warm"], marks["end"]
        rows.append(
            [
                name,
                f"{warm['rss_mb']} MB",
                f"{end['rss_mb']} MB",
                _growth(marks),
                f"{warm['fds']} → {end['fds']}",
                f"{warm['threads']} → {end['threads']}",
            ]
        )
    print(
        f"## Soak (built-in SmolLM2 pair)\n\nMachine: {machine()}; "
        f"{time.monotonic() - started:.0f} s; seed {args.seed}\n"
    )
    print(table(["phase", "RSS after warm-up", "RSS at end", "growth", "fds", "threads"], rows))
    print(f"\nServer answers: {server['statuses']}; exit status {server['exit']}")
    unexpected = {k: v for k, v in errors.items() if not k.startswith("expected")}
    print(
        f"Expected errors: {sum(errors.values()) - sum(unexpected.values())} "
        f"(BadParameterError for a NaN lam); unexpected: {unexpected or 'none'}"
    )


if __name__ == "__main__":
    main()
