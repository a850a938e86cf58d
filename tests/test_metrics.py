"""Federated evaluation metrics: the additive-statistics algebra, agreement with direct
computation on pooled data, CI sanity, calibration fit, subgroup labels and suppression.

All real numpy/scipy/sklearn; simulated data only (no patient rows anywhere).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from fedtwin.metrics import (
    SUPPRESSED,
    EffectInputs,
    EvaluationStats,
    ForecastInputs,
    ForecastStats,
    MetricsLayout,
    MetricsLayoutError,
    OutcomeInputs,
    OutcomeStats,
    SubgroupConfig,
    age_band_labels,
    auprc,
    auroc,
    calibration_intercept,
    calibration_slope,
    clustered_mean,
    ece,
    fit_recalibration,
    forecast_metrics,
    group_gap,
    group_metrics,
    metrics_report,
    oe_ratio,
    subgroup_membership,
    subgroup_names,
    suppressed_groups,
    tpr_fpr,
    vector_size,
    wilson_interval,
)
from fedtwin.metrics.outcome import logit, score_bins
from fedtwin.metrics.result import MetricResult

H, VARS, OUTCOMES = 3, ("hr", "sbp"), ("death", "icu")


def make_layout(**kw) -> MetricsLayout:
    base = dict(
        variable_names=VARS,
        horizon=H,
        outcome_names=OUTCOMES,
        effect_variable_names=("sbp",),
        subgroup_names=subgroup_names(CONFIG),
    )
    base.update(kw)
    return MetricsLayout(**base)


RACES = ("white", "black", "asian", "other")
CONFIG = SubgroupConfig(race_levels=RACES)


def simulate_site(rng: np.random.Generator, n: int, *, shift: float = 0.0, race_p=(0.6, 0.25, 0.1, 0.05)):
    """One site's predictions, truths and attributes; errors correlated within patient."""
    v = len(VARS)
    y = rng.normal(shift, 1.0, size=(n, H, v))
    patient_effect = rng.normal(0, 0.5, size=(n, 1, v))
    mean = y + patient_effect + rng.normal(0, 0.8, size=(n, H, v))
    std = rng.uniform(0.6, 1.3, size=(n, H, v))
    mask = rng.random((n, H, v)) < 0.8
    y = np.where(mask, y, 0.0)
    x = rng.normal(-1.0, 1.5, size=(n, len(OUTCOMES)))
    risk = 1 / (1 + np.exp(-x))
    event = rng.random(risk.shape) < risk
    omask = rng.random(risk.shape) < 0.95
    true_eff = rng.normal(size=(n, H, 1))
    pred_eff = true_eff + rng.normal(0, 0.3, size=(n, H, 1))
    attrs = dict(
        sex=rng.choice(["F", "M"], n),
        age=rng.uniform(10, 95, n),
        race=rng.choice(RACES, n, p=list(race_p)),
    )
    return (
        ForecastInputs(y, mean, std, mask),
        OutcomeInputs(event, risk, omask),
        EffectInputs(true_eff, pred_eff, mask[:, :, 1:]),
        attrs,
    )


def site_stats(layout, site) -> EvaluationStats:
    f, o, e, attrs = site
    names, member = subgroup_membership(CONFIG, **attrs)
    return EvaluationStats.from_inputs(layout, member, names=names, forecast=f, outcome=o, effect=e)


def pooled(site_a, site_b):
    cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
    fa, oa, ea, aa = site_a
    fb, ob, eb, ab = site_b
    return (
        ForecastInputs(*(cat(getattr(fa, k), getattr(fb, k)) for k in ("y_true", "mean", "std", "mask"))),
        OutcomeInputs(cat(oa.event, ob.event), cat(oa.risk, ob.risk), cat(oa.mask, ob.mask)),
        EffectInputs(*(cat(getattr(ea, k), getattr(eb, k)) for k in ("true_effect", "pred_effect", "mask"))),
        {k: cat(aa[k], ab[k]) for k in aa},
    )


@pytest.fixture(scope="module")
def two_sites():
    rng = np.random.default_rng(7)
    layout = make_layout()
    a = simulate_site(rng, 700)
    b = simulate_site(rng, 500, shift=0.3)
    return layout, a, b


def close(x: float, y: float, tol: float = 1e-12) -> bool:
    if np.isnan(x) and np.isnan(y):
        return True
    return abs(x - y) <= tol * max(1.0, abs(x), abs(y))


# -- layout and vector algebra ---------------------------------------------------------------


def test_layout_validation_and_exchange():
    layout = make_layout()
    assert MetricsLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert layout.fingerprint() == make_layout().fingerprint()
    assert layout.fingerprint() != make_layout(n_score_bins=100).fingerprint()
    with pytest.raises(MetricsLayoutError):
        make_layout(variable_names=("hr", "hr"))
    with pytest.raises(MetricsLayoutError):
        make_layout(interval_levels=(0.9, 0.5))
    with pytest.raises(MetricsLayoutError):
        make_layout(horizon=0)


def test_vector_round_trip_and_additivity(two_sites):
    layout, a, b = two_sites
    sa, sb = site_stats(layout, a), site_stats(layout, b)
    va, vb = sa.to_vector(), sb.to_vector()
    assert va.dtype == np.float64 and va.shape == (vector_size(layout),)
    # the vector of the sum is the sum of the vectors, bit for bit
    assert np.array_equal((sa + sb).to_vector(), va + vb)
    # from_vector inverts to_vector, and rebuilds summed statistics
    template = EvaluationStats.zeros(layout)
    assert np.array_equal(EvaluationStats.from_vector(template, va).to_vector(), va)
    rebuilt = EvaluationStats.from_vector(template, va + vb)
    assert np.array_equal(rebuilt.to_vector(), (sa + sb).to_vector())
    # zeros are the identity; sum() works from 0
    assert np.array_equal((sa + sa.zeros_like()).to_vector(), va)
    assert np.array_equal(sum([sa, sb]).to_vector(), va + vb)
    # segments tile the vector in order, named by subgroup
    segs = sa.segments()
    assert segs[0].offset == 0 and sum(s.size for s in segs) == va.size
    assert all(s1.offset + s1.size == s2.offset for s1, s2 in zip(segs, segs[1:]))
    assert any(s.name.startswith("subgroups.groups[sex=F].outcome.hist_pos") for s in segs)
    # sites with no patient in a subgroup still produce the full layout
    tiny = site_stats(layout, simulate_site(np.random.default_rng(1), 3))
    assert tiny.to_vector().shape == va.shape


