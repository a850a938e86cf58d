"""``fedtwin audit verify``: check that nothing in a training's MLflow run was altered after the fact.

Five checks, each independent, each naming exactly what fails:

1. **chain**: every round record's signature (the coordinator's) and every manifest's (its site's)
   against the auditor's trusted keys, the hash links, round order, and that the released model
   is the last completed round's aggregate (:func:`fedtwin.provenance.verify_chain`);
2. **attachments**: the spec, the study settings and every evaluation report are the documents
   the records vouch for (sha256), and the spec hashes to the records' spec hash;
3. **model**: each registered version of the run holds parameters whose digest is the chain's
   final aggregate (the file itself is hashed, not its tag);
4. **card**: the stored model card (JSON, Markdown, HTML, and the copies attached to the registered
   model) equals the card rebuilt from the verified evidence;
5. **metrics**: every value MLflow holds for the run equals the value in the round record that
   covers its step (``eval.*``/``fair.*`` at the step of the scored model, the rest at the round),
   and every record metric is in MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtwin.audit.evidence import CARD_FILES, RunArtifacts, load_run, registered_versions

EVAL_PREFIXES = ("eval.", "fair.")


@dataclass
class CheckResult:
    name: str
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class AuditReport:
    run_id: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {p}" for c in self.checks for p in c.problems]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "problems": c.problems} for c in self.checks]}


def metric_step(key: str, record_round: int) -> int:
    """The MLflow step a record's metric is logged at: evaluations at the scored model's round."""
    return record_round - 1 if key.startswith(EVAL_PREFIXES) else record_round


def verify_run(tracking_uri: str, run_id: str, keys, folder: Path | None = None) -> AuditReport:  # keys: KeyRing
    """Run every check on the MLflow run; never raises for a failed check (see :class:`AuditReport`).

    The evidence is downloaded into ``folder`` (kept), or into a temporary folder removed afterwards.
    """
    import tempfile

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="fedtwin-audit-") as tmp:
            return verify_run(tracking_uri, run_id, keys, Path(tmp))
    arts = load_run(tracking_uri, run_id, folder / "run")
    report = AuditReport(run_id)
    versions = registered_versions(tracking_uri, run_id)
    downloaded = _download_versions(arts, versions, folder / "registry")
    model = _check_model(arts, versions, downloaded)
    chain = _check_chain(arts, keys, model)
    report.checks += [chain, _check_attachments(arts), model.result, _check_card(arts, versions, downloaded), _check_metrics(arts)]
    if arts.problems:
        report.checks.insert(0, CheckResult("artifacts", "", list(arts.problems)))
    return report


def _download_versions(arts: RunArtifacts, versions: list[Any], folder: Path) -> dict[tuple[str, str], Path | str]:
    """Each registered version's artifacts as a local folder, or why they cannot be read."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=arts.tracking_uri, registry_uri=arts.tracking_uri)
    out: dict[tuple[str, str], Path | str] = {}
    for v in versions:
        dest = folder / f"{v.name}-{v.version}"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            uri = client.get_model_version_download_uri(v.name, v.version)
            out[(v.name, str(v.version))] = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                                                    tracking_uri=arts.tracking_uri))
        except Exception as exc:  # noqa: BLE001 - unreadable artifacts are a finding, not a crash
            out[(v.name, str(v.version))] = f"{type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------------------------- chain


def _check_chain(arts: RunArtifacts, keys, model: _ModelCheck) -> CheckResult:
    from fedtwin.provenance import verify_chain

    res = CheckResult("chain")
    dicts = [d for d in arts.record_dicts if d is not None]
    if not dicts:
        res.problems.append("no round record to verify")
        return res
    chain = verify_chain(dicts, keys, final_parameters_hash=model.digest)
    res.detail = (f"{chain.records} records, {chain.signatures_checked} signatures, head {str(chain.head_hash)[:16]}, "
                  f"final aggregate {str(chain.final_aggregate_hash)[:16]}")
    for p in chain.problems:
        known = p.index is not None and p.index < len(arts.record_files)
        res.problems.append(f"{arts.record_files[p.index].name}: {p}" if known else str(p))
    return res


# ------------------------------------------------------------------------------ attachments


