"""The reward: conciseness, measured as the number of words in an answer (fewer = better).

Why this reward: a chat user sees its effect at once (answers get shorter or longer as
lam moves), a number measures it without a judge model, and SmolLM2-135M-Instruct is
verbose enough (its answers often run past 100 tokens) to leave room in both directions.
An answer with fewer than MIN_WORDS words, or one cut off by the token limit, never
counts as the preferred one, so "say nothing" is not what gets rewarded.
"""

from __future__ import annotations

MIN_WORDS = 4
MIN_GAP = 10  # words between preferred and rejected answers, so pairs carry signal


def word_count(text: str) -> int:
    return len(text.split())


def reward(text: str) -> float:
    return -float(word_count(text))


def preference_pair(record: dict) -> dict | None:
    """The (chosen, rejected) pair of one prompt's samples, or None if none qualifies."""
    answers = record["answers"]
    eligible = [
        a for a in answers if a["finish_reason"] == "stop" and word_count(a["text"]) >= MIN_WORDS
    ]
    if not eligible:
        return None
    chosen = max(eligible, key=lambda a: reward(a["text"]))
    rejected = min(answers, key=lambda a: reward(a["text"]))
    if word_count(rejected["text"]) - word_count(chosen["text"]) < MIN_GAP:
        return None
    return {
        "prompt": record["prompt"],
        "prompt_tokens": record["prompt_tokens"],
        "chosen": chosen,
        "rejected": rejected,
    }
