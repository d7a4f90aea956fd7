"""Lam sweeps (batched sequences) and teacher-forced grid scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference_impl import solo_logits

import dera_local
from dera_local.analysis.score import score
from dera_local.analysis.sweep import LambdaSweep, parse_lambdas, sweep
from dera_local.errors import BadParameterError, DeraError

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]


@pytest.mark.parametrize("prompt", ["Hello there", "x", "The quick brown fox jumps"])
def test_greedy_sweep_equals_generate_at_each_lam(pair, prompt, greedy):
    with LambdaSweep(pair, GRID, max_tokens=24) as runner:
        rows = runner.run(prompt, sampling=greedy)
    assert [r.lam for r in rows] == GRID
    for row in rows:
        single = pair.generate(prompt, lam=row.lam, sampling=greedy, max_tokens=24, logprobs=True)
        assert row.tokens == single.tokens, f"lam {row.lam}"
        assert row.text == single.text and row.finish_reason == single.finish_reason
        sums = single.logprobs.sums()
        assert row.logprob_mixture == pytest.approx(sums["mixture"], rel=1e-4, abs=1e-3)
        assert row.logprob_reference == pytest.approx(sums["reference"], rel=1e-4, abs=1e-3)
        assert row.logprob_aligned == pytest.approx(sums["aligned"], rel=1e-4, abs=1e-3)


def test_seeded_sampled_sweep_equals_generate(pair):
    sampling = dera_local.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    with LambdaSweep(pair, [0.5, 2.0], max_tokens=20) as runner:
        rows = runner.run("seeded", sampling=sampling)
    for row in rows:
        assert (
            row.tokens
            == pair.generate("seeded", lam=row.lam, sampling=sampling, max_tokens=20).tokens
        )


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_speculating_sweep_gives_the_rows_of_a_plain_one(pair, temperature):
    """Every slot drafts by prompt lookup at every step (not adaptive), CFG points too:
    the rows (tokens, text, log-probability sums) are those of the sweep without drafts."""
    from dera_local.speculation.drafts import SpeculationParams

    always = SpeculationParams(draft_max=6, draft_min=1, ngram_min=1, adaptive=False)
    sampling = dera_local.SamplingParams(temperature=temperature, top_k=5, seed=7)
    prompt = "the cat sat on the mat and the cat sat on the"
    settings = dict(max_tokens=30, cfg_scales=[1.0, 2.0])
    rows = {}
    for name, speculation in (("plain", SpeculationParams(draft_max=0)), ("fast", always)):
        with LambdaSweep(pair, [0.0, 0.5, 2.0], speculation=speculation, **settings) as runner:
            rows[name] = runner.run(prompt, sampling=sampling, negative_prompt="a grey dog")
            counts = runner.counts
    assert counts.drafted > 0 and counts.verify_steps > 0
    for plain, fast in zip(rows["plain"], rows["fast"], strict=True):
        assert (fast.lam, fast.cfg_scale, fast.tokens, fast.text) == (
            plain.lam,
            plain.cfg_scale,
            plain.tokens,
            plain.text,
        )
        for key in ("logprob_mixture", "logprob_reference", "logprob_aligned"):
            assert getattr(fast, key) == pytest.approx(getattr(plain, key), rel=1e-4, abs=1e-3)


def test_sweep_on_a_lora_pair_equals_generate(reference_path, lora_path, greedy):
    with dera_local.load_pair(None, reference_path, lora=lora_path, n_ctx=256) as lora_pair:
        rows = list(
            sweep(lora_pair, [("a", "Once upon")], [0.0, 1.0], sampling=greedy, max_tokens=16)
        )
        for row in rows:
            single = lora_pair.generate("Once upon", lam=row.lam, sampling=greedy, max_tokens=16)
            assert row.tokens == single.tokens
        assert rows[0].tokens != rows[1].tokens


def test_sweep_logprobs_match_numpy_on_each_model_alone(pair, aligned_path, reference_path, greedy):
    with LambdaSweep(pair, [0.7], max_tokens=12) as runner:
        (row,) = runner.run("abc", sampling=greedy)
    prompt = pair.tokenize("abc")
    sequence = prompt + row.tokens
    a = solo_logits(aligned_path, sequence)[len(prompt) - 1 : -1].astype(np.float64)
    r = solo_logits(reference_path, sequence)[len(prompt) - 1 : -1].astype(np.float64)
    h = 0.7 * a + 0.3 * r
    picked = np.arange(len(row.tokens)), np.array(row.tokens)

    def total(x):
        return (
            x
            - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - x.max(-1, keepdims=True)
        )[picked].sum()

    assert row.logprob_mixture == pytest.approx(total(h), abs=1e-3)
    assert row.logprob_reference == pytest.approx(total(r), abs=1e-3)
    assert row.logprob_aligned == pytest.approx(total(a), abs=1e-3)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("hook", ["native", "numpy"])
def test_score_equals_numpy_log_softmax_and_kl(aligned_path, reference_path, hook):
    lambdas = [0.0, 0.3, 1.0, 2.5, -0.5]
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512, hook=hook) as p:
        prompt = p.tokenize("Hello there")
        response = p.tokenize(" General Kenobi, you are a bold one", add_special=False)
        rows = score(p, prompt, response, lambdas)
    sequence = prompt + response
    a = solo_logits(aligned_path, sequence)[len(prompt) - 1 : -1]
    r = solo_logits(reference_path, sequence)[len(prompt) - 1 : -1]
    log_pa, log_pr = _log_softmax(a), _log_softmax(r)
    picked = np.arange(len(response)), np.array(response)
    for row, lam in zip(rows, lambdas, strict=True):
        log_p = _log_softmax(lam * a.astype(np.float64) + (1 - lam) * r.astype(np.float64))
        p_lam = np.exp(log_p)
        np.testing.assert_allclose(row.token_logprobs, log_p[picked], rtol=1e-5, atol=1e-4)
        assert row.logprob == pytest.approx(log_p[picked].sum(), abs=1e-3)
        np.testing.assert_allclose(
            row.kl_reference, (p_lam * (log_p - log_pr)).sum(-1), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            row.kl_aligned, (p_lam * (log_p - log_pa)).sum(-1), rtol=1e-4, atol=1e-5
        )
    assert rows[0].kl_reference_total == pytest.approx(0.0, abs=1e-5)  # lam 0 is the reference
    assert rows[2].kl_aligned_total == pytest.approx(0.0, abs=1e-5)  # lam 1 is the aligned model


def test_score_long_response_spans_several_batches(aligned_path, reference_path):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512, n_batch=16) as p:
        response = list(range(100, 160))
        chunked = score(p, "abc", response, [0.5])[0]
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512) as p:
        whole = score(p, "abc", response, [0.5])[0]
    np.testing.assert_allclose(chunked.token_logprobs, whole.token_logprobs, atol=1e-4)


@pytest.mark.parametrize(
    "grid, message",
    [
        ("", "empty"),
        ("0,1,0", "repeats 0"),
        ("0,abc", "numbers"),
        ("0,nan", "finite"),
    ],
)
def test_bad_lambda_lists(grid, message):
    with pytest.raises(BadParameterError, match=message):
        parse_lambdas(grid)


def test_response_longer_than_the_context(aligned_path, reference_path):
    with (
        dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as p,
        pytest.raises(DeraError, match="context holds 256"),
    ):
        score(p, "abc", list(range(100, 400)), [0.5])


def test_cli_sweep_rows_reward_and_summary(run, tmp_path, pair, monkeypatch, greedy):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "Hello"}\n\n{"prompt": "World"}\n')
    (tmp_path / "my_reward.py").write_text("def length(text):\n    return float(len(text))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, csv = tmp_path / "rows.jsonl", tmp_path / "summary.csv"
    result = run(
        "sweep",
        "--prompts",
        str(prompts),
        "--lambdas",
        "0,1",
        "-n",
        "6",
        "--temp",
        "0",
        "--out",
        str(out),
        "--reward",
        "my_reward:length",
        "--summary-csv",
        str(csv),
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["lam"]) for r in rows] == [
        ("p1", 0.0),
        ("p1", 1.0),
        ("3", 0.0),
        ("3", 1.0),
    ]
    for row in rows:
        expected = pair.generate(
            "Hello" if row["prompt_id"] == "p1" else "World",
            lam=row["lam"],
            sampling=greedy,
            max_tokens=6,
        )
        assert row["tokens"] == expected.tokens
        assert row["reward"] == float(len(row["text"]))
    assert csv.read_text().startswith("lam,n,mean_kl_to_reference")


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"prompt": "ok"}\n{"prompt": \n', ["--lambdas", "0,1"], "line 2: not valid JSON"),
        ('{"prompt": "ok"}\n', ["--lambdas", "1,1"], "repeats 1"),
        ('{"prompt": "ok"}\n', ["--lambdas", ""], "empty"),
        ('{"text": "ok"}\n', ["--lambdas", "0"], "line 1: needs"),
        ('{"prompt": "ok"}\n', ["--reward", "nowhere_module:f"], "cannot import reward module"),
    ],
)
def test_cli_sweep_bad_input(run, tmp_path, content, args, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    result = run("sweep", "--prompts", str(prompts), "-n", "2", *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_cli_score(run, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Hi", "response": " there"}\n{"prompt": "x", "response": "y"}\n')
    result = run("score", "--data", str(data), "--lambdas", "0,1,2")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 6 and rows[0]["kl_reference"] == pytest.approx(0.0, abs=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": " there"}\n{"prompt": "x"}\n')
    failed = run("score", "--data", str(bad))
    assert failed.exit_code == 1 and "line 2" in failed.stderr


def test_cli_sweep_plot(run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nWorld\n")
    (tmp_path / "reward_len.py").write_text("def words(text):\n    return len(text.split())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    png, csv = tmp_path / "tradeoff.png", tmp_path / "summary.csv"
    result = run(
        "sweep",
        "--prompts",
        str(prompts),
        "--lambdas",
        "0,1,2",
        "-n",
        "5",
        "--temp",
        "0",
        "--out",
        str(tmp_path / "rows.jsonl"),
        "--reward",
        "reward_len:words",
        "--plot",
        str(png),
        "--summary-csv",
        str(csv),
    )
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(csv.read_text().splitlines()) == 4  # header + one row per lam
    no_reward = run("sweep", "--prompts", str(prompts), "--plot", str(png))
    assert no_reward.exit_code == 1 and "--plot needs --reward" in no_reward.stderr


@pytest.mark.skipif(dera_local.engine.mixing._native is None, reason="compiled hook not built")
@pytest.mark.filterwarnings("ignore:lam=")
def test_score_kernel_with_impossible_tokens_matches_numpy():
    from dera_local import _native
    from dera_local.analysis.score import score_rows_numpy

    rng = np.random.default_rng(4)
    a = (rng.standard_normal((3, 5000)) * 4).astype(np.float32)
    r = (rng.standard_normal((3, 5000)) * 4).astype(np.float32)
    a[0, :10] = -np.inf  # rows with -inf take the kernel's careful path
    r[1, 5:20] = -np.inf
    targets = np.array([100, 200, 300], dtype=np.int32)
    lambdas = np.array([0.0, 0.4, 1.0, 2.0, -0.5])
    out = np.empty((5, 3, 3))
    _native.score_rows(
        a.ctypes.data,
        r.ctypes.data,
        3,
        5000,
        targets.ctypes.data,
        lambdas.ctypes.data,
        5,
        out.ctypes.data,
    )
    expected = score_rows_numpy(a, r, targets, lambdas)
    finite = np.isfinite(expected)
    assert (np.isfinite(out) == finite).all()
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_cli_sweep_and_score_take_chat_messages_and_chat_flag(run, tmp_path, pair, greedy):
    from dera_local import ChatTemplate

    template = ChatTemplate.for_pair(pair)
    turns = [{"role": "user", "content": "Hello"}]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(
        json.dumps({"id": "m", "messages": turns}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n"
    )
    out = tmp_path / "rows.jsonl"
    args = ["--prompts", str(prompts), "--lambdas", "0.5", "-n", "6", "--temp", "0"]
    result = run("sweep", *args, "--chat", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = pair.generate(template.tokens(pair, turns), lam=0.5, sampling=greedy, max_tokens=6)
    # the messages and the text prompt rendered with --chat are the same user turn
    assert [row["tokens"] for row in rows] == [expected.tokens, expected.tokens]

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"messages": turns, "response": " there"}) + "\n")
    scored = run("score", "--data", str(data), "--lambdas", "1")
    assert scored.exit_code == 0, scored.stderr
    (row,) = [json.loads(line) for line in scored.stdout.splitlines()]
    (direct,) = score(pair, template.tokens(pair, turns), " there", [1.0])
    assert row["logprob"] == pytest.approx(direct.logprob, abs=1e-9)

    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "x", "messages": turns}) + "\n")
    failed = run("sweep", "--prompts", str(both))
    assert (
        failed.exit_code == 1 and 'line 1: give "prompt" or "messages", not both' in failed.stderr
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    failed = run("sweep", "--prompts", str(bad))
    assert failed.exit_code == 1 and '"messages" must be a non-empty list' in failed.stderr


def test_summary_has_standard_errors():
    from dera_local.analysis.report import summarize
    from dera_local.analysis.sweep import SweepRow

    rows = [
        SweepRow("p", 1.0, "t", [1] * n, "stop", 0.0, -kl, 0.0, reward=reward)
        for n, kl, reward in [(1, 1.0, 2.0), (2, 3.0, 4.0), (3, 5.0, 9.0)]
    ]
    (entry,) = summarize(rows)
    assert entry["mean_kl_to_reference"] == pytest.approx(3.0)
    assert entry["se_kl_to_reference"] == pytest.approx(np.std([1, 3, 5], ddof=1) / np.sqrt(3))
    assert entry["se_reward"] == pytest.approx(np.std([2, 4, 9], ddof=1) / np.sqrt(3))
    assert summarize(rows[:1])[0]["se_reward"] is None  # one answer: no spread to report


def test_plot_labels_of_close_points_do_not_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dera_local.analysis.report import place_labels

    figure, axes = plt.subplots(figsize=(5, 4))
    xs, ys = [1.0, 1.01, 1.02, 5.0], [2.0, 2.01, 2.0, 8.0]  # three nearly on top of each other
    axes.plot(xs, ys, "o")
    texts = place_labels(axes, ["λ=0", "λ=0.1", "λ=0.2", "λ=3"], xs, ys)
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])
    plt.close(figure)


def test_sweep_rows_teacher_force_back_to_their_own_logprobs(pair):
    """A sampled answer plus the end token it ended with, fed back in one teacher-forced
    pass, has the log-probabilities the sweep summed while sampling it."""
    from dera_local.analysis.score import teacher_forced_logits

    # seed 9: the lam 0 answer ends with an end token after 13 tokens, the other runs on
    sampling = dera_local.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=9)
    prompt = pair.tokenize("the")
    with LambdaSweep(pair, [0.0, 1.0], max_tokens=40) as runner:
        rows = runner.run(prompt, sampling=sampling)
    ended = [r for r in rows if r.finish_reason == "stop"]
    assert len(ended) == 1
    for row in rows:
        assert (row.end_token is not None) == (row in ended)
        answer = row.tokens + ([row.end_token] if row.end_token is not None else [])
        sums = {"aligned": 0.0, "reference": 0.0}
        for aligned, reference, targets in teacher_forced_logits(pair, prompt, answer):
            for name, logits in (("aligned", aligned), ("reference", reference)):
                log_p = logits.astype(np.float64)
                log_p -= log_p.max(-1, keepdims=True)
                log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
                sums[name] += log_p[np.arange(len(targets)), targets].sum()
        assert row.logprob_aligned == pytest.approx(sums["aligned"], abs=1e-3)
        assert row.logprob_reference == pytest.approx(sums["reference"], abs=1e-3)


def test_plot_draws_other_policies_as_labelled_markers(tmp_path, monkeypatch):
    """Models retrained at other strengths appear as their own points, in the legend."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from dera_local.analysis import report

    summary = [
        {"lam": lam, "mean_reward": -10 * (3 - lam), "se_reward": 1.0,
         "mean_kl_to_reference": 5.0 * lam, "se_kl_to_reference": 0.5}
        for lam in (0.0, 1.0, 2.0)
    ]  # fmt: skip
    marker = {"label": "retrained β=0.05", "mean_reward": -12.0, "se_reward": 1.0,
              "mean_kl_to_reference": 9.0, "se_kl_to_reference": 1.0}  # fmt: skip
    seen = {}
    monkeypatch.setattr(plt, "close", lambda figure: seen.setdefault("figure", figure))
    report.plot(summary, tmp_path / "f.png", markers=[marker], title="t")
    axes = seen["figure"].axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["DeRa λ grid", "retrained β=0.05"]
    assert axes.get_title() == "t"
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_the_built_in_pairs_reward_is_known_by_name(tmp_path):
    """`--reward conciseness` is the model card's reward (minus the words of an answer),
    loaded from the file that ships beside the adapter; other names stay module:function."""
    from dera_local.errors import BadParameterError
    from dera_local.sources.datafiles import load_reward

    conciseness = load_reward("conciseness")
    assert conciseness("one two  three\nfour") == -4.0 and conciseness("") == 0.0
    with pytest.raises(BadParameterError, match="built in: conciseness"):
        load_reward("brevity")