def _check_attachments(arts: RunArtifacts) -> CheckResult:
    from fedtwin.errors import FedTwinError
    from fedtwin.provenance import RoundRecord, digest
    from fedtwin.provenance.errors import FieldError
    from fedtwin.spec.io import spec_from_dict, spec_hash

    res = CheckResult("attachments")
    docs = {"spec": arts.spec, "study": arts.study}
    checked = 0
    for path, d in zip(arts.record_files, arts.record_dicts):
        try:
            rec = RoundRecord.from_dict(d)
        except (FieldError, TypeError):
            continue  # the chain check names it
        for name, doc in docs.items():
            want = rec.attachments.get(name)
            stored = arts.documents.get(want) if want is not None else None  # provenance/documents/<sha256>.json
            if want is None:
                res.problems.append(f"{path.name}: vouches for no {name} document")
            elif stored is not None:
                if digest(stored) != want:
                    res.problems.append(f"provenance/documents/{want}.json ({name}): its content hashes to {digest(stored)[:16]}, "
                                        f"not the {want[:16]} that {path.name} vouches for")
                else:
                    checked += 1
            elif doc is not None and digest(doc) != want:
                res.problems.append(f"provenance/{name}.json: sha256 {digest(doc)[:16]} is not the {want[:16]} that {path.name} vouches for")
            elif doc is not None:  # a missing document is named among the artifacts' problems, not counted here
                checked += 1
    last = next((d for d in reversed(arts.record_dicts) if isinstance(d, dict)), None)
    for name, doc in docs.items():  # the latest documents (the card's input) are the last record's
        want = ((last or {}).get("attachments") or {}).get(name)
        if want is not None and doc is not None and digest(doc) != want:
            res.problems.append(f"provenance/{name}.json: sha256 {digest(doc)[:16]} is not the {str(want)[:16]} that the last record vouches for")
        want = rec.attachments.get("evaluation_report")
        if want is not None:
            if rec.kind == "evaluate":
                name, doc = f"evaluation/evaluation-round-{rec.round:04d}.json", arts.evaluation_reports.get(rec.round)
            else:
                name, doc = f"evaluation/round-{rec.round - 1:04d}.json", arts.round_reports.get(rec.round - 1)
            if doc is None:
                res.problems.append(f"{name}: missing, but {path.name} vouches for it")
            elif digest(doc) != want:
                res.problems.append(f"{name}: sha256 {digest(doc)[:16]} is not the {want[:16]} that {path.name} vouches for")
            else:
                checked += 1
    last_eval = next((d for d in reversed(arts.record_dicts) if isinstance(d, dict) and d.get("kind") == "evaluate"), None)
    if last_eval is not None and arts.final_report is not None:  # the report the card is built from
        want = (last_eval.get("attachments") or {}).get("evaluation_report")
        if want is not None and digest(arts.final_report) != want:
            res.problems.append(f"evaluation/final.json: sha256 {digest(arts.final_report)[:16]} is not the {str(want)[:16]} "
                                f"that the last evaluation round's record (round {last_eval.get('round')}) vouches for")
        elif want is not None:
            checked += 1
    if arts.spec is not None:
        try:
            h = spec_hash(spec_from_dict(arts.spec, "provenance/spec.json"))
        except FedTwinError as exc:
            res.problems.append(f"provenance/spec.json is not a valid twin spec: {exc}")
        else:
            hashes = {d.get("spec_hash") for d in arts.record_dicts if isinstance(d, dict)}
            if hashes != {h}:
                res.problems.append(f"provenance/spec.json hashes to {h[:16]}, the records name {', '.join(sorted(str(x)[:16] for x in hashes))}")
    res.detail = f"{checked} documents match their digests"
    return res


# ------------------------------------------------------------------------------------ model


@dataclass
class _ModelCheck:
    result: CheckResult
    digest: str | None


def _check_model(arts: RunArtifacts, versions: list[Any], downloaded: dict[tuple[str, str], Path | str]) -> _ModelCheck:
    from fedtwin.provenance import parameters_digest
    from fedtwin.tracking.registry import TAG_DIGEST
    from fedtwin.tracking.twin_pyfunc import PARAMETERS_FILE, read_parameters_npz

    res = CheckResult("model")
    if not versions:
        res.problems.append(f"no registered model version comes from run {arts.run_id}")
        return _ModelCheck(res, None)
    digests: dict[int, str] = {}  # version number -> digest of its parameters file
    for v in versions:
        where = f"registered model {v.name} version {v.version}"
        local = downloaded[(v.name, str(v.version))]
        try:
            if isinstance(local, str):
                raise FileNotFoundError(local)
            files = list(local.rglob(PARAMETERS_FILE))
            if len(files) != 1:
                raise FileNotFoundError(f"{len(files)} {PARAMETERS_FILE} files in its artifacts")
            got = parameters_digest(read_parameters_npz(files[0]))
        except Exception as exc:  # noqa: BLE001 - unreadable artifacts are a finding, not a crash
            res.problems.append(f"{where}: its {PARAMETERS_FILE} cannot be read ({type(exc).__name__}: {exc})")
            continue
        if v.tags.get(TAG_DIGEST) not in (None, got):
            res.problems.append(f"{where}: {PARAMETERS_FILE} hashes to {got[:16]}, the version's {TAG_DIGEST} tag says {v.tags[TAG_DIGEST][:16]}")
        digests[int(v.version)] = got
        res.detail = f"{where}: {PARAMETERS_FILE} sha256 {got[:16]}"
    if not digests:
        return _ModelCheck(res, None)
    # a training extended with more rounds registers again: the newest version is the released model
    # (the chain's final aggregate); each older one must be the aggregate of a completed round
    aggregates = {d.get("aggregate_hash") for d in arts.record_dicts
                  if isinstance(d, dict) and d.get("kind") == "train" and d.get("status") == "completed"}
    newest = max(digests)
    for version, got in sorted(digests.items()):
        if version != newest and got not in aggregates:
            res.problems.append(f"registered version {version} holds parameters ({got[:16]}) that are no completed round's aggregate")
    return _ModelCheck(res, digests[newest])


