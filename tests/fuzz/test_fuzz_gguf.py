"""GGUF fuzzing in CI: a few hundred seeded mutations of valid files, each loaded by the
real CLI in a forked child; every one must load or fail with one line.

`scripts/fuzz_gguf.py` runs the same cases by the thousand and writes the README table.
"""

from __future__ import annotations

import collections
import os
import signal

import pytest
import runner
from gguf_mutator import MUTATIONS, build, kv_u32, mutate, parse
from seeds import make_cases, write_seeds

import dera_local.llama.gguf_inspect

CI_CASES = 360


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return write_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def test_the_layout_parser_rebuilds_each_seed_byte_for_byte(seeds):
    for seed in seeds[0]:
        layout = parse(seed.blob)
        assert build(layout) == seed.blob
        assert layout.data_start % 32 == 0 and layout.tensors and layout.kvs


def test_a_case_number_always_gives_the_same_mutation(seeds):
    blob = seeds[0][0].blob
    assert mutate(blob, 17) == mutate(blob, 17)
    assert mutate(blob, 17)[0] != blob
    families = {mutate(blob, n)[1] for n in range(300)}
    assert families == set(MUTATIONS)


def test_seeded_mutations_load_or_fail_in_one_line(seeds, tmp_path):
    seed_list, reference = seeds
    cases = make_cases(seed_list, range(CI_CASES), tmp_path)
    outcomes = list(runner.run_cases(cases, reference, keep="bad"))
    counts = collections.Counter(o.result for o in outcomes)
    bad = [
        f"case {o.case.number} ({o.case.what}): {o.reason}" for o in outcomes if o.result == "bad"
    ]
    assert not bad, "\n".join(bad)
    assert len(outcomes) == CI_CASES
    # Both outcomes occur: the harness runs models, and the damage is caught.
    assert counts["loads"] > 10 and counts["one-line error"] > CI_CASES // 2


def test_the_harness_sees_a_crash_the_pre_checks_prevent(seeds, tmp_path, monkeypatch):
    """With the alignment pre-check disabled in the (forked) children, a file whose
    tensors are not 32-byte aligned reaches llama.cpp, which aborts: classified bad."""
    seed_list, reference = seeds
    layout = parse(seed_list[0].blob)
    # general.alignment 8, laid out at 8: valid for the gguf reader, not for llama.cpp
    # (24 bytes of header then key/values of this length leave the data off 32).
    layout.kvs.append(kv_u32("general.alignment", 8))
    blob = build(layout, alignment=8)
    assert parse(blob).data_start % 32 != 0
    path = tmp_path / "unaligned.gguf"
    path.write_bytes(blob)
    case = runner.Case(0, path, "model", "alignment", "general.alignment := 8")

    [checked] = runner.run_cases([case], reference)
    assert checked.result == "one-line error" and "not a multiple of 32" in checked.reason

    monkeypatch.setattr(dera_local.llama.gguf_inspect, "TENSOR_ALIGNMENT", 1)
    [unchecked] = runner.run_cases([case], reference)
    assert (unchecked.result, unchecked.reason) == ("bad", "signal SIGABRT"), unchecked.reason


class _Usage:
    ru_maxrss = 50_000


@pytest.mark.parametrize(
    ("texts", "status", "timed_out", "expected"),
    [
        (["ok\n@@exit 0\n", "text\n@@exit 0\n"], 0, False, "loads"),
        (["Error: bad file\n@@exit 1\n"], 0, False, "one-line error"),
        (["warning: odd\nError: bad file\n@@exit 1\n"], 0, False, "one-line error"),
        (["Error: bad\nmore detail\n@@exit 1\n"], 0, False, "bad"),
        (["Traceback (most recent call last):\nValueError: x\n@@exit 1\n"], 0, False, "bad"),
        (["Error: usage\n@@exit 2\n"], 0, False, "bad"),
        (["half written"], 0, False, "bad"),
        ([""], signal.SIGSEGV, False, "bad"),
        ([""], signal.SIGKILL, True, "bad"),
    ],
)
def test_classification(texts, status, timed_out, expected):
    assert os.WIFSIGNALED(status) == (status != 0)
    assert runner.classify(texts, status, _Usage(), timed_out)[0] == expected


def test_a_memory_blow_up_is_bad():
    usage = _Usage()
    usage.ru_maxrss = runner.RSS_LIMIT_KB + 1
    result, reason = runner.classify(["ok\n@@exit 0\n"], 0, usage, False)
    assert result == "bad" and reason.startswith("memory blow-up")
