"""Fairness subgroup labels: a fixed list of names, and which patients belong to each.

The subgroup list is part of the vector layout, so it is derived from the fairness config
alone - never from the data - and every site produces statistics for every subgroup, empty
ones included. Names are ``attribute=level`` (``sex=F``, ``age=65-80``, ``race=black``) and
pairwise intersections joined by ``&`` in the fixed attribute order sex, age, race
(``sex=F&age=65-80``). A patient whose value is missing or not one of the configured levels is
in no group of that attribute (but still in the overall cohort); extraction's ``unknown`` labels
are therefore in no group unless ``unknown`` is added to the levels.

Age bands follow ``FairnessSpec.age_bands`` edges [18, 45, 65, 80]: ``<18``, ``18-45``,
``45-65``, ``65-80``, ``80+``; each band includes its lower edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from fedtwin.metrics.layout import MetricsLayoutError

ATTRIBUTE_ORDER = ("sex", "age", "race")


@dataclass(frozen=True)
class SubgroupConfig:
    """Which attributes, which levels, and whether pairwise intersections are included.

    Mirrors ``fedtwin.spec.model.FairnessSpec`` (see :meth:`from_fairness`) plus the level lists,
    which must be agreed because they fix the layout.
    """

    sex: bool = True
    race: bool = True
    age_bands: tuple[float, ...] = (18.0, 45.0, 65.0, 80.0)
    intersections: bool = True
    sex_levels: tuple[str, ...] = ("F", "M")
    race_levels: tuple[str, ...] = ("white", "black", "asian", "american_indian", "pacific_islander", "other")

    def __post_init__(self) -> None:
        bands = tuple(float(b) for b in self.age_bands)
        if any(b <= a for a, b in zip(bands, bands[1:])):
            raise MetricsLayoutError(f"age_bands must be strictly increasing, got {list(bands)}")
        object.__setattr__(self, "age_bands", bands)
        object.__setattr__(self, "sex_levels", tuple(str(s) for s in self.sex_levels))
        object.__setattr__(self, "race_levels", tuple(str(s) for s in self.race_levels))
        for attr in ("sex_levels", "race_levels"):
            levels = getattr(self, attr)
            if len(set(levels)) != len(levels) or any(c in lv for lv in levels for c in "=&"):
                raise MetricsLayoutError(f"{attr} must be unique and contain no '=' or '&', got {list(levels)}")

    @classmethod
    def from_fairness(cls, fairness: Any, **levels: tuple[str, ...]) -> "SubgroupConfig":
        """Build from a ``FairnessSpec`` (or anything with its attributes), plus optional level lists."""
        return cls(
            sex=bool(fairness.sex),
            race=bool(fairness.race),
            age_bands=tuple(fairness.age_bands),
            intersections=bool(fairness.intersections),
            **levels,
        )

    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Enabled attributes in the fixed order, with their levels."""
        out: dict[str, tuple[str, ...]] = {}
        if self.sex:
            out["sex"] = self.sex_levels
        if self.age_bands:
            out["age"] = age_band_labels(self.age_bands)
        if self.race:
            out["race"] = self.race_levels
        return out


def _edge(x: float) -> str:
    return f"{x:g}"


def age_band_labels(edges: tuple[float, ...]) -> tuple[str, ...]:
    """``(18, 45, 65, 80) -> ("<18", "18-45", "45-65", "65-80", "80+")``."""
    if not edges:
        return ()
    inner = [f"{_edge(a)}-{_edge(b)}" for a, b in zip(edges, edges[1:])]
    return (f"<{_edge(edges[0])}", *inner, f"{_edge(edges[-1])}+")


def subgroup_names(config: SubgroupConfig) -> tuple[str, ...]:
    """The fixed, data-independent subgroup list: all single levels, then pairwise intersections."""
    attrs = config.attributes()
    names = [f"{a}={lv}" for a, levels in attrs.items() for lv in levels]
    if config.intersections:
        for a, b in combinations(attrs, 2):
            names += [f"{a}={la}&{b}={lb}" for la in attrs[a] for lb in attrs[b]]
    return tuple(names)


def parse_subgroup(name: str) -> dict[str, str]:
    """``"sex=F&age=65-80" -> {"sex": "F", "age": "65-80"}``."""
    out: dict[str, str] = {}
    for part in name.split("&"):
        attr, sep, level = part.partition("=")
        if not sep or not attr or attr in out:
            raise MetricsLayoutError(f"malformed subgroup name {name!r}", "use attribute=level joined by '&'")
        out[attr] = level
    return out


def subgroup_family(name: str) -> str:
    """Attributes of a subgroup joined by ``&`` (``"sex=F&age=65-80" -> "sex&age"``): groups of one
    family are disjoint, so gaps are computed within a family."""
    return "&".join(parse_subgroup(name))


def attribute_labels(
    config: SubgroupConfig,
    *,
    sex: np.ndarray | None = None,
    age: np.ndarray | None = None,
    race: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-patient level label for each enabled attribute (``""`` = in no group of it).

    ``sex`` and ``race`` are compared as stripped strings with the configured levels. ``age`` is
    either numeric years (NaN = unknown), banded by ``config.age_bands``, or already-banded labels
    (as in ``CohortTensors.subgroups["age"]``), compared with the band labels.
    """
    given = {"sex": sex, "age": age, "race": race}
    attrs = config.attributes()
    sizes = {np.asarray(v).shape[0] for k, v in given.items() if k in attrs and v is not None}
    if len(sizes) > 1:
        raise ValueError(f"sex/age/race arrays have different lengths: {sorted(sizes)}")
    out: dict[str, np.ndarray] = {}
    for attr, levels in attrs.items():
        values = given[attr]
        if values is None:
            raise ValueError(f"the subgroup config uses {attr!r} but no {attr} array was given")
        if attr == "age" and np.asarray(values).dtype.kind in "iuf":
            a = np.asarray(values, dtype=np.float64)
            idx = np.searchsorted(np.asarray(config.age_bands), a, side="right")
            labels = np.asarray(levels, dtype=object)[np.minimum(idx, len(levels) - 1)]
            out[attr] = np.where(np.isfinite(a), labels, "").astype(object)
        else:
            s = np.array([str(v).strip() if v is not None else "" for v in np.asarray(values, dtype=object)], dtype=object)
            out[attr] = np.where(np.isin(s, np.asarray(levels, dtype=object)), s, "").astype(object)
    return out


def subgroup_membership(
    config: SubgroupConfig,
    *,
    sex: np.ndarray | None = None,
    age: np.ndarray | None = None,
    race: np.ndarray | None = None,
) -> tuple[tuple[str, ...], np.ndarray]:
    """(subgroup names, membership (N, G) bool): column g is True for patients in subgroup g.

    Takes plain arrays, so ``subgroup_membership(config, **tensors.subgroups)`` works with the
    labels extraction produces (sex ``F``/``M``/``unknown``, banded age, race names) as well as
    with raw ages in years.
    """
    labels = attribute_labels(config, sex=sex, age=age, race=race)
    names = subgroup_names(config)
    n = next(iter(labels.values())).shape[0] if labels else 0
    member = np.zeros((n, len(names)), dtype=bool)
    for g, name in enumerate(names):
        col = np.ones(n, dtype=bool)
        for attr, level in parse_subgroup(name).items():
            col &= labels[attr] == level
        member[:, g] = col
    return names, member
