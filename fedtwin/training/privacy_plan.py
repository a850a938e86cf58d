"""Turning "this run may spend epsilon E" into a DP-SGD configuration the ledger accepts.

The site's ledger holds the dataset's total budget and everything already spent on it. A run's
``epsilon`` is its share: the noise multiplier is calibrated so that the composed epsilon over
*all* previous steps plus this run's steps reaches ``min(spent + E, budget)`` and no more.
Composition is not additive, so "spent + E" is a target for the composed total, not a sum of
per-run epsilons.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtwin.errors import FedTwinError
from fedtwin.privacy.accounting import BudgetExceededError, calibrate_noise_multiplier, check_plan, composed_epsilon
from fedtwin.privacy.ledger import PrivacyLedger, effective_history


EXHAUSTED_MARGIN = 0.02  # twice the calibration tolerance: what is left below this is not spendable


@dataclass(frozen=True)
class DPRequest:
    """What the operator asked for (``fedtwin train local`` options)."""

    epsilon: float
    delta: float | None = None
    budget_epsilon: float | None = None
    max_grad_norm: float = 1.0
    batch_size: int = 256
    epochs: float = 3.0
    budget_source: str = "--budget-epsilon"  # where budget_epsilon came from: named in the ledger note and in errors


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD settings of one run and what they will spend, as the ledger sees it."""

    dataset_id: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    budget_epsilon: float
    spent_before: float
    target_epsilon: float
    projected_epsilon: float

    def to_dict(self) -> dict:
        return asdict(self)

    def dp_settings(self):  # noqa: ANN201 - DPSettings; imported late so planning needs no torch
        """The trainer's DP-SGD settings: exactly the ones the ledger reserves."""
        from fedtwin.twin.config import DPSettings

        return DPSettings(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=self.steps,
            accountant=self.accountant,
            delta=self.delta,
        )

    def reserve(self, ledger: PrivacyLedger, *, run_id: str, note: str, round: int | None = None):  # noqa: A002, ANN201
        """``ledger.spend(...)`` for this plan: the reservation the trainer counts its steps in."""
        return ledger.spend(
            self.dataset_id,
            run_id=run_id,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=self.max_grad_norm,
            round=round,
            note=note,
        )


