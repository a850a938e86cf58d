"""``fedtwin train local``: one site trains a twin on its own data, with DP and its ledger.

Order matters for privacy: the cohort is extracted and split, the ledger plans and *reserves*
the run's spend before the first step, steps are counted as they happen, and the reservation is
settled with the steps actually taken (an interrupted run is still accounted for). Outputs
appear only when everything succeeded.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fedtwin.extract.extractor import Extractor
from fedtwin.extract.tensors import CohortTensors
from fedtwin.omop.database import OmopDatabase
from fedtwin.privacy.ledger import dataset_id_for_database
from fedtwin.privacy.suppression import suppress_count
from fedtwin.spec import TwinSpec, spec_hash
from fedtwin.training.outputs import refuse_existing, staged_output, write_json
from fedtwin.training.privacy_plan import DPRequest, PrivacyPlan, open_or_create_ledger, plan_run
from fedtwin.training.split import DEFAULT_TEST_FRACTION, train_test_split
from fedtwin.twin import FitConfig, FitReport, TwinConfig, TwinModel, evaluate, fit, save_model


@dataclass
class LocalTrainingConfig:
    """Everything a local run needs besides the data. ``dp=None`` trains without DP (comparison only)."""

    dp: DPRequest | None
    ledger: Path | None = None
    dataset_id: str | None = None
    lr: float = 3e-3
    seed: int = 0
    test_fraction: float = DEFAULT_TEST_FRACTION
    twin: TwinConfig = field(default_factory=TwinConfig)


@dataclass
class LocalTrainingResult:
    out: Path
    n_train: int
    n_test: int
    fit: FitReport
    privacy: PrivacyPlan | None
    epsilon_spent_total: float | None
    held_out: dict[str, float]


Progress = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(_label: str, _total: int | None) -> Callable[[int], None]:
    return lambda _n: None


def extract_split(db: OmopDatabase, spec: TwinSpec, test_fraction: float, progress: Progress) -> tuple[CohortTensors, CohortTensors]:
    # The bar pulses without a count: a running patient count is a number below the suppression
    # threshold on a small cohort.
    progress("extracting cohort", None)
    tensors = Extractor(db, spec).extract()
    return train_test_split(tensors, test_fraction)


def train_local(
    db: OmopDatabase, spec: TwinSpec, out: Path, config: LocalTrainingConfig, progress: Progress = _no_progress
) -> LocalTrainingResult:
    refuse_existing(out)
    train, test = extract_split(db, spec, config.test_fraction, progress)
    model = TwinModel(spec, config.twin)
    run_id = f"local-{uuid.uuid4().hex[:12]}"
    fit_cfg = FitConfig(epochs=max(1, round(config.dp.epochs)) if config.dp else 3, batch_size=config.dp.batch_size if config.dp else 256,
                        lr=config.lr, seed=config.seed)
    plan: PrivacyPlan | None = None
    spent_total: float | None = None
    if config.dp is None:
        step = progress("training (no DP)", None)
        report = fit(model, train, fit_cfg, on_step=lambda: step(1))
    else:
        if config.ledger is None:
            from fedtwin.errors import FedTwinError

            raise FedTwinError("DP training needs the site's privacy ledger", "pass --ledger PATH (or --no-dp for a non-private comparison)")
        dataset_id = config.dataset_id or dataset_id_for_database(db.url, db.cdm_schema)
        ledger = open_or_create_ledger(config.ledger, dataset_id, config.dp)
        try:
            plan = plan_run(ledger, dataset_id, train.n_patients, config.dp)
            step = progress("training with DP-SGD", plan.steps)
            with plan.reserve(ledger, run_id=run_id, note=f"fedtwin train local, spec {spec_hash(spec)[:12]}") as session:

                def counted() -> None:
                    session.add_steps(1)
                    step(1)

                report = fit(model, train, fit_cfg, dp=plan.dp_settings(), on_step=counted)
            spent_total = ledger.spent_epsilon(dataset_id)
        finally:
            ledger.close()
    held_out = evaluate(model, test) if test.n_patients else {}
    with staged_output(out) as stage:
        save_model(model, stage / "model.pt")
        write_json(
            stage / "config.json",
            {
                "run_id": run_id,
                "spec_name": spec.name,
                "spec_hash": spec_hash(spec),
                "database": db.display_url,
                "twin": asdict(config.twin),
                "fit": asdict(fit_cfg),
                "dp": asdict(config.dp) if config.dp else None,
                "test_fraction": config.test_fraction,
            },
        )
        write_json(
            stage / "metrics.json",
            {
                "train_patients": suppress_count(train.n_patients, spec.suppression_threshold),
                "test_patients": suppress_count(test.n_patients, spec.suppression_threshold),
                "steps": report.steps,
                "seconds": report.seconds,
                "final_train_loss": report.final_loss,
                "held_out": held_out,
            },
        )
        write_json(
            stage / "privacy.json",
            {
                "dp": plan is not None,
                "plan": plan.to_dict() if plan else None,
                "epsilon_spent_total": spent_total,
                "privacy_unit": "patient (one sample per patient, Poisson sampling)",
                "secure_rng": False,
            },
        )
    return LocalTrainingResult(out, train.n_patients, test.n_patients, report, plan, spent_total, held_out)
