"""Exact realignment (dera_local/engine/exact.py) on a tiny LoRA pair whose answers,
capped at two tokens, can all be enumerated: the exact draws follow
Pi_lam(y) ∝ q_ref(y)^(1-lam) q_1(y)^lam computed in numpy from each model run alone
(chi-square), the share of surviving attempts matches the enumerated Z (binomial
interval), lam 0 and 1 kill nothing and give plain DeRa's answer for the same seed, and
what exact mode cannot sample is refused in one line."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from reference_impl import solo_logits
from scripted_drafter import ScriptedDrafter
from tiny_models import write_tiny_lora

import dera_local
from dera_local.engine import exact_attempts
from dera_local.engine.exact import ExactBudgetError, log_overlap
from dera_local.speculation.drafts import SpeculationParams

scipy_stats = pytest.importorskip("scipy.stats")

CAP = 2
PROMPT = "hello"
PURE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1}


def pure(temperature: float, seed: int) -> dera_local.SamplingParams:
    return dera_local.SamplingParams(
        temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=seed
    )


@pytest.fixture(scope="module")
def weak_lora(tmp_path_factory):
    """An adapter half as strong as the shared one: one attempt in 7 to 15 survives two
    tokens (the target is cheap enough to sample a thousand times), and DeRa's answers
    are still told apart from the target's (test_the_check_tells_deras_answers_apart)."""
    return write_tiny_lora(tmp_path_factory.mktemp("exact") / "weak.gguf", seed=9, alpha=4.0)


@pytest.fixture(scope="module")
def lora_pair(reference_path, weak_lora):
    with dera_local.load_pair(None, reference_path, lora=weak_lora, n_ctx=256, n_threads=2) as pair:
        yield pair


def _log_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    x = row.astype(np.float64) / temperature
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


# A grammar mask: one or two of the letters a-d. Which tokens it lets through, written
# out by hand (the tiny vocabulary has no merge within a-d): a letter first; then a
# letter or the end.
GRAMMAR = "root ::= [a-d] [a-d]?"
LETTERS = [ord(c) for c in "abcd"]  # byte-level tokens: a byte's id is its value


def grammar_allowed(pair):
    ends = [t for t in range(pair.n_vocab) if pair.model.is_end_of_generation(t)]
    return lambda answer: LETTERS if not answer else LETTERS + ends


def masked(temperature: float, seed: int) -> dera_local.SamplingParams:
    return dera_local.SamplingParams(
        temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=seed, grammar=GRAMMAR
    )


def enumerated_target(
    pair, base, lora, lam: float, temperature: float, allowed=None, cap: int = CAP
):
    """Every answer of at most `cap` tokens with its unnormalised target mass
    q_1^lam q_ref^(1-lam), from each model run alone (llama-cpp-python) in numpy. Keys
    are the answers' tokens, without the end token (as GenerationResult has them).
    `allowed(answer_so_far)`: the tokens a mask lets through there (both models are
    masked and renormalised first; only those are followed); default all."""
    prompt = pair.tokenize(PROMPT)
    ends = {t for t in range(pair.n_vocab) if pair.model.is_end_of_generation(t)}
    everything = list(range(pair.n_vocab))

    def step(answer: tuple) -> np.ndarray:
        prefix = prompt + list(answer)
        a = solo_logits(str(base), prefix, lora=str(lora))[-1].astype(np.float64)
        r = solo_logits(str(base), prefix)[-1].astype(np.float64)
        if allowed is not None:
            barred = np.ones(pair.n_vocab, dtype=bool)
            barred[list(allowed(answer))] = False
            a[barred] = r[barred] = -np.inf
        log_a, log_r = _log_softmax(a, temperature), _log_softmax(r, temperature)
        with np.errstate(invalid="ignore"):  # -inf * 0 where lam is 0 or 1: no mass
            terms = lam * log_a + (1 - lam) * log_r
        return np.nan_to_num(terms, nan=-np.inf, neginf=-np.inf)

    mass: dict[tuple, float] = {}

    def walk(answer: tuple, log_mass: float) -> None:
        terms = step(answer)
        for v in everything if allowed is None else allowed(answer):
            if terms[v] == -np.inf:
                continue
            if v in ends:
                key = answer
            elif len(answer) + 1 == cap:  # cut at the cap: no end token
                key = (*answer, v)
            else:
                walk((*answer, v), log_mass + terms[v])
                continue
            mass[key] = mass.get(key, 0.0) + math.exp(log_mass + terms[v])

    walk((), 0.0)
    return mass


