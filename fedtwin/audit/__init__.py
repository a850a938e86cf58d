"""The auditor's tools: read a training's evidence back from MLflow and verify it.

- :mod:`fedtwin.audit.evidence`: the run's records, documents, reports and card, as files.
- :mod:`fedtwin.audit.verify`: :func:`verify_run`, every check, each problem named.
"""

from fedtwin.audit.evidence import RunArtifacts, load_run, registered_versions
from fedtwin.audit.verify import AuditReport, CheckResult, verify_run

__all__ = ["AuditReport", "CheckResult", "RunArtifacts", "load_run", "registered_versions", "verify_run"]
