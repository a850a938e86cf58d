"""The privacy ledger on real SQLite files with real Opacus accountants."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from typer.testing import CliRunner

from fedtwin.errors import FedTwinError
from fedtwin.privacy.accounting import (
    MAX_NOISE_TO_SIGNAL,
    Budget,
    BudgetExceededError,
    CohortTooSmallError,
    StepBlock,
    check_cohort,
    composed_epsilon,
    secure_rng_status,
)
from fedtwin.privacy.ledger import PrivacyLedger, PrivacyLedgerError, dataset_id_for_database
from site_agent.budget_command import budget

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
DS = "site-1:omop"


@pytest.fixture
def ledger(tmp_path: Path):
    led = PrivacyLedger.create(tmp_path / "privacy.db")
    led.set_budget(DS, epsilon=8.0, delta=DELTA, approved_by="DPO")
    yield led
    led.close()


def _fresh_epsilon(accountant_cls: type, blocks: list[tuple[float, float, int]]) -> float:
    acct = accountant_cls()
    acct.history = list(blocks)
    return float(acct.get_epsilon(delta=DELTA))


def _spend(led: PrivacyLedger, run: str, rnd: int | None, sigma: float, q: float, steps: int) -> None:
    led.record_spend(DS, run_id=run, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)


# -- composition ----------------------------------------------------------------------------------


def test_composition_over_runs_and_rounds_is_one_accountant_over_the_whole_history(ledger: PrivacyLedger) -> None:
    run_a = [(1.1, 0.02, 100)] * 3  # three federated rounds of run A
    run_b = [(1.3, 0.01, 200)]  # a later local run on the same data
    for r, (s, q, n) in enumerate(run_a, start=1):
        _spend(ledger, "run-a", r, s, q, n)
    for s, q, n in run_b:
        _spend(ledger, "run-b", None, s, q, n)

    spent = ledger.spent_epsilon(DS)
    eps_a = _fresh_epsilon(RDPAccountant, run_a)
    eps_b = _fresh_epsilon(RDPAccountant, run_b)
    per_round = [_fresh_epsilon(RDPAccountant, [b]) for b in run_a + run_b]

    assert spent == pytest.approx(_fresh_epsilon(RDPAccountant, run_a + run_b), rel=1e-9)
    assert spent > eps_a and spent > eps_b
    # what per-round fresh PrivacyEngines would report, summed: a loose over-count
    assert spent < sum(per_round)
    assert spent < eps_a + eps_b
    # every entry stores its own epsilon and the composed one after it; the latter only grows
    entries = ledger.entries(DS)
    assert [e.epsilon_entry for e in entries] == pytest.approx(per_round)
    composed = [e.epsilon_composed for e in entries]
    assert composed == sorted(composed) and composed[-1] == pytest.approx(spent)
    status = ledger.status(DS)
    assert (status.runs, status.rounds, status.steps) == (2, 3, 500)
    assert all(e.secure_rng is False for e in entries)


def test_prv_accountant_composes_heterogeneous_history(tmp_path: Path) -> None:
    with PrivacyLedger.create(tmp_path / "prv.db") as led:
        led.set_budget(DS, epsilon=10.0, delta=DELTA, accountant="prv")
        blocks = [(1.0, 0.02, 100), (1.5, 0.05, 60)]
        for i, (s, q, n) in enumerate(blocks, start=1):
            _spend(led, "run", i, s, q, n)
        spent = led.spent_epsilon(DS)
        assert spent == pytest.approx(_fresh_epsilon(PRVAccountant, blocks), rel=1e-6)
        assert max(_fresh_epsilon(PRVAccountant, [b]) for b in blocks) < spent
        assert spent < sum(_fresh_epsilon(PRVAccountant, [b]) for b in blocks)


def test_composed_epsilon_ignores_order_and_empty_blocks() -> None:
    a, b = StepBlock(1.0, 0.02, 50), StepBlock(2.0, 0.05, 20)
    assert composed_epsilon([], DELTA) == 0.0
    assert composed_epsilon([StepBlock(1.0, 0.02, 0)], DELTA) == 0.0
    assert composed_epsilon([a, b, a], DELTA) == pytest.approx(composed_epsilon([b, StepBlock(1.0, 0.02, 100)], DELTA))


# -- planning and refusal ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibrated_noise_makes_all_planned_rounds_meet_the_target(ledger: PrivacyLedger) -> None:
    _spend(ledger, "earlier", None, 1.5, 0.02, 200)  # prior history the plan must account for
    q, steps, rounds = 0.02, 40, 5
    plan = ledger.plan(DS, n_patients=5000, sample_rate=q, steps_per_round=steps, rounds=rounds)

    total = _fresh_epsilon(RDPAccountant, [(1.5, 0.02, 200), (plan.noise_multiplier, q, steps * rounds)])
    assert 8.0 - 0.01 <= total <= 8.0
    assert plan.check.projected_epsilon == pytest.approx(total)
    # a per-run calibration that ignores the history (Opacus's helper) would overspend the budget
    naive = get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q, steps=steps * rounds)
    assert naive < plan.noise_multiplier
    assert _fresh_epsilon(RDPAccountant, [(1.5, 0.02, 200), (naive, q, steps * rounds)]) > 8.0

    # the whole planned training then runs round by round through reserve/settle, and fits
    for r in range(1, rounds + 1):
        with ledger.spend(DS, run_id="fed-1", round=r, noise_multiplier=plan.noise_multiplier, sample_rate=q,
                          steps=steps, max_grad_norm=1.0) as session:
            session.add_steps(steps)
    assert ledger.spent_epsilon(DS) == pytest.approx(total)
    # ... and nothing more does
    with pytest.raises(BudgetExceededError):
        ledger.reserve(DS, run_id="fed-1", round=6, noise_multiplier=plan.noise_multiplier, sample_rate=q,
                       steps=steps, max_grad_norm=1.0)


def test_plan_that_exceeds_the_budget_is_refused_with_a_clear_message(ledger: PrivacyLedger) -> None:
    _spend(ledger, "earlier", None, 1.0, 0.02, 300)
    spent = ledger.spent_epsilon(DS)
    with pytest.raises(BudgetExceededError) as err:
        ledger.check_plan(DS, noise_multiplier=0.8, sample_rate=0.05, steps_per_round=100, rounds=10)
    msg = str(err.value)
    assert f"{spent:.3f} of the epsilon budget 8" in msg
    assert "would spend" in msg and "composed total" in msg
    assert "lower the steps or rounds" in err.value.fix and "raise the noise multiplier (to at least" in err.value.fix
    assert "data governance" in err.value.fix
    assert isinstance(err.value, FedTwinError)
    # a refused reservation writes nothing
    before = len(ledger.entries(DS))
    with pytest.raises(BudgetExceededError):
        ledger.reserve(DS, run_id="r", noise_multiplier=0.8, sample_rate=0.05, steps=1000, max_grad_norm=1.0)
    assert len(ledger.entries(DS)) == before
    # a plan that fits passes and says what it would do
    ok = ledger.check_plan(DS, noise_multiplier=2.0, sample_rate=0.02, steps_per_round=50, rounds=2)
    assert ok.spent_epsilon == pytest.approx(spent) and spent < ok.projected_epsilon <= 8.0


def test_fail_closed_when_the_ledger_cannot_be_read(tmp_path: Path, ledger: PrivacyLedger) -> None:
    with pytest.raises(PrivacyLedgerError, match="does not exist"):
        PrivacyLedger.open(tmp_path / "missing.db")
    with pytest.raises(PrivacyLedgerError, match="no privacy budget is set"):
        ledger.check_plan("never-registered", noise_multiplier=1.0, sample_rate=0.01, steps_per_round=10)
    # the ledger vanishes under a running process: any read error refuses the plan
    ledger.close()
    with pytest.raises(PrivacyLedgerError, match="never trains on a ledger it cannot read"):
        ledger.check_plan(DS, noise_multiplier=1.0, sample_rate=0.01, steps_per_round=10)
    with pytest.raises(PrivacyLedgerError):
        ledger.plan(DS, n_patients=5000, sample_rate=0.01, steps_per_round=10)
    # a ledger whose append-only triggers were dropped is not trusted
    path = tmp_path / "privacy.db"
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TRIGGER entries_no_update")
    with pytest.raises(PrivacyLedgerError, match="append-only protection"):
        PrivacyLedger.open(path)


def test_corrupt_or_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite file" * 200)
    with pytest.raises(PrivacyLedgerError, match="could not be read"):
        PrivacyLedger.open(garbage)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE t (x)")
    with pytest.raises(PrivacyLedgerError, match="not a FedTwin privacy ledger"):
        PrivacyLedger.open(other)
    with pytest.raises(PrivacyLedgerError, match="already exists"):
        PrivacyLedger.create(other)


def test_cohort_too_small_for_the_budget(tmp_path: Path) -> None:
    with PrivacyLedger.create(tmp_path / "small.db") as led:
        led.set_budget(DS, epsilon=1.0, delta=1e-4)
        with pytest.raises(CohortTooSmallError) as err:
            led.plan(DS, n_patients=300, sample_rate=0.05, steps_per_round=100, rounds=4)
        msg, fix = str(err.value), err.value.fix
        assert "with 300 patients" in msg and "noise will swamp learning" in msg
        assert "patients" in fix and "epsilon >=" in fix and "steps per round" in fix
        # the rule: sigma / (q * N) <= 0.1; at the number of patients the error names, the same plan passes
        needed = int(fix.split("at least ")[1].split(" patients")[0])
        plan = led.plan(DS, n_patients=needed, sample_rate=0.05, steps_per_round=100, rounds=4)
        assert plan.noise_to_signal <= MAX_NOISE_TO_SIGNAL
        assert plan.noise_multiplier / (0.05 * needed) == pytest.approx(plan.noise_to_signal)
    # delta must be below 1/N
    with pytest.raises(CohortTooSmallError, match="not below 1/500"):
        check_cohort(prior=[], budget=Budget(3.0, 1e-2), accountant="rdp", noise_multiplier=1.0, n_patients=500,
                     sample_rate=0.1, steps_per_round=10, rounds=1)


# -- reserve / settle ------------------------------------------------------------------------------


def test_crash_between_reserve_and_settle_counts_in_full(tmp_path: Path) -> None:
    path = tmp_path / "privacy.db"
    with PrivacyLedger.create(path) as led:
        led.set_budget(DS, epsilon=8.0, delta=DELTA)
    # a trainer process that dies (no exception handling runs) halfway through its reserved steps
    script = textwrap.dedent(f"""
        import os
        from fedtwin.privacy.ledger import PrivacyLedger
        led = PrivacyLedger.open({str(path)!r})
        with led.spend({DS!r}, run_id="killed", round=1, noise_multiplier=1.2, sample_rate=0.02, steps=100,
                       max_grad_norm=1.0) as session:
            session.add_steps(40)
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    with PrivacyLedger.open(path) as led:
        [open_res] = led.open_reservations(DS)
        assert (open_res.run_id, open_res.steps) == ("killed", 100)
        full = _fresh_epsilon(RDPAccountant, [(1.2, 0.02, 100)])
        assert led.spent_epsilon(DS) == pytest.approx(full)  # not the 40 steps it took: we cannot know that
        # an exception inside the run settles with the steps counted, then propagates
        with pytest.raises(RuntimeError, match="diverged"):
            with led.spend(DS, run_id="crashy", round=2, noise_multiplier=1.2, sample_rate=0.02, steps=100,
                           max_grad_norm=1.0) as session:
                session.add_steps(30)
                raise RuntimeError("loss diverged")
        settlement = led.entries(DS)[-1]
        assert settlement.kind == "settlement" and settlement.steps == 30 and "RuntimeError" in settlement.note
        # a trainer that never reported steps is settled in full
        with pytest.raises(KeyboardInterrupt):
            with led.spend(DS, run_id="silent", noise_multiplier=1.2, sample_rate=0.02, steps=50, max_grad_norm=1.0):
                raise KeyboardInterrupt
        assert led.entries(DS)[-1].steps == 50
        # the open reservation can still be settled once the site knows; then it no longer counts in full
        led.settle(open_res.id, steps_taken=40, note="checkpoint shows 40 steps")
        with pytest.raises(PrivacyLedgerError, match="already settled"):
            led.settle(open_res.id, steps_taken=10)
        assert led.open_reservations(DS) == []
        expected = _fresh_epsilon(RDPAccountant, [(1.2, 0.02, 40 + 30 + 50)])
        assert led.spent_epsilon(DS) == pytest.approx(expected)


