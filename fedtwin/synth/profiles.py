"""Site heterogeneity: one :class:`SiteProfile` per synthetic hospital.

Federated learning is only tested honestly on sites that differ the way real hospitals do: in
size, case mix, who their patients are, how often they measure, which units and local codes their
ETL writes, and how clean their data are. The first five sites are fixed presets (so tests and
docs can name them); further sites are drawn from ``(seed, site index)`` alone, so adding a site
never changes the others. docs/synthetic-hospitals.md tabulates the presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fedtwin.errors import FedTwinError

RACE_NAMES: tuple[str, ...] = ("white", "black", "asian", "american_indian")


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one synthetic hospital differ from another.

    Rates are per patient unless said otherwise; cadences are per ICU hour. ``*_unit`` fields
    name the unit the site's ETL records (spec dose-unit spellings for drugs, UCUM codes for
    measurements); ``source_codes`` are the site's local codes (``measurement_source_value``).
    """

    site: int
    name: str
    n_patients: int
    size_weight: float
    # case mix
    severity_a: float  # severity ~ Beta(a, b): the latent acuity of an admission
    severity_b: float
    sepsis_rate: float
    hypertension_rate: float
    diabetes_rate: float
    # demographics
    age_mean: float
    age_sd: float
    female_share: float
    race_shares: tuple[float, float, float, float]  # RACE_NAMES order
    hispanic_share: float
    minor_share: float  # admissions under 18: in the database, excluded by the spec's min_age
    prior_inpatient_share: float  # earlier 9201 inpatient stays (never in the cohort)
    # measurement cadence and informative missingness
    vitals_p: float  # chance an ICU hour has at least one HR/MAP reading
    vitals_extra: float  # extra readings per hour per unit of instability
    glucose_rate: float  # base chance an hour has a glucose
    creatinine_rate: float
    lactate_rate: float
    informativeness: float  # how strongly instability multiplies lab cadence
    # unit conventions and local codes
    glucose_unit: str  # "mg/dL" | "mmol/L"
    creatinine_unit: str  # "mg/dL" | "umol/L"
    norepinephrine_unit: str  # "ug" | "mg"
    insulin_unit: str  # "[iU]" | "U"
    fluids_unit: str  # "mL" | "L"
    source_codes: dict[str, str] = field(default_factory=dict)
    unit_spellings: dict[str, str] = field(default_factory=dict)
    drug_source_codes: dict[str, str] = field(default_factory=dict)
    # treatment policy (what the clinicians of this site react to)
    map_target: float = 65.0
    insulin_threshold: float = 180.0
    lactate_fluid_threshold: float = 2.5
    fluid_bolus_ml: float = 500.0
    furosemide_mg: float = 40.0
    # data defects: injected rows per kind = round(defect_rate * clean measurement rows)
    defect_rate: float = 0.0
    defect_weight: float = 1.0
    # calendar: ICU admissions are spread over [start_year, start_year + 3)
    start_year: int = 2019

    def unit_of(self, variable: str) -> str:
        """The UCUM code this site records ``variable`` in."""
        return {
            "heart_rate": "/min",
            "map": "mm[Hg]",
            "glucose": self.glucose_unit,
            "creatinine": self.creatinine_unit,
            "lactate": "mmol/L",
        }[variable]

    def dose_unit_of(self, drug: str) -> str:
        """The ``dose_unit_source_value`` this site writes for ``drug``."""
        return {
            "norepinephrine": self.norepinephrine_unit,
            "insulin": self.insulin_unit,
            "furosemide": "mg",
            "fluids": self.fluids_unit,
        }[drug]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _codes(hr: str, map_: str, glu: str, cr: str, lac: str) -> dict[str, str]:
    return {"heart_rate": hr, "map": map_, "glucose": glu, "creatinine": cr, "lactate": lac}


def _drug_codes(ne: str, ins: str, furo: str, fl: str) -> dict[str, str]:
    return {"norepinephrine": ne, "insulin": ins, "furosemide": furo, "fluids": fl}


