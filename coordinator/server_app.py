"""FedTwin's Flower ServerApp: weighted FedAvg (or FedProx) of the twin, with SecAgg+ when ``secagg`` is on.

Run config (keys declared in ``apps/fedtwin/pyproject.toml``): ``num-rounds``, ``min-sites``,
``secagg``, ``num-shares``, ``reconstruction-threshold``, ``clipping-range``, ``max-weight``,
``secagg-timeout``, ``quantization-range``, ``modulus-range`` (SecAgg+), ``spec-path`` (the twin
spec; the initial parameters are a fresh ``TwinModel(spec)``), ``spec-hash`` (optional: if set it
must equal the spec's hash; the spec's hash is what every site checks against its own),
``strategy`` (``fedavg`` or ``fedprox``) and ``proximal-mu`` (sites apply it), ``epsilon-per-site``
(what the whole training may spend at each site: sites calibrate their noise once for all
rounds), ``local-epochs``, ``batch-size``, ``max-grad-norm``, ``learning-rate``, ``evaluate``
(SecAgg+ only: sites add evaluation statistics and a last evaluation round scores the final model),
``output-path`` (npz of the final global parameters, keys ``p0000``...; empty: not saved; not
written when no round of a training starting at round 1 completed: nothing was trained),
``study-id``, ``checkpoint-dir``, ``mlflow-tracking-uri``, ``resume``.

Checkpoints (``checkpoint-dir`` non-empty): after every *completed* training round the global
parameters, the round number and the spec hash go to ``round-NNNN.npz`` in that folder (temp file
+ rename; keys ``p0000``..., ``__round__``, ``__spec_hash__``); a halted round writes none. A
fresh run refuses a folder that already holds checkpoints; with ``resume = true`` the run starts
from the last checkpoint (refused if its spec hash is not this spec's) at its round + 1 and runs
only the rounds left up to ``num-rounds``. The folder also keeps the training id (sites tag their
ledger entries with it) and ``final-evaluation.json`` (the evaluation round's report).

Tracking (``mlflow-tracking-uri`` non-empty): :class:`fedtwin.tracking.run_tracker.RoundTracker` opens the
study's MLflow run before the first round (an unusable store fails the run then) and logs every
round; the run id lives in ``checkpoint-dir`` so that a resumed run continues it. A write that
fails (the tracking server is down) is kept and retried in order
(:class:`fedtwin.tracking.run_tracker.BufferedWrites`: ``FEDTWIN tracking_error ...`` lines, then
``FEDTWIN tracking_recovered ...``); the end of the run retries for up to 10 minutes, and what
still could not be written is named in ``FEDTWIN tracking_lost unwritten=N what=... records=DIR``
(the signed round records on disk hold the same metrics).

Printed lines (``coordinator.launch`` reads them): ``FEDTWIN round=R status=completed|halted
sites=N`` per training round (a SecAgg+ round below the reconstruction threshold is "halted":
Flower skips it without an exception), ``FEDTWIN evaluation round=R ...`` for the evaluation
round, ``FEDTWIN evaluation model_round=R key=value ...`` (headline metrics of the model after
round R), ``FEDTWIN site_error round=R node=N site=S reason=...`` for every refusal or failure a
site reports, and at the end ``FEDTWIN final rounds_completed=C rounds=R first_round=F saved=PATH``
(``fedtwin consortium status`` reads it: a run with C = 0 shows as ``finished:no-round-completed``).
When every round of a training starting at round 1 halted, nothing was trained: no parameters
are saved, a ``FEDTWIN no_final_model halted_rounds=... Fix: ...`` line says why and what to do,
and the last line is ``FEDTWIN final rounds_completed=0 rounds=R first_round=1 saved=-
reason=no-round-completed``. (A resumed launch whose rounds all halted saves the last
checkpoint's parameters, as after any halted round.)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import ServerApp

from coordinator.aggregate_guard import AggregateGuard

HEADLINE_PRINTED = 6  # metrics per evaluation line in the ServerApp's output (all go to MLflow)


class RoundLog:
    """What happened in each round, shared by the strategy and the fit workflow.

    ``evaluation_round`` is the extra last round in which sites only score the final model
    (``None``: no such round). Round ``r``'s ``reports`` score the model *received* in round r,
    i.e. the result of round r - 1 (the evaluation round scores the final model).
    """

    def __init__(self, on_round=None, evaluation_round: int | None = None) -> None:
        self.round = 0
        self.evaluation_round = evaluation_round
        self.results: dict[int, int] = {}
        self.status: dict[int, str] = {}
        self.started: dict[int, float] = {}
        self.epsilon: dict[int, dict[str, float]] = {}
        self.reports: dict[int, dict] = {}
        self.site_names: dict[int, str] = {}  # node id -> site name, as sites report it
        self.start_hash: dict[int, str] = {}  # digest of the global parameters sent in round r
        self.manifests: dict[int, list] = {}  # the sites' checked, signed manifests of round r
        self.failed_nodes: dict[int, set[int]] = {}  # nodes that refused or failed in round r
        self.on_round = on_round  # (round, completed, sites) -> None, after the line is printed

    def report(self, server_round: int, completed: bool, sites: int) -> None:
        self.status[server_round] = "completed" if completed else "halted"
        what = "evaluation round" if server_round == self.evaluation_round else "round"
        print(f"FEDTWIN {what}={server_round} status={self.status[server_round]} sites={sites}", flush=True)
        report = self.reports.get(server_round)
        if completed and report is not None:
            from fedtwin.federation.round_evaluation import headline_metrics

            head = {k: v for k, v in headline_metrics(report).items() if not k.endswith((".ci_low", ".ci_high"))}
            shown = " ".join(f"{k}={v:.4g}" for k, v in list(head.items())[:HEADLINE_PRINTED])
            print(f"FEDTWIN evaluation model_round={server_round - 1} {shown}", flush=True)
        if self.on_round is not None:
            self.on_round(server_round, completed, sites)

    def training_halted(self) -> list[int]:
        """Training rounds of this launch that halted (the training is not finished: it must be resumed)."""
        return sorted(r for r, st in self.status.items() if r != self.evaluation_round and st != "completed")

    def site_error(self, server_round: int, node_id: int, reason: str) -> None:
        name = self.site_names.get(node_id, "?")
        self.failed_nodes.setdefault(server_round, set()).add(int(node_id))
        text = " ".join(str(reason).split())[:1000]
        print(f"FEDTWIN site_error round={server_round} node={node_id} site={name} reason={text}", flush=True)


class FedTwinFedAvg(FedAvg):
    """Weighted FedAvg (FedProx's server side too) that keeps the latest model apart from the statistics.

    With SecAgg+ each site's vector is its parameters followed by one array of encoded evaluation
    statistics; the aggregate's tail is decoded into the sum over sites
    (:mod:`fedtwin.federation.secure_sums`) and never becomes part of the model. The evaluation
    round's aggregate is not a new model (the sites sent back what they received): it is ignored.
    """

    def __init__(self, log: RoundLog, n_params: int, spec, encoding=None, keeper=None, guard=None, **kw) -> None:
        super().__init__(**kw)
        self.log = log
        self.keeper = keeper  # coordinator.provenance_keeper.ProvenanceKeeper, or None (no provenance)
        self.guard = guard  # coordinator.aggregate_guard.AggregateGuard, or None (no aggregate check)
        self.n_params = n_params
        self.spec = spec
        self.encoding = encoding  # SecureSumEncoding when SecAgg+ carries statistics
        self.latest = kw.get("initial_parameters")

    def configure_fit(self, server_round, parameters, client_manager):
        self.log.round = server_round
        if server_round == self.log.evaluation_round and self.log.training_halted():
            # an unfinished training has no final model to score: --resume finishes it, and its
            # evaluation round then closes the chain of round records
            print(f"FEDTWIN note: evaluation round {server_round} skipped: training round(s) "
                  f"{', '.join(map(str, self.log.training_halted()))} halted; resume the training to finish it", flush=True)
            self.log.started.setdefault(server_round, time.monotonic())
            return []
        self.log.started.setdefault(server_round, time.monotonic())
        from fedtwin.provenance import parameters_digest

        self.log.start_hash[server_round] = parameters_digest(parameters_to_ndarrays(parameters))
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.log.results[server_round] = len(results) if params is not None else 0
        eps: dict[str, float] = {}
        for proxy, res in results:
            m = res.metrics or {}
            node = int(getattr(proxy, "node_id", 0) or 0)
            site = str(m.get("site") or node)
            self.log.site_names[node] = site
            if isinstance(m.get("epsilon_spent"), (int, float)):
                eps[site] = float(m["epsilon_spent"])
        self.log.epsilon[server_round] = eps
        if params is not None and self.guard is not None and not self._aggregate_accepted(server_round, results, params):
            self.log.results[server_round] = 0
            return None, {}
        if params is not None and self.keeper is not None and not self._manifests_accepted(server_round, results):
            self.log.results[server_round] = 0
            return None, {}
        if params is None:
            return params, metrics
        arrays = parameters_to_ndarrays(params)
        model, extra = arrays[: self.n_params], arrays[self.n_params:]
        if extra and self.encoding is not None:
            from fedtwin.federation.round_evaluation import decode_report

            kind = "final" if server_round == self.log.evaluation_round else "round"
            counts = [int(res.num_examples) for _, res in results]
            self.log.reports[server_round] = decode_report(extra[0], counts, self.encoding, self.spec, kind)
        elif extra:
            raise RuntimeError(f"round {server_round}: sites sent {len(extra)} arrays beyond the model without SecAgg+")
        model_params = ndarrays_to_parameters(model)
        if server_round != self.log.evaluation_round:
            self.latest = model_params
        return model_params, metrics

    def _site_of(self, proxy) -> str | None:
        """The site name a result's node reported this round (set above from its fit metrics)."""
        return self.log.site_names.get(int(getattr(proxy, "node_id", 0) or 0))

    def _aggregate_accepted(self, server_round: int, results, params) -> bool:
        """Refuse an aggregate no set of honest updates can produce (coordinator/aggregate_guard.py)."""
        counts = [(self._site_of(p) or "?", int(r.num_examples)) for p, r in results]
        problems = self.guard.problems(counts, parameters_to_ndarrays(params)[: self.n_params])
        return _accepted("aggregate_error", server_round, problems, 600, "the round halts and the global model stays as it was")

    def _manifests_accepted(self, server_round: int, results) -> bool:
        """Check every site's signed manifest; refuse the aggregate if any is missing or wrong."""
        from fedtwin.provenance.manifest import MANIFEST_METRIC

        texts = {self._site_of(p): (r.metrics or {}).get(MANIFEST_METRIC) for p, r in results}
        good, problems = self.keeper.check_manifests(server_round, self.log.start_hash[server_round], texts)
        self.log.manifests[server_round] = good
        return _accepted("provenance_error", server_round, problems, 400,
                         f"{len(problems)} site(s) sent no valid signed manifest")


def _accepted(kind: str, server_round: int, problems: list[str], width: int, why: str) -> bool:
    """Print each reason to refuse a round's aggregate as a ``FEDTWIN <kind>`` line (launch echoes them),
    then the refusal itself; True when there is none."""
    for problem in problems:
        print(f"FEDTWIN {kind} round={server_round} {' '.join(problem.split())[:width]}", flush=True)
    if problems:
        print(f"FEDTWIN {kind} round={server_round} the aggregate is refused: {why}", flush=True)
    return not problems


class ErrorReportingGrid:
    """The grid, with every error reply (a site refused or failed) printed as a ``site_error`` line.

    Flower's SecAgg+ stages drop such replies silently; the ClientApp's exception text (a
    :class:`site_agent.task.SiteRefusal` message, written for the coordinator) is in the reply.
    """

    def __init__(self, grid, log: RoundLog) -> None:
        self._grid = grid
        self._log = log

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        replies += self._late_replies(messages, replies)
        # a "node unavailable" reply comes from the SuperLink itself (src_node_id = the SuperLink's
        # id): name the site by the message it answers (message ids are set when pushed)
        to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
        for msg in replies:
            if msg.has_error():
                node = to.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
                self._log.site_error(self._log.round, node, _refusal_text(msg.error.reason))
        return replies


    def _late_replies(self, messages, replies) -> list:
        """Replies that reached the SuperLink while the grid was blocked: pulled once more, not dropped.

        Why: Flower's grid pulls the replies available so far, one message at a time; a reply
        whose sender died while uploading it (a site SIGKILLed mid-stage) blocks that pull until
        the SuperLink's object-push session expires (180 s), then comes back as an error. By
        then the stage's timeout has passed and the grid returns without pulling the replies the
        other sites sent meanwhile: the stage saw only the error and SecAgg+ halted a round the
        survivors could complete. One more pull for the unanswered messages keeps those replies.
        """
        answered = {m.metadata.reply_to_message_id for m in replies}
        missing = [m.metadata.message_id for m in messages if m.metadata.message_id and m.metadata.message_id not in answered]
        if not missing or not hasattr(self._grid, "pull_messages"):
            return []
        late = list(self._grid.pull_messages(missing))
        if late:
            print(f"FEDTWIN note: round {self._log.round}: {len(late)} reply(ies) pulled after the stage's wait ended "
                  f"(the wait was blocked by a reply that never finished uploading)", flush=True)
        return late


def _refusal_text(reason: str) -> str:
    """``"<class 'X'>:<'message'>"`` (Flower's format) -> ``"X: message"``."""
    m = re.match(r"^<class '([\w.]+)'>:<'(.*)'>$", str(reason), flags=re.S)
    return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}" if m else str(reason)


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose every round reports whether all four stages returned True."""

    def __init__(self, log: RoundLog, **kw) -> None:
        super().__init__(**kw)
        self.log = log

    def __call__(self, grid, context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        grid = ErrorReportingGrid(grid, self.log)
        state = WorkflowState()
        completed = True
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            if not step(grid, context, state):
                completed = False
                break
            if step == self.share_keys_stage:
                forget_nodes_without_shares(state)
        r = self.log.round
        sites = self.log.results.get(r, 0) if completed else len(state.active_node_ids)
        self.log.report(r, completed and self.log.results.get(r, 0) > 0, sites)


def forget_nodes_without_shares(state: WorkflowState) -> None:
    """After SecAgg+'s share-keys stage: only the nodes that shared their keys count as sampled.

    Why: Flower 1.41's unmask stage treats every sampled node that is no longer active as a
    dropped node whose pairwise masks must be removed, and asks the survivors for shares of its
    secret key. A node that dropped out in stage 0 or 1 (before its key shares were forwarded)
    masked nothing and left no shares, so each survivor's ClientApp failed with ``KeyError:
    <node id>`` and a round the survivors could complete halted. Nodes that shared their keys
    and dropped later are still "dead" with shares held by the others, as SecAgg+ intends.
    """
    state.sampled_node_ids = set(state.active_node_ids)


class ReportingPlainFitWorkflow:
    """Flower's default (plaintext) fit workflow, with the same per-round line."""

    def __init__(self, log: RoundLog) -> None:
        from flwr.server.workflow.default_workflows import default_fit_workflow

        self.log = log
        self._fit = default_fit_workflow

    def __call__(self, grid, context) -> None:
        self._fit(ErrorReportingGrid(grid, self.log), context)
        r = self.log.round
        n = self.log.results.get(r, 0)
        self.log.report(r, n > 0, n)


