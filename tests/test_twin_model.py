"""The hybrid twin with real torch and real Opacus (no mocks).

Cohorts come from a small generator below in which the relation under test holds by
construction: drug ``lowerer`` lowers ``glucose`` (log-space relaxation towards a set point
shifted down by an Emax effect), drug ``raiser`` raises ``map``. The synthetic-hospital
generator of fedtwin/synth gets its own integration tests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fedtwin.errors import FedTwinError
from fedtwin.extract.extractor import static_names
from fedtwin.extract.tensors import CohortTensors
from fedtwin.spec import spec_hash
from fedtwin.spec.io import spec_from_dict
from fedtwin.twin import (
    DPSettings,
    FitConfig,
    MechanisticOnlyBaseline,
    PersistenceBaseline,
    PopulationMeanBaseline,
    ResidualOnlyBaseline,
    TwinConfig,
    TwinModel,
    evaluate,
    explain,
    fit,
    forecast,
    get_parameters,
    load_model,
    max_abs_parameter,
    parameter_names,
    plot_what_if,
    save_model,
    set_parameters,
    validate_plan,
    what_if,
)
from fedtwin.twin.batch import hazard_targets, prepare_batch
from fedtwin.twin.parameters import PARAMETER_BOUND
from fedtwin.twin.training import PrivateTrainer

HISTORY, HORIZON = 12, 6


def spec_dict(version: int = 1) -> dict:
    return {
        "name": "toy_twin",
        "version": version,
        "time": {"step": "1h", "history_steps": HISTORY, "horizon_steps": HORIZON},
        "cohort": {"anchor": "first_measurement"},
        "state_variables": [
            {"name": "map", "concept_ids": [1], "canonical_unit": "mm[Hg]",
             "units": [{"concept_id": 8876, "code": "mm[Hg]"}], "plausible_range": [20, 200]},
            {"name": "glucose", "concept_ids": [2], "canonical_unit": "mg/dL",
             "units": [{"concept_id": 8840, "code": "mg/dL"}], "plausible_range": [10, 1500]},
        ],
        "interventions": [
            {"name": "raiser", "concept_ids": [10], "kind": "infusion", "canonical_unit": "ug",
             "dose_units": {"ug": 1.0}, "affects": ["map"]},
            {"name": "lowerer", "concept_ids": [11], "kind": "bolus", "canonical_unit": "[iU]",
             "dose_units": {"[iU]": 1.0}, "affects": ["glucose"]},
        ],
        "outcomes": [
            {"name": "death", "kind": "death", "within_steps": 10},
            {"name": "aki", "kind": "condition", "concept_ids": [197320], "within_steps": 4},
        ],
        "static_covariates": ["age", "sex"],
    }


SPEC = spec_from_dict(spec_dict())


def make_cohort(n: int, seed: int = 0) -> CohortTensors:
    """Patients whose glucose relaxes (in log space) to a set point that ``lowerer`` pushes down
    and whose MAP relaxes to a set point that ``raiser`` pushes up; doses are random (no
    confounding by indication); deaths are likelier when the MAP is low."""
    rng = np.random.default_rng(seed)
    t_total = HISTORY + HORIZON
    s_map = rng.normal(75, 10, n)
    s_glu = np.log(140) + rng.normal(0, 0.25, n)
    k = rng.uniform(0.25, 0.5, n)
    low = (rng.random((n, t_total)) < 0.35) * rng.uniform(2, 12, (n, t_total))
    rai = (rng.random((n, t_total)) < 0.3) * rng.uniform(100, 500, (n, t_total))
    c_low, c_rai = np.zeros(n), np.zeros(n)
    x_map, x_glu = s_map + rng.normal(0, 5, n), s_glu + rng.normal(0, 0.1, n)
    truth = np.zeros((n, t_total, 2))
    for t in range(t_total):
        truth[:, t] = np.stack([x_map, np.exp(x_glu)], axis=1)
        c_low, c_rai = 0.5 * c_low + low[:, t], 0.4 * c_rai + rai[:, t]
        x_map = x_map + k * (s_map + 20 * c_rai / (200 + c_rai) - x_map) + rng.normal(0, 1.0, n)
        x_glu = x_glu + k * (s_glu - 0.7 * c_low / (5 + c_low) - x_glu) + rng.normal(0, 0.02, n)
    mask = np.stack([rng.random((n, t_total)) < 0.9, rng.random((n, t_total)) < 0.6], axis=-1)
    mask[:, 0, :] = True
    values = np.where(mask, truth * np.exp(rng.normal(0, 0.015, truth.shape)), 0.0)
    last = np.full((n, 2), -1.0)
    since = np.zeros((n, t_total, 2), np.float32)
    for t in range(t_total):
        last = np.where(mask[:, t], t, last)
        since[:, t] = np.where(last >= 0, t - last, -1)
    p_death = 1 / (1 + np.exp(-(-3.5 + 0.12 * (65 - truth[:, HISTORY:, 0].mean(axis=1)))))
    death = rng.random(n) < p_death
    aki = rng.random(n) < 0.1
    when = np.stack([np.where(death, rng.uniform(0, 10, n), np.nan), np.where(aki, rng.uniform(0, 4, n), np.nan)], axis=1)
    tensors = CohortTensors(
        spec_hash=spec_hash(SPEC),
        state_names=SPEC.state_names,
        intervention_names=SPEC.intervention_names,
        outcome_names=SPEC.outcome_names,
        static_names=static_names(SPEC),
        history_steps=HISTORY,
        horizon_steps=HORIZON,
        step_seconds=3600.0,
        person_ids=np.arange(1000, 1000 + n, dtype=np.int64),
        values=values.astype(np.float32),
        mask=mask,
        counts=mask.astype(np.int16),
        time_since=since,
        doses=np.stack([rai, low], axis=-1).astype(np.float32),
        outcome_event=np.stack([death, aki], axis=1),
        outcome_time=when.astype(np.float32),
        static=np.stack([rng.uniform(20, 90, n), rng.integers(0, 2, n)], axis=1).astype(np.float32),
        subgroups={"sex": np.where(rng.random(n) < 0.5, "F", "M")},
        index_epoch=np.zeros(n),
    )
    tensors.validate()
    return tensors


@pytest.fixture(scope="module")
def cohort() -> CohortTensors:
    return make_cohort(600, seed=1)


@pytest.fixture(scope="module")
def trained(cohort: CohortTensors) -> TwinModel:
    """A hybrid twin trained without DP (fast) on the first 500 patients."""
    torch.manual_seed(0)
    model = TwinModel(SPEC)
    fit(model, cohort.select(np.arange(500)), FitConfig(epochs=12, batch_size=64, lr=5e-3, seed=0))
    return model


# ---- DP-SGD ---------------------------------------------------------------------------------


def test_trains_under_opacus_and_loss_decreases(cohort: CohortTensors) -> None:
    torch.manual_seed(0)
    model = TwinModel(SPEC)
    data = cohort.select(np.arange(400))
    before = evaluate(model, data)
    dp = DPSettings(noise_multiplier=0.6, max_grad_norm=1.0, sample_rate=0.25, steps=100, accountant="rdp", seed=0)
    report = fit(model, data, FitConfig(lr=1e-2, seed=0), dp)
    after = evaluate(model, data)
    assert report.dp is not None and report.steps == 100 and report.dp.steps == 100
    assert math.isfinite(report.dp.epsilon) and report.dp.epsilon > 0
    assert report.dp.expected_batch_size == pytest.approx(100.0)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["forecast_nll"] < before["forecast_nll"] - 2.0, (before, after)
    # the model is a plain module again: no Opacus hooks or per-sample attributes left behind
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_per_sample_gradients_are_exact_and_clipped() -> None:
    from opacus import GradSampleModule

    data = make_cohort(6, seed=3)
    model = TwinModel(SPEC)
    batch = prepare_batch(data, SPEC, model.norm)

    class Deterministic(torch.nn.Module):  # posterior mean instead of a sample, to compare
        def __init__(self, twin: TwinModel) -> None:
            super().__init__()
            self.twin = twin

        def forward(self, b):  # noqa: ANN001
            return self.twin.objective(self.twin.loss_terms(b, sample=False))

    wrapped = Deterministic(model)
    gsm = GradSampleModule(wrapped)
    with warnings.catch_warnings():  # hooks on layers whose inputs are data (no input gradient)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        gsm(batch).mean().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm._close()
    for name, p in model.named_parameters():
        assert per_sample[name].shape == (6, *p.shape)
    for i in range(6):  # each row's per-sample gradient = the gradient of that patient alone
        model.zero_grad()
        wrapped(batch.select(torch.tensor([i]))).mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)

    # clipping in effect: with no noise, the step's gradient is the mean of clipped per-patient
    # gradients, so its norm is at most max_grad_norm * B / expected batch size
    torch.manual_seed(0)
    model = TwinModel(SPEC)
    data = make_cohort(40, seed=4)
    batch = prepare_batch(data, SPEC, model.norm)
    clip = 1e-3
    trainer = PrivateTrainer(model, 40, DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5, steps=5), lr=1e-3)
    trainer.step(batch)
    raw_norms = torch.stack([p.grad_sample.reshape(40, -1).norm(dim=1) for p in model.parameters()], dim=1).norm(dim=1)
    assert raw_norms.min() > 10 * clip  # the clipping bound really bites
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total <= clip * 40 / 20 * (1 + 1e-4)
    trainer.close()

    # noise in effect: an empty Poisson batch leaves pure noise, std = sigma * C / expected batch
    model = TwinModel(SPEC)
    sigma, clip = 2.0, 0.5
    trainer = PrivateTrainer(model, 40, DPSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.5, steps=5, seed=1), lr=1e-3)
    trainer.step(batch.select(torch.arange(0)))
    head = {id(p) for p in model.hazard.parameters()}
    noise = torch.cat([p.grad.flatten() for p in model.parameters() if id(p) not in head])
    assert noise.std().item() == pytest.approx(sigma * clip / 20, rel=0.1)
    # the outcome head is clipped apart (fedtwin.privacy.group_clipping): its noise is scaled down with it
    head_noise = torch.cat([p.grad.flatten() for p in model.hazard.parameters()])
    assert head_noise.std().item() == pytest.approx(sigma * clip / 20 / trainer.dp.outcome_grad_scale, rel=0.1)
    assert trainer.epsilon() > 0
    trainer.close()


# ---- missing values -------------------------------------------------------------------------


def test_masked_likelihood_ignores_unobserved_placeholders(cohort: CohortTensors) -> None:
    torch.manual_seed(0)
    model = TwinModel(SPEC)
    data = cohort.select(np.arange(32))
    batch = prepare_batch(data, SPEC, model.norm)
    noisy = batch.select(slice(None))
    garbage = torch.randn_like(noisy.y) * 50
    noisy.y = torch.where(noisy.m > 0, noisy.y, garbage)

    def loss_and_grads(b):  # noqa: ANN001
        model.zero_grad()
        loss = model.objective(model.loss_terms(b, sample=False)).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    l1, g1 = loss_and_grads(batch)
    l2, g2 = loss_and_grads(noisy)
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)

    # the same through CohortTensors: values at unobserved entries are never read
    tampered = data.select(np.arange(32))
    tampered.values = np.where(tampered.mask, tampered.values, 999.0).astype(np.float32)
    f1 = forecast(model, data, n_samples=4, seed=0)
    f2 = forecast(model, tampered, n_samples=4, seed=0)
    np.testing.assert_array_equal(f1.mean, f2.mean)


def test_forecast_reads_history_only(cohort: CohortTensors) -> None:
    model = TwinModel(SPEC)
    data = cohort.select(np.arange(16))
    future = data.select(np.arange(16))
    future.values = future.values.copy()
    future.values[:, HISTORY:] = np.where(future.mask[:, HISTORY:], future.values[:, HISTORY:] * 1.5, 0.0)
    future.mask = future.mask.copy()
    future.mask[:, HISTORY:, 1] = False
    future.values[:, HISTORY:, 1] = 0.0
    a, b = forecast(model, data, n_samples=4), forecast(model, future, n_samples=4)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.risk, b.risk)


# ---- forecast, what-if, explanation -----------------------------------------------------------


def test_forecast_api(trained: TwinModel, cohort: CohortTensors) -> None:
    test = cohort.select(np.arange(500, 600))
    f = forecast(trained, test, n_samples=16)
    shape = (100, HORIZON, 2)
    for arr in (f.mean, f.std, f.predicted.lower90, f.predicted.upper90, f.mechanism.mean, f.residual_contribution):
        assert arr.shape == shape and np.all(np.isfinite(arr))
    p = f.predicted
    assert np.all(p.lower90 <= p.lower50) and np.all(p.lower50 <= p.median) and np.all(p.median <= p.upper50) and np.all(p.upper50 <= p.upper90)
    assert np.all(f.std > 0)
    np.testing.assert_allclose(f.mechanism.mean + f.residual_contribution, f.mean)
    assert f.risk.shape == (100, 2) and np.all((f.risk >= 0) & (f.risk <= 1))
    assert f.mechanism_share.shape == (100, 2)
    # the twin beats persistence on the horizon where the mechanism holds
    y, m = test.values[:, HISTORY:], test.mask[:, HISTORY:]
    persist = PersistenceBaseline().fit(cohort.select(np.arange(500))).predict(test)
    for j in range(2):
        twin_rmse = np.sqrt(np.mean((f.mean[..., j] - y[..., j])[m[..., j]] ** 2))
        base_rmse = np.sqrt(np.mean((persist.mean[..., j] - y[..., j])[m[..., j]] ** 2))
        assert twin_rmse < base_rmse, (SPEC.state_names[j], twin_rmse, base_rmse)


def test_a_patients_forecast_does_not_depend_on_who_else_is_in_the_batch(trained: TwinModel, cohort: CohortTensors) -> None:
    """Sites evaluate their own patients, the pooled check evaluates all of them: same numbers."""
    a, b = cohort.select(np.arange(500, 530)), cohort.select(np.arange(530, 560))
    alone = forecast(trained, b, n_samples=16, seed=3)
    pooled = forecast(trained, CohortTensors.concat([a, b]), n_samples=16, seed=3)
    np.testing.assert_array_equal(pooled.mean[30:], alone.mean)
    np.testing.assert_array_equal(pooled.std[30:], alone.std)
    np.testing.assert_array_equal(pooled.risk[30:], alone.risk)
    other_seed = forecast(trained, b, n_samples=16, seed=4)
    assert not np.array_equal(other_seed.mean, alone.mean)  # the draws are random, just keyed by patient


def test_what_if_follows_the_mechanism(trained: TwinModel, cohort: CohortTensors, tmp_path) -> None:  # noqa: ANN001
    patients = list(range(500, 540))
    more = what_if(trained, cohort, {"lowerer": [12.0] * HORIZON}, patients=patients, n_samples=16)
    none = what_if(trained, cohort, {"lowerer": [0.0] * HORIZON}, patients=patients, n_samples=16)
    g = SPEC.state_names.index("glucose")
    diff = more.alternative.mean[:, -1, g] - none.alternative.mean[:, -1, g]
    assert np.mean(diff < 0) >= 0.9, diff
    assert more.affected == ["glucose"]
    # the recorded plan is the same in both runs; MAP, which the lowerer does not act on, barely moves
    np.testing.assert_allclose(more.recorded.mean, none.recorded.mean)
    mp = SPEC.state_names.index("map")
    assert np.abs(more.difference[:, :, mp]).mean() < 1.0  # mm[Hg]
    raise_map = what_if(trained, cohort, {"raiser": [400.0] * HORIZON}, patients=patients, n_samples=16)
    assert np.mean(raise_map.difference[:, -1, mp] > 0) >= 0.9
    assert np.all(raise_map.alternative.std > 0)
    png = plot_what_if(more, tmp_path / "whatif.png", patient=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_validation() -> None:
    model = TwinModel(SPEC)
    data = make_cohort(4, seed=5)
    with pytest.raises(FedTwinError, match="unknown intervention 'aspirin'"):
        what_if(model, data, {"aspirin": [1.0] * HORIZON})
    with pytest.raises(FedTwinError, match="negative dose -1"):
        validate_plan(SPEC, {"lowerer": [1.0, -1.0] + [0.0] * (HORIZON - 2)})
    with pytest.raises(FedTwinError, match=f"3 doses given, the horizon has {HORIZON} bins"):
        validate_plan(SPEC, {"raiser": [1.0, 2.0, 3.0]})
    with pytest.raises(FedTwinError, match="non-empty mapping"):
        validate_plan(SPEC, {})
    with pytest.raises(FedTwinError, match="list of numbers"):
        validate_plan(SPEC, {"raiser": ["a"] * HORIZON})
    with pytest.raises(FedTwinError, match="finite"):
        validate_plan(SPEC, {"raiser": [float("nan")] * HORIZON})
    with pytest.raises(FedTwinError) as info:  # all problems at once
        validate_plan(SPEC, {"aspirin": [1.0], "lowerer": [-2.0] * HORIZON})
    assert "aspirin" in str(info.value) and "negative" in str(info.value)
    with pytest.raises(FedTwinError, match="out of range"):
        what_if(model, data, {"raiser": [1.0] * HORIZON}, patients=[7])


def test_explain(trained: TwinModel, cohort: CohortTensors) -> None:
    out = explain(trained, cohort, patients=[500, 501], n_samples=8)
    assert [e.person_id for e in out] == [1500, 1501]
    e = out[0]
    kinds = [p.kind for p in e.parameters]
    assert kinds.count("set_point") == 2 and kinds.count("rate") == 2 and kinds.count("sensitivity") == 2
    for p in e.parameters:
        assert p.lower90 <= p.estimate <= p.upper90, p
    glu = next(p for p in e.parameters if p.name == "glucose.set_point")
    assert 60 < glu.estimate < 300 and glu.unit == "mg/dL"
    sens = next(p for p in e.parameters if p.name == "lowerer->glucose.sensitivity")
    assert sens.unit == "%" and sens.estimate < 0  # the lowerer lowers glucose
    table = e.table()
    assert "glucose set point" in table and "mg/dL" in table and "risk: death" in table


# ---- baselines ----------------------------------------------------------------------------------


def test_baselines_share_one_interface(trained: TwinModel, cohort: CohortTensors) -> None:
    train, test = cohort.select(np.arange(300)), cohort.select(np.arange(500, 520))
    residual_only = ResidualOnlyBaseline(SPEC, fit_config=FitConfig(epochs=1, batch_size=100))
    for b in (PersistenceBaseline(), PopulationMeanBaseline(), MechanisticOnlyBaseline(trained, n_samples=4), residual_only):
        out = b.fit(train).predict(test)
        assert out.mean.shape == out.std.shape == (20, HORIZON, 2), b.name
        assert np.all(np.isfinite(out.mean)) and np.all(out.std > 0), b.name
    persistence = PersistenceBaseline().fit(train).predict(test)
    last = [test.values[0, :HISTORY, 0][test.mask[0, :HISTORY, 0]][-1]]
    np.testing.assert_allclose(persistence.mean[0, :, 0], last * HORIZON)


# ---- persistence and federation -----------------------------------------------------------------


def test_save_load_round_trip_and_spec_mismatch(trained: TwinModel, cohort: CohortTensors, tmp_path) -> None:  # noqa: ANN001
    path = save_model(trained, tmp_path / "twin.pt")
    loaded = load_model(path, SPEC)
    test = cohort.select(np.arange(500, 510))
    np.testing.assert_array_equal(forecast(trained, test, n_samples=4).mean, forecast(loaded, test, n_samples=4).mean)
    assert loaded.config == trained.config
    assert load_model(path).spec_hash == trained.spec_hash  # the embedded spec suffices
    other = spec_from_dict(spec_dict(version=2))
    with pytest.raises(FedTwinError) as info:
        load_model(path, other)
    assert spec_hash(SPEC) in str(info.value) and spec_hash(other) in str(info.value)
    with pytest.raises(FedTwinError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    other_tensors = make_cohort(4, seed=6)
    other_tensors.spec_hash = spec_hash(other)
    with pytest.raises(FedTwinError, match="spec hash"):
        forecast(trained, other_tensors)



def test_load_refuses_a_tampered_model_file(trained: TwinModel, tmp_path) -> None:  # noqa: ANN001
    """A model file records its parameters digest (the one the chain and the registry record) and a
    digest of its whole content; an edit after saving is refused, naming both digests."""
    import torch

    from fedtwin.provenance import parameters_digest
    from fedtwin.twin import get_parameters
    from fedtwin.twin.io import model_parameters_digest

    path = save_model(trained, tmp_path / "twin.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["parameters_digest"] == parameters_digest(get_parameters(trained)) == model_parameters_digest(load_model(path))

    name = next(iter(dict(trained.named_parameters())))
    edited = dict(payload, state_dict={**payload["state_dict"], name: payload["state_dict"][name] + 0.01})
    torch.save(edited, tmp_path / "weights.pt")
    with pytest.raises(FedTwinError) as info:
        load_model(tmp_path / "weights.pt", SPEC)
    assert "its parameters have digest" in info.value.problem
    assert f"but the file records {payload['parameters_digest']}" in info.value.problem and "tampered" in info.value.fix

    calibration = dict(payload, interval_scale=[2.0] * trained.n_vars)  # not a parameter: the content digest catches it
    torch.save(calibration, tmp_path / "calibration.pt")
    with pytest.raises(FedTwinError, match="its content has digest"):
        load_model(tmp_path / "calibration.pt")

    legacy = {k: v for k, v in payload.items() if k not in ("parameters_digest", "content_digest")}  # files from before the digests
    torch.save(legacy, tmp_path / "legacy.pt")
    assert model_parameters_digest(load_model(tmp_path / "legacy.pt")) == payload["parameters_digest"]

def test_get_set_parameters_round_trip(trained: TwinModel, cohort: CohortTensors) -> None:
    params = get_parameters(trained)
    names = parameter_names(trained)
    assert len(params) == len(names) and all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in params)
    fresh = TwinModel(SPEC)
    assert parameter_names(fresh) == names  # stable order for Flower
    set_parameters(fresh, params)
    for a, b in zip(get_parameters(fresh), params):
        np.testing.assert_array_equal(a, b)
    test = cohort.select(np.arange(500, 510))
    np.testing.assert_array_equal(forecast(trained, test, n_samples=4).mean, forecast(fresh, test, n_samples=4).mean)
    name, biggest = max_abs_parameter(trained)
    assert biggest <= PARAMETER_BOUND < 8.0, (name, biggest)  # inside SecAgg+'s +-8 clipping range
    with torch.no_grad():
        fresh.encoder.mix.weight.fill_(7.5)  # as if a parameter had drifted
    fit(fresh, cohort.select(np.arange(64)), FitConfig(max_steps=1, batch_size=64))
    assert max_abs_parameter(fresh)[1] <= PARAMETER_BOUND  # training projects into the bound
    with pytest.raises(FedTwinError, match="parameter arrays"):
        set_parameters(fresh, params[:-1])
    with pytest.raises(FedTwinError, match="shapes do not match"):
        set_parameters(fresh, [np.zeros((3, 3), np.float32)] + params[1:])
    with pytest.raises(FedTwinError, match="non-finite"):
        set_parameters(fresh, [np.full_like(params[0], np.nan)] + params[1:])


# ---- outcome targets and configuration ----------------------------------------------------------


def test_hazard_targets_windows_tail_and_competing_death() -> None:
    data = make_cohort(3, seed=7)
    data.outcome_event = np.array([[True, False], [False, True], [False, False]])
    data.outcome_time = np.array([[8.5, np.nan], [np.nan, 2.2], [np.nan, np.nan]], np.float32)
    surv, event = hazard_targets(data, SPEC)
    # death at 8.5 bins (window 10, horizon 6): survived bins 0-5 and 2 tail bins, event in the tail
    np.testing.assert_array_equal(surv[0, 0], [1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(event[0, 0], [0, 0, 0, 0, 0, 0, 1])
    # the AKI of the patient who died at 8.5 is censored at the death bin, beyond its 4-bin window
    np.testing.assert_array_equal(surv[0, 1], [1, 1, 1, 1, 0, 0, 0])
    # AKI at 2.2: survived bins 0-1, event in bin 2
    np.testing.assert_array_equal(surv[1, 1], [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(event[1, 1], [0, 0, 1, 0, 0, 0, 0])
    # no event: at risk through the whole window
    np.testing.assert_array_equal(surv[2, 0], [1, 1, 1, 1, 1, 1, 4])


def test_config_validation_and_residual_only_model() -> None:
    with pytest.raises(FedTwinError, match="no dynamics"):
        TwinConfig(mechanism=False, residual=False)
    with pytest.raises(FedTwinError, match="invalid DP settings"):
        DPSettings(noise_multiplier=-1.0, max_grad_norm=1.0, sample_rate=2.0, steps=0)
    model = TwinModel(SPEC, TwinConfig(mechanism=False, mask_model=True))
    data = make_cohort(20, seed=8)
    terms = model.loss_terms(prepare_batch(data, SPEC, model.norm))
    assert torch.all(terms["mask_nll"] > 0)
    assert torch.isfinite(model.objective(terms)).all()
    with pytest.raises(FedTwinError, match="no mechanistic parameters"):
        explain(model, data)
