"""The batched step (dera_local.engine.decoder.BatchDecoder) that the server and the sweep share:
slots that join and leave between steps, chunked prompts, per-slot lam and sampling, and
prefix reuse. The contract: each slot's tokens equal what `generate` gives it alone."""

from __future__ import annotations

import pytest

import dera_local
from dera_local.engine.decoder import BatchDecoder
from dera_local.engine.request import GenerationRequest
from dera_local.errors import BadParameterError

PURE = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def _alone(pair, prompt, lam, sampling, max_tokens):
    return pair.generate(prompt, lam=lam, sampling=sampling, max_tokens=max_tokens).tokens


def _run(decoder, slots):
    while any(s.finish_reason is None for s in slots):
        decoder.step()


def test_slots_joining_between_steps_equal_their_solo_runs(pair, greedy):
    """Three generations at different lams, admitted at different steps, one seeded."""
    seeded = dera_local.SamplingParams(**PURE, seed=11)
    jobs = [
        ("The cat", 0.0, greedy, 12),
        ("A long prompt about the weather and the sea", 1.0, seeded, 9),
        ("hello", 2.0, greedy, 15),
    ]
    expected = [_alone(pair, p, lam, s, n) for p, lam, s, n in jobs]
    with BatchDecoder(pair, 3, 256) as decoder:
        first = decoder.admit(
            GenerationRequest(pair.tokenize(jobs[0][0]), lam=0.0, sampling=greedy, max_tokens=12)
        )
        decoder.step()
        decoder.step()
        second = decoder.admit(
            GenerationRequest(pair.tokenize(jobs[1][0]), lam=1.0, sampling=seeded, max_tokens=9)
        )
        decoder.step()
        third = decoder.admit(
            GenerationRequest(pair.tokenize(jobs[2][0]), lam=2.0, sampling=greedy, max_tokens=15)
        )
        slots = [first, second, third]
        _run(decoder, slots)
        assert [s.output.tokens for s in slots] == expected
        for slot in slots:
            decoder.retire(slot)
        assert decoder.free_slots == 3