def test_layout_mismatch_is_refused(two_sites):
    layout, a, _ = two_sites
    other = make_layout(n_score_bins=100)
    sa = site_stats(layout, a)
    with pytest.raises(MetricsLayoutError):
        _ = sa + EvaluationStats.zeros(other)
    with pytest.raises(MetricsLayoutError):
        EvaluationStats.from_vector(EvaluationStats.zeros(other), sa.to_vector())
    with pytest.raises(MetricsLayoutError):
        EvaluationStats.from_vector(EvaluationStats.zeros(layout), np.full(vector_size(layout), np.nan))


# -- pooled equality and direct computation ----------------------------------------------------


def test_two_sites_added_equal_pooled_metrics(two_sites):
    layout, a, b = two_sites
    summed = site_stats(layout, a) + site_stats(layout, b)
    pool = site_stats(layout, pooled(a, b))
    # vectors agree up to float summation order; counts and histograms exactly
    assert np.allclose(summed.to_vector(), pool.to_vector(), rtol=1e-12, atol=1e-9)
    assert np.array_equal(summed.overall.outcome.hist_pos, pool.overall.outcome.hist_pos)
    pairs = [(summed.overall, pool.overall, True)]
    # every subgroup block is already compared through the vectors; metrics on a spread of them
    pairs += [(gs, gp, False) for gs, gp in zip(summed.subgroups.groups[::4], pool.subgroups.groups[::4])]
    for gs, gp, cells in pairs:
        ms = group_metrics(gs, thresholds=(0.3,), cells=cells)
        mp = group_metrics(gp, thresholds=(0.3,), cells=cells)
        assert ms.keys() == mp.keys()
        for key, r in ms.items():
            # the Newton fit converges to the same optimum from sums that differ in the last bits
            tol = 1e-8 if key[-1].startswith("calibration") else 1e-12
            for attr in ("value", "ci_low", "ci_high"):
                assert close(getattr(r, attr), getattr(mp[key], attr), tol), (key, attr)
            assert (r.n, r.n_patients, r.disclosure_count) == (mp[key].n, mp[key].n_patients, mp[key].disclosure_count)
    # histogram-based metrics are bit-identical
    for o in OUTCOMES:
        assert auroc(summed.overall.outcome, o).value == auroc(pool.overall.outcome, o).value


def test_forecast_metrics_match_direct_computation(two_sites):
    layout, a, _ = two_sites
    f = a[0]
    m = forecast_metrics(ForecastStats.from_inputs(layout, f))
    err = f.y_true - f.mean
    nll = norm.logpdf(f.y_true, f.mean, f.std) * -1
    for vi, v in enumerate(VARS):
        for h in range(H):
            sel = f.mask[:, h, vi]
            e = err[sel, h, vi]
            assert close(m[("forecast", v, f"h{h + 1}", "rmse")].value, float(np.sqrt(np.mean(e**2))))
            assert close(m[("forecast", v, f"h{h + 1}", "nll")].value, float(np.mean(nll[sel, h, vi])), 1e-10)
            inside90 = np.abs(e) <= norm.ppf(0.95) * f.std[sel, h, vi]
            r = m[("forecast", v, f"h{h + 1}", "coverage_90")]
            assert close(r.value, float(inside90.mean())) and r.n == sel.sum()
        sel = f.mask[:, :, vi]
        assert close(m[("forecast", v, "all", "rmse")].value, float(np.sqrt(np.mean(err[:, :, vi][sel] ** 2))))
        assert m[("forecast", v, "all", "rmse")].n_patients == int(sel.any(axis=1).sum())
    assert close(m[("forecast", "all", "all", "mae")].value, float(np.mean(np.abs(err[f.mask]))))


def test_outcome_metrics_match_direct_computation(two_sites):
    layout, a, _ = two_sites
    o = a[1]
    stats = OutcomeStats.from_inputs(layout, o)
    for j, name in enumerate(OUTCOMES):
        y, p = o.event[o.mask[:, j], j], o.risk[o.mask[:, j], j]
        assert close(group_metrics_brier(stats, name), brier_score_loss(y, p))
        assert close(oe_ratio(stats, name).value, y.sum() / p.sum())
        bins = score_bins(p, 10)
        direct_ece = sum(abs(y[bins == c].sum() - p[bins == c].sum()) for c in range(10)) / len(y)
        assert close(ece(stats, name).value, direct_ece)
        tpr, fpr = tpr_fpr(stats, name, 0.301)  # snapped to the edge 0.3 (B = 200)
        assert tpr.params["threshold"] == 0.3
        assert close(tpr.value, float(np.mean(p[y] >= 0.3))) and close(fpr.value, float(np.mean(p[~y] >= 0.3)))
        assert tpr.n_events == y.sum() and fpr.n_non_events == (~y).sum()


def group_metrics_brier(stats: OutcomeStats, name: str) -> float:
    from fedtwin.metrics import brier

    return brier(stats, name).value


# -- binned AUROC / AUPRC against sklearn -------------------------------------------------------


def _one_outcome_stats(y: np.ndarray, p: np.ndarray, bins: int = 200) -> OutcomeStats:
    layout = MetricsLayout(variable_names=("x",), horizon=1, outcome_names=("o",), n_score_bins=bins)
    return OutcomeStats.from_arrays(layout, y[:, None], p[:, None])


