"""experiment_results on a real lake: simulated experiments (impressions and the events that carry
their rec_ids) through the real dbt build and the asset, and the winner promoted by the CLI.

The simulated shoppers click the items of one arm more often in some experiments and see no
difference in others; the asset must find the preferred arm and no winner where there is none,
count exactly what was simulated, and write the results in the shape the service serves."""

import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import lightgbm as lgb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from models.artifacts import read_mart
from orchestration.definitions import defs
from orchestration.resources import ShelfwiseResource
from shelfwise.contracts import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, conform
from shelfwise.experiments import (
    Arm,
    Experiment,
    ExperimentError,
    ExperimentResults,
    start_experiment,
    stop_experiment,
    winning_arm,
    write_experiments,
    write_results,
)
from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.lake import EVENTS, EXPERIMENT_RESULTS, IMPRESSIONS, Lake, partition_file
from shelfwise.runtime.registry import production, promote, register_ranker
from shelfwise.settings import Settings
from tests.support import VENV_BIN, service_env

SHOP = ShopConfig(users=600, items=150, days=28, events=12_000, seed=21, end_date=date(2026, 11, 1))
FIRST_DAY = datetime(2026, 11, 1, tzinfo=UTC)
RESPONSES_PER_USER = 3
ITEMS_PER_RESPONSE = 8

# The brief's results document (#18): exactly these keys.
RESULT_KEYS = {"updated_at", "arms", "interleaving", "winner"}
ARM_KEYS = {
    "arm",
    "impressions",
    "clicks",
    "carts",
    "purchases",
    "revenue_per_impression",
    "ctr",
    "ctr_low",
    "ctr_high",
    "lift_vs_control",
    "lift_low",
    "lift_high",
}


def tiny_ranker(seed: int) -> tuple[str, dict]:
    """A real LightGBM LambdaRank booster (a few trees on random data) and its info."""
    rng = np.random.default_rng(seed)
    features = rng.random((200, 3))
    labels = (features[:, 0] + rng.random(200) > 1.0).astype(int)
    data = lgb.Dataset(features, labels, group=[20] * 10)
    params = {"objective": "lambdarank", "verbosity": -1, "num_leaves": 4, "seed": seed}
    booster = lgb.train(params, data, num_boost_round=3)
    return booster.model_to_string(), {"features": ["a", "b", "c"]}


@dataclass
class Expected:
    """What the simulation wrote for one experiment, per arm (interleaving: per drafting arm)."""

    counts: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, arm: str, name: str, value: float) -> None:
        arm_counts = self.counts.setdefault(
            arm, {"impressions": 0, "clicks": 0, "carts": 0, "purchases": 0, "revenue": 0.0}
        )
        arm_counts[name] += value