class OffsetRounds:
    """Runs ``inner`` with the round number shifted by ``offset`` (a resumed run's rounds keep their numbers)."""

    def __init__(self, inner, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def __call__(self, grid, context) -> None:
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        cfg[Key.CURRENT_ROUND] = int(cfg[Key.CURRENT_ROUND]) + self.offset
        self.inner(grid, context)


# ------------------------------------------------------------------------------- checkpoints

CKPT_RE = re.compile(r"^round-(\d{4,})\.npz$")


def checkpoint_path(folder: str | Path, server_round: int) -> Path:
    return Path(folder) / f"round-{int(server_round):04d}.npz"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The folder's round checkpoints, oldest round first (none if the folder does not exist)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(folder: str | Path, server_round: int, spec_hash: str, ndarrays: list) -> Path:
    """Write ``round-NNNN.npz`` atomically: a temp file in the same folder, fsync, then rename."""
    import numpy as np

    from fedtwin.atomic_file import atomic_write

    arrays = {f"p{i:04d}": np.asarray(a) for i, a in enumerate(ndarrays)}
    return atomic_write(checkpoint_path(folder, server_round),
                        lambda fh: np.savez(fh, __round__=np.int64(server_round), __spec_hash__=np.str_(spec_hash), **arrays))


def read_checkpoint(path: str | Path) -> tuple[int, str, list]:
    """(round, spec hash, parameters) of a checkpoint written by :func:`write_checkpoint`."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        rnd = int(z["__round__"])
        h = str(z["__spec_hash__"])
        params = [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"p\d{4}", k))]
    return rnd, h, params


def fit_config_fn(spec_hash: str, training_id: str, evaluation_round: int | None, keeper=None):
    """Per-round fit config; everything else a site needs is in the run config it also sees.

    With provenance, the coordinator's code version and its signed record of the previous round
    (sites keep it in their own logs) ride along.
    """
    from fedtwin.code_version import code_version
    from fedtwin.provenance.manifest import PREVIOUS_RECORD_CONFIG

    def fn(server_round: int) -> dict:
        kind = "evaluate" if server_round == evaluation_round else "train"
        out = {"server-round": int(server_round), "spec-hash": spec_hash, "training-id": training_id, "round-kind": kind,
               "code-version": code_version()}
        if keeper is not None and keeper.last is not None:
            out[PREVIOUS_RECORD_CONFIG] = keeper.last_json()
        return out

    return fn


TRAINING_ID_FILE = "training_id"


def training_id_for(ckpt_dir: str, resume: bool, fallback: str) -> str:
    """The id sites tag their ledger entries with: one per training, kept across ``--resume``.

    Sites calibrate their noise once per training id, so a resumed training must keep it.
    """
    if not ckpt_dir:
        return fallback
    path = Path(ckpt_dir) / TRAINING_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    import uuid

    tid = f"training-{uuid.uuid4().hex[:16]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tid + "\n")
    return tid


def _open_keeper(cfg, spec, h: str, ckpt_dir: str, resume: bool, training_id: str):
    """The provenance keeper when the run config names the coordinator's signing key and the trusted keys."""
    signing, trusted = str(cfg.get("signing-key", "")).strip(), str(cfg.get("trusted-keys", "")).strip()
    if not (signing and trusted):
        print("FEDTWIN warning: no signing-key/trusted-keys in the run config: rounds are not signed (no provenance)", flush=True)
        return None
    import json

    from coordinator.provenance_keeper import RECORD_DIR, ProvenanceKeeper, study_facts
    from fedtwin.code_version import code_version
    from fedtwin.provenance import digest
    from fedtwin.spec.io import canonical_json

    facts = study_facts(cfg, code_version())
    facts["suppression_threshold"] = int(spec.suppression_threshold)
    spec_doc = json.loads(canonical_json(spec))
    return ProvenanceKeeper.open(
        study_id=facts["study_id"], spec_hash=h, signing_key=signing, trusted_keys=trusted,
        folder=Path(ckpt_dir) / RECORD_DIR / training_id if ckpt_dir else None,
        secagg=dict(facts["secagg"]), attachments={"spec": digest(spec_doc), "study": digest(facts)},
        resume=resume, documents={"spec": spec_doc, "study": facts},
    )


def _release(tracker, keeper, log: RoundLog, strategy, rounds: int, ckpt_dir: str, spec_path: str, spec) -> None:
    """The model card and the registered twin (:mod:`coordinator.release`); the best model by held-out NLL."""
    from coordinator.release import publish, spec_plans

    nll = {r - 1: log.reports[r]["metrics"].get("nll.all.all.twin") for r in log.reports}
    scored = {r: c["value"] for r, c in nll.items() if r >= 1 and isinstance(c, dict) and c.get("value") is not None}
    best = min(scored, key=lambda r: (scored[r], -r)) if scored else None
    name = publish(tracker, keeper, parameters_to_ndarrays(strategy.latest), best, ckpt_dir, spec_plans(spec_path, spec))
    print(f"FEDTWIN release registered_model={name} best_round={best if best is not None else '-'} "
          f"mlflow_run={tracker.run_id}", flush=True)


def _log_dp_params(tracker, manifests: list) -> None:
    """Each site's DP settings as params (``dp.<site>.*``), once: the noise is calibrated once per training."""
    have = tracker.client.get_run(tracker.run_id).data.params
    for m in manifests:
        if m.dp is None or f"dp.{m.site}.noise_multiplier" in have:
            continue
        for k in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "accountant"):
            tracker.client.log_param(tracker.run_id, f"dp.{m.site}.{k}", getattr(m.dp, k))