def _first_token_bins(mass: dict[tuple, float]) -> dict:
    bins: dict = {}
    for key, m in mass.items():
        label = key[0] if key else "end"
        bins[label] = bins.get(label, 0.0) + m
    return bins


def _p_value(expected: dict, observed: dict) -> float:
    """Chi-square p of observed counts against expected ones, by label; labels expecting
    fewer than 5 are pooled, and a pool still under 5 joins the largest bin (the test's
    approximation needs it)."""
    big = sorted((label for label, e in expected.items() if e >= 5), key=expected.get)
    rest = [label for label in expected if label not in big]
    exp = [expected[b] for b in big]
    obs = [observed.get(b, 0) for b in big]
    pooled_e = sum(expected[b] for b in rest)
    pooled_o = sum(observed.get(b, 0) for b in rest)
    if pooled_e >= 5:
        exp.append(pooled_e)
        obs.append(pooled_o)
    elif exp:
        exp[-1] += pooled_e
        obs[-1] += pooled_o
    if len(exp) < 2:
        return 1.0  # one bin: nothing to compare
    return float(scipy_stats.chisquare(obs, exp).pvalue)


def _first_token_p_value(mass: dict[tuple, float], drawn: list[tuple]) -> float:
    """Answers binned by their first token against the enumerated target."""
    z, n = sum(mass.values()), len(drawn)
    expected = {label: m / z * n for label, m in _first_token_bins(mass).items()}
    observed: dict = {}
    for tokens in drawn:
        label = tokens[0] if tokens else "end"
        observed[label] = observed.get(label, 0) + 1
    return _p_value(expected, observed)


def _length_p_value(mass: dict[tuple, float], drawn: list[tuple], cap: int = CAP) -> float:
    z, n = sum(mass.values()), len(drawn)
    expected = {i: sum(m for k, m in mass.items() if len(k) == i) / z * n for i in range(cap + 1)}
    observed = {i: sum(len(t) == i for t in drawn) for i in range(cap + 1)}
    return _p_value(expected, observed)


@pytest.mark.parametrize(("lam", "temperature"), [(0.3, 1.0), (0.7, 1.0), (0.3, 0.7), (0.7, 0.7)])
def test_exact_draws_follow_the_enumerated_target(
    lora_pair, reference_path, weak_lora, lam, temperature
):
    mass = enumerated_target(lora_pair, reference_path, weak_lora, lam, temperature)
    z = sum(mass.values())
    n = 1000
    drawn, attempts = [], 0
    for seed in range(n):
        result = lora_pair.generate(
            PROMPT, lam=lam, sampling=pure(temperature, seed), max_tokens=CAP, exact=True
        )
        drawn.append(tuple(result.tokens))
        attempts += result.exact["attempts"]
        assert result.finish_reason in ("stop", "length")
    assert _first_token_p_value(mass, drawn) > 0.001
    assert _length_p_value(mass, drawn) > 0.001
    # survivors / attempts estimates Z (binomial interval over the attempts made)
    rate = n / attempts
    assert abs(rate - z) < 4 * math.sqrt(z * (1 - z) / attempts), (rate, z)


