"""The append-only provenance log a site keeps: JSON lines, each chained to the line before.

A site appends every round record it receives (and its own manifests), so it can later prove what
it took part in, even if the coordinator's copy is lost or disputed. Each line is the canonical
JSON ``{"seq": n, "prev": <sha256 of line n-1, or null>, "kind": ..., "entry": {...}}``; a line's
hash is sha256 of its bytes (without the newline). Opening the log re-reads and checks every
line; appending only ever adds bytes at the end (``O_APPEND``, under an exclusive ``flock``,
fsync'd), never rewrites.

What the line chain catches: any edited, inserted, deleted or reordered line before the last one,
a line that is no longer canonical, and a torn last line (no final newline). What it cannot catch
alone: the *last* lines removed cleanly, or the last line replaced. Entries that are signed records
still fail their own signature checks, and a head hash kept elsewhere (``expected_head``) closes the
gap for the rest.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtwin.provenance.canonical import canonical_json, sha256_hex
from fedtwin.provenance.errors import LogError, ProvenanceError
from fedtwin.provenance.manifest import SiteManifest
from fedtwin.provenance.record import RoundRecord

KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
ROUND_RECORD = "round-record"
SITE_MANIFEST = "site-manifest"
_FIX_TAMPER = (
    "the log was altered: keep it read-only and restore it from a backup; "
    "do not repair it by hand (a repaired log proves nothing)"
)


@dataclass(frozen=True)
class LogEntry:
    """One line of the log: its number (1-based), the hash it links to, its kind, content and own hash."""

    seq: int
    prev: str | None
    kind: str
    entry: dict[str, Any]
    line_hash: str


class ProvenanceLog:
    """An append-only JSON-lines log; use :meth:`open` (it verifies), then :meth:`append`."""

    def __init__(self, path: Path, entries: list[LogEntry], size: int) -> None:
        self.path = path
        self._entries = entries
        self._size = size

    # -------------------------------------------------------------------------------- reading

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, expected_head: str | None = None) -> ProvenanceLog:
        """Read and verify the log at ``path`` (an empty log if it does not exist and ``create``).

        Raises :class:`LogError` naming the first bad line: the chain breaks there, so nothing
        after it can be trusted either. ``expected_head``: the hash the last line must have (kept
        elsewhere, e.g. in the last round record), which also catches lines removed from the end.
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            if not create:
                raise LogError(f"provenance log {p} does not exist", "give the path of the site's provenance log") from None
            data = b""
        except OSError as exc:
            raise LogError(f"provenance log {p} cannot be read: {exc.strerror}", "check the path and its permissions") from None
        entries = cls._verify(p, data)
        head = entries[-1].line_hash if entries else None
        if expected_head is not None and head != expected_head:
            raise LogError(
                f"{p}: the last line (line {len(entries)}) has hash {head}, expected {expected_head}: "
                "lines were removed from or added to the end of the log",
                _FIX_TAMPER,
            )
        return cls(p, entries, len(data))

    @staticmethod
    def _verify(p: Path, data: bytes) -> list[LogEntry]:
        entries: list[LogEntry] = []
        if not data:
            return entries
        lines = data.split(b"\n")
        if lines[-1] != b"":
            raise LogError(
                f"{p}: line {len(lines)} is truncated (the file does not end with a newline): a write was cut short or the file was cut",
                "restore the log from a backup; if the site crashed while appending, that line was never acknowledged: "
                "keep a copy of the file, then remove the incomplete last line",
            )
        prev: str | None = None
        for n, raw in enumerate(lines[:-1], start=1):
            def bad(why: str, n: int = n) -> LogError:
                return LogError(f"{p}: line {n} {why}", _FIX_TAMPER)

            try:
                text = raw.decode("utf-8")
                obj = json.loads(text)
            except (UnicodeDecodeError, ValueError):
                raise bad("is not valid JSON (damaged or edited)") from None
            if not isinstance(obj, dict) or set(obj) != {"seq", "prev", "kind", "entry"}:
                raise bad("is not a log line (expected the fields seq, prev, kind, entry)")
            try:
                canonical = canonical_json(obj)
            except ProvenanceError:
                canonical = None
            if canonical != text:
                raise bad("is not in canonical form: it was edited after it was written")
            if obj["seq"] != n:
                raise bad(f"says it is line {obj['seq']!r}: lines were removed, inserted or reordered before it")
            if obj["prev"] != prev:
                raise bad(f"links to {obj['prev']!r} but line {n - 1} has hash {prev!r}: line {n - 1} was altered, removed or reordered" if n > 1
                          else f"links to {obj['prev']!r} but the first line links to nothing: lines were removed from the start")
            if not isinstance(obj["kind"], str) or not KIND_RE.match(obj["kind"]) or not isinstance(obj["entry"], dict):
                raise bad("has an invalid kind or entry")
            prev = sha256_hex(raw)
            entries.append(LogEntry(n, obj["prev"], obj["kind"], obj["entry"], prev))
        return entries

    @property
    def entries(self) -> list[LogEntry]:
        return list(self._entries)

    @property
    def head(self) -> str | None:
        """Hash of the last line (None for an empty log)."""
        return self._entries[-1].line_hash if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def round_records(self) -> list[RoundRecord]:
        """The round records in the log, in order (parse errors name the line)."""
        out = []
        for e in self._entries:
            if e.kind == ROUND_RECORD:
                try:
                    out.append(RoundRecord.from_dict(e.entry))
                except ProvenanceError as exc:
                    raise LogError(f"{self.path}: line {e.seq} holds an invalid round record: {exc.problem}", _FIX_TAMPER) from None
        return out

    def manifests(self) -> list[SiteManifest]:
        """The site's own manifests in the log, in order."""
        return [SiteManifest.from_dict(e.entry) for e in self._entries if e.kind == SITE_MANIFEST]

    # -------------------------------------------------------------------------------- writing

    def append(self, kind: str, entry: Mapping[str, Any]) -> LogEntry:
        """Append one line; refuses if the file changed since it was opened (reopen to re-verify)."""
        if not KIND_RE.match(kind):
            raise ProvenanceError(f"log entry kind {kind!r} is not a short lowercase word", "use e.g. 'round-record'")
        seq = len(self._entries) + 1
        prev = self.head
        line = canonical_json({"seq": seq, "prev": prev, "kind": kind, "entry": dict(entry)}).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size != self._size:
                raise LogError(
                    f"{self.path} changed since it was opened ({self._size} bytes then, {size} now): "
                    "another writer appended to it, or it was altered",
                    "open it again (ProvenanceLog.open verifies it) and append then; keep one writer per log",
                )
            os.write(fd, line + b"\n")
            os.fsync(fd)
            self._size = size + len(line) + 1
        finally:
            os.close(fd)  # closing releases the lock
        e = LogEntry(seq, prev, kind, json.loads(line)["entry"], sha256_hex(line))
        self._entries.append(e)
        return e

    def append_record(self, record: RoundRecord) -> LogEntry:
        """Append a (signed) round record."""
        return self.append(ROUND_RECORD, record.to_dict())

    def append_manifest(self, manifest: SiteManifest) -> LogEntry:
        """Append the site's own (signed) manifest."""
        return self.append(SITE_MANIFEST, manifest.to_dict())