def _log_attachments(tracker, keeper) -> None:
    """The spec and study documents the records vouch for, and where the trusted public keys are."""
    tracker.client.set_tag(tracker.run_id, "fedtwin.trusted_keys", str(keeper.trusted_keys))
    from fedtwin.provenance import digest

    for name, doc in keeper.documents.items():  # content-addressed too: a training extended later keeps both
        tracker.client.log_dict(tracker.run_id, doc, f"provenance/documents/{digest(doc)}.json")
        tracker.client.log_dict(tracker.run_id, doc, f"provenance/{name}.json")


def _track(writes, what: str, call) -> None:
    """Write to MLflow through ``writes`` (:class:`fedtwin.tracking.run_tracker.BufferedWrites`).

    A write that fails is kept and retried (in order) instead of being dropped: the round is
    already checkpointed and signed on disk, and MLflow must end up holding it too. ``call`` runs
    later if the server is down, so it must bind its values now (default arguments), not late.
    """
    writes.submit(what, call)


app = ServerApp()


@app.main()
def main(grid, context) -> None:
    import numpy as np

    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.twin import TwinModel, get_parameters

    cfg = context.run_config
    spec_path = str(cfg.get("spec-path", "")).strip()
    if not spec_path:
        raise ValueError("run config 'spec-path' is empty: pass -c spec-path=PATH/TO/SPEC.yaml")
    spec = load_spec(spec_path)
    h = spec_hash(spec)
    wanted = str(cfg.get("spec-hash", "")).strip()
    if wanted and wanted != h:
        raise ValueError(f"run config spec-hash {wanted[:12]} is not the hash of {spec_path} ({h[:12]})")
    init = get_parameters(TwinModel(spec))
    rounds = int(cfg["num-rounds"])
    strategy_name = str(cfg.get("strategy", "fedavg")).strip() or "fedavg"
    mu = float(cfg.get("proximal-mu", 0.0))
    if strategy_name not in ("fedavg", "fedprox"):
        raise ValueError(f"run config strategy={strategy_name!r}: use fedavg or fedprox")
    if (strategy_name == "fedprox") != (mu > 0):
        raise ValueError(f"run config strategy={strategy_name} with proximal-mu={mu:g}: FedProx needs mu > 0, FedAvg mu = 0")
    ckpt_dir = str(cfg.get("checkpoint-dir", "")).strip()
    resume = bool(cfg.get("resume", False))
    start = 1
    if resume:
        if not ckpt_dir:
            raise ValueError("run config resume=true needs checkpoint-dir")
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise ValueError(f"resume=true but {ckpt_dir} holds no checkpoint (round-NNNN.npz): launch without resume")
        last_round, last_hash, params = read_checkpoint(found[-1])
        if last_hash != h:
            raise ValueError(f"checkpoint {found[-1]} is for spec hash {last_hash[:12]}, not {h[:12]} ({spec_path}): refusing to resume")
        if [a.shape for a in params] != [a.shape for a in init]:
            raise ValueError(f"checkpoint {found[-1]} does not hold this twin's parameter shapes")
        init, start = params, last_round + 1
        print(f"FEDTWIN resume checkpoint={found[-1]} round={last_round}", flush=True)
    elif ckpt_dir and list_checkpoints(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints of an earlier run: resume it (resume=true) or move them away")
    remaining = rounds - start + 1

    tracker = None
    writes = None  # BufferedWrites: the run's MLflow writes, retried while the server is down
    uri = str(cfg.get("mlflow-tracking-uri", "")).strip()
    if uri:
        from fedtwin.code_version import code_version
        from fedtwin.tracking.run_tracker import BufferedWrites, RoundTracker

        study = str(cfg.get("study-id", "")).strip() or "fedtwin"
        params_logged = {
            "spec_hash": h, "spec_name": spec.name, "strategy": strategy_name, "proximal_mu": mu, "rounds": rounds,
            "min_sites": int(cfg["min-sites"]), "secagg": bool(cfg["secagg"]),
            "dp.epsilon_per_site": cfg.get("epsilon-per-site", ""), "dp.max_grad_norm": cfg.get("max-grad-norm", ""),
            "dp.batch_size": cfg.get("batch-size", ""), "local_epochs": cfg.get("local-epochs", ""),
            "learning_rate": cfg.get("learning-rate", ""),
            "code_version": code_version(),
        }
        if bool(cfg["secagg"]):
            for k in ("num-shares", "reconstruction-threshold", "clipping-range", "max-weight", "secagg-timeout",
                      "quantization-range", "modulus-range"):
                if k in cfg:
                    params_logged["secagg." + k.replace("-", "_")] = cfg[k]
        run_dir = Path(ckpt_dir) if ckpt_dir else None
        tracker = RoundTracker(uri, study, run_dir, params_logged, resume=resume)  # fails here, before round 1
        writes = BufferedWrites()
        print(f"FEDTWIN tracking uri={uri} experiment={study} mlflow_run={tracker.run_id}", flush=True)

    n = int(cfg["min-sites"])
    secagg = bool(cfg["secagg"])
    # SecAgg+ runs carry evaluation statistics and end with an evaluation-only round
    evaluation_round = rounds + 1 if secagg and bool(cfg.get("evaluate", True)) and remaining > 0 else None
    training_id = training_id_for(ckpt_dir, resume, f"flwr-run-{context.run_id}")
    keeper = _open_keeper(cfg, spec, h, ckpt_dir, resume, training_id)
    if keeper is not None and tracker is not None:
        _track(writes, "attachments", lambda: _log_attachments(tracker, keeper))
    holder: dict = {}

    def on_round(r: int, completed: bool, sites: int) -> None:
        from fedtwin.provenance import parameters_digest
        from fedtwin.tracking.run_tracker import evaluation_metrics, round_metrics

        report = log.reports.get(r) if completed else None
        evaluated = evaluation_metrics(report) if report is not None else {}
        final = r == evaluation_round
        if final and log.training_halted():
            return  # skipped (see FedTwinFedAvg.configure_fit): nothing to record
        secs = time.monotonic() - log.started.get(r, time.monotonic())
        metrics = dict(evaluated) if final else {
            **round_metrics(sites if completed else 0, secs, not completed, log.epsilon.get(r, {}) if completed else {}), **evaluated}
        latest = parameters_to_ndarrays(holder["strategy"].latest)
        if keeper is not None:  # the signed record goes first: a resumed training never leaves a gap
            start_hash = log.start_hash.get(r) or parameters_digest(latest)
            rec, path = keeper.record(
                server_round=r, kind="evaluate" if final else "train", status="completed" if completed else "halted",
                start_hash=start_hash, aggregate_hash=start_hash if final else parameters_digest(latest),
                manifests=log.manifests.get(r, []) if completed else [], metrics=metrics,
                sites_dropped=sorted({log.site_names.get(nd, f"node-{nd}") for nd in log.failed_nodes.get(r, set())}
                                     - {m.site for m in log.manifests.get(r, [])}),
                report=report,
            )
            print(f"FEDTWIN provenance round={r} record={rec.record_hash()[:16]} status={rec.status}", flush=True)
            if tracker is not None and completed and not final:
                _track(writes, f"round={r} dp_params", lambda m=list(log.manifests.get(r, [])): _log_dp_params(tracker, m))
            if tracker is not None and path is not None:
                _track(writes, f"round={r} provenance_record", lambda p=path: tracker.log_file(p, "provenance"))
        if final:
            if tracker is not None and report is not None:
                _track(writes, f"round={r} final_evaluation", lambda rep=report: tracker.log_evaluation(rounds, rep, "final"))
                # kept per evaluation round too: a training extended later has more than one
                _track(writes, f"round={r} evaluation_report",
                       lambda rep=report, name=f"evaluation/evaluation-round-{r:04d}.json": tracker.client.log_dict(tracker.run_id, rep, name))
            return
        if completed and ckpt_dir:
            path = write_checkpoint(ckpt_dir, r, h, latest)
            print(f"FEDTWIN checkpoint round={r} path={path}", flush=True)
            if tracker is not None:
                _track(writes, f"round={r} checkpoint", lambda p=path: tracker.log_file(p, "models"))
        if tracker is not None:
            _track(writes, f"round={r} metrics",
                   lambda m={k: v for k, v in metrics.items() if k not in evaluated}: tracker.log_metrics(r, m))
            if report is not None:  # scores the model received in round r: the result of round r - 1
                _track(writes, f"round={r} evaluation", lambda rep=report: tracker.log_evaluation(r - 1, rep, f"round-{r - 1:04d}"))

    log = RoundLog(on_round, evaluation_round)
    encoding = None
    if secagg:
        from fedtwin.federation.secure_sums import SecureSumEncoding

        encoding = SecureSumEncoding(
            clipping_range=float(cfg["clipping-range"]), quantization_range=int(cfg.get("quantization-range", 2**22)),
            max_weight=float(cfg["max-weight"]),
        )
    strategy = FedTwinFedAvg(
        log,
        len(init),
        spec,
        encoding,
        keeper,
        AggregateGuard.from_run_config(cfg),
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(init),
        on_fit_config_fn=fit_config_fn(h, training_id, evaluation_round, keeper),
        # SecAgg+ hands every error reply (a dead or refusing site) to aggregate_fit as a failure;
        # whether the survivors suffice is its reconstruction threshold's call (min_sites still
        # bounds sampling), so failures must not void a round it completed
        accept_failures=True,
    )
    holder["strategy"] = strategy
    total_rounds = max(remaining, 0) + (1 if evaluation_round else 0)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=total_rounds), strategy=strategy)
    if bool(cfg["secagg"]):
        extra = {k.replace("-", "_"): int(cfg[k]) for k in ("quantization-range", "modulus-range") if k in cfg}
        fit_workflow = ReportingSecAggPlusWorkflow(
            log,
            num_shares=cfg["num-shares"],
            reconstruction_threshold=cfg["reconstruction-threshold"],
            clipping_range=float(cfg["clipping-range"]),
            max_weight=float(cfg["max-weight"]),
            timeout=float(cfg["secagg-timeout"]),
            **extra,
        )
    else:
        fit_workflow = ReportingPlainFitWorkflow(log)
    print(
        f"FEDTWIN start spec={spec.name} spec_hash={h[:12]} rounds={rounds} first_round={start} "
        f"secagg={secagg} min_sites={n} strategy={strategy_name} training_id={training_id} "
        f"evaluation_round={evaluation_round or '-'}",
        flush=True,
    )
    failed = True
    try:
        if remaining > 0:
            DefaultWorkflow(fit_workflow=OffsetRounds(fit_workflow, start - 1))(grid, legacy)
        failed = any(st != "completed" for r, st in log.status.items() if r != evaluation_round)
        if not failed and keeper is not None and tracker is not None and evaluation_round in log.reports:
            _track(writes, "release", lambda: _release(tracker, keeper, log, strategy, rounds, ckpt_dir, spec_path, spec))
    finally:
        if tracker is not None:
            _track(writes, "close_run", lambda f=failed: tracker.close(failed=f))
            if not writes.drain():
                # nothing of the training itself is lost (checkpoints and signed records are on
                # disk), but MLflow misses these writes: say so, and launch fails with it
                print(f"FEDTWIN tracking_lost unwritten={len(writes.unwritten())} what={','.join(writes.unwritten())} "
                      f"uri={uri} records={Path(ckpt_dir) / 'provenance' if ckpt_dir else '-'}", flush=True)

    if evaluation_round is not None and evaluation_round in log.reports and ckpt_dir:
        import json

        (Path(ckpt_dir) / "final-evaluation.json").write_text(json.dumps(log.reports[evaluation_round], indent=1))
    done = sum(1 for r, st in log.status.items() if st == "completed" and r != evaluation_round)
    out = str(cfg.get("output-path", "")).strip()
    if remaining > 0 and done == 0 and start == 1:
        _no_final_model(out, log.training_halted(), rounds)
        return
    if out:
        final = parameters_to_ndarrays(strategy.latest)
        np.savez(out, **{f"p{i:04d}": np.asarray(a) for i, a in enumerate(final)})
    print(_final_line(done, rounds, start, out), flush=True)


