"""The final twin in the MLflow Model Registry: a pyfunc that loads it and runs forecasts/what-if.

:func:`register_twin` logs the twin into the study's run as an MLflow 3 *LoggedModel* named
``model`` (a pyfunc, :class:`fedtwin.tracking.twin_pyfunc.TwinPyfunc`, artifacts: spec, config,
parameters ``.npz``, ``twin-digest.json``, named what-if plans and the model card files), links it
to the run as a run output and registers it as a new version of ``model_name``. Tags on the
registered model (they describe its latest registered version) and on the version:
``fedtwin.parameters_digest``, ``fedtwin.spec_hash``, ``fedtwin.study_id`` (if given). :func:`load_registered_twin` loads a version back and checks the
loaded parameters against the version's digest tag, on top of the pyfunc's own check against
``twin-digest.json``.

Only :class:`mlflow.MlflowClient` with an explicit tracking URI is used: no active run, no
``mlflow.set_tracking_uri``. ``mlflow.pyfunc.log_model`` is not used because in MLflow 3.17 it has
neither a ``run_id`` nor a ``tracking_uri`` argument: it takes its client from the global tracking
URI, and without an active run it creates the LoggedModel in the global default experiment
(``"0"``), not in the run's, and does not link it to the run. Using it would mean mutating process
globals (tracking URI, active run) inside the coordinator, which runs Flower threads. Instead this
does what ``log_model`` does, step by step, with the client: ``create_logged_model`` (the run's
experiment, ``source_run_id``), ``mlflow.pyfunc.save_model`` into a temporary folder (the
``MLmodel`` records the model id and run id), ``log_model_artifacts``, ``finalize_logged_model``,
``log_outputs`` (the run -> model link the UI shows) and ``create_model_version`` with the
LoggedModel's ``model_id`` and its artifact location as source (MLflow's SQL registry store
resolves a ``models:/<model_id>`` source through the *global* tracking URI, so that spelling fails
for a client-side store). Loading downloads the version's artifacts with the explicit tracking URI
and calls ``mlflow.pyfunc.load_model`` on the local copy, again without globals.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtwin.errors import FedTwinError

MODEL_ARTIFACT_NAME = "model"
CARD_FILES = ("model-card.md", "model-card.html", "model-card.json")
TAG_DIGEST = "fedtwin.parameters_digest"
TAG_SPEC_HASH = "fedtwin.spec_hash"
TAG_STUDY = "fedtwin.study_id"
DESCRIPTION_LIMIT = 4000  # MLflow's SQL stores keep descriptions up to 5000 characters


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered twin version. ``model_uri`` (``models:/NAME/VERSION``) is what to load;
    ``source`` (``models:/<model_id>``) the LoggedModel the version points at."""

    name: str
    version: str
    model_uri: str
    source: str
    model_id: str
    run_id: str
    parameters_digest: str
    spec_hash: str


def _spec_from(spec_json: Mapping[str, Any] | str):  # noqa: ANN202 - TwinSpec
    from fedtwin.spec.io import spec_from_dict

    if isinstance(spec_json, str):
        try:
            data = json.loads(spec_json)
        except ValueError as exc:
            raise FedTwinError(f"the spec JSON cannot be parsed: {exc}", "pass the spec's canonical JSON (fedtwin.spec.io.canonical_json) or its dict") from None
    else:
        data = dict(spec_json)
    return spec_from_dict(data, source="the spec to register")


def _plans(plans: Mapping[str, Path | str | Mapping[str, Any]], spec) -> dict[str, dict[str, list[float]]]:  # noqa: ANN001
    """Named plans: a plan YAML file (fedtwin.evaluation.plans format) or its mapping; validated against the spec."""
    from fedtwin.evaluation.plans import load_plan, parse_plan

    out: dict[str, dict[str, list[float]]] = {}
    for name, plan in plans.items():
        if not str(name).strip():
            raise FedTwinError("a what-if plan needs a non-empty name", "plans={'no vasopressor': 'specs/plans/icu-no-vasopressor.yaml'}")
        out[str(name)] = load_plan(plan, spec) if isinstance(plan, (str, Path)) else parse_plan(dict(plan), spec, f"plan {name!r}")
    return out


