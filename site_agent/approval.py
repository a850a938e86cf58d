"""The site's allow-list: the studies (twin spec hash + FedTwin code version) this site accepts.

A site trains for a study only if the exact pair (sha256 of the study's twin spec, version of the
FedTwin code that will read its data) has been approved locally, by a person, with
``fedtwin site approve --config SITE.toml --spec SPEC``. Anything else is refused before any data
is read (:func:`check_study_approved`). Changing one character of the spec's meaning, or running
other code, needs a new approval.

The file is JSON, meant to be read by people and kept with the site's other records::

    {
      "format": "fedtwin-site-allow-list",
      "version": 1,
      "approvals": [
        {"spec_hash": "<64 hex>", "spec_name": "icu_hemodynamics", "spec_version": 1,
         "spec_file": "/path/approved/from.yaml", "code_version": "0.1.0+g1a2b3c4d5e6f",
         "approved_by": "Dr A. Site (DPO)", "approved_at": "2025-01-31T12:00:00+00:00", "note": "IRB 2025-17"}
      ]
    }

Rules:

* Writes are atomic: a temp file in the same folder, fsync, ``os.replace``, fsync of the folder.
  A reader sees the old file or the new one, never half of one. Writers (approve, revoke) take an
  exclusive ``flock`` on the folder for the read-modify-write, so two concurrent approvals both
  land (nothing extra is left in the folder).
* Fail-closed: a missing file is an empty list (nothing approved); a file that is not a valid
  allow-list is an :class:`ApprovalError` naming the file and the fix, for checks and writes
  alike, and a write never replaces it.
* Where it lives: ``[approval] allow_list`` of the site config, else
  ``<site name>.approvals.json`` beside the privacy ledger
  (:meth:`fedtwin.federation.config.SiteConfig.allow_list_path`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedtwin.errors import FedTwinError

FORMAT = "fedtwin-site-allow-list"
FORMAT_VERSION = 1
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,79}$")  # as fedtwin.provenance.fields.VERSION_RE
MAX_TEXT = 500  # approved_by and note
SHORT = 12  # hex digits of a spec hash shown in messages


class ApprovalError(FedTwinError):
    """The site's allow-list refuses a study, or cannot be read or written as asked."""


def approve_command(code_version: str, config: str | Path | None = None, spec: str | Path | None = None) -> str:
    """The exact command that approves ``spec`` for ``code_version`` at the site of ``config``."""
    return (f"fedtwin site approve --config {config if config is not None else 'SITE.toml'} "
            f"--spec {spec if spec is not None else 'SPEC'} --code-version {code_version}")


