"""What the ICU staff of a site do each hour: what they measure and which drugs they give.

Both depend on the patient's state, as in real ICUs, and that is the point: missingness is
*informative* (unstable patients are measured more often) and treatment is *confounded*
(vasopressor when MAP is low, insulin when glucose is high, fluids when lactate is high), so a
twin that ignores either is biased. Decisions use what staff see: the noisy readings of the
hour, or the last reading when nothing was measured. Thresholds and cadences come from the
site's :class:`SiteProfile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.synth.physiology import CR, FLUID, FURO, GLU, HR, INS, LAC, MAP, N_DRUG, N_STATE, NE
from fedtwin.synth.profiles import SiteProfile

# Observation noise of one reading: additive s.d. (HR, MAP) or relative s.d. (labs).
OBS_SD = np.array([3.0, 4.0, 0.05, 0.04, 0.07])
OBS_RELATIVE = np.array([False, False, True, True, True])
# Readings are clipped here, inside the spec's plausible ranges, so clean rows always pass.
READ_LOWER = np.array([25.0, 22.0, 20.0, 0.15, 0.2])
READ_UPPER = np.array([240.0, 190.0, 1400.0, 19.0, 28.0])

NE_START, NE_STEP, NE_MAX = 300.0, 300.0, 3000.0  # ug/h
FLUID_CAP_ML = 6000.0
VITALS_EXTRA_CAP = 3


def read(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Readings of states ``x`` (..., 5) with standard-normal draws ``z``: what a monitor or lab shows."""
    noisy = np.where(OBS_RELATIVE, x * (1.0 + OBS_SD * z), x + OBS_SD * z)
    return np.clip(noisy, READ_LOWER, READ_UPPER)


def instability(x: np.ndarray, infl: np.ndarray) -> np.ndarray:
    """How worried staff are (>= 0): low MAP, high lactate, inflammation. Drives cadence."""
    return (
        np.clip((75.0 - x[:, MAP]) / 10.0, 0.0, 3.0)
        + np.clip((x[:, LAC] - 2.0) / 2.0, 0.0, 3.0)
        + infl
    )


@dataclass
class CareState:
    """The staff's memory of one patient: current vasopressor rate, last MAP seen, last doses."""

    ne_rate: np.ndarray
    last_map: np.ndarray
    last_fluid_hour: np.ndarray
    last_furo_hour: np.ndarray
    last_insulin_hour: np.ndarray

    @classmethod
    def start(cls, n: int, map_at_admission: np.ndarray) -> "CareState":
        never = np.full(n, -1000.0)
        return cls(np.zeros(n), map_at_admission.copy(), never.copy(), never.copy(), never.copy())


def measurement_counts(
    profile: SiteProfile, x: np.ndarray, infl: np.ndarray, hour: int, active: np.ndarray,
    care: CareState, rng: np.random.Generator,
) -> np.ndarray:
    """(N, 5) readings taken in this hour. Vitals: charted with probability ``vitals_p`` plus
    extra readings rising with instability; labs: a chance per hour that rises exponentially
    with instability (``informativeness``), plus admission labs and glucose checks after insulin."""
    n = x.shape[0]
    u = instability(x, infl)
    counts = np.zeros((n, N_STATE), dtype=np.int16)
    for v in (HR, MAP):
        base = rng.random(n) < profile.vitals_p
        extra = np.minimum(rng.poisson(profile.vitals_extra * u), VITALS_EXTRA_CAP)
        counts[:, v] = base + extra
    inf = profile.informativeness
    admission = 1.0 if hour == 0 else 0.0
    recent_insulin = (hour - care.last_insulin_hour) <= 3
    p = np.stack(
        [
            profile.glucose_rate * np.exp(0.35 * inf * u) + 0.5 * recent_insulin + 0.8 * admission,
            profile.creatinine_rate * np.exp(0.25 * inf * u) + 0.8 * admission,
            profile.lactate_rate * np.exp(0.6 * inf * u) + 0.6 * admission,
        ],
        axis=1,
    )
    labs = rng.random((n, 3)) < np.minimum(p, 0.95)
    counts[:, GLU], counts[:, CR], counts[:, LAC] = labs[:, 0], labs[:, 1], labs[:, 2]
    counts[~active] = 0
    return counts


def decide_doses(
    profile: SiteProfile, care: CareState, readings: np.ndarray, counts: np.ndarray, hour: int,
    active: np.ndarray, cum_fluid: np.ndarray, rng: np.random.Generator,
) -> np.ndarray:
    """(N, 4) doses of this hour in canonical units (ug, [iU], mg, mL); updates ``care``.

    - norepinephrine: titrated by 300 ug/h steps towards the site's MAP target (acting in 85% of
      hours), stopped at discharge;
    - fluids: a bolus (site size, over the hour) when lactate reads above the site threshold, or
      MAP reads 5 below target in the first 12 h; at most one per 3 h and 6 L in all;
    - insulin: a sliding-scale bolus when a glucose reads above the site threshold;
    - furosemide: from hour 12, with MAP comfortably above target, now and then (likelier
      after 1.5 L of fluid), at most every 12 h.
    """
    n = readings.shape[0]
    doses = np.zeros((n, N_DRUG))
    seen_map = counts[:, MAP] > 0
    care.last_map = np.where(seen_map, readings[:, MAP], care.last_map)
    m = care.last_map
    act = rng.random(n) < 0.85
    up = act & (m < profile.map_target)
    down = act & (m > profile.map_target + 12.0)
    rate = np.where(up, np.where(care.ne_rate == 0, NE_START, care.ne_rate + NE_STEP), care.ne_rate)
    rate = np.where(down, np.maximum(rate - NE_STEP, 0.0), rate)
    rate = np.where(active, np.minimum(rate, NE_MAX), 0.0)
    care.ne_rate = rate
    doses[:, NE] = rate

    lac_high = (counts[:, LAC] > 0) & (readings[:, LAC] > profile.lactate_fluid_threshold)
    early_hypotension = (hour < 12) & (m < profile.map_target - 5.0) & (cum_fluid < 2000.0)
    fluid = active & (lac_high | early_hypotension) & (hour - care.last_fluid_hour >= 3)
    fluid &= cum_fluid + profile.fluid_bolus_ml <= FLUID_CAP_ML
    doses[:, FLUID] = np.where(fluid, profile.fluid_bolus_ml, 0.0)
    care.last_fluid_hour = np.where(fluid, float(hour), care.last_fluid_hour)

    glu_high = active & (counts[:, GLU] > 0) & (readings[:, GLU] > profile.insulin_threshold)
    units = np.clip(np.round((readings[:, GLU] - 110.0) / 30.0), 2.0, 14.0)
    doses[:, INS] = np.where(glu_high, units, 0.0)
    care.last_insulin_hour = np.where(glu_high, float(hour), care.last_insulin_hour)

    # Diuresis once the patient is haemodynamically stable: likelier after fluid loading.
    chance = np.where(cum_fluid >= 1500.0, 0.12, 0.02)
    furo = (
        active
        & (hour >= 12)
        & (m > profile.map_target + 8.0)
        & (hour - care.last_furo_hour >= 12)
        & (rng.random(n) < chance)
    )
    doses[:, FURO] = np.where(furo, profile.furosemide_mg, 0.0)
    care.last_furo_hour = np.where(furo, float(hour), care.last_furo_hour)
    return doses

