"""Extraction throughput against a raw read of the same measurement rows, same driver, one run.

Run: ``.venv/bin/python bench/extract.py [--patients 4000] [--repeats 3] [--pg-url URL]``.
Builds one synthetic hospital on SQLite and (if reachable) on PostgreSQL, then times:
- raw: ``SELECT`` of the spec's measurement rows (person, concept, datetime, value, unit), every
  row fetched through the driver's cursor: the floor any reader of these rows pays;
- extraction: :class:`fedtwin.extract.Extractor` for the same spec (cohort, SQL binning and unit
  conversion, drugs, outcomes, numpy assembly).
Reports measurement rows/s for both and the ratio extraction/raw (target <= 2). The last line is
the headline: ``ratio X.XX`` (the worst backend).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from fedtwin.extract.extractor import Extractor  # noqa: E402
from fedtwin.omop import cdm_table, open_database  # noqa: E402
from fedtwin.spec import load_spec  # noqa: E402
from fedtwin.synth import SynthRequest, synthesize  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"


def _raw_read(url: str, concept_ids: list[int]) -> tuple[int, float]:
    db = open_database(url)
    m = cdm_table("measurement")
    q = select(m.c.person_id, m.c.measurement_concept_id, m.c.measurement_datetime, m.c.value_as_number, m.c.unit_concept_id).where(
        m.c.measurement_concept_id.in_(concept_ids)
    )
    t0 = time.perf_counter()
    with db.connect() as conn:
        n = 0
        for part in conn.execution_options(stream_results=True, yield_per=50_000).execute(q).partitions():
            n += len(part)
    dt = time.perf_counter() - t0
    db.dispose()
    return n, dt


def _extract(url: str) -> tuple[int, float]:
    db = open_database(url)
    t0 = time.perf_counter()
    t = Extractor(db, load_spec(SPEC)).extract()
    dt = time.perf_counter() - t0
    db.dispose()
    return t.n_patients, dt


def bench(label: str, url: str, repeats: int) -> float:
    spec = load_spec(SPEC)
    ids = [c for v in spec.state_variables for c in v.concept_ids]
    _raw_read(url, ids), _extract(url)  # warm caches for both, so neither pays cold I/O alone
    raw, ext = [], []
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        rows, dt = _raw_read(url, ids)
        raw.append(dt)
        patients, dt = _extract(url)
        ext.append(dt)
    r, e = statistics.median(raw), statistics.median(ext)
    print(f"{label:10s} rows {rows:>9,}  patients {patients:>6,}  raw {r:6.2f} s ({rows / r:>10,.0f} rows/s)  "
          f"extraction {e:6.2f} s ({rows / e:>10,.0f} rows/s)  ratio {e / r:.2f}")
    return e / r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedtwin-bench-extract-"))
    ratios = []
    pg_db = None
    try:
        synthesize(SynthRequest(sites=1, patients=args.patients, seed=11, out=tmp / "sqlite", sizes=[args.patients], workers=1))
        ratios.append(bench("sqlite", str(tmp / "sqlite" / "site_1.db"), args.repeats))
        try:
            admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text("SELECT 1"))
            pg_db = f"fedtwin_bench_{uuid.uuid4().hex[:8]}"
            template = make_url(args.pg_url).set(database=pg_db).render_as_string(hide_password=False)
            synthesize(SynthRequest(sites=1, patients=args.patients, seed=11, out=tmp / "pg", sizes=[args.patients],
                                    db_url_template=template, workers=1))
            ratios.append(bench("postgresql", template, args.repeats))
        except Exception as exc:  # noqa: BLE001 - the benchmark reports and goes on without PostgreSQL
            print(f"postgresql skipped: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if pg_db:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
    print(f"ratio {max(ratios):.2f}")


if __name__ == "__main__":
    main()
