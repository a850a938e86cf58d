"""Model cards (fedtwin.card) built from real evidence: a real signed chain of round records
(Ed25519 keys generated here, manifests with DP parameters and data sources) and real federated
evaluation reports of a real TwinModel scored on a synthetic site under the federated layouts.
No mocks. The Chromium test renders the HTML headless and checks the page.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtwin.card import (
    CARD_FORMAT,
    SECTIONS,
    RunEvidence,
    build_card,
    card_from_json,
    card_to_html,
    card_to_json,
    card_to_markdown,
)
from fedtwin.card.values import normalize
from fedtwin.errors import FedTwinError
from fedtwin.evaluation import EvaluationConfig, evaluate_site, evaluation_report
from fedtwin.extract.extractor import Extractor
from fedtwin.federation.round_evaluation import federated_layout, federated_subgroups, headline_metrics
from fedtwin.omop import open_database
from fedtwin.provenance import DPParameters, RoundRecord, SigningKey, SiteManifest, digest, parameters_digest, split_finite
from fedtwin.provenance.digests import cohort_fingerprint
from fedtwin.provenance.manifest import DataSource
from fedtwin.spec import load_spec, spec_hash
from fedtwin.synth import SynthRequest, synthesize
from fedtwin.training.split import train_test_split
from fedtwin.twin import FitConfig, TwinModel, fit, get_parameters

REPO = Path(__file__).resolve().parents[1]
ICU = REPO / "specs" / "icu-hemodynamics.yaml"
SITES = ("site_1", "site_2")
TRAIN_ROUNDS = 3
CHROMIUM = Path("/usr/bin/chromium")
SECAGG = {"enabled": True, "num_shares": 1.0, "reconstruction_threshold": 1.0, "clipping_range": 8.0,
          "quantization_range": 4194304, "max_weight": 1000.0, "timeout": 120.0}
STUDY: dict[str, Any] = {
    "study_id": "card-study", "strategy": "fedprox", "proximal_mu": 0.01, "num_rounds": TRAIN_ROUNDS, "min_sites": 1,
    "epsilon_per_site": 3.0, "delta": 1e-5, "local_epochs": 1, "batch_size": 64, "max_grad_norm": 1.0,
    "learning_rate": 0.005, "secagg": SECAGG, "suppression_threshold": 10, "code_version": "0.1.0+gcard",
    "accountant": "rdp", "privacy_unit": "patient", "secure_rng": False,
}
DATA_SOURCES = {
    "site_1": DataSource(cdm_version="5.4", period_start="2019-01", period_end="2023-12", n_patients=270),
    "site_2": DataSource(cdm_version="5.3", period_start="2020-06", period_end=None, n_patients="<10"),
}
EPS = {"site_1": (0.8, 1.5, 2.1), "site_2": (0.9, 0.9, 1.7)}  # composed epsilon after train rounds 1..3


def _sigma(site: str) -> float:
    return 1.3 if site == "site_1" else 1.7


@dataclass
class Built:
    evidence: RunEvidence
    card: dict[str, Any]
    markdown: str
    html: str


def _manifest(key: SigningKey, site: str, rnd: int, start: str, spec_h: str, *, train: bool) -> SiteManifest:
    eps = EPS[site][min(rnd, TRAIN_ROUNDS) - 1]
    dp = DPParameters(noise_multiplier=_sigma(site), sample_rate=0.05 * (1 + SITES.index(site)), steps=10 + rnd,
                      max_grad_norm=1.0, delta=1e-5, accountant="rdp") if train else None
    return SiteManifest(
        study_id=STUDY["study_id"], round=rnd, site=site, spec_hash=spec_h, code_version=STUDY["code_version"],
        cohort_fingerprint=cohort_fingerprint({"suppression_threshold": 10, "cohort": {"patients": 100 + len(site)}}),
        quality_report_hash="c" * 64, dp=dp, epsilon_spent=eps, start_parameters_hash=start,
        data_source=DATA_SOURCES[site],
    ).sign(key)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("card") / "synth"
    synthesize(SynthRequest(sites=1, patients=300, seed=5, out=out, workers=1))
    spec = load_spec(ICU)
    train, test = train_test_split(Extractor(open_database(str(out / "site_1.db")), spec).extract())
    torch.manual_seed(0)
    model = TwinModel(spec)
    cfg = EvaluationConfig(n_samples=8)

    def report(kind: str) -> dict[str, Any]:
        stats = evaluate_site(model, test, train=train, layout=federated_layout(spec, kind),  # type: ignore[arg-type]
                              subgroups=federated_subgroups(spec, kind), config=cfg)  # type: ignore[arg-type]
        return evaluation_report(stats, suppression_threshold=spec.suppression_threshold)

    keys = {w: SigningKey.from_private_key(ed25519.Ed25519PrivateKey.generate()) for w in ("coordinator", *SITES)}
    spec_h = spec_hash(spec)
    round_reports = {0: report("round")}
    records: list[RoundRecord] = []
    start = parameters_digest(get_parameters(model))
    for r in range(1, TRAIN_ROUNDS + 1):
        fit(model, train, FitConfig(epochs=1, batch_size=64, lr=5e-3, seed=r))
        agg = parameters_digest(get_parameters(model))
        present = [s for s in SITES if not (r == 2 and s == "site_2")]  # site_2 drops out of round 2
        metrics, _ = split_finite(headline_metrics(round_reports[r - 1]))  # sites score the model they received
        rec = RoundRecord.build(
            study_id=STUDY["study_id"], round=r, spec_hash=spec_h, start_parameters_hash=start, aggregate_hash=agg,
            manifests=[_manifest(keys[s], s, r, start, spec_h, train=True) for s in present], metrics=metrics,
            secagg=SECAGG, previous=records[-1] if records else None, sites_dropped=[s for s in SITES if s not in present],
        ).sign(keys["coordinator"])
        records.append(rec)
        round_reports[r] = report("round")
        start = agg
    final = report("final")
    metrics, _ = split_finite(headline_metrics(final))
    records.append(RoundRecord.build(
        study_id=STUDY["study_id"], round=TRAIN_ROUNDS + 1, spec_hash=spec_h, start_parameters_hash=start, aggregate_hash=start,
        manifests=[_manifest(keys[s], s, TRAIN_ROUNDS + 1, start, spec_h, train=False) for s in SITES], metrics=metrics,
        secagg=SECAGG, previous=records[-1], kind="evaluate", attachments={"final-evaluation.json": digest(final)},
    ).sign(keys["coordinator"]))
    evidence = RunEvidence(records=tuple(records), spec=spec.model_dump(mode="json"), study=dict(STUDY),
                           final_report=final, round_reports=round_reports)
    card = build_card(evidence)
    return Built(evidence, card, card_to_markdown(card), card_to_html(card, evidence))


# ------------------------------------------------------------------------------------------ helpers


def _reordered(x: Any) -> Any:
    """The same JSON value with every object's keys in reverse order (as another writer might store it)."""
    if isinstance(x, dict):
        return {k: _reordered(x[k]) for k in reversed(list(x))}
    if isinstance(x, list):
        return [_reordered(v) for v in x]
    return x


