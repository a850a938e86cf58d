"""The twin in the MLflow Model Registry (fedtwin.tracking.registry), on real stores, no mocks.

* a local SQLite store: register a trained ICU twin (specs/icu-hemodynamics.yaml, a small synthetic
  hospital), load it with ``mlflow.pyfunc.load_model("models:/NAME/1")``, forecast and what-if on a
  few patients: the numbers equal fedtwin's own ``forecast``/``what_if``; a tampered parameters file
  is refused with the digest message;
* an ``mlflow server`` on loopback backed by a fresh PostgreSQL database: a RoundTracker run, a
  registration through the server, a load via ``models:/`` and a prediction.

No patient-level row is printed: failures report sizes and maximum differences only.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import REPO
from fedtwin.errors import FedTwinError

SPEC_PATH = REPO / "specs" / "icu-hemodynamics.yaml"
PLAN_PATH = REPO / "specs" / "plans" / "icu-no-vasopressor.yaml"
PLAN = "no vasopressor"
N_SAMPLES = 8


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """``mlflow.pyfunc.load_model("models:/...")`` reads the global tracking URI; restored afterwards."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


@pytest.fixture(scope="module")
def twin(tmp_path_factory):  # noqa: ANN001, ANN201 - (spec, trained TwinModel, CohortTensors of 4 patients)
    from fedtwin.extract.extractor import extract_cohort
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.synth import SynthRequest, synthesize
    from fedtwin.twin import FitConfig, TwinModel, fit

    out = tmp_path_factory.mktemp("hospital")
    synthesize(SynthRequest(sites=1, patients=40, seed=5, out=out, sizes=[40], workers=1))
    spec = load_spec(SPEC_PATH)
    tensors = extract_cohort(open_database(str(out / "site_1.db")), spec)
    model = TwinModel(spec)
    fit(model, tensors, FitConfig(epochs=2, batch_size=16))
    model.eval()
    h, ne = spec.time.history_steps, spec.intervention_names.index("norepinephrine")
    on_pressor = np.asarray(tensors.doses)[:, h:, ne].sum(axis=1) > 0  # so that the what-if plan changes something
    assert on_pressor.any() and (~on_pressor).any()
    pick = np.concatenate([np.flatnonzero(on_pressor)[:2], np.flatnonzero(~on_pressor)[:2]])
    pick = pick[np.argsort(np.asarray(tensors.person_ids)[pick])]
    return spec, model, tensors.select(pick)


@pytest.fixture
def card_files(tmp_path: Path) -> dict[str, Path]:
    md = tmp_path / "model-card.md"
    md.write_text("# FedTwin ICU twin\n\nAggregate metrics only.\n", encoding="utf-8")
    js = tmp_path / "model-card.json"
    js.write_text(json.dumps({"format": "test-card", "spec": "icu_hemodynamics"}), encoding="utf-8")
    return {"model-card.md": md, "model-card.json": js}


def _max_diff(a, b) -> float:  # noqa: ANN001
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _linked_versions(client, model_id: str) -> list[tuple[str, str]]:  # noqa: ANN001
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    return [(e["name"], str(e["version"])) for e in json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS])]


def _check_forecast_and_whatif(pyfunc, model, tensors) -> None:  # noqa: ANN001
    """The pyfunc's answers are fedtwin's own forecast/what-if, number for number."""
    from fedtwin.evaluation.plans import load_plan
    from fedtwin.tracking.twin_pyfunc import OUTPUT_COLUMNS, WHATIF_COLUMNS, tensors_to_frame
    from fedtwin.twin import forecast, what_if

    spec = model.spec
    frame = tensors_to_frame(tensors)
    n, f, v = tensors.n_patients, spec.time.horizon_steps, len(spec.state_names)

    got = pyfunc.predict(frame, params={"mode": "forecast", "n_samples": N_SAMPLES, "seed": 3})
    assert list(got.columns) == list(OUTPUT_COLUMNS)
    assert len(got) == n * f * v
    fc = forecast(model, tensors, n_samples=N_SAMPLES, seed=3)
    assert got["person_id"].to_numpy().tolist() == np.repeat(tensors.person_ids, f * v).tolist()
    assert sorted(set(got["step"])) == list(range(spec.time.history_steps, spec.time.total_steps))
    assert got["variable"].tolist()[:v] == spec.state_names
    for col, ref in (("mean", fc.predicted.mean), ("lower90", fc.predicted.lower90), ("upper90", fc.predicted.upper90)):
        assert _max_diff(got[col], ref) == 0.0, f"forecast {col} differs by {_max_diff(got[col], ref)}"

    wi_got = pyfunc.predict(frame, params={"mode": "whatif", "plan": PLAN, "n_samples": N_SAMPLES, "seed": 3})
    assert list(wi_got.columns) == [*OUTPUT_COLUMNS[:4], "plan", *OUTPUT_COLUMNS[4:], *WHATIF_COLUMNS[1:]]
    assert set(wi_got["plan"]) == {PLAN}
    wi = what_if(model, tensors, load_plan(PLAN_PATH, spec), n_samples=N_SAMPLES, seed=3)
    for col, ref in (("mean", wi.alternative.mean), ("lower90", wi.alternative.lower90), ("upper90", wi.alternative.upper90),
                     ("recorded_mean", wi.recorded.mean), ("effect", wi.difference)):
        assert _max_diff(wi_got[col], ref) == 0.0, f"what-if {col} differs by {_max_diff(wi_got[col], ref)}"
    map_effect = wi_got.loc[wi_got["variable"] == "map", "effect"].abs().max()
    assert map_effect > 0  # stopping norepinephrine moves MAP (its only declared target among the variables)

    with pytest.raises(FedTwinError, match="not registered with this twin"):
        pyfunc.predict(frame, params={"mode": "whatif", "plan": "no such plan"})


