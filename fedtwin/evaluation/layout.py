"""The evaluation protocol every site follows: which models, plans, variables and subgroups.

Like :class:`fedtwin.metrics.MetricsLayout`, an :class:`EvaluationLayout` is decided before any
site computes anything and is derived from the spec (and the list of ground-truth plans on
synthetic sites) only, never from data, so that every site's statistics vector has the same
size and order and SecAgg+ can add them.

Each model gets two :class:`~fedtwin.metrics.EvaluationStats` blocks:

- ``point``: errors of the predictive MEAN in canonical units (bias, MAE, RMSE), the outcome
  statistics (models with a hazard head) and the what-if effect errors (models that respond to a
  plan, plus persistence as the "no effect" reference);
- ``dist``: the predictive DISTRIBUTION in the model's own form (NLL, 50/90 % interval coverage).
  The twin's predictive distribution is Gaussian in the spec's transformed space (log-normal in
  canonical units for log-scaled variables) and its intervals are exact quantiles, so its
  statistics are computed on a rescaled copy of that space that gives the exact coverage of the
  intervals the twin shows and the NLL of its density in canonical units (see
  :mod:`fedtwin.evaluation.predictions`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from fedtwin.errors import FedTwinError
from fedtwin.metrics import MetricsLayout, SubgroupConfig, subgroup_names
from fedtwin.spec import TwinSpec, spec_hash

#: every model an evaluation can score, in report order
MODEL_NAMES: tuple[str, ...] = ("twin", "mechanistic_only", "residual_only", "persistence", "population_mean")
#: models with an outcome (hazard) head
OUTCOME_MODELS = frozenset({"twin", "residual_only"})
#: models with what-if effect statistics; persistence ignores the plan, so its effect error is
#: that of predicting "no effect" (the reference an effect error should beat)
EFFECT_MODELS = frozenset({"twin", "mechanistic_only", "residual_only", "persistence"})
#: models that need training data besides the twin itself
TRAINED_BASELINES = frozenset({"residual_only", "persistence", "population_mean"})
EFFECT_SEPARATOR = "|"  # effect "variables" of the metrics layout are "<plan>|<variable>"
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class EvaluationLayout:
    """Everything that fixes the size and order of a site's evaluation statistics.

    - ``spec_hash``, ``variable_names`` (V), ``horizon`` (F), ``outcome_names`` (O): from the spec.
    - ``subgroup_names``: the spec's fairness subgroups (:func:`fedtwin.metrics.subgroup_names`).
    - ``models``: which of :data:`MODEL_NAMES` are scored (the twin always).
    - ``plans``: alternative plans with a ground-truth effect (synthetic sites; empty otherwise).
    """

    spec_hash: str
    variable_names: tuple[str, ...]
    horizon: int
    outcome_names: tuple[str, ...] = ()
    subgroup_names: tuple[str, ...] = ()
    models: tuple[str, ...] = MODEL_NAMES
    plans: tuple[str, ...] = ()
    version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        for name in ("variable_names", "outcome_names", "subgroup_names", "models", "plans"):
            object.__setattr__(self, name, tuple(str(x) for x in getattr(self, name)))
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown or "twin" not in self.models or len(set(self.models)) != len(self.models):
            raise FedTwinError(
                f"evaluation models must be distinct names from {list(MODEL_NAMES)} including 'twin', got {list(self.models)}",
                f"choose baselines from {', '.join(MODEL_NAMES[1:])}",
            )
        object.__setattr__(self, "models", tuple(m for m in MODEL_NAMES if m in self.models))  # fixed order
        bad = [p for p in self.plans if p == "recorded" or not p or any(c in p for c in f".{EFFECT_SEPARATOR}")]
        if bad or len(set(self.plans)) != len(self.plans):
            raise FedTwinError(
                f"ground-truth plan names must be distinct, not 'recorded', without '.' or '{EFFECT_SEPARATOR}': {list(self.plans)}"
            )
        if self.version != LAYOUT_VERSION:
            raise FedTwinError(
                f"evaluation layout version {self.version} is not this FedTwin's version {LAYOUT_VERSION}",
                "run the same FedTwin version at every site",
            )

    @classmethod
    def for_spec(
        cls,
        spec: TwinSpec,
        *,
        models: tuple[str, ...] | list[str] = MODEL_NAMES,
        plans: tuple[str, ...] | list[str] = (),
        subgroups: SubgroupConfig | None = None,
    ) -> "EvaluationLayout":
        """The layout for ``spec``; subgroups from ``spec.fairness`` unless given."""
        config = subgroups or SubgroupConfig.from_fairness(spec.fairness)
        return cls(
            spec_hash=spec_hash(spec),
            variable_names=tuple(spec.state_names),
            horizon=spec.time.horizon_steps,
            outcome_names=tuple(spec.outcome_names),
            subgroup_names=subgroup_names(config),
            models=tuple(models),
            plans=tuple(plans),
        )

    # -- per-model metrics layouts ---------------------------------------------------------------

    @property
    def effect_names(self) -> tuple[str, ...]:
        """``<plan>|<variable>`` for every ground-truth plan and state variable."""
        return tuple(f"{p}{EFFECT_SEPARATOR}{v}" for p in self.plans for v in self.variable_names)

    def has_outcomes(self, model: str) -> bool:
        return model in OUTCOME_MODELS and bool(self.outcome_names)

    def has_effects(self, model: str) -> bool:
        return model in EFFECT_MODELS and bool(self.plans)

    def point_layout(self, model: str) -> MetricsLayout:
        return MetricsLayout(
            variable_names=self.variable_names,
            horizon=self.horizon,
            outcome_names=self.outcome_names if self.has_outcomes(model) else (),
            effect_variable_names=self.effect_names if self.has_effects(model) else (),
            subgroup_names=self.subgroup_names,
        )

    def dist_layout(self) -> MetricsLayout:
        return MetricsLayout(variable_names=self.variable_names, horizon=self.horizon, subgroup_names=self.subgroup_names)

    # -- exchange ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvaluationLayout":
        return cls(**d)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_same(self, other: "EvaluationLayout") -> None:
        if self != other:
            raise FedTwinError(
                f"evaluation statistics built under different layouts ({self.fingerprint()} vs {other.fingerprint()})",
                "every site must build its statistics from the same EvaluationLayout",
            )