# ------------------------------------------------------------------------------------- card


def _check_card(arts: RunArtifacts, versions: list[Any], downloaded: dict[tuple[str, str], Path | str]) -> CheckResult:
    from fedtwin.card import build_card, card_to_html, card_to_json, card_to_markdown

    res = CheckResult("card")
    try:
        evidence = arts.evidence()
        card = build_card(evidence)
    except Exception as exc:  # noqa: BLE001 - the other checks name what is missing or broken
        res.problems.append(f"the card cannot be rebuilt from the run's evidence: {exc}")
        return res
    expected = {"json": card_to_json(card), "md": card_to_markdown(card), "html": card_to_html(card, evidence)}
    for fmt, name in CARD_FILES.items():
        got = arts.card_texts.get(fmt)
        if got is None:
            res.problems.append(f"card/{name}: missing")
        elif got.rstrip("\n") != expected[fmt].rstrip("\n"):
            res.problems.append(f"card/{name}: differs from the card rebuilt from the records ({_first_difference(got, expected[fmt])})")
    res.problems += _registered_card_problems(versions, downloaded, expected)
    res.detail = f"card rebuilt from {len(evidence.records)} records; {len(CARD_FILES)} formats compared"
    return res


def _registered_card_problems(versions: list[Any], downloaded: dict[tuple[str, str], Path | str], expected: dict[str, str]) -> list[str]:
    """The newest registered version carries the run's card (an older one, of a training since extended, its own)."""
    out: list[str] = []
    for v in versions[-1:]:
        local = downloaded[(v.name, str(v.version))]
        if isinstance(local, str):
            out.append(f"registered model {v.name} version {v.version}: artifacts cannot be read ({local})")
            continue
        for fmt, name in CARD_FILES.items():
            files = list(local.rglob(name))
            if not files:
                out.append(f"registered model {v.name} version {v.version}: no attached {name}")
            elif files[0].read_text(encoding="utf-8").rstrip("\n") != expected[fmt].rstrip("\n"):
                out.append(f"registered model {v.name} version {v.version}: attached {name} differs from the card rebuilt from the records")
    return out


def _first_difference(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at character {n}: stored {a[max(0, n - 30):n + 30]!r}, rebuilt {b[max(0, n - 30):n + 30]!r}"


# ----------------------------------------------------------------------------------- metrics


def _check_metrics(arts: RunArtifacts) -> CheckResult:
    from mlflow import MlflowClient

    res = CheckResult("metrics")
    expected: dict[tuple[str, int], set[float]] = {}
    for d in arts.record_dicts:
        if not isinstance(d, dict) or not isinstance(d.get("metrics"), dict) or not isinstance(d.get("round"), int):
            continue
        for k, v in d["metrics"].items():
            expected.setdefault((k, metric_step(k, d["round"])), set()).add(float(v))
    client = MlflowClient(tracking_uri=arts.tracking_uri)
    logged: dict[tuple[str, int], list[float]] = {}
    for key in sorted(client.get_run(arts.run_id).data.metrics):
        for m in client.get_metric_history(arts.run_id, key):
            logged.setdefault((key, int(m.step)), []).append(float(m.value))
    orphans: dict[int, list[str]] = {}  # step -> keys logged there that no record covers
    for (key, step), values in sorted(logged.items()):
        want = expected.get((key, step))
        if want is None:
            orphans.setdefault(step, []).append(key)
            continue
        for v in values:
            if not any(_same(v, w) for w in want):
                res.problems.append(f"MLflow metric {key} at step {step} = {v!r}, but the round record says {sorted(want)[0]!r}")
    for step, keys in sorted(orphans.items()):
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        res.problems.append(f"{len(keys)} MLflow metric(s) at step {step} are in no round record ({shown}): "
                            "a record is missing, or the metrics were logged after the fact")
    missing = sorted(set(expected) - set(logged))
    for key, step in missing[:20]:
        res.problems.append(f"round record metric {key} (step {step}) is not in MLflow")
    if len(missing) > 20:
        res.problems.append(f"... and {len(missing) - 20} more record metrics not in MLflow")
    res.detail = f"{sum(len(v) for v in logged.values())} logged values compared with {len(expected)} record metrics"
    return res


def _same(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-12 * max(1.0, abs(b)))
