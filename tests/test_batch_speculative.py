"""Speculation in the batched step (batch.BatchDecoder): generations with a negative
prompt (CFG) and mixtures of K models verify drafts in one batched decode, in every
sequence of the slot at once. Checked as the lockstep path is: greedy and seeded output
equals the same generation without speculation token for token, whatever the drafts
(right, wrong, prompt lookup) and wherever a stop rule falls; the logits of every
verified row are the numpy mixture of each source run alone; rolled-back caches serve
the next call as if nothing had been drafted; a speculating slot beside plain ones
changes none of them."""

from __future__ import annotations

import pytest
from reference_impl import LogitsRecorder, assert_logits_seen, mixture_logits_stepwise
from scripted_drafter import ScriptedDrafter

import dera_local
from dera_local.engine.decoder import BatchDecoder
from dera_local.engine.request import GenerationRequest
from dera_local.errors import BadParameterError
from dera_local.model_sets.mixture import load_mixture
from dera_local.speculation.drafts import PromptLookup, SpeculationParams

PLAIN = SpeculationParams(draft_max=0)
# Not adaptive: every step drafts, so verification runs at every token.
ALWAYS = SpeculationParams(draft_max=8, draft_min=1, adaptive=False)
PROMPT = "the cat sat on the mat and the cat sat on the"
NEGATIVE = "a dull grey dog"
STEPS = 24


def _guided(pair, speculation, **kwargs):
    pair.clear_cache()
    settings = dict(lam=0.5, negative_prompt=NEGATIVE, cfg_scale=1.5, max_tokens=STEPS)
    settings.update(kwargs)
    return pair.generate(PROMPT, speculation=speculation, **settings)


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("lam, scale", [(0.5, 1.5), (2.0, -0.5)])
@pytest.mark.parametrize("kind", ["right", "wrong", "lookup"])
def test_guided_speculative_equals_plain(pair, greedy, lam, scale, kind):
    plain = _guided(pair, PLAIN, sampling=greedy, lam=lam, cfg_scale=scale)
    assert plain.finish_reason == "length" and plain.drafted == 0
    drafter = {
        "right": ScriptedDrafter(plain.tokens),
        "wrong": ScriptedDrafter(plain.tokens, shift=1),
        "lookup": PromptLookup(1, 3),
    }[kind]
    fast = _guided(pair, ALWAYS, sampling=greedy, lam=lam, cfg_scale=scale, drafter=drafter)
    assert (fast.tokens, fast.text) == (plain.tokens, plain.text)
    assert fast.drafted > 0 and fast.cfg_scale == scale
    if kind == "right":
        assert fast.accepted == fast.drafted
        assert fast.verify_steps <= STEPS // 2  # far fewer decodes than tokens
    if kind == "wrong":
        assert fast.accepted == 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_verified_guided_rows_are_the_numpy_mixture_of_each_source_alone(
    pair, aligned_path, reference_path, temperature
):
    """CFG over DeRa (4 terms: 2 models x 2 prompts) with drafts at every step: each row
    the chain samples equals the weighted sum of each model run alone on each prompt."""
    recorder = LogitsRecorder()
    sampling = dera_local.SamplingParams(temperature=temperature, seed=11)
    lam, scale = 0.4, 2.0
    result = _guided(
        pair,
        ALWAYS,
        sampling=sampling,
        lam=lam,
        cfg_scale=scale,
        drafter=PromptLookup(1, 3),
        logits_observer=recorder.sampler,
    )
    assert result.drafted > 0 and result.finish_reason == "length"
    terms = [
        (scale * lam, aligned_path, None, 0),
        (scale * (1 - lam), reference_path, None, 0),
        ((1 - scale) * lam, aligned_path, None, 1),
        ((1 - scale) * (1 - lam), reference_path, None, 1),
    ]
    prompts = [pair.tokenize(PROMPT), pair.tokenize(NEGATIVE)]
    expected = mixture_logits_stepwise(terms, prompts, result.tokens)
    assert_logits_seen(recorder, expected, result.tokens, greedy_check=temperature == 0)