def _suppressed_group(card: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in card["quantitative_analyses"]["subgroups"] if g["n_patients"] == "<10"]
    assert groups, "the fixture should have a subgroup under the suppression threshold"
    return groups[0]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.imgs: list[str] = []
        self.sections: list[str] = []
        self.h2_after_section = 0
        self._in_section = False
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None
        self._td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(a[k] or "")
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "section":
            self.sections.append(a.get("id") or "")
            self._in_section = True
        if tag == "h2" and self._in_section:
            self.h2_after_section += 1
            self._in_section = False
        if tag == "tr" and a.get("data-row"):
            self._row = a["data-row"]
            self.rows.setdefault(self._row, [])
        if tag == "td":
            self._td = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._td = False

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._td:
            self.rows[self._row].append(data)


# -------------------------------------------------------------------------------------------- tests


def test_card_is_deterministic_and_independent_of_input_dict_order(built: Built) -> None:
    ev = built.evidence
    again = build_card(ev)
    assert again == built.card
    assert card_to_json(again) == card_to_json(built.card)
    shuffled = RunEvidence(
        records=ev.records, spec=_reordered(ev.spec), study=_reordered(ev.study), final_report=_reordered(ev.final_report),
        round_reports={str(k): _reordered(ev.round_reports[k]) for k in reversed(sorted(ev.round_reports))},  # type: ignore[misc]
    )
    assert card_to_json(build_card(shuffled)) == card_to_json(built.card)
    assert card_from_json(card_to_json(built.card)) == built.card
    with pytest.raises(FedTwinError, match="model card"):
        card_from_json(json.dumps({"format": "something-else"}))


