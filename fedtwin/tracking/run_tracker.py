"""MLflow per-round tracking for FedTwin's ServerApp (one experiment per study, one run per launch).

Used by :mod:`coordinator.server_app` (and :func:`check_tracking_uri` by ``fedtwin coordinator
launch``, before anything runs). The MLflow run id is stored beside the study's checkpoints
(``RUN_ID_FILE``) so that a resumed launch keeps logging into the same run. Per round (step =
round number): ``sites`` (sites in the aggregate), ``round_seconds``, ``halted`` (0/1) and
``epsilon_spent.<site>`` (each site's composed epsilon as it reports it). Evaluations (step = the
round that produced the scored model; 0 = the initial model): ``eval.<metric key>`` with
``.ci_low``/``.ci_high`` (headline metrics, see
:func:`fedtwin.federation.round_evaluation.headline_metrics`) and the whole suppressed report as
the artifact ``evaluation/<name>.json``. With an SQLite store, artifacts go to ``mlartifacts/``
beside the database file (not to the ServerApp's working directory).

Only :class:`mlflow.MlflowClient` is used (no global active run), so nothing leaks between runs.
Heavy imports (mlflow) happen inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message says which store and why."""


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):]
    if not rest.startswith("///"):
        raise TrackingError(f"MLflow tracking URI {uri!r}: an SQLite store is sqlite:///ABSOLUTE/PATH/mlflow.db (three slashes + path)")
    path = rest[3:].split("?", 1)[0]
    if not path or path == ":memory:":
        raise TrackingError(f"MLflow tracking URI {uri!r}: give an SQLite file, e.g. sqlite:////tmp/mlflow.db")
    return Path(path)  # sqlite:////abs/path.db -> /abs/path.db; sqlite:///rel.db -> rel.db (cwd)


def check_tracking_uri(uri: str) -> None:
    """Cheap checks that need no MLflow import: a known scheme; an SQLite file in a writable folder."""
    uri = (uri or "").strip()
    if not uri:
        raise TrackingError("the MLflow tracking URI is empty (study.toml [tracking] mlflow_tracking_uri)")
    db = _sqlite_path(uri)
    if db is not None:
        folder = db.parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} is not writable")
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: {db} is not writable")
        return
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("http", "https", "file", "postgresql", "mysql", "mssql", "databricks") and not uri.startswith("/"):
        raise TrackingError(f"MLflow tracking URI {uri!r}: unsupported scheme (use sqlite:///PATH, file:///PATH or http(s)://HOST)")


class RoundTracker:
    """One MLflow run of a study; ``log_round`` once per round, ``close`` at the end."""

    def __init__(self, uri: str, study_id: str, run_dir: Path | None, params: dict[str, Any], resume: bool) -> None:
        check_tracking_uri(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient

        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(study_id)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                db = _sqlite_path(uri)
                where = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
                exp_id = self.client.create_experiment(study_id, artifact_location=where)
            id_file = Path(run_dir) / RUN_ID_FILE if run_dir is not None else None
            self.run_id = None
            if resume and id_file is not None and id_file.is_file():
                rid = id_file.read_text().strip()
                run = self.client.get_run(rid)
                if run.info.experiment_id != exp_id:
                    raise TrackingError(f"MLflow run {rid} ({id_file}) is not in experiment {study_id!r} of {uri}")
                self.run_id = rid
                self.client.update_run(rid, status="RUNNING")
                have = dict(run.data.params)
                for k, v in params.items():
                    if k not in have:
                        self.client.log_param(rid, k, v)
                    elif have[k] != str(v):  # params are immutable in MLflow: record the change as a tag
                        self.client.set_tag(rid, f"resumed.{k}", str(v))
                self.client.set_tag(rid, "resumed", "true")
            else:
                run = self.client.create_run(exp_id, tags={"fedtwin.study": study_id})
                self.run_id = run.info.run_id
                for k, v in params.items():
                    self.client.log_param(self.run_id, k, v)
                if id_file is not None:  # beside the checkpoints: a resumed launch continues this run
                    id_file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = id_file.with_suffix(".tmp")
                    tmp.write_text(self.run_id + "\n")
                    os.replace(tmp, id_file)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - any MLflow failure here means "the store is unusable"
            raise TrackingError(f"MLflow store {uri} cannot be used: {type(exc).__name__}: {exc}") from exc

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics at ``step`` (batches of at most 900: MLflow takes 1000 per call)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in sorted(metrics.items())]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])

    def log_round(self, server_round: int, sites: int, seconds: float, halted: bool, epsilon: dict[str, float]) -> dict[str, float]:
        """The round's metrics at step ``server_round``; returns what was logged (the round record holds the same)."""
        metrics = round_metrics(sites, seconds, halted, epsilon)
        self.log_metrics(server_round, metrics)
        return metrics

    def log_evaluation(self, step: int, report: dict[str, Any], name: str) -> dict[str, float]:
        """Headline metrics of an evaluation report at ``step``, and the report as a JSON artifact."""
        metrics = evaluation_metrics(report)
        self.log_metrics(step, metrics)
        self.client.log_dict(self.run_id, report, f"evaluation/{name}.json")
        return metrics

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_dir: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def round_metrics(sites: int, seconds: float, halted: bool, epsilon: dict[str, float]) -> dict[str, float]:
    """``sites``, ``round_seconds``, ``halted`` (0/1), ``epsilon_spent.<site>``: one round's line in MLflow."""
    out = {"sites": float(sites), "round_seconds": float(seconds), "halted": 1.0 if halted else 0.0}
    out.update({f"epsilon_spent.{site}": float(eps) for site, eps in sorted(epsilon.items())})
    return out


def evaluation_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``eval.<headline metric>`` and ``fair.<gap>`` of a (suppressed) evaluation report."""
    from fedtwin.federation import round_evaluation as ev

    out = {f"eval.{k}": float(v) for k, v in ev.headline_metrics(report).items()}
    fairness = getattr(ev, "fairness_headline", None)
    if fairness is not None:
        out.update({f"fair.{k}": float(v) for k, v in fairness(report).items()})
    return out