def test_a_long_prompt_is_read_in_chunks_while_others_keep_decoding(pair, greedy):
    long_prompt = pair.tokenize(" ".join(["the weather is fine today"] * 3))
    assert len(long_prompt) > 40  # 62 with the tiny tokenizer: 9 chunks of 7
    expected_long = _alone(pair, long_prompt, 0.5, greedy, 6)
    expected_short = _alone(pair, "hello", 1.0, greedy, 30)
    with BatchDecoder(pair, 2, 256, n_batch=8) as decoder:
        short = decoder.admit(
            GenerationRequest(pair.tokenize("hello"), lam=1.0, sampling=greedy, max_tokens=30)
        )
        decoder.step()
        long = decoder.admit(GenerationRequest(long_prompt, lam=0.5, sampling=greedy, max_tokens=6))
        steps_to_first_token = 0
        while long.prefilling:
            before = len(short.output.tokens)
            decoder.step()
            steps_to_first_token += 1
            assert len(short.output.tokens) == before + 1  # never stalled by the prompt
        # 7 prompt tokens fit beside the running slot's token per step of 8
        assert steps_to_first_token == -(-len(long_prompt) // 7)
        _run(decoder, [short, long])
        assert long.output.tokens == expected_long
        assert short.output.tokens == expected_short


def test_a_follow_up_reuses_the_slot_holding_its_conversation(pair, greedy):
    with BatchDecoder(pair, 2, 256) as decoder:
        other = decoder.admit(
            GenerationRequest(pair.tokenize("unrelated words"), sampling=greedy, max_tokens=4)
        )
        first_prompt = pair.tokenize("The first turn of a conversation")
        first = decoder.admit(
            GenerationRequest(first_prompt, lam=1.0, sampling=greedy, max_tokens=5)
        )
        _run(decoder, [other, first])
        decoder.retire(other)
        decoder.retire(first)
        follow_up = (
            first_prompt + first.output.tokens + pair.tokenize(" and more", add_special=False)
        )
        slot = decoder.admit(GenerationRequest(follow_up, lam=1.0, sampling=greedy, max_tokens=5))
        assert slot.seq_id == first.seq_id
        # all but the last answer token (sampled, never decoded) were cached
        assert slot.reused_prompt_tokens == len(first_prompt) + len(first.output.tokens) - 1
        _run(decoder, [slot])
        assert slot.output.tokens == _alone(pair, follow_up, 1.0, greedy, 5)


def test_a_prompt_over_a_slots_share_is_refused_with_the_numbers(pair, greedy):
    with BatchDecoder(pair, 4, 32) as decoder:
        with pytest.raises(
            BadParameterError, match="40 tokens but each of the 4 parallel slots holds 32"
        ):
            decoder.admit(
                GenerationRequest(list(range(5, 45)), lam=1.0, sampling=greedy, max_tokens=4)
            )
        assert decoder.free_slots == 4
        # an answer stops at the slot's end: "length", not an overflow
        slot = decoder.admit(
            GenerationRequest(list(range(5, 25)), lam=1.0, sampling=greedy, max_tokens=100)
        )
        _run(decoder, [slot])
        assert (
            slot.finish_reason == "length"
            and len(slot.prompt_tokens) + len(slot.output.tokens) <= 33
        )


def test_no_slots_is_a_clear_error(pair):
    with pytest.raises(BadParameterError, match="at least 1"):
        BatchDecoder(pair, 0, 64)


def test_a_prompt_borrows_a_shared_start_from_another_slot(pair, greedy):
    """A second conversation with the same system prompt reads only what differs: the
    common start is shared from the running slot's cache (no recompute), and both
    answers still equal their solo runs."""
    system = pair.tokenize("You are a helpful assistant who answers briefly. ")
    first_prompt = system + pair.tokenize("The cat", add_special=False)
    second_prompt = system + pair.tokenize("A dog", add_special=False)
    with BatchDecoder(pair, 2, 256) as decoder:
        first = decoder.admit(
            GenerationRequest(first_prompt, lam=1.0, sampling=greedy, max_tokens=10)
        )
        decoder.step()  # the first prompt is cached now, its answer running
        second = decoder.admit(
            GenerationRequest(second_prompt, lam=0.5, sampling=greedy, max_tokens=10)
        )
        shared = 0
        while first_prompt[shared] == second_prompt[shared]:
            shared += 1
        assert second.seq_id != first.seq_id and second.reused_prompt_tokens == shared
        assert len(second.lanes[0].pending) == len(second_prompt) - shared
        _run(decoder, [first, second])
        assert first.output.tokens == _alone(pair, first_prompt, 1.0, greedy, 10)
        assert second.output.tokens == _alone(pair, second_prompt, 0.5, greedy, 10)


@pytest.mark.parametrize("seeded", [False, True])
def test_a_single_generation_equals_the_same_request_among_four_slots(pair, greedy, seeded):
    """`generate` is one slot of the batched step; the same request beside three others
    in a 4-slot decoder gives the same tokens (f32 fixtures: no batched-rounding ties)."""
    sampling = dera_local.SamplingParams(**PURE, seed=5) if seeded else greedy
    prompt = pair.tokenize("The keeper climbed the stairs")
    alone = pair.generate(prompt, lam=0.7, sampling=sampling, max_tokens=24)
    others = [("hello", 0.0), ("A long prompt about the weather and the sea", 1.5), ("x", 1.0)]
    with BatchDecoder(pair, 4, 256) as decoder:
        neighbours = [
            decoder.admit(
                GenerationRequest(pair.tokenize(text), lam=lam, sampling=greedy, max_tokens=30)
            )
            for text, lam in others[:2]
        ]
        mine = decoder.admit(GenerationRequest(prompt, lam=0.7, sampling=sampling, max_tokens=24))
        neighbours.append(
            decoder.admit(
                GenerationRequest(
                    pair.tokenize(others[2][0]), lam=1.0, sampling=greedy, max_tokens=30
                )
            )
        )
        _run(decoder, [mine, *neighbours])
        assert mine.output.tokens == alone.tokens
        assert mine.output.text == alone.text and mine.finish_reason == alone.finish_reason


def test_overlapped_decodes_give_the_same_tokens_and_run_every_source(
    aligned_path, reference_path, greedy
):
    """overlap_decodes (each source context decoded in its own thread, as on a GPU) is the
    same computation: greedy and seeded tokens equal the one-after-another run's."""
    seeded = dera_local.SamplingParams(**PURE, seed=3)
    prompt = "Once upon a time"
    results = {}
    for overlap in (False, True):
        with dera_local.load_pair(
            aligned_path, reference_path, n_ctx=256, overlap_decodes=overlap
        ) as loaded:
            decodes = loaded._slots.home.decodes
            assert decodes.overlap is overlap
            decodes.recording = True
            results[overlap] = [
                loaded.generate(prompt, lam=0.5, sampling=s, max_tokens=20).tokens
                for s in (greedy, seeded)
            ]
            assert sorted(index for index, _, _ in decodes.spans) == [0, 1]
    assert results[True] == results[False]
