"""DeRa's one approximation, computed exactly on a synthetic model (issue 26, part 2).

A reference pi_ref is a Markov chain over a small vocabulary (token 0 ends the answer;
the state is the last token), answers are capped at L tokens, and a reward is additive
over tokens, r(y) = sum_i rho(y_{i-1}, y_i). The KL-regularised optimum at strength beta,
pi*_beta(y) ∝ pi_ref(y) exp(r(y) / beta) on the capped answers, is then exactly a
time-dependent Markov policy, from backward dynamic programming over soft values:

    V_i(s) = log sum_t pi_ref(t|s) exp(rho(s, t) / beta + [t is not the end] V_{i+1}(t)),
    pi*_i(t|s) = pi_ref(t|s) exp(rho(s, t) / beta + [t not end] V_{i+1}(t) - V_i(s)),

with V_L = 0. DeRa at lam mixes per token, pi_lam ∝ pi_ref^(1-lam) pi*_beta^lam, i.e.
log pi_lam - log pi_ref = lam * (rho / beta + V_{i+1} - V_i) + normaliser: the future
value V is scaled by lam, while the exact optimum at beta / lam has the soft value of
the scaled reward, which is not lam * V (a log-sum-exp is not linear). That is the whole
difference: a reward about the future (length) is where per-token mixing goes wrong;
a reward of the current token alone with a deterministic future is where it is exact.

Forward dynamic programming then gives exact sequence-level quantities of any such
policy: expected reward, expected length, KL to the reference or to another policy (the
chain rule: the sum over steps of the expected per-step KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

END = 0


@dataclass
class Chain:
    """pi_ref(t|s) for states s = 0..V (V: the start) over tokens t = 0..V-1, a reward
    rho(s, t) per step, and the cap L."""

    ref: np.ndarray  # (V + 1, V), rows sum to 1
    rho: np.ndarray  # (V + 1, V)
    cap: int

    @property
    def start(self) -> int:
        return self.ref.shape[0] - 1


def optimum(chain: Chain, beta: float) -> np.ndarray:
    """pi*_beta as conditionals (cap, V + 1, V): step i, state s, next token t."""
    states, vocab = chain.ref.shape
    log_ref = np.log(chain.ref)
    policy = np.empty((chain.cap, states, vocab))
    value_next = np.zeros(vocab)  # V_{i+1}(t) for t as the next state; V_L = 0
    for step in range(chain.cap - 1, -1, -1):
        future = value_next.copy()
        future[END] = 0.0  # the answer ends: nothing follows
        scores = log_ref + chain.rho / beta + future[None, :]
        peak = scores.max(axis=1, keepdims=True)
        log_total = peak + np.log(np.exp(scores - peak).sum(axis=1, keepdims=True))
        policy[step] = np.exp(scores - log_total)
        # states are indexed like tokens (state t = "last token was t"), plus the start
        value_next = log_total[:vocab, 0]
    return policy


def dera(chain: Chain, aligned: np.ndarray, lam: float) -> np.ndarray:
    """DeRa's per-token mixture: softmax(lam * log aligned + (1 - lam) * log ref)."""
    with np.errstate(divide="ignore"):
        scores = lam * np.log(aligned) + (1 - lam) * np.log(chain.ref)[None]
    scores -= scores.max(axis=2, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=2, keepdims=True)


@dataclass
class Moments:
    reward: float
    length: float
    kl_to_ref: float
    kl_to_other: float | None = None


def moments(chain: Chain, policy: np.ndarray, other: np.ndarray | None = None) -> Moments:
    """Exact expectations under `policy`: reward, length (tokens before the end), KL to
    the reference and, given `other`, KL(policy || other)."""
    states, vocab = chain.ref.shape
    mass = np.zeros(states)
    mass[chain.start] = 1.0
    reward = length = kl_ref = kl_other = 0.0
    log_ref = np.log(chain.ref)
    for step in range(chain.cap):
        pi = policy[step]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_pi = np.where(pi > 0, np.log(pi), 0.0)
            kl_ref += float(mass @ (pi * (log_pi - log_ref)).sum(axis=1))
            if other is not None:
                log_other = np.where(pi > 0, np.log(other[step]), 0.0)
                kl_other += float(mass @ (pi * (log_pi - log_other)).sum(axis=1))
        reward += float(mass @ (pi * chain.rho).sum(axis=1))
        flow = mass[:, None] * pi  # (states, tokens)
        length += float(flow[:, 1:].sum())
        mass = np.zeros(states)
        mass[:vocab] = flow.sum(axis=0)
        mass[END] = 0.0  # ended answers leave
    return Moments(reward, length, kl_ref, kl_other if other is not None else None)


def effective_lam(chain: Chain, beta: float, target_kl: float, high: float = 8.0) -> float:
    """The lam whose exact optimum pi*_{beta/lam} has KL to the reference `target_kl`
    (the KL grows with lam), by bisection."""
    low = 0.0
    for _ in range(40):
        middle = (low + high) / 2
        kl = moments(chain, optimum(chain, beta / middle)).kl_to_ref if middle > 0 else 0.0
        low, high = (middle, high) if kl < target_kl else (low, middle)
    return (low + high) / 2


def geometric_continue(p_end: float, cost: float, beta: float, lam: float) -> tuple[float, float]:
    """Closed form, reference i.i.d. with end probability p each step and a length
    reward -cost per token, no cap: the chance to continue under the exact optimum at
    beta / lam, (1 - p) exp(-lam cost / beta), and under DeRa at lam mixing with the
    optimum at beta, x / (x + p^(1-lam) (1 - q_1)^lam) with x the former and q_1 the
    optimum's at beta. Equal at lam 0 and 1; elsewhere they differ."""
    exact = (1 - p_end) * np.exp(-lam * cost / beta)
    q_one = (1 - p_end) * np.exp(-cost / beta)
    mixed = exact / (exact + p_end ** (1 - lam) * (1 - q_one) ** lam)
    return float(exact), float(mixed)
