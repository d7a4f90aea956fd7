"""The CLI through click's CliRunner: output, JSON, chat commands, and bad input giving one
line on stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from reference_impl import solo_greedy

from dera_local import ChatSession
from dera_local.cli import cli


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_json_has_the_documented_fields(run, aligned_path):
    data = _json(run("generate", "Hello", "--json", "--temp", "0", "-n", "12", "--lam", "1"))
    for key in ("text", "tokens", "prompt_tokens", "finish_reason", "lam", "tokens_per_second"):
        assert key in data
    assert data["lam"] == 1.0 and data["finish_reason"] == "length" and len(data["tokens"]) == 12
    assert data["tokens"] == solo_greedy(aligned_path, data["prompt_tokens"], 12)


def test_lambda_alias_env_default_and_text_output(run, monkeypatch):
    by_flag = _json(run("generate", "Hi", "--json", "--temp", "0", "-n", "8", "--lambda", "0.25"))
    monkeypatch.setenv("DERA_LAMBDA", "0.25")
    by_env = _json(run("generate", "Hi", "--json", "--temp", "0", "-n", "8"))
    assert by_flag["lam"] == by_env["lam"] == 0.25 and by_flag["tokens"] == by_env["tokens"]
    plain = run("generate", "Hi", "--temp", "0", "-n", "8", "--lam", "0.25")
    assert plain.exit_code == 0 and plain.stdout == by_flag["text"] + "\n"


def test_prompt_from_file_and_stdin_agree(run, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("From a file", encoding="utf-8")
    from_file = _json(run("generate", "-f", str(prompt_file), "--json", "--temp", "0", "-n", "6"))
    from_stdin = _json(run("generate", "--json", "--temp", "0", "-n", "6", stdin="From a file"))
    assert from_file["tokens"] == from_stdin["tokens"]


def test_chat_with_piped_commands(run, pair, greedy):
    script = (
        "/help\nhello\n/lambda 0.5\nagain\n/system be brief\n/reset\n/lambda nan\nbye\n"
        "/quit\nnot read\n"
    )
    result = run("chat", "--temp", "0", "-n", "6", stdin=script)
    assert result.exit_code == 0, result.stderr
    assert "/lambda X" in result.stderr
    assert "lam = 0.5" in result.stderr
    assert "conversation cleared" in result.stderr
    assert "error: lam must be finite" in result.stderr
    # the same conversation through the Python API; the line after /quit is never read
    session = ChatSession(pair, sampling=greedy, max_tokens=6)
    replies = [session.say("hello")]
    session.lam = 0.5
    replies.append(session.say("again"))
    session.system = "be brief"
    session.reset()
    replies.append(session.say("bye"))
    assert result.stdout == "".join(reply + "\n" for reply in replies)


def test_info_explains_the_active_path(run):
    from dera_local.engine import mixing

    result = run("info")
    assert result.exit_code == 0
    expected = "mixing hook: native" if mixing._native is not None else "mixing hook: numpy"
    assert expected in result.stdout
    assert "llama.cpp build:" in result.stdout and "AMX:" in result.stdout
    assert "compatibility: OK" in result.stdout
    forced = run("info", "--hook", "numpy")
    assert forced.exit_code == 0, forced.stderr
    assert "mixing hook: numpy (chosen with --hook" in forced.stdout or mixing._native is None


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["generate", "hi", "-m", "/no/such.gguf"], None, "no such file"),
        (["generate", "hi", "--lam", "nan"], None, "lam must be finite"),
        (["generate", "hi", "--lam", "inf"], None, "lam must be finite"),
        (["generate", "-f", "/no/such/prompt.txt"], None, "cannot read prompt file"),
        (["generate", "--temp", "-1", "hi"], None, "temperature"),
        (["generate"], "", None),  # empty stdin: an empty prompt
        (["chat", "--lam", "nan"], "hi\n", "lam must be finite"),
        (["info", "-mr", "/no/such.gguf"], None, "no such file"),
    ],
)
def test_bad_input_is_one_line_without_traceback(run, args, stdin, message):
    result = run(*args, stdin=stdin)
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if message:
        assert message in lines[0]


def test_incompatible_pair(run, other_vocab_path):
    result = run("generate", "hi", "-mr", str(other_vocab_path))
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "token 257" in result.stderr
    info = run("info", "-mr", str(other_vocab_path))
    assert info.exit_code != 0 and "compatibility: INCOMPATIBLE" in info.stdout


def test_half_a_pair_says_what_is_missing(monkeypatch, aligned_path):
    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA"):
        monkeypatch.delenv(name, raising=False)
    no_reference = CliRunner().invoke(cli, ["generate", "hi", "-m", str(aligned_path)])
    assert no_reference.exit_code == 1 and "-mr/--reference" in no_reference.stderr
    no_aligned = CliRunner().invoke(cli, ["generate", "hi", "-mr", str(aligned_path)])
    assert no_aligned.exit_code == 1 and "-m/--aligned" in no_aligned.stderr


def test_negative_lam_warns_in_one_line(run):
    result = run("generate", "hi", "--lam", "-0.5", "--temp", "0", "-n", "3")
    assert result.exit_code == 0
    assert result.stderr.strip().startswith("warning:") and "disalignment" in result.stderr


def test_every_sampling_setting_has_a_flag_that_reaches_it(run, monkeypatch):
    import dataclasses
    import importlib

    from dera_local.cli import sampling_options as options
    from dera_local.sampling.chain import SamplingParams

    assert set(options.SAMPLING_FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)}
    seen = {}

    def capture(**fields):
        seen.update(fields)
        raise SystemExit(0)

    module = importlib.import_module("dera_local.cli.generate")  # the name is the command
    monkeypatch.setattr(module, "sampling_from", capture)
    args = ["--temp", "0.5", "--top-k", "7", "--top-p", "0.9", "--min-p", "0.1"]
    args += ["--repeat-penalty", "1.1", "--repeat-last-n", "32", "--frequency-penalty", "0.2"]
    args += ["--presence-penalty", "0.3", "-s", "42", "--grammar", 'root ::= "x"']
    args += ["--logit-bias", "5+1.5", "--logit-bias", "7-inf", "--grammar-trigger", "<x>"]
    run("generate", "hi", *args)
    assert seen == {
        "temperature": 0.5,
        "top_k": 7,
        "top_p": 0.9,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "repeat_last_n": 32,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
        "seed": 42,
        "grammar": 'root ::= "x"',
        "grammar_file": None,
        "json_schema": None,
        "json_schema_file": None,
        "logit_bias": ("5+1.5", "7-inf"),
        "grammar_triggers": ("<x>",),
    }
    assert options.parse_logit_bias(("5+1.5", "7-inf")) == ((5, 1.5), (7, -100.0))


def test_generate_chat_renders_the_prompt_as_a_user_turn(run, pair, greedy):
    from dera_local import ChatTemplate

    greedy_json = ["--json", "--temp", "0", "-n", "8", "--lam", "0.5"]
    data = _json(run("generate", "Hi there", "--chat", "--system", "Be brief.", *greedy_json))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected_prompt = ChatTemplate.for_pair(pair).tokens(pair, messages)
    assert data["prompt_tokens"] == expected_prompt
    expected = pair.generate(expected_prompt, lam=0.5, sampling=greedy, max_tokens=8)
    assert data["tokens"] == expected.tokens
    raw = _json(run("generate", "Hi there", "--json", "--temp", "0", "-n", "8"))
    assert raw["prompt_tokens"] == pair.tokenize("Hi there")


def test_system_without_chat_is_one_line(run):
    result = run("generate", "Hi", "--system", "Be brief.")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: --system applies to chat prompts: add --chat"


def test_an_empty_answer_to_a_raw_prompt_suggests_chat(run):
    grammar = 'root ::= ""'  # only an end-of-generation token is allowed: an empty answer
    result = run("generate", "Hi", "--temp", "0", "--grammar", grammar)
    assert result.exit_code == 0 and result.stdout == "\n"
    assert "note: 1 answer(s) ended at once" in result.stderr and "--chat" in result.stderr
    quiet = run("generate", "Hi", "--temp", "0", "--grammar", grammar, "--no-chat")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_library_hint_is_printed_by_the_cli_only(run):
    result = run("generate", "x" * 5000, "-c", "256")
    assert result.exit_code == 1
    assert "context holds 256; shorten the prompt (or raise -c)" in result.stderr


def test_speculation_flags_json_counts_and_info(run, other_vocab_path):
    prompt = "the cat sat on the mat and the cat sat on the"
    greedy_json = ["--json", "--temp", "0", "-n", "30", "--lam", "0.5"]
    fast = _json(run("generate", prompt, *greedy_json))
    plain = _json(run("generate", prompt, *greedy_json, "--draft-max", "0"))
    assert fast["tokens"] == plain["tokens"]
    assert plain["drafted"] == plain["accepted"] == 0
    assert 0 <= fast["accepted"] <= fast["drafted"]
    assert "speculation: prompt lookup" in run("info").stdout
    assert "speculation: off" in run("info", "--draft-max", "0").stdout
    refused = run("info", "-md", str(other_vocab_path))
    assert refused.exit_code == 1 and "draft model: INCOMPATIBLE" in refused.stdout
    bad = run("generate", "hi", "--draft-max", "-1")
    assert bad.exit_code == 2 and "--draft-max" in bad.stderr


def test_speculation_says_what_it_measured_and_decided(run):
    prompt = "the cat sat on the mat and the cat sat on the mat and the cat sat on the"
    greedy_json = ["--json", "--temp", "0", "-n", "30", "--lam", "0.5"]
    data = _json(run("generate", prompt, *greedy_json))
    report = data["speculation"]
    assert report["adaptive"] is True
    decisions = report["decisions"]
    assert decisions[0]["why"] in ("first look at drafting", "nothing to draft")
    # every decode step decided once (the first token comes from reading the prompt);
    # the verified drafts are the drafted tokens
    steps = len(data["tokens"]) - data["accepted"] - 1
    assert sum(d["steps"] for d in decisions) in (steps, steps + 1)  # + an end token
    assert sum(d["k"] * d["steps"] for d in decisions) == data["drafted"] > 0
    assert "1" in report["step_ms_by_rows"] and report["acceptance"]
    verbose = run("generate", prompt, "--temp", "0", "-n", "30", "--lam", "0.5", "-v")
    assert "speculation: step ms by rows: 1: " in verbose.stderr
    assert "(first look at drafting; acceptance 50%, expected " in verbose.stderr
    # a fixed draft length: the same tokens, every verification as long as lookup allows
    fixed = _json(run("generate", prompt, *greedy_json, "--draft-max", "3", "--draft-fixed"))
    assert fixed["tokens"] == data["tokens"]
    whys = {d["why"] for d in fixed["speculation"]["decisions"]}
    assert whys <= {"fixed draft length", "nothing to draft", "no room for drafts"}
    assert all(d["k"] <= 3 for d in fixed["speculation"]["decisions"])
    measured = run("info", "--measure-speculation")
    assert measured.exit_code == 0, measured.stderr
    lines = measured.stdout.split("speculation measured on this machine:\n")[1].splitlines()
    assert lines[0].startswith("  step cost by rows, in plain steps of")
    assert [row.split(":")[0] for row in lines[0].split("ms: ")[1].split(", ")] == [
        str(rows) for rows in range(2, 10)
    ]
    assert "pays from about" in measured.stdout or "measured not to pay" in measured.stdout


def test_info_says_when_speculation_never_pays():
    from dera_local.speculation.probe import DraftCostReport

    dear_rows = DraftCostReport(
        step_ms={1: 10.0, 2: 19.0, 3: 28.0}, gains={1: 1.0, 2: 0.97}, break_even=None
    )
    assert not dear_rows.pays
    assert (
        "speculation measured not to pay on this machine for this model: at 90% acceptance "
        "the best is k=1, 1.00x" in "\n".join(dear_rows.lines())
    )
    cheap_rows = DraftCostReport(step_ms={1: 10.0, 2: 11.0}, gains={1: 1.7, 2: 2.2}, break_even=0.3)
    assert cheap_rows.pays and cheap_rows.best_k == 2
    assert cheap_rows.lines()[-1] == "  pays from about 30% acceptance"


@pytest.mark.parametrize(
    "spec, what",
    [
        ("owner/repo:../../etc/passwd.gguf", "file name"),
        ("owner/repo:/abs/model.gguf", "file name"),
        ("own er/re*po:model.gguf", "repository id"),
        ("owner/" + "r" * 5000 + ":model.gguf", "repository id"),
        ("owner/repo:" + "m" * 5000 + ".gguf", "file name"),
    ],
)
def test_malformed_hub_specs_are_one_line(run, spec, what):
    result = run("generate", "hi", "-m", spec)
    assert result.exit_code == 1 and f"not a valid hub {what}" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and len(result.stderr) < 300


def test_non_utf8_prompts_and_huge_thread_counts(run):
    # bytes that are not UTF-8, as Python hands them over from argv (surrogate escapes)
    argv = run("generate", b"caf\xe9".decode("utf-8", "surrogateescape"), "-n", "2")
    assert argv.exit_code == 1 and "the prompt is not UTF-8 text" in argv.stderr
    threads = run("generate", "hi", "-t", "65536", "-n", "2", "--temp", "0")
    assert threads.exit_code == 0
    assert threads.stderr.startswith("warning: 65536 threads is far more than this machine has")
    assert threads.stderr.count("\n") == 1


def test_a_grammar_that_does_not_parse_is_one_line_with_the_reason(aligned_path, reference_path):
    import subprocess
    import sys

    # a real process: llama.cpp prints parse errors on file descriptor 2 itself
    command = [sys.executable, "-m", "dera_local.cli", "generate", "hi", "-n", "2"]
    command += ["-m", str(aligned_path), "-mr", str(reference_path), "--grammar", "root ::= ("]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the GBNF grammar does not parse (expecting ')'" in lines[0]


def test_a_port_in_use_is_one_line(run):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot serve on 127.0.0.1:{port}: Address already in use; choose another --port"
    ]


def test_hub_retry_warnings_are_quiet_during_a_download():
    import logging

    from dera_local.sources import hub

    retrying = logging.getLogger("huggingface_hub.utils._http")
    assert retrying.isEnabledFor(logging.WARNING)
    with hub._quiet_hub_log():
        assert not retrying.isEnabledFor(logging.WARNING)
    assert retrying.isEnabledFor(logging.WARNING)
