"""The data-quality report: suppressed JSON, its stable hash, the rich table, the blocking error.

Exact counts live only in :class:`~fedtwin.quality.checks.CheckResult` objects in memory. Every
rendering here goes through :func:`fedtwin.privacy.suppression.suppress_count`: a count below the
threshold shows as ``<10``; a denominator hidden by complementary suppression as ``suppressed``;
a percentage only when both of its counts are shown. No URL (so no password) and no
patient-level row is ever written: the database is described by its dialect and schemas.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedtwin.errors import DataQualityError
from fedtwin.privacy.suppression import is_suppressed, suppress_count
from fedtwin.quality.checks import CheckResult

REPORT_FORMAT = 1
# Fields left out of the hash: when the report was made, and the hash itself.
_UNHASHED = ("generated_at", "report_hash")


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass
class QualityReport:
    """The outcome of :func:`fedtwin.quality.run_quality_checks`."""

    spec_name: str
    spec_version: int
    spec_hash: str
    dialect: str
    cdm_schema: str | None
    vocabulary_schema: str | None
    display_url: str
    tables: list[str]
    suppression_threshold: int
    anchor: str
    min_patients: int
    cohort_persons: int
    results: list[CheckResult] = field(default_factory=list)
    generated_at: str = ""

    # --- outcome ---------------------------------------------------------------------------
    @property
    def blocking_failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "FAIL"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "WARN"]

    @property
    def passed(self) -> bool:
        """True when no blocking check failed (warnings allowed)."""
        return not self.blocking_failures

    @property
    def status(self) -> str:
        return "FAIL" if self.blocking_failures else ("WARN" if self.warnings else "PASS")

    def result(self, key: str) -> CheckResult:
        for r in self.results:
            if r.key == key:
                return r
        raise KeyError(f"no check {key!r}; checks are {[r.key for r in self.results]}")

    # --- suppressed views ------------------------------------------------------------------
    def shown_failing(self, r: CheckResult) -> int | str | None:
        return None if r.failing is None else suppress_count(r.failing, self.suppression_threshold)

    def shown_checked(self, r: CheckResult) -> int | str:
        if r.hide_checked:
            return "suppressed"
        return suppress_count(r.checked, self.suppression_threshold)

    def shown_pct(self, r: CheckResult) -> float | str | None:
        """The failing percentage, only when both counts are shown."""
        if r.failing is None:
            return None
        failing, checked = self.shown_failing(r), self.shown_checked(r)
        if is_suppressed(failing) or is_suppressed(checked):
            return "suppressed"
        return round(100.0 * r.failing / r.checked, 2)

    def check_dict(self, r: CheckResult) -> dict[str, Any]:
        return {
            "key": r.key,
            "check": r.check.id,
            "subject": r.subject,
            "category": r.check.category,
            "table": r.table,
            "description": r.description,
            "counts": r.check.counts,
            "failing": self.shown_failing(r),
            "checked": self.shown_checked(r),
            "failing_pct": self.shown_pct(r),
            "threshold_pct": r.threshold_pct,
            "min_count": r.min_count,
            "blocking": r.blocking,
            "status": r.status,
            "fix": r.fix,
            "details": r.details,
        }

    def _body(self) -> dict[str, Any]:
        return {
            "report": "fedtwin data quality",
            "format": REPORT_FORMAT,
            "generated_at": self.generated_at,
            "spec": {"name": self.spec_name, "version": self.spec_version, "hash": self.spec_hash},
            "database": {
                "dialect": self.dialect,
                "cdm_schema": self.cdm_schema,
                "vocabulary_schema": self.vocabulary_schema,
                "tables": self.tables,
            },
            "suppression_threshold": self.suppression_threshold,
            "cohort": {
                "anchor": self.anchor,
                "persons": suppress_count(self.cohort_persons, self.suppression_threshold),
                "min_patients": self.min_patients,
            },
            "status": self.status,
            "summary": {
                "checks": len(self.results),
                "passed": sum(r.status == "PASS" for r in self.results),
                "warnings": len(self.warnings),
                "failed": len(self.blocking_failures),
            },
            "checks": [self.check_dict(r) for r in self.results],
        }

    @property
    def report_hash(self) -> str:
        """sha256 of the canonical JSON of the suppressed report, without ``generated_at``:
        equal for the same spec, site data, schemas and threshold, whenever it is run."""
        body = {k: v for k, v in self._body().items() if k not in _UNHASHED}
        return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The suppressed report, JSON-ready, with its ``report_hash``."""
        return {**self._body(), "report_hash": self.report_hash}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    # --- the gate --------------------------------------------------------------------------
    def blocking_error(self) -> DataQualityError | None:
        """The error for the failed blocking checks (None if there are none).

        The message names each check, its table and how many rows failed (suppressed), and
        contains no square brackets (the CLI prints errors with rich markup).
        """
        failed = self.blocking_failures
        if not failed:
            return None
        lines = []
        for r in failed:
            if r.min_count is not None:
                lines.append(
                    f"  - {r.key} (table {r.table}): {self.shown_checked(r)} persons qualify, "
                    f"the spec needs at least {r.min_count}"
                )
                continue
            pct = self.shown_pct(r)
            share = f"{pct}%, " if isinstance(pct, float) else ""
            lines.append(
                f"  - {r.key} (table {r.table}): {self.shown_failing(r)} of {self.shown_checked(r)} "
                f"{r.check.counts} fail ({share}threshold {r.threshold_pct:g}%): {r.description}"
            )
        n = len(failed)
        problem = (
            f"data-quality gate failed for spec {self.spec_name!r} on this {self.dialect} database: "
            f"{n} blocking check{'s' if n != 1 else ''} failed\n" + "\n".join(lines)
        )
        fix = "\n".join(f"  - {r.key}: {r.fix}" for r in failed)
        return DataQualityError(problem, "\n" + fix + "\n  then run `fedtwin site check` again")

    def raise_for_blocking(self) -> None:
        err = self.blocking_error()
        if err is not None:
            raise err