# The explicit presets for sites 1..5 (seed-independent). Sizes are relative weights.
_PRESETS: tuple[dict[str, Any], ...] = (
    dict(
        name="Metro Academic ICU", size_weight=1.6, severity_a=2.6, severity_b=3.0, sepsis_rate=0.45,
        hypertension_rate=0.40, diabetes_rate=0.25, age_mean=62, age_sd=16, female_share=0.44,
        race_shares=(0.62, 0.20, 0.15, 0.03), hispanic_share=0.12, minor_share=0.01, prior_inpatient_share=0.30,
        vitals_p=0.97, vitals_extra=0.45, glucose_rate=0.22, creatinine_rate=0.10, lactate_rate=0.08,
        informativeness=1.0, glucose_unit="mg/dL", creatinine_unit="mg/dL", norepinephrine_unit="ug",
        insulin_unit="[iU]", fluids_unit="mL",
        source_codes=_codes("HR_MON", "ABP_MEAN", "LAB-GLU", "LAB-CREA", "LAB-LACT"),
        unit_spellings=_codes("/min", "mmHg", "mg/dL", "mg/dL", "mmol/L"),
        drug_source_codes=_drug_codes("NOREPI 8MG/250ML", "INSULIN REG IV", "FUROSEMIDE IV", "NACL 0.9% BOLUS"),
        map_target=65.0, insulin_threshold=180.0, lactate_fluid_threshold=2.5, fluid_bolus_ml=500.0,
        furosemide_mg=40.0, defect_weight=1.0, start_year=2019,
    ),
    dict(
        name="Riverside Community ICU", size_weight=1.0, severity_a=2.0, severity_b=3.2, sepsis_rate=0.35,
        hypertension_rate=0.50, diabetes_rate=0.33, age_mean=60, age_sd=17, female_share=0.48,
        race_shares=(0.45, 0.46, 0.07, 0.02), hispanic_share=0.18, minor_share=0.01, prior_inpatient_share=0.25,
        vitals_p=0.92, vitals_extra=0.30, glucose_rate=0.18, creatinine_rate=0.07, lactate_rate=0.05,
        informativeness=1.2, glucose_unit="mmol/L", creatinine_unit="umol/L", norepinephrine_unit="mg",
        insulin_unit="U", fluids_unit="L",
        source_codes=_codes("VS.PULSE", "VS.MAP", "GLUC", "CREAT", "LACT"),
        unit_spellings=_codes("bpm", "mm Hg", "mmol/L", "umol/L", "mmol/L"),
        drug_source_codes=_drug_codes("NORADRENALINE INF", "ACTRAPID", "LASIX", "SALINE 1L"),
        map_target=65.0, insulin_threshold=180.0, lactate_fluid_threshold=3.0, fluid_bolus_ml=1000.0,
        furosemide_mg=20.0, defect_weight=2.0, start_year=2020,
    ),
    dict(
        name="High Plains Regional ICU", size_weight=0.5, severity_a=2.4, severity_b=2.6, sepsis_rate=0.40,
        hypertension_rate=0.45, diabetes_rate=0.38, age_mean=58, age_sd=17, female_share=0.47,
        race_shares=(0.55, 0.03, 0.02, 0.40), hispanic_share=0.10, minor_share=0.02, prior_inpatient_share=0.20,
        vitals_p=0.86, vitals_extra=0.20, glucose_rate=0.12, creatinine_rate=0.05, lactate_rate=0.03,
        informativeness=1.6, glucose_unit="mg/dL", creatinine_unit="umol/L", norepinephrine_unit="ug",
        insulin_unit="U", fluids_unit="mL",
        source_codes=_codes("HR", "MAP", "GLU", "CR", "LACTATE"),
        unit_spellings=_codes("beats/min", "mmHg", "mg/dL", "umol/L", "mmol/L"),
        drug_source_codes=_drug_codes("LEVOPHED", "HUMULIN R", "FUROSEMIDE 40MG", "NS"),
        map_target=60.0, insulin_threshold=200.0, lactate_fluid_threshold=2.0, fluid_bolus_ml=500.0,
        furosemide_mg=40.0, defect_weight=0.5, start_year=2019,
    ),
    dict(
        name="Lakeside University ICU", size_weight=1.2, severity_a=1.7, severity_b=3.6, sepsis_rate=0.28,
        hypertension_rate=0.38, diabetes_rate=0.22, age_mean=64, age_sd=15, female_share=0.45,
        race_shares=(0.72, 0.12, 0.15, 0.01), hispanic_share=0.08, minor_share=0.005, prior_inpatient_share=0.35,
        vitals_p=0.98, vitals_extra=0.50, glucose_rate=0.25, creatinine_rate=0.12, lactate_rate=0.07,
        informativeness=0.8, glucose_unit="mmol/L", creatinine_unit="mg/dL", norepinephrine_unit="ug",
        insulin_unit="[iU]", fluids_unit="L",
        source_codes=_codes("8867-4-LOCAL", "MBP", "GLU_POC", "CREA_SER", "LAC_ART"),
        unit_spellings=_codes("/min", "mm[Hg]", "mmol/L", "mg/dL", "mmol/L"),
        drug_source_codes=_drug_codes("NOREPINEPHRINE DRIP", "INSULIN ACTRAPID", "FUROSEMIDE", "0.9% SODIUM CHLORIDE"),
        map_target=70.0, insulin_threshold=160.0, lactate_fluid_threshold=2.5, fluid_bolus_ml=500.0,
        furosemide_mg=40.0, defect_weight=0.0, start_year=2021,
    ),
    dict(
        name="Coastal General ICU", size_weight=0.7, severity_a=2.2, severity_b=2.8, sepsis_rate=0.38,
        hypertension_rate=0.42, diabetes_rate=0.28, age_mean=66, age_sd=15, female_share=0.50,
        race_shares=(0.66, 0.14, 0.18, 0.02), hispanic_share=0.22, minor_share=0.01, prior_inpatient_share=0.25,
        vitals_p=0.94, vitals_extra=0.35, glucose_rate=0.16, creatinine_rate=0.08, lactate_rate=0.06,
        informativeness=2.0, glucose_unit="mg/dL", creatinine_unit="mg/dL", norepinephrine_unit="mg",
        insulin_unit="[iU]", fluids_unit="mL",
        source_codes=_codes("PULSE", "NBP_MEAN", "GLUCOSE_S", "CREATININE_S", "LACTATE_B"),
        unit_spellings=_codes("bpm", "mmHg", "mg/dL", "mg/dL", "mmol/L"),
        drug_source_codes=_drug_codes("NOREPI 4MG/50ML", "REGULAR INSULIN", "FURO 20MG/2ML", "NORMAL SALINE"),
        map_target=65.0, insulin_threshold=180.0, lactate_fluid_threshold=2.0, fluid_bolus_ml=1000.0,
        furosemide_mg=40.0, defect_weight=1.0, start_year=2020,
    ),
)

