"""The one statistics object a site sends: overall cohort plus every fairness subgroup.

``EvaluationStats.from_inputs(...).to_vector()`` is the flat float vector that goes into
SecAgg+; the coordinator rebuilds the summed statistics with ``EvaluationStats.from_vector``
(template ``EvaluationStats.zeros(layout)``) and computes every metric from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.metrics.effect import EffectInputs
from fedtwin.metrics.forecast import ForecastInputs
from fedtwin.metrics.group import GroupStats
from fedtwin.metrics.layout import MetricsLayout
from fedtwin.metrics.outcome import OutcomeInputs
from fedtwin.metrics.subgroups import SubgroupStats


@dataclass(eq=False)
class EvaluationStats(AdditiveStats):
    """Overall :class:`GroupStats` followed by :class:`SubgroupStats` (that order in the vector)."""

    layout: MetricsLayout = static_field()
    overall: GroupStats
    subgroups: SubgroupStats

    @classmethod
    def zeros(cls, layout: MetricsLayout) -> "EvaluationStats":
        """The all-zero statistics; also the template for :meth:`from_vector`."""
        return cls(layout, GroupStats.zeros(layout), SubgroupStats.zeros(layout))

    @classmethod
    def from_inputs(
        cls,
        layout: MetricsLayout,
        membership: np.ndarray | None = None,
        *,
        names: tuple[str, ...] | None = None,
        forecast: ForecastInputs | None = None,
        outcome: OutcomeInputs | None = None,
        effect: EffectInputs | None = None,
    ) -> "EvaluationStats":
        """One site's statistics. ``membership`` (N, G) is required when the layout has subgroups."""
        overall = GroupStats.from_inputs(layout, forecast=forecast, outcome=outcome, effect=effect)
        if layout.n_subgroups == 0:
            subgroups = SubgroupStats.zeros(layout)
        else:
            if membership is None:
                raise ValueError("the layout lists subgroups, so a membership matrix is required")
            subgroups = SubgroupStats.from_inputs(
                layout, membership, names=names, forecast=forecast, outcome=outcome, effect=effect
            )
        return cls(layout, overall, subgroups)


def vector_size(layout: MetricsLayout) -> int:
    """Length of the SecAgg+ vector for this layout."""
    return EvaluationStats.zeros(layout).vector_size()