def test_every_mitchell_and_tripod_section_is_present(built: Built) -> None:
    card = built.card
    assert card["format"] == CARD_FORMAT
    assert [s["key"] for s in card["sections"]] == [k for k, _ in SECTIONS]
    for key, _ in SECTIONS:
        assert card[key], key
    details = card["model_details"]["provenance"]
    last = built.evidence.records[-1]
    assert details["last_record_hash"] == last.record_hash()
    assert details["final_aggregate_hash"] == built.evidence.records[TRAIN_ROUNDS - 1].aggregate_hash
    assert details["attachments"] == [{"round": last.round, "kind": "evaluate", "name": "final-evaluation.json",
                                       "sha256": digest(built.evidence.final_report)}]
    assert card["model_details"]["spec"]["matches_records"] is True
    assert card["intended_use"]["out_of_scope_uses"] and "Research use only" in card["intended_use"]["primary_uses"][0]
    # TRIPOD+AI: data sources per site (coarse count kept as the string the site signed)
    sites = {s["site"]: s for s in card["training_data"]["sites"]}
    assert sites["site_1"]["data_source"] == {"cdm_version": "5.4", "period_start": "2019-01", "period_end": "2023-12", "n_patients": 270}
    assert sites["site_2"]["data_source"]["n_patients"] == "<10"
    assert sites["site_2"]["rounds_dropped"] == [2] and sites["site_2"]["train_rounds_participated"] == [1, 3]
    assert [o["name"] for o in card["training_data"]["outcome_definitions"]] == ["death", "aki"]
    assert card["training_data"]["missing_data"]
    # discrimination and calibration with CIs, uncertainty with measured coverage
    death = card["quantitative_analyses"]["overall"]["outcomes"]["death"]["twin"]
    assert {"auroc", "auprc", "brier", "ece", "oe_ratio", "calibration_slope", "calibration_intercept"} <= set(death)
    shown = [c for c in death.values() if isinstance(c, dict)]
    assert shown and all(len(c["ci"]) == 2 and "n_patients" in c for c in shown)
    assert card["uncertainty"]["measured_coverage"]["twin"]["all"]["coverage90"] == normalize(
        built.evidence.final_report["metrics"]["coverage90.all.all.twin"])
    assert set(card["quantitative_analyses"]["overall"]["models"]) == {"twin", "mechanistic_only", "persistence"}
    # privacy, SecAgg+, rounds
    p = card["privacy"]
    assert (p["delta"], p["accountant"], p["privacy_unit"], p["secure_rng"]) == (1e-5, "rdp", "patient", False)
    assert card["secure_aggregation"]["configured"] == SECAGG and card["secure_aggregation"]["recorded_constant"]
    rounds = card["rounds"]["records"]
    assert [(r["round"], r["kind"], r["sites_dropped"]) for r in rounds] == [
        (1, "train", []), (2, "train", ["site_2"]), (3, "train", []), (4, "evaluate", [])]
    assert [r["model_after_round"] for r in card["rounds"]["round_reports"]] == [0, 1, 2, 3]
    assert not card["quantitative_analyses"]["calibration_curve"]["available"]
    assert "per-bin" in card["quantitative_analyses"]["calibration_curve"]["reason"]


