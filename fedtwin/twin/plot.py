"""PNG of a what-if: observed history, forecast under the recorded and the alternative plan.

One panel per variable the plan's interventions act on (per the spec), with the 90% band
shaded and the 50% band darker; the prediction time is marked. Uses matplotlib's Agg
backend (no display at a site).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.twin.whatif import WhatIfResult


def _time_axis(step_seconds: float) -> tuple[float, str]:
    if step_seconds >= 180 * 86400:
        return step_seconds / (365.25 * 86400.0), "years"
    if step_seconds >= 2 * 86400:
        return step_seconds / 86400.0, "days"
    if step_seconds >= 3600:
        return step_seconds / 3600.0, "hours"
    return step_seconds / 60.0, "minutes"


def plot_what_if(result: WhatIfResult, path: str | Path, patient: int = 0, variables: Sequence[str] | None = None, dpi: int = 110) -> Path:
    """Write the what-if of ``result``'s patient at position ``patient`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result.history_values.shape[0]
    if not 0 <= patient < n:
        raise FedTwinError(f"patient position {patient} is out of range (the result has {n} patients)")
    names = list(variables) if variables is not None else (result.affected or result.state_names)
    unknown = [v for v in names if v not in result.state_names]
    if unknown:
        raise FedTwinError(f"unknown variables {unknown}", f"choose from {result.state_names}")
    per, unit = _time_axis(result.step_seconds)
    h = result.history_steps
    f = result.recorded.mean.shape[1]
    t_hist = (np.arange(h) - h + 1) * per  # prediction time = end of the last history bin = 0
    t_fut = np.arange(1, f + 1) * per
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    plan_txt = ", ".join(f"{k}: {', '.join(f'{x:g}' for x in v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in result.plan.items())
    for ax, name in zip(axes[:, 0], names):
        j = result.state_names.index(name)
        hv = result.history_values[patient, :, j]
        ax.plot(t_hist, hv, "o", color="black", ms=3, label="observed")
        for bands, color, label in ((result.recorded, "tab:blue", "recorded plan"), (result.alternative, "tab:orange", "alternative plan")):
            ax.fill_between(t_fut, bands.lower90[patient, :, j], bands.upper90[patient, :, j], color=color, alpha=0.15, lw=0)
            ax.fill_between(t_fut, bands.lower50[patient, :, j], bands.upper50[patient, :, j], color=color, alpha=0.3, lw=0)
            ax.plot(t_fut, bands.mean[patient, :, j], color=color, lw=2, label=label)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_ylabel(f"{name} [{result.units[j]}]")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=8)
    axes[0, 0].set_title(f"patient {int(result.person_ids[patient])} - what-if: {plan_txt}", fontsize=9)
    axes[-1, 0].set_xlabel(f"{unit} from prediction time (bands: 50% and 90% prediction intervals)")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p
