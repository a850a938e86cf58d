"""The manifest a site signs every round: what it trained on and with what privacy, in ~1 KB.

It travels in plaintext (a JSON string in Flower's fit metrics), so it holds only identifiers,
digests and DP numbers, every one checked by type and format on construction: there is no field
a patient-level value could be put in. What the coordinator (and later an auditor) learns from it
is which spec, code, cohort summary, data-quality report, privacy parameters and starting global
model the site *says* it used, with the site's signature on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from fedtwin.provenance import fields as F
from fedtwin.provenance.canonical import canonical_json, digest
from fedtwin.provenance.errors import FieldError, ProvenanceError
from fedtwin.provenance.keys import KeyRing, VerifyKey
from fedtwin.provenance.signing import SignedDocument, signature_valid

MANIFEST_TYPE = "fedtwin.site-manifest"
MANIFEST_FORMAT = 1
MAX_MANIFEST_JSON_BYTES = 2048
MANIFEST_METRIC = "provenance-manifest"  # the fit metric a site sends its manifest JSON in
PREVIOUS_RECORD_CONFIG = "provenance-previous-record"  # the fit config the coordinator sends the last record in


@dataclass(frozen=True)
class DPParameters:
    """The DP-SGD settings of the site's training this round (as its ledger reserved them)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "noise_multiplier", F.number(self.noise_multiplier, "dp.noise_multiplier", low=0))
        s(self, "sample_rate", F.number(self.sample_rate, "dp.sample_rate", low=0, high=1, low_open=True))
        s(self, "steps", F.integer(self.steps, "dp.steps", minimum=0))
        s(self, "max_grad_norm", F.number(self.max_grad_norm, "dp.max_grad_norm", low=0, low_open=True))
        s(self, "delta", F.number(self.delta, "dp.delta", low=0, high=1, low_open=True, high_open=True))
        s(self, "accountant", F.word(self.accountant, "dp.accountant"))

    @classmethod
    def from_settings(cls, settings: Any) -> DPParameters:
        """From anything with these attributes: ``PrivacyPlan`` or ``fedtwin.twin.config.DPSettings``."""
        return cls(**{k: getattr(settings, k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, field: str = "dp") -> DPParameters:
        d = F.exact_keys(data, field, set(cls.__dataclass_fields__))
        return cls(**d)


PERIOD_RE = re.compile(r"^[12][0-9]{3}-(0[1-9]|1[0-2])$")  # YYYY-MM


@dataclass(frozen=True)
class DataSource:
    """Where the site's cohort comes from, as TRIPOD+AI asks a report to say, coarse by construction.

    ``period_start``/``period_end`` are the months (``YYYY-MM``) of the earliest and latest index
    date of the cohort; ``n_patients`` the cohort size rounded down to the site's count step, or
    ``"<T"`` below the suppression threshold T. Nothing finer (no day, no exact count) can be put
    here, so the manifest stays free of anything that singles out a patient.
    """

    cdm_version: str
    period_start: str | None
    period_end: str | None
    n_patients: int | str

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "cdm_version", F.version(self.cdm_version, "data_source.cdm_version"))
        for k in ("period_start", "period_end"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not PERIOD_RE.match(v)):
                raise FieldError(f"data_source.{k}", "a month YYYY-MM or null", v)
        n = self.n_patients
        if isinstance(n, str):
            if not re.fullmatch(r"<[1-9][0-9]{0,3}", n):
                raise FieldError("data_source.n_patients", "a count or '<T' (below the suppression threshold T)", n)
        else:
            s(self, "n_patients", F.integer(n, "data_source.n_patients", minimum=0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, field: str = "data_source") -> DataSource:
        d = F.exact_keys(data, field, set(cls.__dataclass_fields__))
        return cls(**d)


_REQUIRED = {
    "type", "format", "study_id", "round", "site", "spec_hash", "code_version", "cohort_fingerprint",
    "quality_report_hash", "dp", "epsilon_spent", "start_parameters_hash", "data_source", "key_id", "signature",
}


@dataclass(frozen=True)
class SiteManifest(SignedDocument):
    """One site's signed statement about one round.

    ``dp`` is None for a round without training (the final evaluation round); ``epsilon_spent`` is
    the site's composed epsilon after this round, as its ledger reports it. ``key_id`` and
    ``signature`` are set by :meth:`sign`.
    """

    study_id: str
    round: int
    site: str
    spec_hash: str
    code_version: str
    cohort_fingerprint: str
    quality_report_hash: str
    dp: DPParameters | None
    epsilon_spent: float
    start_parameters_hash: str
    data_source: DataSource | None = None
    key_id: str | None = None
    signature: str | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "study_id", F.name(self.study_id, "study_id"))
        s(self, "round", F.integer(self.round, "round", minimum=1))
        s(self, "site", F.name(self.site, "site"))
        s(self, "spec_hash", F.hex_digest(self.spec_hash, "spec_hash"))
        s(self, "code_version", F.version(self.code_version, "code_version"))
        s(self, "cohort_fingerprint", F.hex_digest(self.cohort_fingerprint, "cohort_fingerprint"))
        s(self, "quality_report_hash", F.hex_digest(self.quality_report_hash, "quality_report_hash"))
        if self.dp is not None and not isinstance(self.dp, DPParameters):
            raise FieldError("dp", "DPParameters or None", type(self.dp).__name__)
        s(self, "epsilon_spent", F.number(self.epsilon_spent, "epsilon_spent", low=0))
        s(self, "start_parameters_hash", F.hex_digest(self.start_parameters_hash, "start_parameters_hash"))
        if self.data_source is not None and not isinstance(self.data_source, DataSource):
            raise FieldError("data_source", "DataSource or None", type(self.data_source).__name__)
        s(self, "key_id", F.key_id(self.key_id, "key_id"))
        s(self, "signature", F.signature(self.signature, "signature"))

    # ---------------------------------------------------------------------------- plain form

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON types (what is signed, plus the signature)."""
        return {
            "type": MANIFEST_TYPE,
            "format": MANIFEST_FORMAT,
            "study_id": self.study_id,
            "round": self.round,
            "site": self.site,
            "spec_hash": self.spec_hash,
            "code_version": self.code_version,
            "cohort_fingerprint": self.cohort_fingerprint,
            "quality_report_hash": self.quality_report_hash,
            "dp": None if self.dp is None else self.dp.to_dict(),
            "epsilon_spent": self.epsilon_spent,
            "start_parameters_hash": self.start_parameters_hash,
            "data_source": None if self.data_source is None else self.data_source.to_dict(),
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Any, field: str = "") -> SiteManifest:
        """Parse a manifest dict; any unknown, missing or ill-typed field is a :class:`FieldError`."""
        d = F.exact_keys(data, field, _REQUIRED)
        at = (field + ".") if field else ""
        if d["type"] != MANIFEST_TYPE:
            raise FieldError(at + "type", repr(MANIFEST_TYPE), d["type"])
        if d["format"] != MANIFEST_FORMAT or isinstance(d["format"], bool):
            raise FieldError(at + "format", str(MANIFEST_FORMAT), d["format"], "this FedTwin reads manifest format 1 only")
        kw = {k: d[k] for k in _REQUIRED - {"type", "format", "dp", "data_source"}}
        try:
            dp = None if d["dp"] is None else DPParameters.from_dict(d["dp"], at + "dp")
            src = None if d["data_source"] is None else DataSource.from_dict(d["data_source"], at + "data_source")
            return cls(dp=dp, data_source=src, **kw)
        except FieldError as exc:
            if not field or exc.field.startswith(at):
                raise
            raise FieldError(at + exc.field, exc.expected, exc.found) from None

    def to_json(self) -> str:
        """Canonical JSON, at most 2 KB: the string a site puts in its fit metrics."""
        text = canonical_json(self.to_dict())
        if len(text.encode("utf-8")) > MAX_MANIFEST_JSON_BYTES:  # cannot happen with checked fields; a guard
            raise ProvenanceError(f"manifest JSON is {len(text)} bytes (limit {MAX_MANIFEST_JSON_BYTES})", "report a bug")
        return text

    @classmethod
    def from_json(cls, text: str | bytes) -> SiteManifest:
        if len(text) > MAX_MANIFEST_JSON_BYTES:
            raise ProvenanceError(
                f"manifest is {len(text)} bytes; a manifest is at most {MAX_MANIFEST_JSON_BYTES}",
                "refuse it: a manifest holds identifiers, digests and DP numbers only",
            )
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProvenanceError(f"manifest is not JSON: {exc}", "the site must send SiteManifest.to_json()") from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the whole manifest, signature included."""
        return digest(self.to_dict())

    # ------------------------------------------------------------------------------- signing

    def verify(self, keys: KeyRing | VerifyKey) -> None:
        """Raise :class:`ProvenanceError` unless the manifest is signed by the key of ``self.site``.

        With a :class:`KeyRing` the signer must be the key named like the site; with a single
        :class:`VerifyKey` (e.g. a site checking itself) that key must have signed it.
        """
        where = f"manifest of {self.site}, round {self.round}"
        if isinstance(keys, VerifyKey):
            key: VerifyKey | None = keys
        else:
            key = keys.by_name(self.site)
            if key is None:
                raise ProvenanceError(f"{where}: no trusted key for site {self.site!r} (trusted: {', '.join(keys.names)})", "add the site's public key")
        if self.signature is None:
            raise ProvenanceError(f"{where} is not signed", "sign it with SiteManifest.sign(key)")
        if self.key_id != key.key_id:
            raise ProvenanceError(f"{where}: signed with key {self.key_id}, but {key.describe()} is expected", "check which key signed it")
        if not signature_valid(key, self.payload(), self.signature):
            raise ProvenanceError(f"{where}: the signature does not verify with {key.describe()}: the manifest was altered after signing", "")
