"""Privacy accounting for DP-SGD: composed epsilon, noise calibration, plan checks.

Pure functions over a history of ``(noise_multiplier, sample_rate, steps)`` blocks, with no I/O,
so the same arithmetic serves the ledger (``fedtwin.privacy.ledger``), the trainer and the tests.

Why composition over the whole history: every DP-SGD step on a dataset is one more use of the
same patients, whether it happened in this run, an earlier run or another federated round. A
fresh Opacus ``PrivacyEngine`` per round (as in Flower's Opacus example) reports the epsilon of
that round only; summing those per-round epsilons over-counts (composition is sub-additive under
RDP / PRV accounting) and reporting only the last under-counts. The one correct number is the
accountant run over every step ever taken on the data, which Opacus supports directly: both
``RDPAccountant`` and ``PRVAccountant`` accept a heterogeneous ``history`` list.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, cast

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedtwin.errors import FedTwinError

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "prv")
DEFAULT_ACCOUNTANT: AccountantName = "rdp"
"""RDP by default: a closed-form upper bound that is fast (tens of ms) and deterministic, so a
binary search over sigma stays interactive. PRV is tighter (5-12 % smaller epsilon in our checks) but costs
seconds per evaluation and much more on long histories at small sigma."""

MAX_NOISE_TO_SIGNAL = 0.1
"""Refuse a plan whose noise std on the averaged gradient exceeds 10 % of the clipping norm
(``sigma / expected_batch_size > 0.1``); see :func:`noise_to_signal`."""

MAX_SIGMA = 1e4
"""Calibration gives up above this noise multiplier: no useful training is that noisy."""


class BudgetExceededError(FedTwinError):
    """A planned or reserved spend would take the dataset past its privacy budget."""


class CohortTooSmallError(FedTwinError):
    """The cohort is too small for the budget: calibrated noise would swamp the gradient."""


class AccountingError(FedTwinError):
    """The accountant could not compute an epsilon (bad parameters or a numerical failure)."""


@dataclass(frozen=True)
class StepBlock:
    """``steps`` DP-SGD steps at one noise multiplier and Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def as_opacus(self) -> tuple[float, float, int]:
        """The tuple layout of ``IAccountant.history``."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class Budget:
    """A dataset's total (epsilon, delta) over all training ever done on it."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"budget epsilon must be a positive finite number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"budget delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class PlanCheck:
    """What a plan would do to the budget; returned only when it fits."""

    accountant: AccountantName
    budget: Budget
    spent_epsilon: float
    """Composed epsilon of the prior history (including open reservations)."""
    plan_epsilon: float
    """Epsilon of the planned steps alone, as a fresh accountant would report it."""
    projected_epsilon: float
    """Composed epsilon of prior history plus the plan: what must stay within the budget."""
    planned_steps: int

    @property
    def remaining_after(self) -> float:
        return self.budget.epsilon - self.projected_epsilon


@dataclass(frozen=True)
class TrainingPlan:
    """A calibrated plan: train every round at ``noise_multiplier`` and stay within the budget."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    n_patients: int
    expected_batch_size: float
    noise_to_signal: float
    check: PlanCheck

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds


def validate_accountant(name: str) -> AccountantName:
    if name not in ACCOUNTANTS:
        raise FedTwinError(f"unknown privacy accountant {name!r}", f"use one of {', '.join(ACCOUNTANTS)}")
    return cast(AccountantName, name)


def compact(history: Sequence[StepBlock]) -> list[StepBlock]:
    """Merge blocks with the same (sigma, q) and drop empty ones.

    Composition does not depend on order, so this changes no epsilon; it keeps the accountant's
    cost proportional to the number of distinct settings rather than the number of rounds (PRV
    discretizes and convolves one distribution per block).
    """
    steps: dict[tuple[float, float], int] = {}
    for b in history:
        if b.steps:
            key = (float(b.noise_multiplier), float(b.sample_rate))
            steps[key] = steps.get(key, 0) + int(b.steps)
    return [StepBlock(s, q, n) for (s, q), n in steps.items()]


def composed_epsilon(history: Sequence[StepBlock], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon at ``delta`` of all blocks together, from one Opacus accountant.

    An empty history (or one of zero steps only) spends nothing: 0.0. (RDP's conversion would
    otherwise report a small positive floor for "nothing".) Warnings that the optimal RDP order is
    the largest one are silenced: the bound is then loose but still a valid upper bound, and the
    calibration search probes such small sigmas on purpose.
    """
    name = validate_accountant(accountant)
    blocks = compact(history)
    if not blocks:
        return 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if name == "rdp":
                eps = _rdp_epsilon(blocks, delta)
            else:
                acct = create_accountant(mechanism=name)
                acct.history = [b.as_opacus() for b in blocks]
                eps = float(acct.get_epsilon(delta=delta))
    except Exception as exc:  # noqa: BLE001 - any numerical failure must stop training, not pass
        raise AccountingError(
            f"the {name} accountant failed on history {[b.as_opacus() for b in blocks]} at delta={delta}: {exc}",
            "check the noise multipliers and sample rates; try the other accountant (rdp is the most robust)",
        ) from exc
    if math.isnan(eps):
        raise AccountingError(f"the {name} accountant returned NaN for history {[b.as_opacus() for b in blocks]}", "")
    return eps


