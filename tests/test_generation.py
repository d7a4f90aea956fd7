"""Lockstep generation on the tiny pair: stops, limits, context, seeds, UTF-8, grammar."""

from __future__ import annotations

import pytest

import dera_local
from dera_local.errors import BadParameterError, DeraError


def test_stop_string_ends_generation_and_is_cut(pair, greedy):
    full = pair.generate("abc", lam=0.3, sampling=greedy, max_tokens=40)
    stop = full.text[10:13]
    assert len(stop) == 3
    cut = pair.generate("abc", lam=0.3, sampling=greedy, max_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.tokens == full.tokens[: len(cut.tokens)]
    streamed = list(pair.stream("abc", lam=0.3, sampling=greedy, max_tokens=40, stop=[stop]))
    assert "".join(streamed) == cut.text


def test_max_tokens(pair, greedy):
    result = pair.generate("abc", sampling=greedy, max_tokens=7)
    assert (len(result.tokens), result.finish_reason) == (7, "length")


def test_full_context_finishes_with_length(aligned_path, reference_path, greedy):
    # llama.cpp rounds the context up to a multiple of 256
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as small:
        prompt = small.tokenize("hello")
        result = small.generate(prompt, sampling=greedy, max_tokens=-1, lam=0.5)
        assert result.finish_reason == "length"
        # the last sampled token needs no room: the context holds prompt + all but it
        assert len(prompt) + len(result.tokens) == small.n_ctx + 1
        with pytest.raises(DeraError, match="context holds 256"):
            small.generate("x" * 300, sampling=greedy)
        assert small.generate("x" * 255, sampling=greedy).finish_reason == "length"


def test_end_of_generation_token_stops(pair):
    im_end = pair.tokenize("<|im_end|>", add_special=False)
    assert len(im_end) == 1
    grammar = 'root ::= "hi"'  # then only an end-of-generation token is allowed
    result = pair.generate("x", sampling=dera_local.SamplingParams(temperature=0, grammar=grammar))
    assert result.text == "hi" and result.finish_reason == "stop"
    assert im_end[0] not in result.tokens


def test_character_split_across_tokens_streams_whole(pair):
    target = "héllo wörld €"
    grammar = 'root ::= "' + target + '"'
    stream = pair.stream(
        "x", sampling=dera_local.SamplingParams(temperature=0, grammar=grammar), max_tokens=40
    )
    chunks = list(stream)
    assert "".join(chunks) == target
    assert "\ufffd" not in "".join(chunks)
    pieces = [pair.loaded.aligned_model.token_bytes(t) for t in stream.result.tokens]
    split = [p for p in pieces if not _is_utf8(p)]
    assert split, "the byte-level tokenizer should have split a character across tokens"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_seeded_sampling_repeats_and_seeds_differ(pair):
    def run(seed: int) -> list[int]:
        params = dera_local.SamplingParams(
            temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed
        )
        return pair.generate("seed test", lam=0.7, sampling=params, max_tokens=30).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_unseeded_run_reports_the_seed_that_repeats_it(pair):
    params = dera_local.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = pair.generate("seed test", sampling=params, max_tokens=20)
    again = pair.generate(
        "seed test",
        max_tokens=20,
        sampling=dera_local.SamplingParams(
            temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=first.seed
        ),
    )
    assert first.tokens == again.tokens


def test_repeat_penalty_changes_greedy_output(pair, greedy):
    plain = pair.generate("aaaa", sampling=greedy, max_tokens=30)
    penalized = pair.generate(
        "aaaa", max_tokens=30, sampling=dera_local.SamplingParams(temperature=0, repeat_penalty=1.5)
    )
    assert plain.tokens != penalized.tokens


def test_same_prompt_again_reuses_the_cache_and_gives_the_same_tokens(pair, greedy):
    pair.clear_cache()
    first = pair.generate("cache me", lam=0.3, sampling=greedy, max_tokens=10)
    second = pair.generate("cache me", lam=0.3, sampling=greedy, max_tokens=10)
    assert first.reused_prompt_tokens == 0
    assert second.reused_prompt_tokens == len(second.prompt_tokens) - 1
    assert first.tokens == second.tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"lam": float("nan")}, "finite"),
        ({"sampling": None, "prompt": []}, "empty"),
        ({"prompt": [10**6]}, "outside the vocabulary"),
    ],
)
def test_bad_arguments_raise_one_line_errors(pair, kwargs, message):
    prompt = kwargs.pop("prompt", "hi")
    with pytest.raises(BadParameterError, match=message):
        pair.generate(prompt, **kwargs)


def test_bad_sampling_values_and_grammar(pair):
    with pytest.raises(BadParameterError, match="top_p"):
        dera_local.SamplingParams(top_p=0)
    with pytest.raises(BadParameterError, match="grammar"):
        pair.generate("x", sampling=dera_local.SamplingParams(grammar="root ::= ("))


