"""The card as Markdown (GitHub tables), for review in a pull request or an MLflow artifact view."""

from __future__ import annotations

from typing import Any

from fedtwin.card.blocks import Bullets, Para, Table, section_blocks


def _esc(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def card_to_markdown(card: dict[str, Any]) -> str:
    """Markdown of ``card``: one ``##`` heading per section, tables for every figure."""
    lines = [f"# Model card: {card['model_details']['name']}", "",
             f"_Generated from the signed provenance record ({card['format']}); do not edit by hand._", ""]
    for _key, title, blocks in section_blocks(card):
        lines += [f"## {title}", ""]
        for b in blocks:
            if isinstance(b, Para):
                lines += [b.text, ""]
            elif isinstance(b, Bullets):
                if b.title:
                    lines += [f"**{b.title}**", ""]
                lines += [f"- {x}" for x in b.items] + [""]
            elif isinstance(b, Table):
                lines += [f"**{b.caption}**", "", "| " + " | ".join(_esc(h) for h in b.headers) + " |",
                          "|" + "---|" * len(b.headers)]
                lines += ["| " + " | ".join(_esc(x) for x in row) + " |" for row in b.rows]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"