# (lam 0.7 at T 0.7 is left out: its masked target keeps one attempt in 230)
@pytest.mark.parametrize(("lam", "temperature"), [(0.3, 1.0), (0.7, 1.0), (0.3, 0.7)])
def test_exact_draws_under_a_grammar_follow_the_masked_models_target(
    lora_pair, reference_path, weak_lora, lam, temperature
):
    """The target of two masked models: each masked and renormalised, then realigned."""
    allowed = grammar_allowed(lora_pair)
    mass = enumerated_target(lora_pair, reference_path, weak_lora, lam, temperature, allowed)
    assert all(key and set(key) <= set(LETTERS) for key in mass if mass[key] > 0)
    z = sum(mass.values())
    n = 1000
    drawn, attempts = [], 0
    for seed in range(n):
        result = lora_pair.generate(  # four attempts at a time: this target is costly
            PROMPT,
            lam=lam,
            sampling=masked(temperature, seed),
            max_tokens=CAP,
            exact=True,
            exact_parallel=4,
        )
        drawn.append(tuple(result.tokens))
        attempts += result.exact["attempts"]
    assert set(drawn) <= {key for key, m in mass.items() if m > 0}
    assert _first_token_p_value(mass, drawn) > 0.001
    assert _length_p_value(mass, drawn) > 0.001
    rate = n / attempts
    assert abs(rate - z) < 4 * math.sqrt(z * (1 - z) / attempts), (rate, z)


class FirstToFinish:
    """The pitfall rule: the first survivor to end is the answer (short ones end first)."""

    def __init__(self) -> None:
        self.first = None
        self.ended: dict[int, bool] = {}

    def end(self, number: int, survived: bool) -> None:
        self.ended[number] = survived
        if survived and self.first is None:
            self.first = number

    def answer(self):
        return self.first

    def may_answer(self, number: int) -> bool:
        return self.first is None


# For the pitfall: answers of one letter or of three, so that short survivors finish two
# steps before long ones (the end token is rare: about 8% of the target is one letter).
SHORT_OR_LONG = "root ::= [a-b] | [a-b] [a-b] [a-b]"
AB = [ord("a"), ord("b")]
PARALLEL_LAM, PARALLEL_N, PARALLEL_CAP = 0.7, 1000, 3


@pytest.fixture(scope="module")
def parallel_target(lora_pair, reference_path, weak_lora):
    ends = [t for t in range(lora_pair.n_vocab) if lora_pair.model.is_end_of_generation(t)]
    allowed = lambda answer: AB + ends if len(answer) == 1 else AB  # noqa: E731
    return enumerated_target(
        lora_pair, reference_path, weak_lora, PARALLEL_LAM, 1.0, allowed, cap=PARALLEL_CAP
    )


def _parallel_draws(pair, parallel: int, **kwargs) -> list[tuple]:
    sampling = dera_local.SamplingParams(**PURE, grammar=SHORT_OR_LONG)
    return [
        tuple(
            pair.generate(
                PROMPT,
                lam=PARALLEL_LAM,
                sampling=replace(sampling, seed=seed),
                max_tokens=PARALLEL_CAP,
                exact=True,
                exact_parallel=parallel,
                **kwargs,
            ).tokens
        )
        for seed in range(PARALLEL_N)
    ]


def test_parallel_attempts_return_the_first_started_survivor_and_stay_exact(
    lora_pair, parallel_target
):
    drawn = _parallel_draws(lora_pair, 8)
    assert _first_token_p_value(parallel_target, drawn) > 0.001
    assert _length_p_value(parallel_target, drawn, PARALLEL_CAP) > 0.001


def test_returning_the_first_attempt_to_finish_fails_that_check(
    lora_pair, parallel_target, monkeypatch
):
    """The test above has the power to see the pitfall: with the first survivor to end
    returned instead, one-letter answers are too frequent and the length check fails."""
    monkeypatch.setattr(exact_attempts, "SmallestNumber", FirstToFinish)
    drawn = _parallel_draws(lora_pair, 8)
    assert _length_p_value(parallel_target, drawn, PARALLEL_CAP) < 1e-6


