"""Saving and loading a twin as one file: weights, config, spec hash and the spec itself.

The file is a ``torch.save`` of plain containers (tensors, dicts, strings, numbers), loaded
with ``weights_only=True`` so that opening a model file never executes code. The spec's
canonical JSON travels with the weights: a model can be loaded without the YAML, and loading
it against a different spec fails with both hashes named. An optional ``interval_scale`` (the
calibrated predictive std per variable, fedtwin.evaluation.calibrate_intervals) travels too;
files without it load as uncalibrated.

Integrity: the file records two digests, checked on every load. ``parameters_digest``
(:func:`fedtwin.provenance.parameters_digest` of :func:`fedtwin.twin.get_parameters`) is the digest
the provenance chain records for a global model and the registry tags a registered twin with, so
a clinician can compare it with the model card (``fedtwin twin whatif --expect-digest``);
``content_digest`` covers everything else the file holds (every tensor of the state dict, the
config, the spec, the interval calibration). A file whose weights were edited after saving (a
tampered or corrupted model) is refused, naming both digests. The embedded digests stop an edit
by anything that does not rewrite them; only a digest from elsewhere (``--expect-digest``) stops
a deliberate forger. Files written before the digests existed load as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtwin.errors import FedTwinError
from fedtwin.spec import TwinSpec, spec_hash
from fedtwin.spec.io import canonical_json, spec_from_dict
from fedtwin.twin.config import TwinConfig
from fedtwin.twin.model import TwinModel

FORMAT = "fedtwin-twin-model/1"


def save_model(model: TwinModel, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "spec_hash": model.spec_hash,
        "spec_json": canonical_json(model.spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if model.interval_scale is not None:
        payload["interval_scale"] = [float(x) for x in model.interval_scale.tolist()]
    payload["parameters_digest"] = model_parameters_digest(model)
    payload["content_digest"] = _content_digest(payload)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(p)
    return p


def load_model(path: str | Path, spec: TwinSpec | None = None) -> TwinModel:
    """Load a model file; with ``spec``, require that it is the spec the model was trained for."""
    p = Path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FedTwinError(f"model file {p} does not exist", "pass the path written by save_model") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise FedTwinError(f"model file {p} cannot be read: {exc}", "pass a file written by fedtwin.twin.save_model") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedTwinError(f"{p} is not a FedTwin twin model file (format {FORMAT})", "pass a file written by save_model")
    stored_hash = str(payload["spec_hash"])
    stored_spec = spec_from_dict(json.loads(payload["spec_json"]), source=f"{p} (embedded spec)")
    if spec_hash(stored_spec) != stored_hash:
        raise FedTwinError(f"{p}: the embedded spec does not match its recorded hash {stored_hash}", "the file is corrupt; retrain or re-download it")
    if spec is not None:
        given = spec_hash(spec)
        if given != stored_hash:
            raise FedTwinError(
                f"model {p} was trained for spec hash {stored_hash}, but the given spec {spec.name!r} has hash {given}",
                "load the model with the spec it was trained for, or train a new model for this spec",
            )
    model = TwinModel(spec or stored_spec, TwinConfig.from_dict(payload["config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise FedTwinError(f"{p}: weights do not fit the model built from its config: {exc}", "the file is corrupt or from an incompatible FedTwin") from None
    scale = payload.get("interval_scale")
    if scale is not None:
        if len(scale) != model.n_vars or not all(isinstance(x, float) and x > 0 for x in scale):
            raise FedTwinError(f"{p}: the interval calibration does not fit the model's {model.n_vars} variables", "the file is corrupt; recalibrate or retrain")
        model.interval_scale = torch.tensor(scale, dtype=torch.float32)
    _check_digests(p, payload, model)
    model.eval()
    return model


def model_parameters_digest(model: TwinModel) -> str:
    """The digest of the model's parameters as the federation sends them (the one the chain and the registry record)."""
    from fedtwin.provenance.digests import parameters_digest
    from fedtwin.twin.parameters import get_parameters

    return parameters_digest(get_parameters(model))


def _content_digest(payload: dict) -> str:
    """Digest of everything a model file holds except its digests: every state-dict tensor (by name), config, spec, calibration."""
    from fedtwin.provenance.canonical import digest
    from fedtwin.provenance.digests import parameters_digest

    state = payload["state_dict"]
    names = sorted(state)
    tensors = parameters_digest([state[k].detach().cpu().numpy() for k in names])
    return digest({"format": payload["format"], "config": payload["config"], "spec_hash": payload["spec_hash"],
                   "spec_json": payload["spec_json"], "interval_scale": payload.get("interval_scale"),
                   "state_names": names, "state_tensors": tensors})


def _check_digests(p: Path, payload: dict, model: TwinModel) -> None:
    """Refuse a file whose content no longer matches the digests recorded when it was saved."""
    fix = ("do not use this file: the weights were changed after the model was saved (tampered or corrupted); "
           "use the file the training wrote, or load the registered model, and compare its parameters digest with the model card")
    recorded = payload.get("parameters_digest")
    if recorded is not None:
        got = model_parameters_digest(model)
        if got != recorded:
            raise FedTwinError(f"model file {p}: its parameters have digest {got}, but the file records {recorded}", fix)
    recorded = payload.get("content_digest")
    if recorded is not None:
        got = _content_digest(payload)
        if got != recorded:
            raise FedTwinError(f"model file {p}: its content has digest {got}, but the file records {recorded}", fix)
