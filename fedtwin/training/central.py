"""``fedtwin train central``: pooled training on several databases, for benchmarks only.

Pooling patient data is exactly what FedTwin exists to avoid; this is the upper bound a
federation is compared with, on synthetic or otherwise shareable data. No DP, no ledger.
"""

from __future__ import annotations

from pathlib import Path

from fedtwin.extract.extractor import concat
from fedtwin.omop.database import OmopDatabase
from fedtwin.privacy.suppression import suppress_count
from fedtwin.spec import TwinSpec, spec_hash
from fedtwin.training.local import Progress, _no_progress, extract_split
from fedtwin.training.outputs import refuse_existing, staged_output, write_json
from fedtwin.training.split import DEFAULT_TEST_FRACTION
from fedtwin.twin import FitConfig, FitReport, TwinConfig, TwinModel, evaluate, fit, save_model


def train_central(
    dbs: list[OmopDatabase],
    spec: TwinSpec,
    out: Path,
    fit_config: FitConfig | None = None,
    twin_config: TwinConfig | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    progress: Progress = _no_progress,
) -> tuple[FitReport, dict[str, float]]:
    refuse_existing(out)
    trains, tests = [], []
    for db in dbs:  # each database split by its own person ids, then pooled
        train, test = extract_split(db, spec, test_fraction, progress)
        trains.append(train)
        tests.append(test)
    train, test = concat(trains), concat(tests)
    model = TwinModel(spec, twin_config or None)
    fit_config = fit_config or FitConfig(epochs=3)
    step = progress("training (pooled, no DP)", None)
    report = fit(model, train, fit_config, on_step=lambda: step(1))
    held_out = evaluate(model, test) if test.n_patients else {}
    with staged_output(out) as stage:
        save_model(model, stage / "model.pt")
        write_json(stage / "config.json", {"mode": "central (benchmark upper bound)", "spec_hash": spec_hash(spec),
                                           "databases": [db.display_url for db in dbs]})
        write_json(stage / "metrics.json", {
            "train_patients": suppress_count(train.n_patients, spec.suppression_threshold),
            "test_patients": suppress_count(test.n_patients, spec.suppression_threshold),
            "steps": report.steps, "seconds": report.seconds, "final_train_loss": report.final_loss, "held_out": held_out,
        })
    return report, held_out
