"""The factual run of one site: patients, staff and outcomes over 96 ICU hours.

Vectorized across patients; the only Python loop is over hours. The staff policy runs until the
*planned* discharge and does not know whether the patient will die, so the latent trajectory
(and hence each patient's outcome risk) is independent of the outcome draw; what the database
records is then cut at the realized death or discharge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.synth import care
from fedtwin.synth.concepts import HISTORY_STEPS
from fedtwin.synth.physiology import (
    N_DRUG, N_NOISE, N_STATE, LatentParams, State, advance, event_probability, hazards, initial_state,
)
from fedtwin.synth.population import MAX_STAY_HOURS, Population
from fedtwin.synth.profiles import SiteProfile

HOURS = MAX_STAY_HOURS  # simulated bins 0..95: the 24 h history, 48 h outcome window and after
NO_EVENT = -1


@dataclass
class Factual:
    """The factual run. ``(N, T, ...)`` arrays over the T = 96 simulated hourly bins."""

    states: np.ndarray  # (N, T, 5) latent state of each bin
    inflammation: np.ndarray  # (N, T)
    injury: np.ndarray  # (N, T)
    policy_doses: np.ndarray  # (N, T, 4) what the staff policy gives until planned discharge
    doses: np.ndarray  # (N, T, 4) what is recorded: policy doses cut at death / discharge
    counts: np.ndarray  # (N, T, 5) int16 readings per bin, cut at death / discharge
    first_z: np.ndarray  # (N, T, 5) observation noise of each bin's first reading
    hazard: np.ndarray  # (N, T, 2) hourly hazards of death and AKI
    noise: np.ndarray  # (N, T, 6) process noise (reused by the counterfactual runs)
    at_prediction: State  # the state at the start of bin HISTORY_STEPS (prediction time)
    death_hour: np.ndarray  # (N,) int, bin of death, -1 if none within 96 h
    death_offset: np.ndarray  # (N,) int seconds into that bin
    aki_hour: np.ndarray  # (N,) int, bin of the (only recorded) AKI, -1 if none
    aki_offset: np.ndarray  # (N,) int seconds
    active_bins: np.ndarray  # (N,) int, bins 0..active_bins-1 are spent in the ICU, alive
    icu_end_seconds: np.ndarray  # (N,) int, ICU end (death or discharge) from admission

    @property
    def hours(self) -> int:
        return int(self.states.shape[1])


def simulate(pop: Population, p: LatentParams, profile: SiteProfile, rng: np.random.Generator) -> Factual:
    """Run the site's ICU for 96 hours, then draw deaths and AKI from the hazards."""
    n, t_total = pop.n, HOURS
    s = initial_state(p, rng)
    noise = rng.standard_normal((n, t_total, N_NOISE))
    first_z = rng.standard_normal((n, t_total, N_STATE))
    planned_bins = np.floor(pop.planned_stay_hours).astype(np.int64)

    states = np.empty((n, t_total, N_STATE))
    infl = np.empty((n, t_total))
    injury = np.empty((n, t_total))
    policy = np.zeros((n, t_total, N_DRUG))
    counts = np.zeros((n, t_total, N_STATE), dtype=np.int16)
    hz = np.empty((n, t_total, 2))
    staff = care.CareState.start(n, s.x[:, 1])
    at_prediction = s
    for k in range(t_total):
        if k == HISTORY_STEPS:
            at_prediction = s.copy()
        states[:, k], infl[:, k], injury[:, k] = s.x, s.infl, s.injury
        hz[:, k] = hazards(p, s, k)
        active = k < planned_bins
        counts[:, k] = care.measurement_counts(profile, s.x, s.infl, k, active, staff, rng)
        readings = care.read(s.x, first_z[:, k])
        policy[:, k] = care.decide_doses(profile, staff, readings, counts[:, k], k, active, s.cum_fluid, rng)
        s = advance(p, s, policy[:, k], k, noise[:, k])

    # Outcomes: per hour, death with probability 1 - exp(-h); AKI likewise while alive and
    # not yet recorded. Offsets place the event inside its bin.
    prob = event_probability(hz)
    draws = rng.random((n, t_total, 2))
    offsets = rng.integers(60, 3540, (n, 2))  # away from bin edges, where float rounding could move an event
    hit = draws < prob
    death_hour = np.where(hit[:, :, 0].any(axis=1), hit[:, :, 0].argmax(axis=1), NO_EVENT)
    alive_at_start = np.where(death_hour[:, None] == NO_EVENT, True, np.arange(t_total)[None, :] <= death_hour[:, None])
    aki_hit = hit[:, :, 1] & alive_at_start
    aki_hour = np.where(aki_hit.any(axis=1), aki_hit.argmax(axis=1), NO_EVENT)
    death_offset = offsets[:, 0]
    aki_offset = np.where((aki_hour == death_hour) & (aki_hour != NO_EVENT), np.minimum(offsets[:, 1], death_offset), offsets[:, 1])

    planned_seconds = np.round(pop.planned_stay_hours * 3600.0).astype(np.int64)
    death_seconds = np.where(death_hour == NO_EVENT, np.iinfo(np.int64).max, death_hour * 3600 + death_offset)
    icu_end = np.minimum(planned_seconds, death_seconds)
    active_bins = icu_end // 3600
    in_icu = np.arange(t_total)[None, :] < active_bins[:, None]
    doses = policy * in_icu[:, :, None]
    counts = counts * in_icu[:, :, None]
    return Factual(
        states=states,
        inflammation=infl,
        injury=injury,
        policy_doses=policy,
        doses=doses,
        counts=counts.astype(np.int16),
        first_z=first_z,
        hazard=hz,
        noise=noise,
        at_prediction=at_prediction,
        death_hour=death_hour.astype(np.int64),
        death_offset=death_offset.astype(np.int64),
        aki_hour=aki_hour.astype(np.int64),
        aki_offset=aki_offset.astype(np.int64),
        active_bins=active_bins.astype(np.int64),
        icu_end_seconds=icu_end.astype(np.int64),
    )
