"""The registered twin as an MLflow pyfunc: load it, forecast, ask what-if questions.

What a registered version holds (pyfunc artifacts, written by :func:`fedtwin.tracking.registry.register_twin`):

* ``twin-spec.json``: the spec's canonical JSON (its sha256 is the spec hash);
* ``twin-config.json``: the :class:`fedtwin.twin.TwinConfig` the parameters fit (structure);
* ``twin-parameters.npz``: the parameters, keys ``p0000, p0001, ...`` in order (the layout of the
  coordinator's checkpoints and final model);
* ``twin-digest.json``: ``{"parameters_digest": ..., "spec_hash": ..., "config_digest": ...,
  "plans_digest": ...}``: the :func:`fedtwin.provenance.digests.parameters_digest` of those arrays,
  the spec hash, and :func:`fedtwin.provenance.canonical.digest` of the config and of the plans;
* ``twin-plans.json``: named what-if plans ``{name: {intervention: [dose per horizon bin]}}``;
* the model card files (``model-card.md/.html/.json``), so the card travels with the version.

:meth:`TwinPyfunc.load_context` refuses a model whose parameters, spec, config or plans do not
match ``twin-digest.json`` (a tampered file must not answer what-if questions); the registry's
version tags hold the parameters digest and spec hash too, which
:func:`fedtwin.tracking.registry.load_registered_twin` checks against a rewritten digest file.

Input: one long-format DataFrame of *binned* patient histories (:data:`INPUT_COLUMNS`), the shape
MLflow users pass to a pyfunc (``model.predict(df)``, ``dataframe_split`` over REST):

=============  =========================================================================================
``person_id``  integer patient key (also keys the Monte Carlo draws: a patient's answer does not
               depend on which other patients share the frame)
``step``       bin index from the index time, ``0 .. history+horizon-1`` (bin = ``spec.time.step``);
               the prediction time is the end of bin ``history-1``; ignored for static covariates
``variable``   a state variable of the spec (value = the bin's mean, canonical unit), an intervention
               (value = the amount given in the bin, canonical unit; several rows are summed) or a
               static covariate column (``age``, ``sex_female``, ``race_white`` ... as extracted)
``value``      float
``count``      optional: measurements behind a state variable's bin mean (default 1 per row)
=============  =========================================================================================

Only history bins of state variables are read (horizon values are never model inputs); doses
given for horizon bins are the regimen the forecast assumes (``horizon_doses="recorded"``, the
default; ``hold``/``zero`` override them). Values outside the spec's plausible range are dropped,
as extraction drops them. Binning raw timestamps and unit conversion are extraction's job
(they run inside the OMOP database, fedtwin/extract/queries.py); this frame is what extraction
produces, written out plainly, and :func:`tensors_to_frame` writes a :class:`CohortTensors` in it.
A frame rather than a CohortTensors ``.npz`` path because FedTwin's CLI writes no such file (it
extracts from the OMOP database each time), and a frame is what an MLflow user, a notebook or a
serving endpoint naturally sends.

Params (``predict(df, params={...})``): ``mode`` ``forecast`` | ``whatif``; ``plan``: the name of
a plan registered with the model (what-if); ``n_samples`` (default 32) and ``seed`` (default 0):
Monte Carlo over the parameter posterior; ``horizon_doses`` (forecast only).

Output, one row per (patient, horizon bin, state variable), canonical units: ``person_id``,
``step`` (``history .. history+horizon-1``, on the input's step axis), ``variable``, ``unit``,
``mean``, ``lower90``, ``upper90``; a what-if adds ``plan``, ``recorded_mean`` (under the doses in
the frame) and ``effect`` (``mean - recorded_mean``), with ``mean``/``lower90``/``upper90`` under the
plan. The numbers are those of :func:`fedtwin.twin.forecast` / :func:`fedtwin.twin.what_if` on the
same patients, draws and seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd  # noqa: TC002 - predict's annotation is resolved at runtime by MLflow

from fedtwin.errors import FedTwinError

SPEC_FILE = "twin-spec.json"
CONFIG_FILE = "twin-config.json"
PARAMETERS_FILE = "twin-parameters.npz"
DIGEST_FILE = "twin-digest.json"
PLANS_FILE = "twin-plans.json"
DIGEST_FORMAT = "fedtwin-twin-digest/1"
INPUT_COLUMNS = ("person_id", "step", "variable", "value")
OPTIONAL_COLUMNS = ("count",)
OUTPUT_COLUMNS = ("person_id", "step", "variable", "unit", "mean", "lower90", "upper90")
WHATIF_COLUMNS = ("plan", "recorded_mean", "effect")
PARAM_DEFAULTS: dict[str, Any] = {"mode": "forecast", "plan": "", "n_samples": 32, "seed": 0, "horizon_doses": "recorded"}


# ---- parameters file --------------------------------------------------------------------------


def write_parameters_npz(path: str | Path, arrays: list[np.ndarray]) -> Path:
    """``p0000, p0001, ...`` in order, as coordinator checkpoints and final models are written."""
    p = Path(path)
    np.savez(p, **{f"p{i:04d}": np.asarray(a) for i, a in enumerate(arrays)})
    return p


def read_parameters_npz(path: str | Path) -> list[np.ndarray]:
    """The ``pNNNN`` arrays of a parameters file, in order (other keys, e.g. a checkpoint's ``__round__``, ignored)."""
    import re

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = sorted(k for k in z.files if re.fullmatch(r"p\d{4}", k))
            arrays = [z[k] for k in keys]
    except Exception as exc:  # noqa: BLE001 - unreadable or not an npz
        raise FedTwinError(f"twin parameters file {p} cannot be read: {type(exc).__name__}: {exc}",
                           "the registered model is corrupt; register the twin again") from None
    if keys != [f"p{i:04d}" for i in range(len(keys))] or not keys:
        raise FedTwinError(f"twin parameters file {p} does not hold p0000..pNNNN in sequence",
                           "the registered model is corrupt; register the twin again")
    return arrays


# ---- the input frame ----------------------------------------------------------------------------


def frame_to_tensors(frame, spec):  # noqa: ANN001, ANN201 - (pandas.DataFrame, TwinSpec) -> CohortTensors
    """A long-format history frame (module docstring) -> :class:`CohortTensors` for ``spec``.

    Errors say which column, variable or how many rows are wrong, never a patient's values.
    """
    import pandas as pd

    from fedtwin.extract.extractor import static_names, time_since_last
    from fedtwin.extract.tensors import CohortTensors
    from fedtwin.spec import spec_hash

    if not isinstance(frame, pd.DataFrame):
        raise FedTwinError(f"the twin's input must be a pandas DataFrame, got {type(frame).__name__}",
                           f"pass a long-format frame with columns {list(INPUT_COLUMNS)}")
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise FedTwinError(f"the input frame lacks the columns {missing}", f"columns: {list(INPUT_COLUMNS)} (+ optional {list(OPTIONAL_COLUMNS)})")
    if frame.empty:
        raise FedTwinError("the input frame has no rows", "pass at least one patient's history")
    states, ivs, statics = spec.state_names, spec.intervention_names, static_names(spec)
    t_total, history = spec.time.total_steps, spec.time.history_steps
    var = frame["variable"].astype(str).to_numpy()
    known = set(states) | set(ivs) | set(statics)
    unknown = sorted(set(var) - known)
    if unknown:
        raise FedTwinError(f"the input frame names unknown variables {unknown[:10]}",
                           f"use state variables {states}, interventions {ivs} or static covariates {statics}")
    try:
        pid_col = pd.to_numeric(frame["person_id"], errors="raise")
        value = pd.to_numeric(frame["value"], errors="coerce").to_numpy(np.float64)
        step = pd.to_numeric(frame["step"], errors="coerce").to_numpy(np.float64)
        count = (pd.to_numeric(frame["count"], errors="coerce").to_numpy(np.float64) if "count" in frame.columns
                 else np.ones(len(frame)))
    except (TypeError, ValueError):
        raise FedTwinError("person_id must be an integer key", "use the OMOP person_id (or any integer key) per patient") from None
    if pid_col.dtype.kind in "iu":
        pid = pid_col.to_numpy(np.int64)
    else:  # floats (e.g. after a JSON round trip): integer-valued only
        f = pid_col.to_numpy(np.float64)
        if not np.all(np.isfinite(f)) or np.any(f != np.round(f)):
            raise FedTwinError("person_id must be an integer key on every row", "use the OMOP person_id (or any integer key)")
        pid = f.astype(np.int64)
    is_static = np.isin(var, statics)
    timed = ~is_static
    bad_step = timed & ~(np.isfinite(step) & (step == np.round(step)) & (step >= 0) & (step < t_total))
    if bad_step.any():
        raise FedTwinError(f"{int(bad_step.sum())} rows of state variables or interventions have a step outside the integers 0..{t_total - 1}",
                           f"step = bin index from the index time: {history} history bins then {spec.time.horizon_steps} horizon bins")
    bad_value = ~is_static & ~np.isfinite(value)
    if bad_value.any():
        raise FedTwinError(f"{int(bad_value.sum())} rows have a missing or non-finite value",
                           "drop unmeasured bins instead of sending them (missing values are modelled, never imputed)")
    is_dose = np.isin(var, ivs)
    if np.any(is_dose & (value < 0)):
        raise FedTwinError(f"{int((is_dose & (value < 0)).sum())} intervention rows have a negative amount", "doses are amounts >= 0 in canonical units")
    is_state = np.isin(var, states)
    if np.any(is_state & ~(np.isfinite(count) & (count >= 1))):
        raise FedTwinError("the count column must be >= 1 on state-variable rows", "count = measurements behind the bin's mean (1 if unknown)")

    persons = np.unique(pid)
    n = persons.size
    row = np.searchsorted(persons, pid)
    t = np.where(timed, np.nan_to_num(step), 0).astype(np.int64)

    v = len(states)
    sums = np.zeros((n, t_total, v))
    counts = np.zeros((n, t_total, v))
    sel = is_state.copy()
    for j, sv in enumerate(spec.state_variables):  # drop implausible values, as extraction does
        lo, hi = sv.plausible_range
        this = var == sv.name
        sel &= ~(this & ((value < lo) | (value > hi)))
    col = np.array([states.index(x) if x in states else 0 for x in var], dtype=np.int64)
    np.add.at(sums, (row[sel], t[sel], col[sel]), value[sel] * count[sel])
    np.add.at(counts, (row[sel], t[sel], col[sel]), count[sel])
    mask = counts > 0
    values = np.where(mask, sums / np.where(mask, counts, 1.0), 0.0).astype(np.float32)

    doses = np.zeros((n, t_total, len(ivs)))
    dcol = np.array([ivs.index(x) if x in ivs else 0 for x in var], dtype=np.int64)
    np.add.at(doses, (row[is_dose], t[is_dose], dcol[is_dose]), value[is_dose])

    static = np.full((n, len(statics)), np.nan, np.float32)  # missing -> NaN -> the centre in model units
    if is_static.any():
        scol = np.array([statics.index(x) if x in statics else 0 for x in var], dtype=np.int64)
        key = row[is_static] * max(len(statics), 1) + scol[is_static]
        if np.unique(key).size != key.size:
            raise FedTwinError("a static covariate is given more than once for a patient", "one row per patient and static covariate")
        static[row[is_static], scol[is_static]] = value[is_static]

    o = len(spec.outcomes)
    tensors = CohortTensors(
        spec_hash=spec_hash(spec),
        state_names=list(states),
        intervention_names=list(ivs),
        outcome_names=list(spec.outcome_names),
        static_names=statics,
        history_steps=history,
        horizon_steps=spec.time.horizon_steps,
        step_seconds=spec.time.step_seconds,
        person_ids=persons,
        values=values,
        mask=mask,
        counts=np.minimum(counts, np.iinfo(np.int16).max).astype(np.int16),
        time_since=time_since_last(mask),
        doses=doses.astype(np.float32),
        outcome_event=np.zeros((n, o), bool),  # outcomes are what the twin predicts, not inputs
        outcome_time=np.full((n, o), np.nan, np.float32),
        static=static,
        index_epoch=np.full(n, np.nan),
    )
    return tensors


def tensors_to_frame(tensors, history_only: bool = True):  # noqa: ANN001, ANN201 - CohortTensors -> DataFrame
    """A :class:`CohortTensors` in the input format (observed state bins, non-zero doses, static covariates).

    With ``history_only`` (default) state values of horizon bins are left out: the twin never
    reads them, and a frame sent to a model should not carry the outcomes it is asked about.
    """
    import pandas as pd

    n, t_total, _ = tensors.values.shape
    parts = []
    limit = tensors.history_steps if history_only else t_total
    i, t, j = np.nonzero(np.asarray(tensors.mask[:, :limit], bool))
    parts.append(pd.DataFrame({
        "person_id": np.asarray(tensors.person_ids, np.int64)[i], "step": t.astype(np.int64),
        "variable": np.asarray(tensors.state_names, dtype=object)[j],
        "value": np.asarray(tensors.values, np.float64)[i, t, j],
        "count": np.maximum(np.asarray(tensors.counts)[i, t, j], 1).astype(np.int64),
    }))
    i, t, j = np.nonzero(np.asarray(tensors.doses) != 0)
    parts.append(pd.DataFrame({
        "person_id": np.asarray(tensors.person_ids, np.int64)[i], "step": t.astype(np.int64),
        "variable": np.asarray(tensors.intervention_names, dtype=object)[j],
        "value": np.asarray(tensors.doses, np.float64)[i, t, j], "count": np.ones(i.size, np.int64),
    }))
    static = np.asarray(tensors.static, np.float64)
    i, j = np.nonzero(np.isfinite(static))
    parts.append(pd.DataFrame({
        "person_id": np.asarray(tensors.person_ids, np.int64)[i], "step": np.zeros(i.size, np.int64),
        "variable": np.asarray(tensors.static_names, dtype=object)[j], "value": static[i, j],
        "count": np.ones(i.size, np.int64),
    }))
    out = pd.concat(parts, ignore_index=True)
    out["variable"] = out["variable"].astype(str)
    return out


# ---- outputs ------------------------------------------------------------------------------------


def _long(person_ids: np.ndarray, first_step: int, names: list[str], units: list[str], **cols: np.ndarray):  # noqa: ANN202
    """(N, F, V) arrays -> rows (person, step, variable), person-major."""
    import pandas as pd

    n, f, v = next(iter(cols.values())).shape
    out = {
        "person_id": np.repeat(np.asarray(person_ids, np.int64), f * v),
        "step": np.tile(np.repeat(np.arange(first_step, first_step + f, dtype=np.int64), v), n),
        "variable": np.tile(np.asarray(names, dtype=object), n * f),
        "unit": np.tile(np.asarray(units, dtype=object), n * f),
    }
    for k, a in cols.items():
        out[k] = np.asarray(a, np.float64).reshape(-1)
    df = pd.DataFrame(out)
    df["variable"] = df["variable"].astype(str)
    df["unit"] = df["unit"].astype(str)
    return df


def forecast_frame(fc, history_steps: int):  # noqa: ANN001, ANN201 - TwinForecast -> DataFrame
    """A :class:`fedtwin.twin.TwinForecast` as output rows."""
    p = fc.predicted
    return _long(fc.person_ids, history_steps, fc.state_names, fc.units, mean=p.mean, lower90=p.lower90, upper90=p.upper90)


def whatif_frame(wi, plan_name: str):  # noqa: ANN001, ANN201 - WhatIfResult -> DataFrame
    """A :class:`fedtwin.twin.WhatIfResult` as output rows (``mean`` etc. under the plan)."""
    a = wi.alternative
    df = _long(wi.person_ids, wi.history_steps, wi.state_names, wi.units, mean=a.mean, lower90=a.lower90, upper90=a.upper90,
               recorded_mean=wi.recorded.mean, effect=wi.difference)
    df.insert(4, "plan", plan_name)
    return df


# ---- the pyfunc ---------------------------------------------------------------------------------


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FedTwinError(f"{what} {path} cannot be read: {exc}", "the registered model is corrupt; register the twin again") from None


class TwinPyfunc(mlflow.pyfunc.PythonModel):
    """A FedTwin twin behind MLflow's pyfunc interface (module docstring: input, params, output).

    After loading: ``spec``, ``model`` (:class:`fedtwin.twin.TwinModel`, eval mode),
    ``parameters_digest``, ``spec_hash`` and ``plans`` (name -> plan).
    """

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow.pyfunc.PythonModelContext
        from fedtwin.provenance.canonical import digest
        from fedtwin.provenance.digests import parameters_digest
        from fedtwin.spec import spec_hash
        from fedtwin.spec.io import spec_from_dict
        from fedtwin.twin import TwinConfig, TwinModel, set_parameters

        art = context.artifacts
        need = [k for k in (SPEC_FILE, CONFIG_FILE, PARAMETERS_FILE, DIGEST_FILE, PLANS_FILE) if k not in art]
        if need:
            raise FedTwinError(f"the registered twin lacks the artifacts {need}", "register it with fedtwin.tracking.registry.register_twin")
        recorded = _read_json(art[DIGEST_FILE], "twin digest file")
        if not isinstance(recorded, dict) or recorded.get("format") != DIGEST_FORMAT:
            raise FedTwinError(f"{art[DIGEST_FILE]} is not a FedTwin twin digest file ({DIGEST_FORMAT})", "register the twin again")
        arrays = read_parameters_npz(art[PARAMETERS_FILE])
        actual = parameters_digest(arrays)
        if actual != recorded.get("parameters_digest"):
            raise FedTwinError(
                f"twin parameters file {art[PARAMETERS_FILE]} has digest {actual}, but {DIGEST_FILE} records "
                f"{recorded.get('parameters_digest')}: the parameters were changed after registration; refusing to load them",
                "do not use this copy for forecasts or what-if; load the registered version again from the registry, "
                "or register the twin again from the coordinator's final model",
            )
        spec = spec_from_dict(_read_json(art[SPEC_FILE], "twin spec file"), source=f"{art[SPEC_FILE]}")
        h = spec_hash(spec)
        if h != recorded.get("spec_hash"):
            raise FedTwinError(
                f"twin spec file {art[SPEC_FILE]} has spec hash {h}, but {DIGEST_FILE} records {recorded.get('spec_hash')}: "
                "the spec was changed after registration; refusing to load it",
                "load the registered version again from the registry, or register the twin again",
            )
        config = _read_json(art[CONFIG_FILE], "twin config file")
        plans = _read_json(art[PLANS_FILE], "twin plans file")
        for what, path, value, key in (("config", art[CONFIG_FILE], config, "config_digest"), ("plans", art[PLANS_FILE], plans, "plans_digest")):
            if digest(value) != recorded.get(key):
                raise FedTwinError(
                    f"twin {what} file {path} has digest {digest(value)}, but {DIGEST_FILE} records {recorded.get(key)}: "
                    f"the {what} was changed after registration; refusing to load it",
                    "load the registered version again from the registry, or register the twin again",
                )
        model = TwinModel(spec, TwinConfig.from_dict(config))
        set_parameters(model, arrays)  # refuses other counts, shapes, non-finite values
        model.eval()
        self.spec, self.model, self.parameters_digest, self.spec_hash = spec, model, actual, h
        self.plans = {str(k): {str(i): [float(x) for x in d] for i, d in p.items()} for k, p in plans.items()}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ANN001
        # pd.DataFrame is a hint MLflow 3 accepts without inferring a schema (the signature
        # registered with the model is the schema); without any hint it warns at import
        """``model_input``: the long-format history frame; ``params``: mode/plan/n_samples/seed/horizon_doses."""
        from fedtwin.twin import forecast, what_if

        p = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(p) - set(PARAM_DEFAULTS))
        if unknown:
            raise FedTwinError(f"unknown params {unknown}", f"params are {sorted(PARAM_DEFAULTS)}")
        mode, n_samples, seed = str(p["mode"]), int(p["n_samples"]), int(p["seed"])
        if n_samples < 0:
            raise FedTwinError(f"n_samples must be >= 0, got {n_samples}", "posterior draws per patient (0 = posterior mean only)")
        tensors = frame_to_tensors(model_input, self.spec)
        h = self.spec.time.history_steps
        if mode == "forecast":
            hd = str(p["horizon_doses"])
            if hd not in ("recorded", "zero", "hold"):
                raise FedTwinError(f"horizon_doses must be recorded, zero or hold, got {hd!r}", "recorded = the horizon doses in the frame")
            return forecast_frame(forecast(self.model, tensors, n_samples=n_samples, seed=seed, horizon_doses=hd), h)
        if mode == "whatif":
            name = str(p["plan"])
            if name not in self.plans:
                raise FedTwinError(f"what-if plan {name!r} is not registered with this twin (it has {sorted(self.plans)})",
                                   "pass params={'mode': 'whatif', 'plan': NAME} with one of those names")
            return whatif_frame(what_if(self.model, tensors, self.plans[name], n_samples=n_samples, seed=seed), name)
        raise FedTwinError(f"mode must be 'forecast' or 'whatif', got {mode!r}", "params={'mode': 'forecast'} or {'mode': 'whatif', 'plan': NAME}")