def test_steps_beyond_the_reservation_stop_the_run_and_are_recorded(ledger: PrivacyLedger) -> None:
    with pytest.raises(BudgetExceededError, match="reserved 10"):
        with ledger.spend(DS, run_id="runaway", noise_multiplier=1.0, sample_rate=0.02, steps=10,
                          max_grad_norm=1.0) as session:
            for _ in range(100):
                session.add_steps()
    last = ledger.entries(DS)[-1]
    assert last.kind == "settlement" and last.steps == 11 and "more than reserved" in last.note


def test_second_ledger_connection_sees_the_reservation(tmp_path: Path, ledger: PrivacyLedger) -> None:
    other = PrivacyLedger.open(tmp_path / "privacy.db")
    try:
        plan = ledger.plan(DS, n_patients=10_000, sample_rate=0.02, steps_per_round=100)
        ledger.reserve(DS, run_id="a", noise_multiplier=plan.noise_multiplier, sample_rate=0.02, steps=100,
                       max_grad_norm=1.0)
        with pytest.raises(BudgetExceededError):
            other.reserve(DS, run_id="b", noise_multiplier=plan.noise_multiplier, sample_rate=0.02, steps=100,
                          max_grad_norm=1.0)
    finally:
        other.close()


# -- append-only, budgets -------------------------------------------------------------------------


