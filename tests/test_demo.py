"""The README's main job, `fedtwin demo`, runs end to end (small cohorts to stay quick)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    from fedtwin.cli import main

    main._register()
    out = tmp_path / "demo"
    result = CliRunner().invoke(main.app, ["demo", "--out", str(out), "--patients", "120"])
    assert result.exit_code == 0, result.output
    for k in (1, 2, 3):
        assert (out / "hospitals" / f"site_{k}.db").exists()
        assert (out / "models" / f"site_{k}" / "model.pt").exists()
        assert (out / "ledgers" / f"site_{k}.db").exists()
    text = " ".join(result.output.split())
    assert text.count("PASS") == 3  # every site passed its data-quality gate
    # a second run into the same folder is refused, not mixed with the first
    again = CliRunner().invoke(main.app, ["demo", "--out", str(out), "--patients", "120"])
    assert again.exit_code != 0