def test_a_grid_finer_than_a_context_holds_runs_in_chunks_with_the_same_rows(pair, greedy):
    """300 lams (llama.cpp holds 256 sequences per context): two chunks, rows in grid
    order, each equal to the same lam decoded in a small sweep of its own."""
    grid = [round(i / 100, 2) for i in range(300)]
    with LambdaSweep(pair, grid, max_tokens=3, speculation=dera_local.SpeculationParams(
            draft_max=0)) as runner:  # fmt: skip
        assert runner.chunk == 256 and runner.decoder.n_slots == 256
        rows = runner.run("Once upon a time", sampling=greedy)
    assert [row.lam for row in rows] == grid
    probes = [0.0, 1.37, 2.55, 2.99]  # in the first chunk and in the second
    alone = list(sweep(pair, [("0", "Once upon a time")], probes, sampling=greedy,
                       max_tokens=3))  # fmt: skip
    by_lam = {row.lam: row for row in rows}
    for row in alone:
        assert by_lam[row.lam].tokens == row.tokens
        assert by_lam[row.lam].logprob_mixture == pytest.approx(row.logprob_mixture, abs=1e-4)


def test_a_sweep_that_cannot_start_says_one_line_and_nothing_else(run, tmp_path):
    prompts = tmp_path / "long.txt"
    prompts.write_text("word " * 400 + "\n")
    result = run("sweep", "--prompts", str(prompts), "-c", "128", "-n", "2")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
