"""A site's evaluation as additive sufficient statistics (one flat vector for SecAgg+).

``TwinEvaluationStats`` = cohort counts + for every model of the layout a ``point`` and a
``dist`` :class:`~fedtwin.metrics.EvaluationStats` (overall and per fairness subgroup). Every
array is a sum over patients, so ``stats(A) + stats(B) == stats(A u B)`` for disjoint patient
sets - across sites, and across the cross-fitting folds of one site - and the report computed
from a sum equals the report of the pooled patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.evaluation.baselines import EvaluationConfig, FittedBaselines, crossfit_folds, fit_baselines
from fedtwin.evaluation.layout import TRAINED_BASELINES, EvaluationLayout
from fedtwin.evaluation.predictions import ModelPredictions, baseline_predictions, density_inputs, twin_predictions
from fedtwin.evaluation.truth import GroundTruth, MatchedTruth, match_truth
from fedtwin.extract.tensors import CohortTensors
from fedtwin.metrics import (
    EffectInputs,
    EvaluationStats,
    ForecastInputs,
    OutcomeInputs,
    SubgroupConfig,
    subgroup_membership,
)
from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.twin.batch import check_compatible
from fedtwin.twin.model import TwinModel


@dataclass(eq=False)
class CohortCounts(AdditiveStats):
    """Patients scored, patients with ground truth, patients per subgroup (G,), events (O,)."""

    layout: EvaluationLayout = static_field()
    patients: np.ndarray
    with_truth: np.ndarray
    subgroup_patients: np.ndarray
    events: np.ndarray

    @classmethod
    def zeros(cls, layout: EvaluationLayout) -> "CohortCounts":
        return cls(layout, np.zeros(()), np.zeros(()), np.zeros(len(layout.subgroup_names)), np.zeros(len(layout.outcome_names)))


@dataclass(eq=False)
class ModelStats(AdditiveStats):
    """One model: ``point`` (mean errors, outcomes, effects) and ``dist`` (NLL, coverage)."""

    point: EvaluationStats
    dist: EvaluationStats


@dataclass(eq=False)
class TwinEvaluationStats(AdditiveStats):
    """Everything a site contributes to an evaluation; ``models`` in ``layout.models`` order."""

    layout: EvaluationLayout = static_field()
    counts: CohortCounts
    models: tuple[ModelStats, ...]

    def _tuple_labels(self, name: str, n: int) -> list[str]:
        return list(self.layout.models)

    @classmethod
    def zeros(cls, layout: EvaluationLayout) -> "TwinEvaluationStats":
        """All-zero statistics: the identity of ``+`` and the template for ``from_vector``."""
        return cls(
            layout,
            CohortCounts.zeros(layout),
            tuple(ModelStats(EvaluationStats.zeros(layout.point_layout(m)), EvaluationStats.zeros(layout.dist_layout())) for m in layout.models),
        )

    def model(self, name: str) -> ModelStats:
        try:
            return self.models[self.layout.models.index(name)]
        except ValueError:
            raise KeyError(f"model {name!r} is not in this evaluation ({list(self.layout.models)})") from None


def membership_matrix(layout: EvaluationLayout, tensors: CohortTensors, config: SubgroupConfig) -> np.ndarray:
    """(N, G) subgroup membership from the extraction's labels (``CohortTensors.subgroups``)."""
    if not layout.subgroup_names:
        return np.zeros((tensors.n_patients, 0), bool)
    labels = {k: tensors.subgroups.get(k) for k in ("sex", "age", "race") if k in config.attributes()}
    missing = [k for k, v in labels.items() if v is None]
    if missing:
        raise FedTwinError(
            f"the cohort carries no subgroup labels for {missing}, which the spec's fairness section asks for",
            "extract the cohort with this spec (fedtwin.extract.Extractor)",
        )
    names, member = subgroup_membership(config, **labels)
    if tuple(names) != layout.subgroup_names:
        raise FedTwinError("the subgroup config does not produce the layout's subgroup names", "build both from the same spec")
    return member


