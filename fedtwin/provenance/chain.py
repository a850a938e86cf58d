"""Verifying a chain of round records: every signature, every link, every manifest, all reported.

The verifier never stops at the first problem: an auditor needs the whole list (one tampered
metric should not hide a missing round). Each :class:`Problem` names the record (index in the
list and round), the field, and what was expected versus found.

What is checked, per record: the record parses; it is signed by the coordinator's trusted key
(its ``key_id`` names that key and the signature verifies); a completed round has an aggregate
hash and at least one manifest, a halted one none; every manifest is signed by the trusted key of
the site it names, names the record's study, round, spec hash and starting parameters, and comes
from a site listed once and not also as dropped. Across records: ``prev_hash`` is the hash of the
previous record (the first has none, or the anchor given); rounds go up by one (a round number
may repeat only right after a halted round, when a resumed training runs it again from the last
completed round); study id and spec hash never change; each round starts from the previous
completed round's aggregate; a site's composed epsilon never goes down; an evaluation round is
the last record. Optionally, the final model's parameters digest equals the last completed
training round's aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedtwin.provenance.canonical import digest
from fedtwin.provenance.errors import FieldError, ProvenanceError
from fedtwin.provenance.keys import KeyRing
from fedtwin.provenance.record import RoundRecord
from fedtwin.provenance.signing import signature_valid


@dataclass(frozen=True)
class Problem:
    """One failed check: where (record index, round, field, site) and expected versus found."""

    index: int | None
    round: int | None
    field: str
    expected: str
    found: str
    site: str | None = None

    def __str__(self) -> str:
        where = "chain" if self.index is None else f"record {self.index}" + (f" (round {self.round})" if self.round is not None else "")
        who = f" [{self.site}]" if self.site else ""
        return f"{where}{who} {self.field}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "round": self.round, "field": self.field, "site": self.site, "expected": self.expected, "found": self.found}


@dataclass
class ChainReport:
    """The verifier's result: every problem found, and what the chain establishes if there are none."""

    records: int = 0
    manifests: int = 0
    signatures_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    head_hash: str | None = None
    """hash of the last record: what the next record must point to (or an anchor kept elsewhere)."""
    final_aggregate_hash: str | None = None
    """aggregate of the last completed training round: the digest the registered model must have."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.records} round record(s), {self.manifests} site manifest(s), "
            f"{self.signatures_checked} signature(s) checked"
        )
        if self.ok:
            return f"OK: {head}; chain head {self.head_hash}; final aggregate {self.final_aggregate_hash}"
        return f"FAILED: {head}; {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise ProvenanceError(self.summary(), "do not trust this history: find out who altered the records named above")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "records": self.records, "manifests": self.manifests, "signatures_checked": self.signatures_checked,
            "head_hash": self.head_hash, "final_aggregate_hash": self.final_aggregate_hash,
            "problems": [p.to_dict() for p in self.problems],
        }


def _short(value: Any) -> str:
    return "none" if value is None else str(value)


def record_problems(rec: RoundRecord, keys: KeyRing, *, coordinator: str = "coordinator", index: int | None = 0) -> list[Problem]:
    """Problems of one record on its own (signatures, status, its manifests); see the module docstring."""
    out: list[Problem] = []
    r = rec.round

    def add(fld: str, expected: Any, found: Any, site: str | None = None) -> None:
        out.append(Problem(index, r, fld, str(expected), _short(found), site))

    # the coordinator's signature
    ckey = keys.by_name(coordinator)
    signer = keys.by_id(rec.key_id)
    if ckey is None:
        add("key_id", f"a trusted key named {coordinator!r}", f"no such key among {', '.join(keys.names) or 'none'}")
    elif rec.key_id != ckey.key_id:
        add("key_id", f"{coordinator}'s key {ckey.key_id}", f"{rec.key_id} ({signer.name}'s key)" if signer else f"{_short(rec.key_id)} (not a trusted key)")
    if rec.signature is None:
        add("signature", f"a signature by {coordinator}", None)
    elif signer is not None:
        if not signature_valid(signer, rec.payload(), rec.signature):
            add("signature", f"a valid signature by {signer.describe()}", "a signature that does not verify (the record was altered after signing)")
    # status
    if rec.status == "completed" and rec.aggregate_hash is None:
        add("aggregate_hash", "a digest (the round completed)", None)
    if rec.status == "halted" and rec.aggregate_hash is not None:
        add("aggregate_hash", "none (the round halted)", rec.aggregate_hash)
    if rec.status == "completed" and not rec.manifests:
        add("manifests", "at least one site manifest (the round completed)", "none")
    # manifests
    seen: set[str] = set()
    for j, m in enumerate(rec.manifests):
        at = f"manifests[{j}]"
        if m.site in seen:
            add(f"{at}.site", "each site once", f"{m.site} again", m.site)
        seen.add(m.site)
        if m.site in rec.sites_dropped:
            add(f"{at}.site", "not a dropped site", f"{m.site}, also in sites_dropped", m.site)
        for fld in ("study_id", "round", "spec_hash", "start_parameters_hash"):
            if getattr(m, fld) != getattr(rec, fld):
                add(f"{at}.{fld}", getattr(rec, fld), getattr(m, fld), m.site)
        skey = keys.by_name(m.site)
        msigner = keys.by_id(m.key_id)
        if skey is None:
            add(f"{at}.key_id", f"a trusted key for site {m.site!r}", f"no such key among {', '.join(keys.names) or 'none'}", m.site)
        elif m.key_id != skey.key_id:
            add(f"{at}.key_id", f"{m.site}'s key {skey.key_id}", f"{m.key_id} ({msigner.name}'s key)" if msigner else f"{_short(m.key_id)} (not a trusted key)", m.site)
        if m.signature is None:
            add(f"{at}.signature", f"a signature by {m.site}", None, m.site)
        elif msigner is not None and not signature_valid(msigner, m.payload(), m.signature):
            add(f"{at}.signature", f"a valid signature by {msigner.describe()}", "a signature that does not verify (the manifest was altered after signing)", m.site)
    return out


def _raw_hash(item: Any) -> str | None:
    """Hash of a record dict that does not parse, so the link after it can still be checked."""
    if not isinstance(item, Mapping):
        return None
    try:
        return digest({k: v for k, v in item.items() if k != "signature"})
    except ProvenanceError:
        return None


def verify_chain(
    records: Sequence[RoundRecord | Mapping[str, Any]],
    keys: KeyRing,
    *,
    coordinator: str = "coordinator",
    study_id: str | None = None,
    spec_hash: str | None = None,
    first_round: int | None = 1,
    anchor: str | None = None,
    final_parameters_hash: str | None = None,
) -> ChainReport:
    """Verify an ordered list of round records (objects or plain dicts); report every problem.

    ``keys`` holds the trusted public keys, the coordinator's named ``coordinator`` and each
    site's named like the site. ``study_id``/``spec_hash``: what the chain must be about (default:
    whatever the first record says). ``first_round``: the first record's round (None: any).
    ``anchor``: the ``prev_hash`` the first record must carry (None for a chain from round 1).
    ``final_parameters_hash``: the digest of the model that was released (e.g. the registered
    model's arrays, :func:`parameters_digest`); it must equal the last completed training round's
    aggregate.
    """
    report = ChainReport()
    if not records:
        report.problems.append(Problem(None, None, "records", "at least one round record", "none"))
        return report
    prev_hash: str | None = anchor
    prev: RoundRecord | None = None
    last_completed: RoundRecord | None = None
    last_completed_index: int | None = None
    epsilon: dict[str, tuple[float, int]] = {}
    want_study, want_spec = study_id, spec_hash

    for i, item in enumerate(records):
        report.records += 1
        if isinstance(item, RoundRecord):
            rec: RoundRecord | None = item
        else:
            try:
                rec = RoundRecord.from_dict(item)
            except FieldError as exc:
                rnd = item.get("round") if isinstance(item, Mapping) else None
                report.problems.append(Problem(i, rnd if isinstance(rnd, int) else None, exc.field, exc.expected, exc.found))
                rec = None
        if rec is None:  # keep checking the links around a record that does not parse
            found_prev = item.get("prev_hash") if isinstance(item, Mapping) else None
            if found_prev != prev_hash:
                report.problems.append(Problem(i, None, "prev_hash", _short(prev_hash), _short(found_prev)))
            prev_hash, prev = _raw_hash(item), None
            continue

        def add(fld: str, expected: Any, found: Any, site: str | None = None) -> None:
            report.problems.append(Problem(i, rec.round, fld, _short(expected), _short(found), site))  # noqa: B023

        report.problems.extend(record_problems(rec, keys, coordinator=coordinator, index=i))
        report.manifests += len(rec.manifests)
        report.signatures_checked += 1 + len(rec.manifests)

        # links
        if rec.prev_hash != prev_hash:
            what = "the hash of the previous record" if i else ("the anchor" if anchor else "the first record has none")
            add("prev_hash", f"{_short(prev_hash)} ({what})", rec.prev_hash)
        if i == 0:
            if first_round is not None and rec.round != first_round:
                add("round", first_round, rec.round)
        elif prev is not None:
            allowed = [prev.round + 1]
            if prev.status == "halted":  # a resumed training re-runs from the last completed round
                retry = (last_completed.round if last_completed else (first_round or 1) - 1) + 1
                if retry not in allowed:
                    allowed.append(retry)
            if prev.kind == "evaluate":
                # a finished training extended with more rounds (--resume --rounds N): its evaluation
                # round scored the model so far, and training goes on under that round's number
                allowed = [prev.round]
                if rec.kind != "train":
                    add("kind", f"a training round after the evaluation round {prev.round}", f"{rec.kind} round {rec.round}")
            if rec.round not in allowed:
                exp = " or ".join(str(a) for a in allowed)
                add("round", f"{exp} (after round {prev.round}, {prev.kind} {prev.status})", f"{rec.round} (round(s) missing or out of order)")
        want_study = want_study or rec.study_id
        want_spec = want_spec or rec.spec_hash
        if rec.study_id != want_study:
            add("study_id", want_study, rec.study_id)
        if rec.spec_hash != want_spec:
            add("spec_hash", want_spec, rec.spec_hash)
        if last_completed is not None and rec.start_parameters_hash != last_completed.aggregate_hash:
            add("start_parameters_hash", f"{last_completed.aggregate_hash} (aggregate of round {last_completed.round})", rec.start_parameters_hash)
        for j, m in enumerate(rec.manifests):
            before = epsilon.get(m.site)
            if before is not None and m.epsilon_spent < before[0]:
                add(f"manifests[{j}].epsilon_spent", f">= {before[0]!r} (reported in round {before[1]})", repr(m.epsilon_spent), m.site)
            epsilon[m.site] = (max(m.epsilon_spent, before[0]) if before else m.epsilon_spent, rec.round)

        prev_hash, prev = rec.record_hash(), rec
        if rec.status == "completed" and rec.kind == "train":
            last_completed, last_completed_index = rec, i

    report.head_hash = prev_hash
    report.final_aggregate_hash = last_completed.aggregate_hash if last_completed else None
    if final_parameters_hash is not None and final_parameters_hash != report.final_aggregate_hash:
        report.problems.append(Problem(
            last_completed_index, last_completed.round if last_completed else None, "aggregate_hash",
            f"{final_parameters_hash} (digest of the released model)", _short(report.final_aggregate_hash),
        ))
    return report