def test_parallel_attempts_give_the_answer_one_at_a_time_gives(lora_pair):
    """An attempt's seeds depend only on its number: the answer does not depend on how
    many attempts run at once."""
    for seed in range(30):
        sampling = pure(1.0, seed)
        one, eight = (
            lora_pair.generate(
                PROMPT, lam=0.5, sampling=sampling, max_tokens=CAP, exact=True, exact_parallel=p
            )
            for p in (1, 8)
        )
        assert one.tokens == eight.tokens
        assert (one.exact["attempts"], one.exact["killed"]) == (
            eight.exact["attempts"],
            eight.exact["killed"],
        )
        assert eight.exact["tokens_spent"] >= one.exact["tokens_spent"]


# Speculation in exact mode: every drafted letter is an "a", verified two at a time.
ALWAYS_DRAFT = SpeculationParams(draft_max=2, adaptive=False)


class CountedAccept:
    """The usual acceptance rule (the sample equals the draft), counting what it kept."""

    def __init__(self) -> None:
        self.drafts = self.kept = 0

    def __call__(self, sampled: int, drafted: int) -> bool:
        self.drafts += 1
        self.kept += sampled == drafted
        return sampled == drafted


def test_speculating_attempts_stay_exact(lora_pair, parallel_target):
    """Drafts verified against the attempts' DeRa rows, each verified position tested
    for the kill: the draws still pass the chi-square against the enumerated target."""
    accept = CountedAccept()
    drafter = ScriptedDrafter([ord("a")] * PARALLEL_CAP)
    drawn = _parallel_draws(lora_pair, 4, speculation=ALWAYS_DRAFT, drafter=drafter, accept=accept)
    assert accept.kept > 100  # the walk really kept drafts (and tested them for kills)
    assert _first_token_p_value(parallel_target, drawn) > 0.001
    assert _length_p_value(parallel_target, drawn, PARALLEL_CAP) > 0.001


@pytest.mark.parametrize("parallel", [1, 4])
def test_speculation_changes_no_attempt_only_the_decodes(lora_pair, parallel):
    """An attempt's token draws and kill coins are one stream each, used once per
    position whether the position was drafted or not: with drafts of the pair's likely
    path (about half kept), every answer, its attempts and its kills equal those of
    one-token-at-a-time attempts for the same seed. (Thousands of attempts are killed
    here, many of them inside a verified run: a kill test skipped or misplaced there
    would change the counts.)"""
    likely = [73, 68, 154, 73, 68, 154]  # the weak pair's most frequent DeRa answer at lam 0.8
    accept = CountedAccept()
    for seed in range(40):
        settings = {"lam": 0.8, "sampling": pure(1.0, seed), "max_tokens": 6, "exact": True}
        plain = lora_pair.generate(
            PROMPT, **settings, exact_parallel=1, speculation=SpeculationParams(draft_max=0)
        )
        drafted = lora_pair.generate(
            PROMPT,
            **settings,
            exact_parallel=parallel,
            speculation=SpeculationParams(draft_max=4, adaptive=False),
            drafter=ScriptedDrafter(likely),
            accept=accept,
        )
        assert drafted.tokens == plain.tokens, seed
        counts = ("attempts", "killed")
        assert [drafted.exact[c] for c in counts] == [plain.exact[c] for c in counts], seed
        if parallel == 1:  # one at a time, the same positions are decoded
            assert drafted.exact["tokens_spent"] == plain.exact["tokens_spent"], seed
    assert accept.kept > 1000 and accept.drafts > accept.kept


def test_the_answer_waits_for_every_attempt_started_before_it():
    rule = exact_attempts.SmallestNumber()
    rule.end(2, True)  # attempt 2 survived and ended first: 0 and 1 still run
    assert rule.answer() is None and rule.may_answer(1) and not rule.may_answer(3)
    rule.end(0, False)
    assert rule.answer() is None
    rule.end(1, True)
    assert rule.answer() == 1