PRESET_COUNT = len(_PRESETS)


def _derived(site: int, seed: int) -> dict[str, Any]:
    """A profile for site > 5, drawn from (seed, site) only, so it is stable as sites are added."""
    rng = np.random.default_rng([seed, site, 0x51E])
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    black = float(rng.uniform(0.05, 0.22))
    asian = float(rng.uniform(0.03, 0.15))
    american_indian = 0.005
    tag = f"S{site}"
    return dict(
        name=f"Derived ICU {site}", size_weight=float(np.exp(rng.normal(0.0, 0.4))),
        severity_a=float(rng.uniform(1.6, 2.8)), severity_b=float(rng.uniform(2.5, 3.6)),
        sepsis_rate=float(rng.uniform(0.25, 0.45)), hypertension_rate=float(rng.uniform(0.35, 0.5)),
        diabetes_rate=float(rng.uniform(0.2, 0.35)), age_mean=float(rng.uniform(57, 67)), age_sd=16.0,
        female_share=float(rng.uniform(0.42, 0.52)),
        race_shares=(1.0 - black - asian - american_indian, black, asian, american_indian),
        hispanic_share=float(rng.uniform(0.05, 0.2)), minor_share=0.01, prior_inpatient_share=float(rng.uniform(0.2, 0.35)),
        vitals_p=float(rng.uniform(0.85, 0.98)), vitals_extra=float(rng.uniform(0.2, 0.5)),
        glucose_rate=float(rng.uniform(0.12, 0.25)), creatinine_rate=float(rng.uniform(0.05, 0.12)),
        lactate_rate=float(rng.uniform(0.03, 0.08)), informativeness=float(rng.uniform(0.8, 2.0)),
        glucose_unit=pick(["mg/dL", "mmol/L"]), creatinine_unit=pick(["mg/dL", "umol/L"]),
        norepinephrine_unit=pick(["ug", "mg"]), insulin_unit=pick(["[iU]", "U"]), fluids_unit=pick(["mL", "L"]),
        source_codes=_codes(f"{tag}-HR", f"{tag}-MAP", f"{tag}-GLU", f"{tag}-CRE", f"{tag}-LAC"),
        unit_spellings={},  # filled from the unit choice below
        drug_source_codes=_drug_codes(f"{tag}-NOREPI", f"{tag}-INSULIN", f"{tag}-FUROSEMIDE", f"{tag}-NACL"),
        map_target=pick([60.0, 65.0, 65.0, 70.0]), insulin_threshold=pick([160.0, 180.0, 200.0]),
        lactate_fluid_threshold=pick([2.0, 2.5, 3.0]), fluid_bolus_ml=pick([500.0, 1000.0]),
        furosemide_mg=pick([20.0, 40.0]), defect_weight=pick([0.0, 0.5, 1.0, 2.0]), start_year=int(rng.integers(2018, 2022)),
    )


