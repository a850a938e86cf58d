"""The card as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs.

Self-contained on purpose: an auditor opens it offline, from an MLflow artifact or an email, and
nothing on the page can change after it was generated or leak that it was opened (no external
URL of any kind, no script). Tables come from the same blocks as the Markdown version
(:mod:`fedtwin.card.blocks`); figures from :mod:`fedtwin.card.plots`.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from fedtwin.card import plots, text
from fedtwin.card.blocks import Bullets, Para, Table, section_blocks
from fedtwin.card.evidence import RunEvidence

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;color:#1b1f24;line-height:1.45}
h1{font-size:1.6rem;border-bottom:2px solid #1b1f24}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
h3{font-size:1rem;margin-bottom:.3rem}section{margin-bottom:1.5rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.82rem}caption{text-align:left;font-weight:600;padding:.2rem 0}
th,td{border:1px solid #ccd;padding:.2rem .45rem;text-align:left;vertical-align:top;word-break:break-word}th{background:#eef1f5}
td.suppressed{color:#888;font-style:italic}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85rem;color:#444}.note{font-size:.85rem;color:#444;background:#f6f6f2;padding:.4rem .6rem;border-left:3px solid #bb9}
nav ol{columns:3;font-size:.85rem}
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    rows = []
    for i, row in enumerate(t.rows):
        rid = f' data-row="{escape(t.row_ids[i])}"' if i < len(t.row_ids) else ""
        cells = "".join(f'<td class="suppressed">{escape(x)}</td>' if x == "suppressed" else f"<td>{escape(x)}</td>" for x in row)
        rows.append(f"<tr{rid}>{cells}</tr>")
    kind = f' data-kind="{escape(t.kind)}"' if t.kind else ""
    return f"<table{kind}><caption>{escape(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(png: bytes | None, caption: str, missing: str, fig_id: str) -> str:
    if png is None:
        return f'<p class="note" id="{fig_id}-missing">{escape(missing)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{fig_id}"><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _figures(card: dict[str, Any], evidence: RunEvidence) -> dict[str, list[str]]:
    """Figures to append to a section, by section key."""
    return {
        "quantitative_analyses": [
            _figure(plots.calibration_figure(card), "Calibration summaries per outcome and model with CIs (O:E, slope, intercept). "
                    + text.calibration_curve_note(), "No calibration figure: every calibration cell is suppressed or undefined.", "fig-calibration"),
            _figure(plots.subgroup_figure(card), "Twin RMSE per variable and AUROC per outcome by single-attribute subgroup, with CIs; "
                    "suppressed groups are not drawn.", "No subgroup figure: every subgroup cell is suppressed or undefined.", "fig-subgroups"),
        ],
        "privacy": [_figure(plots.epsilon_figure(evidence), "Composed epsilon per site after each round, from the signed manifests.",
                            "No epsilon figure: the records hold no site manifest.", "fig-epsilon")],
        "rounds": [_figure(plots.rounds_figure(evidence), "Twin metrics per round with CIs (suppressed cells not drawn).",
                           "No per-round figure: there are no round reports and no twin metrics in the records.", "fig-rounds")],
    }


def _blocks(blocks: list[Any]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Para):
            out.append(f"<p>{escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            if b.title:
                out.append(f"<h3>{escape(b.title)}</h3>")
            out.append("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append(_table(b))
    return "\n".join(out)


def card_to_html(card: dict[str, Any], evidence: RunEvidence) -> str:
    """A self-contained HTML page of ``card``; figures drawn from ``card`` and ``evidence``.

    Each section is ``<section id="<key>">`` with an ``<h2>``.
    """
    figures = _figures(card, evidence)
    sections = section_blocks(card)
    nav = "".join(f'<li><a href="#{escape(k)}">{escape(t)}</a></li>' for k, t, _ in sections)
    body = []
    for key, title, blocks in sections:
        body.append(f'<section id="{escape(key)}"><h2>{escape(title)}</h2>\n{_blocks(blocks)}\n{"".join(figures.get(key, []))}</section>')
    name = escape(card["model_details"]["name"])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Model card: {name}</title><style>{CSS}</style></head>\n<body>\n"
        f"<h1>Model card: {name}</h1><p class=\"note\">Generated from the signed provenance record ({escape(card['format'])}); "
        "do not edit by hand.</p><nav><ol>" + nav + "</ol></nav>\n" + "\n".join(body) + "\n</body></html>\n"
    )
