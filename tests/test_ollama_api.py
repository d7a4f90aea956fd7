"""Ollama's API on `dera-local serve` (server/ollama.py), through the official `ollama`
Python client against a real server on 127.0.0.1 (the tiny pair): model names as lam
presets, chat and generate, streaming and not, the same answers as /v1 at the same lam
and seed, and Ollama-style errors for what is refused."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from server_process import start_server

pytest.importorskip("uvicorn")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "hello"}]
# The same sampling on both APIs (Ollama's defaults differ from OpenAI's: say them all).
SEEDED = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "seed": 7}


@pytest.fixture(scope="module")
def server(aligned_path, reference_path):
    process, base = start_server(
        ["-m", str(aligned_path), "-mr", str(reference_path), "-c", "512"]
        + ["--api-key", API_KEY, "--lam", "1", "--lam-presets", "0,0.5,2"]
    )
    yield base
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def client(server):
    return ollama.Client(host=server, headers=AUTH)


@pytest.fixture
def v1(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def _raw(server: str, path: str, body: dict | bytes | None = None, headers=AUTH):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{server}{path}", data=data, headers=headers)
    try:
        response = urllib.request.urlopen(request)
        return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_models_are_the_lam_presets(client, server):
    names = [model.model for model in client.list().models]
    assert names == ["dera-local:latest", "dera-local:0", "dera-local:0.5", "dera-local:2"]
    shown = client.show("dera-local:0.5")
    assert shown.details.format == "gguf" and shown.modelinfo["dera.lambda"] == 0.5
    assert [model.model for model in client.ps().models] == ["dera-local:latest"]
    status, body = _raw(server, "/api/version")
    assert status == 200 and json.loads(body)["version"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3:8b")
    assert missing.value.status_code == 404 and "dera-local:<lam>" in missing.value.error


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_chat_equals_v1_at_the_same_lam_and_seed(client, v1, lam):
    answer = client.chat(
        model=f"dera-local:{lam:g}",
        messages=CHAT,
        options={**SEEDED, "num_predict": 16},
        stream=False,
    )
    expected = v1.chat.completions.create(
        model="dera-local",
        messages=CHAT,
        max_tokens=16,
        temperature=SEEDED["temperature"],
        top_p=SEEDED["top_p"],
        seed=SEEDED["seed"],
        extra_body={"dera_lambda": lam, "top_k": 40, "repeat_penalty": 1.1},
    )
    assert answer.message.content == expected.choices[0].message.content
    assert answer.eval_count == expected.usage.completion_tokens
    assert answer.done_reason == expected.choices[0].finish_reason
    # the lam option picks any lam, over the model name's
    by_option = client.chat(
        model="dera-local",
        messages=CHAT,
        options={**SEEDED, "num_predict": 16, "lam": lam},
        stream=False,
    )
    assert by_option.message.content == answer.message.content


def test_streaming_chat_and_generate_join_to_the_whole_answer(client, server, v1):
    options = {"temperature": 0, "num_predict": 20}
    whole = client.chat(model="dera-local", messages=CHAT, options=options, stream=False)
    parts = list(client.chat(model="dera-local", messages=CHAT, options=options, stream=True))
    assert len(parts) >= 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason
    # the raw stream: one JSON object per line, the last with DeRa's summary
    status, text = _raw(
        server, "/api/chat", {"model": "dera-local:0.5", "messages": CHAT, "options": options}
    )
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and lines[-1]["done"] is True
    assert lines[-1]["dera"]["lam"] == 0.5 and "kl_to_reference" in lines[-1]["dera"]
    # /api/generate: templated as a user turn by default, raw when asked
    generated = client.generate(model="dera-local", prompt="hello", options=options)
    assert generated.response == whole.message.content
    streamed = "".join(
        p.response
        for p in client.generate(model="dera-local", prompt="hello", options=options, stream=True)
    )
    assert streamed == whole.message.content
    # raw: the prompt as it is, no template, as /v1/completions reads it (Ollama's
    # default repeat_penalty 1.1 said explicitly there)
    raw = client.generate(model="dera-local", prompt="hello", options=options, raw=True)
    completion = v1.completions.create(
        model="dera-local",
        prompt="hello",
        max_tokens=20,
        temperature=0,
        extra_body={"repeat_penalty": 1.1},
    )
    assert raw.response == completion.choices[0].text != generated.response
    loaded = client.generate(model="dera-local", prompt="")  # Ollama: load the model only
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"model": "llama3", "messages": CHAT}, 404, "not found"),
        ({"messages": CHAT}, 400, "'model' is required"),
        ({"model": "dera-local", "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tool"),
        ({"model": "dera-local", "messages": CHAT, "options": {"mirostat": 2}}, 400, "mirostat"),
        ({"model": "dera-local", "messages": CHAT, "options": {"top_p": "x"}}, 400, "number"),
        ({"model": "dera-local", "messages": CHAT, "options": {"lam": 9}}, 400, "outside"),
        ({"model": "dera-local", "messages": CHAT, "options": {"num_ctx": 100000}}, 400, "-c"),
        ({"model": "dera-local", "messages": CHAT, "options": {"warp": 1}}, 400, "unknown"),
        ({"model": "dera-local", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": "dera-local", "messages": CHAT, "format": "yaml"}, 400, "format"),
        ({"model": "dera-local", "prompt": "x"}, 400, "belongs to /api/generate"),
    ],
)
def test_bad_chat_bodies_get_ollama_errors(server, body, status, says):
    got, text = _raw(server, "/api/chat", body)
    assert got == status
    error = json.loads(text)["error"]
    assert isinstance(error, str) and says in error


def test_harmless_options_pass_and_errors_reach_the_client(client, server):
    options = {"temperature": 0, "num_predict": 4, "num_thread": 8, "num_ctx": 256}
    assert client.chat(model="dera-local", messages=CHAT, options=options).done
    for payload in (b"{not json", b"[1]"):
        got, text = _raw(server, "/api/generate", payload)
        assert got == 400 and isinstance(json.loads(text)["error"], str)
    got, text = _raw(server, "/api/tags", headers={})  # the server's API key holds here too
    assert got == 401 and "API key" in json.loads(text)["error"]
    got, text = _raw(server, "/api/nothing")
    assert got == 404 and json.loads(text)["error"]
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="dera-local", prompt="x", suffix="y")
    assert refused.value.status_code == 400 and "suffix" in refused.value.error


def test_json_format_constrains_the_answer(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    answer = client.chat(
        model="dera-local",
        messages=CHAT,
        format=schema,
        options={"temperature": 0, "num_predict": 40},
    )
    if answer.done_reason == "stop":  # a tiny model may run out of tokens first
        assert isinstance(json.loads(answer.message.content)["a"], int)
    else:
        assert answer.message.content.lstrip().startswith("{")


def test_logprobs_in_ollamas_format_are_v1s_for_the_same_answer(client, v1):
    """Ollama's logprobs/top_logprobs (>= 0.12.11), streamed and not: each token with its
    log-probability under the mixture and its alternatives, as /v1 gives them."""
    options = {"temperature": 0, "num_predict": 8}
    whole = client.chat(
        model="dera-local:0.5", messages=CHAT, options=options, logprobs=True, top_logprobs=3
    )
    reply = v1.chat.completions.create(
        model="dera-local", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"dera_lambda": 0.5, "repeat_penalty": 1.1, "top_k": 40,
                                    "top_p": 0.9},
    )  # fmt: skip
    expected = [
        (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
        for e in reply.choices[0].logprobs.content
    ]
    got = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
           for e in whole.logprobs]  # fmt: skip
    assert got == expected and len(got) == whole.eval_count
    assert "".join(token for token, _, _ in got) == whole.message.content
    parts = list(
        client.chat(
            model="dera-local:0.5", messages=CHAT, options=options, logprobs=True, stream=True
        )
    )
    streamed = [(e.token, e.logprob) for p in parts for e in (p.logprobs or [])]
    assert streamed == [(token, value) for token, value, _ in got]
    plain = client.chat(model="dera-local:0.5", messages=CHAT, options=options)
    assert not plain.logprobs  # only when asked


def test_what_ollama_clients_probe_is_answered(client, server):
    """/api/version is numeric semver; /api/show has capabilities and the context length
    where Ollama's clients read it (<architecture>.context_length); keep_alive passes."""
    import re

    status, body = _raw(server, "/api/version")
    assert re.fullmatch(r"\d+\.\d+\.\d+", json.loads(body)["version"])
    shown = client.show("dera-local")
    assert "completion" in shown.capabilities
    architecture = shown.modelinfo["general.architecture"]
    # what one request may use: the server's -c 512 shared by its 2 slots
    assert shown.modelinfo[f"{architecture}.context_length"] == 256
    answer = client.chat(
        model="dera-local", messages=CHAT, options={"num_predict": 2}, keep_alive="5m"
    )
    assert answer.done