@pytest.mark.parametrize("seed,prevalence", [(0, 0.5), (1, 0.1), (2, 0.02)])
def test_binned_auroc_and_auprc_close_to_sklearn(seed, prevalence):
    rng = np.random.default_rng(seed)
    n = 6000
    y = rng.random(n) < prevalence
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.2 * y - 2.0)))
    stats = _one_outcome_stats(y, p)
    # exact: Mann-Whitney / step-wise AP of the binned scores (ties = same bin)
    b = score_bins(p, 200)
    assert close(auroc(stats, "o").value, roc_auc_score(y, b))
    assert close(auprc(stats, "o").value, average_precision_score(y, b))
    # approximate: continuous scores, within bin resolution (AUROC) / a stated tolerance (AUPRC)
    assert abs(auroc(stats, "o").value - roc_auc_score(y, p)) < 0.005
    assert abs(auprc(stats, "o").value - average_precision_score(y, p)) < 0.01


def test_delong_se_matches_direct_placement_values():
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + y)))
    stats = _one_outcome_stats(y, p, bins=50)
    s = score_bins(p, 50).astype(float)
    pos, neg = s[y], s[~y]
    cmp = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    a = cmp.mean()
    v10, v01 = cmp.mean(axis=1), cmp.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    r = auroc(stats, "o", method="delong")
    assert close(r.value, a)
    assert close((r.ci_high - r.ci_low) / (2 * norm.ppf(0.975)), se, 1e-10)
    hm = auroc(stats, "o")
    assert abs((hm.ci_high - hm.ci_low) - (r.ci_high - r.ci_low)) < 0.3 * (r.ci_high - r.ci_low)


# -- CI sanity ----------------------------------------------------------------------------------


def test_wilson_interval_coverage():
    rng = np.random.default_rng(11)
    p, n, reps = 0.08, 60, 2000
    k = rng.binomial(n, p, reps)
    lo, hi = wilson_interval(k, np.full(reps, n))
    assert 0.92 <= np.mean((lo <= p) & (p <= hi)) <= 0.98
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and 0 < hi0 < 0.2


def test_auroc_ci_coverage_hanley_mcneil_and_delong():
    rng = np.random.default_rng(12)
    true_auc = norm.cdf(1.0 / np.sqrt(2))  # binormal, separation 1
    hits = {"hanley_mcneil": 0, "delong": 0}
    reps = 300
    for _ in range(reps):
        s = np.r_[rng.normal(1, 1, 120), rng.normal(0, 1, 240)]
        y = np.r_[np.ones(120, bool), np.zeros(240, bool)]
        stats = _one_outcome_stats(y, 1 / (1 + np.exp(-s / 2)))
        for method in hits:
            r = auroc(stats, "o", method=method)
            hits[method] += r.ci_low <= true_auc <= r.ci_high
    for method, h in hits.items():
        assert h / reps >= 0.89, method


def test_clustered_rmse_ci_covers_with_within_patient_correlation():
    """Pooled over steps, errors of one patient are correlated; the cluster-robust CI still covers."""
    rng = np.random.default_rng(13)
    layout = MetricsLayout(variable_names=("x",), horizon=8)
    true_mse = 0.8**2 + 0.6**2
    hits = wider = 0
    reps = 150
    for _ in range(reps):
        n = 120
        err = rng.normal(0, 0.8, (n, 1, 1)) + rng.normal(0, 0.6, (n, 8, 1))
        mask = np.ones((n, 8, 1), bool)
        st = ForecastStats.from_arrays(layout, err, np.zeros_like(err), np.ones_like(err), mask)
        r = forecast_metrics(st, cells=False)[("forecast", "x", "all", "rmse")]
        hits += r.ci_low**2 <= true_mse <= r.ci_high**2
        s = st.level("variable")
        _, var_cl, var_iid = s.mean(st.qi("sq_err"))
        wider += bool(var_cl[0] > var_iid[0])
    assert hits / reps >= 0.88
    assert wider / reps > 0.9  # the naive i.i.d. variance would be too small


def test_clustered_mean_reduces_to_iid_variance_for_single_observations():
    rng = np.random.default_rng(14)
    q = rng.normal(size=50)
    m, var = clustered_mean(50, 50, 50, q.sum(), (q**2).sum(), q.sum())
    assert close(float(m), q.mean()) and close(float(var), q.var(ddof=1) / 50)


# -- calibration --------------------------------------------------------------------------------


def _exact_logistic(x: np.ndarray, y: np.ndarray, offset: bool = False) -> np.ndarray:
    """Individual-level IRLS, the reference the binned fit approximates."""
    X = np.ones((len(x), 1)) if offset else np.c_[np.ones(len(x)), x]
    beta = np.zeros(X.shape[1])
    for _ in range(50):
        eta = X @ beta + (x if offset else 0.0)
        mu = 1 / (1 + np.exp(-eta))
        w = mu * (1 - mu)
        beta = beta + np.linalg.solve(X.T @ (X * w[:, None]), X.T @ (y - mu))
    return beta


def test_calibration_slope_intercept_on_calibrated_and_overconfident_data():
    rng = np.random.default_rng(21)
    n = 20000
    x = rng.normal(-1.0, 1.5, n)
    y = rng.random(n) < 1 / (1 + np.exp(-x))
    calibrated = _one_outcome_stats(y, 1 / (1 + np.exp(-x)))
    slope, intercept = calibration_slope(calibrated, "o"), calibration_intercept(calibrated, "o")
    assert abs(slope.value - 1) < 0.05 and slope.ci_low <= 1 <= slope.ci_high
    assert abs(intercept.value) < 0.05 and intercept.ci_low <= 0 <= intercept.ci_high
    over = _one_outcome_stats(y, 1 / (1 + np.exp(-2 * x)))  # logits doubled: too extreme
    s_over = calibration_slope(over, "o")
    assert s_over.value < 1 and s_over.ci_high < 1 and abs(s_over.value - 0.5) < 0.05
    under = _one_outcome_stats(y, 1 / (1 + np.exp(-0.5 * x)))
    assert calibration_slope(under, "o").ci_low > 1


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.6])
def test_binned_recalibration_fit_close_to_exact_fit(scale):
    rng = np.random.default_rng(22)
    n = 8000
    x_true = rng.normal(-1.5, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-x_true))).astype(float)
    p = 1 / (1 + np.exp(-scale * x_true + 0.3))
    stats = _one_outcome_stats(y.astype(bool), p)
    x = logit(p)
    a_exact, b_exact = _exact_logistic(x, y)
    (a1_exact,) = _exact_logistic(x, y, offset=True)
    fit = fit_recalibration(stats.rc_n[0], stats.rc_sum_x[0], stats.rc_sum_x2[0], stats.rc_sum_y[0], stats.rc_sum_yx[0])
    assert fit.converged
    assert abs(fit.slope - b_exact) < 0.003 and abs(fit.intercept - a_exact) < 0.003
    assert abs(calibration_intercept(stats, "o").value - a1_exact) < 0.003