@dataclass
class Simulation:
    """Impressions and events of simulated shoppers, and the totals they should give."""

    prices: dict[str, float]
    rng: np.random.Generator
    impressions: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    expected: dict[str, Expected] = field(default_factory=dict)

    def event(self, user: str, item: str, kind: str, rec_id: str, at: datetime, **extra) -> dict:
        row = {
            "event_id": uuid.UUID(int=int(self.rng.integers(0, 2**63))).hex,
            "occurred_at": at,
            "user_id": user,
            "session_id": f"s-{user}",
            "item_id": item,
            "event_type": kind,
            "quantity": 1,
            "price": None,
            "rec_id": rec_id,
            "source": "simulation",
            **extra,
        }
        self.events.append(row)
        return row

    def run(
        self,
        experiment: Experiment,
        users: list[str],
        items: list[str],
        preference: dict[str, float],
    ) -> None:
        """Each user gets a few responses; a shown item is clicked with the user's propensity
        times the preference for the arm that showed (or drafted) it; some clicks are carted,
        some carts bought (with a price, or without: the catalog's)."""
        expected = self.expected.setdefault(experiment.name, Expected())
        span = (experiment.stopped_at - experiment.started_at).total_seconds()
        arms = [arm.name for arm in experiment.arms]
        for user in users:
            propensity = self.rng.beta(2, 14)  # mean 1/8, unequal shoppers
            for _ in range(RESPONSES_PER_USER):
                rec_id = uuid.UUID(int=int(self.rng.integers(0, 2**63))).hex
                shown_at = experiment.started_at + timedelta(seconds=self.rng.random() * span)
                shown = self.rng.choice(items, ITEMS_PER_RESPONSE, replace=False)
                if experiment.mode == "split":
                    arm = experiment.arm_of(user).name
                    drafters = [None] * ITEMS_PER_RESPONSE
                else:
                    arm = "interleaved"
                    drafters = []
                    for _ in range(ITEMS_PER_RESPONSE // 2):  # team draft's coin per round
                        drafters += arms if self.rng.random() < 0.5 else arms[::-1]
                for position, (item, drafter) in enumerate(zip(shown, drafters, strict=True)):
                    counted = drafter or arm
                    self.impressions.append(
                        {
                            "rec_id": rec_id,
                            "shown_at": shown_at,
                            "user_id": user,
                            "item_id": item,
                            "position": position + 1,
                            "model_version": "shelfwise_ranker:test",
                            "strategy": "recommend:personalized",
                            "fallback_level": 0,
                            "experiment": experiment.name,
                            "arm": arm,
                            "drafted_by": drafter,
                        }
                    )
                    expected.add(counted, "impressions", 1)
                    if self.rng.random() >= min(1.0, propensity * preference[counted]):
                        continue
                    at = shown_at + timedelta(minutes=1)
                    view = self.event(user, item, "view", rec_id, at)
                    expected.add(counted, "clicks", 1)
                    if self.rng.random() < 0.2:  # a delivery repeated: counted once
                        self.events.append(dict(view))
                    if self.rng.random() < 0.2:  # viewed twice: still one click
                        self.event(user, item, "view", rec_id, at + timedelta(minutes=1))
                    if self.rng.random() >= 0.4:
                        continue
                    self.event(user, item, "add_to_cart", rec_id, at + timedelta(minutes=2))
                    expected.add(counted, "carts", 1)
                    if self.rng.random() >= 0.5:
                        continue
                    quantity = int(self.rng.integers(1, 4))
                    price = round(float(self.rng.uniform(2, 40)), 2)
                    if self.rng.random() < 0.3:
                        price_sent, price = None, self.prices[item]  # the catalog's price
                    else:
                        price_sent = price
                    self.event(
                        user,
                        item,
                        "purchase",
                        rec_id,
                        at + timedelta(minutes=5),
                        quantity=quantity,
                        price=price_sent,
                    )
                    expected.add(counted, "purchases", 1)
                    expected.add(counted, "revenue", price * quantity)
                # Feedback carrying the rec_id on an item the response did not show: not counted.
                unshown = next(i for i in items if i not in set(shown))
                self.event(user, unshown, "view", rec_id, shown_at + timedelta(minutes=3))


def sequential(lake: Lake, experiments: list[tuple[str, str, list[Arm]]]) -> list[Experiment]:
    """Starts and stops each experiment in turn through the book, one day each."""
    book = []
    for day, (name, mode, arms) in enumerate(experiments):
        started = FIRST_DAY + timedelta(days=day, hours=1)
        experiment = Experiment(name=name, mode=mode, arms=arms, started_at=started)
        start_experiment(lake, experiment)
        book.append(stop_experiment(lake, name, now=started + timedelta(hours=20)))
    return book


@dataclass(frozen=True)
class MeasuredLake:
    settings: Settings
    lake: Lake
    simulation: Simulation
    challenger: str
    result: object


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> MeasuredLake:
    """A small shop, two registered rankers (one in production), five simulated experiments,
    then the real dbt build and experiment_results materialized by Dagster."""
    home = tmp_path_factory.mktemp("experiment-results")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    shop = generate_shop(SHOP)
    write_shop(shop, lake, seed=SHOP.seed)
    current = register_ranker(settings.bentoml_home, *tiny_ranker(1), {"ndcg@10": 0.1})
    promote(settings.bentoml_home, current)
    challenger = register_ranker(settings.bentoml_home, *tiny_ranker(2), {"ndcg@10": 0.2})

    production_arm = Arm(name="production", kind="production")
    challenger_arm = Arm(name="challenger", kind="ranker", model=challenger)
    book = sequential(
        lake,
        [
            ("challenger-split", "split", [production_arm, challenger_arm]),
            ("null-split", "split", [production_arm, challenger_arm]),
            ("challenger-interleaved", "interleave", [production_arm, challenger_arm]),
            ("production-vs-popular", "split", [production_arm, Arm(name="pop", kind="popular")]),
            ("popular-wins", "split", [production_arm, Arm(name="pop", kind="popular")]),
        ],
    )
    items = pl.from_arrow(shop.items)
    prices = dict(zip(items.get_column("item_id"), items.get_column("price"), strict=True))
    simulation = Simulation(prices=prices, rng=np.random.default_rng(2026))
    users = pl.from_arrow(shop.users).get_column("user_id").to_list()
    catalog = sorted(prices)
    preferences = {
        "challenger-split": {"production": 1.0, "challenger": 1.5},
        "null-split": {"production": 1.0, "challenger": 1.0},
        "challenger-interleaved": {"production": 1.0, "challenger": 1.5},
        "production-vs-popular": {"production": 1.0, "pop": 0.6},
        "popular-wins": {"production": 1.0, "pop": 1.6},
    }
    for experiment in book:
        simulation.run(experiment, users, catalog, preferences[experiment.name])
    # Written where the service's compacted feedback lands, one file per day.
    for name, rows, schema, column, folder in (
        ("impressions", simulation.impressions, IMPRESSIONS_SCHEMA, "shown_at", IMPRESSIONS),
        ("events", simulation.events, EVENTS_SCHEMA, "occurred_at", EVENTS),
    ):
        frame = pl.from_arrow(conform(pa.Table.from_pylist(rows, schema=schema), schema, name))
        for (day,), part in frame.group_by(pl.col(column).dt.date(), maintain_order=True):
            lake.write_parquet(part.to_arrow(), partition_file(folder, day, "simulated"))

    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    # The asset and what it reads: ingestion, then the dbt models upstream of the mart (and the
    # users, which a test of the events refers to).
    selection = (
        dg.AssetSelection.assets("experiment_results", "stg_lake__users")
        .upstream()
        .required_multi_asset_neighbors()
    )
    # The simulated experiments stopped weeks ago: chart them all the same.
    config = {"ops": {"experiment_results": {"config": {"chart_days": 10_000}}}}
    result = dg.materialize(
        defs.assets,
        selection=selection,
        resources=resources,
        run_config=config,
        raise_on_error=False,
    )
    return MeasuredLake(settings, lake, simulation, challenger, result)


def results(measured: MeasuredLake) -> dict:
    assert measured.result.success, [
        event.event_specific_data.error.to_string()[-2000:]
        for event in measured.result.all_events
        if event.event_type == dg.DagsterEventType.STEP_FAILURE
    ]
    return measured.lake.read_json(EXPERIMENT_RESULTS)


def test_the_mart_holds_every_shown_item_of_the_experiments_once(measured):
    results(measured)
    mart = read_mart(measured.lake, "experiment_outcomes")
    assert mart.height == len(measured.simulation.impressions)
    assert mart.select("rec_id", "item_id").is_duplicated().sum() == 0
    assert set(mart.get_column("experiment")) == set(measured.simulation.expected)


def test_the_counts_are_what_the_shoppers_did(measured):
    """Impressions, clicks (a repeated delivery or a second view count once; a view of an item
    the response did not show never), carts, purchases and revenue (price × quantity, the
    catalog's price when the event has none), per arm, as simulated."""
    document = results(measured)
    for name, expected in measured.simulation.expected.items():
        arms = {arm["arm"]: arm for arm in document[name]["arms"]}
        assert set(arms) == set(expected.counts)
        for arm, counts in expected.counts.items():
            got = arms[arm]
            for key in ("impressions", "clicks", "carts", "purchases"):
                assert got[key] == counts[key], (name, arm, key)
            revenue = counts["revenue"] / counts["impressions"]
            assert got["revenue_per_impression"] == pytest.approx(revenue, rel=1e-9)
            assert got["ctr"] == pytest.approx(counts["clicks"] / counts["impressions"])
            assert got["ctr_low"] < got["ctr"] < got["ctr_high"]


def test_the_arm_shoppers_prefer_wins_and_a_null_experiment_has_none(measured):
    document = results(measured)
    split = document["challenger-split"]
    assert split["winner"] == "challenger"
    control, challenger = split["arms"]
    assert control["arm"] == "production" and control["lift_vs_control"] is None
    assert 0 < challenger["lift_low"] < challenger["lift_vs_control"] < challenger["lift_high"]
    assert split["interleaving"] is None

    null = document["null-split"]
    assert null["winner"] is None
    lift = null["arms"][1]
    assert lift["lift_low"] < 0 < lift["lift_high"]

    assert document["production-vs-popular"]["winner"] == "production"
    assert document["popular-wins"]["winner"] == "pop"


def test_the_interleaved_arm_shoppers_prefer_wins_its_lists(measured):
    interleaving = results(measured)["challenger-interleaved"]
    assert interleaving["winner"] == "challenger"
    wins = interleaving["interleaving"]
    assert set(wins["wins"]) == {"production", "challenger"}
    assert wins["wins"]["challenger"] > wins["wins"]["production"] and wins["p_value"] < 0.05
    assert wins["ties"] >= 0
    assert all(arm["lift_vs_control"] is None for arm in interleaving["arms"])


def test_the_results_have_the_shape_the_service_serves(measured):
    document = results(measured)
    assert set(document) == set(measured.simulation.expected)
    for result in document.values():
        assert set(result) == RESULT_KEYS
        assert all(set(arm) == ARM_KEYS for arm in result["arms"])
        if result["interleaving"] is not None:
            assert set(result["interleaving"]) == {"wins", "ties", "p_value"}
        ExperimentResults.model_validate(result)  # and the typed reading of it


def test_the_materialization_carries_tables_and_numbers_per_arm(measured):
    results(measured)
    [materialization] = [
        event.materialization
        for event in measured.result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey("experiment_results")
    ]
    metadata = materialization.metadata
    assert metadata["experiments"].value == 5
    assert "**winner: challenger**" in metadata["results"].value
    assert metadata["challenger-split/challenger/ctr"].value > 0
    assert metadata["challenger-interleaved/challenger/lists_won"].value > 0
    assert metadata["null-split/winner"].value == "none"


def promote_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "shelfwise"), "models", "promote", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_winning_ranker_arm_is_promoted(measured):
    results(measured)
    settings = measured.settings
    before = production(settings.bentoml_home).source_tag
    assert before != measured.challenger

    refused = promote_cli(settings, "--winner-of", "null-split")
    assert refused.returncode == 2 and "has no winner" in refused.stderr
    assert production(settings.bentoml_home).source_tag == before

    refused = promote_cli(settings, "--winner-of", "popular-wins")
    assert refused.returncode == 2 and "no ranker to promote" in refused.stderr

    kept = promote_cli(settings, "--winner-of", "production-vs-popular")
    assert kept.returncode == 0 and "production stays" in kept.stdout
    assert production(settings.bentoml_home).source_tag == before

    promoted = promote_cli(settings, "--winner-of", "challenger-split")
    assert promoted.returncode == 0, promoted.stderr
    assert production(settings.bentoml_home).source_tag == measured.challenger
    assert f"Promoted {measured.challenger}" in promoted.stdout


