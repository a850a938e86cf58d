"""After the last round: the model card and the registered model, built from what MLflow holds.

The card is built from the run's evidence *as read back from MLflow* (the signed records and the
documents they vouch for: :func:`fedtwin.audit.evidence.load_run`), exactly as ``fedtwin audit
verify`` rebuilds it, so what the coordinator publishes and what an auditor recomputes cannot
drift apart (a resumed training's earlier rounds included). The final parameters are registered
as ``fedtwin-<study id>`` (a pyfunc, :mod:`fedtwin.tracking.registry`) with the card attached.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

CARD_DIR = "card"
PLOT_DIR = "plots"


def registered_model_name(study_id: str) -> str:
    return f"fedtwin-{study_id}"


def spec_plans(spec_path: str | Path, spec) -> dict[str, Path]:
    """The what-if plans registered with the twin: ``plans/*.yaml`` beside the spec file that fit the spec.

    A plan written for another spec (another intervention) is left out with a printed note: the
    registered twin answers ``params={"mode": "whatif", "plan": NAME}`` for the plans it holds.
    """
    from fedtwin.errors import FedTwinError
    from fedtwin.evaluation.plans import load_plan

    found: dict[str, Path] = {}
    for path in sorted((Path(spec_path).parent / "plans").glob("*.yaml")):
        try:
            load_plan(path, spec)
        except FedTwinError as exc:
            print(f"FEDTWIN note: what-if plan {path.name} is not registered with the twin: {' '.join(str(exc).split())[:200]}", flush=True)
            continue
        found[path.stem] = path
    return found


def publish(tracker, keeper, final_arrays: list, best_round: int | None, ckpt_dir: str, plans: dict[str, Path] | None = None) -> str:
    """Log the card (JSON, Markdown, HTML) and the final/best models; register the final twin.

    Returns ``NAME/VERSION`` of the registered model.
    """
    from fedtwin.audit.evidence import CARD_FILES, load_run
    from fedtwin.card import build_card, card_to_html, card_to_json, card_to_markdown
    from fedtwin.tracking.registry import register_twin
    from fedtwin.tracking.twin_pyfunc import write_parameters_npz

    with tempfile.TemporaryDirectory(prefix="fedtwin-release-") as tmp:
        work = Path(tmp)
        final = write_parameters_npz(work / "final.npz", final_arrays)
        tracker.log_file(final, "models")
        if best_round is not None and ckpt_dir:
            from coordinator.server_app import checkpoint_path, read_checkpoint

            best = checkpoint_path(ckpt_dir, best_round)
            if best.is_file():
                tracker.log_file(write_parameters_npz(work / "best.npz", read_checkpoint(best)[2]), "models")
                tracker.client.set_tag(tracker.run_id, "fedtwin.best_round", str(best_round))
        evidence = load_run(tracker.uri, tracker.run_id, work / "evidence").evidence()
        card = build_card(evidence)
        texts = {"json": card_to_json(card), "md": card_to_markdown(card), "html": card_to_html(card, evidence)}
        files: dict[str, Path] = {}
        for fmt, name in CARD_FILES.items():
            files[name] = work / CARD_DIR / name
            files[name].parent.mkdir(exist_ok=True)
            files[name].write_text(texts[fmt], encoding="utf-8")
            tracker.log_file(files[name], CARD_DIR)
        _log_plots(tracker, card, evidence, work / PLOT_DIR)
        info = register_twin(
            tracker.uri, tracker.run_id, keeper.documents["spec"], final_arrays,
            model_name=registered_model_name(keeper.study_id), card_files=files, study_id=keeper.study_id,
            plans=plans or {},
        )
    return f"{info.name}/{info.version}"


def _log_plots(tracker, card: dict, evidence, folder: Path) -> None:
    """The card's figures as PNG artifacts too (``plots/``), for people who browse MLflow's artifact view."""
    from fedtwin.card import plots

    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "metrics-per-round.png": plots.rounds_figure(evidence),
        "calibration.png": plots.calibration_figure(card),
        "subgroup-metrics.png": plots.subgroup_figure(card),
        "epsilon-per-site.png": plots.epsilon_figure(evidence),
    }
    for name, png in figures.items():
        if png is not None:
            (folder / name).write_bytes(png)
            tracker.log_file(folder / name, PLOT_DIR)