def test_a_speculating_mixture_of_three_models_is_the_numpy_sum(
    aligned_path, reference_path, model_dir, greedy
):
    from tiny_models import write_tiny_model

    third = write_tiny_model(model_dir / "third.gguf", seed=3)
    spec = [(1.5, aligned_path), (-0.75, reference_path), (0.25, third)]
    with load_mixture(spec, n_ctx=512, n_threads=2) as mixture:
        prompt = mixture.tokenize(PROMPT)
        plain = mixture.generate(prompt, sampling=greedy, max_tokens=STEPS, speculation=PLAIN)
        recorder = LogitsRecorder()
        mixture.clear_cache()
        fast = mixture.generate(
            prompt,
            sampling=greedy,
            max_tokens=STEPS,
            speculation=ALWAYS,
            drafter=ScriptedDrafter(plain.tokens),
            logits_observer=recorder.sampler,
        )
    assert fast.tokens == plain.tokens
    assert fast.accepted == fast.drafted > 0
    terms = [(w, p, None, 0) for w, p in spec]
    expected = mixture_logits_stepwise(terms, [prompt], fast.tokens)
    assert_logits_seen(recorder, expected, fast.tokens)


def test_a_mixture_speculates_with_prompt_lookup_by_default(aligned_path, reference_path):
    greedy = dera_local.SamplingParams(temperature=0)
    with load_mixture([(0.5, aligned_path), (0.5, reference_path)], n_ctx=512) as mixture:
        assert mixture.speculation.enabled and mixture.speculation.adaptive
        plain = mixture.generate(PROMPT, sampling=greedy, max_tokens=40, speculation=PLAIN)
        mixture.clear_cache()
        lookup = mixture.generate(
            PROMPT, sampling=greedy, max_tokens=40, speculation=SpeculationParams(adaptive=False)
        )
    assert lookup.tokens == plain.tokens
    assert lookup.drafted > 0


def test_seeded_guided_sampling_is_the_same_with_and_without_speculation(pair):
    for seed in range(4):
        sampling = dera_local.SamplingParams(temperature=1.0, top_k=5, seed=seed)
        plain = _guided(pair, PLAIN, sampling=sampling)
        fast = _guided(pair, ALWAYS, sampling=sampling, drafter=PromptLookup(1, 3))
        assert fast.tokens == plain.tokens
        assert fast.drafted > 0


def test_stop_rules_inside_an_accepted_guided_run(pair, greedy):
    plain = _guided(pair, PLAIN, sampling=greedy, max_tokens=40)
    stop = plain.text[12:15]  # a stop string in the middle of what the oracle drafts
    cut = _guided(pair, PLAIN, sampling=greedy, max_tokens=40, stop=[stop])
    fast = _guided(
        pair,
        SpeculationParams(draft_max=16, draft_min=16, adaptive=False),
        sampling=greedy,
        max_tokens=40,
        stop=[stop],
        drafter=ScriptedDrafter(plain.tokens),
    )
    assert cut.finish_reason == fast.finish_reason == "stop"
    assert (fast.text, fast.tokens) == (cut.text, cut.tokens)
    assert fast.accepted >= 1
    for n in (1, 2, 7):  # a step never keeps more than max_tokens
        short = _guided(
            pair, ALWAYS, sampling=greedy, max_tokens=n, drafter=ScriptedDrafter(plain.tokens)
        )
        assert short.tokens == plain.tokens[:n] and short.finish_reason == "length"