def test_recalibration_without_both_classes_is_undefined():
    stats = _one_outcome_stats(np.zeros(50, bool), np.linspace(0.01, 0.9, 50))
    assert np.isnan(calibration_slope(stats, "o").value)
    assert np.isnan(auroc(stats, "o").value)


def test_recalibration_slope_of_nearly_equal_risks_is_not_estimable_but_the_intercept_is():
    """Risks within 0.5 % of each other in logit (a barely trained twin) gave a slope of -142 whose
    CI moved by 1 % with the 2^-20 rounding of the federated sums: not a number to report."""
    from fedtwin.metrics.calibration import MIN_LOGIT_SD

    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    for sd, estimable in ((0.005, False), (MIN_LOGIT_SD * 0.9, False), (MIN_LOGIT_SD * 1.2, True)):
        x = -0.85 + sd * rng.standard_normal(400)
        x = -0.85 + (x - x.mean()) * sd / x.std()  # exactly this spread
        stats = _one_outcome_stats(y, 1 / (1 + np.exp(-x)))
        assert np.isfinite(calibration_slope(stats, "o").value) == estimable, sd
        assert np.isfinite(calibration_intercept(stats, "o").value)


# -- subgroup labels ----------------------------------------------------------------------------


def test_subgroup_names_are_fixed_and_membership_is_correct():
    assert age_band_labels((18, 45, 65, 80)) == ("<18", "18-45", "45-65", "65-80", "80+")
    names = subgroup_names(CONFIG)
    assert names[:2] == ("sex=F", "sex=M") and "age=65-80" in names and "race=black" in names
    assert "sex=F&age=65-80" in names and "age=65-80&race=black" in names
    assert len(names) == len(set(names)) == 2 + 5 + 4 + 2 * 5 + 2 * 4 + 5 * 4
    assert subgroup_names(SubgroupConfig(intersections=False, race=False)) == (
        "sex=F", "sex=M", "age=<18", "age=18-45", "age=45-65", "age=65-80", "age=80+",
    )
    sex = np.array(["F", "M", "F", "U", "F"])
    age = np.array([70.0, 80.0, 17.9, 50.0, np.nan])
    race = np.array(["black", "white", "klingon", "asian", "black"], dtype=object)
    got_names, member = subgroup_membership(CONFIG, sex=sex, age=age, race=race)
    col = {g: member[:, i] for i, g in enumerate(got_names)}
    assert got_names == names
    assert col["sex=F"].tolist() == [True, False, True, False, True]
    assert col["age=80+"].tolist() == [False, True, False, False, False]  # lower edge inclusive
    assert col["age=<18"].tolist() == [False, False, True, False, False]
    assert col["sex=F&age=65-80"].tolist() == [True, False, False, False, False]
    assert not member[3, : names.index("age=<18")].any()  # unknown sex 'U' is in no sex group
    assert not any(col[f"race={r}"][2] for r in CONFIG.race_levels)  # unlisted race: no group
    assert not any(col[g][4] for g in names if g.startswith("age="))  # NaN age: no age group
    # extraction's labels (CohortTensors.subgroups: banded age, 'unknown') give the same matrix
    banded = np.array(["65-80", "80+", "<18", "45-65", "unknown"], dtype=object)
    _, member2 = subgroup_membership(CONFIG, **{"sex": sex, "age": banded, "race": race})
    assert np.array_equal(member, member2)


def test_default_levels_match_extraction_labels():
    cfg = SubgroupConfig()
    assert set(cfg.race_levels) >= {"white", "black", "asian", "american_indian", "pacific_islander", "other"}
    names, member = subgroup_membership(
        cfg,
        sex=np.array(["F", "unknown"], dtype=object),
        age=np.array(["18-45", "80+"], dtype=object),
        race=np.array(["pacific_islander", "unknown"], dtype=object),
    )
    col = dict(zip(names, member.T))
    assert col["sex=F&race=pacific_islander"].tolist() == [True, False]
    assert col["age=80+"].tolist() == [False, True] and not member[1, [names.index("sex=F"), names.index("sex=M")]].any()


def test_subgroup_config_from_fairness_spec():
    from fedtwin.spec.model import FairnessSpec

    cfg = SubgroupConfig.from_fairness(FairnessSpec(race=False, age_bands=[40.0, 70.0]), sex_levels=("F", "M"))
    assert subgroup_names(cfg) == (
        "sex=F", "sex=M", "age=<40", "age=40-70", "age=70+",
        "sex=F&age=<40", "sex=F&age=40-70", "sex=F&age=70+",
        "sex=M&age=<40", "sex=M&age=40-70", "sex=M&age=70+",
    )


# -- suppression --------------------------------------------------------------------------------


def _leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    else:
        yield node


