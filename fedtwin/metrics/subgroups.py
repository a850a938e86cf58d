"""Statistics per fairness subgroup, in the layout's fixed subgroup order.

Every site produces a block for every subgroup name in the layout, zero-filled when it has no
such patient, so site vectors always line up. A patient is in as many subgroups as apply
(``sex=F``, ``age=65-80`` and ``sex=F&age=65-80``), so subgroup blocks do not add up to the
overall block - each is its own additive sum over its own patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.metrics.effect import EffectInputs
from fedtwin.metrics.forecast import ForecastInputs
from fedtwin.metrics.group import GroupStats
from fedtwin.metrics.layout import MetricsLayout, MetricsLayoutError
from fedtwin.metrics.outcome import OutcomeInputs


@dataclass(eq=False)
class SubgroupStats(AdditiveStats):
    """One :class:`GroupStats` per ``layout.subgroup_names`` entry, in that order."""

    layout: MetricsLayout = static_field()
    groups: tuple[GroupStats, ...]

    def _tuple_labels(self, name: str, n: int) -> list[str]:
        return list(self.layout.subgroup_names)

    @classmethod
    def zeros(cls, layout: MetricsLayout) -> "SubgroupStats":
        return cls(layout, tuple(GroupStats.zeros(layout) for _ in layout.subgroup_names))

    @classmethod
    def from_inputs(
        cls,
        layout: MetricsLayout,
        membership: np.ndarray,
        *,
        names: tuple[str, ...] | None = None,
        forecast: ForecastInputs | None = None,
        outcome: OutcomeInputs | None = None,
        effect: EffectInputs | None = None,
    ) -> "SubgroupStats":
        """Statistics per subgroup from a (N, G) membership matrix.

        ``names`` (as returned by :func:`~fedtwin.metrics.labels.subgroup_membership`) are checked
        against the layout so that a column can never land in another subgroup's slot.
        """
        membership = np.asarray(membership, dtype=bool)
        if membership.ndim != 2 or membership.shape[1] != layout.n_subgroups:
            raise MetricsLayoutError(
                f"membership must have shape (N, {layout.n_subgroups}), got {membership.shape}",
                "build it with subgroup_membership() from the config that made the layout",
            )
        if names is not None and tuple(names) != layout.subgroup_names:
            raise MetricsLayoutError(
                "membership columns are not the layout's subgroup names",
                "build the layout's subgroup_names with subgroup_names(config) from the same config",
            )
        groups = []
        for g in range(layout.n_subgroups):
            rows = np.flatnonzero(membership[:, g])
            groups.append(
                GroupStats.from_inputs(
                    layout,
                    forecast=forecast.select(rows) if forecast is not None else None,
                    outcome=outcome.select(rows) if outcome is not None else None,
                    effect=effect.select(rows) if effect is not None else None,
                )
            )
        return cls(layout, tuple(groups))

    def group(self, name: str) -> GroupStats:
        try:
            return self.groups[self.layout.subgroup_names.index(name)]
        except ValueError:
            raise KeyError(f"unknown subgroup {name!r}") from None

    def items(self) -> list[tuple[str, GroupStats]]:
        return list(zip(self.layout.subgroup_names, self.groups))