def test_the_check_tells_deras_answers_apart(lora_pair, reference_path, weak_lora):
    """The chi-square above has the power to see DeRa's approximation: plain DeRa's
    answers at the same lam, temperature and seeds fail it."""
    lam, temperature, n = 0.3, 1.0, 1000
    mass = enumerated_target(lora_pair, reference_path, weak_lora, lam, temperature)
    plain = [
        tuple(
            lora_pair.generate(
                PROMPT, lam=lam, sampling=pure(temperature, seed), max_tokens=CAP
            ).tokens
        )
        for seed in range(n)
    ]
    assert _first_token_p_value(mass, plain) < 1e-6


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("sampled", [pure, masked])
def test_at_lam_0_and_1_nothing_is_killed_and_the_answer_is_plain_deras(lora_pair, lam, sampled):
    for seed in range(20):
        sampling = sampled(1.0, seed)
        plain = lora_pair.generate(PROMPT, lam=lam, sampling=sampling, max_tokens=8)
        exact = lora_pair.generate(PROMPT, lam=lam, sampling=sampling, max_tokens=8, exact=True)
        assert exact.tokens == plain.tokens
        assert exact.exact == {**exact.exact, "attempts": 1, "killed": 0, "z_estimate": 1.0}


def test_an_exact_answer_is_repeatable_from_its_seed(lora_pair):
    one = lora_pair.generate(PROMPT, lam=0.5, sampling=pure(1.0, 7), max_tokens=CAP, exact=True)
    two = lora_pair.generate(PROMPT, lam=0.5, sampling=pure(1.0, 7), max_tokens=CAP, exact=True)
    assert (one.tokens, one.exact) == (two.tokens, two.exact)
    assert one.to_dict()["exact"]["attempts"] >= 1


def test_the_kill_probability_is_the_overlap_of_the_two_tempered_models():
    rng = np.random.default_rng(0)
    a, r = rng.normal(size=50), rng.normal(size=50)
    for lam in (0.2, 0.5, 0.9):
        for temperature in (1.0, 0.6):
            qa = np.exp(_log_softmax(a, temperature))
            qr = np.exp(_log_softmax(r, temperature))
            expected = float(np.sum(qa**lam * qr ** (1 - lam)))
            assert math.exp(log_overlap(a, r, lam, temperature)) == pytest.approx(
                expected, rel=1e-12
            )
            assert expected <= 1.0  # Hoelder: an attempt is killed, never favoured


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"lam": 1.5}, "0 <= lam <= 1"),
        ({"lam": -0.2}, "0 <= lam <= 1"),
        ({"sampling": dera_local.SamplingParams(seed=1)}, "turn off top-k"),
        ({"sampling": dera_local.SamplingParams(temperature=0)}, "temperature in (0, 1]"),
        (
            {"sampling": dera_local.SamplingParams(temperature=1.5, top_k=0, top_p=1, min_p=0)},
            "temperature in (0, 1]",
        ),  # fmt: skip
        (
            {"sampling": dera_local.SamplingParams(**PURE, logit_bias=((5, 2.0),))},
            "logit bias other than -100",
        ),  # fmt: skip
        ({"negative_prompt": "be rude"}, "pair's plain DeRa"),
    ],
)
@pytest.mark.filterwarnings("ignore:lam=")
def test_what_exact_mode_cannot_sample_is_refused_in_one_line(lora_pair, kwargs, says):
    settings = {"lam": 0.5, "sampling": pure(1.0, 1), **kwargs}
    with pytest.raises(dera_local.BadParameterError) as caught:
        lora_pair.generate(PROMPT, max_tokens=CAP, exact=True, **settings)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_spent_budget_is_one_line_with_the_acceptance_seen(pair):
    """The shared tiny pair's two models are far apart (about one attempt in 100 survives
    two tokens at lam 0.5), so a budget of 20 tokens runs out."""
    with pytest.raises(ExactBudgetError) as caught:
        pair.generate(
            PROMPT, lam=0.5, sampling=pure(1.0, 3), max_tokens=CAP, exact=True, exact_budget=20
        )
    message = str(caught.value)
    assert "spent its budget of 20 tokens" in message and "attempts survived" in message
    assert "\n" not in message


