"""The `llm` plugin (dera_local/llm_plugin.py) through llm's own Python API and its CLI
(click's CliRunner), on the tiny pair named by DERA_ALIGNED / DERA_REFERENCE: lam
changes the answer and matches the Python API's, options are validated as llm errors,
conversations carry the chat, streaming yields chunks, and the logged response records
lam and the answer's KL to the reference."""

from __future__ import annotations

import json

import pytest

llm = pytest.importorskip("llm")
from click.testing import CliRunner  # noqa: E402
from llm.cli import cli as llm_cli  # noqa: E402

from dera_local import ChatTemplate, SamplingParams  # noqa: E402

GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture
def model(aligned_path, reference_path, monkeypatch, tmp_path):
    from dera_local import llm_plugin

    monkeypatch.setenv("DERA_ALIGNED", str(aligned_path))
    monkeypatch.setenv("DERA_REFERENCE", str(reference_path))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))  # llm's logs.db and settings
    yield llm.get_model("dera-local")
    llm_plugin.close_models()


def _expected(pair, messages, lam, max_tokens=12) -> str:
    tokens = ChatTemplate.for_pair(pair).tokens(pair, messages)
    greedy = SamplingParams(temperature=0.0)
    return pair.generate(tokens, lam=lam, sampling=greedy, max_tokens=max_tokens).text


def test_lam_changes_the_answer_as_the_python_api_does(model, pair):
    user = [{"role": "user", "content": "hello"}]
    answers = {}
    for lam in (0.0, 1.0):
        response = model.prompt("hello", lam=lam, **GREEDY)
        answers[lam] = response.text()
        assert answers[lam] == _expected(pair, user, lam)
        assert response.response_json["lam"] == lam
        assert response.response_json["dera"]["kl_to_reference"] >= 0 or lam == 0.0
    assert answers[0.0] != answers[1.0]


def test_streaming_yields_chunks(model):
    chunks = list(model.prompt("tell me", lam=0.5, temperature=0, max_tokens=24))
    assert len(chunks) > 1
    assert "".join(chunks) == model.prompt("tell me", lam=0.5, temperature=0, max_tokens=24).text()


def test_a_conversation_carries_the_chat(model, pair):
    conversation = model.conversation()
    first = conversation.prompt("hello", lam=0.5, **GREEDY).text()
    second = conversation.prompt("and then?", lam=0.5, **GREEDY).text()
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    ]
    assert second == _expected(pair, messages, 0.5)


def test_options_are_validated_as_llm_errors(model):
    runner = CliRunner()
    for option, value, says in (
        ("lam", "nan", "lam"),
        ("temperature", "9", "temperature"),
        ("max_tokens", "0", "max_tokens"),
        ("warp", "1", "warp"),
    ):
        result = runner.invoke(llm_cli, ["-m", "dera-local", "-o", option, value, "hi"])
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output and says in result.output
    result = runner.invoke(llm_cli, ["-m", "dera-local", "-o", "cfg_scale", "2", "hi"])
    assert result.exit_code != 0 and "negative_prompt" in result.output


def test_the_cli_answers_logs_lam_and_kl_and_lists_models(model, pair):
    runner = CliRunner()
    answer = runner.invoke(
        llm_cli,
        ["-m", "dera-local", "-o", "lam", "0.5", "-o", "temperature", "0"]
        + ["-o", "max_tokens", "12", "hello"],
    )
    assert answer.exit_code == 0, answer.output
    assert answer.output == _expected(pair, [{"role": "user", "content": "hello"}], 0.5) + "\n"
    logged = runner.invoke(llm_cli, ["logs", "--json", "-n", "1"])
    entry = json.loads(logged.output)[0]
    assert entry["response_json"]["lam"] == 0.5
    assert "kl_to_reference" in entry["response_json"]["dera"]
    follow_up = runner.invoke(
        llm_cli, ["-c", "-o", "temperature", "0", "-o", "max_tokens", "12", "more"]
    )
    assert follow_up.exit_code == 0, follow_up.output
    listed = runner.invoke(llm_cli, ["models"])
    assert "dera-local: dera-local" in listed.output
    pairs = runner.invoke(llm_cli, ["dera", "pairs"])
    assert pairs.exit_code == 0 and pairs.output.startswith("dera-local: the default pair")


def test_guidance_options(model, pair):
    steered = model.prompt(
        "hello", lam=1.0, negative_prompt="Be rude.", cfg_scale=2.0, **GREEDY
    ).text()
    template = ChatTemplate.for_pair(pair)
    user = [{"role": "user", "content": "hello"}]
    negative = template.tokens(pair, [{"role": "system", "content": "Be rude."}] + user)
    expected = pair.generate(
        template.tokens(pair, user),
        lam=1.0,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=12,
        negative_prompt=negative,
        cfg_scale=2.0,
    )
    assert steered == expected.text


@pytest.fixture
def long_context_model(monkeypatch, tmp_path):
    """The tiny pair with room for a tool's description (a byte-level vocabulary)."""
    from tiny_models import write_tiny_model

    from dera_local import llm_plugin

    aligned = write_tiny_model(tmp_path / "a.gguf", seed=1, context_length=4096)
    reference = write_tiny_model(tmp_path / "r.gguf", seed=2, context_length=4096)
    monkeypatch.setenv("DERA_ALIGNED", str(aligned))
    monkeypatch.setenv("DERA_REFERENCE", str(reference))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    llm_plugin.close_models()
    yield llm.get_model("dera-local")
    llm_plugin.close_models()


def test_tools_are_called_and_their_results_answered(long_context_model):
    """llm's chain: the first answer calls the tool (tool_choice required: the grammar
    from its first token), llm runs it, and the model answers with the result in its
    prompt. The call's arguments validate against the tool's schema."""
    jsonschema = pytest.importorskip("jsonschema")
    calls = []

    def llm_version() -> str:
        "The installed version of llm."
        calls.append(True)
        return "0.36"

    chain = long_context_model.chain(
        "Which version of llm is installed?", tools=[llm_version],
        options={"tool_choice": "required", "max_tokens": 120, "temperature": 1, "seed": 2},
    )  # fmt: skip
    chain.text()
    responses = list(chain.responses())
    first_calls = responses[0].tool_calls()
    assert calls and first_calls and first_calls[0].name == "llm_version"
    schema = llm.Tool.function(llm_version).input_schema
    jsonschema.validate(first_calls[0].arguments, schema)
    assert len(responses) >= 2 and not responses[-1].tool_calls()  # answered after the result


def test_the_cli_takes_tools_with_dash_t(long_context_model):
    result = CliRunner().invoke(
        llm_cli,
        ["-m", "dera-local", "-T", "llm_version", "-o", "tool_choice", "required",
         "-o", "max_tokens", "120", "-o", "seed", "2", "--td", "Which version?"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "llm_version" in result.output  # --td: the tool call and its result are shown
