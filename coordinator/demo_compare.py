"""``fedtwin demo``: the federated twin against a local-only twin at the smallest site.

The local-only twin is what the smallest hospital could train alone: DP-SGD
(``fedtwin.training.local.train_local``) with the same epsilon the federation spent at that site
and the same passes over its data, recorded in the same privacy ledger (the same patients, so the
spends compose: the site's budget must hold both). Both models are then scored on that site's
held-out patients (the fixed person-id split of ``fedtwin.training.split``) with
``fedtwin.evaluation.evaluate_site`` and ``evaluation_report``, small cells suppressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("twin", "persistence")  # the twin, and the cheapest baseline as a yardstick


@dataclass
class Comparison:
    site: str
    local_epsilon: float
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # "federated" | "local-only" -> evaluation_report

    def headline_keys(self) -> list[str]:
        """Forecast RMSE pooled over the horizon per variable, then outcome AUROC, of the twin."""
        keys: list[str] = []
        for rep in self.reports.values():
            for k in rep.get("metrics", {}):
                if k not in keys and (re.fullmatch(r"rmse\.[^.]+\.all\.twin", k) or re.fullmatch(r"auroc\.[^.]+\.twin", k)):
                    keys.append(k)
        return sorted(keys, key=lambda k: (not k.startswith("rmse"), k))


def load_federated_model(final_npz: Path, spec):
    """The ServerApp's final global parameters (npz, keys p0000...) in a fresh TwinModel."""
    import numpy as np

    from fedtwin.errors import FedTwinError
    from fedtwin.twin import TwinModel, set_parameters

    if not final_npz.is_file():
        raise FedTwinError(f"the federated run wrote no final model at {final_npz}", "read the run's log above (coordinator launch output)")
    with np.load(final_npz, allow_pickle=False) as z:
        params = [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"p\d{4}", k))]
    model = TwinModel(spec)
    set_parameters(model, params)
    model.eval()
    return model


def train_local_only(site_cfg, spec, out: Path, *, epsilon: float, epochs: float, batch_size: int, seed: int):
    """DP-SGD at one site alone, inside that site's ledger; returns (result, model)."""
    from fedtwin.omop import open_database
    from fedtwin.training.local import LocalTrainingConfig, train_local
    from fedtwin.training.privacy_plan import DPRequest
    from fedtwin.twin import load_model

    db = open_database(site_cfg.data.database, site_cfg.data.cdm_schema)
    result = train_local(
        db, spec, out,
        LocalTrainingConfig(
            dp=DPRequest(epsilon=epsilon, delta=site_cfg.privacy.delta, budget_epsilon=site_cfg.privacy.epsilon,
                         epochs=epochs, batch_size=batch_size),
            ledger=site_cfg.privacy.ledger,
            seed=seed,
        ),
    )
    return result, load_model(out / "model.pt", spec)


def evaluate_on_held_out(site_cfg, spec, models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``evaluation_report`` of each model on the site's held-out patients (baselines fitted on its train split)."""
    from fedtwin.evaluation import EvaluationConfig, EvaluationLayout, evaluate_site, evaluation_report
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop import open_database
    from fedtwin.training.split import train_test_split

    db = open_database(site_cfg.data.database, site_cfg.data.cdm_schema)
    train, test = train_test_split(Extractor(db, spec).extract())
    layout = EvaluationLayout.for_spec(spec, models=MODELS)
    threshold = max(spec.suppression_threshold, site_cfg.privacy.suppression_threshold)  # the stricter one
    out = {}
    for name, model in models.items():
        stats = evaluate_site(model, test, train=train, layout=layout, config=EvaluationConfig(n_samples=32))
        out[name] = evaluation_report(stats, suppression_threshold=threshold, subgroups=False, cells=False)
    return out


def format_cell(cell: Any) -> str:
    """A report value: ``v [lo, hi]`` or ``suppressed`` (small cells) or ``-`` (not reported)."""
    if cell is None:
        return "-"
    if not isinstance(cell, dict):
        return str(cell)
    v, ci = cell.get("value"), cell.get("ci")
    if v is None:
        return "-"
    text = f"{v:.3f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text
