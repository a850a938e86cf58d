"""Twin specs: the shipped examples validate, bad specs fail naming field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedtwin.errors import SpecError
from fedtwin.spec import load_spec, spec_hash
from fedtwin.spec.io import spec_from_dict

SPECS = Path(__file__).resolve().parents[1] / "specs"


def _icu() -> dict:
    return yaml.safe_load((SPECS / "icu-hemodynamics.yaml").read_text())


@pytest.mark.parametrize("name", ["icu-hemodynamics.yaml", "hypertension-bp.yaml"])
def test_shipped_specs_validate(name: str) -> None:
    spec = load_spec(SPECS / name)
    assert spec.time.step_seconds > 0
    assert len(spec_hash(spec)) == 64


def test_hash_ignores_layout_but_not_meaning(tmp_path: Path) -> None:
    data = _icu()
    a = spec_from_dict(data)
    # Same meaning, different YAML layout and key order -> same hash.
    reordered = dict(reversed(list(data.items())))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(reordered, default_flow_style=True))
    assert spec_hash(load_spec(tmp_path / "b.yaml")) == spec_hash(a)
    data["time"]["horizon_steps"] = 13
    assert spec_hash(spec_from_dict(data)) != spec_hash(a)


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"),
    [
        (lambda d: d["time"].update(step="1 fortnight"), "time.step", "not a duration"),
        (lambda d: d["state_variables"][0].update(plausible_range=[250, 20]), "state_variables[0]", "must be below"),
        (lambda d: d["state_variables"][2].update(canonical_unit="g/L"), "state_variables[2]", "canonical_unit"),
        (lambda d: d["interventions"][0].update(affects=["blood_volume"]), "(top level)", "not state variables"),
        (lambda d: d["state_variables"][0].update(concept_ids=[-5]), "state_variables[0].concept_ids", "positive"),
        (lambda d: d["cohort"].update(anchor="visit", visit_concept_ids=[]), "cohort", "visit_concept_ids"),
        (lambda d: d.update(name="icu; DROP TABLE person;--"), "name", "should match pattern"),
        (lambda d: d["interventions"][1].update(dose_units={"U": -1}), "interventions[1]", "positive"),
        (lambda d: d.update(unexpected_key=1), "unexpected_key", "Extra inputs"),
        (lambda d: d["fairness"].update(age_bands=[65, 18]), "fairness.age_bands", "strictly increasing"),
    ],
)
def test_invalid_specs_name_field_value_and_fix(mutate, field: str, fragment: str) -> None:
    data = _icu()
    mutate(data)
    with pytest.raises(SpecError) as err:
        spec_from_dict(data, source="test.yaml")
    text = str(err.value)
    assert f"field '{field}'" in text, text
    assert fragment in text, text
    assert "Fix:" in text


def test_hostile_strings_are_rejected_before_sql() -> None:
    data = _icu()
    data["state_variables"][0]["name"] = "hr' OR '1'='1"
    with pytest.raises(SpecError, match="state_variables\\[0\\].name"):
        spec_from_dict(data)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "binary.yaml")
