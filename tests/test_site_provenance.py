"""The site's half of provenance, on a real site (consortium keys, synthetic OMOP database, DP round).

``run_round`` signs a manifest that verifies with the site's key and says nothing finer than the
coarse data source; the site keeps it in its own log; a coordinator record of that round is
appended only if the coordinator signed it and it holds the site's manifest unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import synthetic_site_databases

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    from coordinator.consortium import init_consortium
    from fedtwin.federation.config import load_site_config

    work = tmp_path_factory.mktemp("siteprov")
    root = work / "local"
    init_consortium(root, sites=1, spec=SPEC, secagg={"enabled": False}, min_sites=1)
    synthetic_site_databases(root, work, 1, patients=120)  # also approves the study at the site
    path = root / "sites" / "site_1.toml"
    return root, path, load_site_config(path)


def _settings(rnd: int, previous: str = ""):
    from fedtwin.code_version import code_version
    from fedtwin.spec import load_spec, spec_hash
    from site_agent.task import RoundSettings

    return RoundSettings(
        server_round=rnd, rounds=2, kind="train", training_id="training-prov", spec_hash=spec_hash(load_spec(SPEC)),
        epsilon=3.0, local_epochs=1.0, batch_size=32, max_grad_norm=1.0, lr=3e-3, proximal_mu=0.0, secagg=False,
        evaluate=False, clipping_range=8.0, quantization_range=2**22, max_weight=1000.0, count_step=10,
        study_id="prov-study", code_version=code_version(), previous_record=previous,
    )


def test_a_round_signs_a_coarse_manifest_and_the_site_logs_the_coordinators_record(site) -> None:
    import numpy as np

    from fedtwin.provenance import KeyRing, ProvenanceLog, RoundRecord, SiteManifest, load_signing_key, parameters_digest
    from fedtwin.spec import load_spec
    from fedtwin.twin import TwinModel, get_parameters
    from site_agent.provenance import site_log_path
    from site_agent.task import run_round

    root, path, cfg = site
    start = [np.asarray(a, dtype=np.float32) for a in get_parameters(TwinModel(load_spec(SPEC)))]
    res = run_round(path, start, _settings(1))
    m = SiteManifest.from_json(res.manifest_json)
    ring = KeyRing.from_dir(root / "keys" / "signing")
    m.verify(ring)
    assert (m.site, m.round, m.study_id) == ("site_1", 1, "prov-study")
    assert m.start_parameters_hash == parameters_digest(start)
    assert m.dp is not None and m.dp.steps > 0 and 0 < m.epsilon_spent <= 3.0 + 0.02
    src = m.data_source
    assert src is not None and src.cdm_version == "5.4"
    # coarse by construction: a count rounded to the count step, months not days
    assert isinstance(src.n_patients, int) and src.n_patients % 10 == 0
    assert len(src.period_start) == 7 and src.period_start <= src.period_end
    log = ProvenanceLog.open(site_log_path(cfg))
    assert [x.digest() for x in log.manifests()] == [m.digest()]
    assert site_log_path(cfg).name == "site_1.provenance-log.jsonl"

    # the coordinator's signed record of round 1, handed over with round 2: checked, then logged
    coordinator = load_signing_key(root / "keys" / "signing" / "coordinator.ed25519.pem")
    record = RoundRecord.build(
        study_id="prov-study", round=1, spec_hash=m.spec_hash, start_parameters_hash=m.start_parameters_hash,
        aggregate_hash=parameters_digest(res.parameters), manifests=[m], metrics={"sites": 1.0}, secagg={"enabled": False},
        previous=None,
    ).sign(coordinator)
    res2 = run_round(path, res.parameters, _settings(2, record.to_json()))
    log = ProvenanceLog.open(site_log_path(cfg))
    assert [r.record_hash() for r in log.round_records()] == [record.record_hash()]
    assert [x.round for x in log.manifests()] == [1, 2]
    assert SiteManifest.from_json(res2.manifest_json).start_parameters_hash == parameters_digest(res.parameters)


def test_the_site_refuses_a_record_that_alters_its_manifest_or_is_not_the_coordinators(site) -> None:
    from fedtwin.errors import FedTwinError
    from fedtwin.provenance import ProvenanceLog, RoundRecord, SiteManifest, load_signing_key
    from site_agent.provenance import keep_in_log, site_log_path

    root, _, cfg = site
    log = ProvenanceLog.open(site_log_path(cfg))
    mine = log.manifests()[0]
    before = site_log_path(cfg).read_bytes()
    keys = root / "keys" / "signing"
    # the coordinator signs a record in which the site's manifest claims a smaller epsilon
    forged = SiteManifest.from_dict({**mine.to_dict(), "epsilon_spent": mine.epsilon_spent / 2})
    bad = RoundRecord.build(
        study_id=mine.study_id, round=1, spec_hash=mine.spec_hash, start_parameters_hash=mine.start_parameters_hash,
        aggregate_hash="0" * 64, manifests=[forged], metrics={}, secagg={}, previous=None,
    ).sign(load_signing_key(keys / "coordinator.ed25519.pem"))
    with pytest.raises(FedTwinError, match="holds a manifest of site_1 that this site never signed"):
        keep_in_log(cfg, mine, bad.to_json())
    # a record signed by a site's key, not the coordinator's
    by_site = dataclasses.replace(bad, manifests=(mine,)).sign(load_signing_key(keys / "site_1.ed25519.pem"))
    with pytest.raises(FedTwinError, match="not signed by the coordinator's key"):
        keep_in_log(cfg, mine, by_site.to_json())
    assert site_log_path(cfg).read_bytes() == before  # nothing appended
    assert len(before.decode().splitlines()) == 3  # round 1 manifest, the record of round 1, round 2 manifest


def test_data_source_is_suppressed_below_the_threshold(site) -> None:
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop.database import open_database
    from fedtwin.provenance import DataSource
    from fedtwin.provenance.errors import FieldError
    from fedtwin.spec import load_spec
    from site_agent.provenance import data_source

    _, _, cfg = site
    db = open_database(cfg.data.database)
    cohort = Extractor(db, load_spec(SPEC)).extract()
    src = data_source(cohort, db, threshold=cohort.n_patients + 1, count_step=10)
    assert src.n_patients == f"<{cohort.n_patients + 1}" and src.period_start is None and src.period_end is None
    for bad in ({"period_start": "2019-01-15"}, {"n_patients": "12"}, {"n_patients": -1}):
        with pytest.raises(FieldError):
            DataSource(**{"cdm_version": "5.4", "period_start": "2019-01", "period_end": "2020-01", "n_patients": 10, **bad})


def test_the_quality_report_hash_is_recomputed_only_when_the_database_file_changes(site) -> None:
    import json
    import os

    from fedtwin.omop.database import open_database
    from fedtwin.quality.runner import run_quality_checks
    from fedtwin.spec import load_spec
    from site_agent.provenance import quality_verdict

    def quality_report_hash(*args):  # noqa: ANN002, ANN202
        return quality_verdict(*args).report_hash

    _, _, cfg = site
    spec = load_spec(SPEC)
    db = open_database(cfg.data.database)
    real = run_quality_checks(db, spec, 10).report_hash
    assert quality_report_hash(cfg, db, spec, 10) == real
    cache = Path(cfg.privacy.ledger).with_name("site_1.quality-cache.json")
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({**saved, "report_hash": "f" * 64}))  # prove the cached value is what is used
    assert quality_report_hash(cfg, db, spec, 10) == "f" * 64
    st = os.stat(cfg.data.database)
    os.utime(cfg.data.database, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed
    assert quality_report_hash(cfg, db, spec, 10) == real
    assert quality_report_hash(cfg, db, spec, 11) == run_quality_checks(db, spec, 11).report_hash  # another threshold


def test_a_database_failing_a_blocking_quality_check_is_refused_before_any_training(site, tmp_path: Path) -> None:
    import shutil
    import sqlite3
    import tomllib

    import numpy as np
    import tomli_w

    from fedtwin.federation.config import load_site_config
    from fedtwin.omop.database import open_database
    from fedtwin.privacy.ledger import PrivacyLedger, dataset_id_for_database
    from fedtwin.spec import load_spec
    from fedtwin.twin import TwinModel, get_parameters
    from site_agent.task import SiteRefusal, run_round

    root, path, cfg = site
    bad_db = tmp_path / "negative-doses.sqlite"
    shutil.copyfile(cfg.data.database, bad_db)
    with sqlite3.connect(bad_db) as con:  # an ETL that writes every dose with the wrong sign
        con.execute("UPDATE drug_exposure SET quantity = -quantity WHERE quantity > 0")
    data = tomllib.loads(path.read_text())
    data["data"]["database"] = str(bad_db)
    bad_cfg = path.with_name("site_1-bad-doses.toml")
    bad_cfg.write_text(tomli_w.dumps(data))
    try:
        start = [np.asarray(a, dtype=np.float32) for a in get_parameters(TwinModel(load_spec(SPEC)))]
        with pytest.raises(SiteRefusal) as refusal:
            run_round(bad_cfg, start, _settings(1))
        message = str(refusal.value)
        assert "fails blocking data-quality checks" in message and "drug_quantity_not_negative.insulin" in message
        assert "fedtwin site check --db DATABASE" in message and str(bad_db) not in message  # no database location
        site_cfg = load_site_config(bad_cfg)
        db = open_database(site_cfg.data.database, site_cfg.data.cdm_schema)
        if Path(site_cfg.privacy.ledger).exists():  # the refusal spent nothing (no budget was even set)
            with PrivacyLedger.open(site_cfg.privacy.ledger, read_only=True) as ledger:
                assert dataset_id_for_database(db.url, db.cdm_schema) not in ledger.datasets()
        run_round(path, start, _settings(1))  # the same site on its clean database trains
        with PrivacyLedger.open(site_cfg.privacy.ledger, read_only=True) as ledger:
            assert dataset_id_for_database(db.url, db.cdm_schema) not in ledger.datasets()
            assert len(ledger.datasets()) >= 1
    finally:
        bad_cfg.unlink()