def test_the_cli_samples_exactly_and_refuses_in_one_line(run):
    """generate --exact: the truncation samplers default to off, the answer's cost goes
    to --json, and what exact mode refuses is one line with exit status 1."""
    import json

    result = run("generate", "--exact", "--lam", "0.5", "--temp", "1", "-n", "2", "-s", "4",
                 "--json", "hello")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["exact"]["attempts"] >= 1 and data["finish_reason"] in ("stop", "length")
    refused = run("generate", "--exact", "--lam", "1.5", "hello")
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: exact realignment needs 0 <= lam <= 1 (lam 1.5): beyond 1 the target rewards "
        "disagreement and has no normaliser without a length cap"
    ]
    explicit = run("generate", "--exact", "--top-k", "40", "--lam", "0.5", "hello")
    assert explicit.exit_code == 1 and "turn off top-k" in explicit.stderr


def test_chat_exact_answers_each_turn_and_toggles_and_fails_in_one_line(
    run, lora_pair, reference_path, weak_lora, monkeypatch
):
    """chat --exact: each reply's cost on stderr; /exact off and on swap the sampling
    (truncation back on and off); a lam exact mode refuses is one error line and the
    session goes on, that turn forgotten. The replies equal ChatSession's in Python."""
    script = "hello\n/lambda 1.5\nagain\n/lambda 0.5\n/exact off\nthird\n/exact on\nbye\n"
    monkeypatch.delenv("DERA_ALIGNED")
    result = run("chat", "-mr", str(reference_path), "--lora", str(weak_lora), "-c", "256",
                 "--exact", "--lam", "0.5", "--temp", "1", "-s", "3", "-n", "2",
                 stdin=script)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: exact realignment needs 0 <= lam <= 1 (lam 1.5): beyond 1 the target "
        "rewards disagreement and has no normaliser without a length cap"
    ]
    assert result.stderr.count("exact: ") == 2  # hello and bye
    assert "exact realignment off" in result.stderr and "exact realignment on" in result.stderr
    untruncated = dera_local.SamplingParams(**{**PURE, "seed": 3})
    truncated = dera_local.SamplingParams(temperature=1.0, seed=3)
    session = dera_local.ChatSession(
        lora_pair, lam=0.5, sampling=untruncated, max_tokens=2, exact=True
    )
    replies = [session.say("hello")]
    session.exact, session.sampling = False, truncated
    replies.append(session.say("third"))
    session.exact, session.sampling = True, untruncated
    replies.append(session.say("bye"))
    assert result.stdout == "".join(reply + "\n" for reply in replies)


def test_sweep_exact_draws_every_lam_of_its_range(
    run, tmp_path, reference_path, weak_lora, monkeypatch
):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\n")
    monkeypatch.delenv("DERA_ALIGNED")  # the LoRA pair, whose target is cheap to sample
    pair_flags = ["-mr", str(reference_path), "--lora", str(weak_lora), "-c", "256"]
    result = run("sweep", *pair_flags, "--exact", "--prompts", str(prompts), "-n", "2",
                 "--temp", "1", "-s", "5")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["lam"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0] * 2
    assert all(row["exact"]["attempts"] >= 1 for row in rows)
    assert all(row["exact"]["attempts"] == 1 for row in rows if row["lam"] in (0.0, 1.0))
    refused = run("sweep", *pair_flags, "--exact", "--lambdas", "0.5,2", "--prompts", str(prompts))
    assert refused.exit_code == 1 and "0 <= lam <= 1" in refused.stderr


# --- the server: dera_exact on /v1, options.exact on Ollama's API ------------------------


