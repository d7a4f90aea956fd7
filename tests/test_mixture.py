"""K-term mixtures, classifier-free guidance and proxy-tuning (dera_local.model_sets.mixture,
DeraPair.stream(negative_prompt=...)). The contract, as for DeRa: the logits llama.cpp's
sampler sees equal the weighted sum, in numpy, of each source run alone through
llama-cpp-python's Llama class on its own prompt (the negative one for CFG terms)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference_impl import (
    LogitsRecorder,
    assert_logits_seen,
    mixture_logits_stepwise,
    solo_greedy,
    solo_logits,
)
from tiny_models import write_tiny_model

import dera_local
from dera_local.errors import BadParameterError, IncompatibleModelsError
from dera_local.model_sets.mixture import MixTerm, Source, load_mixture, load_proxy, parse_mix

STEPS = 16
PROMPT = "The quick brown fox"
NEGATIVE = "a dull grey dog"


@pytest.fixture(scope="session")
def third_path(model_dir):
    return write_tiny_model(model_dir / "third.gguf", seed=3)


def _k_terms(aligned, reference, third, lora):
    return {
        1: [(1.5, aligned, None)],
        2: [(0.7, aligned, None), (0.3, reference, None)],
        3: [(1.5, aligned, None), (-0.75, reference, None), (0.25, third, None)],
        4: [
            (0.5, aligned, None),
            (1.25, reference, lora),
            (-0.5, third, None),
            (-0.25, reference, None),
        ],
    }


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sampler_sees_the_numpy_sum_of_k_sources_alone(
    k, aligned_path, reference_path, third_path, lora_path, greedy
):
    spec = _k_terms(aligned_path, reference_path, third_path, lora_path)[k]
    terms = [MixTerm(Source(str(p), str(lo) if lo else None), w) for w, p, lo in spec]
    recorder = LogitsRecorder()
    with load_mixture(terms, n_ctx=512, n_threads=2) as mixture:
        prompt = mixture.tokenize(PROMPT)
        result = mixture.generate(
            prompt, sampling=greedy, max_tokens=STEPS, logits_observer=recorder.sampler
        )
    assert result.finish_reason == "length"
    expected = mixture_logits_stepwise(
        [(w, p, lo, 0) for w, p, lo in spec], [prompt], result.tokens
    )
    assert_logits_seen(recorder, expected, result.tokens)


def test_a_seeded_mixture_samples_from_the_mixture(aligned_path, reference_path, third_path):
    """Temperature 0.9: the recorded logits still equal the numpy sum step by step."""
    spec = [(1.5, aligned_path, None), (-0.75, reference_path, None), (0.25, third_path, None)]
    recorder = LogitsRecorder()
    sampling = dera_local.SamplingParams(temperature=0.9, seed=5)
    with load_mixture([(w, p) for w, p, _ in spec], n_ctx=512, n_threads=2) as mixture:
        prompt = mixture.tokenize(PROMPT)
        result = mixture.generate(
            prompt, sampling=sampling, max_tokens=STEPS, logits_observer=recorder.sampler
        )
    expected = mixture_logits_stepwise(
        [(w, p, lo, 0) for w, p, lo in spec], [prompt], result.tokens
    )
    assert_logits_seen(recorder, expected, result.tokens, greedy_check=False)


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("lam, scale", [(1.0, 1.5), (0.4, 2.0), (2.0, -0.5), (0.5, 3.0)])
def test_cfg_over_dera_is_four_terms_of_two_prompts(
    pair, aligned_path, reference_path, lam, scale, greedy
):
    recorder = LogitsRecorder()
    prompt, negative = pair.tokenize(PROMPT), pair.tokenize(NEGATIVE)
    result = pair.generate(
        prompt,
        lam=lam,
        sampling=greedy,
        max_tokens=STEPS,
        negative_prompt=negative,
        cfg_scale=scale,
        logits_observer=recorder.sampler,
    )
    terms = [
        (scale * lam, aligned_path, None, 0),
        (scale * (1 - lam), reference_path, None, 0),
        ((1 - scale) * lam, aligned_path, None, 1),
        ((1 - scale) * (1 - lam), reference_path, None, 1),
    ]
    assert_logits_seen(
        recorder, mixture_logits_stepwise(terms, [prompt, negative], result.tokens), result.tokens
    )
    assert result.negative_prompt_tokens == negative and result.cfg_scale == scale


def test_cfg_scale_1_is_the_prompt_alone_and_0_the_negative_alone(pair, greedy):
    plain = pair.generate(PROMPT, lam=0.5, sampling=greedy, max_tokens=STEPS)
    at_1 = pair.generate(
        PROMPT, lam=0.5, sampling=greedy, max_tokens=STEPS, negative_prompt=NEGATIVE, cfg_scale=1
    )
    assert at_1.tokens == plain.tokens
    negative_alone = pair.generate(NEGATIVE, lam=0.5, sampling=greedy, max_tokens=STEPS)
    at_0 = pair.generate(
        PROMPT, lam=0.5, sampling=greedy, max_tokens=STEPS, negative_prompt=NEGATIVE, cfg_scale=0
    )
    assert at_0.tokens == negative_alone.tokens
    assert at_1.tokens != at_0.tokens, "the two prompts must lead the tiny pair apart"


def test_one_model_steered_by_its_own_negative_prompt(aligned_path, greedy):
    recorder = LogitsRecorder()
    with dera_local.load_pair(aligned_path, aligned_path, n_ctx=512, n_threads=2) as alone:
        assert alone.identical
        prompt, negative = alone.tokenize(PROMPT), alone.tokenize(NEGATIVE)
        result = alone.generate(
            prompt,
            sampling=greedy,
            max_tokens=STEPS,
            negative_prompt=NEGATIVE,
            cfg_scale=2.5,
            logits_observer=recorder.sampler,
        )
    terms = [(2.5, aligned_path, None, 0), (-1.5, aligned_path, None, 1)]
    assert_logits_seen(
        recorder, mixture_logits_stepwise(terms, [prompt, negative], result.tokens), result.tokens
    )


def test_proxy_tuning_is_large_plus_alpha_times_the_small_offset(
    aligned_path, reference_path, third_path, lora_path, greedy
):
    small = dict(lora=lora_path, n_ctx=512, n_threads=2)
    with load_proxy(third_path, None, reference_path, **small) as proxy:
        prompt = proxy.tokenize(PROMPT)
        at_0 = proxy.generate(prompt, lam=0.0, sampling=greedy, max_tokens=STEPS)
        assert at_0.tokens == solo_greedy(third_path, prompt, STEPS)
        recorder = LogitsRecorder()
        result = proxy.generate(
            prompt, lam=0.8, sampling=greedy, max_tokens=STEPS, logits_observer=recorder.sampler
        )
        assert "lam" in proxy.describe()
    terms = [
        (1.0, third_path, None, 0),
        (0.8, reference_path, lora_path, 0),
        (-0.8, reference_path, None, 0),
    ]
    assert_logits_seen(
        recorder, mixture_logits_stepwise(terms, [prompt], result.tokens), result.tokens
    )
    assert result.tokens != at_0.tokens


def test_a_cfg_chat_reusing_its_caches_equals_rereading_the_history(pair, greedy):
    session = dera_local.ChatSession(
        pair, sampling=greedy, max_tokens=10, negative_prompt="Answer rudely.", cfg_scale=2.0
    )
    first_stream = session.send("hello there")
    list(first_stream)
    first = first_stream.result
    stream = session.send("and then?")
    list(stream)
    second = stream.result
    # both sequences were cached: each reads only what follows its first turn's prompt
    # (the tiny model's reply is not valid UTF-8, so its re-rendered text tokenizes anew)
    assert second.reused_prompt_tokens >= len(first.prompt_tokens)
    assert second.reused_negative_prompt_tokens >= len(first.negative_prompt_tokens)
    negative = second.negative_prompt_tokens
    pair.clear_cache()
    fresh = pair.generate(
        second.prompt_tokens,
        sampling=greedy,
        max_tokens=10,
        negative_prompt=negative,
        cfg_scale=2.0,
    )
    assert fresh.reused_prompt_tokens == 0
    assert fresh.tokens == second.tokens
    assert pair.detokenize(negative, special=True).count("Answer rudely.") == 1


def test_the_native_and_numpy_hooks_give_the_same_mixture(aligned_path, reference_path, greedy):
    tokens = {}
    for hook in ("native", "numpy"):
        with load_mixture(
            [(1.5, aligned_path), (-0.5, reference_path)], n_ctx=512, n_threads=2, hook=hook
        ) as mixture:
            tokens[hook] = mixture.generate(
                PROMPT,
                sampling=dera_local.SamplingParams(temperature=0.8, seed=3),
                max_tokens=STEPS,
                negative_prompt=NEGATIVE,
                cfg_scale=1.5,
            ).tokens
    assert tokens["native"] == tokens["numpy"]


# -- specs and errors -------------------------------------------------------------------
def test_the_spec_grammar(tmp_path):
    terms = parse_mix("1.5*a-1.gguf - 0.5*b+c.gguf + c.gguf")
    assert [(t.weight, t.source.model, t.source.lora) for t in terms] == [
        (1.5, "a-1.gguf", None),
        (-0.5, "b", "c.gguf"),
        (1.0, "c.gguf", None),
    ]
    assert parse_mix("-2*x.gguf")[0].weight == -2.0
    as_json = tmp_path / "mix.json"
    as_json.write_text(json.dumps({"terms": [{"model": "m.gguf", "weight": -1, "lora": "l.gguf"}]}))
    [term] = parse_mix(str(as_json))
    assert (term.weight, term.source.model, term.source.lora) == (
        -1.0,
        str(tmp_path / "m.gguf"),
        str(tmp_path / "l.gguf"),
    )
    as_toml = tmp_path / "mix.toml"
    as_toml.write_text('[[terms]]\nmodel = "m.gguf"\nweight = 2.5\n')
    assert parse_mix(str(as_toml))[0].weight == 2.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("x*a.gguf", "'x' is not a number"),
        ("inf*a.gguf", "finite"),
        ("2*", "names no model"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(BadParameterError, match=message):
        parse_mix(spec)


def test_bad_spec_files_say_what_is_wrong(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(BadParameterError, match="does not parse"):
        parse_mix(str(broken))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"model": "a.gguf", "wieght": 2}]))
    with pytest.raises(BadParameterError, match="unknown key 'wieght'"):
        parse_mix(str(unknown))
    with pytest.raises(BadParameterError, match="cannot read"):
        parse_mix(str(tmp_path / "missing.toml"))


def test_models_with_other_tokenizers_are_refused_naming_the_token(aligned_path, other_vocab_path):
    with pytest.raises(IncompatibleModelsError, match="token 257") as caught:
        load_mixture([(1.0, aligned_path), (0.5, other_vocab_path)])
    assert "\n" not in str(caught.value)


def test_weights_summing_to_zero_warn(aligned_path, reference_path):
    contrast = [(1.0, aligned_path), (-1.0, reference_path)]
    with pytest.warns(UserWarning, match="sum to 0"), load_mixture(contrast, n_ctx=256) as mixture:
        assert mixture.source_weights(1.0) == [1.0, -1.0]


def test_a_fixed_mixture_refuses_lam_and_a_scale_needs_a_negative_prompt(aligned_path, pair):
    with (
        load_mixture([(2.0, aligned_path)], n_ctx=256) as mixture,
        pytest.raises(BadParameterError, match="lam does not apply"),
    ):
        mixture.generate(PROMPT, lam=0.5)
    with pytest.raises(BadParameterError, match="needs a negative prompt"):
        pair.generate(PROMPT, cfg_scale=2.0)
    with pytest.raises(BadParameterError, match="CFG scale must be between"):
        pair.generate(PROMPT, negative_prompt="x", cfg_scale=float("nan"))


# -- sweep, score, CLI ------------------------------------------------------------------
def test_a_cfg_sweep_row_equals_its_solo_guided_generation(pair):
    from dera_local.analysis.sweep import sweep

    sampling = dera_local.SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=4)
    rows = list(
        sweep(
            pair,
            [("a", PROMPT), ("b", "hello")],
            [0.5, 1.0],
            cfg_scales=[1.0, 2.0],
            negative_prompt=NEGATIVE,
            sampling=sampling,
            max_tokens=10,
        )
    )
    assert [(r.prompt_id, r.lam, r.cfg_scale) for r in rows[:4]] == [
        ("a", 0.5, 1.0), ("a", 0.5, 2.0), ("a", 1.0, 1.0), ("a", 1.0, 2.0)
    ]  # fmt: skip
    for row in rows:
        prompt = PROMPT if row.prompt_id == "a" else "hello"
        alone = pair.generate(
            prompt,
            lam=row.lam,
            sampling=sampling,
            max_tokens=10,
            negative_prompt=NEGATIVE,
            cfg_scale=row.cfg_scale,
        )
        assert row.tokens == alone.tokens, (row.prompt_id, row.lam, row.cfg_scale)
    with pytest.raises(BadParameterError, match="needs a negative prompt"):
        list(sweep(pair, [("a", PROMPT)], [1.0], cfg_scales=[2.0]))


def _log_softmax(x):
    x = x.astype(np.float64)
    return (
        x
        - x.max(-1, keepdims=True)
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    )  # noqa: E501


def test_scoring_under_cfg_equals_numpy_on_each_model_alone(pair, aligned_path, reference_path):
    from dera_local.analysis.score import score_mixture

    prompt, negative = pair.tokenize(PROMPT), pair.tokenize(NEGATIVE)
    response = pair.tokenize(" jumps over the lazy dog", add_special=False)
    [row] = score_mixture(pair, prompt, response, [0.7], negative_prompt=negative, cfg_scale=1.5)

    def rows(path, head):
        logits = solo_logits(path, head + response)
        return logits[len(head) - 1 : len(head) - 1 + len(response)].astype(np.float64)

    mixed = 1.5 * (0.7 * rows(aligned_path, prompt) + 0.3 * rows(reference_path, prompt)) - 0.5 * (
        0.7 * rows(aligned_path, negative) + 0.3 * rows(reference_path, negative)
    )
    log_p = _log_softmax(mixed)
    expected = log_p[np.arange(len(response)), response]
    np.testing.assert_allclose(row.token_logprobs, expected, atol=2e-3)
    p = np.exp(log_p)
    kl_reference = (p * (log_p - _log_softmax(rows(reference_path, prompt)))).sum(-1)
    np.testing.assert_allclose(row.kl_reference, kl_reference, atol=2e-3)


def test_cli_one_model_with_a_negative_prompt_reports_its_ids(monkeypatch, aligned_path):
    from click.testing import CliRunner

    from dera_local.cli import cli

    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA"):
        monkeypatch.delenv(name, raising=False)
    args = ["generate", PROMPT, "-m", str(aligned_path), "--json", "--temp", "0", "-n", "8"]
    result = CliRunner().invoke(cli, [*args, "--cfg-negative-prompt", NEGATIVE, "--cfg-scale", "2"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    with dera_local.load_pair(aligned_path, aligned_path, n_ctx=512) as alone:
        assert data["negative_prompt_tokens"] == alone.tokenize(NEGATIVE)
        expected = alone.generate(
            PROMPT,
            sampling=dera_local.SamplingParams(temperature=0),
            max_tokens=8,
            negative_prompt=NEGATIVE,
            cfg_scale=2.0,
        )
    assert data["tokens"] == expected.tokens and data["cfg_scale"] == 2.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--cfg-scale", "2"], "needs a negative prompt"),
        (["generate", "hi", "--mix", "x*a.gguf"], "'x' is not a number"),
        (["generate", "hi", "--mix", "2*a.gguf", "-m", "b.gguf"], "--mix names every model"),
        (["sweep", "--prompts", "-", "--cfg-scales", "1,2"], "go together"),
        (["generate", "hi", "--cfg-negative-prompt", "x", "--cfg-scale", "inf"], "CFG scale"),
        (["generate", "hi", "--mix", "2*a.gguf", "-md", "d.gguf"], "prompt lookup only"),
        (["serve", "-md", "d.gguf"], "the server drafts by prompt lookup"),
    ],
)
def test_cli_bad_mixture_input_is_one_line(run, args, message):
    result = run(*args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_mix_and_proxy_run_and_equal_the_python_api(run, aligned_path, reference_path, greedy):
    spec = f"1.5*{aligned_path} - 0.5*{reference_path}"
    result = run("generate", PROMPT, "--mix", spec, "--json", "--temp", "0", "-n", "8")
    assert result.exit_code == 0, result.stderr
    with load_mixture(spec, n_ctx=512) as mixture:
        assert (
            json.loads(result.stdout)["tokens"]
            == mixture.generate(PROMPT, sampling=greedy, max_tokens=8).tokens
        )
    proxy = run(
        "generate", PROMPT, "--proxy-base", str(reference_path), "--lam", "0",
        "--json", "--temp", "0", "-n", "8",
    )  # fmt: skip
    assert proxy.exit_code == 0, proxy.stderr
    prompt = json.loads(proxy.stdout)["prompt_tokens"]
    assert json.loads(proxy.stdout)["tokens"] == solo_greedy(reference_path, prompt, 8)


def test_chat_commands_set_the_negative_prompt_and_scale(run):
    result = run("chat", "--temp", "0", "-n", "4", stdin="/cfg 2\n/negative Be rude.\n/cfg 2\nhi\n")
    assert result.exit_code == 0, result.stderr
    assert "set /negative TEXT first" in result.stderr
    assert "negative prompt set" in result.stderr and "cfg scale = 2" in result.stderr
