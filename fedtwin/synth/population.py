"""Who is admitted to a synthetic ICU: demographics, comorbidities, calendar, acuity, stay length.

Everything here is a draw per patient from the site's :class:`SiteProfile`, vectorized over the
site's patients. Times are integer seconds since the Unix epoch (UTC, as the extractor reads naive
datetimes), so that the ground truth can reproduce the extractor's arithmetic exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.synth import concepts as C
from fedtwin.synth.profiles import SiteProfile

SECONDS_PER_YEAR = 365.25 * 86400.0  # the extractor's year (fedtwin.extract.cohort)
DAY = 86400
HOUR = 3600
PERSON_ID_STRIDE = 1_000_000  # person_id = site * stride + k: unique across the federation
MAX_STAY_HOURS = 96


@dataclass
class Population:
    """One row per admitted patient, sorted by person_id (the ground-truth row order)."""

    person_id: np.ndarray  # int64
    gender_concept_id: np.ndarray  # int64
    race_concept_id: np.ndarray  # int64
    ethnicity_concept_id: np.ndarray  # int64
    birth_epoch: np.ndarray  # int64, midnight UTC of the birth date
    admit_epoch: np.ndarray  # int64, ICU admission = the cohort's index time
    age: np.ndarray  # float64, years at admission, computed like the extractor
    severity: np.ndarray  # float64 in (0, 1), latent acuity
    septic: np.ndarray  # bool
    hypertension: np.ndarray  # bool
    diabetes: np.ndarray  # bool
    planned_stay_hours: np.ndarray  # float64, ICU stay if the patient survives it
    prior_visit: np.ndarray  # bool, an earlier inpatient (9201) stay
    prior_start_epoch: np.ndarray  # int64 (0 when no prior visit)
    prior_end_epoch: np.ndarray  # int64
    comorbidity_epoch: np.ndarray  # int64, when hypertension / diabetes were first recorded

    @property
    def n(self) -> int:
        return int(self.person_id.shape[0])


def _year_start_epoch(year: int) -> int:
    return int((np.datetime64(f"{year}-01-01T00:00:00", "s") - np.datetime64(0, "s")).astype(np.int64))


def draw_population(profile: SiteProfile, rng: np.random.Generator) -> Population:
    """Draw the site's admissions. Minors (``minor_share``) are included on purpose: the spec's
    ``min_age`` must exclude them, and the ground truth marks them out of the cohort."""
    n = profile.n_patients
    if n >= PERSON_ID_STRIDE - 100_000:
        raise ValueError(f"site {profile.site}: at most {PERSON_ID_STRIDE - 100_000} patients per site")
    person_id = profile.site * PERSON_ID_STRIDE + np.arange(1, n + 1, dtype=np.int64)

    female = rng.random(n) < profile.female_share
    gender = np.where(female, C.FEMALE, C.MALE).astype(np.int64)
    race_codes = np.array([C.WHITE, C.BLACK, C.ASIAN, C.AMERICAN_INDIAN], dtype=np.int64)
    shares = np.asarray(profile.race_shares, dtype=np.float64)
    race = race_codes[np.searchsorted(np.cumsum(shares / shares.sum()), rng.random(n), side="right").clip(0, 3)]
    ethnicity = np.where(rng.random(n) < profile.hispanic_share, C.HISPANIC, C.NOT_HISPANIC).astype(np.int64)

    start = _year_start_epoch(profile.start_year)
    span_minutes = 3 * 365 * 24 * 60
    admit = start + rng.integers(0, span_minutes, n).astype(np.int64) * 60

    minor = rng.random(n) < profile.minor_share
    adult_age = np.clip(rng.normal(profile.age_mean, profile.age_sd, n), 18.6, 95.0)
    age_drawn = np.where(minor, rng.uniform(14.0, 17.4, n), adult_age)
    birth = (admit - age_drawn * SECONDS_PER_YEAR).astype(np.int64)
    birth = (birth // DAY) * DAY  # a birth date (midnight); at most a day older, so 18.6 stays adult
    age = (admit - birth) / SECONDS_PER_YEAR

    severity = rng.beta(profile.severity_a, profile.severity_b, n)
    septic = rng.random(n) < np.clip(profile.sepsis_rate * (0.4 + 1.2 * severity), 0.0, 0.95)
    age_factor = np.clip(0.4 + (age - 18.0) / 55.0, 0.1, 1.6)
    hypertension = rng.random(n) < np.clip(profile.hypertension_rate * age_factor, 0.0, 0.9)
    diabetes = rng.random(n) < np.clip(profile.diabetes_rate * age_factor, 0.0, 0.9)

    planned = 30.0 + rng.gamma(2.0, 12.0 + 18.0 * severity)
    planned = np.clip(planned, 26.0, float(MAX_STAY_HOURS))
    planned = np.round(planned * 60.0) / 60.0  # whole minutes

    prior = rng.random(n) < profile.prior_inpatient_share
    prior_start = admit - rng.integers(30 * 24, 720 * 24, n).astype(np.int64) * HOUR
    prior_end = prior_start + rng.integers(2 * 24, 8 * 24, n).astype(np.int64) * HOUR
    prior_start = np.where(prior, prior_start, 0)
    prior_end = np.where(prior, prior_end, 0)
    comorbid = np.where(prior, prior_start, admit - rng.integers(200, 2000, n).astype(np.int64) * DAY)

    return Population(
        person_id=person_id,
        gender_concept_id=gender,
        race_concept_id=race,
        ethnicity_concept_id=ethnicity,
        birth_epoch=birth,
        admit_epoch=admit,
        age=age,
        severity=severity,
        septic=septic,
        hypertension=hypertension,
        diabetes=diabetes,
        planned_stay_hours=planned,
        prior_visit=prior,
        prior_start_epoch=prior_start,
        prior_end_epoch=prior_end,
        comorbidity_epoch=comorbid,
    )