@pytest.fixture(scope="module")
def exact_server(reference_path, weak_lora, tmp_path_factory):
    from server_process import start_server

    pytest.importorskip("uvicorn")
    log = open(tmp_path_factory.mktemp("exact-server") / "stderr.log", "w")  # noqa: SIM115
    process, base = start_server(
        ["-mr", str(reference_path), "--lora", str(weak_lora), "-c", "1024", "--parallel", "2"],
        log=log,
    )
    yield base
    process.terminate()
    process.wait(timeout=10)
    log.close()


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_answers_exactly_on_both_dialects(exact_server):
    chat = [{"role": "user", "content": PROMPT}]
    body = {"messages": chat, "max_tokens": CAP, "temperature": 1, "seed": 3}
    status, answer = _post(
        exact_server, "/v1/chat/completions", {**body, "dera_lambda": 0.5, "dera_exact": True}
    )
    assert status == 200, answer
    cost = answer["dera"]["exact"]
    assert cost["attempts"] >= 1 and cost["attempts"] == cost["killed"] + 1
    # at lam 0 nothing is killed: the answer is plain DeRa's for the seed
    plain = _post(exact_server, "/v1/chat/completions", {**body, "dera_lambda": 0.0})[1]
    exact = _post(
        exact_server, "/v1/chat/completions", {**body, "dera_lambda": 0.0, "dera_exact": True}
    )[1]
    assert exact["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert exact["dera"]["exact"]["attempts"] == 1
    # Ollama: its truncation and penalty defaults are off for an exact request
    options = {"num_predict": CAP, "temperature": 1, "seed": 3, "exact": True}
    ollama = {"model": "dera-local:0.5", "stream": False, "messages": chat, "options": options}
    status, answer = _post(exact_server, "/api/chat", ollama)
    assert status == 200 and answer["dera"]["exact"]["attempts"] >= 1, answer


def _exact_completion(base: str, seed: int, exact: bool = True) -> dict:
    body = {"prompt": PROMPT, "max_tokens": CAP, "temperature": 1, "seed": seed,
            "dera_lambda": 0.5, "dera_exact": exact}  # fmt: skip
    status, answer = _post(base, "/v1/completions", body)
    assert status == 200, answer
    return answer


def _health(base: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        return json.loads(response.read())


def test_the_server_decodes_an_answers_attempts_at_once_and_answers_as_python(
    exact_server, lora_pair
):
    """One exact request alone takes both slots (--parallel 2): attempts after the
    answer are started and dropped (discarded > 0), and each answer, its attempts and
    its kills are those of generate(exact=True) for the seed, one attempt at a time."""
    discarded = 0
    for seed in range(12):
        answer = _exact_completion(exact_server, seed)
        python = lora_pair.generate(
            PROMPT, lam=0.5, sampling=pure(1.0, seed), max_tokens=CAP, exact=True,
            exact_parallel=1,
        )  # fmt: skip
        cost = answer["dera"]["exact"]
        assert answer["choices"][0]["text"] == python.text, seed
        assert (cost["attempts"], cost["killed"]) == (
            python.exact["attempts"],
            python.exact["killed"],
        ), seed
        assert cost["tokens_spent"] >= python.exact["tokens_spent"]
        discarded += cost["discarded"]
    assert discarded > 0


def test_exact_and_plain_requests_together_each_answer_and_count_once(exact_server, lora_pair):
    """Exact answers holding several slots beside plain requests: every request gets
    its own answer, and /health counts each request once (not once per attempt)."""
    import concurrent.futures

    before = _health(exact_server)
    jobs = [(seed, seed % 3 != 2) for seed in range(9)]  # six exact, three plain
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _exact_completion(exact_server, *job), jobs))
    for (seed, exact), answer in zip(jobs, answers, strict=True):
        python = lora_pair.generate(
            PROMPT, lam=0.5, sampling=pure(1.0, seed), max_tokens=CAP, exact=exact
        )
        assert answer["choices"][0]["text"] == python.text, (seed, exact)
        assert ("exact" in answer["dera"]) == exact
    after = _health(exact_server)
    assert after["completed"] - before["completed"] == len(jobs)
    assert after["in_flight"] == 0 and after["failed"] == before["failed"]


def test_a_json_schema_masks_both_models_and_the_answer_stays_exact(exact_server):
    import json

    schema = {"enum": ["yes", "no", "maybe"]}
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "dera_lambda": 0.5,
        "dera_exact": True,
        "temperature": 1,
        "seed": 3,
        "max_tokens": 12,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    status, answer = _post(exact_server, "/v1/chat/completions", body)
    assert status == 200, answer
    assert json.loads(answer["choices"][0]["message"]["content"]) in schema["enum"]
    assert answer["dera"]["exact"]["attempts"] >= 1
    status, answer = _post(exact_server, "/api/chat", {
        "model": "dera-local:0.5", "messages": body["messages"], "stream": False,
        "format": schema, "options": {"exact": True, "seed": 3, "temperature": 1}})  # fmt: skip
    assert status == 200, answer
    assert json.loads(answer["message"]["content"]) in schema["enum"]