def test_frame_round_trip_gives_the_same_forecast(twin) -> None:  # noqa: ANN001
    from fedtwin.tracking.twin_pyfunc import frame_to_tensors, tensors_to_frame
    from fedtwin.twin import forecast

    spec, model, tensors = twin
    back = frame_to_tensors(tensors_to_frame(tensors), spec)
    h = spec.time.history_steps
    assert np.array_equal(back.mask[:, :h], tensors.mask[:, :h]) and np.array_equal(back.doses, tensors.doses)
    a, b = forecast(model, tensors, n_samples=4), forecast(model, back, n_samples=4)
    assert _max_diff(a.predicted.mean, b.predicted.mean) == 0.0
    with pytest.raises(FedTwinError, match="unknown variables"):
        frame_to_tensors(tensors_to_frame(tensors).assign(variable="lactate_typo"), spec)


def test_sqlite_register_load_predict_and_refuse_a_tampered_model(twin, tmp_path: Path, card_files) -> None:  # noqa: ANN001
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from fedtwin.provenance.digests import parameters_digest
    from fedtwin.spec import spec_hash
    from fedtwin.spec.io import canonical_json
    from fedtwin.tracking.registry import TAG_DIGEST, TAG_SPEC_HASH, TAG_STUDY, load_registered_twin, register_twin
    from fedtwin.tracking.twin_pyfunc import DIGEST_FILE, PARAMETERS_FILE, PLANS_FILE, read_parameters_npz, write_parameters_npz
    from fedtwin.twin import get_parameters

    spec, model, tensors = twin
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study-registry", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    arrays = get_parameters(model)

    info = register_twin(uri, run_id, canonical_json(spec), arrays, model_name="icu-twin", card_files=card_files,
                         study_id="study-registry", plans={PLAN: PLAN_PATH})
    assert (info.name, info.version, info.model_uri) == ("icu-twin", "1", "models:/icu-twin/1")
    assert info.parameters_digest == parameters_digest(arrays) and info.spec_hash == spec_hash(spec)

    mv = client.get_model_version("icu-twin", "1")
    assert mv.tags == {TAG_DIGEST: info.parameters_digest, TAG_SPEC_HASH: info.spec_hash, TAG_STUDY: "study-registry"}
    assert mv.run_id == run_id
    assert _linked_versions(client, info.model_id) == [("icu-twin", "1")]  # version -> LoggedModel link
    assert mv.description.startswith("# FedTwin ICU twin")  # the card's markdown
    assert client.get_registered_model("icu-twin").tags[TAG_DIGEST] == info.parameters_digest
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [info.model_id]  # linked to the run
    logged = client.get_logged_model(info.model_id)
    assert logged.name == "model" and logged.source_run_id == run_id and logged.experiment_id == exp
    assert str(logged.status).endswith("READY")
    store = Path(logged.artifact_location.removeprefix("file://"))
    assert store.is_relative_to(tmp_path / "mlartifacts")
    stored = {p.name for p in (store / "artifacts").iterdir()}
    assert {"model-card.md", "model-card.json", PARAMETERS_FILE, DIGEST_FILE} <= stored

    with global_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/icu-twin/1")
    assert pyfunc.unwrap_python_model().parameters_digest == info.parameters_digest
    _check_forecast_and_whatif(pyfunc, model, tensors)

    # a second version: the latest one is loaded by default
    info2 = register_twin(uri, run_id, json.loads(canonical_json(spec)), arrays, model_name="icu-twin", plans={PLAN: PLAN_PATH})
    assert info2.version == "2"
    assert load_registered_twin(uri, "icu-twin").unwrap_python_model().parameters_digest == info.parameters_digest

    # tamper with the stored parameters of version 1: loading refuses, naming the file and both digests
    npz = store / "artifacts" / PARAMETERS_FILE
    bad = read_parameters_npz(npz)
    bad[0] = bad[0] + np.float32(0.5)
    write_parameters_npz(npz, bad)
    with global_tracking_uri(uri), pytest.raises(FedTwinError) as caught:
        mlflow.pyfunc.load_model("models:/icu-twin/1")
    msg = str(caught.value)
    assert PARAMETERS_FILE in msg and parameters_digest(bad) in msg and info.parameters_digest in msg and "refusing" in msg

    # ... and rewriting twin-digest.json to match is caught against the registry's tag
    record = json.loads((store / "artifacts" / DIGEST_FILE).read_text())
    (store / "artifacts" / DIGEST_FILE).write_text(json.dumps({**record, "parameters_digest": parameters_digest(bad)}))
    with pytest.raises(FedTwinError, match=f"tag records {info.parameters_digest}"):
        load_registered_twin(uri, "icu-twin", version=1)

    # a changed what-if plan (version 2's) is refused too: what-if answers come from the registered plans only
    plans_file = Path(client.get_logged_model(info2.model_id).artifact_location.removeprefix("file://")) / "artifacts" / PLANS_FILE
    plans_file.write_text(json.dumps({PLAN: {"norepinephrine": [50.0] * spec.time.horizon_steps}}))
    with global_tracking_uri(uri), pytest.raises(FedTwinError, match="plans file .* refusing"):
        mlflow.pyfunc.load_model("models:/icu-twin/2")

    # refused before anything is logged: parameters that do not fit the spec's twin
    with pytest.raises(FedTwinError, match="parameter arrays"):
        register_twin(uri, run_id, canonical_json(spec), arrays[:-1], model_name="icu-twin")
    assert len(client.search_model_versions("name = 'icu-twin'")) == 2


