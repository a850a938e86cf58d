"""The coordinator's signed record of one round, linked to the previous round's record by hash.

A record holds the site manifests (each signed by its site), what the coordinator sent
(``start_parameters_hash``) and got (``aggregate_hash``, None for a halted round), the SecAgg+
parameters, the round's metrics and the hash of the previous record. Its hash is sha256 of its
canonical JSON without the signature; putting that hash into the next record is what makes the
history append-only: changing, removing or reordering any earlier record breaks every later link.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fedtwin.provenance import fields as F
from fedtwin.provenance.canonical import canonical_json, digest
from fedtwin.provenance.errors import FieldError, ProvenanceError
from fedtwin.provenance.keys import KeyRing
from fedtwin.provenance.manifest import SiteManifest
from fedtwin.provenance.signing import SignedDocument

RECORD_TYPE = "fedtwin.round-record"
RECORD_FORMAT = 1
STATUSES = ("completed", "halted")
KINDS = ("train", "evaluate")
Status = Literal["completed", "halted"]
Kind = Literal["train", "evaluate"]
SecAggValue = bool | int | float | str

_REQUIRED = {
    "type", "format", "study_id", "round", "kind", "status", "spec_hash", "start_parameters_hash", "aggregate_hash",
    "sites_dropped", "secagg", "manifests", "metrics", "attachments", "prev_hash", "key_id", "signature",
}
ATTACHMENT_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def _attachments(value: Any) -> dict[str, str]:
    """Name -> sha256 of each document the record vouches for (spec, study settings, evaluation report)."""
    if not isinstance(value, Mapping):
        raise FieldError("attachments", "an object of attachment name -> sha256 digest", type(value).__name__)
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not ATTACHMENT_RE.match(k):
            raise FieldError("attachments", "names of lowercase letters, digits and _ . - (at most 64 characters)", k)
        out[k] = F.hex_digest(v, f"attachments.{k}")  # type: ignore[assignment]
    return dict(sorted(out.items()))


def _secagg(value: Any) -> dict[str, SecAggValue]:
    if not isinstance(value, Mapping):
        raise FieldError("secagg", "an object of SecAgg+ parameters", type(value).__name__)
    out: dict[str, SecAggValue] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not F.WORD_RE.match(k):
            raise FieldError("secagg", "parameter names as short lowercase words", k)
        if isinstance(v, str):
            if len(v) > 64:
                raise FieldError(f"secagg.{k}", "a short string (at most 64 characters)", v[:70])
        elif isinstance(v, float):
            F.number(v, f"secagg.{k}")
        elif not isinstance(v, (bool, int)):
            raise FieldError(f"secagg.{k}", "a bool, number or short string", type(v).__name__)
        out[k] = v
    return dict(sorted(out.items()))


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise FieldError("metrics", "a flat object of metric name -> number", type(value).__name__)
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not F.METRIC_RE.match(k):
            raise FieldError("metrics", "metric names of letters, digits and _ . : / @ + - (at most 200 characters)", k)
        out[k] = F.number(v, f"metrics.{k}")
    return dict(sorted(out.items()))


def split_finite(metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """(the finite numeric metrics, names of the others): NaN/inf cannot be recorded, say which were left out."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            kept[k] = float(v)
        else:
            dropped.append(k)
    return kept, dropped


