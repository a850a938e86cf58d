"""The site's half of provenance: sign a manifest each round, keep what it took part in.

Each round the site signs a :class:`~fedtwin.provenance.SiteManifest` (study, round, spec hash,
code version, a fingerprint of its *suppressed* cohort summary, the hash of its data-quality
report, its DP parameters and composed epsilon, the digest of the global model it received, and a
coarse :class:`~fedtwin.provenance.DataSource`) and sends it as a plaintext fit metric. It appends
the manifest to its own append-only :class:`~fedtwin.provenance.ProvenanceLog`, and, when the
coordinator hands it the previous round's signed record (next round's fit config), checks that
record's coordinator signature and that it holds the site's own manifest unchanged before
appending it too: that log is how a site later proves what it took part in, without trusting
the coordinator's copy.
"""

from __future__ import annotations

from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_SUFFIX = ".provenance-log.jsonl"


def site_log_path(site) -> Path:  # noqa: ANN001 - a SiteConfig
    """``[audit] provenance_log``, else ``<site>.provenance-log.jsonl`` beside the site's privacy ledger."""
    if site.audit.provenance_log:
        return Path(site.audit.provenance_log)
    return Path(site.privacy.ledger).with_name(site.site.name + LOG_SUFFIX)


def cdm_version(db) -> str:  # noqa: ANN001 - an OmopDatabase
    """``cdm_source.cdm_version`` as ``5.4``-style text, ``unknown`` when the table or row is absent."""
    import re

    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    table = f"{db.cdm_schema}.cdm_source" if db.cdm_schema else "cdm_source"
    try:
        with db.engine.connect() as conn:
            row = conn.execute(text(f"SELECT cdm_version FROM {table}")).first()  # noqa: S608 - schema from the site's config
    except SQLAlchemyError:
        return "unknown"
    m = re.search(r"(\d+)\.(\d+)", str(row[0])) if row and row[0] else None
    return f"{m.group(1)}.{m.group(2)}" if m else "unknown"


