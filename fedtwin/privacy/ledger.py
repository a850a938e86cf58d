"""The site's persistent privacy ledger: one SQLite file, append-only, fail-closed.

Why a ledger: DP composes over every step ever taken on the same patients, across runs and
federated rounds, so the privacy spent must outlive any one process. The site owns this file;
nothing in it is patient-level (dataset ids, budgets, DP-SGD parameters, epsilons, run ids, notes).

Rules it enforces:

* Entries and budget events are append-only: SQLite triggers abort any UPDATE or DELETE, and a
  ledger whose triggers are missing is refused.
* Spending is "reserve, then settle": a reservation of the planned steps is committed (durably,
  ``synchronous=FULL``) before training starts and is checked against the budget inside the
  same write transaction, so two trainers cannot both take the last of the budget. The settlement
  records the steps actually taken. A reservation never settled (the process was killed) counts
  as fully spent.
* Fail-closed: a ledger that is missing, unreadable, not a FedTwin ledger, or a dataset without a
  budget means no training (:class:`PrivacyLedgerError`). Deleting the file does not reset a
  budget: training then refuses until someone explicitly creates a new ledger.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fedtwin.errors import FedTwinError
from fedtwin.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    MAX_NOISE_TO_SIGNAL,
    AccountantName,
    Budget,
    BudgetExceededError,
    PlanCheck,
    StepBlock,
    TrainingPlan,
    check_plan,
    composed_epsilon,
    plan_training,
    secure_rng_status,
    validate_accountant,
)

SCHEMA_VERSION = "1"
EntryKind = Literal["reservation", "settlement", "spend"]

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE datasets (
    dataset_id TEXT PRIMARY KEY,
    accountant TEXT NOT NULL CHECK (accountant IN ('rdp', 'prv')),
    created_at TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE budget_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
    ts TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('initial', 'change')),
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    reason TEXT NOT NULL,
    approved_by TEXT NOT NULL
);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
    kind TEXT NOT NULL CHECK (kind IN ('reservation', 'settlement', 'spend')),
    settles INTEGER REFERENCES entries(id),
    ts TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER,
    accountant TEXT NOT NULL,
    steps INTEGER NOT NULL CHECK (steps >= 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    max_grad_norm REAL NOT NULL CHECK (max_grad_norm > 0),
    delta REAL NOT NULL,
    epsilon_entry REAL NOT NULL,
    epsilon_composed REAL NOT NULL,
    secure_rng INTEGER NOT NULL CHECK (secure_rng IN (0, 1)),
    note TEXT NOT NULL DEFAULT '',
    CHECK ((kind = 'settlement') = (settles IS NOT NULL))
);
CREATE UNIQUE INDEX entries_one_settlement ON entries(settles) WHERE settles IS NOT NULL;
CREATE INDEX entries_dataset ON entries(dataset_id, id);
CREATE TRIGGER entries_settle_reservation BEFORE INSERT ON entries
WHEN NEW.kind = 'settlement' AND NOT EXISTS (
    SELECT 1 FROM entries r WHERE r.id = NEW.settles AND r.kind = 'reservation' AND r.dataset_id = NEW.dataset_id)
BEGIN SELECT RAISE(ABORT, 'a settlement must settle a reservation of the same dataset'); END;
"""

_APPEND_ONLY = ("meta", "datasets", "budget_events", "entries")


def _append_only_triggers() -> str:
    return "\n".join(
        f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} "
        f"BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: {op} on {t} is not allowed'); END;"
        for t in _APPEND_ONLY
        for op in ("UPDATE", "DELETE")
    )


_REQUIRED_TRIGGERS = {f"{t}_no_{op}" for t in _APPEND_ONLY for op in ("update", "delete")}


class PrivacyLedgerError(FedTwinError):
    """The ledger is missing, unreadable, not a FedTwin ledger, or misused; training must not start."""