def test_small_subgroup_is_suppressed_and_nothing_leaks():
    layout = make_layout()
    rng = np.random.default_rng(31)
    f, o, e, attrs = simulate_site(rng, 1500, race_p=(0.6, 0.3, 0.097, 0.003))
    n_other = int((attrs["race"] == "other").sum())
    assert 0 < n_other < 10
    stats = site_stats(layout, (f, o, e, attrs))
    report = metrics_report(stats, thresholds=(0.3,))
    text = json.dumps(report, allow_nan=False)  # strictly valid JSON
    small = report["subgroups"]["race=other"]
    leaves = list(_leaves(small))
    assert leaves and all(leaf == SUPPRESSED for leaf in leaves)
    for g, row in report["subgroups"].items():
        if "race=other" in g:
            assert all(leaf == SUPPRESSED for leaf in _leaves(row)), g
    # the group's raw numbers appear nowhere in the output
    raw = group_metrics(stats.subgroups.group("race=other"), cells=False, thresholds=(0.3,))
    continuous = {"rmse", "mae", "nll", "bias", "brier"}  # values that cannot coincide by chance
    checked = 0
    for key, r in raw.items():
        if key[-1] in continuous and r.defined:
            for x in (r.value, r.ci_low, r.ci_high):
                if x != 0.0:
                    assert json.dumps(x) not in text
            checked += 1
    assert checked > 10
    # excluded from gaps: AUROC gap over the race family is max - min of the shown groups only
    race_gap = report["fairness"]["auroc"]["death"]["race"]
    assert "race=other" in race_gap["excluded"]
    shown = {g: report["subgroups"][g]["outcome"]["death"]["auroc"] for g in ("race=white", "race=black", "race=asian")}
    values = [v["value"] for v in shown.values() if v != SUPPRESSED]
    assert race_gap["groups"] == len(values) >= 2
    assert close(race_gap["gap"], max(values) - min(values))
    # complementary rule: with exactly one race suppressed, the next-smallest is suppressed too
    assert shown["race=asian"] == SUPPRESSED
    assert race_gap["worst_group"] != "race=other" and race_gap["best_group"] != "race=other"


def test_suppression_uses_events_and_non_events_where_relevant():
    layout = MetricsLayout(
        variable_names=("x",), horizon=1, outcome_names=("o",), subgroup_names=("sex=F", "sex=M")
    )
    rng = np.random.default_rng(32)
    n = 400
    sex = np.where(np.arange(n) < 200, "F", "M")
    risk = rng.uniform(0.01, 0.99, n)
    event = np.zeros(n, bool)
    event[:60] = True  # F: 60 events; M: 0 events
    event[200:205] = True  # M: 5 events, 195 non-events
    names, member = subgroup_membership(SubgroupConfig(race=False, age_bands=(), intersections=False), sex=sex)
    stats = EvaluationStats.from_inputs(layout, member, names=names, outcome=OutcomeInputs(event[:, None], risk[:, None]))
    report = metrics_report(stats, thresholds=(0.5,), complementary=False)
    m, fem = report["subgroups"]["sex=M"]["outcome"]["o"], report["subgroups"]["sex=F"]["outcome"]["o"]
    assert m["auroc"] == m["brier"] == m["calibration_slope"] == m["tpr@0.5"] == SUPPRESSED
    assert isinstance(m["fpr@0.5"], dict) and m["fpr@0.5"]["n"] == 195  # enough non-events
    assert isinstance(fem["auroc"], dict) and fem["auroc"]["n_events"] == 60
    eo = report["fairness"]["equalized_odds"]["o"]["0.5"]["sex"]
    assert eo["tpr_gap"] is None and eo["difference"] is None and eo["fpr_gap"] is not None
    # with the complementary rule, hiding sex=M's AUROC hides sex=F's too (overall - F = M)
    full = metrics_report(stats, thresholds=(0.5,))
    assert full["subgroups"]["sex=F"]["outcome"]["o"]["auroc"] == SUPPRESSED


def test_suppressed_groups_rules():
    counts = {"": 500, "sex=F": 300, "sex=M": 195, "race=a": 400, "race=b": 95, "race=c": 5}
    assert suppressed_groups(counts, complementary=False) == {"race=c"}
    assert suppressed_groups(counts) == {"race=c", "race=b"}
    # intersections: a hidden cell forces a second hidden cell in its row and column
    cross = {
        "sex=F": 100, "sex=M": 100, "age=a": 100, "age=b": 100,
        "sex=F&age=a": 3, "sex=F&age=b": 97, "sex=M&age=a": 97, "sex=M&age=b": 3,
    }
    assert suppressed_groups(cross) == {"sex=F&age=a", "sex=F&age=b", "sex=M&age=a", "sex=M&age=b"}
    assert suppressed_groups({"sex=F": 20, "sex=M": 30}) == set()
    with pytest.raises(ValueError):
        suppressed_groups(counts, 0)


def test_group_gap_excludes_suppressed_and_needs_two_groups():
    def r(v):
        return MetricResult("auroc", v, v, v, n=100, n_patients=100, disclosure_count=50, method="x")

    gap = group_gap({"a": r(0.7), "b": r(0.8), "c": SUPPRESSED, "d": r(0.75)})
    assert gap["worst_group"] == "a" and close(gap["gap"], 0.1) and gap["excluded"] == ["c"]
    assert group_gap({"a": r(0.7), "c": SUPPRESSED})["gap"] is None
    assert group_gap({"a": r(0.2), "b": r(0.4)}, higher_is_better=False)["worst_group"] == "b"


# -- input validation ---------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    layout = make_layout()
    y = np.zeros((4, H, 2))
    mask = np.ones((4, H, 2), bool)
    with pytest.raises(ValueError):
        ForecastStats.from_arrays(layout, y, y, np.zeros_like(y), mask)  # std 0
    with pytest.raises(ValueError):
        ForecastStats.from_arrays(layout, y, np.full_like(y, np.nan), np.ones_like(y), mask)
    with pytest.raises(MetricsLayoutError):
        ForecastStats.from_arrays(layout, y[:, :2], y[:, :2], np.ones_like(y[:, :2]), mask[:, :2])
    # unobserved entries may hold anything
    bad = np.full_like(y, np.nan)
    st = ForecastStats.from_arrays(layout, y, bad, bad, np.zeros_like(mask))
    assert st.n.sum() == 0 and np.all(np.isfinite(st.to_vector()))
    with pytest.raises(ValueError):
        OutcomeStats.from_arrays(layout, np.zeros((3, 2)), np.full((3, 2), 1.5))