@pytest.mark.postgres
def test_postgres_backed_mlflow_server_tracks_rounds_and_serves_the_registered_twin(twin, tmp_path: Path, card_files, pg_admin_url) -> None:  # noqa: ANN001
    from mlflow import MlflowClient

    from fedtwin.spec.io import canonical_json
    from fedtwin.tracking.registry import load_registered_twin, register_twin
    from fedtwin.tracking.run_tracker import RUN_ID_FILE, RoundTracker
    from fedtwin.twin import get_parameters
    from mlflow_server import fresh_postgres_database, running_mlflow_server

    spec, model, tensors = twin
    with fresh_postgres_database(pg_admin_url) as backend, running_mlflow_server(tmp_path, backend) as url:
        tracker = RoundTracker(url, "study-pg", tmp_path / "checkpoints", {"spec_hash": "x", "rounds": 2}, resume=False)
        for r in (1, 2):
            tracker.log_round(r, sites=2, seconds=1.5 * r, halted=False, epsilon={"site_1": 0.5 * r, "site_2": 0.4 * r})
        tracker.log_evaluation(2, {"metrics": {"rmse.map.all.twin": {"value": 5.0, "ci": [4.0, 6.0]}}, "cohort": {"n_patients": 40}}, "final")
        tracker.close()
        assert (tmp_path / "checkpoints" / RUN_ID_FILE).read_text().strip() == tracker.run_id

        client = MlflowClient(tracking_uri=url)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "epsilon_spent.site_1")] == [(1, 0.5), (2, 1.0)]
        assert run.data.metrics["eval.rmse.map.all.twin"] == 5.0
        assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
        assert [a.path for a in client.list_artifacts(tracker.run_id, "evaluation")] == ["evaluation/final.json"]

        info = register_twin(url, tracker.run_id, canonical_json(spec), get_parameters(model), model_name="icu-twin-pg",
                             card_files=card_files, study_id="study-pg", plans={PLAN: PLAN_PATH})
        assert info.model_uri == "models:/icu-twin-pg/1"
        mv = client.get_model_version("icu-twin-pg", "1")
        assert mv.run_id == tracker.run_id and mv.tags["fedtwin.study_id"] == "study-pg"
        assert [o.model_id for o in client.get_run(tracker.run_id).outputs.model_outputs] == [info.model_id]
        assert _linked_versions(client, info.model_id) == [("icu-twin-pg", "1")]
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_logged_model_artifacts(info.model_id, "artifacts")}
        assert {"model-card.md", "model-card.json"} <= names
        # the artifacts went through the server's proxy into its --artifacts-destination
        assert list((tmp_path / "mlflow-server-artifacts").rglob("twin-parameters.npz"))

        with global_tracking_uri(url):
            import mlflow.pyfunc

            pyfunc = mlflow.pyfunc.load_model("models:/icu-twin-pg/1")
        _check_forecast_and_whatif(pyfunc, model, tensors)
        assert load_registered_twin(url, "icu-twin-pg", 1).unwrap_python_model().parameters_digest == info.parameters_digest
