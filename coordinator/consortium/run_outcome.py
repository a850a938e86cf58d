"""How a finished run's training went, from the ``FEDTWIN final`` line its ServerApp printed.

Why: Flower's run status is the ServerApp process's: ``finished:completed`` means the process
exited normally, which a FedTwin ServerApp also does when every round halted (no site answered,
the aggregate was refused...). Its last line says how many training rounds completed
(``FEDTWIN final rounds_completed=C rounds=R first_round=F ...``, coordinator/server_app.py), so
``fedtwin consortium status`` shows such a run as ``finished:no-round-completed`` (or
``finished:rounds-halted`` when only some rounds completed) instead. Runs of other apps, and runs
that did not finish normally, keep Flower's status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINAL_RE = re.compile(r"FEDTWIN final rounds_completed=(\d+) rounds=(\d+) first_round=(\d+)")


@dataclass(frozen=True)
class TrainingOutcome:
    rounds_completed: int  # training rounds of this launch that completed
    rounds: int  # the training's last round (num-rounds)
    first_round: int  # > 1 for a resumed launch

    @property
    def rounds_run(self) -> int:
        """Training rounds this launch was to run (a resumed launch runs only the rounds left)."""
        return max(self.rounds - self.first_round + 1, 0)

    @property
    def state(self) -> str:
        """``completed``, ``rounds-halted`` (some completed) or ``no-round-completed`` (every one halted)."""
        if self.rounds_completed >= self.rounds_run:
            return "completed"
        return "rounds-halted" if self.rounds_completed > 0 else "no-round-completed"

    def describe(self) -> str:
        """e.g. ``0 of 2 completed``, ``1 of 1 completed (from round 2)`` for a resumed launch."""
        resumed = f" (from round {self.first_round})" if self.first_round > 1 else ""
        return f"{self.rounds_completed} of {self.rounds_run} completed{resumed}"


def training_outcome(log: str) -> TrainingOutcome | None:
    """The outcome the run's last ``FEDTWIN final`` line states; None if it printed none (another app, or it failed)."""
    found = FINAL_RE.findall(log or "")
    if not found:
        return None
    done, rounds, first = (int(x) for x in found[-1])
    return TrainingOutcome(done, rounds, first)


def run_state(status: str, sub_status: str, outcome: TrainingOutcome | None) -> str:
    """What ``consortium status`` shows: Flower's ``status:sub_status``, except that a FedTwin run
    that finished normally says how its training went."""
    flower = f"{status}:{sub_status}" if sub_status else status
    if outcome is None or (status, sub_status) != ("finished", "completed"):
        return flower
    return f"finished:{outcome.state}"