def test_streams_that_are_never_iterated_hold_no_sampler(pair, greedy):
    from dera_local.sampling.chain import SamplerChain

    before = SamplerChain.live
    for _ in range(1000):
        pair.stream("abc", sampling=greedy, max_tokens=4)
    assert SamplerChain.live == before
    started = pair.stream("abc", sampling=greedy, max_tokens=20)
    next(started)
    assert SamplerChain.live == before + 1
    started.close()
    assert SamplerChain.live == before
    dropped = pair.stream("abc", sampling=greedy, max_tokens=20)
    next(dropped)
    del dropped  # a started generator is closed when collected, freeing its chain
    assert SamplerChain.live == before
    finished = pair.generate("abc", sampling=greedy, max_tokens=5)
    assert len(finished.tokens) == 5 and SamplerChain.live == before


def test_stop_rules_of_one_sequence(pair):
    from dera_local.engine.outputs import SequenceOutput

    model = pair.loaded.aligned_model
    (eog,) = pair.tokenize("<|im_end|>", add_special=False)
    (a,) = pair.tokenize("a", add_special=False)
    (b,) = pair.tokenize("b", add_special=False)

    def output(**kwargs) -> SequenceOutput:
        settings = {"n_prompt": 3, "n_ctx": 100, "max_tokens": 10, **kwargs}
        return SequenceOutput(model, **settings)

    ends = output()
    assert ends.advance(a) is None and ends.advance(eog) == "stop"
    assert ends.tokens == [a] and ends.finish_reason == "stop"

    stopped = output(stop=["ab"])
    assert stopped.advance(a) is None and stopped.new_text == ""  # 'a' may start 'ab'
    assert stopped.advance(b) == "stop" and stopped.text == "" and stopped.tokens == [a, b]

    held = output(stop=["ax"])
    assert held.advance(a) is None and held.advance(b) is None and held.text == "ab"

    limited = output(max_tokens=2)
    assert limited.advance(a) is None and limited.advance(a) == "length"

    # n_ctx 5 with a 3-token prompt: token 1 is decoded at position 3, token 2 would need 4,
    # token 3 would need position 5, which does not exist: it ends the sequence undecoded.
    full = output(n_ctx=5, max_tokens=-1)
    assert [full.advance(a) for _ in range(3)] == [None, None, "length"]


def test_library_errors_name_no_flags_and_the_cli_hint_is_separate(aligned_path, reference_path):
    with (
        dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as small,
        pytest.raises(BadParameterError) as info,
    ):
        small.generate("x" * 300)
    assert "-c" not in str(info.value) and "context holds 256" in str(info.value)
    assert info.value.cli_hint == "or raise -c"
    assert info.value.for_cli().endswith("(or raise -c)")


def test_one_generation_at_a_time_and_nothing_after_close(aligned_path, reference_path, greedy):
    import threading

    from dera_local import PairBusyError, PairClosedError

    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512) as own:
        alone = own.generate("abc", lam=0.5, sampling=greedy, max_tokens=30)
        own.clear_cache()
        first = own.stream("abc", lam=0.5, sampling=greedy, max_tokens=30)
        chunks = [next(first)]
        # a second stream, in this thread or another, is refused while the first runs
        with pytest.raises(PairBusyError, match="busy with another generation"):
            own.generate("xyz", sampling=greedy, max_tokens=5)
        errors = []

        def other_thread() -> None:
            try:
                own.generate("xyz", sampling=greedy, max_tokens=5)
            except PairBusyError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1
        chunks += list(first)  # the first stream is untouched by the refused ones
        assert "".join(chunks) == alone.text and first.result.tokens == alone.tokens
        assert len(own.generate("xyz", sampling=greedy, max_tokens=5).tokens) == 5  # free again

        # many threads at once: every call either generates or is refused, none crashes
        outcomes = []

        def racer() -> None:
            try:
                outcomes.append(len(own.generate("abc", sampling=greedy, max_tokens=20).tokens))
            except PairBusyError:
                outcomes.append("busy")

        threads = [threading.Thread(target=racer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outcomes) == 8 and 20 in outcomes
        assert set(outcomes) <= {20, "busy"}

        suspended = own.stream("abc", sampling=greedy, max_tokens=30)
        next(suspended)
    # closed with a stream still open: its next step is a clear error, not freed memory
    with pytest.raises(PairClosedError):
        next(suspended)
    with pytest.raises(PairClosedError, match="the pair is closed"):
        own.generate("abc")
    with pytest.raises(PairClosedError):
        own.generate([1, 2, 3])  # token ids: no tokenizer call first
    own.close()  # twice is harmless
