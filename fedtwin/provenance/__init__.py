"""Signed, hash-chained provenance of federated trainings (governance issue, section 4).

Sites sign a :class:`SiteManifest` each round; the coordinator signs a :class:`RoundRecord` that
holds them and the hash of the previous record; :func:`verify_chain` checks a whole history and
reports every problem; a site keeps what it received in a :class:`ProvenanceLog`. Keys are the
Ed25519 PEM files ``fedtwin consortium init`` writes. See docs/provenance.md.

Everything hashed or signed goes through :func:`canonical_json` first.
"""

from fedtwin.provenance.canonical import canonical_bytes, canonical_json, digest, sha256_hex
from fedtwin.provenance.chain import ChainReport, Problem, record_problems, verify_chain
from fedtwin.provenance.digests import cohort_fingerprint, parameters_digest
from fedtwin.provenance.errors import FieldError, LogError, ProvenanceError
from fedtwin.provenance.keys import KeyRing, SigningKey, VerifyKey, key_id_of, load_signing_key, load_verify_key
from fedtwin.provenance.log import LogEntry, ProvenanceLog
from fedtwin.provenance.manifest import DataSource, DPParameters, SiteManifest
from fedtwin.provenance.record import RoundRecord, split_finite
from fedtwin.provenance.signing import sign_payload, signature_valid

__all__ = [
    "ChainReport", "DPParameters", "DataSource", "FieldError", "KeyRing", "LogEntry", "LogError", "Problem", "ProvenanceError",
    "ProvenanceLog", "RoundRecord", "SigningKey", "SiteManifest", "VerifyKey", "canonical_bytes", "canonical_json",
    "cohort_fingerprint", "digest", "key_id_of", "load_signing_key", "load_verify_key", "parameters_digest",
    "record_problems", "sha256_hex", "sign_payload", "signature_valid", "split_finite", "verify_chain",
]