def test_effect_metrics_and_chisq_rmse_option(two_sites):
    layout, a, _ = two_sites
    e = a[2]
    from fedtwin.metrics import EffectStats, effect_metrics

    stats = EffectStats.from_inputs(layout, e)
    err = (e.pred_effect - e.true_effect)[e.mask]
    normal = effect_metrics(stats)
    chisq = effect_metrics(stats, rmse_method="chisq")
    assert close(normal[("effect", "sbp", "all", "mae")].value, float(np.mean(np.abs(err))))
    assert close(normal[("effect", "sbp", "all", "rmse")].value, float(np.sqrt(np.mean(err**2))))
    for key in (("effect", "sbp", "h1", "rmse"), ("effect", "sbp", "all", "rmse")):
        rn, rc = normal[key], chisq[key]
        assert rc.ci_low < rc.value < rc.ci_high and rn.ci_low < rn.value < rn.ci_high
        # normal errors: the two intervals nearly agree
        assert abs((rc.ci_high - rc.ci_low) - (rn.ci_high - rn.ci_low)) < 0.25 * (rn.ci_high - rn.ci_low)
    # no effect variables in the layout: no effect metrics at all
    assert not effect_metrics(EffectStats.zeros(make_layout(effect_variable_names=())))


# -- fairness from securely aggregated statistics -------------------------------------------------
#
# The evaluation report (fedtwin.evaluation) is what the coordinator decodes from the SecAgg+ sum:
# a site's TwinEvaluationStats are built here from simulated predictions (twin only; the "dist"
# block gets its own predictive std), two sites are summed and compared with the pooled patients.


def _twin_site_stats(site, *, dist_scale: float = 1.2):
    from fedtwin.evaluation import EvaluationLayout, TwinEvaluationStats
    from fedtwin.evaluation.stats import CohortCounts, ModelStats

    f, o, _, attrs = site
    layout = EvaluationLayout(
        spec_hash="test", variable_names=VARS, horizon=H, outcome_names=OUTCOMES,
        subgroup_names=subgroup_names(CONFIG), models=("twin",),
    )
    names, member = subgroup_membership(CONFIG, **attrs)
    point = EvaluationStats.from_inputs(layout.point_layout("twin"), member, names=names, forecast=f, outcome=o)
    dist_f = ForecastInputs(f.y_true, f.mean, f.std * dist_scale, f.mask)
    dist = EvaluationStats.from_inputs(layout.dist_layout(), member, names=names, forecast=dist_f)
    ev = np.where(o.mask, o.event, False)
    counts = CohortCounts(
        layout, np.asarray(float(len(ev))), np.asarray(0.0), member.sum(axis=0).astype(float), ev.sum(axis=0).astype(float)
    )
    return TwinEvaluationStats(layout, counts, (ModelStats(point, dist),))


def _gap_dicts(node, path=()):
    """(path, dict) of every gap-like dict in report["fairness"] (group_gap or equalized_odds)."""
    if isinstance(node, dict):
        if "gap" in node or "difference" in node:
            yield path, node
        for k, v in node.items():
            yield from _gap_dicts(v, (*path, k))


