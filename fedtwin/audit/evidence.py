"""Everything an auditor reviews for one federated training, read back from its MLflow run.

The coordinator writes, per run: ``provenance/<seq>-round-<r>.json`` (the signed round records,
in chain order), ``provenance/spec.json`` and ``provenance/study.json`` (the documents the records
vouch for by digest), ``evaluation/round-<r>.json`` (the report of the model after round r) and
``evaluation/final.json``, ``models/round-<r>.npz`` checkpoints, ``card/model-card.{json,md,html}``,
and a registered model version whose source run is this run. :func:`load_run` downloads them once
into a folder and parses what parses; what is missing or broken is left for the verifier to name,
never guessed.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtwin.errors import FedTwinError

RECORD_RE = re.compile(r"^(\d{4,})-round-(\d{4,})\.json$")
REPORT_RE = re.compile(r"^round-(\d{4,})\.json$")
EVALUATION_RE = re.compile(r"^evaluation-round-(\d{4,})\.json$")
CARD_FILES = {"json": "model-card.json", "md": "model-card.md", "html": "model-card.html"}


@dataclass
class RunArtifacts:
    """The run's evidence as files (``folder``) and parsed documents; ``problems`` lists what would not load."""

    tracking_uri: str
    run_id: str
    folder: Path
    experiment_id: str
    record_files: list[Path] = field(default_factory=list)
    record_dicts: list[Any] = field(default_factory=list)
    spec: dict[str, Any] | None = None
    study: dict[str, Any] | None = None
    final_report: dict[str, Any] | None = None
    round_reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluation_reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # per evaluation round
    documents: dict[str, Any] = field(default_factory=dict)  # provenance/documents/<sha256>.json, by file name digest
    card_texts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def evidence(self):  # -> fedtwin.card.RunEvidence
        """The model card's input, from the records and the documents they vouch for."""
        from fedtwin.card import RunEvidence
        from fedtwin.provenance import RoundRecord

        if self.spec is None or self.study is None or self.final_report is None or not self.record_dicts:
            raise FedTwinError(
                f"MLflow run {self.run_id} lacks the evidence a model card is built from "
                f"({'; '.join(self.problems) or 'records, spec, study or final report missing'})",
                "the run must come from a FedTwin training with provenance and a final evaluation round",
            )
        records = tuple(RoundRecord.from_dict(d) for d in self.record_dicts)
        return RunEvidence(records=records, spec=self.spec, study=self.study, final_report=self.final_report,
                           round_reports=dict(self.round_reports))


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _read_json(path: Path, what: str, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{what}: the artifact is missing")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{what}: not readable JSON ({exc})")
    return None


def load_run(tracking_uri: str, run_id: str, folder: Path | None = None) -> RunArtifacts:
    """Download and parse the run's evidence (``folder``: where to put the files; default a temp dir)."""
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises various errors for an unknown run or store
        raise FedTwinError(f"MLflow run {run_id} cannot be read from {tracking_uri}: {type(exc).__name__}: {exc}",
                           "check --tracking-uri and --run-id (the demo prints both; `mlflow runs list` shows run ids)") from None
    dest = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="fedtwin-audit-"))
    dest.mkdir(parents=True, exist_ok=True)
    arts = RunArtifacts(tracking_uri, run_id, dest, run.info.experiment_id)
    for sub in ("provenance", "evaluation", "card"):
        try:
            client.download_artifacts(run_id, sub, str(dest))
        except Exception as exc:  # noqa: BLE001 - absent folder or unreachable artifact store
            arts.problems.append(f"artifacts {sub}/: cannot be downloaded ({type(exc).__name__})")
    prov = dest / "provenance"
    found = sorted((int(m.group(1)), p) for p in prov.glob("*.json") if (m := RECORD_RE.match(p.name))) if prov.is_dir() else []
    arts.record_files = [p for _, p in found]
    arts.record_dicts = [_read_json(p, f"provenance/{p.name}", arts.problems) for p in arts.record_files]
    if not found:
        arts.problems.append("provenance/: the run holds no round record")
    if (prov / "documents").is_dir():
        for p in sorted((prov / "documents").glob("*.json")):
            doc = _read_json(p, f"provenance/documents/{p.name}", arts.problems)
            if doc is not None:
                arts.documents[p.stem] = doc
    arts.spec = _read_json(prov / "spec.json", "provenance/spec.json", arts.problems)
    arts.study = _read_json(prov / "study.json", "provenance/study.json", arts.problems)
    ev = dest / "evaluation"
    arts.final_report = _read_json(ev / "final.json", "evaluation/final.json", arts.problems)
    if ev.is_dir():
        for p in sorted(ev.glob("*.json")):
            for pattern, into in ((REPORT_RE, arts.round_reports), (EVALUATION_RE, arts.evaluation_reports)):
                m = pattern.match(p.name)
                if m:
                    rep = _read_json(p, f"evaluation/{p.name}", arts.problems)
                    if rep is not None:
                        into[int(m.group(1))] = rep
    for fmt, name in CARD_FILES.items():
        p = dest / "card" / name
        if p.is_file():
            arts.card_texts[fmt] = p.read_text(encoding="utf-8")
    return arts


def registered_versions(tracking_uri: str, run_id: str) -> list[Any]:
    """Model Registry versions whose source run is ``run_id`` (newest last)."""
    client = _client(tracking_uri)
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")]
    return sorted(versions, key=lambda v: (v.name, int(v.version)))
