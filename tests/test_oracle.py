"""``fedtwin.evaluation.oracle``: the simulator's expectation scored through a twin's statistics.

What is asserted, on two small synthetic sites: the oracle's what-if effect error is exactly 0;
its forecast error is the simulator's reading noise (heart rate and MAP RMSE below one reading's
s.d. plus rounding) and its intervals cover at least nominally; its risk is the ground truth's
``outcome_risk`` row of each patient; its statistics add across sites like a twin's; and a
cohort without ground truth is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedtwin.errors import FedTwinError
from fedtwin.evaluation import EvaluationLayout, GroundTruth, evaluation_report, match_truth
from fedtwin.evaluation.oracle import oracle_predictions, oracle_statistics, outcome_risk
from fedtwin.extract.extractor import Extractor, concat
from fedtwin.omop import open_database
from fedtwin.spec import load_spec
from fedtwin.synth import SynthRequest, synthesize

ICU = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"


@dataclass
class Sites:
    out: Path
    spec: object
    truth: GroundTruth
    cohorts: list
    layout: EvaluationLayout


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Sites:
    out = tmp_path_factory.mktemp("oracle") / "synth"
    synthesize(SynthRequest(sites=2, patients=150, seed=9, out=out, workers=1))
    spec = load_spec(ICU)
    truth = GroundTruth.load(out)
    cohorts = [Extractor(open_database(str(out / f"site_{k}.db")), spec).extract() for k in (1, 2)]
    return Sites(out, spec, truth, cohorts, EvaluationLayout.for_spec(spec, models=("twin",), plans=truth.alternatives))


def _matched(s: Sites, t):  # noqa: ANN001, ANN202
    return match_truth(s.truth, s.spec, t.person_ids, np.asarray(t.doses[:, t.history_steps:]), s.layout.plans)


def test_oracle_has_no_effect_error_reading_noise_forecast_error_and_the_true_risk(sites: Sites) -> None:
    t = concat(sites.cohorts)
    stats = oracle_statistics(sites.truth, sites.spec, t, sites.layout, _matched(sites, t))
    m = evaluation_report(stats, suppression_threshold=1, subgroups=False, cells=False)["metrics"]
    effects = [v["value"] for k, v in m.items() if k.startswith("effect_rmse.") and isinstance(v, dict) and v["value"] is not None]
    assert effects and max(effects) == 0.0
    assert m["rmse.heart_rate.all.twin"]["value"] < 3.5  # one reading: s.d. 3, integer rounding
    assert m["rmse.map.all.twin"]["value"] < 4.5  # one reading: s.d. 4
    assert m["coverage90.all.all.twin"]["value"] >= 0.88
    pred = oracle_predictions(sites.truth, sites.spec, t)
    rows, _ = sites.truth.match(t.person_ids)
    assert np.array_equal(pred.risk, outcome_risk(sites.truth, sites.spec.outcome_names)[rows])


def test_oracle_statistics_add_across_sites(sites: Sites) -> None:
    parts = [oracle_statistics(sites.truth, sites.spec, c, sites.layout, _matched(sites, c)) for c in sites.cohorts]
    t = concat(sites.cohorts)
    whole = oracle_statistics(sites.truth, sites.spec, t, sites.layout, _matched(sites, t))
    np.testing.assert_allclose((parts[0] + parts[1]).to_vector(), whole.to_vector(), rtol=1e-9, atol=1e-9)


def test_a_cohort_without_ground_truth_is_refused(sites: Sites) -> None:
    only_site_1 = GroundTruth.load(sites.out / "ground_truth" / "site_1")
    with pytest.raises(FedTwinError, match="no ground truth"):
        oracle_predictions(only_site_1, sites.spec, sites.cohorts[1])