_STATUS_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


def _cell(value: Any) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(str(value))


def render_report(report: QualityReport, console: Console) -> None:
    """Print the report as a rich table (text cells only: no data reaches rich markup)."""
    t = report.suppression_threshold
    head = Text.assemble(
        ("Data quality ", "bold"),
        f"of {report.display_url} ({report.dialect}) for spec ",
        (report.spec_name, "bold"),
        f" v{report.spec_version} (sha256 {report.spec_hash[:12]}); cohort ",
        str(suppress_count(report.cohort_persons, t)),
        f" persons (anchor {report.anchor}, at least {report.min_patients} needed)",
    )
    console.print(head)
    table = Table(show_lines=False, header_style="bold")
    table.add_column("status", no_wrap=True)
    longest = max((len(r.key) for r in report.results), default=10)
    table.add_column("check", no_wrap=True, min_width=longest)
    table.add_column("category")
    table.add_column("table", no_wrap=True)
    table.add_column("failing", justify="right", no_wrap=True)
    table.add_column("checked", justify="right", no_wrap=True)
    table.add_column("% failing", justify="right", no_wrap=True)
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column("level", no_wrap=True)
    order = {"conformance": 0, "completeness": 1, "plausibility": 2}
    rows = sorted(report.results, key=lambda r: order[r.check.category])
    last = None
    for r in rows:
        if last is not None and r.check.category != last:
            table.add_section()
        last = r.check.category
        pct = report.shown_pct(r)
        if r.min_count is not None:
            limit = f">= {r.min_count}"
        else:
            limit = f"<= {r.threshold_pct:g}%"
        table.add_row(
            Text(r.status, style=_STATUS_STYLE[r.status]),
            Text(r.key),
            Text(r.check.category),
            Text(r.table),
            _cell(report.shown_failing(r)),
            Text(f"{report.shown_checked(r)} {r.check.counts}"),
            _cell(f"{pct:.2f}" if isinstance(pct, float) else ("-" if pct is None else "hidden")),
            Text(limit),
            Text("blocking" if r.blocking else "warning"),
        )
    console.print(table)
    flagged = [r for r in report.results if r.status != "PASS"]
    for r in flagged:
        line = Text.assemble((f"{r.status} ", _STATUS_STYLE[r.status]), (r.key, "bold"), f": {r.description}.")
        console.print(line)
        console.print(Text(f"    fix: {r.fix}"))
        for k, v in r.details.items():
            if k.startswith("unknown_") and v:
                console.print(Text(f"    {k.replace('_', ' ')} seen: {_format_detail(v)}"))
            elif k.startswith("rows_") and r.failing:
                console.print(Text(f"    {k.replace('_', ' ')}: {v}"))
    console.print(
        Text(
            f"Counts below {t} are shown as <{t}; a percentage is shown only when both of its counts are. "
            f"Report sha256 {report.report_hash[:16]}."
        ),
        style="dim",
    )
    verdict = {
        "PASS": ("PASS: every check passed.", "bold green"),
        "WARN": (f"PASS with {len(report.warnings)} warning(s): no blocking check failed.", "bold yellow"),
        "FAIL": (f"FAIL: {len(report.blocking_failures)} blocking check(s) failed; this site cannot train on this spec.", "bold red"),
    }[report.status]
    console.print(Text(verdict[0], style=verdict[1]))


def _format_detail(items: list[dict]) -> str:
    parts = []
    for it in items:
        if "unit_concept_id" in it:
            code = f" ({it['code']})" if it.get("code") else ""
            parts.append(f"{it['unit_concept_id']}{code}: {it['rows']} rows")
        elif "value" in it:
            parts.append(f"{it['value']!r}: {it['rows']} rows")
        else:
            parts.append(str(it))
    return "; ".join(parts)
