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

Configuration comes as a mapping (a JSON or YAML file, or the CLI's flags through `parse_arm`)
and becomes an `Experiment` through `experiment_from_config`, whose errors name the field. A
`ranker` arm's model is copied into the lake when the experiment starts (`publish_arm_ranker`),
so a replica loads it with `read_arm_ranker` and needs no model store. The pipeline's latest
results per experiment live beside the book (`write_results`, `read_results`).
"""

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from shelfwise.lake import EXPERIMENT_RESULTS, EXPERIMENTS, Lake, experiment_arm_ranker

logger = logging.getLogger(__name__)

MODES = ("split", "interleave")
ARM_KINDS = ("production", "ranker", "candidates", "popular")
# What an experiment is doing at a time (`status_of`).
STATUSES = ("scheduled", "running", "stopped")

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
    check_startable(book, experiment)
    book.append(experiment)
    write_experiments(lake, book)
    return book


def check_startable(book: list[Experiment], experiment: Experiment) -> None:
    """Refuses an experiment the book cannot take (what `start_experiment` checks).

    For a caller with work to do before the start (copying the arms' rankers), so that work is
    not done for an experiment that will be refused.

    Raises:
        ExperimentError: Its name was used before, or another experiment runs (or is scheduled)
            while it would run.
    """
    if any(e.name == experiment.name for e in book):
        raise ExperimentError(f"name: an experiment named '{experiment.name}' exists already")
    running = running_experiment(book, experiment.started_at)
    if running is not None:
        raise ExperimentError(f"'{running.name}' is running: stop it first")
    scheduled = next(  # one that starts while this one would run
        (
            e
            for e in book
            if e.started_at > experiment.started_at
            and (experiment.stopped_at is None or e.started_at < experiment.stopped_at)
        ),
        None,
    )
    if scheduled is not None:
        raise ExperimentError(
            f"'{scheduled.name}' is scheduled from {scheduled.started_at.isoformat()}: "
            "stop it first, or end this one before"
        )


def status_of(experiment: Experiment, now: datetime | None = None) -> str:
    """`scheduled` (starts later), `running` or `stopped` at `now` (default: the current time)."""
    now = now or datetime.now(UTC)
    if now < experiment.started_at:
        return "scheduled"
    return "running" if experiment.is_running(now) else "stopped"


def parse_arm(text: str) -> dict[str, Any]:
    """An arm from the CLI's `NAME=KIND[:MODEL][@SHARE]`.

    For example `control=production`, `new=ranker:shelfwise_ranker:v2@0.5`, `pop=popular`.
    Returns the arm as configuration (validated with the rest by `experiment_from_config`).

    Raises:
        ExperimentError: The text does not have that form (the message names the arm).
    """
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ExperimentError(f"arms: expected NAME=KIND[:MODEL][@SHARE], got {text!r}")
    arm: dict[str, Any] = {"name": name.strip()}
    body, at, share = rest.rpartition("@")
    if at:
        try:
            arm["share"] = float(share)
        except ValueError:
            raise ExperimentError(f"arms: the share of '{arm['name']}' is not a number") from None
        rest = body
    kind, colon, model = rest.strip().partition(":")
    arm["kind"] = kind.strip()
    if colon:
        arm["model"] = model.strip()
    return arm


def experiment_from_config(config: Mapping[str, Any], now: datetime | None = None) -> Experiment:
    """An experiment from its configuration (a file's mapping, or the CLI's flags).

    Args:
        config: `name`, `mode`, `arms` (a list of `{name, kind, model?, share?}`), and
            optionally `started_at` / `stopped_at` (ISO 8601; naive means UTC).
        now: The start when the configuration names none (default: the current time).

    Raises:
        ExperimentError: The configuration is invalid; the message starts with the field's
            dotted path (`arms.1.model: ...`).
    """
    if not isinstance(config, Mapping):
        raise ExperimentError("experiment: expected a mapping of name, mode and arms")
    document = {"started_at": now or datetime.now(UTC), **config}
    try:
        experiment = Experiment.model_validate(document)
    except ValidationError as error:
        raise ExperimentError(_field_message(error)) from None
    # Stored in UTC, whatever offset (or none) the configuration gave.
    times = {
        key: value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        for key in ("started_at", "stopped_at")
        if (value := getattr(experiment, key)) is not None
    }
    return experiment.model_copy(update=times)


def read_config_file(path: Path) -> dict[str, Any]:
    """An experiment's configuration from a JSON or YAML file (by its suffix; YAML otherwise).

    Raises:
        ExperimentError: The file cannot be read or parsed, or holds no mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            import yaml

            document = yaml.safe_load(text)
    except (OSError, ValueError) as error:  # yaml's and json's errors are ValueErrors
        raise ExperimentError(f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError is no ValueError
        raise ExperimentError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ExperimentError(f"{path}: expected a mapping of name, mode and arms")
    return document


def _field_message(error: ValidationError) -> str:
    """The first error of a validation as `field.path: message`."""
    first = error.errors(include_input=False, include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "experiment"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a field of an experiment"
    # Checks of the whole experiment name their field themselves ("arms: names must be unique").
    return message if field == "experiment" else f"{field}: {message}"


def publish_arm_ranker(
    lake: Lake, experiment: str, arm: str, model_text: str, info: Mapping[str, Any]
) -> None:
    """Copies a ranker arm's model into the lake, where every replica finds it.

    Args:
        lake: The lake.
        experiment: The experiment's name.
        arm: The arm's name.
        model_text: The LightGBM booster as text (the model store's `model.txt`).
        info: The model's info (its `model.json`: the feature list, the segment policy).
    """
    model_path, info_path = experiment_arm_ranker(experiment, arm)
    lake.write_text(model_text, model_path)
    lake.write_json(dict(info), info_path)


def read_arm_ranker(lake: Lake, experiment: str, arm: str) -> tuple[str, dict[str, Any]]:
    """A ranker arm's model as `publish_arm_ranker` copied it: `(model_text, info)`.

    Raises:
        ExperimentError: The copy is missing or unreadable.
    """
    model_path, info_path = experiment_arm_ranker(experiment, arm)
    try:
        return lake.read_text(model_path), lake.read_json(info_path)
    except (OSError, ValueError) as error:
        raise ExperimentError(
            f"the ranker of arm '{arm}' is not in {lake.uri(model_path)}: {error}"
        ) from None


class ArmResult(BaseModel):
    """One arm's online results (written by the pipeline's `experiment_results`).

    Rates are per impression; `*_low`/`*_high` bound a 95% interval; the lift is relative to
    the control arm (null for the control itself).
    """

    model_config = ConfigDict(extra="ignore")

    arm: str
    impressions: int
    clicks: int
    carts: int
    purchases: int
    revenue_per_impression: float | None = None
    ctr: float | None = None
    ctr_low: float | None = None
    ctr_high: float | None = None
    lift_vs_control: float | None = None
    lift_low: float | None = None
    lift_high: float | None = None


class InterleavingResult(BaseModel):
    """Which arm won how many interleaved lists, and the test of the difference."""

    model_config = ConfigDict(extra="ignore")

    wins: dict[str, int]
    ties: int
    p_value: float | None = None


class ExperimentResults(BaseModel):
    """The latest results of one experiment."""

    model_config = ConfigDict(extra="ignore")

    updated_at: datetime
    arms: list[ArmResult]
    interleaving: InterleavingResult | None = None
    winner: str | None = None


def write_results(lake: Lake, results: Mapping[str, ExperimentResults]) -> None:
    """Writes the latest results, experiment name → results (one JSON object, atomically)."""
    document = {name: result.model_dump(mode="json") for name, result in results.items()}
    lake.write_text(json.dumps(document, indent=2) + "\n", EXPERIMENT_RESULTS)


def read_results(lake: Lake) -> dict[str, ExperimentResults]:
    """The latest results by experiment name (none before the pipeline computed any).

    An entry that does not fit `ExperimentResults` is logged and left out, so one bad entry
    hides only itself.

    Raises:
        ExperimentError: The file exists but is not a JSON object.
    """
    if not lake.exists(EXPERIMENT_RESULTS):
        return {}
    try:
        document = json.loads(lake.read_text(EXPERIMENT_RESULTS))
    except ValueError as error:
        raise ExperimentError(f"{lake.uri(EXPERIMENT_RESULTS)} is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ExperimentError(f"{lake.uri(EXPERIMENT_RESULTS)} is not a JSON object")
    results = {}
    for name, entry in document.items():
        try:
            results[name] = ExperimentResults.model_validate(entry)
        except ValidationError as error:
            logger.warning("results of experiment %s unreadable: %s", name, error)
    return results


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
