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
import time
from pathlib import Path
from typing import Any, Callable

RUN_ID_FILE = "mlflow_run_id"
RETRY_FIRST_WAIT = 5.0  # seconds before the first retry of a failed MLflow write; doubles up to RETRY_MAX_WAIT
RETRY_MAX_WAIT = 60.0
DRAIN_SECONDS = 600.0  # how long the end of a run keeps retrying writes that have not reached MLflow


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


UNREACHABLE_HINTS = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
                     "timed out", "temporarily unavailable", "database is locked", "bad gateway", "service unavailable",
                     "gateway timeout", "name or service not known", "remotedisconnected")


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the MLflow store could not be reached (worth retrying), not that it refused the write.

    MLflow wraps a refused connection in ``MlflowException("API request to ... failed with
    exception HTTPConnectionPool(...): Max retries exceeded ...")``, so the exception chain's
    types (OSError covers ``requests``' and ``urllib3``'s connection errors) and its messages are
    both looked at.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, TimeoutError)):
            return True
        text = str(e).lower()
        if any(h in text for h in UNREACHABLE_HINTS):
            return True
        e = e.__cause__ or e.__context__
    return False


class BufferedWrites:
    """MLflow writes kept in order and retried, so that a tracking server that is down for a while
    loses none of a run's records.

    Why: the ServerApp logs each round to MLflow right after its checkpoint and signed record are on
    disk. A write that fails (the server is down or unreachable) used to be dropped with a warning,
    leaving MLflow without the round (and the audit without its metrics). Now a failed write stays
    queued, and so does every later write (order matters: a run is terminated after its metrics);
    the queue is retried at the next write once the back-off (5 s, doubling, at most 60 s) has
    passed, and :meth:`drain` keeps retrying for a bounded time at the end of the run.

    Every failure prints ``FEDTWIN tracking_error what=... pending=N retry_in=S reason=...``, the
    first successful flush after failures ``FEDTWIN tracking_recovered written=N``; ``say`` (print
    by default) is where these lines go. Only a store that cannot be reached is waited for
    (:func:`unreachable`); a write the store refuses is reported (``FEDTWIN warning: MLflow write
    ... failed (not retried ...)``) and skipped, as before. Writes must be safe to run again after
    an error part-way (MLflow metrics, params of the same value, tags and artifacts are).
    """

    def __init__(self, say: Callable[[str], None] | None = None, *, first_wait: float = RETRY_FIRST_WAIT,
                 max_wait: float = RETRY_MAX_WAIT, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.say = say or (lambda line: print(line, flush=True))
        self.first_wait, self.max_wait = float(first_wait), float(max_wait)
        self.clock, self.sleep = clock, sleep
        self.pending: list[tuple[str, Callable[[], Any]]] = []
        self.failures = 0  # consecutive failed attempts
        self.next_try = 0.0  # clock() time of the next attempt while writes are pending
        self.written_after_failure = 0

    def submit(self, what: str, call: Callable[[], Any]) -> bool:
        """Queue ``call`` (described by ``what``) and write what is due; True when nothing is pending."""
        self.pending.append((what, call))
        if len(self.pending) > 1 and self.clock() < self.next_try:
            return False  # the server failed recently: wait for the back-off instead of failing once per write
        return self.flush()

    def flush(self) -> bool:
        """Write the pending calls in order, stopping at the first failure; True when none is left."""
        while self.pending:
            what, call = self.pending[0]
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a store that cannot be reached: keep the write, retry later
                if not unreachable(exc):
                    # retrying cannot help (a bad value, a bug): say so and go on, as before buffering
                    self.pending.pop(0)
                    self.say(f"FEDTWIN warning: MLflow write {what} failed (not retried: the store answered): "
                             f"{' '.join(f'{type(exc).__name__}: {exc}'.split())[:300]}")
                    continue
                self.failures += 1
                wait = min(self.max_wait, self.first_wait * 2 ** (self.failures - 1))
                self.next_try = self.clock() + wait
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                self.say(f"FEDTWIN tracking_error what={what} pending={len(self.pending)} retry_in={wait:.0f}s reason={reason}")
                return False
            self.pending.pop(0)
            if self.failures:
                self.written_after_failure += 1
        if self.failures:
            self.say(f"FEDTWIN tracking_recovered written={self.written_after_failure} (every write held back is now in MLflow)")
            self.failures, self.written_after_failure = 0, 0
        return True

    def drain(self, seconds: float = DRAIN_SECONDS) -> bool:
        """Retry the pending writes (with the back-off) for at most ``seconds``; True when none is left."""
        deadline = self.clock() + seconds
        while not self.flush():
            now = self.clock()
            if self.next_try > deadline:
                return False
            self.sleep(max(0.0, self.next_try - now))
        return True

    def unwritten(self) -> list[str]:
        return [what for what, _ in self.pending]


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