def test_promote_takes_a_tag_or_an_experiment_not_both(measured):
    both = promote_cli(measured.settings, measured.challenger, "--winner-of", "challenger-split")
    neither = promote_cli(measured.settings)
    assert both.returncode == neither.returncode == 2
    assert "either a TAG or --winner-of" in both.stderr


# The refusals of `winning_arm`, on a lake with a hand-written book and results.


def book_with_results(tmp_path, winner: str | None, stopped: bool = True, stale: bool = False):
    lake = Lake(str(tmp_path / "lake"))
    started = datetime(2026, 11, 1, tzinfo=UTC)
    stopped_at = started + timedelta(days=2) if stopped else None
    experiment = Experiment(
        name="exp",
        mode="split",
        arms=[
            Arm(name="production", kind="production"),
            Arm(name="new", kind="ranker", model="shelfwise_ranker:abc"),
            Arm(name="order", kind="candidates"),
        ],
        started_at=started,
        stopped_at=stopped_at,
    )
    write_experiments(lake, [experiment])
    updated = started + timedelta(days=1 if stale else 3)
    write_results(
        lake,
        {"exp": ExperimentResults(updated_at=updated, arms=[], interleaving=None, winner=winner)},
    )
    return lake


def test_winning_arm_names_the_ranker_to_promote(tmp_path):
    arm = winning_arm(book_with_results(tmp_path, "new"), "exp")
    assert (arm.kind, arm.model) == ("ranker", "shelfwise_ranker:abc")


@pytest.mark.parametrize(
    ("winner", "stopped", "stale", "name", "message"),
    [
        ("new", True, False, "other", "no experiment named 'other'"),
        ("new", False, False, "exp", "still running: stop it first"),
        ("new", True, True, "exp", "computed before it stopped"),
        (None, True, False, "exp", "has no winner"),
        ("order", True, False, "exp", "serves the candidate order without a ranker"),
    ],
)
def test_winning_arm_refuses_with_the_reason(tmp_path, winner, stopped, stale, name, message):
    lake = book_with_results(tmp_path, winner, stopped, stale)
    with pytest.raises(ExperimentError, match=message):
        winning_arm(lake, name, now=datetime(2026, 11, 10, tzinfo=UTC))


def test_winning_arm_wants_results_first(tmp_path):
    lake = book_with_results(tmp_path, "new")
    lake.remove([EXPERIMENT_RESULTS])
    with pytest.raises(ExperimentError, match="no results for 'exp' yet"):
        winning_arm(lake, "exp")
