"""Models on llama.cpp RPC workers (dera-local worker) on 127.0.0.1: the same tokens as on
this machine, the two decodes overlapped, and every fault one clear error, never a hang
or an aborted process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from rpc_workers import Worker, fake_worker, workers
from server_process import free_port, start_server

import dera_local
import dera_local.llama.devices
from dera_local.cli import cli
from dera_local.errors import BadParameterError, WorkerError
from dera_local.model_sets.mixture import load_mixture
from dera_local.rpc.endpoints import is_loopback, parse_endpoints

pytestmark = pytest.mark.skipif(
    not dera_local.llama.devices.has_rpc(), reason="llama.cpp built without GGML_RPC"
)

PROMPT = "Once upon a time"
SEEDED = dera_local.SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=11)


def _outputs(model_set, lam: float = 1.5) -> list[list[int]]:
    greedy = dera_local.SamplingParams(temperature=0)
    return [
        model_set.generate(PROMPT, lam=lam, sampling=sampling, max_tokens=24).tokens
        for sampling in (greedy, SEEDED)
    ]


@pytest.fixture(scope="module")
def local_outputs(aligned_path, reference_path):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=256, n_threads=1) as pair:
        return _outputs(pair)


# -- endpoints --------------------------------------------------------------------------
def test_endpoints_parse_and_bad_ones_are_one_line():
    assert parse_endpoints("10.0.0.2:50052, gpu-box:7000") == ("10.0.0.2:50052", "gpu-box:7000")
    assert parse_endpoints("local") == () and parse_endpoints(None) == ()
    for bad, says in (
        ("10.0.0.2", "not HOST:PORT"),
        ("a:0", "port"),
        ("a:70000", "port"),
        ("[::1]:5", "IPv4"),
        ("bad host:5", "not a host"),
        ("a:1,a:1", "twice"),
    ):
        with pytest.raises(BadParameterError, match=says):
            parse_endpoints(bad)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


# -- the same tokens as on this machine -------------------------------------------------
def test_both_models_split_over_two_workers_give_the_local_tokens(
    aligned_path, reference_path, local_outputs
):
    with workers(2) as (one, two):
        endpoints = f"{one.endpoint},{two.endpoint}"
        with dera_local.load_pair(
            aligned_path, reference_path, n_ctx=256, n_threads=1, rpc=endpoints
        ) as pair:
            # Both models on the same two workers: their decodes take turns, as llama.cpp's
            # RPC client keeps per-device state two threads would race on.
            assert not pair.overlap_decodes
            assert _outputs(pair) == local_outputs
            for model in pair.loaded_models():
                # The two repeating layers on one worker, the output layer on the other:
                # llama.cpp's own split by free memory; nothing but the input stays here.
                assert set(model.layers.devices) == {"RPC0", "RPC1"}
                assert [d.description for d in model.devices] == [one.endpoint, two.endpoint]
        with pytest.raises(BadParameterError, match="share the RPC worker device"):
            dera_local.load_pair(aligned_path, reference_path, rpc=endpoints, overlap_decodes=True)


def test_each_model_on_its_own_worker_overlaps_the_two_decodes(
    aligned_path, reference_path, local_outputs
):
    with (
        workers(2) as (one, two),
        dera_local.load_pair(
            aligned_path,
            reference_path,
            n_ctx=256,
            n_threads=1,
            rpc_aligned=one.endpoint,
            rpc_reference=two.endpoint,
        ) as pair,
    ):
        assert pair.overlap_decodes  # on by default with models on workers
        decodes = pair._slots.home.decodes
        decodes.recording = True
        assert _outputs(pair) == local_outputs
        threads = {t for t in threading.enumerate() if t.name == "dera-rpc-calls"}
        assert threads  # the remote calls run in their own threads...
        (first, start_a, end_a), (second, start_b, end_b) = sorted(decodes.spans)
        assert (first, second) == (0, 1)
        assert start_a < end_b and start_b < end_a  # the two decodes ran at once
        aligned, reference = pair.loaded.aligned_model, pair.loaded.reference_model
        assert aligned.placement.endpoints == (one.endpoint,)
        assert reference.placement.endpoints == (two.endpoint,)
        assert set(aligned.layers.devices) == {aligned.devices[0].name}
        assert set(reference.layers.devices) == {reference.devices[0].name}
    for thread in threads:  # ...which end with the models: load/close cycles leak none
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_a_lora_pair_on_a_worker_or_split_over_two_places_gives_the_local_tokens(
    reference_path, lora_path
):
    with dera_local.load_pair(None, reference_path, lora=lora_path, n_ctx=256, n_threads=1) as pair:
        local = _outputs(pair, lam=2.0)
    with workers(1) as (one,):
        with dera_local.load_pair(
            None, reference_path, lora=lora_path, n_ctx=256, n_threads=1, rpc=one.endpoint
        ) as pair:
            assert pair.loaded.aligned_model is pair.loaded.reference_model  # one copy
            assert pair.loaded.reference_model.placement.remote
            assert _outputs(pair, lam=2.0) == local
        # Placed apart, each side has its own copy of the base (the adapter on the
        # aligned one's), and the two decodes overlap.
        with dera_local.load_pair(
            None, reference_path, lora=lora_path, n_ctx=256, n_threads=1,
            rpc_aligned=one.endpoint, rpc_reference="local",
        ) as pair:  # fmt: skip
            assert pair.loaded.aligned_model is not pair.loaded.reference_model
            assert pair.loaded.aligned_model.placement.endpoints == (one.endpoint,)
            assert not pair.loaded.reference_model.placement.remote
            assert pair.overlap_decodes
            assert _outputs(pair, lam=2.0) == local


def test_a_mixture_with_a_term_on_a_worker_and_a_draft_model_on_another(
    aligned_path, reference_path, local_outputs
):
    spec = "1.5*{a}@{w} - 0.5*{r}"
    with load_mixture(
        spec.format(a=aligned_path, w="local", r=reference_path), n_ctx=256, n_threads=1
    ) as mixture:
        local = _outputs(mixture, lam=1.0)
    assert local == local_outputs  # 1.5*a - 0.5*r is DeRa at lam 1.5
    with workers(2) as (one, two):
        with load_mixture(
            spec.format(a=aligned_path, w=one.endpoint, r=reference_path),
            n_ctx=256,
            n_threads=1,
        ) as mixture:
            placed = [s.model.placement.endpoints for s in mixture.sources]
            assert placed == [(one.endpoint,), ()]
            assert _outputs(mixture, lam=1.0) == local
        with dera_local.load_pair(
            aligned_path,
            reference_path,
            n_ctx=256,
            n_threads=1,
            draft_model=aligned_path,
            rpc_draft=two.endpoint,
        ) as pair:
            assert pair.loaded.draft_model.placement.endpoints == (two.endpoint,)
            assert _outputs(pair) == local_outputs


# -- faults -----------------------------------------------------------------------------
def test_an_unreachable_worker_is_one_error_naming_it(aligned_path, reference_path):
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(WorkerError, match=f"cannot reach an RPC worker at {endpoint}"):
        dera_local.load_pair(aligned_path, reference_path, rpc=endpoint)
    result = CliRunner().invoke(
        cli, ["generate", "-m", str(aligned_path), "-mr", str(reference_path), "--rpc",
              endpoint, "hi"]
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and endpoint in lines[0] and "Traceback" not in result.output


def test_a_worker_of_another_protocol_version_is_refused(aligned_path, reference_path):
    refused = pytest.raises(WorkerError, match=r"speaks protocol 6\.0\.0, this llama\.cpp 7\.")
    with fake_worker((6, 0, 0)) as endpoint, refused:
        dera_local.load_pair(aligned_path, reference_path, rpc_reference=endpoint)


def test_a_worker_that_never_answers_the_handshake_is_named_not_waited_on(
    aligned_path, reference_path
):
    """What a worker busy with another host looks like: the connection is accepted (the
    listen backlog), the handshake is never answered; llama.cpp would wait forever."""
    silent = socket.create_server(("127.0.0.1", 0))  # listens, never accepts
    endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
    started = time.monotonic()
    with silent, pytest.raises(WorkerError, match="did not answer within 1 s"):
        dera_local.load_pair(aligned_path, reference_path, rpc=endpoint, rpc_timeout=1)
    assert time.monotonic() - started < 5


def test_a_worker_bound_beyond_loopback_warns_and_bad_worker_input_is_one_line():
    worker = Worker(host="0.0.0.0")
    try:
        worker.process.send_signal(signal.SIGINT)  # Ctrl-C ends it
        worker.process.wait(timeout=10)
        assert "no authentication or encryption" in worker.process.stderr.read()
    finally:
        worker.stop()
    runner = CliRunner()
    for args, says in (
        (["--device", "NoSuchGPU"], "no device named 'NoSuchGPU'"),
        (["--host", "bad host"], "not a host name"),
    ):
        result = runner.invoke(cli, ["worker", "--port", str(free_port()), *args])
        assert result.exit_code == 1 and says in result.output, result.output
    with workers(1) as (one,):
        result = runner.invoke(cli, ["worker", "--port", str(one.port)])
        assert result.exit_code == 1 and "cannot listen on" in result.output


_LOSE_A_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    import dera_local
    aligned, reference, endpoint, pid, how = sys.argv[1:]
    pair = dera_local.load_pair(aligned, reference, n_ctx=256, n_threads=1,
                                rpc_aligned=endpoint, rpc_timeout=2)
    stream = pair.stream("Once upon a time", lam=1.5, max_tokens=200,
                         sampling=dera_local.SamplingParams(temperature=0))
    pieces = 0
    started = time.monotonic()
    try:
        for piece in stream:
            pieces += 1
            if pieces == 3:
                os.kill(int(pid), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                started = time.monotonic()
    except dera_local.DeraError as exc:
        print(f"{type(exc).__name__} after {time.monotonic() - started:.1f} s: {exc}")
    try:
        pair.generate("again", max_tokens=2)
    except dera_local.DeraError as exc:
        print("then:", type(exc).__name__)
    pair.close()
    print("closed")
    """
)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_worker_lost_mid_generation_is_an_error_not_an_abort_or_a_hang(
    aligned_path, reference_path, how
):
    """kill: llama.cpp would abort the process; stop (the worker alive but silent, as a cut
    cable looks): llama.cpp would wait in recv() forever. Both are a WorkerError, then
    every remote call is refused, and the process closes and exits normally."""
    worker = Worker()
    try:
        run = subprocess.run(
            [sys.executable, "-c", _LOSE_A_WORKER, str(aligned_path), str(reference_path),
             worker.endpoint, str(worker.process.pid), how],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        if how == "stop":
            os.kill(worker.process.pid, signal.SIGCONT)
        worker.stop()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("WorkerError after"), run.stdout
    assert f"lost the RPC worker {worker.endpoint}" in lines[0]
    reason = "no answer within 2 s" if how == "stop" else "Remote RPC server crashed"
    assert reason in lines[0]
    waited = float(lines[0].split()[2])
    assert waited < (4 if how == "stop" else 1.5)
    assert lines[1:] == ["then: WorkerError", "closed"]


def test_chat_exits_1_with_one_line_when_its_worker_dies(aligned_path, reference_path):
    worker = Worker()
    chat = subprocess.Popen(
        [sys.executable, "-m", "dera_local.cli", "chat", "-m", str(aligned_path), "-mr",
         str(reference_path), "--rpc-reference", worker.endpoint, "--temp", "0", "-n", "8",
         "-c", "512"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        chat.stdin.write("hello\n")
        chat.stdin.flush()
        first_answer = chat.stdout.readline()
        worker.stop()
        chat.stdin.write("and again\n")
        chat.stdin.close()
        assert chat.wait(timeout=30) == 1
        errors = chat.stderr.read().strip().splitlines()
    finally:
        chat.kill()
        worker.stop()
    assert first_answer.strip()
    assert len(errors) == 1 and f"lost the RPC worker {worker.endpoint}" in errors[0], errors


def _post(base: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _health(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_fails_the_stream_counts_it_and_refuses_new_work_clearly(
    aligned_path, reference_path
):
    worker = Worker()
    server, base = start_server(
        ["-m", str(aligned_path), "-mr", str(reference_path), "--rpc-aligned",
         worker.endpoint, "--rpc-timeout", "1", "-c", "4096", "--parallel", "1"]
    )  # fmt: skip
    try:
        status, _ = _post(base, {"prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert status == 200
        request = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps(
                {"prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(request, timeout=30) as stream:
            first = stream.readline()
            os.kill(worker.process.pid, signal.SIGSTOP)  # silent, not closed: a cut cable
            events = [first] + [line for line in stream if line.strip()]
        assert events[-1].strip() == b"data: [DONE]"
        error = json.loads(events[-2].removeprefix(b"data: "))["error"]
        assert error["type"] == "worker_unavailable"
        assert "no answer within 1 s" in error["message"]
        status, body = _post(base, {"prompt": "hi", "max_tokens": 4})
        assert status == 503
        assert json.loads(body)["error"]["type"] == "worker_unavailable"
        status, health = _health(base)
        assert status == 503 and health["status"] == "unavailable"
        assert health["completed"] == 1 and health["failed"] == 2
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
        worker.stop()
        server.terminate()
        server.wait(timeout=30)


def test_info_lists_each_models_devices_layers_and_worker_memory(aligned_path, reference_path):
    with workers(2) as (one, two):
        result = CliRunner().invoke(
            cli, ["info", "-m", str(aligned_path), "-mr", str(reference_path),
                  "--rpc-aligned", one.endpoint, "--rpc-reference", two.endpoint]
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    for endpoint in (one.endpoint, two.endpoint):
        assert f"worker {endpoint}: protocol 7." in text
        assert "MiB free of" in text
    assert "aligned: RPC" in text and "layers" in text