def model_signature():  # noqa: ANN201 - mlflow.models.ModelSignature
    """Input columns, output columns and params, so MLflow passes ``params`` through (it drops
    params a signature does not declare)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("long", "person_id"), ColSpec("long", "step"), ColSpec("string", "variable"),
                     ColSpec("double", "value"), ColSpec("long", "count", required=False)])
    outputs = Schema([ColSpec("long", "person_id"), ColSpec("long", "step"), ColSpec("string", "variable"),
                      ColSpec("string", "unit"), ColSpec("string", "plan", required=False),
                      ColSpec("double", "mean"), ColSpec("double", "lower90"), ColSpec("double", "upper90"),
                      ColSpec("double", "recorded_mean", required=False), ColSpec("double", "effect", required=False)])
    params = ParamSchema([ParamSpec("mode", "string", PARAM_DEFAULTS["mode"]), ParamSpec("plan", "string", PARAM_DEFAULTS["plan"]),
                          ParamSpec("n_samples", "long", PARAM_DEFAULTS["n_samples"]), ParamSpec("seed", "long", PARAM_DEFAULTS["seed"]),
                          ParamSpec("horizon_doses", "string", PARAM_DEFAULTS["horizon_doses"])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def plans_dict(plans: Mapping[str, Mapping[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    return {str(k): {str(i): [float(x) for x in d] for i, d in p.items()} for k, p in plans.items()}


def digest_record(arrays: list[np.ndarray], spec_hash: str, config: dict[str, Any], plans: dict[str, Any]) -> dict[str, str]:
    """What ``twin-digest.json`` holds (what :meth:`TwinPyfunc.load_context` checks)."""
    from fedtwin.provenance.canonical import digest
    from fedtwin.provenance.digests import parameters_digest

    return {"format": DIGEST_FORMAT, "parameters_digest": parameters_digest(arrays), "spec_hash": spec_hash,
            "config_digest": digest(config), "plans_digest": digest(plans)}


MODEL_CODE = (
    "# FedTwin twin pyfunc (MLflow models-from-code): the class lives in the installed fedtwin package.\n"
    "import mlflow.models\n\n"
    "from fedtwin.tracking.twin_pyfunc import TwinPyfunc\n\n"
    "mlflow.models.set_model(TwinPyfunc())\n"
)