def _pip_requirements() -> list[str]:
    """What the pyfunc imports, pinned to this environment (fedtwin itself must be installable there)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("fedtwin", "mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml", "sqlalchemy"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def register_twin(
    tracking_uri: str,
    run_id: str,
    spec_json: Mapping[str, Any] | str,
    arrays: Sequence[np.ndarray],
    *,
    model_name: str,
    card_files: Mapping[str, Path] = {},  # noqa: B006 - read only
    study_id: str | None = None,
    plans: Mapping[str, Path | str | Mapping[str, Any]] = {},  # noqa: B006 - read only
    config: Any = None,
    await_seconds: int = 300,
) -> ModelVersionInfo:
    """Log the twin (spec + parameters ``arrays`` in ``get_parameters`` order) into run ``run_id``
    of the store at ``tracking_uri`` as a pyfunc and register it as a new version of ``model_name``.

    ``card_files``: ``{file name: path}`` (``model-card.md/.html/.json``), attached to the version as
    model artifacts; a ``model-card.md`` of at most 4000 characters also becomes the version's
    description. ``plans``: ``{name: plan YAML path or mapping}``, the what-if plans the pyfunc
    answers by name (the spec itself holds none). ``config``: the :class:`fedtwin.twin.TwinConfig`
    the parameters fit (default: ``TwinConfig()``, what the federation trains). Everything is
    checked before anything is written: parameters against a twin built from the spec and config,
    plans against the spec, card files exist.
    """
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from fedtwin.provenance.digests import parameters_digest
    from fedtwin.spec import spec_hash
    from fedtwin.spec.io import canonical_json
    from fedtwin.tracking import twin_pyfunc as tp
    from fedtwin.twin import TwinConfig, TwinModel, set_parameters

    spec = _spec_from(spec_json)
    h = spec_hash(spec)
    cfg = config if isinstance(config, TwinConfig) else TwinConfig.from_dict(dict(config)) if config is not None else TwinConfig()
    arrays = [np.asarray(a) for a in arrays]
    set_parameters(TwinModel(spec, cfg), arrays)  # wrong count/shape/non-finite: refused before anything is logged
    digest = parameters_digest(arrays)
    named_plans = _plans(plans, spec)
    cards: dict[str, Path] = {}
    for fname, path in card_files.items():
        p = Path(path)
        if Path(fname).name != fname or not fname:
            raise FedTwinError(f"card file name {fname!r} must be a plain file name", f"e.g. {', '.join(CARD_FILES)}")
        if not p.is_file():
            raise FedTwinError(f"model card file {p} does not exist", "write the model card first, then register the twin")
        cards[fname] = p
    clash = sorted(set(cards) & {tp.SPEC_FILE, tp.CONFIG_FILE, tp.PARAMETERS_FILE, tp.DIGEST_FILE, tp.PLANS_FILE})
    if clash:
        raise FedTwinError(f"card files {clash} would overwrite the twin's own artifacts", "rename them")

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - any failure: the run is not usable
        raise FedTwinError(f"MLflow run {run_id} cannot be read from {tracking_uri}: {type(exc).__name__}: {exc}",
                           "pass the study's run id (mlflow_run_id beside the checkpoints) and its tracking URI") from None
    tags = {TAG_DIGEST: digest, TAG_SPEC_HASH: h, **({TAG_STUDY: study_id} if study_id else {})}

    with tempfile.TemporaryDirectory(prefix="fedtwin-register-") as tmp:
        d = Path(tmp)
        files = d / "files"
        files.mkdir()
        (files / tp.SPEC_FILE).write_text(canonical_json(spec), encoding="utf-8")
        config_dict, plans_dict = json.loads(json.dumps(cfg.to_dict())), tp.plans_dict(named_plans)  # as they read back
        (files / tp.CONFIG_FILE).write_text(json.dumps(config_dict, indent=1, sort_keys=True), encoding="utf-8")
        tp.write_parameters_npz(files / tp.PARAMETERS_FILE, arrays)
        (files / tp.DIGEST_FILE).write_text(json.dumps(tp.digest_record(arrays, h, config_dict, plans_dict), indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
        (files / tp.PLANS_FILE).write_text(json.dumps(plans_dict, indent=1, sort_keys=True), encoding="utf-8")
        code = d / "twin_model.py"  # models-from-code: nothing is pickled, loading unpickles no object
        code.write_text(tp.MODEL_CODE, encoding="utf-8")
        artifacts = {k: str(files / k) for k in (tp.SPEC_FILE, tp.CONFIG_FILE, tp.PARAMETERS_FILE, tp.DIGEST_FILE, tp.PLANS_FILE)}
        artifacts.update({k: str(p.resolve()) for k, p in cards.items()})

        logged = client.create_logged_model(
            run.info.experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id, tags=tags,
            params={"spec_name": spec.name, "spec_hash": h}, model_type="fedtwin-twin",
        )
        try:
            local = d / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                 model_uuid=logged.model_id)
            mlflow.pyfunc.save_model(
                path=str(local), python_model=str(code), artifacts=artifacts, mlflow_model=mlflow_model,
                signature=tp.model_signature(), pip_requirements=_pip_requirements(),
                metadata={"fedtwin.spec_name": spec.name, **tags},
            )
            client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])

    try:
        client.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST (a race is caught by create's ALREADY_EXISTS below)
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(model_name, description=f"FedTwin twin of spec {spec.name}")
        except MlflowException as exc:
            if "ALREADY_EXISTS" not in str(exc.error_code):
                raise
    md = cards.get("model-card.md")
    card_text = md.read_text(encoding="utf-8") if md is not None else ""
    description = (card_text if card_text and len(card_text) <= DESCRIPTION_LIMIT else
                   f"FedTwin twin of spec {spec.name} ({h[:12]}); parameters digest {digest[:12]}"
                   + ("; model card: see the model's artifacts" if cards else ""))
    # source = the LoggedModel's artifact location, not models:/<model_id>: MLflow 3.17's SQL registry
    # store resolves a models:/ source with MlflowClient() (the *global* tracking URI), which fails
    # for a client-side SQLite/PostgreSQL store unless globals are changed (it would open ./mlflow.db);
    # the version -> LoggedModel link is the LoggedModel's mlflow.modelVersions tag (below)
    source = logged.artifact_location
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags, description=description,
                                     await_creation_for=await_seconds, model_id=logged.model_id)
    _link_version_to_logged_model(client, logged.model_id, model_name, mv.version)
    for k, v in tags.items():
        client.set_registered_model_tag(model_name, k, v)
    client.set_tag(run_id, "fedtwin.registered_model", f"{model_name}/{mv.version}")
    return ModelVersionInfo(name=model_name, version=str(mv.version), model_uri=f"models:/{model_name}/{mv.version}", source=source,
                            model_id=logged.model_id, run_id=run_id, parameters_digest=digest, spec_hash=h)


def _link_version_to_logged_model(client, model_id: str, name: str, version: str | int) -> None:  # noqa: ANN001
    """The LoggedModel's ``mlflow.modelVersions`` tag (what the UI shows as its registered versions).

    MLflow 3.17's SQL registry stores do not keep a version's ``model_id`` (``ModelVersion.model_id``
    reads back None); the tracking server, and ``mlflow.register_model`` on the client side, record
    the link as this tag instead. Done here for client-side stores; idempotent against the server's.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    entry = {"name": name, "version": int(version)}
    current = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    linked = json.loads(current) if current else []
    if not any(e.get("name") == name and str(e.get("version")) == str(version) for e in linked):
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked + [entry])})


