"""Scoring a trained twin on patients it did not train on, next to baselines, as additive statistics.

Typical flow at a site (docs/evaluation.md)::

    from fedtwin.evaluation import EvaluationLayout, GroundTruth, evaluate_site, evaluation_report

    layout = EvaluationLayout.for_spec(spec, plans=truth.alternatives)   # agreed by every site
    stats = evaluate_site(model, test, train=train, ground_truth=truth, layout=layout)
    vec = stats.to_vector()                        # -> SecAgg+ (sum over sites)
    total = TwinEvaluationStats.from_vector(TwinEvaluationStats.zeros(layout), summed_vec)
    report = evaluation_report(total, suppression_threshold=spec.suppression_threshold)
    report["metrics"]["rmse.map.h03.twin"]         # flat keys: metric.variable.step.model

Modules: :mod:`.layout` (what is scored), :mod:`.truth` (synthetic ground truth),
:mod:`.baselines` (fitted on training data only, or cross-fitted), :mod:`.predictions` (every
model's forecasts, risks and what-if effects), :mod:`.stats` (additive statistics),
:mod:`.report` (flat-key JSON, suppressed), :mod:`.calibration` (split-conformal interval
calibration), :mod:`.plans` (plan files for ``fedtwin twin whatif``).
"""

from fedtwin.evaluation.baselines import EvaluationConfig, FittedBaselines, crossfit_folds, fit_baselines
from fedtwin.evaluation.calibration import calibrate_intervals
from fedtwin.evaluation.layout import MODEL_NAMES, EvaluationLayout
from fedtwin.evaluation.plans import load_plan, parse_plan
from fedtwin.evaluation.predictions import ModelPredictions, baseline_predictions, density_inputs, twin_predictions
from fedtwin.evaluation.report import evaluation_report, metric_key, step_label
from fedtwin.evaluation.stats import ModelStats, TwinEvaluationStats, evaluate_site, model_statistics, site_statistics
from fedtwin.evaluation.truth import GroundTruth, MatchedTruth, match_truth

__all__ = [
    "EvaluationConfig",
    "EvaluationLayout",
    "FittedBaselines",
    "GroundTruth",
    "MODEL_NAMES",
    "MatchedTruth",
    "ModelPredictions",
    "ModelStats",
    "TwinEvaluationStats",
    "baseline_predictions",
    "calibrate_intervals",
    "crossfit_folds",
    "density_inputs",
    "evaluate_site",
    "evaluation_report",
    "fit_baselines",
    "load_plan",
    "match_truth",
    "metric_key",
    "model_statistics",
    "parse_plan",
    "site_statistics",
    "step_label",
    "twin_predictions",
]
