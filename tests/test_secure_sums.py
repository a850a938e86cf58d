"""Fixed-point statistics through SecAgg+'s weighted mean: exact sums, refusals, Flower's own arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from fedtwin.federation.secure_sums import (
    SecureSumEncoding,
    SecureSumError,
    decode_sums,
    encode_sums,
    weighted_mean_emulation,
)


def _roundtrip(sites, ns, enc):
    return decode_sums(weighted_mean_emulation([encode_sums(s, n, enc) for s, n in zip(sites, ns)], ns, enc), ns, enc)


def test_sums_over_fifteen_orders_of_magnitude_are_exact_to_the_unit() -> None:
    enc = SecureSumEncoding(max_weight=2000)
    rng = np.random.default_rng(0)
    sites = [rng.normal(0, 1, 4000) * 10.0 ** rng.integers(-3, 12, 4000) for _ in range(3)]
    ns = [120, 1500, 730]
    got = _roundtrip(sites, ns, enc)
    total = sum(sites)
    # each site rounds to the unit once; beyond ~1e10 float64 itself is coarser than the unit
    assert np.all(np.abs(got - total) <= 3 * enc.unit + 4e-16 * np.abs(total))


def test_counts_come_back_as_exact_integers_and_the_plain_mean_would_not() -> None:
    enc = SecureSumEncoding(max_weight=1000)
    counts = [np.arange(0, 50_000, 7, dtype=float), np.full(7143, 3.0)]
    ns = [400, 90]
    got = _roundtrip(counts, ns, enc)
    assert np.array_equal(got, counts[0] + counts[1])
    # the same vectors sent as plain parameters would come back as a clipped weighted mean
    plain = weighted_mean_emulation(counts, ns, enc)
    assert not np.allclose(plain * sum(ns), counts[0] + counts[1])


def test_encoded_values_stay_inside_the_clipping_range_whatever_the_weight() -> None:
    enc = SecureSumEncoding(max_weight=1000)
    big = np.array([enc.max_abs, -enc.max_abs, 0.0, 1.0])
    for n in (1, 10, 999, 1000):
        x = encode_sums(big, n, enc)
        assert np.max(np.abs(x * enc.site_ratio(n))) <= enc.clipping_range / 2


@pytest.mark.parametrize(
    "values, n, match",
    [
        (np.array([2.0e16]), 10, "beyond"),
        (np.array([np.nan, 1.0]), 10, "NaN"),
        (np.array([1.0]), 1001, "max_weight"),
    ],
)
def test_what_cannot_be_sent_exactly_is_refused(values, n, match) -> None:
    with pytest.raises(SecureSumError, match=match):
        encode_sums(values, n, SecureSumEncoding(max_weight=1000))


def test_settings_that_cannot_carry_the_digits_are_refused() -> None:
    with pytest.raises(SecureSumError, match="too small"):
        SecureSumEncoding(quantization_range=2**18)


def test_the_whole_documented_range_round_trips_beyond_int64_units() -> None:
    """4 x 19-bit digits hold 2^54 / 2^-20 = 2^74 units: more than an int64 holds."""
    enc = SecureSumEncoding(max_weight=1000)
    big = np.array([enc.max_abs, -enc.max_abs, 3.0e15, -7.77e12, 1.0, 0.0])
    got = _roundtrip([big, big / 2], [500, 500], enc)
    assert np.all(np.abs(got - 1.5 * big) <= 2 * enc.unit + 4e-16 * np.abs(1.5 * big))