# ------------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class Approval:
    """One approved (spec hash, code version) pair and who approved it, when and why."""

    spec_hash: str
    spec_name: str
    spec_version: int
    spec_file: str
    code_version: str
    approved_at: str
    approved_by: str | None = None
    note: str | None = None

    @property
    def short_hash(self) -> str:
        return self.spec_hash[:SHORT]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Approval:
        """Validate one entry; a ValueError names the field and the rule."""
        if not isinstance(data, dict):
            raise ValueError(f"an entry must be a JSON object, got {type(data).__name__}")
        expected = {f for f in cls.__dataclass_fields__}
        required = expected - {"approved_by", "note"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        unknown = sorted(set(data) - expected)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        if not isinstance(data["spec_hash"], str) or not HASH_RE.match(data["spec_hash"]):
            raise ValueError(f"spec_hash = {data['spec_hash']!r}: must be 64 lowercase hex digits (sha256)")
        _check_code_version(data["code_version"], "code_version")
        if not isinstance(data["spec_name"], str) or not data["spec_name"]:
            raise ValueError(f"spec_name = {data['spec_name']!r}: must be a non-empty string")
        if not isinstance(data["spec_version"], int) or isinstance(data["spec_version"], bool):
            raise ValueError(f"spec_version = {data['spec_version']!r}: must be an integer")
        if not isinstance(data["spec_file"], str):
            raise ValueError(f"spec_file = {data['spec_file']!r}: must be a string")
        at = data["approved_at"]
        try:
            if not isinstance(at, str) or datetime.fromisoformat(at).utcoffset() is None:
                raise ValueError
        except ValueError:
            raise ValueError(f"approved_at = {at!r}: must be an ISO 8601 time with its UTC offset") from None
        for key in ("approved_by", "note"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} = {data[key]!r}: must be a string or null")
        return cls(**data)


def _check_code_version(value: Any, what: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.match(value):
        raise ValueError(f"{what} = {value!r}: must be a version string (letters, digits, . + _ -; at most 80 characters)")
    return value


def _free_text(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    value = " ".join(value.split())  # one line: the file and the table stay readable
    if len(value) > MAX_TEXT:
        raise ApprovalError(f"{what} is {len(value)} characters long", f"keep it under {MAX_TEXT} characters")
    return value or None


# --------------------------------------------------------------------------------- allow-list


@dataclass(frozen=True)
class AllowList:
    """The allow-list as read from ``path`` (``exists`` False: no file yet, nothing approved)."""

    path: Path
    approvals: tuple[Approval, ...] = ()
    exists: bool = False

    @classmethod
    def load(cls, path: str | Path) -> AllowList:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return cls(p, (), False)
        except OSError as exc:
            raise ApprovalError(f"the site's allow-list {p} cannot be read: {exc}", "check the path and its permissions") from None
        fix = (f"restore {p} from the site's backup, or correct it by hand (docs/site-approval.md shows the format); "
               "if it cannot be recovered, move it aside and approve again the studies this site accepts "
               "(`fedtwin site approve --config SITE.toml --spec SPEC`)")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApprovalError(f"the site's allow-list {p} is not valid JSON ({exc}): it is corrupt, so no study is accepted", fix) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ApprovalError(f"{p} is not a FedTwin site allow-list (no \"format\": \"{FORMAT}\"), so no study is accepted", fix)
        if data.get("version") != FORMAT_VERSION:
            raise ApprovalError(
                f"{p} is a site allow-list of format version {data.get('version')!r}; this FedTwin reads version {FORMAT_VERSION}",
                "use the FedTwin version that wrote it, or approve again with this one into a new file",
            )
        entries = data.get("approvals")
        if not isinstance(entries, list):
            raise ApprovalError(f"{p}: \"approvals\" must be a list, so no study is accepted", fix)
        approvals = []
        for i, e in enumerate(entries):
            try:
                approvals.append(Approval.from_dict(e))
            except (ValueError, TypeError) as exc:
                raise ApprovalError(f"{p}: approvals[{i}] is invalid: {exc}; so no study is accepted", fix) from None
        return cls(p, tuple(approvals), True)

    def find(self, spec_hash: str, code_version: str) -> Approval | None:
        return next((a for a in self.approvals if a.spec_hash == spec_hash and a.code_version == code_version), None)

    def versions_for(self, spec_hash: str) -> list[str]:
        """The code versions ``spec_hash`` is approved for, in the order approved."""
        return [a.code_version for a in self.approvals if a.spec_hash == spec_hash]

    def to_json(self, approvals: Iterable[Approval]) -> str:
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "approvals": [a.to_dict() for a in approvals]}
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock of the allow-list's folder for a read-modify-write (flock on the folder itself:
    nothing is left beside the file). Readers do not lock: the atomic replace keeps them consistent."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` all at once (:mod:`fedtwin.atomic_file`)."""
    from fedtwin.atomic_file import atomic_write_text

    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------- API


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def record_approval(
    path: str | Path, spec_path: str | Path, code_version: str | None = None,
    approved_by: str | None = None, note: str | None = None,
) -> tuple[Approval, bool]:
    """:func:`approve`, also saying whether the pair was new (False: it was already approved, file unchanged)."""
    from fedtwin.code_version import code_version as running_version
    from fedtwin.errors import SpecError
    from fedtwin.spec import load_spec, spec_hash

    p, sp = Path(path), Path(spec_path)
    version = running_version() if code_version is None else code_version.strip()
    try:
        _check_code_version(version, "--code-version")
    except ValueError as exc:
        raise ApprovalError(str(exc), "give a version such as 0.1.0+g1a2b3c4d5e6f, or leave --code-version out for the running code's") from None
    by, why = _free_text(approved_by, "--by"), _free_text(note, "--note")
    try:
        spec = load_spec(sp)
    except SpecError as exc:
        raise ApprovalError(f"refusing to approve {sp}: nothing was approved: {exc.problem}", exc.fix) from None
    h = spec_hash(spec)
    with _locked(p):
        current = AllowList.load(p)  # a corrupt file raises here: it is never replaced
        existing = current.find(h, version)
        if existing is not None:
            return existing, False
        new = Approval(
            spec_hash=h, spec_name=spec.name, spec_version=spec.version, spec_file=str(sp.resolve()),
            code_version=version, approved_at=_now(), approved_by=by, note=why,
        )
        _write_atomic(p, current.to_json([*current.approvals, new]))
    return new, True


def approve(
    path: str | Path, spec_path: str | Path, code_version: str | None = None,
    approved_by: str | None = None, note: str | None = None,
) -> Approval:
    """Add (spec hash of ``spec_path``, ``code_version``) to the allow-list at ``path``.

    The spec is loaded and validated first (a spec that does not load is refused with the loader's
    message; nothing is written). ``code_version`` defaults to the running code's
    (:func:`fedtwin.code_version.code_version`). Approving a pair already approved changes nothing
    and returns the existing entry.
    """
    return record_approval(path, spec_path, code_version, approved_by, note)[0]


def revoke(path: str | Path, spec_hash: str, code_version: str) -> Approval:
    """Remove the approval of (``spec_hash``, ``code_version``); returns it. ``spec_hash`` may be a unique
    prefix of at least 12 hex digits (as the list shows). Raises :class:`ApprovalError` if absent."""
    p = Path(path)
    want = spec_hash.strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{SHORT},64}}", want):
        raise ApprovalError(f"--spec-hash {spec_hash!r}: give the spec hash ({SHORT} to 64 hex digits)",
                            "`fedtwin site approvals --config SITE.toml` lists them")
    with _locked(p):
        current = AllowList.load(p)
        hits = [a for a in current.approvals if a.spec_hash.startswith(want) and a.code_version == code_version]
        if len({a.spec_hash for a in hits}) > 1:
            raise ApprovalError(f"spec hash prefix {want} matches several approved specs", "give more hex digits (or the full hash)")
        if not hits:
            listed = ", ".join(f"{a.short_hash} @ {a.code_version}" for a in current.approvals) or "none"
            raise ApprovalError(
                f"spec {want[:SHORT]} with code version {code_version} is not approved in {p} (nothing revoked); approved: {listed}",
                "`fedtwin site approvals --config SITE.toml` lists the approvals: give a spec hash and code version from it",
            )
        gone = hits[0]
        _write_atomic(p, current.to_json([a for a in current.approvals if a is not gone]))
    return gone


