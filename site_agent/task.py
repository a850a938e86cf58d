"""The site's work in one federated round (called by :mod:`site_agent.client_app`).

Heavy imports (torch, Opacus, SQLAlchemy, the twin) happen inside the functions so that importing
the ClientApp module stays cheap (``flwr run`` imports it to validate the FAB's components).

Order matters for privacy, as in ``fedtwin train local``: the spec hash is checked first, the
cohort is extracted and split, the received global model is scored on the held-out patients
(statistics encoded for SecAgg+ and appended to the parameters, :mod:`fedtwin.federation`), the
ledger plans and *reserves* the round's spend before the first step (``round=server_round``,
``run_id`` = the training id, so that the noise is calibrated once for the whole training), steps
are counted as they happen, and the reservation is settled with the steps actually taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtwin.provenance.manifest import PREVIOUS_RECORD_CONFIG


class SiteRefusal(RuntimeError):
    """The site declines the round (wrong spec, unsafe update, ...); the message says why."""


@dataclass(frozen=True)
class RoundSettings:
    """What the coordinator's run config asks of a site for one round.

    ``epsilon`` is what the whole training (``rounds`` rounds) may spend at this site; the noise
    is calibrated once for all of them (:func:`fedtwin.training.privacy_plan.plan_federated_round`).
    ``kind`` is ``train`` (score the received model, then train it) or ``evaluate`` (the final
    round: score the received model, no training, no privacy spent).
    """

    server_round: int
    rounds: int
    kind: str
    training_id: str
    spec_hash: str
    epsilon: float
    local_epochs: float
    batch_size: int
    max_grad_norm: float
    lr: float
    proximal_mu: float
    secagg: bool
    evaluate: bool
    clipping_range: float
    quantization_range: int
    max_weight: float
    count_step: int
    study_id: str = "fedtwin"
    code_version: str = ""  # the FedTwin version the coordinator runs ("" = not said: the site's own)
    previous_record: str = ""  # the coordinator's signed record of the previous round (JSON), if any

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

        kind = str(get("round-kind", "train"))
        if kind not in ("train", "evaluate"):
            raise SiteRefusal(f"unknown round-kind {kind!r} (train or evaluate)")
        return cls(
            server_round=int(server_round),
            rounds=int(get("num-rounds")),
            kind=kind,
            training_id=str(get("training-id", "")) or run_id,
            spec_hash=str(get("spec-hash")),
            epsilon=float(get("epsilon-per-site")),
            local_epochs=float(get("local-epochs", 1.0)),
            batch_size=int(get("batch-size", 64)),
            max_grad_norm=float(get("max-grad-norm", 1.0)),
            lr=float(get("learning-rate", 3e-3)),
            proximal_mu=float(get("proximal-mu", 0.0)),
            secagg=bool(get("secagg", False)),
            evaluate=bool(get("evaluate", True)),
            clipping_range=float(get("clipping-range", 8.0)),
            quantization_range=int(get("quantization-range", 2**22)),
            max_weight=float(get("max-weight", 1000.0)),
            count_step=int(get("count-step", 10)),
            study_id=str(get("study-id", "fedtwin")).strip() or "fedtwin",
            code_version=str(config.get("code-version", "")),
            previous_record=str(config.get(PREVIOUS_RECORD_CONFIG, "")),
        )


@dataclass(frozen=True)
class RoundResult:
    parameters: list  # list[np.ndarray]: the model's float32 arrays, then (SecAgg+ only) the encoded statistics
    num_examples: int
    epsilon_spent: float
    site: str
    manifest_json: str = ""  # the site's signed manifest of the round (plaintext fit metric)


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


def check_training(losses) -> None:
    """Refuse an update whose training diverged: parameters are bounded by projection, so a blown-up
    run can still pass :func:`check_update` while being garbage; its loss says so."""
    import numpy as np

    tail = np.asarray(losses, dtype=float)[-5:]  # losses of non-empty batches only
    if tail.size and not np.all(np.isfinite(tail)):
        raise SiteRefusal(f"refusing to send the update: local training diverged (last losses {tail.tolist()}): lower the learning rate")


def run_round(site_config_path: str | Path, parameters: list, settings: RoundSettings) -> RoundResult:
    """Score the received global twin on held-out patients, then train it with DP-SGD in the ledger."""
    import numpy as np

    from fedtwin.extract.extractor import Extractor
    from fedtwin.federation.config import load_site_config
    from fedtwin.omop.database import open_database
    from fedtwin.privacy.ledger import dataset_id_for_database
    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.training.split import train_test_split
    from fedtwin.twin import TwinModel, get_parameters, set_parameters
    from site_agent import provenance

    site = load_site_config(site_config_path)
    name = site.site.name
    spec = load_spec(site.data.spec)
    own = spec_hash(spec)
    if settings.spec_hash != own:
        raise SiteRefusal(
            f"site {name} refuses round {settings.server_round}: the coordinator's spec hash "
            f"{settings.spec_hash[:12]} is not the site's spec hash {own[:12]} ({site.data.spec.name}). Fix: the site "
            f"and the study must use the same twin spec: compare `fedtwin spec validate {site.data.spec}` (it prints "
            "the hash) with the study's spec, then point [data] spec of the site config at the study's spec and approve "
            "it (`fedtwin site approve`), or ask the coordinator which spec the study uses"
        )
    from fedtwin.code_version import code_version
    from site_agent.approval import check_study_approved

    # the study (its spec hash and the coordinator's code version) must be on the site's allow-list
    # before any data is read
    check_study_approved(site.allow_list_path(), own, settings.code_version or code_version(), name,
                         config_path=site_config_path, spec_path=site.data.spec)
    if not (settings.epsilon > 0 and math.isfinite(settings.epsilon)):
        raise SiteRefusal(f"epsilon-per-site must be a positive number, got {settings.epsilon!r}")

    db = open_database(site.data.database, site.data.cdm_schema)
    quality = provenance.quality_verdict(site, db, spec, site.privacy.suppression_threshold)
    if quality.blocking_failures:  # before any extraction or training: a refusal spends nothing
        raise SiteRefusal(
            f"site {name} refuses round {settings.server_round}: its database fails blocking data-quality checks "
            f"for spec {spec.name}: {', '.join(quality.blocking_failures)}. Fix: run `fedtwin site check --db DATABASE "
            f"--spec {site.data.spec}` (DATABASE = [data] database of the site config) to see each check and its fix, "
            "correct the data or the ETL, then rejoin"
        )
    extractor = Extractor(db, spec)
    cohort = extractor.extract()
    train, test = train_test_split(cohort)
    if train.n_patients == 0:
        raise SiteRefusal(f"site {name} has no training patients for spec {spec.name}")
    num_examples = coarsen_count(train.n_patients, settings.count_step)
    if settings.secagg and num_examples > settings.max_weight:  # Flower would only warn, then sum wrongly
        raise SiteRefusal(
            f"site {name} reports {num_examples} patients, above the study's SecAgg+ max_weight {settings.max_weight:g}: "
            "the aggregate would overflow; the coordinator must raise [secagg] max_weight"
        )

    received = [np.asarray(p) for p in parameters]
    model = TwinModel(spec)
    n_model = len(get_parameters(model))
    if len(parameters) != n_model:
        raise SiteRefusal(f"site {name}: received {len(parameters)} parameter arrays, the twin of {spec.name} has {n_model}")
    set_parameters(model, [np.asarray(p) for p in parameters])
    statistics = None
    if settings.secagg and (settings.evaluate or settings.kind == "evaluate"):  # only inside the masked vector
        statistics = _encoded_statistics(model, train, test, spec, settings, num_examples)
    elif settings.kind == "evaluate":
        raise SiteRefusal("an evaluation round needs SecAgg+: the site's statistics never travel in plaintext")

    dataset_id = dataset_id_for_database(db.url, db.cdm_schema)
    plan = None
    if settings.kind == "train":
        spent, plan = _train_in_ledger(model, train, site, dataset_id, own, settings)
    else:
        spent = _spent(site.privacy.ledger, dataset_id)

    new = [np.asarray(p, dtype=np.float32) for p in get_parameters(model)]
    check_update(new, settings.clipping_range)
    if site.audit.outbox is not None:
        keep_outbox_copy(site.audit.outbox, settings, new, num_examples, statistics)
    manifest = _signed_manifest(site, settings, spec, own, db, cohort, extractor.stats, received, plan, spent, quality.report_hash)
    if statistics is not None:
        new.append(statistics[1])
    return RoundResult(parameters=new, num_examples=num_examples, epsilon_spent=spent, site=name, manifest_json=manifest.to_json())


def _signed_manifest(site, settings: RoundSettings, spec, own_hash: str, db, cohort, stats, received: list, plan, spent: float,
                     quality_report_hash: str):
    """Sign this round's manifest and keep it (and the previous round's record) in the site's log."""
    from fedtwin.extract.summary import summarize
    from site_agent import provenance

    threshold = site.privacy.suppression_threshold
    manifest = provenance.sign_manifest(
        site, study_id=settings.study_id, server_round=settings.server_round, spec_hash=own_hash,
        summary=summarize(cohort, stats, threshold),
        quality_report_hash=quality_report_hash,
        dp_plan=plan, epsilon_spent=spent, received=received,
        source=provenance.data_source(cohort, db, threshold, settings.count_step),
    )
    provenance.keep_in_log(site, manifest, settings.previous_record or None)
    return manifest


