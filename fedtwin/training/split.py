"""Which patients train and which evaluate: a fixed rule on the person id, not on a random draw.

Hashing the person id (with a salt naming the purpose) puts a patient in the same split in every
run, every round and every tool, so evaluation never scores a patient the model trained on, even
across runs that extract the cohort again. Nothing about the split leaves the site.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedtwin.extract.tensors import CohortTensors

DEFAULT_TEST_FRACTION = 0.2
_SALT = b"fedtwin-split-v1"


def is_test_patient(person_ids: np.ndarray, test_fraction: float = DEFAULT_TEST_FRACTION) -> np.ndarray:
    """Boolean mask: True for held-out patients (about ``test_fraction`` of them)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cut = int(test_fraction * 2**32)
    out = np.empty(len(person_ids), dtype=bool)
    for i, pid in enumerate(person_ids.tolist()):
        digest = hashlib.sha256(_SALT + str(int(pid)).encode()).digest()
        out[i] = int.from_bytes(digest[:4], "big") < cut
    return out


def train_test_split(t: CohortTensors, test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[CohortTensors, CohortTensors]:
    """(train, test) cohorts under the fixed person-id rule."""
    test = is_test_patient(t.person_ids, test_fraction)
    return t.select(np.flatnonzero(~test)), t.select(np.flatnonzero(test))