@dataclass(frozen=True)
class LedgerEntry:
    """One appended row: a reservation, its settlement, or a spend recorded after the fact."""

    id: int
    dataset_id: str
    kind: EntryKind
    settles: int | None
    ts: str
    run_id: str
    round: int | None
    accountant: str
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon_entry: float
    """Epsilon of this entry's steps alone, as a fresh accountant would report it."""
    epsilon_composed: float
    """Composed epsilon of the dataset's whole effective history right after this entry."""
    secure_rng: bool
    note: str

    @property
    def block(self) -> StepBlock:
        return StepBlock(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BudgetEvent:
    """The initial budget of a dataset, or an approved change of it."""

    id: int
    dataset_id: str
    ts: str
    kind: Literal["initial", "change"]
    epsilon: float
    delta: float
    reason: str
    approved_by: str


@dataclass(frozen=True)
class DatasetStatus:
    """What ``fedtwin site budget`` shows for one dataset."""

    dataset_id: str
    accountant: str
    budget: Budget
    budget_events: tuple[BudgetEvent, ...]
    spent_epsilon: float
    runs: int
    rounds: int
    steps: int
    open_reservations: int
    entries: tuple[LedgerEntry, ...]

    @property
    def remaining_epsilon(self) -> float:
        """Budget minus composed spend. Informational: epsilons do not add, so the next run's own
        epsilon may exceed this number and still fit (check a plan, don't subtract)."""
        return self.budget.epsilon - self.spent_epsilon

    def to_dict(self, last: int = 5) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "accountant": self.accountant,
            "budget": {"epsilon": self.budget.epsilon, "delta": self.budget.delta},
            "budget_events": [asdict(e) for e in self.budget_events],
            "spent_epsilon": self.spent_epsilon,
            "remaining_epsilon": self.remaining_epsilon,
            "runs": self.runs,
            "rounds": self.rounds,
            "steps": self.steps,
            "open_reservations": self.open_reservations,
            "last_entries": [e.to_dict() for e in self.entries[-last:]] if last else [],
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def effective_history(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """The entries that count: spends, settlements, and reservations not (yet) settled.

    An unsettled reservation counts in full: the fail-closed reading of "we don't know how many
    steps that run took before it died".
    """
    settled = {e.settles for e in entries if e.kind == "settlement"}
    return [e for e in entries if e.kind != "reservation" or e.id not in settled]


def dataset_id_for_database(database: str, cdm_schema: str | None = None) -> str:
    """A stable id for the patient population behind an OMOP database: ``db-<16 hex>``.

    Hashes the location without user name or password (who connects does not change whose data
    it is) and without the twin spec: every spec trained on the same database uses the same
    patients, so they must share one budget. Adding the spec hash would let a spec edit reset it.
    A governance-assigned id (e.g. ``"st-elsewhere:omop-prod"``) is better still when the same
    data is reachable under several names.
    """
    if "://" in database:
        from sqlalchemy.engine import make_url

        url = make_url(database)
        backend = url.get_backend_name()
        if backend == "sqlite":
            loc = f"sqlite:{Path(url.database or '').expanduser().resolve()}"
        else:
            loc = f"{backend}://{(url.host or '').lower()}:{url.port or ''}/{url.database or ''}"
    else:
        loc = f"sqlite:{Path(database).expanduser().resolve()}"
    if cdm_schema:
        loc += f"#{cdm_schema}"
    return "db-" + hashlib.sha256(loc.encode()).hexdigest()[:16]


@dataclass
class SpendSession:
    """A reservation in progress; the trainer counts steps here as it takes them."""

    ledger: PrivacyLedger
    reservation: LedgerEntry
    steps_taken: int | None = None
    """None until the trainer reports a step: unknown steps are settled as the full reservation."""
    settlement: LedgerEntry | None = field(default=None)

    @property
    def noise_multiplier(self) -> float:
        return self.reservation.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.reservation.sample_rate

    @property
    def remaining_steps(self) -> int:
        return self.reservation.steps - (self.steps_taken or 0)

    def add_steps(self, n: int = 1) -> None:
        """Count ``n`` optimizer steps just taken; raises once past the reservation.

        Raising stops a runaway loop; the steps beyond the reservation are still recorded at
        settlement (the ledger records what happened, and the next plan pays for it).
        """
        if n < 0:
            raise ValueError(f"steps must be >= 0, got {n}")
        self.steps_taken = (self.steps_taken or 0) + n
        if self.steps_taken > self.reservation.steps:
            raise BudgetExceededError(
                f"run {self.reservation.run_id} took {self.steps_taken} steps but reserved {self.reservation.steps}",
                "stop training; the extra steps are recorded in the ledger at settlement",
            )


class PrivacyLedger:
    """A site's privacy ledger file. Open with :meth:`create` (once) or :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, read_only: bool) -> None:
        self._conn = conn
        self.path = path
        self.read_only = read_only

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path) -> PrivacyLedger:
        """Create a new, empty ledger at ``path``; refuses to touch an existing file."""
        path = Path(path)
        if path.exists():
            raise PrivacyLedgerError(
                f"{path} already exists; a privacy ledger is never re-created over an old one",
                "open it with PrivacyLedger.open, or choose another path",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(
                "BEGIN;" + _SCHEMA + _append_only_triggers()
                + f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');"
                + f"INSERT INTO meta VALUES ('created_at', '{_now()}');"
                + "COMMIT;"
            )
        except sqlite3.Error as exc:
            conn.close()
            raise PrivacyLedgerError(f"could not create the privacy ledger {path}: {exc}", "check the path") from exc
        conn.close()
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> PrivacyLedger:
        """Open an existing ledger and verify it; every failure is a :class:`PrivacyLedgerError`."""
        path = Path(path)
        if not path.is_file():
            raise PrivacyLedgerError(
                f"privacy ledger {path} does not exist",
                "pass the site's ledger file; a site's first training creates it (`fedtwin train local --budget-epsilon ... --delta ...`, or the first federated round from the site config's [privacy] budget); "
                "a lost ledger must be restored from backup, not re-created: re-creating it resets every budget",
            )
        try:
            if read_only:
                conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=60)
            else:
                conn = sqlite3.connect(path, isolation_level=None, timeout=60)
        except sqlite3.Error as exc:
            raise _unreadable(path, exc) from exc
        ledger = cls(conn, path, read_only)
        try:
            ledger._verify()  # before any PRAGMA that writes: never convert someone else's file to WAL
            conn.execute("PRAGMA foreign_keys=ON")
            if not read_only:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a committed reservation survives a power cut
        except sqlite3.Error as exc:
            conn.close()
            raise _unreadable(path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return ledger

    def _verify(self) -> None:
        try:
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            triggers = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            version = None
            if "meta" in tables:
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = row[0] if row else None
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc
        if check != "ok":
            raise _unreadable(self.path, f"integrity check failed: {check}")
        if not {"meta", "datasets", "budget_events", "entries"} <= tables or version is None:
            raise PrivacyLedgerError(
                f"{self.path} is an SQLite file but not a FedTwin privacy ledger",
                "pass the site's ledger file (the one its site config's [privacy] ledger or --ledger names)",
            )
        if version != SCHEMA_VERSION:
            raise PrivacyLedgerError(f"privacy ledger {self.path} has schema version {version}, expected {SCHEMA_VERSION}",
                                     "use the FedTwin version that wrote it")
        missing = _REQUIRED_TRIGGERS - triggers
        if missing:
            raise PrivacyLedgerError(
                f"privacy ledger {self.path} has lost its append-only protection (missing triggers: "
                f"{', '.join(sorted(missing))}); its history cannot be trusted",
                "restore the ledger from backup and find out who altered it",
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (every failure becomes PrivacyLedgerError: never train on a ledger we cannot read) --

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._conn
        except FedTwinError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed on anything
            raise _unreadable(self.path, exc) from exc

    def datasets(self) -> list[str]:
        with self._reading() as c:
            return [r[0] for r in c.execute("SELECT dataset_id FROM datasets ORDER BY created_at, dataset_id")]

    def accountant(self, dataset_id: str) -> AccountantName:
        with self._reading() as c:
            row = c.execute("SELECT accountant FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise _no_budget(dataset_id, self.path)
        return validate_accountant(row[0])

    def budget_events(self, dataset_id: str) -> list[BudgetEvent]:
        with self._reading() as c:
            rows = c.execute(
                "SELECT id, dataset_id, ts, kind, epsilon, delta, reason, approved_by FROM budget_events "
                "WHERE dataset_id = ? ORDER BY id", (dataset_id,)
            ).fetchall()
        return [BudgetEvent(*r) for r in rows]

    def budget(self, dataset_id: str) -> Budget:
        """The dataset's current budget: its latest budget event."""
        events = self.budget_events(dataset_id)
        if not events:
            raise _no_budget(dataset_id, self.path)
        return Budget(events[-1].epsilon, events[-1].delta)

    def entries(self, dataset_id: str) -> list[LedgerEntry]:
        with self._reading() as c:
            rows = c.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE dataset_id = ? ORDER BY id", (dataset_id,)).fetchall()
            return [_entry(r) for r in rows]

    def history(self, dataset_id: str) -> list[StepBlock]:
        """Every block that counts against the dataset (open reservations in full)."""
        return [e.block for e in effective_history(self.entries(dataset_id))]

    def open_reservations(self, dataset_id: str) -> list[LedgerEntry]:
        entries = self.entries(dataset_id)
        settled = {e.settles for e in entries if e.kind == "settlement"}
        return [e for e in entries if e.kind == "reservation" and e.id not in settled]

    def spent_epsilon(self, dataset_id: str) -> float:
        """Composed epsilon of everything spent or reserved on the dataset, at the budget's delta."""
        return composed_epsilon(self.history(dataset_id), self.budget(dataset_id).delta, self.accountant(dataset_id))

    def status(self, dataset_id: str) -> DatasetStatus:
        accountant = self.accountant(dataset_id)
        events = self.budget_events(dataset_id)
        if not events:
            raise _no_budget(dataset_id, self.path)
        budget = Budget(events[-1].epsilon, events[-1].delta)
        entries = self.entries(dataset_id)
        effective = effective_history(entries)
        return DatasetStatus(
            dataset_id=dataset_id,
            accountant=accountant,
            budget=budget,
            budget_events=tuple(events),
            spent_epsilon=composed_epsilon([e.block for e in effective], budget.delta, accountant),
            runs=len({e.run_id for e in effective}),
            rounds=sum(1 for e in effective if e.round is not None),
            steps=sum(e.steps for e in effective),
            open_reservations=sum(1 for e in effective if e.kind == "reservation"),
            entries=tuple(entries),
        )

    def statuses(self) -> list[DatasetStatus]:
        return [self.status(d) for d in self.datasets()]

    # -- budgets -----------------------------------------------------------------------------

    def set_budget(
        self,
        dataset_id: str,
        *,
        epsilon: float,
        delta: float,
        accountant: str = DEFAULT_ACCOUNTANT,
        approved_by: str = "",
        note: str = "",
    ) -> Budget:
        """Set a dataset's budget the first time; repeating the same values is a no-op.

        A different value for an existing dataset is refused: that is :meth:`change_budget`, which
        needs a reason and an approver and is recorded. The accountant is fixed per dataset so that
        every epsilon in its history is comparable.
        """
        if not dataset_id:
            raise ValueError("dataset_id must not be empty")
        budget = Budget(float(epsilon), float(delta))
        acct = validate_accountant(accountant)
        with self._writing() as c:
            row = c.execute("SELECT accountant FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
            if row is None:
                ts = _now()
                c.execute("INSERT INTO datasets VALUES (?, ?, ?, ?)", (dataset_id, acct, ts, note))
                c.execute(
                    "INSERT INTO budget_events (dataset_id, ts, kind, epsilon, delta, reason, approved_by) "
                    "VALUES (?, ?, 'initial', ?, ?, ?, ?)",
                    (dataset_id, ts, budget.epsilon, budget.delta, note or "initial budget", approved_by),
                )
                return budget
            current = self._budget_in(c, dataset_id)
            if current == budget and row[0] == acct:
                return budget
        raise PrivacyLedgerError(
            f"dataset {dataset_id} already has a budget (epsilon {current.epsilon:g}, delta {current.delta:g}, "
            f"{row[0]} accountant); asked for epsilon {budget.epsilon:g}, delta {budget.delta:g}, {acct} accountant",
            "a budget changes only by `fedtwin site budget-change --ledger LEDGER --epsilon NEW --reason WHY --approved-by WHO` (PrivacyLedger.change_budget), with the approval of "
            "the site's data governance; the accountant of a dataset never changes",
        )

    def change_budget(self, dataset_id: str, *, epsilon: float, delta: float, reason: str, approved_by: str) -> Budget:
        """Change a budget with a recorded reason and approver (the site's data governance)."""
        if not reason.strip() or not approved_by.strip():
            raise PrivacyLedgerError(
                "a budget change needs a reason and an approver",
                "pass reason= and approved_by= (the person or body of the site's data governance who approved it)",
            )
        budget = Budget(float(epsilon), float(delta))
        with self._writing() as c:
            if c.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone() is None:
                raise _no_budget(dataset_id, self.path)
            c.execute(
                "INSERT INTO budget_events (dataset_id, ts, kind, epsilon, delta, reason, approved_by) "
                "VALUES (?, ?, 'change', ?, ?, ?, ?)",
                (dataset_id, _now(), budget.epsilon, budget.delta, reason, approved_by),
            )
        return budget

    # -- planning ----------------------------------------------------------------------------

    def check_plan(
        self,
        dataset_id: str,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps_per_round: int,
        rounds: int = 1,
        n_patients: int | None = None,
        max_noise_to_signal: float = MAX_NOISE_TO_SIGNAL,
    ) -> PlanCheck:
        """Refuse (raise) before training unless the whole plan fits what is left of the budget."""
        budget, accountant, prior = self._state(dataset_id)
        return check_plan(
            prior=prior, budget=budget, accountant=accountant, noise_multiplier=noise_multiplier,
            sample_rate=sample_rate, steps_per_round=steps_per_round, rounds=rounds, n_patients=n_patients,
            max_noise_to_signal=max_noise_to_signal,
        )

    def plan(
        self,
        dataset_id: str,
        *,
        n_patients: int,
        sample_rate: float,
        steps_per_round: int,
        rounds: int = 1,
        max_noise_to_signal: float = MAX_NOISE_TO_SIGNAL,
        tolerance: float = 0.01,
    ) -> TrainingPlan:
        """The noise multiplier for ALL ``rounds`` so that they plus the history meet the budget."""
        budget, accountant, prior = self._state(dataset_id)
        return plan_training(
            prior=prior, budget=budget, accountant=accountant, n_patients=n_patients, sample_rate=sample_rate,
            steps_per_round=steps_per_round, rounds=rounds, max_noise_to_signal=max_noise_to_signal, tolerance=tolerance,
        )

    def _state(self, dataset_id: str) -> tuple[Budget, AccountantName, list[StepBlock]]:
        return self.budget(dataset_id), self.accountant(dataset_id), self.history(dataset_id)

    # -- spending ----------------------------------------------------------------------------

    def reserve(
        self,
        dataset_id: str,
        *,
        run_id: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        round: int | None = None,  # noqa: A002 - the ledger's own word for a federated round
        note: str = "",
        secure_rng: bool = False,
    ) -> LedgerEntry:
        """Reserve ``steps`` before training; refused (nothing written) if they would exceed the budget.

        The check and the insert share one ``BEGIN IMMEDIATE`` transaction, so concurrent trainers
        on the same ledger are serialized. Until settled, the reservation counts in full.
        """
        if steps <= 0:
            raise ValueError(f"a reservation needs steps > 0, got {steps}")
        block = StepBlock(float(noise_multiplier), float(sample_rate), int(steps))
        with self._writing() as c:
            budget, accountant, entries = self._budget_in(c, dataset_id), self._accountant_in(c, dataset_id), self._entries_in(c, dataset_id)
            prior = [e.block for e in effective_history(entries)]
            check = check_plan(prior=prior, budget=budget, accountant=accountant, noise_multiplier=block.noise_multiplier,
                               sample_rate=block.sample_rate, steps_per_round=block.steps)
            return self._insert(c, dataset_id, "reservation", None, run_id, round, accountant, block, max_grad_norm,
                                budget.delta, check.plan_epsilon, check.projected_epsilon, secure_rng, note)

    def settle(self, reservation_id: int, *, steps_taken: int, note: str = "") -> LedgerEntry:
        """Record the steps a reserved run actually took (once per reservation).

        Uses the reservation's noise multiplier and sample rate: the trainer must have used them.
        More steps than reserved are recorded as they are (the ledger states what happened).
        """
        if steps_taken < 0:
            raise ValueError(f"steps_taken must be >= 0, got {steps_taken}")
        with self._writing() as c:
            row = c.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (reservation_id,)).fetchone()
            if row is None or row[2] != "reservation":
                raise PrivacyLedgerError(f"ledger entry {reservation_id} is not a reservation", "settle the id reserve() returned")
            res = _entry(row)
            if c.execute("SELECT 1 FROM entries WHERE settles = ?", (reservation_id,)).fetchone():
                raise PrivacyLedgerError(f"reservation {reservation_id} is already settled", "settle each reservation once")
            budget = self._budget_in(c, res.dataset_id)
            others = [e.block for e in effective_history(self._entries_in(c, res.dataset_id)) if e.id != res.id]
            block = StepBlock(res.noise_multiplier, res.sample_rate, int(steps_taken))
            alone = composed_epsilon([block], budget.delta, res.accountant)
            composed = composed_epsilon([*others, block], budget.delta, res.accountant)
            if steps_taken > res.steps:
                note = f"took {steps_taken} steps, {steps_taken - res.steps} more than reserved; " + note
            return self._insert(c, res.dataset_id, "settlement", res.id, res.run_id, res.round, res.accountant, block,
                                res.max_grad_norm, budget.delta, alone, composed, res.secure_rng, note)

    def record_spend(
        self,
        dataset_id: str,
        *,
        run_id: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        round: int | None = None,  # noqa: A002
        note: str = "",
        secure_rng: bool = False,
    ) -> LedgerEntry:
        """Record a spend that already happened outside reserve/settle (e.g. before the ledger existed).

        Not a budget check: the steps were taken, so they are recorded even past the budget (after
        which every plan is refused). New training goes through :meth:`spend` or :meth:`reserve`.
        """
        block = StepBlock(float(noise_multiplier), float(sample_rate), int(steps))
        with self._writing() as c:
            budget, accountant = self._budget_in(c, dataset_id), self._accountant_in(c, dataset_id)
            prior = [e.block for e in effective_history(self._entries_in(c, dataset_id))]
            alone = composed_epsilon([block], budget.delta, accountant)
            composed = composed_epsilon([*prior, block], budget.delta, accountant)
            return self._insert(c, dataset_id, "spend", None, run_id, round, accountant, block, max_grad_norm,
                                budget.delta, alone, composed, secure_rng, note)

    @contextmanager
    def spend(
        self,
        dataset_id: str,
        *,
        run_id: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        round: int | None = None,  # noqa: A002
        note: str = "",
        secure_rng: bool = False,
    ) -> Iterator[SpendSession]:
        """Reserve, yield a :class:`SpendSession` to count steps in, settle on the way out.

        On an exception the steps counted so far are settled and the exception re-raised. If the
        trainer never reported steps, the full reservation is settled. If the process dies
        outright, nothing is settled and the reservation counts in full.
        """
        res = self.reserve(dataset_id, run_id=run_id, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                           steps=steps, max_grad_norm=max_grad_norm, round=round, note=note, secure_rng=secure_rng)
        session = SpendSession(self, res)
        try:
            yield session
        except BaseException as exc:
            known = session.steps_taken is not None
            why = f"run ended by {type(exc).__name__}: " + (
                "settled with the steps counted" if known else "steps unknown, settled in full")
            try:
                session.settlement = self.settle(res.id, steps_taken=session.steps_taken if known else res.steps, note=why)
            except Exception:  # noqa: BLE001 - the open reservation already counts in full
                pass
            raise
        else:
            known = session.steps_taken is not None
            session.settlement = self.settle(
                res.id, steps_taken=session.steps_taken if known else res.steps,
                note="" if known else "trainer reported no steps: settled in full",
            )

    # -- internals ---------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise PrivacyLedgerError(f"privacy ledger {self.path} was opened read-only", "open it without read_only")
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc
        try:
            yield c
        except BaseException as exc:
            _rollback(c)
            if isinstance(exc, sqlite3.Error):
                raise PrivacyLedgerError(f"could not write to the privacy ledger {self.path}: {exc}", "") from exc
            raise
        else:
            try:
                c.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(c)
                raise PrivacyLedgerError(f"could not commit to the privacy ledger {self.path}: {exc}", "") from exc

    def _budget_in(self, c: sqlite3.Connection, dataset_id: str) -> Budget:
        row = c.execute(
            "SELECT epsilon, delta FROM budget_events WHERE dataset_id = ? ORDER BY id DESC LIMIT 1", (dataset_id,)
        ).fetchone()
        if row is None:
            raise _no_budget(dataset_id, self.path)
        return Budget(row[0], row[1])

    def _accountant_in(self, c: sqlite3.Connection, dataset_id: str) -> AccountantName:
        row = c.execute("SELECT accountant FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise _no_budget(dataset_id, self.path)
        return validate_accountant(row[0])

    def _entries_in(self, c: sqlite3.Connection, dataset_id: str) -> list[LedgerEntry]:
        rows = c.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE dataset_id = ? ORDER BY id", (dataset_id,)).fetchall()
        return [_entry(r) for r in rows]

    def _insert(
        self, c: sqlite3.Connection, dataset_id: str, kind: EntryKind, settles: int | None, run_id: str,
        round_: int | None, accountant: str, block: StepBlock, max_grad_norm: float, delta: float,
        epsilon_entry: float, epsilon_composed: float, secure_rng: bool, note: str,
    ) -> LedgerEntry:
        if secure_rng and not secure_rng_status()["available"]:
            raise PrivacyLedgerError(
                "secure_rng=True recorded, but torchcsprng is not available here, so Opacus secure_mode cannot have run",
                "record secure_rng=False (the truth)",
            )
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        cur = c.execute(
            f"INSERT INTO entries ({_ENTRY_COLUMNS.replace('id, ', '', 1)}) VALUES ({', '.join('?' * 16)})",
            (dataset_id, kind, settles, _now(), run_id, round_, accountant, block.steps, block.sample_rate,
             block.noise_multiplier, float(max_grad_norm), delta, epsilon_entry, epsilon_composed, int(secure_rng), note),
        )
        row = c.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (cur.lastrowid,)).fetchone()
        return _entry(row)


_ENTRY_COLUMNS = (
    "id, dataset_id, kind, settles, ts, run_id, round, accountant, steps, sample_rate, noise_multiplier, "
    "max_grad_norm, delta, epsilon_entry, epsilon_composed, secure_rng, note"
)


def _entry(row: Sequence[Any]) -> LedgerEntry:
    values = list(row)
    values[15] = bool(values[15])
    return LedgerEntry(*values)


def _rollback(c: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite may already have rolled it back)."""
    if c.in_transaction:
        c.execute("ROLLBACK")


def _unreadable(path: Path, exc: object) -> PrivacyLedgerError:
    return PrivacyLedgerError(
        f"the privacy ledger {path} could not be read ({exc}); FedTwin never trains on a ledger it cannot read",
        "restore the ledger from backup (re-creating it would reset every budget); check the path and permissions",
    )


def _no_budget(dataset_id: str, path: Path) -> PrivacyLedgerError:
    return PrivacyLedgerError(
        f"no privacy budget is set for dataset {dataset_id!r} in {path}; training without one is refused",
        "have the site's data governance set it: PrivacyLedger.set_budget(dataset_id, epsilon=..., delta=...)",
    )
