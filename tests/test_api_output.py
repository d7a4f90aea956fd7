"""The API says what it did: per-token log-probabilities (checked against `score`, an
independent teacher-forced computation), the `dera` object, JSON-schema answers that
validate, logit_bias, lam bounds, and no request field silently ignored."""

from __future__ import annotations

import json
import threading

import pytest
from server_process import start_server

import dera_local
from dera_local.analysis.score import score
from dera_local.analysis.sweep import sweep
from dera_local.chat import ChatTemplate
from dera_local.errors import BadParameterError
from dera_local.sampling.json_schema import json_schema_grammar
from dera_local.server.lam_range import LamRange
from dera_local.server.requests import RequestError, parse_common

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")

GREEDY = dera_local.SamplingParams(temperature=0)
PROMPT_IDS = [260, 84, 104, 101, 32, 99, 97, 116]  # BOS "The cat"
TOLERANCE = 2e-4  # float32 mixing in the hook vs score's float64 (rounding only)


@pytest.fixture(scope="module")
def server(aligned_path, reference_path):
    process, base = start_server(
        ["-m", str(aligned_path), "-mr", str(reference_path), "-c", "2048", "--parallel", "4",
         "--draft-max", "4"]
    )  # fmt: skip
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), base
    process.terminate()
    process.wait(timeout=30)


def _expected(pair, prompt_ids, lam, n):
    """The in-process greedy tokens, and score's teacher-forced log-probabilities of them
    under the mixture at lam, the reference (lam 0) and the aligned model (lam 1)."""
    tokens = pair.generate(prompt_ids, lam=lam, sampling=GREEDY, max_tokens=n).tokens
    rows = [score(pair, prompt_ids, tokens, [at])[0] for at in (lam, 0.0, 1.0)]
    return tokens, rows


def _check_dera(dera, rows, lam):
    mixture, reference, aligned = rows
    assert dera["lam"] == lam
    assert dera["logprob_mixture"] == pytest.approx(mixture.logprob, abs=TOLERANCE * 10)
    assert dera["logprob_reference"] == pytest.approx(reference.logprob, abs=TOLERANCE * 10)
    assert dera["logprob_aligned"] == pytest.approx(aligned.logprob, abs=TOLERANCE * 10)
    assert dera["kl_to_reference"] == pytest.approx(
        mixture.logprob - reference.logprob, abs=TOLERANCE * 20
    )
    # the mismatch to the exact target, from the teacher-forced scores
    expected = lam * aligned.logprob + (1 - lam) * reference.logprob - mixture.logprob
    assert dera["mismatch"] == pytest.approx(expected, abs=TOLERANCE * 40)


@pytest.mark.parametrize("lam", [0.5, 1.5])
def test_completion_logprobs_equal_score_and_top_logprobs_rank(server, pair, lam):
    client, _ = server
    tokens, rows = _expected(pair, PROMPT_IDS, lam, 12)
    answer = client.completions.create(
        model="dera-local", prompt=PROMPT_IDS, max_tokens=12, temperature=0, logprobs=5,
        extra_body={"dera_lambda": lam},
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "length"  # no end token: the sums cover the same tokens
    logprobs = choice.logprobs
    pieces = [pair.model.token_bytes(t, special=True).decode(errors="replace") for t in tokens]
    assert logprobs.tokens == pieces
    assert logprobs.token_logprobs == pytest.approx(rows[0].token_logprobs, abs=TOLERANCE)
    assert logprobs.text_offset == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    for chosen, value, top in zip(
        pieces, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        values = list(top.values())
        # The format is a map keyed by token text: alternatives that are partial UTF-8
        # (shown as U+FFFD) share one key, the most likely one's (chat's list keeps all).
        assert len(top) == 5 or (len(top) < 5 and "\ufffd" in top)
        assert values == sorted(values, reverse=True)
        assert next(iter(top)) == chosen and top[chosen] == value  # greedy: the top one
    _check_dera(answer.model_extra["dera"], rows, lam)


def test_chat_logprobs_streamed_and_not_equal_score(server, pair):
    client, _ = server
    messages = [{"role": "user", "content": "hello there"}]
    prompt_ids = ChatTemplate.for_pair(pair).tokens(pair, messages)
    tokens, rows = _expected(pair, prompt_ids, 0.7, 10)
    kwargs = dict(model="dera-local@0.5", messages=messages, max_tokens=10, temperature=0,
                  logprobs=True, top_logprobs=3, extra_body={"dera_lambda": 0.7})  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    stream = client.chat.completions.create(**kwargs, stream=True)
    streamed, dera = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
        dera = chunk.model_extra.get("dera") or dera
    for entries in (content, streamed):
        assert [bytes(e.bytes) for e in entries] == [
            pair.model.token_bytes(t, special=True) for t in tokens
        ]
        assert [e.logprob for e in entries] == pytest.approx(
            rows[0].token_logprobs[: len(entries)], abs=TOLERANCE
        )
        for entry in entries:
            ranked = [t.logprob for t in entry.top_logprobs]
            assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
            assert entry.top_logprobs[0].token == entry.token
    whole_dera = whole.model_extra["dera"]
    per_token = whole_dera.pop("token_logprobs")  # asked for per token: the three lists
    assert per_token["mixture"][: len(content)] == [e.logprob for e in content]
    assert len(per_token["aligned"]) == len(per_token["reference"]) == len(per_token["mixture"])
    dera.pop("token_logprobs")
    assert dera == pytest.approx(whole_dera, abs=TOLERANCE)


def test_every_answer_carries_dera_and_generate_json_too(server, pair, run):
    client, _ = server
    answer = client.completions.create(
        model="dera-local", prompt=PROMPT_IDS, max_tokens=6, temperature=0
    )
    tokens, rows = _expected(pair, PROMPT_IDS, 1.0, 6)
    _check_dera(answer.model_extra["dera"], rows, 1.0)
    assert answer.choices[0].logprobs is None  # per token only when asked
    printed = run("generate", "hi", "--temp", "0", "-n", "4", "--json", "--logprobs", "2")
    data = json.loads(printed.output)
    assert set(data["dera"]) == {
        "logprob_aligned", "logprob_reference", "logprob_mixture", "kl_to_reference",
        "mismatch", "mismatch_per_token",
    }  # fmt: skip
    assert len(data["logprobs"]["content"]) == len(data["tokens"])
    assert all(len(e["top_logprobs"]) == 2 for e in data["logprobs"]["content"])


SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["calm", "wild"]},
        "size": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "owner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 3}},
            "required": ["ok", "name"],
            "additionalProperties": False,
        },
    },
    "required": ["mood", "size", "tags", "owner"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate_at_several_lams_and_concurrent_clients(server):
    client, _ = server
    results, errors = {}, []

    def ask(lam: float, seed: int) -> None:
        try:
            answer = client.chat.completions.create(
                model="dera-local", messages=[{"role": "user", "content": f"pet {seed}"}],
                max_tokens=300, temperature=0.8, seed=seed,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "pet", "schema": SCHEMA}},
                extra_body={"dera_lambda": lam},
            )  # fmt: skip
            results[(lam, seed)] = answer.choices[0]
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=ask, args=(lam, seed))
        for lam in (0.0, 0.5, 1.0, 2.0)
        for seed in (1, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 8
    for choice in results.values():
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    plain = client.chat.completions.create(
        model="dera-local", messages=[{"role": "user", "content": "x"}], max_tokens=200,
        temperature=0, response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_a_schema_the_converter_cannot_handle_is_a_400_naming_it(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="dera-local", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "string", "pattern": "(?<=a)b"}}},
        )  # fmt: skip
    error = caught.value.body
    assert error["param"] == "response_format" and "not supported" in error["message"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "bad name"}}]),
        ("tool_choice", "required"),  # without tools
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("n", 2),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("frobnicate", 1),
    ],
)
def test_each_refused_field_is_a_400_naming_it(server, field, value):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="dera-local", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            extra_body={field: value},
        )  # fmt: skip
    assert caught.value.body["param"] == field


