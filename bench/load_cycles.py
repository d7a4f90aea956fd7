"""Resident memory over repeated load/close cycles of one pair in one process, with and
without handing freed heap pages back to the system after close (malloc_trim).

    python bench/load_cycles.py [--cycles 30]

Each setting runs in its own child process, so one cannot warm the other's heap.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import machine, table

CHILD = """
import json, sys
import dera_local, dera_local.llama.backend as backend
from dera_local.sources.default_pair import demo_pair

if sys.argv[2] == "off":
    backend.return_freed_memory = lambda: None
def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
reference, adapter = demo_pair()
marks = {}
for cycle in range(1, int(sys.argv[1]) + 1):
    with dera_local.load_pair(None, reference, lora=adapter, n_ctx=512) as pair:
        pair.generate("hi", max_tokens=4)
    if cycle in (1, 10, int(sys.argv[1])):
        marks[cycle] = rss_mb()
print(json.dumps(marks))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args()
    print(f"## Load/close cycles (SmolLM2 LoRA pair, n_ctx 512)\n\nMachine: {machine()}\n")
    rows = []
    for setting in ("on", "off"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.cycles), setting],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        marks = json.loads(out.strip().splitlines()[-1])
        label = "trim after close (default)" if setting == "on" else "no trim"
        rows.append([label, *(f"{mb} MB" for mb in marks.values())])
    cycles = ["after 1 cycle", "after 10", f"after {args.cycles}"]
    print(table(["", *cycles], rows))


if __name__ == "__main__":
    main()
