"""One metric value with its confidence interval and the counts it rests on.

Every metric carries the counts it was computed from, so that a report can decide - by the
single ``disclosure_count`` the metric function set - whether the value may be shown at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _num(x: float) -> float | None:
    """JSON has no NaN: undefined values become ``None``."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class MetricResult:
    """A metric estimate, its CI, and what it rests on.

    - ``n``: observations used (patients for outcomes; patient-steps for pooled forecasts).
    - ``n_patients``: distinct patients behind those observations.
    - ``n_events`` / ``n_non_events``: outcome classes, when the metric depends on them.
    - ``disclosure_count``: the count compared with the suppression threshold. The metric
      function sets it to the smallest count the value could reveal (e.g. ``min(events,
      non-events)`` for AUROC, ``min(events, true positives)`` for TPR).
    - ``method``: how the CI was obtained; ``params`` e.g. the threshold actually used.
    """

    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    n_patients: int
    disclosure_count: int
    method: str
    level: float = 0.95
    n_events: int | None = None
    n_non_events: int | None = None
    params: dict[str, float] = field(default_factory=dict)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (no suppression applied here; see :mod:`fedtwin.metrics.report`)."""
        d: dict[str, Any] = {
            "value": _num(self.value),
            "ci": [_num(self.ci_low), _num(self.ci_high)],
            "ci_level": self.level,
            "ci_method": self.method,
            "n": int(self.n),
            "n_patients": int(self.n_patients),
        }
        if self.n_events is not None:
            d["n_events"] = int(self.n_events)
        if self.n_non_events is not None:
            d["n_non_events"] = int(self.n_non_events)
        for k, v in self.params.items():
            d[k] = _num(v)
        return d
