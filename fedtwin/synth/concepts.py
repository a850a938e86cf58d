"""The OMOP concepts the synthetic hospitals use, and the vocabulary rows that describe them.

Every concept id written anywhere in a synthetic site (measurement, unit, drug, route, condition,
visit, gender, race, ethnicity, type, cause of death, the CDM version, and the metadata concepts
of the vocabulary and domain rows) is listed here once, with the domain, vocabulary, class and
code it has in the OHDSI Athena vocabulary. A site database is therefore closed: every concept id
resolves in ``concept``, and every vocabulary / domain / concept class a concept row names has its
row too. The ids of the state variables, units and drugs are the ones of
``specs/icu-hemodynamics.yaml``; ``tests/test_synth.py`` checks them against that file.

Concept-class rows carry ``concept_class_concept_id = 0`` ("No matching concept"), as OHDSI
vocabulary shards do; FedTwin never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- the twin spec's concepts (specs/icu-hemodynamics.yaml) -------------------------------------

HEART_RATE, MAP, GLUCOSE, CREATININE, LACTATE = 3027018, 3027598, 3004501, 3016723, 3047181
PER_MIN, MM_HG, MG_DL, MMOL_L, UMOL_L = 8541, 8876, 8840, 8753, 8749
NOREPINEPHRINE, INSULIN, FUROSEMIDE, SODIUM_CHLORIDE = 1321341, 1596977, 956874, 967823
SEPSIS, AKI, HYPERTENSION, T2_DIABETES = 132797, 197320, 320128, 201826
INTENSIVE_CARE, INPATIENT = 32037, 9201
MALE, FEMALE = 8507, 8532
WHITE, BLACK, ASIAN, AMERICAN_INDIAN = 8527, 8516, 8515, 8657
HISPANIC, NOT_HISPANIC = 38003563, 38003564
EHR = 32817  # type concept of every synthetic row (visits, measurements, drugs, conditions, death, periods)
INTRAVENOUS = 4171047  # route of every synthetic drug exposure
CDM_V54 = 756265
NO_MATCHING_CONCEPT = 0


@dataclass(frozen=True)
class StateVariable:
    """A state variable as the simulator records it: spec name, LOINC concept, canonical unit."""

    name: str
    concept_id: int
    canonical_unit: str
    canonical_unit_concept_id: int


@dataclass(frozen=True)
class Unit:
    """A unit a site may record a variable in; ``factor`` converts it to the canonical unit
    (``canonical = value * factor``), exactly as in the spec."""

    concept_id: int
    code: str
    factor: float
    decimals: int  # how the site rounds values recorded in this unit


@dataclass(frozen=True)
class Drug:
    """An intervention: spec name, RxNorm ingredient, kind, canonical unit and the dose-unit
    spellings the spec accepts (``dose_unit_source_value`` -> factor into the canonical unit)."""

    name: str
    concept_id: int
    kind: str  # "bolus" or "infusion"
    canonical_unit: str
    dose_units: dict[str, float]


# Order = the spec's order; ground-truth arrays use it.
STATE_VARIABLES: tuple[StateVariable, ...] = (
    StateVariable("heart_rate", HEART_RATE, "/min", PER_MIN),
    StateVariable("map", MAP, "mm[Hg]", MM_HG),
    StateVariable("glucose", GLUCOSE, "mg/dL", MG_DL),
    StateVariable("creatinine", CREATININE, "mg/dL", MG_DL),
    StateVariable("lactate", LACTATE, "mmol/L", MMOL_L),
)
STATE_NAMES: tuple[str, ...] = tuple(v.name for v in STATE_VARIABLES)

# Units each variable may be recorded in at some site (the spec's accepted units).
UNITS: dict[str, dict[str, Unit]] = {
    "heart_rate": {"/min": Unit(PER_MIN, "/min", 1.0, 0)},
    "map": {"mm[Hg]": Unit(MM_HG, "mm[Hg]", 1.0, 0)},
    "glucose": {"mg/dL": Unit(MG_DL, "mg/dL", 1.0, 0), "mmol/L": Unit(MMOL_L, "mmol/L", 18.016, 1)},
    "creatinine": {"mg/dL": Unit(MG_DL, "mg/dL", 1.0, 2), "umol/L": Unit(UMOL_L, "umol/L", 0.011312, 0)},
    "lactate": {"mmol/L": Unit(MMOL_L, "mmol/L", 1.0, 1)},
}

# The spec's plausible ranges (canonical units); clean synthetic values always lie inside them.
PLAUSIBLE_RANGE: dict[str, tuple[float, float]] = {
    "heart_rate": (20.0, 250.0),
    "map": (20.0, 200.0),
    "glucose": (10.0, 1500.0),
    "creatinine": (0.1, 20.0),
    "lactate": (0.1, 30.0),
}

DRUGS: tuple[Drug, ...] = (
    Drug("norepinephrine", NOREPINEPHRINE, "infusion", "ug", {"ug": 1.0, "mg": 1000.0}),
    Drug("insulin", INSULIN, "bolus", "[iU]", {"[iU]": 1.0, "U": 1.0}),
    Drug("furosemide", FUROSEMIDE, "bolus", "mg", {"mg": 1.0}),
    Drug("fluids", SODIUM_CHLORIDE, "infusion", "mL", {"mL": 1.0, "L": 1000.0}),
)
DRUG_NAMES: tuple[str, ...] = tuple(d.name for d in DRUGS)
OUTCOME_NAMES: tuple[str, ...] = ("death", "aki")

# The spec's clock and cohort (checked against the YAML by the tests).
STEP_SECONDS = 3600.0
HISTORY_STEPS = 24
HORIZON_STEPS = 12
OUTCOME_WINDOW_STEPS = 48
MIN_AGE = 18.0
MIN_HISTORY_OBSERVATIONS = 3

# --- concept rows ---------------------------------------------------------------------------------

# (concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, standard_concept, concept_code)
ConceptRow = tuple[int, str, str, str, str, str | None, str]

_DATA_CONCEPTS: tuple[ConceptRow, ...] = (
    (HEART_RATE, "Heart rate", "Measurement", "LOINC", "Clinical Observation", "S", "8867-4"),
    (MAP, "Mean blood pressure", "Measurement", "LOINC", "Clinical Observation", "S", "8478-0"),
    (GLUCOSE, "Glucose [Mass/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test", "S", "2345-7"),
    (CREATININE, "Creatinine [Mass/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test", "S", "2160-0"),
    (LACTATE, "Lactate [Moles/volume] in Blood", "Measurement", "LOINC", "Lab Test", "S", "32693-4"),
    (PER_MIN, "per minute", "Unit", "UCUM", "Unit", "S", "/min"),
    (MM_HG, "millimeter mercury column", "Unit", "UCUM", "Unit", "S", "mm[Hg]"),
    (MG_DL, "milligram per deciliter", "Unit", "UCUM", "Unit", "S", "mg/dL"),
    (MMOL_L, "millimole per liter", "Unit", "UCUM", "Unit", "S", "mmol/L"),
    (UMOL_L, "micromole per liter", "Unit", "UCUM", "Unit", "S", "umol/L"),
    (NOREPINEPHRINE, "norepinephrine", "Drug", "RxNorm", "Ingredient", "S", "7512"),
    (INSULIN, "insulin, regular, human", "Drug", "RxNorm", "Ingredient", "S", "253182"),
    (FUROSEMIDE, "furosemide", "Drug", "RxNorm", "Ingredient", "S", "4603"),
    (SODIUM_CHLORIDE, "sodium chloride", "Drug", "RxNorm", "Ingredient", "S", "9863"),
    (INTRAVENOUS, "Intravenous", "Route", "SNOMED", "Qualifier Value", "S", "47625008"),
    (SEPSIS, "Sepsis", "Condition", "SNOMED", "Disorder", "S", "91302008"),
    (AKI, "Acute renal failure syndrome", "Condition", "SNOMED", "Disorder", "S", "14669001"),
    (HYPERTENSION, "Essential hypertension", "Condition", "SNOMED", "Disorder", "S", "59621000"),
    (T2_DIABETES, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Disorder", "S", "44054006"),
    (INTENSIVE_CARE, "Intensive Care", "Visit", "Visit", "Visit", "S", "OMOP4822460"),
    (INPATIENT, "Inpatient Visit", "Visit", "Visit", "Visit", "S", "IP"),
    (MALE, "MALE", "Gender", "Gender", "Gender", "S", "M"),
    (FEMALE, "FEMALE", "Gender", "Gender", "Gender", "S", "F"),
    (WHITE, "White", "Race", "Race", "Race", "S", "5"),
    (BLACK, "Black or African American", "Race", "Race", "Race", "S", "3"),
    (ASIAN, "Asian", "Race", "Race", "Race", "S", "2"),
    (AMERICAN_INDIAN, "American Indian or Alaska Native", "Race", "Race", "Race", "S", "1"),
    (HISPANIC, "Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "S", "Hispanic"),
    (NOT_HISPANIC, "Not Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "S", "Not Hispanic"),
    (EHR, "EHR", "Type Concept", "Type Concept", "Type Concept", "S", "OMOP4976890"),
    (CDM_V54, "OMOP CDM Version 5.4.0", "Metadata", "CDM", "CDM", "S", "CDM v5.4.0"),
    (NO_MATCHING_CONCEPT, "No matching concept", "Metadata", "None", "Undefined", None, "No matching concept"),
)

# vocabulary_id -> (vocabulary_name, vocabulary_reference, vocabulary_concept_id), as in Athena.
VOCABULARIES: dict[str, tuple[str, str, int]] = {
    "LOINC": ("Logical Observation Identifiers Names and Codes (Regenstrief Institute)", "http://loinc.org/downloads/loinc", 44819102),
    "UCUM": ("Unified Code for Units of Measure (Regenstrief Institute)", "http://unitsofmeasure.org", 44819107),
    "RxNorm": ("RxNorm (NLM)", "http://www.nlm.nih.gov/research/umls/rxnorm", 44819104),
    "SNOMED": ("Systematic Nomenclature of Medicine - Clinical Terms (IHTSDO)", "http://www.snomed.org", 44819097),
    "Visit": ("OMOP Visit", "OMOP generated", 44819119),
    "Gender": ("OMOP Gender", "OMOP generated", 44819108),
    "Race": ("Race and Ethnicity Code Set (USBC)", "http://www.cdc.gov/nchs/data/dvs/Race_Ethnicity_CodeSet.pdf", 44819109),
    "Ethnicity": ("OMOP Ethnicity", "OMOP generated", 44819134),
    "Type Concept": ("OMOP Type Concept", "OMOP generated", 32808),
    "CDM": ("OMOP Common DataModel", "https://github.com/OHDSI/CommonDataModel", 32485),
    "None": ("OMOP Standardized Vocabularies", "OMOP generated", 44819096),
    "Vocabulary": ("OMOP Vocabulary", "OMOP generated", 44819232),
    "Domain": ("OMOP Domain", "OMOP generated", 44819147),
}

# domain_id -> (domain_name, domain_concept_id), as in Athena.
DOMAINS: dict[str, tuple[str, int]] = {
    "Measurement": ("Measurement", 21),
    "Unit": ("Unit", 16),
    "Drug": ("Drug", 13),
    "Route": ("Route Of Administration", 15),
    "Condition": ("Condition", 19),
    "Visit": ("Visit", 8),
    "Gender": ("Gender", 2),
    "Race": ("Race", 3),
    "Ethnicity": ("Ethnicity", 4),
    "Type Concept": ("Type Concept", 58),
    "Metadata": ("Metadata", 7),
}

CONCEPT_CLASSES: dict[str, str] = {
    "Clinical Observation": "Clinical Observation",
    "Lab Test": "Lab Test",
    "Unit": "Unit",
    "Ingredient": "Ingredient",
    "Qualifier Value": "Qualifier Value",
    "Disorder": "Disorder",
    "Visit": "Visit",
    "Gender": "Gender",
    "Race": "Race",
    "Ethnicity": "Ethnicity",
    "Type Concept": "Type Concept",
    "CDM": "CDM",
    "Undefined": "Undefined",
    "Vocabulary": "Vocabulary",
    "Domain": "Domain",
}

VALID_START, VALID_END = "1970-01-01", "2099-12-31"
VOCABULARY_VERSION = "FedTwin synthetic v1"


def concept_rows() -> list[ConceptRow]:
    """Every concept row of a synthetic site, sorted by concept_id: the data concepts plus the
    metadata concepts that the vocabulary and domain rows point at."""
    rows: dict[int, ConceptRow] = {r[0]: r for r in _DATA_CONCEPTS}
    for vocab_id, (name, _ref, cid) in VOCABULARIES.items():
        rows.setdefault(cid, (cid, name, "Metadata", "Vocabulary", "Vocabulary", None, "OMOP generated"))
    for _domain_id, (name, cid) in DOMAINS.items():
        rows.setdefault(cid, (cid, name, "Metadata", "Domain", "Domain", None, "OMOP generated"))
    return [rows[k] for k in sorted(rows)]


def vocabulary_rows() -> list[tuple[str, str, str, str, int]]:
    """``(vocabulary_id, vocabulary_name, vocabulary_reference, vocabulary_version, vocabulary_concept_id)``."""
    return [(vid, name, ref, VOCABULARY_VERSION, cid) for vid, (name, ref, cid) in sorted(VOCABULARIES.items())]


def domain_rows() -> list[tuple[str, str, int]]:
    return [(did, name, cid) for did, (name, cid) in sorted(DOMAINS.items())]


def concept_class_rows() -> list[tuple[str, str, int]]:
    return [(cid, name, NO_MATCHING_CONCEPT) for cid, name in sorted(CONCEPT_CLASSES.items())]