def load_registered_twin(tracking_uri: str, name: str, version: str | int = "latest"):  # noqa: ANN201 - mlflow.pyfunc.PyFuncModel
    """Load version ``version`` (or the highest, ``"latest"``) of registered twin ``name`` as a pyfunc.

    Refuses (FedTwinError) a copy whose parameters differ from the version's
    ``fedtwin.parameters_digest`` tag, in addition to the pyfunc's own ``twin-digest.json`` check.
    ``.unwrap_python_model()`` gives the :class:`~fedtwin.tracking.twin_pyfunc.TwinPyfunc`.
    """
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if str(version) == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise FedTwinError(f"no registered model {name!r} in {tracking_uri}", "register the twin first (register_twin)")
        version = max(int(v.version) for v in versions)
    mv = client.get_model_version(name, str(version))
    uri = client.get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory(prefix="fedtwin-twin-") as tmp:  # everything is read in load_context
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri)
        model = mlflow.pyfunc.load_model(local)
    loaded = model.unwrap_python_model()
    for tag, got in ((TAG_DIGEST, loaded.parameters_digest), (TAG_SPEC_HASH, loaded.spec_hash)):
        want = mv.tags.get(tag)
        if want is not None and want != got:
            raise FedTwinError(
                f"registered twin {name} version {mv.version}: the downloaded model has {tag.split('.', 1)[1]} {got}, "
                f"the version's {tag} tag records {want}; refusing to use it",
                "the stored model artifacts were changed after registration; register the twin again",
            )
    return model