def model_statistics(
    layout: EvaluationLayout,
    pred: ModelPredictions,
    tensors: CohortTensors,
    membership: np.ndarray,
    norm,  # noqa: ANN001 - fedtwin.twin.normalization.Normalizer
    truth: MatchedTruth | None = None,
) -> ModelStats:
    """Statistics of one model's predictions for the patients of ``tensors``."""
    h = tensors.history_steps
    y = np.asarray(tensors.values[:, h:], np.float64)
    mask = np.asarray(tensors.mask[:, h:], bool)
    names = layout.subgroup_names or None
    pl = layout.point_layout(pred.name)
    outcome = None
    if layout.has_outcomes(pred.name):
        if pred.risk is None:
            raise FedTwinError(f"model {pred.name} has no risk, but the layout scores its outcomes")
        outcome = OutcomeInputs(np.asarray(tensors.outcome_event, bool), np.clip(pred.risk, 0.0, 1.0))
    effect = None
    if layout.has_effects(pred.name):
        if truth is None or pred.effect is None:
            raise FedTwinError("the layout scores what-if effects but no ground truth was given", "pass the synthetic ground truth")
        n, p, f, v = truth.effect.shape
        flat = lambda a: np.transpose(a, (0, 2, 1, 3)).reshape(n, f, p * v)  # noqa: E731 - (N,F,"plan|var")
        emask = np.broadcast_to(truth.found[:, None, None], (n, f, p * v))
        effect = EffectInputs(flat(truth.effect), flat(pred.effect), emask)
    point = EvaluationStats.from_inputs(
        pl, membership if layout.subgroup_names else None, names=names,
        forecast=ForecastInputs(y, pred.mean, pred.std, mask), outcome=outcome, effect=effect,
    )
    yd, md, sd = density_inputs(pred, norm, y, mask)
    dist = EvaluationStats.from_inputs(
        layout.dist_layout(), membership if layout.subgroup_names else None, names=names,
        forecast=ForecastInputs(yd, md, sd, mask),
    )
    return ModelStats(point, dist)


def _counts(layout: EvaluationLayout, tensors: CohortTensors, membership: np.ndarray, truth: MatchedTruth | None) -> CohortCounts:
    ev = np.asarray(tensors.outcome_event, bool)
    return CohortCounts(
        layout,
        np.asarray(float(tensors.n_patients)),
        np.asarray(float(truth.found.sum()) if truth is not None else 0.0),
        membership.sum(axis=0).astype(np.float64) if membership.size else np.zeros(len(layout.subgroup_names)),
        ev.sum(axis=0).astype(np.float64) if ev.size else np.zeros(len(layout.outcome_names)),
    )


