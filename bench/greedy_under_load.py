"""Do greedy (temperature 0) answers change when other requests share the batch? Starts
`dera-local serve` on the built-in pair, asks PROMPTS different questions one at a time
(the reference answers), then all at once from as many clients, and counts the answers
that differ, at --parallel 4 and 1, with speculation on and off. llama.cpp's kernels sum
in another order at another batch size, so a near-tie can flip a token; this measures
how often it happens on this machine (docs/server.md quotes it).

    python bench/greedy_under_load.py [--prompts 20] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from common import machine, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import start_server  # noqa: E402

TOPICS = [
    "DNS", "photosynthesis", "inflation", "TCP", "vaccines", "black holes", "compilers",
    "tides", "the stock market", "volcanoes", "encryption", "rainbows", "antibiotics",
    "glaciers", "democracy", "batteries", "earthquakes", "the immune system", "GPS",
    "recycling", "bees", "nuclear power", "the internet", "coffee", "jet engines",
]  # fmt: skip


def ask(base: str, topic: str, tokens: int) -> list[int] | str:
    body = {
        "messages": [{"role": "user", "content": f"Explain {topic} in a few sentences."}],
        "max_tokens": tokens,
        "temperature": 0,
        "dera_lambda": 0.5,
    }
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def run(parallel: int, speculation: bool, topics: list[str], tokens: int) -> tuple[int, int]:
    args = ["-c", str(2048 * parallel), "--parallel", str(parallel), "--max-queue", "256"]
    if not speculation:
        args += ["--draft-max", "0"]
    process, base = start_server(args, log=subprocess.DEVNULL)
    try:
        alone = [ask(base, topic, tokens) for topic in topics]
        together: list = [None] * len(topics)

        def client(i: int) -> None:
            together[i] = ask(base, topics[i], tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(topics))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        process.terminate()
        process.wait(timeout=10)
    return sum(a != b for a, b in zip(alone, together, strict=True)), len(topics)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=48)
    options = parser.parse_args()
    topics = TOPICS[: options.prompts]
    rows = []
    for parallel, speculation in ((4, True), (4, False), (1, True)):
        differ, total = run(parallel, speculation, topics, options.tokens)
        rows.append([str(parallel), "on" if speculation else "off", f"{differ} of {total}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"Greedy answers with {len(topics)} concurrent clients vs each alone, built-in pair, "
          f"lam 0.5, {options.tokens} tokens; {machine()}")  # fmt: skip
    print(table(["--parallel", "speculation", "answers that differ"], rows))


if __name__ == "__main__":
    main()
