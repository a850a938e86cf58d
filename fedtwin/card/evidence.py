"""What a model card is built from: the signed round records, the spec, the study settings and
the decoded evaluation reports of the run.

The card is a pure function of this object (:func:`fedtwin.card.build_card`), so an auditor who
holds the same evidence rebuilds the same card byte for byte and can compare it with the stored
one. Nothing patient-level is in here: records and manifests hold digests and DP numbers, the
reports hold suppressed aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtwin.provenance.record import RoundRecord

STUDY_KEYS = (
    "study_id", "strategy", "proximal_mu", "num_rounds", "min_sites", "epsilon_per_site", "delta", "local_epochs",
    "batch_size", "max_grad_norm", "learning_rate", "secagg", "suppression_threshold", "code_version", "accountant",
    "privacy_unit", "secure_rng",
)


@dataclass(frozen=True)
class RunEvidence:
    """Everything a card states comes from these fields (see module docstring)."""

    records: tuple[RoundRecord, ...]
    """the signed chain, in order; the last has kind == "evaluate"."""
    spec: dict[str, Any]
    """the twin spec as JSON (``TwinSpec.model_dump(mode="json")``); its hash is ``records[i].spec_hash``."""
    study: dict[str, Any]
    """study settings, keys :data:`STUDY_KEYS`."""
    final_report: dict[str, Any]
    """the decoded final evaluation report (``fedtwin-twin-evaluation/1``, final layout)."""
    round_reports: dict[int, dict[str, Any]]
    """report of the global model produced by training round r (round layout); 0 = initial model; may be empty."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        if not self.records:
            raise ValueError("a model card needs at least one round record")
        missing = [k for k in STUDY_KEYS if k not in self.study]
        if missing:
            raise ValueError(f"study settings lack {missing}")
        reports: dict[int, dict[str, Any]] = {}
        for k, v in self.round_reports.items():  # JSON object keys arrive as strings: "3" -> 3
            if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())):
                raise ValueError(f"round_reports keys must be round numbers, got {k!r}")
            reports[int(k)] = v
        object.__setattr__(self, "round_reports", reports)