def site_statistics(
    model: TwinModel,
    tensors: CohortTensors,
    layout: EvaluationLayout,
    baselines: FittedBaselines | None = None,
    truth: MatchedTruth | None = None,
    config: EvaluationConfig | None = None,
    subgroups: SubgroupConfig | None = None,
) -> TwinEvaluationStats:
    """Statistics of every model of ``layout`` on ``tensors``, with baselines already fitted.

    A trained baseline that is None in ``baselines`` (no training data) contributes zeros.
    """
    config = config or EvaluationConfig()
    if layout.spec_hash != model.spec_hash:
        raise FedTwinError(
            f"the evaluation layout is for spec hash {layout.spec_hash[:12]}..., the model for {model.spec_hash[:12]}...",
            "build the layout from the model's spec",
        )
    check_compatible(tensors, model.spec)
    if layout.plans and truth is None:
        raise FedTwinError("the evaluation layout scores what-if plans, but no ground truth was given", "pass ground truth or a layout without plans")
    if truth is not None and tuple(truth.plans) != layout.plans:
        raise FedTwinError(f"ground-truth plans {list(truth.plans)} differ from the layout's {list(layout.plans)}")
    stats = TwinEvaluationStats.zeros(layout)
    if tensors.n_patients == 0:
        return stats
    cfg = subgroups or SubgroupConfig.from_fairness(model.spec.fairness)
    member = membership_matrix(layout, tensors, cfg)
    use_truth = truth if layout.plans else None
    preds: dict[str, ModelPredictions] = twin_predictions(
        model, tensors, use_truth, mechanism_name="mechanistic_only" if "mechanistic_only" in layout.models else None,
        n_samples=config.n_samples, seed=config.seed, num_threads=config.num_threads,
    )
    b = baselines or FittedBaselines(n_train=0)
    if "residual_only" in layout.models and b.residual_only is not None:
        preds.update(twin_predictions(b.residual_only, tensors, use_truth, name="residual_only", mechanism_name=None,
                                      n_samples=config.n_samples, seed=config.seed, num_threads=config.num_threads))
    for name, fitted in (("persistence", b.persistence), ("population_mean", b.population_mean)):
        if name in layout.models and fitted is not None:
            preds[name] = baseline_predictions(fitted.predict(tensors), model.norm, use_truth, with_effect=layout.has_effects(name))
    per_model = []
    for name in layout.models:
        if name in preds:
            per_model.append(model_statistics(layout, preds[name], tensors, member, model.norm, use_truth))
        else:
            per_model.append(stats.model(name))  # zeros: no training data for this baseline
    return TwinEvaluationStats(layout, _counts(layout, tensors, member, use_truth), tuple(per_model))


def evaluate_site(
    model: TwinModel,
    tensors: CohortTensors,
    *,
    train: CohortTensors | None = None,
    ground_truth: GroundTruth | None = None,
    layout: EvaluationLayout | None = None,
    config: EvaluationConfig | None = None,
    subgroups: SubgroupConfig | None = None,
) -> TwinEvaluationStats:
    """Score ``model`` and the layout's baselines on ``tensors`` (patients it did not train on).

    ``subgroups`` must be the config the layout's subgroup names came from (default: the spec's).

    Baselines are fitted on ``train`` when given (it must not share patients with ``tensors``),
    otherwise cross-fitted within ``tensors`` (see :mod:`fedtwin.evaluation.baselines`).
    With ``ground_truth`` (synthetic sites) what-if effects are scored for its plans.
    """
    config = config or EvaluationConfig()
    if layout is None:
        layout = EvaluationLayout.for_spec(model.spec, plans=ground_truth.alternatives if ground_truth is not None else ())
    truth = None
    if layout.plans:
        if ground_truth is None:
            raise FedTwinError("the evaluation layout scores what-if plans, but no ground truth was given")
        h = tensors.history_steps
        truth = match_truth(ground_truth, model.spec, tensors.person_ids, np.asarray(tensors.doses[:, h:]), layout.plans)
        if tensors.n_patients and not truth.found.any():
            raise FedTwinError(
                "none of the cohort's patients is in the ground truth",
                "pass the ground truth written by the `fedtwin synth` run that made this database",
            )
    if train is not None:
        overlap = np.intersect1d(np.asarray(train.person_ids), np.asarray(tensors.person_ids))
        if overlap.size:
            raise FedTwinError(
                f"{overlap.size} patients are both in the baselines' training data and in the scored cohort",
                "score held-out patients only (fedtwin.training.split.train_test_split)",
            )
        fitted = fit_baselines(model, train, layout.models, config)
        return site_statistics(model, tensors, layout, fitted, truth, config, subgroups)
    if not TRAINED_BASELINES.intersection(layout.models):
        return site_statistics(model, tensors, layout, None, truth, config, subgroups)
    folds = crossfit_folds(tensors.person_ids, config.crossfit_folds)
    total = TwinEvaluationStats.zeros(layout)
    for k in range(config.crossfit_folds):
        inside = np.flatnonzero(folds == k)
        if inside.size == 0:
            continue
        fitted = fit_baselines(model, tensors.select(np.flatnonzero(folds != k)), layout.models, config)
        total = total + site_statistics(
            model, tensors.select(inside), layout, fitted, truth.select(inside) if truth else None, config, subgroups
        )
    return total
