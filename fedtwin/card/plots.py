"""The card's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every point comes from the evidence or the card: report cells with their CIs (suppressed cells are
left out, never drawn), record metrics, manifest epsilons. A figure with nothing to draw returns
None and the page says why, instead of an empty or invented plot.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedtwin.card.evidence import RunEvidence
from fedtwin.card.values import is_cell

Series = list[tuple[float, float, float | None, float | None]]  # x, value, ci low, ci high


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


def _point(cell: Any) -> tuple[float, float | None, float | None] | None:
    """(value, lo, hi) of a shown, defined cell; None for suppressed/undefined/missing."""
    if not is_cell(cell) or cell.get("value") is None:
        return None
    ci = cell.get("ci") or [None, None]
    lo, hi = (ci + [None, None])[:2] if isinstance(ci, list) else (None, None)
    return float(cell["value"]), (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _errorbar(ax: Any, series: Series, label: str | None = None, horizontal: bool = False) -> None:
    xs = [s[0] for s in series]
    vs = [s[1] for s in series]
    lo = [s[1] - s[2] if s[2] is not None else 0.0 for s in series]
    hi = [s[3] - s[1] if s[3] is not None else 0.0 for s in series]
    if horizontal:
        ax.errorbar(vs, xs, xerr=[lo, hi], fmt="o", capsize=3, label=label)
    else:
        ax.errorbar(xs, vs, yerr=[lo, hi], fmt="o-", capsize=3, label=label)


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.0, 2.8)) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def round_series(evidence: RunEvidence) -> tuple[dict[str, Series], str]:
    """Twin metrics per round: from the round reports (with CIs) or, without them, the record metrics."""
    out: dict[str, Series] = {}
    if evidence.round_reports:
        for r in sorted(evidence.round_reports):
            rep = evidence.round_reports[r]
            keys = [f"rmse.{v}.all" for v in rep.get("variables", [])] + ["coverage90.all.all", "nll.all.all"]
            keys += [f"auroc.{o}" for o in rep.get("outcomes", [])]
            for k in keys:
                p = _point(rep.get("metrics", {}).get(f"{k}.twin"))
                if p is not None:
                    out.setdefault(k, []).append((float(r), *p))
        return out, "model after training round (0 = initial), evaluated on held-out patients of all sites"
    pat = re.compile(r"(?:^|\.)((?:rmse\.[a-z0-9_]+\.all)|coverage90\.all\.all|nll\.all\.all|auroc\.[a-z0-9_]+)\.twin$")
    for rec in evidence.records:
        for name in sorted(rec.metrics):
            m = pat.search(name)
            if m:
                out.setdefault(m.group(1), []).append((float(rec.round), float(rec.metrics[name]), None, None))
    return out, "round whose signed record holds the metric"


def rounds_figure(evidence: RunEvidence) -> bytes | None:
    series, xlabel = round_series(evidence)
    if not series:
        return None
    fig, axes = _grid(len(series))
    for ax, key in zip(axes, sorted(series)):
        _errorbar(ax, series[key])
        ax.set_title(f"twin {key}", fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Metrics per round (x: {xlabel}; bars: CIs)", fontsize=10)
    return _png(fig)


def calibration_figure(card: Mapping[str, Any]) -> bytes | None:
    """O:E and calibration slope with CIs per outcome and model (the report has no per-bin sums)."""
    outcomes = card["quantitative_analyses"]["overall"]["outcomes"]
    panels: list[tuple[str, list[tuple[str, tuple[float, float | None, float | None]]], float]] = []
    for metric, ref in (("oe_ratio", 1.0), ("calibration_slope", 1.0), ("calibration_intercept", 0.0)):
        pts = []
        for o in sorted(outcomes):
            for model in sorted(outcomes[o]):
                p = _point(outcomes[o][model].get(metric))
                if p is not None:
                    pts.append((f"{o} / {model}", p))
        if pts:
            panels.append((metric, pts, ref))
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=3, size=(4.2, 2.6))
    for ax, (metric, pts, ref) in zip(axes, panels):
        _errorbar(ax, [(float(i), *p) for i, (_, p) in enumerate(pts)], horizontal=True)
        ax.set_yticks(range(len(pts)), [label for label, _ in pts], fontsize=7)
        ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{metric} (ideal {ref:g})", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Calibration summaries with CIs (no binned curve in the report)", fontsize=10)
    return _png(fig)


def subgroup_figure(card: Mapping[str, Any]) -> bytes | None:
    """Twin RMSE per variable and AUROC per outcome for every shown single-attribute subgroup, with CIs."""
    facts = card["spec_facts"]
    groups = [g for g in card["quantitative_analyses"]["subgroups"] if "&" not in g["group"]]
    keys = [(f"rmse.{v}.all.twin", f"RMSE {v}") for v in facts["variables"]] + [(f"auroc.{o}.twin", f"AUROC {o}") for o in facts["outcomes"]]
    panels = []
    for key, title in keys:
        pts = [(g["group"], p) for g in groups if (p := _point(g["metrics"].get(key))) is not None]
        if pts:
            panels.append((title, pts))
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=3, size=(4.2, 3.2))
    for ax, (title, pts) in zip(axes, panels):
        _errorbar(ax, [(float(i), *p) for i, (_, p) in enumerate(pts)], horizontal=True)
        ax.set_yticks(range(len(pts)), [g for g, _ in pts], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Twin by subgroup with CIs (suppressed groups not drawn)", fontsize=10)
    return _png(fig)


def epsilon_series(evidence: RunEvidence) -> dict[str, list[tuple[int, float]]]:
    """Composed epsilon per site after each round, from the signed manifests (chain order)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in evidence.records:
        for m in rec.manifests:
            out.setdefault(m.site, []).append((rec.round, float(m.epsilon_spent)))
    return {k: out[k] for k in sorted(out)}


def epsilon_figure(evidence: RunEvidence) -> bytes | None:
    series = epsilon_series(evidence)
    if not series:
        return None
    fig = Figure(figsize=(7.0, 3.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for site, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=site)
    ax.set_xlabel("round", fontsize=8)
    ax.set_ylabel("composed epsilon", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    delta = evidence.study["delta"]
    delta_text = f"delta {delta:g}" if isinstance(delta, (int, float)) else "each site's own delta"
    ax.set_title(f"Epsilon spent per site over rounds ({delta_text}, {evidence.study['accountant']})", fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    ax.tick_params(labelsize=7)
    return _png(fig)
