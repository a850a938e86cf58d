"""The simulator's own expectation, scored as if it were a model: the floor under every error.

On synthetic sites (``fedtwin synth``) the ground truth holds, per patient, the noise-free latent
state over the horizon under the recorded doses, the probability of each outcome given the
latent trajectory, and the true effect of every plan. Scoring those through the same statistics
as a twin (:func:`fedtwin.evaluation.model_statistics`) puts an "oracle" row next to the trained
models: what no model of the observed data can beat, so that a twin's distance from it reads as
"room left", not as an absolute figure.

What the oracle predicts (canonical units, Gaussian):

* mean = the latent state per horizon bin (``plan_states`` of the ``recorded`` plan, which the
  ground truth defines to equal ``latent_states`` over the horizon);
* std = the simulator's noise of ONE reading (:data:`fedtwin.synth.care.OBS_SD`: additive for
  heart rate and MAP, relative for the labs). A bin holding several readings is their mean and
  has less noise, so the oracle's intervals are conservative (coverage above nominal), and its
  RMSE still carries reading noise and the site's rounding: it is not zero;
* risk = ``outcome_risk``, P(outcome in the window | latent trajectory, recorded plan);
* what-if effect = the true effect, so its effect error is 0 by construction.

The oracle knows each patient's latent trajectory, including process noise after the prediction
time that no model can observe: it is a bound, not an attainable target.
"""

from __future__ import annotations

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.evaluation.layout import EvaluationLayout
from fedtwin.evaluation.predictions import ModelPredictions
from fedtwin.evaluation.stats import TwinEvaluationStats, _counts, membership_matrix, model_statistics
from fedtwin.evaluation.truth import RECORDED, GroundTruth, MatchedTruth
from fedtwin.extract.tensors import CohortTensors
from fedtwin.metrics import SubgroupConfig
from fedtwin.spec import TwinSpec
from fedtwin.synth.care import OBS_RELATIVE, OBS_SD
from fedtwin.twin.config import TwinConfig
from fedtwin.twin.normalization import Normalizer


def outcome_risk(truth: GroundTruth, outcome_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(M, O) ``outcome_risk`` of every ground-truth row (``truth.person_id`` order), outcomes in
    the order asked for. :class:`GroundTruth` does not load it (what-if scoring needs none), so
    it is read from the same ``truth.npz`` files."""
    if not truth.sources:
        raise FedTwinError("this ground truth was not loaded from files", "use GroundTruth.load(...)")
    ids, risks = [], []
    for f in truth.sources:
        with np.load(f, allow_pickle=False) as z:
            names = [str(x) for x in z["outcome_names"]]
            missing = [o for o in outcome_names if o not in names]
            if missing:
                raise FedTwinError(f"{f} has no outcome risk for {missing} (it has {names})")
            ids.append(z["person_id"].astype(np.int64))
            risks.append(z["outcome_risk"][:, [names.index(o) for o in outcome_names]].astype(np.float64))
    pid = np.concatenate(ids)
    risk = np.concatenate(risks)
    order = np.argsort(pid, kind="stable")
    if not np.array_equal(pid[order], truth.person_id):
        raise FedTwinError("the truth files changed since the ground truth was loaded", "load it again")
    return risk[order]


def oracle_predictions(
    truth: GroundTruth,
    spec: TwinSpec,
    tensors: CohortTensors,
    matched: MatchedTruth | None = None,
    *,
    name: str = "twin",
    risk: np.ndarray | None = None,
) -> ModelPredictions:
    """The oracle's predictions for the patients of ``tensors`` (see the module docstring).

    ``matched`` (:func:`fedtwin.evaluation.match_truth` of the same patients) supplies the true
    effects when the layout scores plans. ``name`` is the model slot it is scored in (``twin``
    gets the outcome, effect and fairness statistics). ``risk``: :func:`outcome_risk` of
    ``truth`` when already read (it is the same for every cohort of a federation).
    """
    truth.check_spec(spec)
    rows, found = truth.match(tensors.person_ids)
    if tensors.n_patients and not found.all():
        raise FedTwinError(
            f"{int((~found).sum())} patients of the cohort have no ground truth: the oracle exists only for synthetic patients",
            "score the oracle on the cohort of the `fedtwin synth` run that wrote this ground truth",
        )
    mean = truth.plan_states[rows, truth.plan_names.index(RECORDED)].astype(np.float64)  # (N, F, V)
    sd = np.where(OBS_RELATIVE, OBS_SD * np.abs(mean), np.broadcast_to(OBS_SD, mean.shape))
    sd = np.maximum(sd, 1e-6)
    all_risk = outcome_risk(truth, spec.outcome_names) if risk is None else risk
    effect = matched.effect.astype(np.float64) if matched is not None else None
    return ModelPredictions(name=name, mean=mean, std=sd, space="canonical", g_mean=mean, g_std=sd,
                            risk=all_risk[rows], effect=effect)


def oracle_statistics(
    truth: GroundTruth,
    spec: TwinSpec,
    tensors: CohortTensors,
    layout: EvaluationLayout,
    matched: MatchedTruth | None = None,
    *,
    risk: np.ndarray | None = None,
) -> TwinEvaluationStats:
    """The oracle's additive statistics on ``tensors``, in the ``twin`` slot of ``layout`` (which
    must score the twin only): they add across sites like any site's, so the oracle row of a
    federation is computed exactly as the trained twins' rows are."""
    if layout.models != ("twin",):
        raise FedTwinError(f"the oracle fills the twin slot of a twin-only layout, got models {list(layout.models)}")
    if layout.plans and matched is None:
        raise FedTwinError("the layout scores what-if plans: pass the matched ground truth")
    member = membership_matrix(layout, tensors, SubgroupConfig.from_fairness(spec.fairness))
    pred = oracle_predictions(truth, spec, tensors, matched if layout.plans else None, risk=risk)
    norm = Normalizer.from_spec(spec, TwinConfig().dose_log_scale)  # unused by canonical-space predictions
    stats = model_statistics(layout, pred, tensors, member, norm, matched if layout.plans else None)
    return TwinEvaluationStats(layout, _counts(layout, tensors, member, matched if layout.plans else None), (stats,))
