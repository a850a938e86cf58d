"""Model cards generated from a federated run's evidence, never typed by hand (docs/model-card.md).

    evidence = RunEvidence(records=..., spec=..., study=..., final_report=..., round_reports=...)
    card = build_card(evidence)                 # JSON-ready dict, "format": "fedtwin-model-card/1"
    card_to_json(card)                          # canonical JSON: the bytes an auditor compares
    card_to_markdown(card); card_to_html(card, evidence)

Sections follow Mitchell et al. 2019 plus the TRIPOD+AI items that apply to a federated twin
(data sources per site, outcome definitions, missing data, discrimination and calibration with
CIs, uncertainty and its coverage, privacy, SecAgg+, limitations, update plan).
"""

from fedtwin.card.build import CARD_FORMAT, SECTIONS, build_card
from fedtwin.card.evidence import RunEvidence
from fedtwin.card.html import card_to_html
from fedtwin.card.io import card_from_json, card_to_json
from fedtwin.card.markdown import card_to_markdown

__all__ = [
    "CARD_FORMAT", "SECTIONS", "RunEvidence", "build_card", "card_from_json", "card_to_html", "card_to_json",
    "card_to_markdown",
]