def _rdp_epsilon(blocks: Sequence[StepBlock], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` with each (sigma, q)'s per-step RDP curve computed once.

    RDP composes by adding curves and ``compute_rdp(steps=n)`` is ``n * compute_rdp(steps=1)``,
    so this is the accountant's own arithmetic (same orders, same conversion); the cache makes
    the ledger's repeated evaluations over a growing history cheap.
    """
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(np.asarray(_rdp_per_step(b.noise_multiplier, b.sample_rate)) * b.steps for b in blocks)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(x) for x in curve)


def calibrate_noise_multiplier(
    *,
    prior: Sequence[StepBlock],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    tolerance: float = 0.01,
) -> float:
    """The noise multiplier that brings prior history plus ``steps`` new steps to the target.

    Like ``opacus.accountants.utils.get_noise_multiplier`` but over prior history + the plan
    (that one starts from an empty history, i.e. it would hand every run the whole budget again).
    Returns sigma with ``target - tolerance <= epsilon(prior + plan) <= target``: always on the
    safe side of the target.
    """
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")
    spent = composed_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExceededError(
            f"the privacy budget is exhausted: {spent:.3f} of epsilon {target_epsilon:g} (delta {delta:g}) "
            "is already spent, so no further training fits",
            "training on this data is over unless the site's data governance approves a larger budget "
            "(`fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO`, which is recorded)",
        )

    def eps(sigma: float) -> float:
        return composed_epsilon([*prior, StepBlock(sigma, sample_rate, steps)], delta, accountant)

    sigma_low, sigma_high = 0.0, 1.0
    eps_high = eps(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2 * sigma_high
        if sigma_high > MAX_SIGMA:
            raise BudgetExceededError(
                f"the remaining budget is too small for {steps} steps at sample rate {sample_rate:g}: even a noise "
                f"multiplier of {MAX_SIGMA:g} would exceed epsilon {target_epsilon:g} (spent so far {spent:.3f})",
                "plan far fewer steps, or ask the site's data governance for a larger budget",
            )
        eps_high = eps(sigma_high)
    for _ in range(100):
        if target_epsilon - eps_high <= tolerance or sigma_high - sigma_low < 1e-9:
            break
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e <= target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def noise_to_signal(noise_multiplier: float, expected_batch_size: float) -> float:
    """Noise std on the averaged gradient, in units of the clipping norm: ``sigma / E[B]``.

    DP-SGD averages B clipped per-patient gradients (each of norm <= C) and adds N(0, sigma^2 C^2)
    per coordinate to their sum, so the average carries noise of std ``sigma * C / B`` per
    coordinate while its signal is at most C. What matters for learning is this ratio, not sigma
    alone: large-scale DP training uses sigma > 10 with batches of thousands (De et al. 2022;
    Sander et al. 2023, "TAN without a burn", keep sigma / B fixed). That is why the cohort rule
    is stated on the ratio.
    """
    if expected_batch_size <= 0:
        return math.inf
    return noise_multiplier / expected_batch_size


def _epsilon_needed(prior: Sequence[StepBlock], sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    return composed_epsilon([*prior, StepBlock(sigma, q, steps)], delta, accountant)


def _max_steps_per_round(
    prior: Sequence[StepBlock], sigma: float, q: float, rounds: int, budget: Budget, accountant: str, upper: int
) -> int:
    """Largest steps-per-round that fits the budget at ``sigma`` (0 if none); binary search."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _epsilon_needed(prior, sigma, q, mid * rounds, budget.delta, accountant) <= budget.epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_cohort(
    *,
    prior: Sequence[StepBlock],
    budget: Budget,
    accountant: str,
    noise_multiplier: float,
    n_patients: int,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    max_noise_to_signal: float = MAX_NOISE_TO_SIGNAL,
) -> float:
    """The cohort rule; returns the noise-to-signal ratio or raises :class:`CohortTooSmallError`.

    Two conditions, both about the patients, not the model:

    * ``delta < 1 / n_patients``: a larger delta permits mechanisms that publish one patient's
      record outright with probability delta, which for a small cohort is likely.
    * ``sigma / (sample_rate * n_patients) <= max_noise_to_signal``: otherwise the noise will
      swamp learning (see :func:`noise_to_signal`). The error says what would be needed: the
      number of patients at which the ratio holds (same rate and steps, so same sigma), the
      epsilon at which the ratio holds, or the steps per round that fit at the largest allowed sigma.
    """
    if n_patients <= 0:
        raise ValueError(f"n_patients must be positive, got {n_patients}")
    if budget.delta >= 1 / n_patients:
        raise CohortTooSmallError(
            f"delta {budget.delta:g} is not below 1/{n_patients} (one over the number of patients): at that delta "
            "a mechanism may reveal a whole patient's record and still count as private",
            f"use delta well below {1 / n_patients:.2g} (e.g. {0.1 / n_patients:.1g}); changing the budget needs the "
            "site's data governance (`fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO`)",
        )
    batch = sample_rate * n_patients
    ratio = noise_to_signal(noise_multiplier, batch)
    if ratio <= max_noise_to_signal:
        return ratio
    total = steps_per_round * rounds
    sigma_max = max_noise_to_signal * batch
    patients_needed = math.ceil(noise_multiplier / (max_noise_to_signal * sample_rate))
    needs = [f"at least {patients_needed} patients (at the same sampling rate and steps)"]
    if sigma_max > 0:
        eps_needed = _epsilon_needed(prior, sigma_max, sample_rate, total, budget.delta, accountant)
        needs.append(f"a total budget of epsilon >= {eps_needed:.2f}")
        fit = _max_steps_per_round(prior, sigma_max, sample_rate, rounds, budget, accountant, steps_per_round)
        needs.append(
            f"at most {fit} steps per round over {rounds} round(s)" if fit else "no number of steps fits at this budget"
        )
    raise CohortTooSmallError(
        f"with {n_patients} patients (expected batch {batch:.1f} at sample rate {sample_rate:g}) and epsilon "
        f"{budget.epsilon:g} (delta {budget.delta:g}) over {total} steps, noise multiplier {noise_multiplier:.2f} "
        f"puts noise of {ratio:.2f}x the clipping norm on every averaged gradient (limit {max_noise_to_signal:g}): "
        "the noise will swamp learning",
        "; or ".join(needs) + "; a larger sampling rate (bigger batches) also helps",
    )


def check_plan(
    *,
    prior: Sequence[StepBlock],
    budget: Budget,
    accountant: str,
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int = 1,
    n_patients: int | None = None,
    max_noise_to_signal: float = MAX_NOISE_TO_SIGNAL,
) -> PlanCheck:
    """Refuse (raise) unless prior history plus the whole plan fits the budget.

    Raises :class:`BudgetExceededError` saying what was spent, what the plan would spend, the
    budget, and the ways out; with ``n_patients`` also applies :func:`check_cohort`.
    """
    if steps_per_round < 0 or rounds < 1:
        raise ValueError(f"need steps_per_round >= 0 and rounds >= 1, got {steps_per_round}, {rounds}")
    total = steps_per_round * rounds
    planned = StepBlock(noise_multiplier, sample_rate, total)
    spent = composed_epsilon(prior, budget.delta, accountant)
    alone = composed_epsilon([planned], budget.delta, accountant)
    projected = composed_epsilon([*prior, planned], budget.delta, accountant)
    if projected > budget.epsilon:
        fix = "lower the steps or rounds, or raise the noise multiplier"
        if spent < budget.epsilon and total > 0:
            try:
                sigma_fit = calibrate_noise_multiplier(
                    prior=prior, sample_rate=sample_rate, steps=total, target_epsilon=budget.epsilon,
                    delta=budget.delta, accountant=accountant,
                )
                fix += f" (to at least {sigma_fit:.3f} for this plan)"
            except BudgetExceededError:
                pass
        fix += (
            ", or increase the budget — only with the approval of the site's data governance "
            "(`fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO`, which is itself recorded)"
        )
        raise BudgetExceededError(
            f"refusing to train: {spent:.3f} of the epsilon budget {budget.epsilon:g} (delta {budget.delta:g}) is "
            f"already spent; this plan ({rounds} round(s) x {steps_per_round} steps at noise multiplier "
            f"{noise_multiplier:.3f}, sample rate {sample_rate:g}) would spend {alone:.3f} on its own and bring the "
            f"composed total to {projected:.3f} > {budget.epsilon:g} ({accountant} accountant)",
            fix,
        )
    if n_patients is not None:
        check_cohort(
            prior=prior, budget=budget, accountant=accountant, noise_multiplier=noise_multiplier,
            n_patients=n_patients, sample_rate=sample_rate, steps_per_round=steps_per_round, rounds=rounds,
            max_noise_to_signal=max_noise_to_signal,
        )
    return PlanCheck(
        accountant=validate_accountant(accountant), budget=budget, spent_epsilon=spent,
        plan_epsilon=alone, projected_epsilon=projected, planned_steps=total,
    )


def plan_training(
    *,
    prior: Sequence[StepBlock],
    budget: Budget,
    accountant: str,
    n_patients: int,
    sample_rate: float,
    steps_per_round: int,
    rounds: int = 1,
    max_noise_to_signal: float = MAX_NOISE_TO_SIGNAL,
    tolerance: float = 0.01,
) -> TrainingPlan:
    """Calibrate sigma so that ALL planned rounds plus prior history meet the budget, then check.

    Calibrating per round against the full budget would let every round spend it again; here the
    search runs the accountant over prior history + ``rounds * steps_per_round`` new steps.
    """
    if steps_per_round <= 0 or rounds < 1:
        raise ValueError(f"need steps_per_round >= 1 and rounds >= 1, got {steps_per_round}, {rounds}")
    if budget.delta >= 1 / n_patients:  # cheap, and before the search: no sigma can fix it
        check_cohort(
            prior=prior, budget=budget, accountant=accountant, noise_multiplier=1.0, n_patients=n_patients,
            sample_rate=sample_rate, steps_per_round=steps_per_round, rounds=rounds,
        )
    sigma = calibrate_noise_multiplier(
        prior=prior, sample_rate=sample_rate, steps=steps_per_round * rounds, target_epsilon=budget.epsilon,
        delta=budget.delta, accountant=accountant, tolerance=tolerance,
    )
    check = check_plan(
        prior=prior, budget=budget, accountant=accountant, noise_multiplier=sigma, sample_rate=sample_rate,
        steps_per_round=steps_per_round, rounds=rounds, n_patients=n_patients, max_noise_to_signal=max_noise_to_signal,
    )
    batch = sample_rate * n_patients
    return TrainingPlan(
        noise_multiplier=sigma, sample_rate=sample_rate, steps_per_round=steps_per_round, rounds=rounds,
        n_patients=n_patients, expected_batch_size=batch, noise_to_signal=noise_to_signal(sigma, batch), check=check,
    )


def secure_rng_status() -> dict[str, object]:
    """Whether Opacus ``secure_mode`` (cryptographically secure noise) can be used here.

    Opacus draws DP noise from torch's default generator unless ``secure_mode=True``, which needs
    ``torchcsprng``; that package's last release (0.2.1, 2021) does not install with current torch.
    So FedTwin trains with ``secure_mode=False`` and says so: the ledger records ``secure_rng: false``
    and model cards report this dict. Never raises: the answer is data, not an error.
    """
    import torch

    status: dict[str, object] = {"available": False, "package": "torchcsprng", "torch": torch.__version__, "reason": ""}
    if importlib.util.find_spec("torchcsprng") is None:
        status["reason"] = (
            "torchcsprng is not installed: its last release (0.2.1, 2021) targets torch 1.x and does not install "
            f"with torch {torch.__version__}; Opacus secure_mode is off, so DP noise comes from torch's default "
            "(non-cryptographic) generator"
        )
        return status
    try:
        importlib.import_module("torchcsprng")
    except Exception as exc:  # noqa: BLE001 - a broken binary build fails in many ways
        status["reason"] = f"torchcsprng is installed but cannot be imported ({type(exc).__name__}: {exc}); secure_mode is off"
        return status
    status["available"] = True
    status["reason"] = "torchcsprng imports; Opacus secure_mode=True can be used"
    return status
