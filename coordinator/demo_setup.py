"""``fedtwin demo``, before any round: the output folder, the hospitals, their checks, the consortium.

* :func:`prepare_output` accepts a new or empty folder, or (with ``--force``) a previous demo's
  folder (it holds :data:`MARKER`), and refuses anything else, naming the fix.
* :func:`synthesize_hospitals` and :func:`check_hospitals`: three heterogeneous SQLite hospitals
  (``fedtwin.synth``) and their data-quality gates (a failing site stops the demo, saying why).
* :func:`init_demo_consortium`: ``init_consortium`` with the ICU spec, SecAgg+ and a per-site
  budget, then the site configs' ``[data] database`` pointed at the synthesized hospitals and the
  study's MLflow store moved to ``<out>/mlflow`` (SQLite backend, artifacts beside it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedtwin.errors import FedTwinError

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = REPO / "specs" / "icu-hemodynamics.yaml"
MARKER = "fedtwin-demo.json"  # written first into every demo folder: what --force may replace
N_SITES = 3
STUDY_ID = "icu-demo"


@dataclass(frozen=True)
class DemoPaths:
    out: Path

    @property
    def hospitals(self) -> Path:
        return self.out / "hospitals"

    @property
    def consortium(self) -> Path:
        return self.out / "consortium"

    @property
    def mlflow_dir(self) -> Path:
        return self.out / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow_dir / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.mlflow_dir / "mlartifacts"  # where fedtwin.tracking.run_tracker puts them for an SQLite store

    @property
    def local_models(self) -> Path:
        return self.out / "local-only"

    def database(self, k: int) -> Path:
        return self.hospitals / f"site_{k}.db"


def prepare_output(out: Path, *, force: bool = False, options: dict | None = None) -> DemoPaths:
    """Make ``out`` ready for a demo (absolute), or raise a FedTwinError naming the fix."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FedTwinError(f"--out {out} is a file, not a folder", "pass --out NEW_FOLDER (it is created)")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FedTwinError(
                f"--out {out} is a non-empty folder that is not a previous FedTwin demo (no {MARKER} in it); "
                "refusing to write into it",
                "pass --out NEW_FOLDER (or an empty one); --force only replaces a previous demo's folder",
            )
        if not force:
            raise FedTwinError(
                f"--out {out} already holds a previous FedTwin demo",
                f"pass --out NEW_FOLDER, or add --force to delete that demo and start over in {out}",
            )
        consortium = out / "consortium"
        if (consortium / "consortium.toml").is_file():  # never delete the folder of a running consortium
            from coordinator.consortium import down

            down(consortium)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise FedTwinError(f"--out {out} is not writable", "pass --out a folder you can write to")
    (out / MARKER).write_text(json.dumps({"created": time.time(), "options": options or {}}, indent=2, default=str) + "\n")
    return DemoPaths(out)


def synthesize_hospitals(paths: DemoPaths, patients: int, seed: int, on_site_done: Callable[[object], None]) -> list:
    """Three heterogeneous ICU hospitals (unequal sizes) as SQLite databases; their summaries."""
    from fedtwin.synth import SynthRequest, synthesize

    return synthesize(SynthRequest(sites=N_SITES, patients=patients, seed=seed, out=paths.hospitals, workers=2),
                      on_site_done=on_site_done)


def check_hospitals(paths: DemoPaths, spec, on_site_done: Callable[[], None] = lambda: None) -> list:
    """Each site's data-quality gate; the first failing site stops the demo with its problems and fixes."""
    from fedtwin.omop import open_database
    from fedtwin.quality import run_quality_checks

    reports = []
    for k in range(1, N_SITES + 1):
        db = open_database(str(paths.database(k)))
        report = run_quality_checks(db, spec)
        err = report.blocking_error()
        if err is not None:
            raise FedTwinError(
                f"site_{k} ({paths.database(k)}) fails its data-quality gate, so it cannot join the federation: {err.problem}",
                f"{err.fix}\n  (or run the demo with more patients: --patients N)",
            )
        reports.append(report)
        on_site_done()
    return reports


def _rewrite(path: Path, model_cls, edit: Callable[[dict], None], header: str):
    from fedtwin.federation.config import read_toml, validate_toml_data, write_toml

    data = read_toml(path)
    edit(data)
    model = validate_toml_data(model_cls, data, str(path))
    write_toml(path, model, header)
    return model


def init_demo_consortium(paths: DemoPaths, *, rounds: int, epsilon: float, budget_epsilon: float, delta: float = 1e-5) -> Path:
    """A 3-site local consortium for the ICU spec, wired to the demo's hospitals and MLflow store."""
    from coordinator.consortium import init_consortium
    from fedtwin.federation.config import SiteConfig, StudyConfig

    root = paths.consortium
    init_consortium(
        root, sites=N_SITES, name="fedtwin-demo", study_id=STUDY_ID, spec=SPEC_PATH, rounds=rounds, min_sites=N_SITES,
        # 3 shares, threshold 2: one site that fails in a round does not halt it (docs/reliability.md)
        secagg={"enabled": True, "num_shares": 3, "reconstruction_threshold": 2, "timeout": 60.0},
        epsilon=budget_epsilon, delta=delta,
        runtime={"preload": ["torch", "site_agent.client_app"]},
    )
    for k in range(1, N_SITES + 1):
        cfg_path = root / "sites" / f"site_{k}.toml"
        rel = os.path.relpath(paths.database(k), cfg_path.parent)

        def point(data: dict, rel: str = rel) -> None:
            data["data"]["database"] = rel

        _rewrite(cfg_path, SiteConfig, point,
                 f"FedTwin site configuration of site_{k} (written by `fedtwin consortium init`; `fedtwin demo` pointed\n"
                 "[data] database at the demo's synthetic hospital). Paths are relative to this file's folder.")
    paths.mlflow_dir.mkdir(parents=True, exist_ok=True)

    def track(data: dict) -> None:
        data["tracking"] = {"mlflow_tracking_uri": paths.tracking_uri, "experiment": STUDY_ID}
        if "training" in StudyConfig.model_fields:  # what each site may spend on the study (all rounds)
            data.setdefault("training", {})["epsilon_per_site"] = epsilon

    _rewrite(root / "study.toml", StudyConfig, track,
             "FedTwin study of `fedtwin demo` (written by `fedtwin consortium init`, MLflow store moved under the demo folder).\n"
             "Paths are relative to this file's folder.")
    create_experiment(paths)
    from site_agent.approval import approve_for_sites  # each hospital approves the study's spec and code version

    approve_for_sites(sorted((root / "sites").glob("site_*.toml")), None, approved_by="fedtwin demo")
    return root


def create_experiment(paths: DemoPaths) -> str:
    """The study's MLflow experiment, made here so that its artifacts live under ``<out>/mlflow/artifacts``
    (an experiment the ServerApp creates itself would put them in ./mlruns of its working folder)."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating initial MLflow database tables..." in the demo's output
    client = MlflowClient(tracking_uri=paths.tracking_uri)
    exp = client.get_experiment_by_name(STUDY_ID)
    if exp is not None:
        return exp.experiment_id
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(STUDY_ID, artifact_location=paths.artifacts.as_uri())