def test_harmless_fields_pass_and_empty_tools_ask_for_nothing(server):
    client, _ = server
    answer = client.chat.completions.create(
        model="dera-local", messages=[{"role": "user", "content": "x"}], max_tokens=2,
        user="someone", metadata={"k": "v"}, store=False, tools=[],
    )  # fmt: skip
    assert answer.choices[0].message.content is not None


def test_logit_bias_of_minus_100_removes_a_token(server, pair):
    client, _ = server

    def answer(**extra):
        return client.completions.create(
            model="dera-local", prompt=PROMPT_IDS, max_tokens=16, temperature=0, logprobs=0,
            **extra,
        ).choices[0].logprobs.tokens  # fmt: skip

    plain = answer()
    first = plain[0].encode()
    token_id = next(t for t in range(pair.n_vocab) if pair.model.token_bytes(t) == first)
    biased = answer(logit_bias={str(token_id): -100})
    assert plain[0] not in biased and biased != plain


def test_lams_outside_the_range_are_refused_and_presets_fit_it(server):
    body = {"messages": [{"role": "user", "content": "x"}], "dera_lambda": -0.5}
    with pytest.raises(RequestError, match=r"outside this server's range \[0, 2\]") as caught:
        parse_common(body, 1.0, lam_range=LamRange())
    assert caught.value.param == "dera_lambda"
    with pytest.raises(RequestError) as caught:
        parse_common({"model": "dera-local@2.5", "prompt": "x"}, 1.0, chat=False,
                     lam_range=LamRange())  # fmt: skip
    assert caught.value.param == "model"
    with pytest.raises(BadParameterError, match="MIN:MAX"):
        LamRange.parse("2:1")
    client, base = server
    import urllib.request

    with urllib.request.urlopen(f"{base}/v1/models") as listing:
        models = json.loads(listing.read())
    assert models["dera_lam_range"] == [0.0, 2.0]
    described = {m["id"]: m["description"] for m in models["data"]}
    assert described["dera-local@0"].startswith("lam 0: the reference model alone")
    assert all(0 <= m["dera_lambda"] <= 2 for m in models["data"])


def test_a_schema_holds_with_a_negative_prompt_and_in_a_sweep(pair):
    """The grammar sits in every slot's sampler chain: guided generation and a batched
    lam sweep give schema-valid JSON too."""
    guided = pair.generate(
        "pet", lam=1.5, max_tokens=300, sampling=dera_local.SamplingParams(seed=3),
        json_schema=SCHEMA, negative_prompt="no pets", cfg_scale=1.5,
    )  # fmt: skip
    assert guided.finish_reason == "stop"
    jsonschema.validate(json.loads(guided.text), SCHEMA)
    sampling = dera_local.SamplingParams(seed=5, grammar=json_schema_grammar(SCHEMA))
    rows = list(sweep(pair, [("0", "pet")], [0.0, 1.0, 2.0], sampling=sampling, max_tokens=300))
    for row in rows:
        assert row.finish_reason == "stop"
        jsonschema.validate(json.loads(row.text), SCHEMA)


def test_serve_refuses_a_default_lam_outside_its_range(run):
    result = run("serve", "--lam", "3", "--port", "0")
    assert result.exit_code == 1
    assert "outside the server's lam range [0, 2]" in result.stderr