def check_study_approved(
    path: str | Path, spec_hash: str, code_version: str, site: str, *,
    config_path: str | Path | None = None, spec_path: str | Path | None = None,
) -> Approval:
    """The site's approval of (``spec_hash``, ``code_version``), or :class:`ApprovalError` (fail-closed).

    Call it before any data is read. ``site`` (the site's name), ``config_path`` and ``spec_path``
    only make the message exact (the command to approve names them; placeholders without them).
    An allow-list that cannot be read refuses every study.
    """
    allow = AllowList.load(path)
    h = str(spec_hash).strip().lower()
    hit = allow.find(h, code_version)
    if hit is not None:
        return hit
    short = h[:SHORT] or "(none)"
    command = approve_command(code_version, config_path, spec_path)
    others = allow.versions_for(h)
    if others:
        raise ApprovalError(
            f"site {site} refuses the study: twin spec {short} is approved at this site, but for other FedTwin code "
            f"version(s): {', '.join(others)}; not for code version {code_version} (allow-list {allow.path})",
            f"if the site accepts this code version for this spec, run `{command}`; otherwise run the approved code version",
        )
    state = "" if allow.exists else " (the file does not exist yet: nothing is approved)"
    raise ApprovalError(
        f"site {site} refuses the study: twin spec {short} with FedTwin code version {code_version} is not approved "
        f"at this site: it is not on the allow-list {allow.path}{state}",
        f"review the study's twin spec; to accept it, run `{command}`",
    )


def approve_for_sites(
    site_configs: Iterable[str | Path], spec_path: str | Path | None = None, code_version: str | None = None,
    approved_by: str | None = None, note: str | None = None,
) -> list[Approval]:
    """Approve one spec at each site of ``site_configs`` (their own allow-lists), for set-up steps (demo, tests).

    ``spec_path`` None: each site's own ``[data] spec``. Returns the approvals in the configs' order.
    """
    from fedtwin.federation.config import load_site_config

    out = []
    for cfg_path in site_configs:
        site = load_site_config(cfg_path)
        out.append(approve(site.allow_list_path(), spec_path if spec_path is not None else site.data.spec,
                           code_version, approved_by, note))
    return out
