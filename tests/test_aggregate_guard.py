"""The coordinator's aggregate guard (coordinator/aggregate_guard.py) against what one malicious site
can make Flower 1.41's SecAgg+ return (its own quantize/dequantize, via weighted_mean_emulation).
The same attacks on real processes: tests/reliability/test_misuse.py."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.aggregate_guard import AggregateGuard
from fedtwin.federation.secure_sums import SecureSumEncoding, weighted_mean_emulation

ENC = SecureSumEncoding(clipping_range=8.0, quantization_range=2**22, max_weight=1000.0)
GUARD = AggregateGuard(clipping_range=8.0, max_weight=1000.0, quantization_range=2**22, secagg=True)
COUNTS = [("site_1", 120), ("site_2", 120), ("site_3", 120)]


def _aggregate(third: np.ndarray, third_count: int = 120) -> np.ndarray:
    honest = [np.linspace(-8.0, 8.0, 50), np.linspace(8.0, -8.0, 50)]  # honest updates may touch the clipping range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Flower's cast of NaN to int32
        return weighted_mean_emulation([*honest, third], [120, 120, third_count], ENC, rng=None)


def test_honest_aggregates_are_accepted_even_at_the_clipping_range() -> None:
    for _ in range(20):  # stochastic rounding: the slack must cover it every time
        agg = _aggregate(np.full(50, 8.0))
        assert GUARD.problems(COUNTS, [agg]) == []
    small = [("a", 10), ("b", 10)]  # tiny weights: rounding slack is larger, still accepted
    agg = weighted_mean_emulation([np.full(5, -8.0), np.full(5, -8.0)], [10, 10], ENC)
    assert GUARD.problems(small, [agg]) == []


def test_non_finite_update_makes_a_finite_but_huge_aggregate_that_is_refused() -> None:
    agg = _aggregate(np.full(50, np.nan))
    assert np.all(np.isfinite(agg)) and np.max(np.abs(agg)) > 1e4  # SecAgg+ does not propagate NaN: it makes garbage
    (problem,) = GUARD.problems(COUNTS, [agg])
    assert "outside the +-8" in problem and "huge or non-finite update" in problem


def test_huge_update_is_clipped_by_secagg_but_still_out_of_range_and_refused() -> None:
    agg = _aggregate(np.full(50, 1e6))
    assert 16 < np.max(np.abs(agg)) < 30  # clipped to +-c before masking, then divided by sum(r_i) ~ 0.36
    assert any("outside the +-8" in p for p in GUARD.problems(COUNTS, [agg]))


def test_a_count_beyond_max_weight_is_refused_even_though_the_aggregate_looks_harmless() -> None:
    agg = _aggregate(np.full(50, 0.5), third_count=10**6)
    assert np.max(np.abs(agg)) < 0.01  # the liar's weight dilutes the honest sites away: in range, yet poisoned
    problems = GUARD.problems([*COUNTS[:2], ("site_3", 10**6)], [agg])
    assert len(problems) == 1 and problems[0].startswith("site_3 reported num_examples=1000000, outside [1, max_weight=1000]")
    assert GUARD.problems([*COUNTS[:2], ("site_3", 0)], [np.zeros(3)])  # a zero weight is refused too
    # a liar that takes another site's name is still seen: every result's count is checked
    assert GUARD.problems([*COUNTS, ("site_1", 10**6)], [agg])


def test_non_finite_values_without_secagg_and_the_run_config() -> None:
    plain = AggregateGuard.from_run_config({"clipping-range": 4.0, "max-weight": 10.0, "secagg": False})
    assert plain == AggregateGuard(clipping_range=4.0, max_weight=10.0, quantization_range=2**22, secagg=False)
    assert plain.problems([("a", 10**6)], [np.ones(3)]) == []  # counts are FedAvg weights only: no max_weight without SecAgg+
    problems = plain.problems([("a", 1)], [np.array([1.0, np.nan]), np.array([5.0])])
    assert "non-finite values in parameter array(s) [0]" in problems[0] and "reaches |5|" in problems[1]


def test_the_strategy_refuses_the_aggregate_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.common import FitRes, Status, Code, ndarrays_to_parameters

    from coordinator.server_app import FedTwinFedAvg, RoundLog

    log = RoundLog()
    strategy = FedTwinFedAvg(log, 1, spec=None, guard=GUARD, initial_parameters=ndarrays_to_parameters([np.zeros(3)]),
                             accept_failures=True)

    def result(node: int, site: str, value: float, n: int):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(3, value, dtype=np.float32)]), n, {"site": site})
        return SimpleNamespace(node_id=node), res

    assert strategy.aggregate_fit(1, [result(1, "site_1", 0.5, 120), result(2, "site_2", 0.25, 120)], [])[0] is not None
    params, metrics = strategy.aggregate_fit(2, [result(1, "site_1", 0.5, 120), result(2, "site_2", 30.0, 120)], [])
    assert params is None and metrics == {} and log.results[2] == 0
    out = capsys.readouterr().out
    assert "FEDTWIN aggregate_error round=2 the aggregate reaches |15.25|" in out
    assert "FEDTWIN aggregate_error round=2 the aggregate is refused" in out
