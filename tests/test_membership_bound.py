"""The membership-inference bound of (epsilon, delta)-DP and the empirical ROC helpers of the privacy audit.

Checked against closed forms, numerical integration, and mechanisms whose privacy is known
exactly: randomized response (epsilon-DP, on the boundary of the region), randomized response
that reveals membership with probability delta ((epsilon, delta)-DP, on the boundary too) and
the Laplace mechanism (epsilon-DP, strictly inside).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtwin.privacy.membership_bound import auroc, epsilon_lower_bound, max_auroc, max_tpr, roc_curve, tpr_at_fpr


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


# ------------------------------------------------------------------------------------ the bound


def test_no_privacy_loss_means_no_test_beats_guessing() -> None:
    assert max_auroc(0.0, 0.0) == pytest.approx(0.5, abs=1e-15)
    assert np.allclose(max_tpr(np.linspace(0, 1, 11), 0.0, 0.0), np.linspace(0, 1, 11))


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 3.0, 8.0])
def test_pure_dp_bound_is_the_known_logistic_form(eps: float) -> None:
    assert max_auroc(eps, 0.0) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)), rel=1e-12)


def test_values_at_the_audits_epsilons() -> None:
    # by hand: (1 - d)(e^eps + d) / (1 + e^eps) + d at d = 1e-5
    for eps, want in [(1.0, 0.7310640), (3.0, 0.9525751), (8.0, 0.9996647)]:
        assert max_auroc(eps, 1e-5) == pytest.approx(want, abs=1e-7)


def test_monotone_in_epsilon_and_delta_and_tends_to_one() -> None:
    eps = np.linspace(0, 30, 301)
    for delta in (0.0, 1e-5, 0.01, 0.2):
        values = np.array([max_auroc(e, delta) for e in eps])
        assert np.all(np.diff(values) >= 0)
        assert np.all(np.diff(values[eps <= 15]) > 0)  # strictly, until float rounding at ~1 - 1e-7
        assert values[0] >= 0.5 and values[-1] > 1 - 1e-12
    for e in (0.0, 1.0, 5.0):
        d_values = [max_auroc(e, d) for d in (0.0, 1e-6, 1e-3, 0.1, 0.5, 1.0)]
        assert np.all(np.diff(d_values) > 0)
    assert max_auroc(math.inf, 0.0) == 1.0
    assert max_auroc(1e6, 0.0) == 1.0  # no overflow
    assert max_auroc(0.0, 1.0) == 1.0  # delta = 1 promises nothing


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 2.5, 8.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 0.05, 0.3])
def test_closed_form_matches_the_numerically_integrated_region(eps: float, delta: float) -> None:
    x = np.linspace(0.0, 1.0, 400_001)
    # the region written out independently: both Kairouz et al. inequalities and TPR <= 1
    upper = np.minimum.reduce([np.ones_like(x), math.exp(eps) * x + delta, 1 - math.exp(-eps) * (1 - delta - x)])
    assert np.allclose(max_tpr(x, eps, delta), upper)
    # trapezoids are exact on the straight pieces; only the two kinks cost O(spacing^2 * e^eps)
    assert max_auroc(eps, delta) == pytest.approx(_area(x, upper), abs=5e-8)


def test_boundary_endpoints() -> None:
    assert max_tpr(0.0, 2.0, 0.01) == pytest.approx(0.01)  # at FPR 0 only delta
    assert max_tpr(1.0, 2.0, 0.01) == 1.0
    assert max_tpr(0.01, 8.0, 1e-5) == pytest.approx(1 - math.exp(-8) * (0.99 - 1e-5))  # e^8 * 0.01 > 1: the second line binds
    assert max_tpr(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)


def test_rejects_invalid_parameters() -> None:
    for bad in [(-0.1, 0.0), (float("nan"), 0.0), (1.0, -1e-9), (1.0, 1.5)]:
        with pytest.raises(ValueError):
            max_auroc(*bad)
        with pytest.raises(ValueError):
            max_tpr(0.5, *bad)


@pytest.mark.parametrize("delta", [0.0, 1e-5, 0.05])
def test_epsilon_lower_bound_inverts_the_bound(delta: float) -> None:
    for eps in (0.05, 0.5, 1.0, 3.0, 8.0):
        assert epsilon_lower_bound(max_auroc(eps, delta), delta) == pytest.approx(eps, rel=1e-6)
    assert epsilon_lower_bound(0.5, delta) == 0.0  # guessing proves nothing
    assert epsilon_lower_bound(0.3, delta) == 0.0
    assert epsilon_lower_bound(max_auroc(0.0, delta), delta) == 0.0
    values = [epsilon_lower_bound(a, delta) for a in (0.55, 0.6, 0.7, 0.8, 0.9, 0.99)]
    assert np.all(np.diff(values) > 0)
    # an AUROC above the bound of some epsilon proves more than that epsilon
    assert epsilon_lower_bound(max_auroc(1.0, delta) + 0.01, delta) > 1.0
    assert epsilon_lower_bound(1.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        epsilon_lower_bound(1.2, delta)


# --------------------------------------------------------------- mechanisms with a known epsilon


def _randomized_response(bits: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Report the membership bit truthfully with probability e^eps / (1 + e^eps): exactly eps-DP."""
    keep = rng.random(bits.size) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(keep, bits, 1 - bits).astype(float)


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0])
def test_randomized_response_stays_below_the_bound_and_attains_it(eps: float) -> None:
    rng = np.random.default_rng(7)
    n = 40_000
    members = _randomized_response(np.ones(n, int), eps, rng)
    non_members = _randomized_response(np.zeros(n, int), eps, rng)
    fpr, tpr = roc_curve(members, non_members)
    se = 0.5 / math.sqrt(n)  # binomial SE of a rate, at most
    # sampling error in the FPR moves the bound by up to e^eps times as much: allow for both
    assert np.all(tpr <= max_tpr(fpr + 3 * se, eps, 0.0) + 3 * se)
    a = auroc(members, non_members)
    bound = max_auroc(eps, 0.0)
    assert a <= bound + 3 * se
    assert a >= bound - 3 * se  # randomized response lies on the boundary: the bound is tight, not just valid
    assert max_auroc(eps * 0.8, 0.0) < a - 3 * se  # a bound computed for a smaller epsilon would be violated


