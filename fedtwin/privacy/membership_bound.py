"""What (epsilon, delta)-DP promises against membership inference, and how an audit measures an attack.

An (epsilon, delta)-DP training bounds *every* membership test, whatever the attacker knows:
for any threshold on any score, with FPR the share of non-members flagged and TPR the share of
members flagged (Kairouz, Oh & Viswanath 2015; Nasr et al. 2021),

    TPR <= e^eps * FPR + delta        and        1 - TPR >= e^-eps * (1 - delta - FPR)

(the second is the first for the test that flags the complement, with members and non-members
swapped).

The ROC curve of any attack therefore lies under the upper boundary of this "privacy region",
and its AUROC under the area beneath that boundary: :func:`max_auroc`. An empirical audit
(``bench/privacy_audit.py``) compares an attack's measured AUROC with this number; a DP-trained
model whose attack clearly beats it means the privacy accounting or the DP-SGD implementation is
wrong. The converse does not hold: a weak attack near 0.5 proves nothing about privacy.

The empirical side (:func:`roc_curve`, :func:`auroc`, :func:`tpr_at_fpr`) is here too, in plain
numpy, so that the tests can check the bound against mechanisms whose epsilon is known exactly.
Scores are oriented so that a *higher* score means "more likely a member".
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["auroc", "epsilon_lower_bound", "max_auroc", "max_tpr", "roc_curve", "tpr_at_fpr"]


def _check(epsilon: float, delta: float) -> None:
    if not epsilon >= 0:  # also rejects NaN
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def max_tpr(fpr: ArrayLike, epsilon: float, delta: float) -> np.ndarray:
    """Largest TPR any membership test can reach at false-positive rate ``fpr`` under (epsilon, delta)-DP.

    The upper boundary of the privacy region: ``min(1, e^eps fpr + delta, 1 - e^-eps (1 - delta - fpr))``.
    Infinite epsilon gives 1 for every FPR (no promise).
    """
    _check(epsilon, delta)
    x = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    if math.isinf(epsilon):
        return np.ones_like(x)
    first = math.exp(min(epsilon, 700.0)) * x + delta  # exp(700) is finite; beyond, the min below is 1 anyway
    second = 1.0 - math.exp(-epsilon) * (1.0 - delta - x)
    return np.minimum(1.0, np.minimum(first, second))


def max_auroc(epsilon: float, delta: float) -> float:
    """Largest AUROC any membership attack can have against an (epsilon, delta)-DP mechanism.

    The area under :func:`max_tpr`. The two lines meet at ``FPR* = (1 - delta) / (1 + e^eps)``
    and the curve reaches 1 at ``FPR = 1 - delta``; integrating gives (the two triangles'
    e^eps terms cancel)

        max AUROC = (1 - delta) * (e^eps + delta) / (1 + e^eps) + delta
                  = (1 - delta) * (sigmoid(eps) + delta * sigmoid(-eps)) + delta,

    written with sigmoids so that a huge epsilon does not overflow. delta = 0 gives the familiar
    ``e^eps / (1 + e^eps)``; eps = delta = 0 gives 0.5 (no test beats guessing).
    """
    _check(epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    sig = 1.0 / (1.0 + math.exp(-epsilon))  # epsilon >= 0: no overflow
    return float((1.0 - delta) * (sig + delta * (1.0 - sig)) + delta)


def epsilon_lower_bound(auroc_value: float, delta: float) -> float:
    """The smallest epsilon whose privacy region allows an attack AUROC of ``auroc_value`` (at this delta).

    The inverse of :func:`max_auroc` in epsilon: a mechanism against which some attack truly
    reaches this AUROC cannot be (epsilon', delta)-DP for any smaller epsilon'. Given an AUROC's
    confidence lower end, it is the epsilon an audit *demonstrates* (an empirical lower bound;
    the accountant's epsilon is the upper bound). From ``max_auroc = s (1 - delta)^2 + delta (2 - delta)``
    with ``s = sigmoid(eps)``: 0 when the AUROC is within what epsilon 0 allows, inf for AUROC 1
    (with delta 0).
    """
    _check(0.0, delta)
    if not 0 <= auroc_value <= 1:
        raise ValueError(f"auroc_value must be in [0, 1], got {auroc_value}")
    if delta >= 1:
        return 0.0
    s = (auroc_value - delta * (2.0 - delta)) / (1.0 - delta) ** 2
    if s <= 0.5:
        return 0.0
    if s >= 1.0:
        return math.inf
    return math.log(s / (1.0 - s))


def roc_curve(members: ArrayLike, non_members: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC of "score >= t means member": (FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1).

    Tied scores move both rates at once (a diagonal step), so the area under the returned curve
    equals :func:`auroc` with ties counted 1/2.
    """
    pos, neg = _scores(members, non_members)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]  # descending
    tp = np.searchsorted(np.sort(-pos), -thresholds, side="right")  # members with score >= t
    fp = np.searchsorted(np.sort(-neg), -thresholds, side="right")
    tpr = np.concatenate([[0.0], tp / pos.size])
    fpr = np.concatenate([[0.0], fp / neg.size])
    return fpr, tpr


def auroc(members: ArrayLike, non_members: ArrayLike) -> float:
    """P(member score > non-member score) + P(tie) / 2: the Mann-Whitney statistic, ties by midranks."""
    pos, neg = _scores(members, non_members)
    both = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last copy of each distinct value (1-based)
    midrank = (upper - (counts - 1) / 2.0)[inverse]
    rank_sum = float(midrank[: pos.size].sum())
    return (rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size)


def tpr_at_fpr(members: ArrayLike, non_members: ArrayLike, fpr: float) -> float:
    """Largest TPR of a threshold whose empirical FPR is at most ``fpr`` (Carlini et al. 2022's low-FPR view).

    With N non-members the FPR moves in steps of 1/N: below 1/N only thresholds above every
    non-member count, so "TPR at 1 % FPR" of a 25-patient control group is "TPR at 0 FPR".
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    x, y = roc_curve(members, non_members)
    return float(y[x <= fpr + 1e-12].max())


def _scores(members: ArrayLike, non_members: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(members, dtype=np.float64).ravel()
    neg = np.asarray(non_members, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one member and one non-member score")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("scores must be finite")
    return pos, neg