def test_numbers_are_copied_from_the_evidence(built: Built) -> None:
    rep = built.evidence.final_report
    ov = built.card["quantitative_analyses"]["overall"]
    for var in rep["variables"]:
        for model in rep["models"]:
            assert ov["forecast"][var][model]["rmse"] == normalize(rep["metrics"][f"rmse.{var}.all.{model}"])
    groups = {g["group"]: g for g in built.card["quantitative_analyses"]["subgroups"]}
    assert set(groups) == set(rep["subgroups"])
    for name, g in rep["subgroups"].items():
        assert groups[name]["n_patients"] == g["n_patients"]
        assert groups[name]["metrics"] == normalize(g["metrics"])
    assert built.card["quantitative_analyses"]["fairness"]["report"] == normalize(rep["fairness"])


def test_caveats_warn_when_this_twins_risk_ranks_backwards_or_at_chance(built: Built) -> None:
    """Read from the twin's own published AUROC cells: backwards (CI below 0.5), chance (CI
    covering 0.5), nothing for a good or a suppressed cell."""
    from fedtwin.card.build import risk_caveats

    def report(cells: dict) -> dict:
        return {"outcomes": list(cells), "metrics": {f"auroc.{o}.twin": c for o, c in cells.items()}}

    said = risk_caveats(report({
        "death": {"value": 0.31, "ci": [0.22, 0.40], "n_patients": 300},
        "aki": {"value": 0.55, "ci": [0.45, 0.65], "n_patients": 300},
        "sepsis": {"value": 0.80, "ci": [0.72, 0.88], "n_patients": 300},
        "stroke": "suppressed",
    }))
    assert len(said) == 2, said
    assert said[0].startswith("The death risk ranks the held-out patients BACKWARDS (AUROC 0.31, CI 0.22-0.40)")
    assert said[1].startswith("The aki risk is not distinguishable from chance on the held-out patients (AUROC 0.55, CI 0.45-0.65)")
    # the card puts them first among its caveats, from its own final report
    assert built.card["caveats"][: len(risk_caveats(built.evidence.final_report))] == risk_caveats(built.evidence.final_report)


