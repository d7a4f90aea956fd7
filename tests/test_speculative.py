"""Speculative DeRa on the tiny pair: greedy output equals plain decoding token for token
with every draft kind (right, wrong, prompt lookup, a draft model), wherever a stop rule
falls; the caches end as plain decoding leaves them; the logits of verified rows are the
numpy mixture of each model alone; sampled output has plain decoding's distribution."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from reference_impl import LogitsRecorder, numpy_mix, solo_logits
from scripted_drafter import ScriptedDrafter
from tiny_models import write_tiny_model

import dera_local
from dera_local.speculation.drafts import PromptLookup, SpeculationParams

PLAIN = SpeculationParams(draft_max=0)
# Not adaptive: every step drafts, whatever the timings say, so the tests exercise
# verification on every token.
ALWAYS = SpeculationParams(draft_max=8, draft_min=1, adaptive=False)
PROMPT = "the cat sat on the mat and the cat sat on the"


def _plain(pair, prompt, **kwargs):
    pair.clear_cache()
    return pair.generate(prompt, speculation=PLAIN, **kwargs)


def _speculative(pair, prompt, **kwargs):
    pair.clear_cache()
    return pair.generate(prompt, **kwargs)


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("kind", ["right", "wrong", "lookup"])
def test_greedy_speculative_equals_plain(pair, greedy, lam, kind):
    prompt = pair.tokenize(PROMPT)
    plain = _plain(pair, prompt, lam=lam, sampling=greedy, max_tokens=40)
    assert plain.finish_reason == "length"
    drafter = {
        "right": ScriptedDrafter(plain.tokens),
        "wrong": ScriptedDrafter(plain.tokens, shift=1),
        "lookup": PromptLookup(1, 3),
    }[kind]
    fast = _speculative(
        pair,
        prompt,
        lam=lam,
        sampling=greedy,
        max_tokens=40,
        speculation=ALWAYS,
        drafter=drafter,
    )
    assert fast.tokens == plain.tokens and fast.text == plain.text
    assert fast.drafted > 0
    if kind == "right":
        assert fast.accepted == fast.drafted
        # 40 tokens in steps of up to 9: far fewer decodes than tokens
        assert fast.drafted >= 30
    if kind == "wrong":
        assert fast.accepted == 0


def test_pair_default_lookup_drafts_on_repetitive_text(pair, greedy):
    prompt = pair.tokenize(PROMPT)
    plain = _plain(pair, prompt, lam=0.5, sampling=greedy, max_tokens=60)
    fast = _speculative(
        pair,
        prompt,
        lam=0.5,
        sampling=greedy,
        max_tokens=60,
        speculation=SpeculationParams(adaptive=False),
    )
    assert fast.tokens == plain.tokens and fast.drafted > 0 and fast.accepted > 0


def test_stop_rules_inside_an_accepted_run(pair, greedy):
    prompt = pair.tokenize(PROMPT)
    plain = _plain(pair, prompt, lam=0.5, sampling=greedy, max_tokens=40)
    oracle = ScriptedDrafter(plain.tokens)
    # a stop string in the middle of what the oracle drafts
    stop = plain.text[12:15]
    cut = _plain(pair, prompt, lam=0.5, sampling=greedy, max_tokens=40, stop=[stop])
    fast = _speculative(
        pair,
        prompt,
        lam=0.5,
        sampling=greedy,
        max_tokens=40,
        stop=[stop],
        speculation=SpeculationParams(draft_max=16, draft_min=16, adaptive=False),
        drafter=oracle,
    )
    assert cut.finish_reason == fast.finish_reason == "stop"
    assert (fast.text, fast.tokens) == (cut.text, cut.tokens)
    assert fast.accepted >= 1
    # max_tokens: a step never drafts past it, and the count is exact
    for n in (1, 2, 7):
        short = _speculative(
            pair,
            prompt,
            lam=0.5,
            sampling=greedy,
            max_tokens=n,
            speculation=ALWAYS,
            drafter=ScriptedDrafter(plain.tokens),
        )
        assert short.tokens == plain.tokens[:n] and short.finish_reason == "length"


def test_end_of_generation_inside_a_draft(pair):
    im_end = pair.tokenize("<|im_end|>", add_special=False)[0]
    hi = pair.tokenize("hi", add_special=False)
    # the grammar forces "hi" then the end; the drafter proposes the end and more after it
    sampling = dera_local.SamplingParams(temperature=0, grammar='root ::= "hi"')
    drafter = ScriptedDrafter([*hi, im_end, *hi, *hi])
    fast = _speculative(
        pair, "x", sampling=sampling, max_tokens=20, speculation=ALWAYS, drafter=drafter
    )
    plain = _plain(pair, "x", sampling=sampling, max_tokens=20)
    assert (fast.text, fast.finish_reason) == (plain.text, plain.finish_reason) == ("hi", "stop")
    # 'h' is sampled after the prompt; then 'i' and the end token are accepted drafts and
    # the walk stops at the end: what was drafted after it is never looked at
    assert fast.tokens == plain.tokens and fast.accepted == 2 and fast.drafted > 2


def test_full_context_and_rollback_leave_the_caches_as_plain_decoding(
    aligned_path, reference_path, greedy
):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as small:
        prompt = small.tokenize("the cat sat on the mat " * 30)[:240]
        plain = _plain(small, prompt, lam=0.5, sampling=greedy, max_tokens=-1)
        plain_cache = list(small.lockstep.cached)
        assert plain.finish_reason == "length" and len(prompt) + len(plain.tokens) == 257
        for shift in (0, 1):  # all drafts right, all wrong (every step rolls back)
            drafter = ScriptedDrafter(plain.tokens, shift=shift)
            fast = _speculative(
                small,
                prompt,
                lam=0.5,
                sampling=greedy,
                max_tokens=-1,
                speculation=ALWAYS,
                drafter=drafter,
            )
            assert fast.tokens == plain.tokens and fast.finish_reason == "length"
            assert small.lockstep.cached == plain_cache
            for ctx in small.lockstep.contexts:
                assert ctx.n_cached() == len(plain_cache)


def test_rollback_then_next_call_sees_the_same_logits(pair, greedy, aligned_path, reference_path):
    prompt = pair.tokenize(PROMPT)
    plain = _plain(pair, prompt, lam=0.5, sampling=greedy, max_tokens=20)
    fast = _speculative(
        pair,
        prompt,
        lam=0.5,
        sampling=greedy,
        max_tokens=20,
        speculation=ALWAYS,
        drafter=ScriptedDrafter(plain.tokens, shift=1),
    )
    assert fast.tokens == plain.tokens and fast.drafted > 0
    # the follow-up reads only what is new (the cache is reused) and sees exact logits
    follow_up = prompt + fast.tokens + pair.tokenize(" and", add_special=False)
    recorder = LogitsRecorder()
    result = pair.generate(
        follow_up,
        lam=0.5,
        sampling=greedy,
        max_tokens=5,
        speculation=PLAIN,
        logits_observer=recorder.sampler,
    )
    assert result.reused_prompt_tokens == len(prompt) + len(fast.tokens) - 1
    sequence = follow_up + result.tokens
    aligned = solo_logits(aligned_path, sequence)
    reference = solo_logits(reference_path, sequence)
    for step, seen in enumerate(recorder.steps):
        expected = numpy_mix(
            aligned[len(follow_up) - 1 + step], reference[len(follow_up) - 1 + step], 0.5
        )
        np.testing.assert_allclose(seen, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_verified_rows_are_the_mixture_of_each_model_alone(
    pair, aligned_path, reference_path, temperature
):
    prompt = pair.tokenize(PROMPT)
    recorder = LogitsRecorder()
    sampling = dera_local.SamplingParams(temperature=temperature, seed=5)
    result = _speculative(
        pair,
        prompt,
        lam=0.3,
        sampling=sampling,
        max_tokens=24,
        speculation=ALWAYS,
        drafter=PromptLookup(1, 3),
        logits_observer=recorder.sampler,
    )
    assert result.drafted > 0 and len(recorder.steps) == len(result.tokens) == 24
    sequence = prompt + result.tokens
    aligned = solo_logits(aligned_path, sequence)
    reference = solo_logits(reference_path, sequence)
    for step, seen in enumerate(recorder.steps):
        position = len(prompt) - 1 + step
        expected = numpy_mix(aligned[position], reference[position], 0.3)
        np.testing.assert_allclose(seen, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_seeded_sampling_is_the_same_with_and_without_speculation(pair):
    prompt = pair.tokenize(PROMPT)
    for seed in range(5):
        sampling = dera_local.SamplingParams(temperature=1.0, top_k=5, seed=seed)
        plain = _plain(pair, prompt, lam=0.7, sampling=sampling, max_tokens=30)
        fast = _speculative(
            pair,
            prompt,
            lam=0.7,
            sampling=sampling,
            max_tokens=30,
            speculation=ALWAYS,
            drafter=PromptLookup(1, 3),
        )
        assert fast.tokens == plain.tokens


def _first_tokens(pair, prompt, seeds, **kwargs) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for seed in seeds:
        sampling = dera_local.SamplingParams(temperature=1.5, top_k=4, min_p=0, seed=seed)
        result = pair.generate(prompt, lam=0.6, sampling=sampling, max_tokens=3, **kwargs)
        counts[tuple(result.tokens)] += 1
    return counts


def _homogeneity_p_value(a: collections.Counter, b: collections.Counter) -> float:
    """Chi-square test that two samples come from one distribution (rare outcomes pooled
    so that every expected count is at least 5)."""
    from scipy.stats import chi2_contingency

    total = a + b
    common = [key for key, n in total.items() if n >= 10]
    table = [[a[key] for key in common], [b[key] for key in common]]
    table[0].append(sum(a.values()) - sum(table[0]))
    table[1].append(sum(b.values()) - sum(table[1]))
    return float(chi2_contingency(np.array(table)).pvalue)


def test_sampled_speculative_output_has_the_plain_distribution(pair, greedy):
    pytest.importorskip("scipy")
    prompt = pair.tokenize(PROMPT)
    likely = _plain(pair, prompt, lam=0.6, sampling=greedy, max_tokens=3).tokens
    # Independent seeds on each side: a test of distributions, not of equal seeds.
    plain = _first_tokens(pair, prompt, range(2000), speculation=PLAIN)
    fast = _first_tokens(
        pair,
        prompt,
        range(10_000, 12_000),
        speculation=ALWAYS,
        drafter=ScriptedDrafter(likely),
    )
    assert len(plain) > 5, "the test needs a spread-out distribution"
    assert _homogeneity_p_value(plain, fast) > 0.01
    # A wrong rule (keep every draft) must fail the same test.
    wrong = _first_tokens(
        pair,
        prompt,
        range(10_000, 12_000),
        speculation=ALWAYS,
        drafter=ScriptedDrafter(likely),
        accept=lambda sampled, drafted: True,
    )
    assert _homogeneity_p_value(plain, wrong) < 1e-6


def test_draft_model_drafts_and_changes_nothing(aligned_path, reference_path, model_dir, greedy):
    draft = write_tiny_model(model_dir / "draft.gguf", seed=7)
    with dera_local.load_pair(
        aligned_path,
        reference_path,
        n_ctx=512,
        draft_model=draft,
        speculation=SpeculationParams(draft_max=6, draft_min=1, adaptive=False),
    ) as drafted_pair:
        assert drafted_pair.loaded.draft_ctx is not None
        prompt = drafted_pair.tokenize(PROMPT)
        for lam in (0.0, 0.5, 1.0, 2.5):
            plain = _plain(drafted_pair, prompt, lam=lam, sampling=greedy, max_tokens=30)
            fast = _speculative(drafted_pair, prompt, lam=lam, sampling=greedy, max_tokens=30)
            assert fast.tokens == plain.tokens and fast.drafted > 0
    # the aligned model drafting for itself at lam 1 is right every time
    with dera_local.load_pair(
        aligned_path,
        reference_path,
        draft_model=aligned_path,
        speculation=SpeculationParams(draft_max=6, draft_min=1, adaptive=False),
    ) as self_drafting:
        prompt = self_drafting.tokenize(PROMPT)
        fast = _speculative(self_drafting, prompt, lam=1.0, sampling=greedy, max_tokens=30)
        assert fast.drafted > 0 and fast.accepted == fast.drafted


def test_draft_model_with_another_tokenizer_is_refused(
    aligned_path, reference_path, other_vocab_path
):
    with pytest.raises(dera_local.IncompatibleModelsError, match="token 257"):
        dera_local.load_pair(aligned_path, reference_path, draft_model=other_vocab_path)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(ngram_min=2, ngram_max=3)
    lookup.reset([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert lookup.draft(3) == [4, 5, 9]  # the 3-gram (1, 2, 3) seen before
    lookup.extend([7])
    assert lookup.draft(3) == []  # (3, 7) and (2, 3, 7) never seen before
    lookup.extend([1, 2])
    assert lookup.draft(2) == [3, 7]  # (7, 1, 2) is new; (1, 2) last ended at index 7
    with pytest.raises(dera_local.BadParameterError):
        SpeculationParams(draft_max=2, draft_min=3)
