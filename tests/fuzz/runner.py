"""Runs fuzz cases: each mutated GGUF goes through `dera-local info` and `dera-local
generate` in a forked child with a time and memory limit, and is classified.

Forking a parent that has already imported dera-local and llama.cpp makes a case cost
milliseconds instead of an interpreter start; a crash still only takes the child down.
The parent never runs a model, so no llama.cpp or OpenMP threads exist when it forks.

Outcomes: "loads" (generate ran), "one-line error" (exit 1 with a single `Error:` line,
warnings allowed), or "bad" (a signal, a traceback, another exit status, more output than
one line, a hang, or a memory blow-up), with the reason.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TIME_LIMIT_S = 20.0
MEMORY_LIMIT_BYTES = 3 * 2**30  # on top of the parent's address space
RSS_LIMIT_KB = 1_500_000  # a tiny model needs ~60 MB; more than this is a blow-up


@dataclass(frozen=True)
class Case:
    number: int
    path: Path  # the mutated file
    kind: str  # "model" or "lora"
    family: str  # mutation family
    what: str  # the mutation, for reproducing it


@dataclass(frozen=True)
class Outcome:
    case: Case
    result: str  # "loads", "one-line error" or "bad"
    reason: str  # the error line, or why the case is bad


def commands(case: Case, reference: Path) -> list[list[str]]:
    """The CLI calls a case runs: `info`, then one short greedy generation."""
    generate = ["generate", "-n", "2", "--temp", "0", "-t", "1", "-c", "64", "--draft-max", "0"]
    if case.kind == "lora":
        load = ["-mr", str(reference), "--lora", str(case.path)]
    else:
        load = ["-m", str(case.path), "-mr", str(case.path)]
    return [["info", *load], generate + load + ["hello"]]


def _child(argv_list: list[list[str]], out_prefix: Path) -> None:
    """In the forked child: run each command with its output in its own file."""
    import faulthandler

    from dera_local.cli import cli

    # pytest's faulthandler writes to its own copy of stderr: a crash the harness is
    # meant to observe would print a Python stack on the test run's output.
    faulthandler.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + MEMORY_LIMIT_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    for env in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA", "DERA_PAIR", "DERA_DRAFT_MODEL"):
        os.environ.pop(env, None)
    for i, argv in enumerate(argv_list):
        fd = os.open(f"{out_prefix}.{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Fresh streams on the new descriptors (pytest replaces sys.stdout with its own).
        sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
        code = 0
        try:
            cli.main(argv, prog_name="dera-local", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what a user would see as a traceback
            import traceback

            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, f"\n@@exit {code}\n".encode())
        if code != 0:
            break
    os._exit(0)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def classify(texts: list[str], status: int, rusage, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "bad", f"hang (killed after {TIME_LIMIT_S:.0f} s)"
    if os.WIFSIGNALED(status):
        return "bad", f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    if rusage.ru_maxrss > RSS_LIMIT_KB:
        return "bad", f"memory blow-up ({rusage.ru_maxrss // 1024} MB)"
    last_error = ""
    for text in texts:
        body, marker, tail = text.rpartition("@@exit ")
        if not marker:
            return "bad", "ended without finishing (no exit marker)"
        code = int(tail.split()[0])
        lines = [ln for ln in body.splitlines() if ln.strip()]
        if "Traceback" in body:
            return "bad", "traceback: " + (lines[-1] if lines else "")
        if code == 0:
            continue
        errors = [ln for ln in lines if not ln.startswith("warning: ")]
        if code != 1:
            return "bad", f"exit status {code}: {(errors or [''])[-1]}"
        if len(errors) != 1 or not errors[0].startswith("Error: "):
            return "bad", f"{len(errors)} lines of output: {' | '.join(errors)[:300]}"
        last_error = errors[0].removeprefix("Error: ")
    if last_error:
        return "one-line error", last_error
    return "loads", ""


def run_cases(
    cases: Iterable[Case], reference: Path, *, parallel: int = 2, keep: str = "all"
) -> Iterator[Outcome]:
    """Runs cases `parallel` at a time, yielding outcomes as children finish; `keep="bad"`
    deletes the files of cases that passed."""
    import dera_local.cli  # noqa: F401 - imported once here, inherited by every child

    running: dict[int, tuple[Case, float, Path]] = {}
    pending = iter(cases)
    exhausted = False
    while running or not exhausted:
        while not exhausted and len(running) < parallel:
            case = next(pending, None)
            if case is None:
                exhausted = True
                break
            out_prefix = case.path.with_suffix(".out")
            argv_list = commands(case, reference)
            pid = os.fork()
            if pid == 0:
                try:
                    _child(argv_list, out_prefix)
                finally:
                    os._exit(98)
            running[pid] = (case, time.monotonic(), out_prefix)
        if not running:
            break
        pid, status, rusage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            for child, (_, started, _) in list(running.items()):
                if time.monotonic() - started > TIME_LIMIT_S:
                    os.kill(child, signal.SIGKILL)
                    _, status, rusage = os.wait4(child, 0)
                    yield _finish(running.pop(child), status, rusage, True, keep)
            time.sleep(0.002)
            continue
        yield _finish(running.pop(pid), status, rusage, False, keep)


def _finish(
    entry: tuple[Case, float, Path], status: int, rusage, timed_out: bool, keep: str
) -> Outcome:
    case, _, out_prefix = entry
    texts = []
    for i in range(2):
        path = Path(f"{out_prefix}.{i}")
        if path.exists():
            texts.append(path.read_text(errors="replace"))
            path.unlink()
    if not texts:
        texts = [""]
    result, reason = classify(texts, status, rusage, timed_out)
    if keep == "bad" and result != "bad":
        case.path.unlink(missing_ok=True)
    return Outcome(case, result, reason)
