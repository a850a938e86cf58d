"""The coordinator's last check of an aggregate before it becomes the global model.

Sites check their own update (``site_agent.task.check_update``: finite, inside +-``clipping_range``;
a count at most ``max_weight``), but the coordinator cannot rely on that: a site running altered
code skips those checks. What one such site can do to a SecAgg+ round (Flower 1.41's arithmetic,
measured with :func:`fedtwin.federation.secure_sums.weighted_mean_emulation` and on real processes
in ``tests/reliability/test_misuse.py``):

* **non-finite parameters**: quantization casts NaN to the int32 minimum, so the masked sum stays
  finite but that site's entries are garbage: the aggregate holds values of about 2.6e4;
* **huge parameters**: each site's weighted vector is clipped to +-``clipping_range`` before
  masking, so the site contributes at most ``clipping_range / sum(r_i)`` per entry: bounded, but
  far outside what honest sites can produce (26.4 with three ~110-patient sites);
* **a count beyond max_weight**: the plaintext ``num_examples`` sets the site's weight ``r_i``;
  a count of 10^6 with max_weight 1000 gives it weight 1000 against ~0.1 for honest sites, so the
  aggregate is that site's (clipped) update and everyone else's is diluted away; larger counts
  overflow the masked sum of weights.

Honest sites send values inside +-c (c = ``clipping_range``) with weights ``r_i <= 1``, so their
weighted mean is a convex combination inside +-c, up to SecAgg+'s stochastic rounding (at most
one quantization step ``2c/q`` per site, divided by ``sum(r_i)``). :class:`AggregateGuard` refuses
an aggregate whose model parameters are non-finite or outside that bound, and (SecAgg+ only) a
round in which any site reported a count outside ``[1, max_weight]``. The masked sum cannot be
split into sites, so a refused aggregate halts the whole round (nothing is checkpointed, the
global model does not change); an update that stays inside the bounds is not detected (a robust
aggregation rule is not implemented: the reconstruction threshold and the sites' signed manifests
are the other defences).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AggregateGuard:
    """Bounds an aggregate must respect; built from the ServerApp's run config."""

    clipping_range: float = 8.0
    max_weight: float = 1000.0
    quantization_range: int = 2**22
    secagg: bool = True

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> AggregateGuard:
        return cls(
            clipping_range=float(cfg.get("clipping-range", 8.0)),
            max_weight=float(cfg.get("max-weight", 1000.0)),
            quantization_range=int(cfg.get("quantization-range", 2**22)),
            secagg=bool(cfg.get("secagg", False)),
        )

    def bound(self, counts: Sequence[int]) -> float:
        """Largest |parameter| an aggregate of honest updates can reach (clipping range + rounding slack)."""
        c = self.clipping_range
        if not self.secagg:
            return c * (1 + 1e-6)
        q = int(self.quantization_range)
        total_q = sum(round(n / self.max_weight * q) for n in counts)
        slack = len(counts) * 2 * c / total_q if total_q > 0 else math.inf
        return c + slack + c * 1e-9

    def problems(self, counts: Sequence[tuple[str, int]], model: Sequence[np.ndarray]) -> list[str]:
        """One line per reason to refuse the aggregate (empty: accept).

        ``counts``: (site, reported num_examples) per result, a list and not a dict, so that a site
        claiming another's name cannot hide its count behind the other's.
        """
        out: list[str] = []
        if self.secagg:
            for site, n in counts:
                if not 1 <= int(n) <= self.max_weight:
                    out.append(
                        f"{site} reported num_examples={int(n)}, outside [1, max_weight={self.max_weight:g}]: its SecAgg+ "
                        f"weight would dominate or overflow the aggregate (an honest FedTwin site refuses this itself; "
                        f"if the site really has that many patients, raise [secagg] max_weight in study.toml)"
                    )
        bad = [i for i, a in enumerate(model) if not np.all(np.isfinite(np.asarray(a, dtype=np.float64)))]
        if bad:
            out.append(f"the aggregate has non-finite values in parameter array(s) {bad[:10]}: a site sent a non-finite update")
        limit = self.bound([int(n) for _, n in counts])
        finite = [np.asarray(a, dtype=np.float64) for a in model]
        peak = max((float(np.max(np.abs(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)))) for a in finite if a.size), default=0.0)
        if peak > limit:
            out.append(
                f"the aggregate reaches |{peak:.4g}|, outside the +-{limit:.4g} that honest updates (each inside "
                f"+-clipping_range {self.clipping_range:g}) can average to: a site sent a huge or non-finite update"
            )
        return out
