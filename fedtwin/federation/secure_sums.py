"""Exact sums of evaluation statistics through Flower's SecAgg+, which only computes weighted means.

Flower 1.41's SecAgg+ takes each site's float vector x_i, multiplies it by the site's weight
``r_i = round(n_i / max_weight * q) / q`` (n_i = the site's plaintext ``num_examples``, q =
``quantization_range``), clips to +-``clipping_range`` (c), stochastically rounds
``(y + c) * q / (2c)`` to an integer, masks, and returns ``sum_i(r_i x_i) / sum_i(r_i)`` to the
coordinator. That is the right operation for model parameters (weighted FedAvg) but not for
sufficient statistics, which must be *summed*, and whose magnitudes (counts, sums of squared
errors in canonical units) are far outside +-8.

So each statistic ``s`` travels as fixed-point integers:

1. ``v = round(s / unit)`` (``unit`` = 2^-20: every sum is exact to 1e-6 in its own units);
2. ``v`` is split into ``n_limbs`` balanced base-2^19 digits ``d_j`` in [-2^18, 2^18);
3. each digit is sent as ``x = guard * d_j * (2c / q) / r_i``: after Flower multiplies by
   ``r_i`` the pre-rounding value is the integer ``guard * d_j + q/2`` (up to ~1e-9 of float
   error), so stochastic rounding leaves it unchanged and nothing is clipped (|guard * d| <= 2^20
   < q/2);
4. the coordinator multiplies the weighted mean it receives by ``sum_i(round(n_i/max_weight*q)) / (2c)``
   (it knows every n_i) and gets ``guard * sum_i(d_ij)`` exactly; dividing by ``guard`` and
   rounding removes the rare off-by-one of a float value that landed a hair off an integer
   (it would take ``guard / 2`` such flips in one element across all sites to matter).

Costs: ``n_limbs`` (4) floats per statistic, and a range of |s| <= 2^54 (1.8e16) per site; a larger
sum is refused at the site rather than sent wrong. (Sums of fourth powers of errors in canonical
units reach 5e9 on a 30-patient test split, so 3 limbs - 2^39 - would not do for large sites.) The coordinator learns only the sums over
the sites in the aggregate, exactly as for the parameters. Tests: ``tests/test_secure_sums.py``
(pure arithmetic against Flower's own quantize/dequantize) and the deployment tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedtwin.errors import FedTwinError


class SecureSumError(FedTwinError, ValueError):
    """Statistics cannot be encoded for SecAgg+ (too large, bad settings, weight above max_weight)."""


@dataclass(frozen=True)
class SecureSumEncoding:
    """The SecAgg+ settings the encoding must match, plus the fixed-point format."""

    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0
    unit: float = 2.0**-20
    limb_bits: int = 19
    n_limbs: int = 4
    guard: int = 4

    def __post_init__(self) -> None:
        q = int(self.quantization_range)
        if q % 2 or q <= 0:
            raise SecureSumError(f"quantization_range {q} must be a positive even integer", "use a power of 2 such as 4194304")
        if self.guard * 2 ** (self.limb_bits - 1) > q // 2:
            raise SecureSumError(
                f"quantization_range {q} is too small for {self.limb_bits}-bit digits (need >= {self.guard * 2 ** self.limb_bits})",
                "raise quantization_range (default 4194304 = 2^22)",
            )
        if not (self.clipping_range > 0 and self.max_weight > 0 and self.unit > 0):
            raise SecureSumError("clipping_range, max_weight and unit must be positive")

    @property
    def base(self) -> int:
        return 2**self.limb_bits

    @property
    def max_abs(self) -> float:
        """Largest |sum| a site can send (in the statistic's own units)."""
        return self.unit * 2.0 ** (self.limb_bits * self.n_limbs - 2)  # a power of 2: exact in float64

    def site_ratio(self, num_examples: int) -> float:
        """Flower's dequantized weight of a site (secaggplus_mod: round(n / max_weight * q) / q)."""
        q = int(self.quantization_range)
        return round(num_examples / self.max_weight * q) / q

    def total_ratio_q(self, num_examples: Sequence[int]) -> int:
        """sum_i round(n_i / max_weight * q): what Flower divides the unmasked sum by (times q)."""
        q = int(self.quantization_range)
        return int(sum(round(n / self.max_weight * q) for n in num_examples))


def _digits(v: np.ndarray, base: int, n_limbs: int) -> np.ndarray:
    """Balanced base-``base`` digits of integer-valued float64 ``v``: shape (n_limbs, N), each in [-base/2, base/2).

    Float arithmetic, not int64: ``n_limbs`` x 19 bits exceed 63, and every step is exact (``base``
    is a power of 2, the digits are small integers, the quotients integer-valued floats).
    """
    out = np.empty((n_limbs, v.size), dtype=np.float64)
    rest = np.asarray(v, dtype=np.float64).copy()
    half = base / 2
    for j in range(n_limbs):
        d = rest - base * np.floor((rest + half) / base)
        out[j] = d
        rest = (rest - d) / base
    if np.any(rest != 0):
        raise AssertionError("digits overflow: the range check should have refused this")
    return out


def encode_sums(values: np.ndarray, num_examples: int, enc: SecureSumEncoding) -> np.ndarray:
    """One site's statistics as a (n_limbs, N) float64 array to append to its SecAgg+ parameters."""
    s = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise SecureSumError(f"{int(np.sum(~np.isfinite(s)))} statistics are NaN/inf", "the site's evaluation produced non-finite sums: see its log")
    if s.size and float(np.max(np.abs(s))) > enc.max_abs:
        raise SecureSumError(
            f"a statistic reaches {float(np.max(np.abs(s))):.3g}, beyond the {enc.max_abs:.3g} the SecAgg+ encoding carries",
            "this would be sent wrong, so it is not sent: check the site's units (docs/federation.md)",
        )
    if not 0 < num_examples <= enc.max_weight:
        raise SecureSumError(
            f"num_examples {num_examples} is outside (0, max_weight = {enc.max_weight:g}]",
            "raise [secagg] max_weight in study.toml above the largest site's patient count",
        )
    ratio = enc.site_ratio(num_examples)
    if ratio <= 0:
        raise SecureSumError(f"num_examples {num_examples} rounds to a zero SecAgg+ weight", "lower max_weight")
    digits = _digits(np.rint(s / enc.unit), enc.base, enc.n_limbs)
    step = 2.0 * enc.clipping_range / enc.quantization_range
    return (enc.guard * digits) * step / ratio


def decode_sums(aggregated: np.ndarray, num_examples: Sequence[int], enc: SecureSumEncoding) -> np.ndarray:
    """The sum over sites of their statistics, from the (n_limbs, N) weighted mean SecAgg+ returned."""
    a = np.asarray(aggregated, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != enc.n_limbs:
        raise SecureSumError(f"expected an aggregate of shape ({enc.n_limbs}, N), got {a.shape}")
    k = a * (enc.total_ratio_q(num_examples) / (2.0 * enc.clipping_range))
    digits = np.rint(k / enc.guard)
    scale = np.array([float(enc.base) ** j for j in range(enc.n_limbs)])[:, None]
    return enc.unit * np.sum(digits * scale, axis=0)


def weighted_mean_emulation(vectors: Sequence[np.ndarray], num_examples: Sequence[int], enc: SecureSumEncoding,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """What SecAgg+ returns for ``vectors`` (quantization included, masks cancel): for tests and docs.

    Uses Flower's own ``quantize``/``dequantize`` so that a change in Flower's arithmetic shows up.
    """
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    q = int(enc.quantization_range)
    total = None
    for x, n in zip(vectors, num_examples):
        y = np.asarray(x, dtype=np.float64) * enc.site_ratio(n)
        quantized = quantize([y], enc.clipping_range, q)[0].astype(np.int64)
        total = quantized if total is None else total + quantized
    deq = dequantize([total], enc.clipping_range, q)[0]
    deq += -(len(vectors) - 1) * enc.clipping_range
    return deq * (q / enc.total_ratio_q(num_examples))
