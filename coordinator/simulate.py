"""``fedtwin simulate``: the federated twin on N synthetic hospitals in Flower's simulation engine.

The same ServerApp (``coordinator.server_app:app``) and ClientApp (``site_agent.client_app:app``)
as a deployment, with SecAgg+ on by default, run inside one process by Flower 1.41's simulation
engine (Ray backend): the ServerApp in a thread, each site's ClientApp in a pool of Ray actors.
There are no SuperLink/SuperNode processes, no TLS and no node authentication.

What :func:`simulate` does, in ``out``:

1. ``hospitals/``: ``sites`` small synthetic ICU hospitals (:mod:`fedtwin.synth`, OMOP in SQLite),
   ``patients`` each or ``sizes[k]`` at site k+1; or, with ``hospitals=DIR``, the databases a
   ``fedtwin synth`` run already wrote there, used in place (several runs, e.g. the arms of a
   study, then train on the very same patients).
2. ``consortium/``: ``init_consortium`` writes the site configs (``sites/site_<k>.toml``, each
   pointed at its hospital's database), the study config and keys (unused in simulation).
3. The initial global twin (a fresh ``TwinModel`` seeded by ``seed``) is written as checkpoint
   round 0 (``consortium/checkpoints/<study>/round-0000.npz``) and the ServerApp starts from it with
   ``resume = true``: the starting point is recorded and reproducible.
4. The run config is :func:`coordinator.launch.build_run_config` of the study plus
   ``site-config-dir``; virtual SuperNode ``partition-id`` p reads ``site_<p+1>.toml``
   (:func:`site_agent.client_app.site_config_path`).
5. ``final.npz`` holds the final global parameters, ``simulation.log`` the ServerApp's output
   and Flower's log, ``result.json`` the outcome and timings.

Flower 1.41's public ``run_simulation`` takes no run config, so this calls the function behind it
(``flwr.simulation.run_simulation._run_simulation``) the way Flower's own ``flwr-simulation``
process does: app folder ``apps/fedtwin``, component strings, a ``Run`` carrying the run config
overrides and a ServerApp ``Context`` holding the fused run config.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import typer

from fedtwin.federation.errors import ConsortiumError

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "fedtwin"
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"  # fedtwin.synth writes ICU stays: this spec's cohort is not empty
STUDY_ID = "simulation"
ROUND_RE = re.compile(r"FEDTWIN round=(\d+) status=(\w+) sites=(\d+)")
EVAL_RE = re.compile(r"FEDTWIN evaluation round=(\d+) status=(\w+) sites=(\d+)")  # the ServerApp's last, scoring-only round
STAGE_RE = re.compile(r"^\[Stage (\d)\] (.*)$")
MAX_PATIENTS = 1000  # SecAgg+ max_weight: a site reporting more examples would overflow the masked sum
# the ICU spec's data-quality gate needs a cohort of cohort.min_patients (50) persons, or the site
# refuses every round; a synthetic hospital of N patients has a few fewer (under-18 admissions)
MIN_PATIENTS = 60
#: run-config keys a caller may set for the sites' local training (the rest comes from the study)
TRAINING_KEYS = frozenset({"local-epochs", "batch-size", "learning-rate", "max-grad-norm", "evaluate"})


@dataclass
class SimRound:
    round: int
    status: str  # completed | halted
    sites: int
    seconds: float  # from Flower's "[ROUND r]" to the ServerApp's "FEDTWIN round=r" line
    stages: dict[str, float] = field(default_factory=dict)  # SecAgg+ stage -> seconds from sending to all replies in


@dataclass
class SimulationResult:
    ok: bool
    message: str
    out: Path
    sites: int
    rounds_requested: int
    secagg: bool
    patients: int
    epsilon: float  # each site's budget for the whole run
    parallel: int
    rounds: list[SimRound] = field(default_factory=list)  # training rounds
    evaluation: SimRound | None = None  # the evaluation-only round, if the ServerApp ran one
    setup_seconds: float = 0.0  # synthesis + configs + initial model
    run_seconds: float = 0.0  # the simulation engine: Ray start, ServerApp, all rounds, Ray stop
    total_seconds: float = 0.0
    peak_rss_mb: float | None = None  # sum of RSS over this process and its descendants (Ray), sampled
    initial_path: Path | None = None
    final_path: Path | None = None
    log_path: Path | None = None
    run_config: dict = field(default_factory=dict)
    sizes: list[int] | None = None  # patients per site when they differ (synthesized with sizes=)
    hospitals: Path | None = None  # the hospitals' folder (out/hospitals, or the one passed in)

    @property
    def seconds_per_round(self) -> float | None:
        done = [r.seconds for r in self.rounds]
        return sum(done) / len(done) if done else None

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["seconds_per_round"] = self.seconds_per_round
        return d


# ------------------------------------------------------------------------------- capture helpers


class _Tee:
    """Replaces sys.stdout during the run: hands each complete line to ``on_line``.

    What ``on_line`` itself prints (a caller's echo) goes straight to ``real``, not back in here.
    """

    def __init__(self, on_line: Callable[[str], None], real) -> None:  # noqa: ANN001 - a text stream
        self.on_line = on_line
        self.real = real
        self.buf = ""
        self.lock = threading.Lock()
        self.inside = threading.local()

    def write(self, s: str) -> int:
        if getattr(self.inside, "on", False):
            return self.real.write(s)
        with self.lock:
            self.buf += s
            *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self._deliver(line)
        return len(s)

    def _deliver(self, line: str) -> None:
        self.inside.on = True
        try:
            self.on_line(line)
        finally:
            self.inside.on = False

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def close_pending(self) -> None:
        if self.buf:
            line, self.buf = self.buf, ""
            self._deliver(line)


class _FlowerLogHandler(logging.Handler):
    """Flower's log (the ``flwr`` logger) into simulation.log, and its round/stage events to ``on_event``."""

    def __init__(self, write: Callable[[str], None], on_event: Callable[[str, str], None]) -> None:
        super().__init__(logging.DEBUG)
        self.write = write
        self.on_event = on_event

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        m = STAGE_RE.match(msg)
        if record.levelno >= logging.INFO or m:
            self.write(f"flwr {record.levelname} {msg}")
        if msg.startswith("[ROUND "):
            self.on_event("round", msg.strip("[]").split()[-1])
        elif m:
            self.on_event("stage", msg)


class _RssSampler:
    """Peak of the summed RSS of this process and all its descendants (Linux /proc), every ``interval`` s."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @staticmethod
    def _tree_rss_kb(root: int) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as fh:
                    ppid, kb = None, 0
                    for line in fh:
                        if line.startswith("PPid:"):
                            ppid = int(line.split()[1])
                        elif line.startswith("VmRSS:"):
                            kb = int(line.split()[1])
            except (OSError, ValueError):
                continue
            if ppid is not None:
                parents[int(entry)] = ppid
                rss[int(entry)] = kb
        total = 0
        for pid, kb in rss.items():
            p, seen = pid, 0
            while p and p != root and seen < 64:
                p, seen = parents.get(p, 0), seen + 1
            if p == root:
                total += kb
        return total

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._tree_rss_kb(me))
            self._stop.wait(self.interval)

    def start(self) -> "_RssSampler":
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def stop(self) -> float | None:
        if not self._thread.is_alive():
            return None
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_kb / 1024.0


# ---------------------------------------------------------------------------------- preparation


def _check_options(sites: int, rounds: int, patients: int, secagg: bool, epsilon: float, parallel: int,
                   sizes: Sequence[int] | None = None, hospitals: Path | None = None,
                   training: Mapping[str, Any] | None = None) -> None:
    if sites < 1:
        raise ConsortiumError(f"--sites {sites}: a federation needs at least one site", "use --sites 2 or more")
    if secagg and sites < 2:
        raise ConsortiumError(
            f"--sites {sites}: SecAgg+ needs at least 2 sites (a sum of one site's update would be that update)",
            "use --sites 2 or more, or pass --no-secagg",
        )
    if rounds < 1:
        raise ConsortiumError(f"--rounds {rounds}: must be at least 1", "use --rounds 1 or more")
    for n in ([patients] if sizes is None else list(sizes)):
        if not MIN_PATIENTS <= n <= MAX_PATIENTS:
            raise ConsortiumError(
                f"{'--patients' if sizes is None else 'a site size of'} {n}: must be between {MIN_PATIENTS} and {MAX_PATIENTS}",
                f"below {MIN_PATIENTS} a hospital's cohort can fall under the spec's data-quality minimum (cohort.min_patients) "
                f"and its site refuses every round; above {MAX_PATIENTS} a site's example count exceeds SecAgg+'s "
                "max_weight and the masked sum overflows",
            )
    if sizes is not None and len(sizes) != sites:
        raise ConsortiumError(f"sizes has {len(sizes)} entries for {sites} sites", "give one patient count per site")
    if hospitals is not None:
        if sizes is not None:
            raise ConsortiumError("sizes and hospitals were both given", "sizes are for synthesizing; existing hospitals have theirs")
        missing = [f"site_{k}.db" for k in range(1, sites + 1) if not (Path(hospitals) / f"site_{k}.db").is_file()]
        if missing:
            raise ConsortiumError(f"{hospitals} lacks {', '.join(missing)}",
                                  f"pass the folder `fedtwin synth --sites {sites} --out DIR` wrote (SQLite)")
    unknown = sorted(set(training or {}) - TRAINING_KEYS)
    if unknown:
        raise ConsortiumError(f"training options {unknown} cannot be set here", f"choose from {sorted(TRAINING_KEYS)}")
    if not epsilon > 0:
        raise ConsortiumError(f"--epsilon {epsilon}: must be positive", "give each site's total budget, e.g. --epsilon 8")
    if parallel < 1:
        raise ConsortiumError(f"--parallel {parallel}: must be at least 1", "use --parallel 1 or 2 on a 2-core machine")


def _point_site_at(site_toml: Path, database: Path) -> None:
    """Rewrite ``[data] database`` of a site config (relative to the config's folder)."""
    from fedtwin.federation.config import load_site_config, write_toml

    cfg = load_site_config(site_toml, resolve=False)
    rel = os.path.relpath(database, site_toml.parent)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"database": rel})})
    write_toml(
        site_toml, cfg,
        f"FedTwin site configuration of {cfg.site.name} for `fedtwin simulate` (written by `fedtwin consortium init`,\n"
        "database pointed at the site's synthetic hospital). Paths are relative to this file's folder. Keys and\n"
        "[trust] are not used in simulation (no TLS, no SuperNode authentication).",
    )