@pytest.mark.parametrize("eps,delta", [(1.0, 0.1), (0.5, 0.02), (3.0, 1e-3)])
def test_revealing_with_probability_delta_reaches_the_delta_boundary(eps: float, delta: float) -> None:
    """With probability delta output the membership outright, else randomized response: (eps, delta)-DP.

    Its exact ROC (scores 2 = revealed member, 1 / 0 = the randomized bit, -1 = revealed
    non-member) runs along the boundary, so its area is max_auroc(eps, delta) exactly, and more
    than max_auroc(eps, 0): delta is needed.
    """
    p = math.exp(eps) / (1 + math.exp(eps))
    points = [(0.0, 0.0), (0.0, delta), ((1 - delta) * (1 - p), delta + (1 - delta) * p), (1 - delta, 1.0), (1.0, 1.0)]
    fpr, tpr = map(np.array, zip(*points))
    assert np.allclose(tpr[1:], max_tpr(fpr[1:], eps, delta))  # every point after the origin is on the boundary
    assert _area(fpr, tpr) == pytest.approx(max_auroc(eps, delta), abs=1e-12)
    assert tpr[1] > max_tpr(0.0, eps, 0.0) and _area(fpr, tpr) > max_auroc(eps, 0.0) + 1e-6  # outside the pure-DP region


def test_laplace_mechanism_is_inside_the_region() -> None:
    """x + Laplace(1 / eps) for x in {0, 1} is eps-DP; its ROC is strictly inside the region."""
    rng = np.random.default_rng(11)
    eps, n = 1.0, 40_000
    members = 1.0 + rng.laplace(0.0, 1 / eps, n)
    non_members = rng.laplace(0.0, 1 / eps, n)
    fpr, tpr = roc_curve(members, non_members)
    se = 0.5 / math.sqrt(n)
    assert np.all(tpr <= max_tpr(fpr + 3 * se, eps, 0.0) + 3 * se)
    assert auroc(members, non_members) < max_auroc(eps, 0.0) - 0.005  # ~0.722 vs 0.731; the AUROC's SE is ~0.002


# ------------------------------------------------------------------------------ empirical helpers


def test_auroc_is_the_pairwise_probability_with_ties_as_half() -> None:
    rng = np.random.default_rng(3)
    members = rng.integers(0, 6, 57).astype(float)  # many ties
    non_members = rng.integers(0, 5, 23).astype(float)
    diff = members[:, None] - non_members[None, :]
    brute = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    assert auroc(members, non_members) == pytest.approx(brute, abs=1e-12)
    fpr, tpr = roc_curve(members, non_members)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert _area(fpr, tpr) == pytest.approx(brute, abs=1e-12)
    assert auroc([1.0, 2.0], [0.0]) == 1.0 and auroc([0.0], [1.0, 2.0]) == 0.0


def test_tpr_at_fpr_uses_only_thresholds_within_the_fpr() -> None:
    members = [5.0, 4.0, 3.0, 0.5]
    non_members = [3.5, 1.0, 0.0, -1.0]
    assert tpr_at_fpr(members, non_members, 0.0) == 0.5  # above every non-member: 5 and 4
    assert tpr_at_fpr(members, non_members, 0.25) == 0.75  # one non-member (3.5) flagged
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5  # 1 % of 4 non-members is 0 of them
    assert tpr_at_fpr(members, non_members, 1.0) == 1.0
    with pytest.raises(ValueError):
        auroc([], [1.0])
    with pytest.raises(ValueError):
        auroc([float("nan")], [1.0])
