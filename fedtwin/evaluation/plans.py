"""Intervention plan files for ``fedtwin twin whatif``.

Format (YAML)::

    name: no vasopressor                 # optional
    description: stop norepinephrine     # optional
    interventions:
      norepinephrine: 0                  # a scalar: that dose in every horizon bin
      fluids: [1000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]   # or one dose per horizon bin

Doses are per bin in the spec's canonical units. Interventions the plan does not name keep their
recorded doses. Every problem (unknown intervention, negative or non-numeric dose, wrong number
of bins, exposure above 1) is reported at once (fedtwin.twin.validate_plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedtwin.errors import FedTwinError
from fedtwin.spec import TwinSpec
from fedtwin.twin.whatif import validate_plan

ALLOWED_KEYS = {"interventions", "name", "description"}


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def parse_plan(data: Any, spec: TwinSpec, source: str = "the plan") -> dict[str, list[float]]:
    """A plan mapping (as read from YAML) -> ``{intervention: [dose per horizon bin]}``, validated."""
    horizon = spec.time.horizon_steps
    example = f"interventions: {{{spec.intervention_names[0] if spec.intervention_names else 'drug'}: 0}}"
    if not isinstance(data, dict) or "interventions" not in data:
        raise FedTwinError(f"{source} must be a mapping with an 'interventions' key", f"write e.g. `{example}`")
    extra = sorted(set(map(str, data)) - ALLOWED_KEYS)
    if extra:
        raise FedTwinError(f"{source} has unknown keys {extra}", f"allowed keys: {sorted(ALLOWED_KEYS)}")
    ivs = data["interventions"]
    if not isinstance(ivs, dict) or not ivs:
        raise FedTwinError(f"{source}: 'interventions' must map intervention names to doses", f"write e.g. `{example}`")
    plan: dict[str, Any] = {}
    problems: list[str] = []
    for name, doses in ivs.items():
        name = str(name)
        items = doses if isinstance(doses, list) else [doses]
        if any(_number(d) is None for d in items):
            problems.append(f"{name}: doses must be numbers (a number for every bin, or a list of {horizon}), got {doses!r}")
            plan[name] = [0.0] * horizon  # still checked below for an unknown name
            continue
        plan[name] = [float(d) for d in doses] if isinstance(doses, list) else [float(doses)] * horizon
    try:
        checked = validate_plan(spec, plan)
    except FedTwinError as exc:
        problems += [line[4:] for line in exc.problem.splitlines() if line.startswith("  - ")]
    if problems:
        raise FedTwinError(
            f"invalid intervention plan in {source}:\n" + "\n".join(f"  - {p}" for p in problems),
            f"give, per intervention of the spec ({', '.join(spec.intervention_names)}), a dose >= 0 in canonical units "
            f"({', '.join(i.canonical_unit for i in spec.interventions)}) for every bin, or a list of {horizon} doses",
        )
    return {k: [float(x) for x in v] for k, v in checked.items()}


def load_plan(path: str | Path, spec: TwinSpec) -> dict[str, list[float]]:
    """Read and validate a plan file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedTwinError(f"plan file {p} does not exist", "pass a YAML plan, e.g. specs/plans/icu-no-vasopressor.yaml") from None
    except OSError as exc:
        raise FedTwinError(f"plan file {p} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FedTwinError(f"plan file {p} is not valid YAML: {exc}", "check the indentation and brackets") from None
    return parse_plan(data, spec, source=str(p))
