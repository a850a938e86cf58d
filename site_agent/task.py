"""The site's work in one federated round (called by :mod:`site_agent.client_app`).

Heavy imports (torch, Opacus, SQLAlchemy, the twin) happen inside the functions so that importing
the ClientApp module stays cheap (``flwr run`` imports it to validate the FAB's components).

Order matters for privacy, as in ``fedtwin train local``: the spec hash is checked first, the
cohort is extracted and split, the ledger plans and *reserves* the round's spend before the first
step (``round=server_round``), steps are counted as they happen, and the reservation is settled
with the steps actually taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SiteRefusal(RuntimeError):
    """The site declines the round (wrong spec, unsafe update, ...); the message says why."""


@dataclass(frozen=True)
class RoundSettings:
    """What the coordinator's run config asks of a site for one round."""

    server_round: int
    spec_hash: str
    epsilon: float
    local_epochs: float
    batch_size: int
    max_grad_norm: float
    lr: float
    clipping_range: float
    run_id: str

    @classmethod
    def from_config(cls, config: dict[str, Any], run_config: dict[str, Any], server_round: int, run_id: str) -> "RoundSettings":
        def get(key: str, default: Any = None) -> Any:
            if key in config:
                return config[key]
            if key in run_config:
                return run_config[key]
            if default is None:
                raise SiteRefusal(f"the round's config has no {key!r}: the coordinator must send it")
            return default

        return cls(
            server_round=int(server_round),
            spec_hash=str(get("spec-hash")),
            epsilon=float(get("epsilon-per-round")),
            local_epochs=float(get("local-epochs", 1.0)),
            batch_size=int(get("batch-size", 64)),
            max_grad_norm=float(get("max-grad-norm", 1.0)),
            lr=float(get("learning-rate", 3e-3)),
            clipping_range=float(get("clipping-range", 8.0)),
            run_id=run_id,
        )


@dataclass(frozen=True)
class RoundResult:
    parameters: list  # list[np.ndarray], float32
    num_examples: int
    epsilon_spent: float


def coarsen_count(n: int, step: int = 10) -> int:
    """num_examples goes to the server in plaintext: round down to a multiple of ``step``, at least ``step``."""
    return max(step, (int(n) // step) * step)


def check_update(parameters: list, clipping_range: float) -> None:
    """Refuse an update SecAgg+ would clip silently (or a diverged one)."""
    import numpy as np

    for i, a in enumerate(parameters):
        arr = np.asarray(a)
        if not np.all(np.isfinite(arr)):
            raise SiteRefusal(f"refusing to send the update: parameter array {i} has non-finite values")
        if arr.size and float(np.max(np.abs(arr))) > clipping_range:
            raise SiteRefusal(
                f"refusing to send the update: parameter array {i} reaches {float(np.max(np.abs(arr))):.3g}, "
                f"outside +-{clipping_range:g} (SecAgg+ would clip it)"
            )


def site_spec_hash(site_config_path: str | Path) -> str:
    from fedtwin.federation.config import load_site_config
    from fedtwin.spec import load_spec, spec_hash

    site = load_site_config(site_config_path)
    return spec_hash(load_spec(site.data.spec))


def run_round(site_config_path: str | Path, parameters: list, settings: RoundSettings) -> RoundResult:
    """Train the global twin on this site's train split with DP-SGD inside the site's ledger."""
    import numpy as np

    from fedtwin.federation.config import load_site_config
    from fedtwin.omop.database import open_database
    from fedtwin.privacy.ledger import dataset_id_for_database
    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.training.privacy_plan import DPRequest, open_or_create_ledger, plan_run
    from fedtwin.training.split import train_test_split
    from fedtwin.extract.extractor import Extractor
    from fedtwin.twin import FitConfig, TwinModel, fit, get_parameters, set_parameters

    site = load_site_config(site_config_path)
    spec = load_spec(site.data.spec)
    own = spec_hash(spec)
    if settings.spec_hash != own:
        raise SiteRefusal(
            f"site {site.site.name} refuses round {settings.server_round}: the coordinator's spec hash "
            f"{settings.spec_hash[:12]} is not the site's spec hash {own[:12]} ({site.data.spec.name})"
        )
    if not (settings.epsilon > 0 and math.isfinite(settings.epsilon)):
        raise SiteRefusal(f"epsilon-per-round must be a positive number, got {settings.epsilon!r}")

    db = open_database(site.data.database, site.data.cdm_schema)
    train, _test = train_test_split(Extractor(db, spec).extract())
    if train.n_patients == 0:
        raise SiteRefusal(f"site {site.site.name} has no training patients for spec {spec.name}")

    model = TwinModel(spec)
    set_parameters(model, [np.asarray(p) for p in parameters])

    request = DPRequest(
        epsilon=settings.epsilon,
        delta=site.privacy.delta,
        budget_epsilon=site.privacy.epsilon,
        max_grad_norm=settings.max_grad_norm,
        batch_size=settings.batch_size,
        epochs=settings.local_epochs,
    )
    dataset_id = dataset_id_for_database(db.url, db.cdm_schema)
    ledger = open_or_create_ledger(site.privacy.ledger, dataset_id, request)
    try:
        plan = plan_run(ledger, dataset_id, train.n_patients, request)
        with plan.reserve(
            ledger, run_id=settings.run_id, round=settings.server_round,
            note=f"federated round {settings.server_round}, spec {own[:12]}",
        ) as session:
            fit(model, train, FitConfig(lr=settings.lr, batch_size=settings.batch_size), dp=plan.dp_settings(),
                on_step=lambda: session.add_steps(1))
        spent = float(ledger.spent_epsilon(dataset_id))
    finally:
        ledger.close()

    new = [np.asarray(p, dtype=np.float32) for p in get_parameters(model)]
    check_update(new, settings.clipping_range)
    return RoundResult(parameters=new, num_examples=coarsen_count(train.n_patients), epsilon_spent=spent)
