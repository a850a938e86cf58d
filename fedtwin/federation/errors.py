"""The consortium's user-facing error (a :class:`fedtwin.errors.FedTwinError`: problem + fix)."""

from __future__ import annotations

from fedtwin.errors import FedTwinError


class ConsortiumError(FedTwinError):
    """A local consortium cannot be created, started, stopped or used as asked."""