NO_ROUND_COMPLETED = "no-round-completed"  # the FEDTWIN final line's reason= when nothing was trained


def _final_line(done: int, rounds: int, first_round: int, saved: str, reason: str = "") -> str:
    """The run's last line; ``fedtwin consortium status`` parses it (coordinator/consortium/run_outcome.py)."""
    return (f"FEDTWIN final rounds_completed={done} rounds={rounds} first_round={first_round} saved={saved or '-'}"
            + (f" reason={reason}" if reason else ""))


def _no_final_model(out: str, halted: list[int], rounds: int) -> None:
    """Say that the training has no trained round at all, and write no final parameters.

    Why: when every round of a training that starts at round 1 halted, the global parameters are
    still the fresh, untrained twin, and a ``final.npz`` holding them would pass for a trained one.
    (A resumed launch whose rounds all halted still saves: its parameters are the last
    checkpoint's, the model of the last completed round, as after any halted round.) A file
    already at ``out`` (an earlier launch's) is left as it was, and named, so nobody takes it
    for this launch's.
    """
    kept = f"; the file already at {out} is from an earlier launch and was left as it was" if out and Path(out).exists() else ""
    print(f"FEDTWIN no_final_model halted_rounds={','.join(map(str, halted)) or '-'}: no training round completed, so "
          f"nothing was trained and no final parameters were written{f' to {out}' if out else ''}{kept}. Fix: read the "
          f"halted rounds' site_error / aggregate_error / provenance_error lines above, remove their cause, then start "
          f"the training again (no round was checkpointed: there is nothing to --resume)", flush=True)
    print(_final_line(0, rounds, 1, "", NO_ROUND_COMPLETED), flush=True)