@dataclass(frozen=True)
class RoundRecord(SignedDocument):
    """The coordinator's statement about one round; see the module docstring.

    Build one with :meth:`build` (it links to the previous record and orders the manifests), then
    :meth:`sign` it with the coordinator's key.
    """

    study_id: str
    round: int
    kind: Kind
    status: Status
    spec_hash: str
    start_parameters_hash: str
    aggregate_hash: str | None
    sites_dropped: tuple[str, ...]
    secagg: Mapping[str, SecAggValue]
    manifests: tuple[SiteManifest, ...]
    metrics: Mapping[str, float]
    prev_hash: str | None
    attachments: Mapping[str, str] = field(default_factory=dict)
    key_id: str | None = None
    signature: str | None = field(default=None)

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "study_id", F.name(self.study_id, "study_id"))
        s(self, "round", F.integer(self.round, "round", minimum=1))
        s(self, "kind", F.word(self.kind, "kind", KINDS))
        s(self, "status", F.word(self.status, "status", STATUSES))
        s(self, "spec_hash", F.hex_digest(self.spec_hash, "spec_hash"))
        s(self, "start_parameters_hash", F.hex_digest(self.start_parameters_hash, "start_parameters_hash"))
        s(self, "aggregate_hash", F.hex_digest(self.aggregate_hash, "aggregate_hash", optional=True))
        if isinstance(self.sites_dropped, str) or not isinstance(self.sites_dropped, Iterable):
            raise FieldError("sites_dropped", "a list of site names", type(self.sites_dropped).__name__)
        s(self, "sites_dropped", tuple(F.name(x, f"sites_dropped[{i}]") for i, x in enumerate(self.sites_dropped)))
        s(self, "secagg", _secagg(self.secagg))
        if isinstance(self.manifests, (str, Mapping)) or not isinstance(self.manifests, Iterable):
            raise FieldError("manifests", "a list of site manifests", type(self.manifests).__name__)
        ms = tuple(self.manifests)
        for i, m in enumerate(ms):
            if not isinstance(m, SiteManifest):
                raise FieldError(f"manifests[{i}]", "a SiteManifest", type(m).__name__)
        s(self, "manifests", ms)
        s(self, "metrics", _metrics(self.metrics))
        s(self, "attachments", _attachments(self.attachments))
        s(self, "prev_hash", F.hex_digest(self.prev_hash, "prev_hash", optional=True))
        s(self, "key_id", F.key_id(self.key_id, "key_id"))
        s(self, "signature", F.signature(self.signature, "signature"))

    @classmethod
    def build(
        cls,
        *,
        study_id: str,
        round: int,  # noqa: A002 - the protocol's word
        spec_hash: str,
        start_parameters_hash: str,
        aggregate_hash: str | None,
        manifests: Iterable[SiteManifest],
        metrics: Mapping[str, float],
        secagg: Mapping[str, SecAggValue],
        previous: RoundRecord | str | None,
        status: Status = "completed",
        kind: Kind = "train",
        sites_dropped: Iterable[str] = (),
        attachments: Mapping[str, str] | None = None,
    ) -> RoundRecord:
        """An unsigned record linked to ``previous`` (the previous record, its hash, or None for the first).

        Manifests are ordered by site name and dropped sites sorted, so the same round gives the
        same record whatever order the replies arrived in.
        """
        prev = previous.record_hash() if isinstance(previous, RoundRecord) else previous
        return cls(
            study_id=study_id, round=round, kind=kind, status=status, spec_hash=spec_hash,
            start_parameters_hash=start_parameters_hash, aggregate_hash=aggregate_hash,
            sites_dropped=tuple(sorted(sites_dropped)), secagg=secagg,
            manifests=tuple(sorted(manifests, key=lambda m: m.site)), metrics=metrics, prev_hash=prev,
            attachments=dict(attachments or {}),
        )

    # ---------------------------------------------------------------------------- plain form

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": RECORD_TYPE,
            "format": RECORD_FORMAT,
            "study_id": self.study_id,
            "round": self.round,
            "kind": self.kind,
            "status": self.status,
            "spec_hash": self.spec_hash,
            "start_parameters_hash": self.start_parameters_hash,
            "aggregate_hash": self.aggregate_hash,
            "sites_dropped": list(self.sites_dropped),
            "secagg": dict(self.secagg),
            "manifests": [m.to_dict() for m in self.manifests],
            "metrics": dict(self.metrics),
            "attachments": dict(self.attachments),
            "prev_hash": self.prev_hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def record_hash(self) -> str:
        """sha256 of the canonical JSON without the signature: the value the next record's ``prev_hash`` holds."""
        return digest(self.payload())

    @classmethod
    def from_dict(cls, data: Any) -> RoundRecord:
        """Parse a record dict; anything unknown, missing or ill-typed is a :class:`FieldError`."""
        d = F.exact_keys(data, "", _REQUIRED)
        if d["type"] != RECORD_TYPE:
            raise FieldError("type", repr(RECORD_TYPE), d["type"])
        if d["format"] != RECORD_FORMAT or isinstance(d["format"], bool):
            raise FieldError("format", str(RECORD_FORMAT), d["format"], "this FedTwin reads record format 1 only")
        ms = d["manifests"]
        if not isinstance(ms, list):
            raise FieldError("manifests", "a list of site manifests", type(ms).__name__)
        manifests = [SiteManifest.from_dict(m, f"manifests[{i}]") for i, m in enumerate(ms)]
        for k in ("sites_dropped",):
            if not isinstance(d[k], list):
                raise FieldError(k, "a list", type(d[k]).__name__)
        kw = {k: d[k] for k in _REQUIRED - {"type", "format", "manifests"}}
        return cls(manifests=tuple(manifests), **kw)

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON (``indent`` for people; the hash is always over the canonical form)."""
        text = canonical_json(self.to_dict())
        return text if indent is None else json.dumps(json.loads(text), indent=indent, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> RoundRecord:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProvenanceError(f"round record is not JSON: {exc}", "give the record file FedTwin wrote") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------- signing

    def verify(self, keys: KeyRing, coordinator: str = "coordinator") -> None:
        """Raise :class:`ProvenanceError` listing every problem of this record on its own.

        Checks the coordinator's signature, every manifest's signature by its site's key, and that
        the manifests agree with the record. The links to other records: :func:`verify_chain`.
        """
        from fedtwin.provenance.chain import record_problems

        problems = record_problems(self, keys, coordinator=coordinator)
        if problems:
            raise ProvenanceError(
                f"round record {self.round} fails verification ({len(problems)} problem(s)):\n"
                + "\n".join(f"  - {p}" for p in problems),
                "the record or a manifest in it was altered, or signed by a key that is not trusted",
            )


def records_from_dicts(items: Sequence[Any]) -> list[RoundRecord]:
    """Parse a list of record dicts, raising on the first that does not parse (verify_chain reports all)."""
    return [RoundRecord.from_dict(x) for x in items]
