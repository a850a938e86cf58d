"""Data quality: DQD-style conformance / completeness / plausibility checks of a site's OMOP
database, restricted to what a twin spec reads, with suppressed counts (``fedtwin site check``)."""

from fedtwin.quality.checks import CHECKS, CheckDef, CheckResult
from fedtwin.quality.report import QualityReport, render_report
from fedtwin.quality.runner import REQUIRED_COLUMNS, quality_report, required_tables, run_quality_checks, validate_structure

__all__ = [
    "CHECKS",
    "CheckDef",
    "CheckResult",
    "QualityReport",
    "REQUIRED_COLUMNS",
    "quality_report",
    "render_report",
    "required_tables",
    "run_quality_checks",
    "validate_structure",
]