def test_suppressed_cells_stay_suppressed_in_json_markdown_and_html(built: Built) -> None:
    card = built.card
    rep = built.evidence.final_report
    for name, g in rep["subgroups"].items():
        for key, cell in g["metrics"].items():
            if cell == "suppressed":
                got = next(x for x in card["quantitative_analyses"]["subgroups"] if x["group"] == name)["metrics"][key]
                assert got == "suppressed", (name, key)
    small = _suppressed_group(card)
    assert all(v == "suppressed" for v in small["metrics"].values())
    # markdown: the group's row shows the count marker and nothing but "suppressed"
    row = next(line for line in built.markdown.splitlines() if line.startswith(f"| {small['group']} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "<10" and cells[2:] and all(c == "suppressed" for c in cells[2:]), row
    # html: same row, found by its data-row attribute
    page = _Page()
    page.feed(built.html)
    hcells = [c.strip() for c in page.rows[small["group"]]]
    assert hcells[1] == "<10" and all(c == "suppressed" for c in hcells[2:]), hcells
    # an outcome suppressed overall (AKI: fewer than 10 events on this cohort) shows no number anywhere
    aki = card["quantitative_analyses"]["overall"]["outcomes"].get("aki", {}).get("twin", {})
    if aki and all(v == "suppressed" for v in aki.values()):
        assert rep["cohort"]["n_events"]["aki"] in ("<10", "suppressed")
        block = built.markdown.split("Outcome 'aki'")[1].split("\n\n")[1]
        assert not re.search(r"\d\.\d", block), block


def test_privacy_per_site_comes_from_the_last_manifest(built: Built) -> None:
    per_site = {s["site"]: s for s in built.card["privacy"]["per_site"]}
    assert set(per_site) == set(SITES)
    for site in SITES:
        ms = [m for r in built.evidence.records for m in r.manifests if m.site == site]
        dps = [m.dp for m in ms if m.dp is not None]
        s = per_site[site]
        assert s["epsilon_spent"] == normalize(ms[-1].epsilon_spent) == EPS[site][-1]
        assert s["epsilon_as_of_round"] == TRAIN_ROUNDS + 1
        assert s["steps_total"] == sum(dp.steps for dp in dps)
        assert s["rounds_composed"] == len(dps) == (2 if site == "site_2" else 3)
        assert s["noise_multipliers"] == [_sigma(site)] and s["delta"] == 1e-5
        assert [e["epsilon_spent"] for e in s["epsilon_by_round"]] == [m.epsilon_spent for m in ms]
    assert built.card["privacy"]["max_epsilon_spent"] == max(EPS[s][-1] for s in SITES)


def test_markdown_has_a_heading_per_section_and_tables(built: Built) -> None:
    md = built.markdown
    for _, title in SECTIONS:
        assert f"\n## {title}\n" in md, title
    assert md.count("|---|") >= 10
    assert "| site | epsilon | as of round |" in md
    assert built.card["model_details"]["provenance"]["last_record_hash"] in md
    assert "\nnan" not in md.lower() and " nan " not in md.lower()


def test_html_is_self_contained_with_png_figures(built: Built) -> None:
    page = _Page()
    page.feed(built.html)
    assert page.sections == [k for k, _ in SECTIONS]
    assert page.h2_after_section == len(SECTIONS)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", built.html, re.I)
    assert "http://" not in built.html and "https://" not in built.html
    assert "<script" not in built.html.lower() and "@import" not in built.html
    assert all(r.startswith(("#", "data:image/png;base64,")) for r in page.refs), page.refs
    assert len(page.imgs) == 4  # rounds, calibration, subgroups, epsilon
    for src in page.imgs:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000


MARKER_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.brokenImages = String(imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length);
  document.body.dataset.images = String(imgs.length);
  var secs = Array.prototype.slice.call(document.querySelectorAll('section'));
  document.body.dataset.sections = String(secs.filter(function (s) {
    var r = s.getBoundingClientRect(); var h = s.querySelector('h2');
    return r.height > 0 && r.width > 0 && h && h.getBoundingClientRect().height > 0 && getComputedStyle(s).visibility !== 'hidden';
  }).length);
  document.body.dataset.checked = 'yes';
});
</script>"""


def _chromium(html: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--window-size=1280,4000", *extra, html.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium; .ci/run installs it)")
def test_headless_chromium_renders_every_section_and_image(built: Built, tmp_path: Path) -> None:
    page = tmp_path / "card.html"
    page.write_text(built.html.replace("</body>", MARKER_SCRIPT + "</body>"), encoding="utf-8")
    dom = _chromium(page, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("checked") == "yes", (attrs, dom.stderr[-1000:])
    assert attrs["broken-images"] == "0" and attrs["images"] == "4", attrs
    assert attrs["sections"] == str(len(SECTIONS)), attrs

    shot = tmp_path / "card.png"
    res = _chromium(page, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 3000 and pixels.shape[1] >= 1200, pixels.shape
    assert float(np.std(pixels[..., :3])) > 0.05  # text, tables and figures, not a blank page
    top = pixels[: pixels.shape[0] // 4, ..., :3]
    assert float(np.std(top)) > 0.02