def test_the_server_refuses_what_exact_mode_cannot_sample_naming_the_field(exact_server):
    chat = [{"role": "user", "content": PROMPT}]
    status, answer = _post(exact_server, "/v1/chat/completions",
                           {"messages": chat, "dera_lambda": 1.5, "dera_exact": True})  # fmt: skip
    assert status == 400 and answer["error"]["param"] == "dera_exact"
    assert "0 <= lam <= 1" in answer["error"]["message"]
    status, answer = _post(exact_server, "/v1/chat/completions",
                           {"messages": chat, "top_k": 5, "dera_exact": True})  # fmt: skip
    assert status == 400 and "turn off top-k" in answer["error"]["message"]
    status, answer = _post(exact_server, "/v1/chat/completions",
                           {"messages": chat, "dera_exact": "yes"})  # fmt: skip
    assert status == 400 and answer["error"]["param"] == "dera_exact"
    status, answer = _post(exact_server, "/api/chat", {"model": "dera-local:0.5", "messages": chat,
                           "stream": False, "options": {"exact": True, "top_k": 40}})  # fmt: skip
    assert status == 400 and "'options'" in answer["error"] and "top-k" in answer["error"]


def test_the_llm_plugin_answers_exactly(reference_path, weak_lora, monkeypatch, tmp_path):
    llm = pytest.importorskip("llm")
    from dera_local import llm_plugin

    monkeypatch.delenv("DERA_ALIGNED", raising=False)
    monkeypatch.setenv("DERA_REFERENCE", str(reference_path))
    monkeypatch.setenv("DERA_LORA", str(weak_lora))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    try:
        model = llm.get_model("dera-local")
        response = model.prompt("hello", lam=0.5, temperature=1, seed=3, max_tokens=CAP, exact=True)
        response.text()
        cost = response.response_json["exact"]
        assert cost["attempts"] >= 1 and cost["attempts"] == cost["killed"] + 1
        refused = model.prompt("hello", lam=1.5, exact=True)
        with pytest.raises(llm.ModelError, match="0 <= lam <= 1"):
            refused.text()
    finally:
        llm_plugin.close_models()


def test_a_spent_budget_on_the_server_is_a_503_and_the_server_goes_on(
    aligned_path, reference_path, tmp_path
):
    """The shared tiny pair's models are far apart: with --exact-budget 6 an exact answer
    at lam 0.5 runs out (503, one line, with the acceptance seen), streamed or not, and a
    plain request still answers."""

    from server_process import start_server

    pytest.importorskip("uvicorn")
    with open(tmp_path / "stderr.log", "w") as log:
        process, base = start_server(
            [
                "-m",
                str(aligned_path),
                "-mr",
                str(reference_path),
                "-c",
                "512",
                "--exact-budget",
                "6",
            ],
            log=log,
        )
    try:
        chat = [{"role": "user", "content": PROMPT}]
        body = {
            "messages": chat,
            "max_tokens": CAP,
            "temperature": 1,
            "seed": 3,
            "dera_lambda": 0.5,
        }
        status, answer = _post(base, "/v1/chat/completions", {**body, "dera_exact": True})
        assert status == 503 and answer["error"]["type"] == "exact_budget_spent", answer
        assert "spent its budget of 6 tokens" in answer["error"]["message"]
        # streamed: nothing is shown before an attempt survives, so the refusal comes first
        status, answer = _post(
            base, "/v1/chat/completions", {**body, "dera_exact": True, "stream": True}
        )
        assert status == 503 and answer["error"]["type"] == "exact_budget_spent"
        assert _post(base, "/v1/chat/completions", body)[0] == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()