def test_rolled_back_caches_serve_the_next_call_like_plain_decoding(pair, greedy):
    """Every draft rejected: both sequences drop those positions at every step. A follow-up
    that extends the text reuses both caches and equals a fresh read of it."""
    first_plain = _guided(pair, PLAIN, sampling=greedy)
    pair.clear_cache()
    first = pair.generate(
        PROMPT,
        lam=0.5,
        negative_prompt=NEGATIVE,
        cfg_scale=1.5,
        sampling=greedy,
        max_tokens=STEPS,
        speculation=ALWAYS,
        drafter=ScriptedDrafter(first_plain.tokens, shift=1),
    )
    assert first.tokens == first_plain.tokens and first.accepted == 0 and first.drafted > 0
    follow_up = first.prompt_tokens + first.tokens + pair.tokenize(" and the", add_special=False)
    settings = dict(lam=0.5, negative_prompt=NEGATIVE, cfg_scale=1.5, sampling=greedy)
    reused = pair.generate(follow_up, max_tokens=12, speculation=ALWAYS, **settings)
    # the cache held the prompt and every kept token but the last (never decoded)
    assert reused.reused_prompt_tokens == len(first.prompt_tokens) + len(first.tokens) - 1
    pair.clear_cache()
    fresh = pair.generate(follow_up, max_tokens=12, speculation=PLAIN, **settings)
    assert fresh.reused_prompt_tokens == 0
    assert reused.tokens == fresh.tokens


def test_a_speculating_slot_beside_plain_slots_changes_none_of_them(pair, greedy):
    prompts = [PROMPT, "one two three one two three one", "hello"]
    lams = [0.5, 1.0, 0.0]
    solo = [
        _guided(pair, PLAIN, sampling=greedy, lam=lam, max_tokens=20).tokens for lam in lams[:1]
    ]
    with BatchDecoder(pair, 3, 256, prompts_per_slot=2, max_drafts=8) as decoder:
        negative = dera_local.engine.guidance.Guidance(tuple(pair.tokenize(NEGATIVE)), 1.5)
        slots = [
            decoder.admit(
                GenerationRequest(
                    pair.tokenize(prompts[0]),
                    lam=lams[0],
                    sampling=greedy,
                    max_tokens=20,
                    guidance=negative,
                    speculation=ALWAYS,
                    drafter=ScriptedDrafter(solo[0]),
                )
            )
        ]
        slots += [
            decoder.admit(
                GenerationRequest(pair.tokenize(p), lam=lam, sampling=greedy, max_tokens=20)
            )
            for p, lam in zip(prompts[1:], lams[1:], strict=True)
        ]
        while any(s.finish_reason is None for s in slots):
            decoder.step()
        tokens = [s.output.tokens for s in slots]
        assert slots[0].drafting.counts.accepted > 0
        assert all(s.drafting is None for s in slots[1:])
    assert tokens[0] == solo[0]
    for i in (1, 2):
        pair.clear_cache()
        alone = pair.generate(prompts[i], lam=lams[i], sampling=greedy, max_tokens=20)
        assert tokens[i] == alone.tokens, f"slot {i}"


def test_more_drafts_than_the_decoder_was_opened_for_is_one_clear_error(pair, greedy):
    with BatchDecoder(pair, 1, 256, max_drafts=4) as decoder:
        with pytest.raises(BadParameterError, match="draft_max 8 is more than this decoder"):
            decoder.admit(
                GenerationRequest(
                    pair.tokenize(PROMPT),
                    lam=1.0,
                    sampling=greedy,
                    max_tokens=4,
                    speculation=ALWAYS,
                )
            )
        assert decoder.free_slots == 1  # nothing was admitted, no sequence taken
        assert decoder.free_sequences == [0]


def test_a_refused_request_takes_no_sequence(pair, greedy):
    """A bad grammar is refused when the sampler chain is built: the decoder keeps all its
    sequences and serves the next request."""
    bad = dera_local.SamplingParams(temperature=0, grammar="root ::= (")
    with BatchDecoder(pair, 1, 256, prompts_per_slot=2) as decoder:
        guidance = dera_local.engine.guidance.Guidance(tuple(pair.tokenize(NEGATIVE)), 1.5)
        with pytest.raises(BadParameterError, match="grammar"):
            decoder.admit(
                GenerationRequest(
                    pair.tokenize(PROMPT), lam=1.0, sampling=bad, max_tokens=4, guidance=guidance
                )
            )
        assert decoder.free_sequences == [0, 1]
        slot = decoder.admit(
            GenerationRequest(
                pair.tokenize(PROMPT), lam=1.0, sampling=greedy, max_tokens=4, guidance=guidance
            )
        )
        while slot.finish_reason is None:
            decoder.step()
        assert len(slot.output.tokens) == 4
