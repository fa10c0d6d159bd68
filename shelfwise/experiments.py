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

from shelfwise.lake import EXPERIMENT_RESULTS, EXPERIMENTS, Lake

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


# Results: what the `experiment_results` asset computes from the lake's impressions and events
# (models/experiment_results.py), one document per experiment, all of them in one JSON object
# keyed by experiment name (`shelfwise.lake.EXPERIMENT_RESULTS`). The service shows them; the
# CLI promotes a winner from them.


class ArmResult(BaseModel):
    """One arm's numbers (in interleave mode: the items the arm drafted).

    Attributes:
        arm: The arm's name.
        impressions: Items shown (interleaving: drafted by the arm).
        clicks: Shown items viewed from the response (the view carried its rec_id).
        carts: Shown items added to the cart from the response.
        purchases: Shown items bought from the response.
        revenue_per_impression: Price × quantity of those purchases per impression.
        ctr: clicks / impressions; with `ctr_low`, `ctr_high` its 95% interval (delta method
            on per-user sums: the user is the unit that was randomised).
        lift_vs_control: The relative difference of the CTR to the control's (0.1: 10% more
            clicks per impression); with `lift_low`, `lift_high` its interval (simultaneous
            over the arms compared with the control). None for the control and when
            interleaving (the interleaving result compares the arms there).
    """

    model_config = ConfigDict(extra="forbid")

    arm: str
    impressions: int
    clicks: int
    carts: int
    purchases: int
    revenue_per_impression: float | None
    ctr: float | None
    ctr_low: float | None
    ctr_high: float | None
    lift_vs_control: float | None
    lift_low: float | None
    lift_high: float | None


class InterleavingResult(BaseModel):
    """Team-draft interleaving: which arm's drafted items shoppers engaged with more, per list.

    Attributes:
        wins: Per arm, the lists in which its drafted items got more interactions.
        ties: Lists with interactions, as many on each arm's items.
        p_value: Two-sided exact binomial (sign) test of the wins against an even split.
    """

    model_config = ConfigDict(extra="forbid")

    wins: dict[str, int]
    ties: int
    p_value: float


class ExperimentResults(BaseModel):
    """The measured outcome of one experiment.

    Attributes:
        updated_at: When these results were computed.
        arms: Every arm of the experiment, control first.
        interleaving: The list wins (interleave mode), None in split mode.
        winner: The arm the decision rule chose, or None (no significant difference yet).
    """

    model_config = ConfigDict(extra="forbid")

    updated_at: datetime
    arms: list[ArmResult]
    interleaving: InterleavingResult | None
    winner: str | None


_RESULTS = TypeAdapter(dict[str, ExperimentResults])


def read_results(lake: Lake) -> dict[str, ExperimentResults]:
    """The latest results of every experiment, by name (empty before the pipeline computed any).

    Raises:
        ExperimentError: The results file exists but is not valid.
    """
    if not lake.exists(EXPERIMENT_RESULTS):
        return {}
    try:
        return _RESULTS.validate_json(lake.read_text(EXPERIMENT_RESULTS))
    except ValueError as error:
        raise ExperimentError(
            f"{lake.url}/{EXPERIMENT_RESULTS} is not valid experiment results: {error}"
        ) from error


def write_results(lake: Lake, results: dict[str, ExperimentResults]) -> None:
    """Writes every experiment's results (atomically), replacing the previous ones."""
    document = {name: result.model_dump(mode="json") for name, result in results.items()}
    lake.write_text(json.dumps(document, indent=2) + "\n", EXPERIMENT_RESULTS)


# Arms whose winning cannot be promoted: they have no ranker to make production.
_NOT_PROMOTABLE = {
    "candidates": "serves the candidate order without a ranker",
    "popular": "serves popular items without a ranker",
}


def winning_arm(lake: Lake, name: str, now: datetime | None = None) -> Arm:
    """The arm that won a stopped experiment, to promote (`shelfwise models promote --winner-of`).

    Args:
        lake: The lake holding the book and the results.
        name: The experiment.
        now: The current time (default: now).

    Returns:
        The winning arm: a `ranker` arm (promote its model) or the `production` arm (keep
        production).

    Raises:
        ExperimentError: No such experiment; it is still running; its results are missing or
            older than its end; it has no winner; or the winner has no ranker to promote.
    """
    experiment = next((e for e in read_experiments(lake) if e.name == name), None)
    if experiment is None:
        raise ExperimentError(f"no experiment named '{name}'")
    if experiment.is_running(now):
        # Its production arm would change under it, and the decision is meant for the data of
        # the whole run: stop, measure, then promote.
        raise ExperimentError(
            f"'{name}' is still running: stop it first (`shelfwise experiments stop {name}`), "
            "then materialize experiment_results"
        )
    if experiment.stopped_at is None:
        raise ExperimentError(f"'{name}' has not started yet")
    result = read_results(lake).get(name)
    if result is None:
        raise ExperimentError(
            f"no results for '{name}' yet: materialize experiment_results (`make pipeline`)"
        )
    if result.updated_at < experiment.stopped_at:
        raise ExperimentError(
            f"the results of '{name}' ({result.updated_at.isoformat()}) were computed before it "
            f"stopped ({experiment.stopped_at.isoformat()}): materialize experiment_results again"
        )
    if result.winner is None:
        raise ExperimentError(
            f"'{name}' has no winner: no arm differed significantly from the control on CTR "
            "(interleaving: on the lists won); nothing to promote"
        )
    arm = next((a for a in experiment.arms if a.name == result.winner), None)
    if arm is None:
        raise ExperimentError(f"the winner '{result.winner}' is not an arm of '{name}'")
    if arm.kind in _NOT_PROMOTABLE:
        raise ExperimentError(
            f"the winner of '{name}' is '{arm.name}', which {_NOT_PROMOTABLE[arm.kind]}: "
            "there is no ranker to promote; production stays as it is"
        )
    return arm