def _assert_same(a, b, path="", rel=1e-9):
    """Same structure, same strings (``"suppressed"``, group names), numbers equal to ``rel``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and not isinstance(b, str) and b is not None:
        assert b == pytest.approx(a, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def fair_sites():
    rng = np.random.default_rng(41)
    a = simulate_site(rng, 900, race_p=(0.6, 0.3, 0.095, 0.005))
    b = simulate_site(rng, 700, shift=0.3, race_p=(0.5, 0.35, 0.1, 0.05))
    return a, b


def test_federated_subgroup_metrics_and_fairness_equal_the_pooled_computation(fair_sites):
    from fedtwin.evaluation import evaluation_report
    from fedtwin.federation.round_evaluation import fairness_headline

    a, b = fair_sites
    summed = _twin_site_stats(a) + _twin_site_stats(b)
    pooled_stats = _twin_site_stats(pooled(a, b))
    np.testing.assert_allclose(summed.to_vector(), pooled_stats.to_vector(), rtol=1e-12, atol=1e-9)
    fed = evaluation_report(summed, suppression_threshold=10, decision_threshold=0.3)
    pool = evaluation_report(pooled_stats, suppression_threshold=10, decision_threshold=0.3)
    _assert_same(pool["subgroups"], fed["subgroups"])
    _assert_same(pool["fairness"], fed["fairness"])
    _assert_same(pool["metrics"], fed["metrics"])
    assert fed["decision_threshold"] == pool["decision_threshold"] == 0.3
    head_fed, head_pool = fairness_headline(fed), fairness_headline(pool)
    assert head_fed.keys() == head_pool.keys()
    for k in head_fed:
        assert head_fed[k] == pytest.approx(head_pool[k], rel=1e-9, abs=1e-12), k

    # what the issue asks for is there: per subgroup TPR/FPR at the stated threshold, AUROC,
    # ECE, O/E, RMSE and coverage cells with CI and n; gaps with CI and n for each family
    cell = fed["subgroups"]["sex=F"]["metrics"]
    for key in ("tpr.death.twin", "fpr.death.twin", "auroc.death.twin", "ece.death.twin", "oe_ratio.death.twin",
                "rmse.hr.all.twin", "coverage90.all.all.twin", "coverage90.hr.all.twin"):
        c = cell[key]
        assert isinstance(c, dict) and c["value"] is not None and len(c["ci"]) == 2 and c["n_patients"] >= 10, key
    assert cell["tpr.death.twin"]["threshold"] == 0.3 and cell["tpr.death.twin"]["n_events"] >= 10
    assert cell["fpr.death.twin"]["n_non_events"] >= 10
    fair = fed["fairness"]
    assert {"auroc", "equalized_odds", "forecast_rmse", "ece", "oe_ratio", "forecast_coverage_90"} <= fair.keys()
    assert "0.3" in fair["equalized_odds"]["death"]
    for fam in ("sex", "age", "race", "sex&age", "any"):
        for block in (fair["auroc"]["death"], fair["ece"]["death"], fair["oe_ratio"]["icu"],
                      fair["forecast_rmse"]["sbp"], fair["forecast_coverage_90"]["all"]):
            g = block[fam]
            assert g["gap"] is not None and g["gap_ci"][0] <= g["gap"] <= g["gap_ci"][1], fam
            assert g["worst_n"] >= 10 and g["best_n"] >= 10
        eo = fair["equalized_odds"]["death"]["0.3"][fam]
        assert eo["difference_ci"][0] <= eo["difference"] <= eo["difference_ci"][1]
    for name in ("auroc_gap.death.sex", "eod.death.sex-age.thr0.3", "tpr_gap.icu.race.thr0.3", "rmse_gap.hr.age",
                 "coverage90_gap.all.any", "coverage50_gap.sbp.sex", "ece_gap.icu.age", "oe_ratio_gap.death.race",
                 "eod.death.any.thr0.3.ci_low", "fpr_gap.death.age-race.thr0.3.ci_high", "coverage90_gap.all.sex.ci_high"):
        assert name in head_fed, name


def test_gap_headline_holds_only_differences_with_valid_names(fair_sites):
    from fedtwin.evaluation import evaluation_report
    from fedtwin.federation.round_evaluation import fairness_headline

    a, b = fair_sites
    report = evaluation_report(_twin_site_stats(a) + _twin_site_stats(b))
    head = fairness_headline(report)
    pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,199}$")
    assert len(head) > 100
    gaps = {json.dumps(x) for _, g in _gap_dicts(report["fairness"]) for k in ("gap", "difference", "tpr_gap", "fpr_gap")
            if (x := g.get(k)) is not None}
    cis = {json.dumps(c) for _, g in _gap_dicts(report["fairness"]) for k in ("gap_ci", "difference_ci") if g.get(k) for c in g[k]}
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    for name, v in head.items():
        assert pattern.match(name) and pattern.match("fair." + name) and np.isfinite(v), name
        # the coordinator logs them to MLflow as fair.<name>: MLflow's own name rule (no @ or +)
        assert validate_param_and_metric_name("fair." + name) and not path_not_unique("fair." + name), name
        assert name.split(".")[0] in {"auroc_gap", "ece_gap", "oe_ratio_gap", "rmse_gap", "eod", "tpr_gap", "fpr_gap",
                                      "coverage50_gap", "coverage90_gap"}, name
        # every number is a gap/difference (or its CI limit) of the fairness summary, not a group's value
        assert json.dumps(v) in (cis if name.endswith((".ci_low", ".ci_high")) else gaps), name
    assert fairness_headline({}) == {} and fairness_headline({"fairness": {}}) == {}


def _perturb_race(site, race: str, seed: int):
    """The same site with the predictions of one race group's patients replaced at random."""
    f, o, e, attrs = site
    rng = np.random.default_rng(seed)
    rows = attrs["race"] == race
    mean, std, risk = f.mean.copy(), f.std.copy(), o.risk.copy()
    mean[rows] += rng.normal(0, 3.0, size=mean[rows].shape)
    std[rows] *= rng.uniform(0.2, 3.0, size=std[rows].shape)
    risk[rows] = rng.uniform(0, 1, size=risk[rows].shape)
    return ForecastInputs(f.y_true, mean, std, f.mask), OutcomeInputs(o.event, risk, o.mask), e, attrs


def test_a_small_group_never_enters_a_new_cell_or_gap(fair_sites):
    """race=other has < 10 patients (race=asian is hidden with it by the complementary rule):
    re-drawing their predictions at random must not change any race-family gap, any shown cell
    of another race, or any headline number of the race family; their own cells are suppressed."""
    from fedtwin.evaluation import evaluation_report
    from fedtwin.federation.round_evaluation import fairness_headline

    a, _ = fair_sites
    n_other = int((a[3]["race"] == "other").sum())
    assert 0 < n_other < 10
    base = evaluation_report(_twin_site_stats(a), decision_threshold=0.3)
    other = base["subgroups"]["race=other"]
    assert other["n_patients"] == "<10" and set(other["metrics"].values()) == {SUPPRESSED}
    assert any(k.startswith(("tpr.", "fpr.")) for k in other["metrics"])
    for g, row in base["subgroups"].items():
        if "race=other" in g:
            assert set(row["metrics"].values()) == {SUPPRESSED}, g
    # never a worst, best or gap group, always listed as excluded
    n_gaps = 0
    for path, g in _gap_dicts(base["fairness"]):
        for sub in ([g["tpr"], g["fpr"]] if "difference" in g else [g]):
            named = {sub["worst_group"], sub["best_group"], *(sub["gap_groups"] or [])}
            assert not any("race=other" in str(x) for x in named), path
            if path[-1] in ("race", "any") and sub["groups"]:
                assert "race=other" in sub["excluded"], path
                n_gaps += 1
    assert n_gaps > 30
    race = lambda rep: {path: g for path, g in _gap_dicts(rep["fairness"]) if path[-1] == "race"}  # noqa: E731
    race_head = lambda rep: {k: v for k, v in fairness_headline(rep).items() if ".race" in k}  # noqa: E731
    for seed in range(3):
        moved = evaluation_report(_twin_site_stats(_perturb_race(a, "other", seed)), decision_threshold=0.3)
        assert moved["metrics"] != base["metrics"]  # the perturbation is real (the cohort changes)
        _assert_same(race(base), race(moved), rel=0)
        assert race_head(base) == race_head(moved) and race_head(base)
        for g in ("race=white", "race=black", "race=asian"):
            _assert_same(base["subgroups"][g], moved["subgroups"][g], rel=0)
    # the same holds for the complementary-suppressed group wherever it is hidden
    moved = evaluation_report(_twin_site_stats(_perturb_race(a, "asian", 9)), decision_threshold=0.3)
    checked = 0
    for path, g in race(base).items():
        after = race(moved)[path]
        pairs = [(g["tpr"], after["tpr"]), (g["fpr"], after["fpr"])] if "difference" in g else [(g, after)]
        for before, now in pairs:
            if "race=asian" in before["excluded"]:
                assert before == now, path
                checked += 1
    assert checked > 10


