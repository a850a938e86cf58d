"""Digests of the evidence that is too big, or too sensitive, to put in a record itself.

* :func:`parameters_digest`: model parameters as the list of numpy arrays Flower sends. The
  coordinator records the digest of the global parameters it sent and of the aggregate it got; a
  site records the digest of what it received; the registered model is matched to the last
  completed round's aggregate digest.
* :func:`cohort_fingerprint`: a site's cohort, through its *suppressed* summary statistics (what
  ``fedtwin.extract.summary.summarize`` returns, what ``fedtwin site summary`` prints), never
  through rows. The site can reproduce it at any time from what it is allowed to show, and an
  auditor who is shown the summary can check it; a hash of rows would prove nothing to anyone
  outside the site and would be a fingerprint of patients.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedtwin.provenance.canonical import canonical_bytes, digest
from fedtwin.provenance.errors import ProvenanceError

PARAMETERS_DOMAIN = b"fedtwin.parameters/1\n"


def parameters_digest(arrays: Iterable[Any]) -> str:
    """sha256 (hex) over the arrays in order: for each, its dtype, its shape and its bytes.

    Each array contributes ``len(header) header len(data) data`` (lengths as 8-byte little-endian)
    with ``header`` the canonical JSON ``{"dtype": ..., "shape": [...]}``, so no two different
    lists can produce the same byte stream. Data is taken in C order and little-endian (a
    big-endian copy of the same values hashes the same), but the dtype counts: float32 and float64
    versions of one model differ, so hash the arrays exactly as they travel (``parameters_to_ndarrays``
    of the Flower ``Parameters``, or a checkpoint's arrays), not a converted copy.
    """
    h = hashlib.sha256(PARAMETERS_DOMAIN)
    items = list(arrays)
    h.update(struct.pack("<Q", len(items)))
    for i, item in enumerate(items):
        a = np.asarray(item)
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise ProvenanceError(
                f"parameter array {i} has dtype {a.dtype}, which has no stable byte form",
                "pass numeric arrays only (the model's parameters as numpy arrays)",
            )
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header = canonical_bytes({"dtype": a.dtype.str, "shape": list(a.shape)})
        data = np.ascontiguousarray(a).tobytes()
        h.update(struct.pack("<Q", len(header)) + header + struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def cohort_fingerprint(summary: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a site's suppressed cohort summary.

    ``summary`` is what :func:`fedtwin.extract.summary.summarize` returns (aggregates only, every
    count through small-cell suppression). It must carry its ``suppression_threshold`` and its
    ``cohort`` block: that is how this refuses something that is not such a summary (a list of
    rows, a tensor), since a fingerprint of anything else could not be shown to an auditor.
    """
    if not isinstance(summary, Mapping):
        raise ProvenanceError(
            f"the cohort fingerprint needs a summary dict, got a {type(summary).__name__}",
            "pass the dict fedtwin.extract.summary.summarize returns (suppressed aggregates, never rows)",
        )
    threshold = summary.get("suppression_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ProvenanceError(
            f"the summary has no valid suppression_threshold (found {threshold!r}): it does not look suppressed",
            "fingerprint the output of fedtwin.extract.summary.summarize, which records its threshold",
        )
    if not isinstance(summary.get("cohort"), Mapping):
        raise ProvenanceError(
            "the summary has no 'cohort' block: it is not a cohort summary",
            "fingerprint the output of fedtwin.extract.summary.summarize",
        )
    return digest(summary)
