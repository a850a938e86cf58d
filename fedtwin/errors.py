"""One error type for everything a user can get wrong.

Every FedTwin error names the problem and the fix, so the CLI can print it as is and exit
non-zero, without a traceback the user has to decode.
"""

from __future__ import annotations


class FedTwinError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` how to put it right."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f"\nFix: {fix}" if fix else ""))


class DatabaseError(FedTwinError):
    """The OMOP database cannot be reached or is not an OMOP CDM database."""


class SpecError(FedTwinError):
    """A twin spec is malformed or inconsistent."""


class DataQualityError(FedTwinError):
    """A blocking data-quality check failed."""
