"""Models on llama.cpp RPC workers over loopback: ms per token and time to first token of
a pair on this machine, with both models on one worker, and with one worker per model
(overlapped); bytes on the wire per token; and the cost model

    t_token(one worker per model) = max(t_aligned, t_reference) + RPC overhead + transfer
    t_token(both on one worker)   = t_aligned + t_reference + 2 * (overhead + transfer)

checked against the measurements. The parts come from the same run: each model alone at
one thread on this machine (t_aligned, t_reference), the RPC overhead of one decode (the
263-token tiny model over RPC minus on this machine), the bytes counted by a proxy.

Each worker runs 1 thread; the host decodes nothing itself but the input embedding.
Run it on an idle machine:  python bench/rpc.py [--runs 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, smollm2_pair, table, tiny_pair  # noqa: E402

import dera_local  # noqa: E402
import dera_local.rpc.endpoints  # noqa: E402
from dera_local.speculation.drafts import SpeculationParams  # noqa: E402

# A raw continuation every model here (the concise DPO one too) keeps going to the token
# limit: the per-token cost needs generations of a known length.
PROMPT = "The numbers from 1 to 300, separated by commas: 1, 2, 3, 4, 5, 6, 7,"
GREEDY = dera_local.SamplingParams(temperature=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def worker(threads: int = 1):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dera_local.cli", "worker", "--port", str(port), "-t",
         str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            dera_local.rpc.endpoints.hello(endpoint, 2)
            break
        except dera_local.DeraError:
            if time.time() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        process.kill()
        process.wait()


class CountingProxy:
    """Forwards one TCP endpoint to another and counts the bytes each way."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.sent = self.received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._pump, args=(client, upstream, "sent"), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, "received"), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counter: str) -> None:
        try:
            while data := source.recv(1 << 16):
                setattr(self, counter, getattr(self, counter) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        self.sent = self.received = 0


def loopback_bandwidth(megabytes: int = 200) -> float:
    """Bytes per second one TCP connection carries over loopback here."""
    server = socket.create_server(("127.0.0.1", 0))
    chunk = bytes(1 << 20)

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    reader = threading.Thread(target=sink)
    reader.start()
    with socket.create_connection(server.getsockname()) as conn:
        start = time.perf_counter()
        for _ in range(megabytes):
            conn.sendall(chunk)
    reader.join()
    server.close()
    return megabytes * len(chunk) / (time.perf_counter() - start)


def generation_times(model_set, tokens: int) -> tuple[float, float]:
    """(time to first token, ms per later token): a one-token generation and a
    `tokens`-token one, each reading the whole prompt (the cache cleared first)."""

    def run(n: int) -> tuple[float, int]:
        model_set.clear_cache()
        start = time.perf_counter()
        lam = 1.5 if model_set.depends_on_lam else 1.0  # a one-term mixture has no lam
        result = model_set.generate(PROMPT, lam=lam, max_tokens=n, sampling=GREEDY,
                                    speculation=SpeculationParams(draft_max=0))  # fmt: skip
        return time.perf_counter() - start, len(result.tokens)

    first, _ = run(1)
    total, count = run(tokens)
    if count != tokens:
        raise SystemExit(f"the generation ended after {count} of {tokens} tokens")
    return first, (total - first) * 1000 / (count - 1)


def measure(load, runs: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    with load() as model_set:
        generation_times(model_set, 4)  # warm-up
        samples = [generation_times(model_set, tokens) for _ in range(runs)]
        lam = 1.5 if model_set.depends_on_lam else 1.0
        output = model_set.generate(PROMPT, lam=lam, max_tokens=tokens, sampling=GREEDY,
                                    speculation=SpeculationParams(draft_max=0)).tokens  # fmt: skip
    return (
        statistics.median(s[0] for s in samples) * 1000,
        statistics.median(s[1] for s in samples),
        output,
    )


def wire_bytes(spec, tokens: int, **endpoints: str) -> tuple[float, float]:
    """(bytes to the workers, bytes back) per generated token of a pair whose models sit
    on `endpoints` (shared=, or aligned= and reference=), counted by proxies."""
    proxies = {role: CountingProxy(endpoint) for role, endpoint in endpoints.items()}
    placement = (
        {"rpc": proxies["shared"].endpoint}
        if "shared" in proxies
        else {"rpc_aligned": proxies["aligned"].endpoint,
              "rpc_reference": proxies["reference"].endpoint}
    )  # fmt: skip
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024,
                              n_threads=1, **placement) as loaded:  # fmt: skip
        loaded.clear_cache()
        loaded.generate(PROMPT, lam=1.5, max_tokens=1, sampling=GREEDY)  # the prompt
        for proxy in proxies.values():
            proxy.reset()
        generated = loaded.generate(PROMPT, lam=1.5, max_tokens=tokens + 1, sampling=GREEDY,
                                    speculation=SpeculationParams(draft_max=0))  # fmt: skip
        steps = len(generated.tokens) - 1  # the prompt was cached: one decode per token
    sent = sum(p.sent for p in proxies.values())
    received = sum(p.received for p in proxies.values())
    return sent / steps, received / steps


def single_model_ms(path: str, lora: str | None, runs: int, tokens: int) -> float:
    """ms per token of one model alone at one thread (a pair of the model with itself is
    that model: one context, nothing mixed)."""

    def load():
        if lora is None:
            return dera_local.load_pair(path, path, n_threads=1, n_ctx=1024)
        return dera_local.load_pair(None, path, lora=lora, n_threads=1, n_ctx=1024,
                                    overlap_decodes=False)  # fmt: skip

    if lora is None:
        return measure(load, runs, tokens)[1]
    # The tuned side alone: a mixture with one term, base + adapter.
    from dera_local.model_sets.mixture import MixTerm, Source, load_mixture

    return measure(
        lambda: load_mixture([MixTerm(Source(path, lora), 1.0)], n_threads=1, n_ctx=1024),
        runs,
        tokens,
    )[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument(
        "--memory-gbps",
        type=float,
        default=80.0,
        help="for the 70B estimate: each machine's memory bandwidth (a decode reads every "
        "weight once; 80 GB/s is dual-channel DDR5)",
    )
    args = parser.parse_args()
    spec = smollm2_pair()
    if spec is None:
        return
    print(f"machine: {machine()}")
    print(f"pair: {spec.name}; greedy, lam 1.5, speculation off, {args.tokens} tokens, "
          f"median of {args.runs}")  # fmt: skip

    def pair(**placement):
        return lambda: dera_local.load_pair(
            spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024, **placement
        )

    rows = []
    outputs = {}
    with worker() as one, worker() as two:
        configs = [
            ("this machine, 2 threads per model (the default here)", pair(n_threads=2)),
            ("this machine, 1 thread per model", pair(n_threads=1)),
            ("both models on one worker", pair(n_threads=1, rpc=one)),
            (
                "one worker per model (overlapped)",
                pair(n_threads=1, rpc_aligned=one, rpc_reference=two),
            ),
        ]
        for name, load in configs:
            ttft, ms, outputs[name] = measure(load, args.runs, args.tokens)
            rows.append([name, f"{ms:.1f}", f"{1000 / ms:.1f}", f"{ttft:.0f}"])
        # Bytes on the wire per generated token (both models), through counting proxies
        # (their own runs: a proxy adds latency). The prompt's decode is excluded.
        traffic = {
            "both models on one worker": wire_bytes(spec, args.tokens, shared=one),
            "one worker per model": wire_bytes(spec, args.tokens, aligned=one, reference=two),
        }
        # RPC overhead of one decode: the tiny model over RPC minus on this machine.
        tiny = tiny_pair()
        t_local = measure(lambda: dera_local.load_pair(tiny.aligned, tiny.aligned,
                                                       n_threads=1, n_ctx=256),
                          args.runs, args.tokens)[1]  # fmt: skip
        t_remote = measure(lambda: dera_local.load_pair(tiny.aligned, tiny.aligned,
                                                        n_threads=1, n_ctx=256, rpc=one),
                           args.runs, args.tokens)[1]  # fmt: skip
    overhead = t_remote - t_local
    bandwidth = loopback_bandwidth()
    # ms of transfer per decode of one model, in each placement
    transfer = {
        name: (sent + back) / 2 / bandwidth * 1000 for name, (sent, back) in traffic.items()
    }
    t_ref = single_model_ms(spec.reference, None, args.runs, args.tokens)
    t_aligned = single_model_ms(spec.reference, spec.lora, args.runs, args.tokens)
    print()
    print(table(["placement", "ms/token", "tokens/s", "first token (ms)"], rows))
    base = outputs[configs[0][0]]
    same = all(out == base for out in outputs.values())
    print(f"\nsame greedy tokens in every placement: {same}")
    print()
    print(table(
        ["bytes per generated token (both models)", "to the workers", "back"],
        [[name, f"{sent / 1024:.1f} KiB", f"{back / 1024:.1f} KiB"]
         for name, (sent, back) in traffic.items()],
    ))  # fmt: skip
    print(f"(the logits alone are {49152 * 4 / 1024:.0f} KiB per model per token)")
    print(f"RPC overhead per decode (tiny model: {t_remote:.2f} ms over RPC, {t_local:.2f} "
          f"ms here): {overhead:.2f} ms")  # fmt: skip
    print(f"one model alone, 1 thread, here: reference {t_ref:.1f} ms, aligned (with its "
          f"LoRA) {t_aligned:.1f} ms")  # fmt: skip
    one_each, shared_one = transfer["one worker per model"], transfer["both models on one worker"]
    print(f"loopback: {bandwidth / 1e9:.2f} GB/s, so {one_each:.3f} / {shared_one:.3f} ms of "
          "transfer per decode (one worker per model / both on one)")  # fmt: skip
    measured = {row[0]: float(row[1]) for row in rows}
    overlapped = max(t_ref, t_aligned) + overhead + one_each
    shared = t_ref + t_aligned + 2 * (overhead + shared_one)
    print()
    print(table(
        ["placement", "model (ms/token)", "measured (ms/token)"],
        [["one worker per model", f"max({t_aligned:.1f}, {t_ref:.1f}) + {overhead:.2f} + "
          f"{one_each:.2f} = {overlapped:.1f}", f"{measured[configs[3][0]]:.1f}"],
         ["both models on one worker", f"{t_aligned:.1f} + {t_ref:.1f} + 2 x ({overhead:.2f} + "
          f"{shared_one:.2f}) = {shared:.1f}", f"{measured[configs[2][0]]:.1f}"]],
    ))  # fmt: skip

    print_paper_estimate(traffic["one worker per model"], overhead, args.memory_gbps)


def print_paper_estimate(measured: tuple[float, float], overhead_ms: float, memory_gbps: float):
    """A Tulu 2 70B DPO + SFT pair (Q4_K_M, 41.4 GB each, 32,000-token vocabulary, 80
    layers) with one model per machine, from this run's figures: what goes to a worker
    per token scales with the layers (30 in SmolLM2-135M), what comes back is the logits.
    Assumptions, not measurements: the compute is memory-bound (41.4 GB read per token),
    a link carries 94% of its line rate."""
    sent = measured[0] / 2 * 80 / 30  # per model
    back = 32000 * 4
    per_token = 2 * (sent + back)  # both models' traffic through the host's one link
    compute_ms = 41.4 / memory_gbps * 1000
    rows = []
    for link, gbit in (("1 GbE", 1), ("10 GbE", 10)):
        rate = gbit * 1e9 / 8 * 0.94
        link_ms = per_token / rate * 1000
        rows.append([
            link, f"{per_token / 1024:.0f} KiB", f"{rate / per_token:,.0f}",
            f"{link_ms:.2f}", f"{1000 / (compute_ms + overhead_ms + link_ms):.2f}",
            f"{1000 / (2 * compute_ms):.2f}",
        ])  # fmt: skip
    print(f"\non paper: a 70B pair, one model per machine, {memory_gbps:g} GB/s memory each "
          f"({compute_ms:.0f} ms of compute per token and model)")  # fmt: skip
    print(table(
        ["link", "bytes per token", "tokens/s the link allows", "ms on the link per token",
         "tokens/s, one model per machine", "tokens/s, both on one machine (if it fit)"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