def data_source(cohort, db, threshold: int, count_step: int):  # noqa: ANN001
    """The coarse data source of a cohort: months of the first and last index date, a rounded count."""
    import numpy as np

    from fedtwin.provenance import DataSource

    n = int(cohort.n_patients)
    if n < threshold:
        return DataSource(cdm_version=cdm_version(db), period_start=None, period_end=None, n_patients=f"<{threshold}")
    epochs = np.asarray(cohort.index_epoch, dtype=float)
    epochs = epochs[np.isfinite(epochs)]

    def month(t: float) -> str:
        return datetime.fromtimestamp(float(t), tz=timezone.utc).strftime("%Y-%m")

    start, end = (month(epochs.min()), month(epochs.max())) if epochs.size else (None, None)
    return DataSource(cdm_version=cdm_version(db), period_start=start, period_end=end,
                      n_patients=max(count_step, (n // count_step) * count_step))


@dataclass(frozen=True)
class QualityVerdict:
    """What a site's data-quality gate said about its database, as a round needs it.

    ``blocking_failures`` are check keys only (``measurement_value_plausible.map``): the counts
    behind them stay in the suppressed report that ``fedtwin site check`` prints at the site.
    """

    report_hash: str
    blocking_failures: tuple[str, ...]


def quality_verdict(site, db, spec, threshold: int) -> QualityVerdict:  # noqa: ANN001
    """The site's data-quality verdict on the spec, recomputed only when the data changed.

    A round needs it twice: before any training (a database that fails a blocking check must not
    train: the site refuses and spends nothing) and in the signed manifest (the report's hash).
    Running every check takes seconds per round; for an SQLite database the verdict is kept in
    ``<site>.quality-cache.json`` beside the ledger, keyed by the spec hash, the threshold and the
    file's size and modification time, so an unchanged file is not checked again. A server database
    (PostgreSQL) gives no such cheap change signal: it is checked every round.
    """
    import json
    import os

    from fedtwin.atomic_file import atomic_write_text
    from fedtwin.quality.runner import run_quality_checks
    from fedtwin.spec import spec_hash

    key = None
    if db.url.startswith("sqlite:///"):
        path = Path(db.url[len("sqlite:///"):])
        if path.is_file():
            st = path.stat()
            key = f"{spec_hash(spec)}:{threshold}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache = Path(site.privacy.ledger).with_name(f"{site.site.name}.quality-cache.json")
    if key is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return QualityVerdict(str(saved["report_hash"]), tuple(str(k) for k in saved["blocking_failures"]))
        except (ValueError, KeyError, TypeError, OSError):
            pass  # an unreadable or older cache is recomputed
    report = run_quality_checks(db, spec, threshold)
    verdict = QualityVerdict(report.report_hash, tuple(r.key for r in report.blocking_failures))
    if key is not None:
        atomic_write_text(cache, json.dumps({"key": key, "report_hash": verdict.report_hash,
                                             "blocking_failures": list(verdict.blocking_failures)}) + os.linesep)
    return verdict


def sign_manifest(
    site,  # noqa: ANN001 - a SiteConfig
    *,
    study_id: str,
    server_round: int,
    spec_hash: str,
    summary: dict[str, Any],
    quality_report_hash: str,
    dp_plan: Any | None,
    epsilon_spent: float,
    received: list,
    source,  # noqa: ANN001 - a DataSource
):
    """The site's signed manifest for this round (see the module docstring)."""
    from fedtwin.code_version import code_version
    from fedtwin.provenance import DPParameters, SiteManifest, cohort_fingerprint, load_signing_key, parameters_digest

    manifest = SiteManifest(
        study_id=study_id,
        round=server_round,
        site=site.site.name,
        spec_hash=spec_hash,
        code_version=code_version(),
        cohort_fingerprint=cohort_fingerprint(summary),
        quality_report_hash=quality_report_hash,
        dp=None if dp_plan is None else DPParameters.from_settings(dp_plan),
        epsilon_spent=float(epsilon_spent),
        start_parameters_hash=parameters_digest(received),
        data_source=source,
    )
    return manifest.sign(load_signing_key(site.keys.signing_private_key))


def keep_in_log(site, manifest, previous_record_json: str | None) -> None:  # noqa: ANN001
    """Append the coordinator's previous record (after checking it) and this round's manifest."""
    from fedtwin.provenance import ProvenanceLog

    log = ProvenanceLog.open(site_log_path(site))
    if previous_record_json:
        record = checked_record(site, previous_record_json, log)
        if record is not None:
            log.append_record(record)
    log.append_manifest(manifest)


def checked_record(site, text: str, log):  # noqa: ANN001
    """The coordinator's record of an earlier round, if it is signed by the coordinator and holds
    this site's manifest exactly as the site logged it; None if it is already in the log.

    The site cannot check other sites' manifests (it does not hold their keys); it checks what is
    its own business: the coordinator's signature, and that its own statement was not altered.
    """
    from fedtwin.errors import FedTwinError
    from fedtwin.provenance import RoundRecord, load_verify_key, signature_valid

    record = RoundRecord.from_json(text)
    if any(r.record_hash() == record.record_hash() for r in log.round_records()):
        return None
    key = load_verify_key(site.trust.coordinator_signing_public_key, site.trust.coordinator_name)
    if record.signature is None or record.key_id != key.key_id or not signature_valid(key, record.payload(), record.signature):
        raise FedTwinError(
            f"the coordinator's record of round {record.round} is not signed by the coordinator's key {key.key_id}",
            "the site refuses to go on: check trust.coordinator_signing_public_key, or ask the coordinator why",
        )
    mine = [m for m in record.manifests if m.site == site.site.name]
    logged = {(m.round, m.digest()) for m in log.manifests() if m.site == site.site.name}
    for m in mine:
        if (m.round, m.digest()) not in logged:
            raise FedTwinError(
                f"the coordinator's record of round {record.round} holds a manifest of {site.site.name} that this site never signed",
                "the site refuses to go on: the record was altered; keep the site's provenance log as evidence",
            )
    return record
