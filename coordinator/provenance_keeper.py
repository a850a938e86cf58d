"""The coordinator's half of provenance: check the sites' manifests, sign one record per round.

Per round the ServerApp hands the keeper the manifests that came with the fit results; a manifest
that does not parse, is not signed by the trusted key of the site it names, or speaks of another
study, round, spec or starting model makes the keeper refuse the round's aggregate (the round is
recorded as halted): an update nobody can account for never becomes the global model. After the
round (completed or halted) it builds the :class:`~fedtwin.provenance.RoundRecord`, linked to the
previous record by hash, signs it with the coordinator's key and writes it to
``<checkpoint-dir>/provenance/<training id>/<seq>-round-<r>.json`` (temp file + rename) *before* the checkpoint,
so a resumed training continues the chain without a gap: on ``resume`` the keeper re-reads that
folder and links to its last record.

Records vouch for three attachments by digest: ``spec`` (the twin spec's canonical JSON),
``study`` (the study settings, :func:`study_facts`) and, for rounds that scored a model,
``evaluation_report`` (the suppressed report of the summed statistics). The auditor checks the
files against these digests (``fedtwin audit verify``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtwin.atomic_file import atomic_write_text
from fedtwin.provenance import KeyRing, RoundRecord, SiteManifest, digest, load_signing_key, split_finite
from fedtwin.provenance.errors import ProvenanceError

RECORD_DIR = "provenance"
RECORD_RE = re.compile(r"^(\d{4,})-round-(\d{4,})\.json$")
SECAGG_KEYS = ("num-shares", "reconstruction-threshold", "clipping-range", "max-weight", "quantization-range", "modulus-range", "secagg-timeout")


def study_facts(cfg: Any, code_version: str) -> dict[str, Any]:
    """The study settings a record vouches for (and the model card states), from the run config."""
    secagg: dict[str, Any] = {"enabled": bool(cfg["secagg"])}
    if secagg["enabled"]:
        for k in SECAGG_KEYS:
            if k in cfg:
                secagg[("timeout" if k == "secagg-timeout" else k.replace("-", "_"))] = cfg[k]
    return {
        "study_id": str(cfg.get("study-id", "")).strip() or "fedtwin",
        "strategy": str(cfg.get("strategy", "fedavg")).strip() or "fedavg",
        "proximal_mu": float(cfg.get("proximal-mu", 0.0)),
        "num_rounds": int(cfg["num-rounds"]),
        "min_sites": int(cfg["min-sites"]),
        "epsilon_per_site": float(cfg.get("epsilon-per-site", 0.0)),
        "delta": None,  # each site's own (its manifests say which); kept for the card's layout
        "local_epochs": float(cfg.get("local-epochs", 1.0)),
        "batch_size": int(cfg.get("batch-size", 64)),
        "max_grad_norm": float(cfg.get("max-grad-norm", 1.0)),
        "learning_rate": float(cfg.get("learning-rate", 3e-3)),
        "secagg": secagg,
        "suppression_threshold": None,  # set from the spec by the ServerApp
        "code_version": code_version,
        "accountant": "rdp",
        "privacy_unit": "patient",
        "secure_rng": False,
    }


@dataclass
class ProvenanceKeeper:
    study_id: str
    spec_hash: str
    signing_key_path: Path
    keys: KeyRing
    folder: Path | None
    secagg: dict[str, Any]
    attachments: dict[str, str]
    last: RoundRecord | None = None
    seq: int = 0
    records: list[RoundRecord] = field(default_factory=list)
    documents: dict[str, Any] = field(default_factory=dict)  # the attachments themselves: spec, study
    trusted_keys: Path | None = None  # the folder the keys came from (an MLflow tag, for auditors)

    @classmethod
    def open(cls, *, study_id: str, spec_hash: str, signing_key: str | Path, trusted_keys: str | Path,
             folder: str | Path | None, secagg: dict[str, Any], attachments: dict[str, str], resume: bool,
             documents: dict[str, Any] | None = None) -> ProvenanceKeeper:
        """Load the keys (failing before round 1 if they are unusable) and, on resume, the chain so far.

        ``documents`` are the attached documents themselves (``attachments`` holds their digests)."""
        load_signing_key(signing_key)  # fail now, not after the first round
        keeper = cls(study_id, spec_hash, Path(signing_key), KeyRing.from_dir(trusted_keys),
                     Path(folder) if folder else None, dict(secagg), dict(attachments),
                     documents=dict(documents or {}), trusted_keys=Path(trusted_keys))
        if keeper.folder is not None and keeper.folder.is_dir():
            found = sorted((int(m.group(1)), p) for p in keeper.folder.iterdir() if (m := RECORD_RE.match(p.name)))
            if found and not resume:
                raise ProvenanceError(f"{keeper.folder} already holds round records of an earlier training", "resume it or move them away")
            for _, p in found:
                keeper.records.append(RoundRecord.from_json(p.read_text()))
            if found:
                keeper.last, keeper.seq = keeper.records[-1], found[-1][0]
        return keeper

    def check_manifests(self, server_round: int, start_hash: str, texts: dict[str, Any]) -> tuple[list[SiteManifest], list[str]]:
        """(valid manifests, one problem line per site whose manifest is missing or wrong)."""
        good: list[SiteManifest] = []
        problems: list[str] = []
        for site, text in sorted(texts.items()):
            try:
                if not isinstance(text, str) or not text:
                    raise ProvenanceError("sent no provenance manifest", "the site runs a FedTwin without provenance: upgrade it")
                m = SiteManifest.from_json(text)
                m.verify(self.keys)
                expected = {"site": site, "study_id": self.study_id, "round": server_round, "spec_hash": self.spec_hash,
                            "start_parameters_hash": start_hash}
                wrong = [f"{k}={getattr(m, k)!s:.16} (expected {v!s:.16})" for k, v in expected.items() if getattr(m, k) != v]
                if wrong:
                    raise ProvenanceError("manifest does not match the round: " + ", ".join(wrong), "")
                good.append(m)
            except Exception as exc:  # noqa: BLE001 - FieldError, ProvenanceError: the text names the problem
                problems.append(f"{site}: {exc}")
        return good, problems

    def record(self, *, server_round: int, kind: str, status: str, start_hash: str, aggregate_hash: str | None,
               manifests: list[SiteManifest], metrics: dict[str, Any], sites_dropped: list[str],
               report: dict[str, Any] | None) -> tuple[RoundRecord, Path | None]:
        """Sign and keep the round's record; returns it and the file it was written to."""
        kept, _ = split_finite(metrics)
        attachments = dict(self.attachments)
        if report is not None:
            attachments["evaluation_report"] = digest(report)
        rec = RoundRecord.build(
            study_id=self.study_id, round=server_round, spec_hash=self.spec_hash, start_parameters_hash=start_hash,
            aggregate_hash=aggregate_hash if status == "completed" else None, manifests=manifests, metrics=kept,
            secagg=self.secagg, previous=self.last, status=status, kind=kind, sites_dropped=sites_dropped,  # type: ignore[arg-type]
            attachments=attachments,
        ).sign(load_signing_key(self.signing_key_path))
        self.seq += 1
        self.last = rec
        self.records.append(rec)
        path = None
        if self.folder is not None:
            path = self.folder / record_file_name(self.seq, server_round)
            atomic_write_text(path, rec.to_json(indent=1) + "\n")
        return rec, path

    def last_json(self) -> str:
        return self.last.to_json() if self.last is not None else ""


def record_file_name(seq: int, server_round: int) -> str:
    return f"{seq:04d}-round-{server_round:04d}.json"