def secagg_shares(sites: int) -> dict:
    """SecAgg+ neighbourhoods: every site up to 11 sites, else 11 share holders (threshold 7).

    Flower's SecAgg+ needs an odd integer ``num_shares`` (an even one crashes key sharing).

    Flower's key sharing and unmasking grow with sites x shares; with every site sharing with
    every other one a 50-site round was dominated by them (docs/simulation.md).
    """
    if sites <= 11:
        return {"num_shares": 1.0, "reconstruction_threshold": 0.67}
    return {"num_shares": 11, "reconstruction_threshold": 7}


def prepare(out: Path, *, sites: int, rounds: int, patients: int, seed: int, secagg: bool, epsilon: float,
            stage_timeout: float, mlflow: bool, on_step: Callable[[str], None] = lambda _s: None,
            sizes: Sequence[int] | None = None, hospitals: Path | None = None,
            training: Mapping[str, Any] | None = None) -> tuple[dict, Path]:
    """Synthesize (unless ``hospitals`` names existing ones), init the consortium, write the round-0
    checkpoint; returns (run config, initial checkpoint). ``training`` overrides run-config keys of
    :data:`TRAINING_KEYS`."""
    import torch

    from coordinator.consortium.consortium import init_consortium
    from coordinator.launch import build_run_config, provenance_keys, study_checkpoint_dir
    from coordinator.server_app import write_checkpoint
    from fedtwin.federation.config import load_study_config
    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.synth import SynthRequest, synthesize
    from fedtwin.twin import TwinModel, get_parameters

    if hospitals is None:
        hospitals = out / "hospitals"
        counts = list(sizes) if sizes is not None else [patients] * sites
        on_step(f"synthesizing {sites} hospitals x {patients} patients" if sizes is None
                else f"synthesizing {sites} hospitals of {', '.join(map(str, counts))} patients")
        synthesize(SynthRequest(sites=sites, patients=patients, seed=seed, out=hospitals, sizes=counts, workers=1))
    hospitals = Path(hospitals).resolve()

    on_step("writing site and study configs")
    root = out / "consortium"
    sec = {"enabled": bool(secagg), "timeout": float(stage_timeout), **(secagg_shares(sites) if secagg else {})}
    init_consortium(root, sites=sites, spec=SPEC, rounds=rounds, study_id=STUDY_ID, min_sites=sites, secagg=sec, epsilon=epsilon)
    for k in range(1, sites + 1):
        _point_site_at(root / "sites" / f"site_{k}.toml", hospitals / f"site_{k}.db")
    from site_agent.approval import approve_for_sites  # every simulated hospital approves the study

    approve_for_sites(sorted((root / "sites").glob("site_*.toml")), None, approved_by="fedtwin simulate")
    study = load_study_config(root / "study.toml")
    spec = load_spec(study.study.spec)
    h = spec_hash(spec)

    on_step("initial global twin (checkpoint round 0)")
    torch.manual_seed(seed)
    initial = write_checkpoint(study_checkpoint_dir(study), 0, h, get_parameters(TwinModel(spec)))

    cfg = build_run_config(study, spec_hash=h, rounds=rounds, resume=True, output_path=out / "final.npz",
                           mlflow_uri=None if mlflow else "", epsilon=float(epsilon))
    cfg["site-config-dir"] = str(root / "sites")
    cfg.update(dict(training or {}))
    cfg.update(provenance_keys(root))
    return cfg, initial