def test_ledger_is_append_only(tmp_path: Path, ledger: PrivacyLedger) -> None:
    _spend(ledger, "run", 1, 1.0, 0.02, 100)
    assert not any(hasattr(ledger, m) for m in ("update_entry", "delete_entry", "delete", "update"))
    with sqlite3.connect(tmp_path / "privacy.db") as raw:
        for sql in (
            "UPDATE entries SET steps = 0",
            "DELETE FROM entries",
            "UPDATE budget_events SET epsilon = 100",
            "DELETE FROM budget_events",
            "UPDATE datasets SET accountant = 'prv'",
            "DELETE FROM datasets",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                raw.execute(sql)
    assert ledger.entries(DS)[0].steps == 100


def test_budget_is_set_once_and_changes_are_recorded(ledger: PrivacyLedger) -> None:
    assert ledger.set_budget(DS, epsilon=8.0, delta=DELTA) == Budget(8.0, DELTA)  # same values: no-op
    with pytest.raises(PrivacyLedgerError, match="already has a budget"):
        ledger.set_budget(DS, epsilon=20.0, delta=DELTA)
    with pytest.raises(PrivacyLedgerError, match="reason and an approver"):
        ledger.change_budget(DS, epsilon=20.0, delta=DELTA, reason="", approved_by="")
    ledger.change_budget(DS, epsilon=10.0, delta=DELTA, reason="second study approved", approved_by="DAC 2026-03")
    assert ledger.budget(DS) == Budget(10.0, DELTA)
    events = ledger.budget_events(DS)
    assert [(e.kind, e.epsilon, e.approved_by) for e in events] == [("initial", 8.0, "DPO"), ("change", 10.0, "DAC 2026-03")]


# -- secure RNG, dataset ids ---------------------------------------------------------------------


def test_secure_rng_status_is_reported_not_pretended(ledger: PrivacyLedger) -> None:
    status = secure_rng_status()
    assert status["available"] is False and "torchcsprng" in str(status["reason"])
    with pytest.raises(PrivacyLedgerError, match="secure_rng=True"):
        _ = ledger.record_spend(DS, run_id="r", noise_multiplier=1.0, sample_rate=0.02, steps=10, max_grad_norm=1.0,
                                secure_rng=True)


def test_dataset_id_names_the_database_not_the_user_or_spec() -> None:
    a = dataset_id_for_database("postgresql+psycopg://alice:secret@DB.example:5432/omop")
    b = dataset_id_for_database("postgresql://bob:other@db.example:5432/omop")
    assert a == b and a.startswith("db-") and "secret" not in a
    assert a != dataset_id_for_database("postgresql://db.example:5432/omop", cdm_schema="cdm2")


# -- CLI -------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(budget)
    return app


def test_cli_budget_table_and_json(tmp_path: Path, ledger: PrivacyLedger) -> None:
    _spend(ledger, "run-a", 1, 1.1, 0.02, 100)
    _spend(ledger, "run-a", 2, 1.1, 0.02, 100)
    ledger.reserve(DS, run_id="run-a", round=3, noise_multiplier=1.1, sample_rate=0.02, steps=100, max_grad_norm=1.0)
    path = str(tmp_path / "privacy.db")
    runner = CliRunner()

    table = runner.invoke(_app(), ["--ledger", path], env={"COLUMNS": "120"})
    assert table.exit_code == 0, table.output
    spent = ledger.spent_epsilon(DS)
    assert DS in table.output and f"ε {spent:.3f}" in table.output
    assert "1 / 3 / 300" in table.output and "NOT available" in table.output

    out = runner.invoke(_app(), ["--ledger", path, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    [ds] = report["datasets"]
    assert ds["dataset_id"] == DS and ds["budget"] == {"epsilon": 8.0, "delta": DELTA}
    assert ds["spent_epsilon"] == pytest.approx(spent) and ds["remaining_epsilon"] == pytest.approx(8.0 - spent)
    assert (ds["runs"], ds["rounds"], ds["steps"], ds["open_reservations"]) == (1, 3, 300, 1)
    assert [e["kind"] for e in ds["last_entries"]] == ["spend", "spend", "reservation"]
    assert report["secure_rng"]["available"] is False


def test_cli_missing_or_corrupt_ledger_is_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(_app(), ["--ledger", str(tmp_path / "nope.db")])
    assert missing.exit_code != 0 and isinstance(missing.exception, PrivacyLedgerError)
    assert "does not exist" in str(missing.exception)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 1000)
    corrupt = runner.invoke(_app(), ["--ledger", str(bad), "--json"])
    assert isinstance(corrupt.exception, PrivacyLedgerError) and "could not be read" in str(corrupt.exception)
    assert not (tmp_path / "nope.db").exists()  # looking never creates a ledger


# -- federated training: noise calibrated once for all planned rounds ------------------------------


def test_federated_rounds_share_one_noise_multiplier_and_land_on_the_training_target(ledger: PrivacyLedger) -> None:
    from fedtwin.training.privacy_plan import DPRequest, plan_federated_round

    _spend(ledger, "earlier-study", None, 1.5, 0.05, 200)  # history before this training
    before = ledger.spent_epsilon(DS)
    request = DPRequest(epsilon=2.0, batch_size=50, epochs=1.0, max_grad_norm=1.0)
    sigmas = []
    for r in (1, 2, 3):
        plan = plan_federated_round(ledger, DS, 1000, request, training_id="study-a", rounds=3, server_round=r)
        sigmas.append(plan.noise_multiplier)
        with plan.reserve(ledger, run_id="study-a", round=r, note="test") as session:
            session.add_steps(plan.steps)
    assert max(sigmas) - min(sigmas) < 1e-9  # the same multiplier every round
    spent = ledger.spent_epsilon(DS)
    assert spent == pytest.approx(before + 2.0, abs=0.05)  # all rounds together reach the target, no more
    # a per-round share (epsilon / 3 calibrated per round) would have used less noise early on:
    per_round = plan_federated_round(ledger, DS, 1000, DPRequest(epsilon=2.0 / 3, batch_size=50, epochs=1.0),
                                     training_id="other", rounds=1, server_round=1)
    assert per_round.noise_multiplier != pytest.approx(sigmas[0])


def test_a_retried_round_is_charged_again_within_the_site_budget(ledger: PrivacyLedger) -> None:
    """A halted round's steps were taken: retrying it on resume is charged again (documented in
    docs/privacy.md), with the training's one noise multiplier, and never beyond the site's budget."""
    from fedtwin.training.privacy_plan import DPRequest, plan_federated_round

    request = DPRequest(epsilon=2.0, batch_size=50, epochs=1.0, max_grad_norm=1.0)
    sigmas = []
    for r in (1, 2, 2):  # round 2 halted at aggregation, then was trained again
        plan = plan_federated_round(ledger, DS, 1000, request, training_id="retry", rounds=2, server_round=r)
        sigmas.append(plan.noise_multiplier)
        with plan.reserve(ledger, run_id="retry", round=r, note="test") as session:
            session.add_steps(plan.steps)
    assert max(sigmas) - min(sigmas) < 1e-9
    settled = [e for e in ledger.entries(DS) if e.run_id == "retry" and e.kind == "settlement"]
    assert [e.round for e in settled] == [1, 2, 2]  # both attempts of round 2 are in the ledger
    assert 2.0 + 0.05 < ledger.spent_epsilon(DS) <= ledger.budget(DS).epsilon


def test_federated_round_beyond_the_plan_or_the_budget_is_refused(ledger: PrivacyLedger) -> None:
    from fedtwin.training.privacy_plan import DPRequest, plan_federated_round

    request = DPRequest(epsilon=2.0, batch_size=50, epochs=1.0)
    with pytest.raises(BudgetExceededError, match="outside the 3 round"):
        plan_federated_round(ledger, DS, 1000, request, training_id="t", rounds=3, server_round=4)
    _spend(ledger, "someone-else", None, 0.6, 0.5, 400)  # uses up the budget of 8
    with pytest.raises(BudgetExceededError, match="exhausted|refusing to train"):
        plan_federated_round(ledger, DS, 1000, request, training_id="t", rounds=3, server_round=1)


def test_cli_budget_change_is_recorded_with_reason_and_approver(tmp_path: Path, ledger: PrivacyLedger) -> None:
    from conftest import cli_text

    from fedtwin.cli import main

    main._register()
    _spend(ledger, "run-a", 1, 1.1, 0.02, 100)
    spent = ledger.spent_epsilon(DS)
    path = str(tmp_path / "privacy.db")
    runner = CliRunner()

    def change(*extra: str):
        return runner.invoke(main.app, ["site", "budget-change", "--ledger", path, *extra], env={"COLUMNS": "200"})

    missing = change("--epsilon", "12", "--reason", "second study", "--approved-by", "   ")
    assert isinstance(missing.exception, FedTwinError) and "--approved-by must not be empty" in str(missing.exception)
    unknown = change("--epsilon", "12", "--reason", "r", "--approved-by", "board", "--dataset", "nope")
    assert isinstance(unknown.exception, FedTwinError) and "has no dataset nope" in str(unknown.exception)
    assert DS in str(unknown.exception)  # the fix names the datasets there are
    assert ledger.budget(DS).epsilon == 8.0  # refused changes record nothing

    ok = change("--epsilon", "12", "--reason", "second study approved", "--approved-by", "data governance board")
    assert ok.exit_code == 0, cli_text(ok)
    assert "budget epsilon 8 -> 12" in cli_text(ok) and f"spent so far epsilon {spent:.3f}" in cli_text(ok)
    assert ledger.budget(DS).epsilon == 12.0 and ledger.spent_epsilon(DS) == pytest.approx(spent)  # spend is kept
    [event] = [e for e in ledger.status(DS).budget_events if e.kind == "change"]
    assert (event.reason, event.approved_by) == ("second study approved", "data governance board")

    lower = change("--epsilon", "0.5", "--reason", "consent withdrawn", "--approved-by", "board")
    assert lower.exit_code == 0 and "no further training on this dataset" in cli_text(lower), cli_text(lower)