def test_rates_are_shown_only_with_enough_events_and_non_events():
    """A group with 5 events and 195 non-events: its FPR is a number in fedtwin.metrics' own
    report (rule 1), but in the evaluation report - which publishes group sizes beside it - TPR and
    FPR are both suppressed and the group enters no equalized-odds gap."""
    from fedtwin.evaluation import EvaluationLayout, TwinEvaluationStats, evaluation_report
    from fedtwin.evaluation.stats import CohortCounts, ModelStats
    from fedtwin.federation.round_evaluation import fairness_headline

    cfg = SubgroupConfig(race=False, age_bands=(), intersections=False)
    rng = np.random.default_rng(33)
    n = 600
    sex = np.where(np.arange(n) < 400, "F", "M")
    risk = rng.uniform(0.01, 0.99, n)
    event = np.zeros(n, bool)
    event[:150] = rng.random(150) < 0.9  # F: plenty of events
    event[400:405] = True  # M: 5 events, 195 non-events
    names, member = subgroup_membership(cfg, sex=sex)
    layout = EvaluationLayout(spec_hash="t", variable_names=("x",), horizon=1, outcome_names=("o",),
                              subgroup_names=names, models=("twin",))
    oi = OutcomeInputs(event[:, None], risk[:, None])
    point = EvaluationStats.from_inputs(layout.point_layout("twin"), member, names=names, outcome=oi)
    loose = metrics_report(point, thresholds=(0.5,), complementary=False)
    assert isinstance(loose["subgroups"]["sex=M"]["outcome"]["o"]["fpr@0.5"], dict)
    stats = TwinEvaluationStats(
        layout,
        CohortCounts(layout, np.asarray(float(n)), np.asarray(0.0), member.sum(0).astype(float), event[None].sum(1).astype(float)),
        (ModelStats(point, EvaluationStats.zeros(layout.dist_layout())),),
    )
    rep = evaluation_report(stats)
    m, f = rep["subgroups"]["sex=M"]["metrics"], rep["subgroups"]["sex=F"]["metrics"]
    assert rep["subgroups"]["sex=M"]["n_patients"] == 200  # the size that would give 200 - 195 = 5 away
    assert m["tpr.o.twin"] == m["fpr.o.twin"] == m["auroc.o.twin"] == SUPPRESSED
    # complementary: F is the only other sex, so the overall minus F would reveal M
    assert f["tpr.o.twin"] == f["fpr.o.twin"] == SUPPRESSED
    assert isinstance(rep["metrics"]["tpr.o.twin"], dict) and rep["metrics"]["tpr.o.twin"]["threshold"] == 0.5
    eo = rep["fairness"]["equalized_odds"]["o"]["0.5"]["sex"]
    assert eo["difference"] is None and eo["fpr_gap"] is None and eo["difference_ci"] is None
    assert not any(k.startswith(("eod.", "fpr_gap.", "tpr_gap.")) for k in fairness_headline(rep))


def test_mover_gap_interval():
    from fedtwin.metrics import mover_difference

    def r(v, lo, hi):
        return MetricResult("x", v, lo, hi, n=100, n_patients=100, disclosure_count=50, method="x")

    # two symmetric Wald intervals: the Wald interval of the difference
    lo, hi = mover_difference(r(0.8, 0.7, 0.9), r(0.5, 0.44, 0.56))
    half = float(np.hypot(0.1, 0.06))
    assert close(lo, 0.3 - half) and close(hi, 0.3 + half)
    # order does not matter (an absolute difference); an interval through 0 folds to [0, .]
    assert mover_difference(r(0.5, 0.44, 0.56), r(0.8, 0.7, 0.9)) == pytest.approx((lo, hi))
    assert mover_difference(r(0.52, 0.4, 0.6), r(0.5, 0.45, 0.7)) == pytest.approx((0.0, float(np.hypot(0.12, 0.2)) - 0.02))
    # asymmetric intervals keep their asymmetry (Newcombe's hybrid score interval for Wilson)
    a, b = MetricResult("tpr", 0.9, *wilson_interval(45, 50), n=50, n_patients=50, disclosure_count=45, method="W"), \
        MetricResult("tpr", 0.6, *wilson_interval(30, 50), n=50, n_patients=50, disclosure_count=30, method="W")
    lo, hi = mover_difference(a, b)
    assert close(lo, 0.3 - float(np.hypot(0.9 - a.ci_low, b.ci_high - 0.6)))
    assert close(hi, 0.3 + float(np.hypot(a.ci_high - 0.9, 0.6 - b.ci_low)))
    assert mover_difference(r(0.5, float("nan"), 0.6), r(0.4, 0.3, 0.5)) is None
    # the gap's CI comes from the two extreme shown groups; O/E worst = farthest from 1 on log scale
    gap = group_gap({"a": r(0.5, 0.4, 0.6), "b": r(1.05, 0.9, 1.2), "c": r(2.2, 1.7, 2.7), "d": SUPPRESSED},
                    ideal=1.0, log=True)
    assert gap["worst_group"] == "c" and gap["best_group"] == "b" and gap["gap_groups"] == ["c", "a"]
    assert gap["gap_ci"] == pytest.approx(list(mover_difference(r(2.2, 1.7, 2.7), r(0.5, 0.4, 0.6))))
    assert gap["excluded"] == ["d"] and gap["worst_n"] == gap["best_n"] == 100