# ------------------------------------------------------------------------------------- the run


def _run_engine(run_config: dict, sites: int, parallel: int, verbose: bool) -> None:
    """Flower 1.41's simulation engine on apps/fedtwin, as ``flwr-simulation`` starts it, with ``run_config``."""
    import ray
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore import telemetry
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType
    from flwr.common.config import get_project_config

    telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read at import; no network here anyway
    components = get_project_config(APP_DIR)["tool"]["flwr"]["app"]["components"]
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(APP_DIR, run.override_config)  # raises on a key pyproject.toml does not declare
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # always a fresh local Ray instance, never someone else's cluster on this machine
            "num_cpus": int(parallel),
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "WARNING",
            "log_to_driver": bool(verbose),
        },
        "actor": {"tensorflow": 0},
    }
    started_ray = not ray.is_initialized()
    old_pythonpath = os.environ.get("PYTHONPATH")
    try:
        _run_simulation(
            num_supernodes=sites,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
            backend_name="ray",
            backend_config=backend_config,
            client_app_attr=components["clientapp"],
            server_app_attr=components["serverapp"],
            server_app_context=context,
            app_dir=str(APP_DIR),
            run=run,
            verbose_logging=verbose,
            is_app=True,
        )
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        if old_pythonpath is None:  # Flower's Ray backend sets PYTHONPATH to sys.path for its workers
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath


def default_out() -> Path:
    return Path("fedtwin-simulate") / dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def simulate(
    sites: int = 10,
    rounds: int = 1,
    *,
    patients: int = 60,
    seed: int = 7,
    out: str | Path | None = None,
    secagg: bool = True,
    epsilon: float = 8.0,
    parallel: int = 2,
    stage_timeout: float | None = None,
    mlflow: bool = False,
    verbose: bool = False,
    echo: Callable[[str], None] | None = None,
    on_event: Callable[[str, str], None] | None = None,
    sizes: Sequence[int] | None = None,
    hospitals: str | Path | None = None,
    training: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds on ``sites`` synthetic hospitals in Flower's simulation engine.

    ``epsilon`` is each site's privacy budget for the whole run (the ledger's budget, and what the
    run config lets the rounds spend together).
    ``parallel`` ClientApps run at once (Ray CPUs; one CPU per ClientApp). ``stage_timeout`` bounds
    each SecAgg+ stage (default ``max(300, 20 * sites)`` s). ``echo`` receives the ServerApp's
    ``FEDTWIN`` lines; ``on_event(kind, detail)`` gets ``("setup", step)``, ``("round", r)``,
    ``("stage", text)`` and ``("line", line)`` as they happen. Raises :class:`ConsortiumError` for
    bad options; a run that fails or halts returns ``ok=False`` with the reason.

    Hospitals of unequal size: ``sizes`` (patients per site, instead of ``patients`` each). The same
    patients for several runs (a study comparing arms): ``hospitals``, the folder of an earlier
    ``fedtwin synth`` run with ``site_1.db`` ... ``site_<sites>.db``, used in place (the sites only
    read them). ``training`` sets the sites' local training for this run (keys of
    :data:`TRAINING_KEYS`, e.g. ``{"local-epochs": 3.0, "evaluate": False}``).
    """
    hospitals = Path(hospitals).resolve() if hospitals is not None else None
    _check_options(sites, rounds, patients, secagg, epsilon, parallel, sizes, hospitals, training)
    out_path = Path(out) if out is not None else default_out()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise ConsortiumError(f"{out_path} already exists and is not an empty folder", "pass --out NEW_FOLDER (or omit it for a fresh one)")
    out_path.mkdir(parents=True, exist_ok=True)
    out_path = out_path.resolve()
    timeout = float(stage_timeout) if stage_timeout is not None else max(300.0, 20.0 * sites)
    event = on_event or (lambda _k, _d: None)

    t0 = time.monotonic()
    run_config, initial = prepare(out_path, sites=sites, rounds=rounds, patients=patients, seed=seed, secagg=secagg,
                                  epsilon=epsilon, stage_timeout=timeout, mlflow=mlflow,
                                  on_step=lambda s: event("setup", s), sizes=sizes, hospitals=hospitals, training=training)
    t_setup = time.monotonic() - t0
    res = SimulationResult(
        ok=False, message="", out=out_path, sites=sites, rounds_requested=rounds, secagg=secagg, patients=patients,
        epsilon=epsilon, parallel=parallel, setup_seconds=t_setup,
        initial_path=initial, final_path=Path(run_config["output-path"]), log_path=out_path / "simulation.log",
        run_config=run_config, sizes=list(sizes) if sizes is not None else None,
        hospitals=hospitals if hospitals is not None else out_path / "hospitals",
    )

    log_fh = open(res.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    log_lock = threading.Lock()
    round_start: dict[int, float] = {}
    stage_marks: dict[int, list[tuple[float, str]]] = {}
    current = {"round": 0}

    def stages_of(r: int) -> dict[str, float]:
        out: dict[str, float] = {}
        sent: dict[str, float] = {}
        for t, text in stage_marks.get(r, []):
            m = STAGE_RE.match(text)
            if not m:
                continue
            key = f"stage{m.group(1)}"
            if m.group(2).startswith("Received"):
                if key in sent:
                    out[key] = t - sent[key]
            else:
                sent[key] = t
        return out
    outcomes: list[SimRound] = []
    lines: list[str] = []

    def write_log(line: str) -> None:
        with log_lock:
            log_fh.write(f"{time.time():.3f} {line}\n")
            log_fh.flush()

    def on_flower(kind: str, detail: str) -> None:
        if kind == "round":
            current["round"] = int(detail)
            round_start[int(detail)] = time.monotonic()
        elif kind == "stage":
            stage_marks.setdefault(current["round"], []).append((time.monotonic(), detail))
        event(kind, detail)

    def on_line(line: str) -> None:
        now = time.monotonic()
        write_log(line)
        lines.append(line)
        m = ROUND_RE.match(line)
        if m:
            r = int(m.group(1))
            outcomes.append(SimRound(r, m.group(2), int(m.group(3)), now - round_start.get(r, now), stages_of(r)))
        m = EVAL_RE.match(line)
        if m:
            r = int(m.group(1))
            res.evaluation = SimRound(r, m.group(2), int(m.group(3)), now - round_start.get(r, now), stages_of(r))
        if line.startswith("FEDTWIN") and echo:
            echo(line)
        event("line", line)

    flwr_logger = logging.getLogger("flwr")
    handler = _FlowerLogHandler(write_log, on_flower)
    old_level = flwr_logger.level
    console_levels = [(h, h.level) for h in flwr_logger.handlers]
    if not verbose:  # Flower's console log goes to simulation.log; the terminal gets the progress and FEDTWIN lines
        for h, _lvl in console_levels:
            h.setLevel(logging.WARNING)
    flwr_logger.addHandler(handler)
    flwr_logger.setLevel(logging.DEBUG)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    old_stdout = sys.stdout
    tee = _Tee(on_line, old_stdout)
    sampler = _RssSampler().start()
    t1 = time.monotonic()
    error: BaseException | None = None
    try:
        sys.stdout = tee
        _run_engine(run_config, sites, parallel, verbose)
    except Exception as exc:  # noqa: BLE001 - reported in the result
        error = exc
    finally:
        sys.stdout = old_stdout
        tee.close_pending()
        res.peak_rss_mb = sampler.stop()
        flwr_logger.removeHandler(handler)
        flwr_logger.setLevel(old_level)
        for h, lvl in console_levels:
            h.setLevel(lvl)
        log_fh.close()
    res.run_seconds = time.monotonic() - t1
    res.total_seconds = time.monotonic() - t0
    res.rounds = sorted(outcomes, key=lambda r: r.round)

    halted = [r.round for r in res.rounds if r.status != "completed"]
    short = [r.round for r in res.rounds if r.status == "completed" and r.sites != sites]
    if error is not None:
        why = f"{type(error).__name__}: {error}"
        cause = error.__cause__
        if cause is not None:
            why += f" ({type(cause).__name__}: {cause})"
        res.message = f"the simulation failed: {why}; see {res.log_path}"
    elif halted:
        res.message = (f"round(s) {', '.join(map(str, halted))} halted (a site failed or refused, or too few sites reached the "
                       f"SecAgg+ threshold): see {res.log_path}")
    elif [r.round for r in res.rounds] != list(range(1, rounds + 1)):
        res.message = f"expected rounds 1..{rounds}, the ServerApp reported {[r.round for r in res.rounds]}: see {res.log_path}"
    elif not res.final_path.is_file():
        res.message = f"the ServerApp did not write {res.final_path}: see {res.log_path}"
    else:
        res.ok = True
        res.message = f"{rounds} round(s) on {sites} sites completed" + (f" ({len(short)} with fewer sites)" if short else "")
    (out_path / "result.json").write_text(json.dumps(res.to_json(), indent=2, default=str), encoding="utf-8")
    return res


# --------------------------------------------------------------------------------------- the CLI


def simulate_command(
    sites: int = typer.Option(10, "--sites", help="number of simulated hospitals (virtual SuperNodes)"),
    rounds: int = typer.Option(1, "--rounds", help="federated rounds"),
    patients: int = typer.Option(60, "--patients", help=f"ICU patients per synthetic hospital ({MIN_PATIENTS}..{MAX_PATIENTS}; small so that many sites fit on 2 cores)"),
    seed: int = typer.Option(7, "--seed", help="seed of the hospitals and of the initial global twin"),
    out: Path | None = typer.Option(None, "--out", help="output folder (new or empty; default fedtwin-simulate/run-<UTC time>)"),
    secagg: bool = typer.Option(True, "--secagg/--no-secagg", help="secure aggregation (SecAgg+) of the sites' updates"),
    epsilon: float = typer.Option(8.0, "--epsilon", help="each site's DP budget (epsilon) for the whole run, spread over the rounds"),
    parallel: int = typer.Option(2, "--parallel", help="ClientApps running at once (Ray CPUs, 1 per ClientApp)"),
    stage_timeout: float | None = typer.Option(None, "--stage-timeout", help="seconds per SecAgg+ stage (default max(300, 20 x sites))"),
    mlflow: bool = typer.Option(False, "--mlflow/--no-mlflow", help="log rounds to MLflow (sqlite under OUT/consortium/tracking)"),
    verbose: bool = typer.Option(False, "--verbose", help="Flower's and Ray's logs on the terminal too"),
) -> None:
    """Run the federated twin (same ServerApp and ClientApp, SecAgg+) on N synthetic hospitals in Flower's simulation engine."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedtwin.errors import FedTwinError

    console = Console(file=sys.stdout)  # bound now: during the run sys.stdout captures the ServerApp's prints
    err = Console(stderr=True)
    console.rule(f"[bold]FedTwin simulation: {sites} sites, {rounds} round(s), SecAgg+ {'on' if secagg else 'off'}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("setting up", total=rounds)
        state = {"label": ""}

        def on_event(kind: str, detail: str) -> None:
            if kind == "setup":
                bar.update(task, description=escape(detail))
            elif kind == "round":
                state["label"] = f"round {detail}/{rounds}" if int(detail) <= rounds else "evaluation round"
                bar.update(task, description=f"{state['label']}: started")
            elif kind == "stage":
                bar.update(task, description=escape(f"{state['label']}: {detail}"))
            elif kind == "line":
                if detail.startswith("FEDTWIN start"):
                    bar.update(task, description="ServerApp started; Ray actors starting")
                elif ROUND_RE.search(detail):
                    bar.advance(task)
                if detail.startswith("FEDTWIN") and not detail.startswith(("FEDTWIN checkpoint", "FEDTWIN resume")):
                    bar.console.print(escape(detail), highlight=False, soft_wrap=True)

        try:
            res = simulate(sites, rounds, patients=patients, seed=seed, out=out, secagg=secagg, epsilon=epsilon,
                           parallel=parallel, stage_timeout=stage_timeout, mlflow=mlflow, verbose=verbose, on_event=on_event)
        except FedTwinError as exc:
            bar.stop()
            err.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False)
            if exc.fix:
                err.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False)
            raise typer.Exit(2) from None
        bar.update(task, description="done" if res.ok else "failed")

    table = Table(title="rounds")
    for col in ("round", "status", "sites", "seconds"):
        table.add_column(col, justify="right")
    for r in res.rounds:
        table.add_row(str(r.round), r.status, str(r.sites), f"{r.seconds:.1f}")
    console.print(table)
    for r in res.rounds:
        console.print(f"FEDTWIN round={r.round} status={r.status} sites={r.sites}", highlight=False, markup=False)
    if res.evaluation is not None:
        e = res.evaluation
        console.print(f"FEDTWIN evaluation round={e.round} status={e.status} sites={e.sites} ({e.seconds:.1f} s)",
                      highlight=False, markup=False)
    spr = res.seconds_per_round
    console.print(
        f"total {res.total_seconds:.1f} s (setup {res.setup_seconds:.1f} s, simulation engine {res.run_seconds:.1f} s); "
        f"per round {spr:.1f} s" if spr is not None else f"total {res.total_seconds:.1f} s", highlight=False,
    )
    if res.peak_rss_mb is not None:
        console.print(f"peak RSS (this process + Ray) {res.peak_rss_mb:.0f} MB", highlight=False)
    final = f"final parameters {res.final_path.name}" if res.final_path.is_file() else "no final parameters: no round completed"
    console.print(f"output {res.out} ({final}, log {res.log_path.name}, result.json)", highlight=False)
    if not res.ok:
        err.print(f"[bold red]Error:[/] {escape(res.message)}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[bold green]ok[/] {escape(res.message)}", highlight=False)