def keep_outbox_copy(folder: Path, settings: RoundSettings, parameters: list, num_examples: int, statistics) -> Path:
    """The site's own copy of what it sends this round: ``<training id>/round-NNNN.npz`` in its outbox.

    Keys: ``p0000``... (the parameters), ``num_examples``, and with SecAgg+ ``statistics`` (the
    evaluation sums before encoding) and ``encoded`` (what went into the masked vector).
    """
    import numpy as np

    target = Path(folder) / settings.training_id / f"round-{settings.server_round:04d}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"p{i:04d}": a for i, a in enumerate(parameters)}
    if statistics is not None:
        arrays["statistics"], arrays["encoded"] = statistics
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, num_examples=np.int64(num_examples), **arrays)
    tmp.replace(target)
    return target


def _encoded_statistics(model, train, test, spec, settings: RoundSettings, num_examples: int):
    """(statistics, encoded): the received model's evaluation sums on the test split, and their SecAgg+ encoding."""
    from fedtwin.evaluation import evaluate_site
    from fedtwin.federation.round_evaluation import federated_layout, federated_subgroups
    from fedtwin.federation.secure_sums import SecureSumEncoding, SecureSumError, encode_sums

    kind = "final" if settings.kind == "evaluate" else "round"
    try:
        stats = evaluate_site(model, test, train=train, layout=federated_layout(spec, kind), subgroups=federated_subgroups(spec, kind))
    except ValueError as exc:  # e.g. a diverged global model whose forecasts are NaN
        raise SiteRefusal(f"cannot score the received global model: {exc}") from None
    enc = SecureSumEncoding(
        clipping_range=settings.clipping_range, quantization_range=settings.quantization_range, max_weight=settings.max_weight
    )
    vector = stats.to_vector()
    try:
        return vector, encode_sums(vector, num_examples, enc)
    except SecureSumError as exc:
        raise SiteRefusal(f"refusing to send evaluation statistics: {exc}") from None


