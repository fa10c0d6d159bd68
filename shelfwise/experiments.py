"""Online experiments as configuration: what they are, where they live, who sees which arm.

An experiment compares two or more arms on live traffic:

- an arm is the production ranker (`production`), a registered ranker version (`ranker`, with
  its model tag), the candidate order without a ranker (`candidates`) or popular items
  (`popular`);
- in **split** mode each user sees one arm, chosen by a stable hash of the experiment's name and
  the user id (`Experiment.arm_of`), in proportion to the arms' shares;
- in **interleave** mode every list merges exactly two arms by team draft, and each item
  remembers the arm that drafted it.

The first arm is the control: results are stated as differences to it. The book of experiments
is one JSON document in the lake (`shelfwise.lake.EXPERIMENTS`), so every replica, on any
machine, reads the same one; the CLI writes it, the service polls it. At most one experiment
runs at a time: two experiments on the same users would confound each other, and a user's arm
must not depend on which experiment a request happened to look at first.
"""

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from shelfwise.lake import EXPERIMENTS, Lake

MODES = ("split", "interleave")
ARM_KINDS = ("production", "ranker", "candidates", "popular")

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ExperimentError(ValueError):
    """An experiment that cannot be started, stopped or read; the message says why."""


class Arm(BaseModel):
    """One arm of an experiment.

    Attributes:
        name: The arm's name, unique within its experiment (e.g. `control`, `new_ranker`).
        kind: `production`, `ranker` (a registered version: `model`), `candidates` or `popular`.
        model: The registered ranker's tag (`shelfwise_ranker:<version>`), for `ranker` arms only.
        share: The arm's relative share of users in split mode (ignored when interleaving).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    kind: Literal[ARM_KINDS]  # type: ignore[valid-type]
    model: str | None = Field(None, min_length=1, max_length=200)
    share: float = Field(1.0, gt=0, le=1_000_000, allow_inf_nan=False)

    @model_validator(mode="after")
    def _model_for_rankers_only(self) -> "Arm":
        if self.kind == "ranker" and not self.model:
            raise ValueError(f"arm '{self.name}': a ranker arm names its model (model=<tag>)")
        if self.kind != "ranker" and self.model:
            raise ValueError(f"arm '{self.name}': only a ranker arm takes a model")
        return self


class Experiment(BaseModel):
    """An experiment: its arms, its mode and when it ran.

    Attributes:
        name: Unique among all experiments ever started (results are kept by name).
        mode: `split` or `interleave`.
        arms: Two or more arms (exactly two when interleaving); the first is the control.
        started_at: When it started serving.
        stopped_at: When it stopped; None while it runs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    mode: Literal[MODES]  # type: ignore[valid-type]
    arms: list[Arm] = Field(min_length=2, max_length=10)
    started_at: datetime
    stopped_at: datetime | None = None

    @model_validator(mode="after")
    def _coherent(self) -> "Experiment":
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must be unique, got {names}")
        if self.mode == "interleave" and len(self.arms) != 2:
            raise ValueError("arms: team-draft interleaving merges exactly two arms")
        if self.stopped_at is not None and self.stopped_at < self.started_at:
            raise ValueError("stopped_at: before started_at")
        return self

    @property
    def control(self) -> Arm:
        """The arm the others are compared with: the first."""
        return self.arms[0]

    def is_running(self, now: datetime | None = None) -> bool:
        """Whether the experiment serves at `now` (default: the current time)."""
        now = now or datetime.now(UTC)
        return self.started_at <= now and (self.stopped_at is None or now < self.stopped_at)

    def arm_of(self, user_id: str) -> Arm:
        """The arm a user sees in split mode: stable across requests, replicas and restarts.

        The user's position in [0, 1) is a hash of the experiment's name and the user id, so
        assignments of different experiments are independent of each other.
        """
        digest = hashlib.blake2b(f"{self.name}\x00{user_id}".encode(), digest_size=8).digest()
        position = int.from_bytes(digest, "big") / 2**64
        total = sum(arm.share for arm in self.arms)
        bound = 0.0
        for arm in self.arms:
            bound += arm.share / total
            if position < bound:
                return arm
        return self.arms[-1]  # rounding of the last bound


_BOOK = TypeAdapter(list[Experiment])


def read_experiments(lake: Lake) -> list[Experiment]:
    """Every experiment of the lake's book, oldest first (none when there is no book).

    Raises:
        ExperimentError: The book exists but is not a valid list of experiments.
    """
    if not lake.exists(EXPERIMENTS):
        return []
    try:
        return _BOOK.validate_json(lake.read_text(EXPERIMENTS))
    except ValueError as error:
        raise ExperimentError(f"{lake.url}/{EXPERIMENTS} is not a valid book: {error}") from error


def write_experiments(lake: Lake, experiments: list[Experiment]) -> None:
    """Writes the book (atomically: a reader sees the old or the new one)."""
    document = [experiment.model_dump(mode="json") for experiment in experiments]
    lake.write_text(json.dumps(document, indent=2) + "\n", EXPERIMENTS)


def running_experiment(
    experiments: list[Experiment], now: datetime | None = None
) -> Experiment | None:
    """The experiment serving at `now`, if any (the book holds at most one)."""
    return next((e for e in experiments if e.is_running(now)), None)


def start_experiment(lake: Lake, experiment: Experiment) -> list[Experiment]:
    """Adds an experiment to the book.

    Raises:
        ExperimentError: Its name was used before, or another experiment is running.
    """
    book = read_experiments(lake)
    if any(e.name == experiment.name for e in book):
        raise ExperimentError(f"name: an experiment named '{experiment.name}' exists already")
    running = running_experiment(book, experiment.started_at)
    if running is not None:
        raise ExperimentError(f"'{running.name}' is running: stop it first")
    book.append(experiment)
    write_experiments(lake, book)
    return book


def stop_experiment(lake: Lake, name: str, now: datetime | None = None) -> Experiment:
    """Stops a running experiment: production serves its users again.

    Raises:
        ExperimentError: No such experiment, or it is not running.
    """
    now = now or datetime.now(UTC)
    book = read_experiments(lake)
    for index, experiment in enumerate(book):
        if experiment.name == name:
            if not experiment.is_running(now):
                raise ExperimentError(f"'{name}' is not running")
            stopped = experiment.model_copy(update={"stopped_at": now})
            book[index] = stopped
            write_experiments(lake, book)
            return stopped
    raise ExperimentError(f"name: no experiment named '{name}'")