def open_or_create_ledger(path: Path, dataset_id: str, request: DPRequest) -> PrivacyLedger:
    """Open the site's ledger; create it only when the operator sets a budget explicitly.

    A missing ledger is not silently recreated: that would reset what was spent. The first run
    on a dataset must say what the total budget is (``--budget-epsilon``, ``--delta``).
    """
    if not path.exists():
        if request.budget_epsilon is None or request.delta is None:
            raise FedTwinError(
                f"privacy ledger {path} does not exist",
                "if this is the site's first training on this dataset, pass --budget-epsilon TOTAL and --delta D "
                "to create it; otherwise point --ledger at the site's existing ledger",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = PrivacyLedger.create(path)
    else:
        ledger = PrivacyLedger.open(path)
    if dataset_id not in ledger.datasets():
        if request.budget_epsilon is None or request.delta is None:
            ledger.close()
            raise FedTwinError(
                f"the ledger {path} has no budget for dataset {dataset_id}",
                "pass --budget-epsilon TOTAL and --delta D to set this dataset's budget (recorded in the ledger)",
            )
        ledger.set_budget(dataset_id, epsilon=request.budget_epsilon, delta=request.delta, note=f"set by {request.budget_source}")
    budget = ledger.budget(dataset_id)
    if request.budget_epsilon is not None and not math.isclose(request.budget_epsilon, budget.epsilon):
        ledger.close()
        source = request.budget_source
        use_recorded = f"omit {source}" if source.startswith("--") else f"set {source} to {budget.epsilon:g}"
        raise FedTwinError(
            f"{source} {request.budget_epsilon:g} differs from the budget recorded for {dataset_id} "
            f"(epsilon {budget.epsilon:g}, delta {budget.delta:g})",
            f"{use_recorded} to use the recorded budget; a change needs the data governance's approval "
            "(`fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO`, which is recorded)",
        )
    if request.delta is not None and not math.isclose(request.delta, budget.delta):
        ledger.close()
        raise FedTwinError(
            f"--delta {request.delta:g} differs from the dataset's budget delta {budget.delta:g}",
            "composition is over one delta per dataset: omit --delta or pass the recorded one",
        )
    return ledger


def _refuse_if_exhausted(dataset_id: str, spent: float, budget_epsilon: float, delta: float) -> None:
    if budget_epsilon - spent < EXHAUSTED_MARGIN:
        # calibration stops just below its target, so a budget "used up" leaves a sliver that no
        # useful training fits into: call it what it is instead of "noise would swamp learning"
        raise BudgetExceededError(
            f"the privacy budget of {dataset_id} is exhausted: epsilon {spent:.3f} of {budget_epsilon:g} "
            f"(delta {delta:g}) is already spent",
            "no further training on this data unless the site's data governance approves a larger budget "
            "(`fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO`, which is recorded)",
        )


def _sampling(request: DPRequest, n_patients: int) -> tuple[float, int]:
    """(Poisson sample rate, steps) of one pass of ``request.epochs`` over ``n_patients``."""
    sample_rate = min(1.0, request.batch_size / max(n_patients, 1))
    return sample_rate, max(1, math.ceil(request.epochs / sample_rate))


def plan_run(ledger: PrivacyLedger, dataset_id: str, n_patients: int, request: DPRequest) -> PrivacyPlan:
    """Calibrate the noise for this run's steps; refuse (fail closed) if the ledger says no."""
    if request.epsilon <= 0:
        raise FedTwinError(f"--epsilon must be positive, got {request.epsilon:g}", "pass the epsilon this run may spend")
    budget = ledger.budget(dataset_id)
    accountant = ledger.accountant(dataset_id)
    prior = ledger.history(dataset_id)
    spent = ledger.spent_epsilon(dataset_id)
    _refuse_if_exhausted(dataset_id, spent, budget.epsilon, budget.delta)
    sample_rate, steps = _sampling(request, n_patients)
    target = min(budget.epsilon, spent + request.epsilon)
    sigma = calibrate_noise_multiplier(
        prior=prior, sample_rate=sample_rate, steps=steps, target_epsilon=target, delta=budget.delta, accountant=accountant
    )
    check = ledger.check_plan(
        dataset_id, noise_multiplier=sigma, sample_rate=sample_rate, steps_per_round=steps, rounds=1, n_patients=n_patients
    )
    return PrivacyPlan(dataset_id, accountant, sigma, sample_rate, steps, request.max_grad_norm, budget.delta, budget.epsilon,
                       spent, target, check.projected_epsilon)


def plan_federated_round(
    ledger: PrivacyLedger, dataset_id: str, n_patients: int, request: DPRequest, *, training_id: str, rounds: int, server_round: int
) -> PrivacyPlan:
    """One round of a federated training whose noise is calibrated once for all its rounds.

    ``request.epsilon`` is what the whole training (``rounds`` rounds of ``request.epochs`` each)
    may add to what the dataset had spent *before* it started: the noise multiplier solves
    "history before this training + rounds x steps reaches spent + epsilon", so every round of
    the training computes the same multiplier (the ledger entries tagged ``training_id`` are
    left out of "before"). Each round then checks that the rounds still to come fit the budget
    on top of everything spent so far, this training's finished rounds included, and refuses
    (fail closed) otherwise: a site never starts a round it could not finish.
    """
    if request.epsilon <= 0:
        raise FedTwinError(f"the study's per-site epsilon must be positive, got {request.epsilon:g}")
    if not 1 <= server_round <= rounds:
        raise BudgetExceededError(
            f"round {server_round} is outside the {rounds} round(s) this training was planned (and its noise calibrated) for",
            "start a new training (a new study launch) for more rounds",
        )
    budget = ledger.budget(dataset_id)
    accountant = ledger.accountant(dataset_id)
    counted = effective_history(ledger.entries(dataset_id))
    before = [e.block for e in counted if e.run_id != training_id]
    everything = [e.block for e in counted]
    spent_before = composed_epsilon(before, budget.delta, accountant)
    spent_now = composed_epsilon(everything, budget.delta, accountant)
    _refuse_if_exhausted(dataset_id, spent_now, budget.epsilon, budget.delta)
    sample_rate, steps = _sampling(request, n_patients)
    target = min(budget.epsilon, spent_before + request.epsilon)
    sigma = calibrate_noise_multiplier(
        prior=before, sample_rate=sample_rate, steps=steps * rounds, target_epsilon=target, delta=budget.delta,
        accountant=accountant,
    )
    check = check_plan(
        prior=everything, budget=budget, accountant=accountant, noise_multiplier=sigma, sample_rate=sample_rate,
        steps_per_round=steps, rounds=rounds - server_round + 1, n_patients=n_patients,
    )
    return PrivacyPlan(dataset_id, accountant, sigma, sample_rate, steps, request.max_grad_norm, budget.delta, budget.epsilon,
                       spent_now, target, check.projected_epsilon)