def _train_in_ledger(model, train, site, dataset_id: str, spec_hash_: str, settings: RoundSettings):
    """(composed epsilon after the round, the round's privacy plan)."""
    from fedtwin.privacy.accounting import BudgetExceededError
    from fedtwin.training.privacy_plan import DPRequest, open_or_create_ledger, plan_federated_round
    from fedtwin.training.proximal import ProximalPull
    from fedtwin.twin import FitConfig, fit

    request = DPRequest(
        epsilon=settings.epsilon,
        delta=site.privacy.delta,
        budget_epsilon=site.privacy.epsilon,
        max_grad_norm=settings.max_grad_norm,
        batch_size=settings.batch_size,
        epochs=settings.local_epochs,
        budget_source=f"[privacy] epsilon of site {site.site.name}'s config",
    )
    ledger = open_or_create_ledger(site.privacy.ledger, dataset_id, request)
    try:
        try:
            plan = plan_federated_round(
                ledger, dataset_id, train.n_patients, request,
                training_id=settings.training_id, rounds=settings.rounds, server_round=settings.server_round,
            )
        except BudgetExceededError as exc:
            raise SiteRefusal(f"site {site.site.name} refuses round {settings.server_round}: {exc}") from None
        pull = ProximalPull(model, settings.proximal_mu, settings.lr)
        with plan.reserve(
            ledger, run_id=settings.training_id, round=settings.server_round,
            note=f"federated round {settings.server_round}/{settings.rounds}, spec {spec_hash_[:12]}",
        ) as session:
            def step() -> None:
                pull()
                session.add_steps(1)

            report = fit(model, train, FitConfig(lr=settings.lr, batch_size=settings.batch_size), dp=plan.dp_settings(), on_step=step)
        spent = float(ledger.spent_epsilon(dataset_id))  # spent whatever happens next: the steps were taken
        check_training(report.losses)
        return spent, plan
    finally:
        ledger.close()


def _spent(ledger_path: Path, dataset_id: str) -> float:
    from fedtwin.privacy.ledger import PrivacyLedger

    if not Path(ledger_path).exists():
        return 0.0
    with PrivacyLedger.open(ledger_path, read_only=True) as ledger:
        return float(ledger.spent_epsilon(dataset_id)) if dataset_id in ledger.datasets() else 0.0