def _sizes(weights: list[float], mean_patients: int) -> list[int]:
    """Unequal site sizes with mean ``mean_patients`` (the total is exactly n_sites x mean)."""
    total = mean_patients * len(weights)
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * total
    sizes = np.maximum(1, np.floor(raw)).astype(np.int64)
    # Hand out the rounding remainder to the largest fractional parts, deterministically.
    remainder = int(total - sizes.sum())
    if remainder > 0:
        order = np.argsort(-(raw - np.floor(raw)), kind="stable")
        sizes[order[:remainder]] += 1
    return [int(s) for s in sizes]


def make_profiles(
    n_sites: int,
    mean_patients: int,
    seed: int,
    sizes: list[int] | None = None,
    defects: float = 0.0,
) -> list[SiteProfile]:
    """The profiles of sites 1..n_sites.

    ``sizes`` (patients per site) overrides the sizes derived from ``mean_patients``.
    ``defects`` is the base defect rate; each site injects ``defects x defect_weight`` of its
    clean measurement rows per defect kind (so some sites stay clean, others are dirtier).
    """
    if n_sites < 1:
        raise FedTwinError(f"--sites must be at least 1, got {n_sites}", "pass --sites 1 or more")
    if sizes is not None and len(sizes) != n_sites:
        raise FedTwinError(
            f"--sizes lists {len(sizes)} site sizes but --sites is {n_sites}",
            "give one size per site, e.g. --sites 3 --sizes 800,400,200",
        )
    if sizes is not None and any(s < 1 for s in sizes):
        raise FedTwinError(f"--sizes must be positive, got {sizes}", "give each site at least 1 patient")
    if mean_patients < 1:
        raise FedTwinError(f"--patients must be at least 1, got {mean_patients}", "pass --patients 1 or more")
    if not 0.0 <= defects <= 0.2:
        raise FedTwinError(f"--defects must lie in [0, 0.2], got {defects}", "use e.g. --defects 0.01 (1% per kind)")
    raw = [dict(_PRESETS[k - 1]) if k <= PRESET_COUNT else _derived(k, seed) for k in range(1, n_sites + 1)]
    counts = sizes if sizes is not None else _sizes([r["size_weight"] for r in raw], mean_patients)
    profiles = []
    for k, (r, n) in enumerate(zip(raw, counts), start=1):
        if not r["unit_spellings"]:
            r["unit_spellings"] = _codes("/min", "mmHg", r["glucose_unit"], r["creatinine_unit"], "mmol/L")
        p = SiteProfile(site=k, n_patients=int(n), **r)
        profiles.append(replace(p, defect_rate=float(defects) * p.defect_weight))
    return profiles
