"""Experiments on a real service: started and stopped with the CLI while requests keep coming,
served per arm (split) or interleaved, answered and logged with their experiment and arm, and
listed by `POST /experiments`."""

import json
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx
import polars as pl
import pytest

from models.ranker import booster_from_text
from shelfwise.cli import main
from shelfwise.experiments import ExperimentResults, read_experiments, write_results
from shelfwise.lake import IMPRESSIONS, SERVING_CANDIDATES, Lake
from shelfwise.runtime.registry import (
    describe_rankers,
    production,
    production_path,
    register_ranker,
)
from tests.support import served_copy

pytestmark = pytest.mark.slow

TOKEN = "experiments-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(pipeline_run, tmp_path_factory):
    """A server on a copy of the trained shop that reads the book every second and compacts its
    log every second, with a second registered ranker: production's first tree alone (a real,
    different LightGBM model on the same features)."""
    assert pipeline_run.result.success, pipeline_run.failures
    folder = tmp_path_factory.mktemp("experiments")
    env = {
        "SHELFWISE_EXPERIMENT_POLL_S": "1",
        "SHELFWISE_COMPACT_EVERY_S": "1",
        "SHELFWISE_MODEL_POLL_S": "0",
        "SHELFWISE_API_TOKEN": TOKEN,
    }
    with served_copy(pipeline_run.settings, folder, env) as (url, settings):
        home = settings.bentoml_home
        source = production(home).source_tag
        model_dir = production_path(home)
        [record] = [r for r in describe_rankers(home) if r.tag == source]
        text = (model_dir / "model.txt").read_text()
        small = booster_from_text(text).model_to_string(num_iteration=1)
        info = json.loads((model_dir / "model.json").read_text())
        challenger = register_ranker(home, small, info, record.metadata)
        users = (
            Lake(settings.lake_url)
            .read_frame(SERVING_CANDIDATES)
            .get_column("user_id")
            .unique()
            .sort()
            .to_list()
        )
        yield url, settings, source, challenger, users


@pytest.fixture
def cli(served, monkeypatch: pytest.MonkeyPatch):
    """`shelfwise …` on the served copy's state."""
    _, settings, *_ = served
    monkeypatch.setenv("SHELFWISE_HOME", str(settings.home))
    monkeypatch.setenv("SHELFWISE_LAKE", settings.lake_url)
    return lambda *args: main(list(args))


class Load:
    """Requests in a loop from a few threads, every status kept."""

    def __init__(self, url: str, users: list[str]) -> None:
        self.url, self.users = url, users
        self.statuses: Counter[int] = Counter()
        self.experiments: Counter[str | None] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(3)]

    def _run(self, seed: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = seed
            while not self._stop.is_set():
                user = self.users[n % len(self.users)]
                response = client.post(f"{self.url}/recommend", json={"user_id": user})
                self.statuses[response.status_code] += 1
                if response.is_success:
                    self.experiments[response.json()["experiment"]] += 1
                n += 7

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def recommend(url: str, user: str, k: int = 10) -> dict:
    response = httpx.post(f"{url}/recommend", json={"user_id": user, "k": k}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None or value is False:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)
    return value


def logged(settings, rec_ids: set[str]) -> pl.DataFrame:
    """The impressions of these responses once compacted into the lake (all of them)."""
    lake = Lake(settings.lake_url)

    def complete() -> pl.DataFrame | None:
        if not lake.exists(IMPRESSIONS):
            return None
        rows = lake.read_frame(IMPRESSIONS).filter(pl.col("rec_id").is_in(list(rec_ids)))
        return rows if rows.get_column("rec_id").n_unique() == len(rec_ids) else None

    return wait_for(complete, "the impressions in the lake")


def test_a_split_experiment_serves_each_user_one_arm_and_stops_without_a_restart(served, cli):
    url, settings, source, challenger, users = served
    nobody = f"nobody-{uuid.uuid4().hex}"
    with Load(url, users) as load:
        time.sleep(1.0)
        assert (
            cli(
                "experiments",
                "start",
                "--name",
                "split-1",
                "--arm",
                "control=production",
                "--arm",
                f"challenger=ranker:{challenger}",
                "--arm",
                "pop=popular@2",
            )
            == 0
        )
        wait_for(lambda: recommend(url, users[0])["experiment"] == "split-1", "the experiment")
        [experiment] = read_experiments(Lake(settings.lake_url))
        popular = [item["item_id"] for item in recommend(url, nobody, 100)["items"]]
        answers = {}
        for user in users[:90]:
            first, again = recommend(url, user), recommend(url, user)
            assert first["experiment"] == again["experiment"] == "split-1"
            assert first["arm"] == again["arm"] == experiment.arm_of(user).name
            assert all(item["arm"] is None for item in first["items"])
            answers[first["rec_id"]] = first
            answers[again["rec_id"]] = again
        by_arm = {
            arm.name: [a for a in answers.values() if a["arm"] == arm.name]
            for arm in experiment.arms
        }
        assert all(by_arm.values()), {name: len(a) for name, a in by_arm.items()}
        assert {a["model_version"] for a in by_arm["control"]} == {source}
        assert {a["model_version"] for a in by_arm["challenger"]} == {challenger}
        for answer in by_arm["pop"]:
            # The popular list, through the rules (a user's own purchases may drop out).
            ids = [item["item_id"] for item in answer["items"]]
            assert answer["strategy"] == "popular" and answer["fallback_level"] == 0
            assert {item["source"] for item in answer["items"]} == {"popular"}
            assert len(ids) == 10 and set(ids) <= set(popular)
            assert ids == sorted(ids, key=popular.index)

        assert cli("experiments", "stop", "split-1") == 0
        wait_for(lambda: recommend(url, users[0])["experiment"] is None, "production again")
        after = [recommend(url, user) for user in users[:20]]
    assert set(load.statuses) == {200}, load.statuses
    assert load.experiments["split-1"] > 0 and load.experiments[None] > 0
    assert all(a["experiment"] is None and a["arm"] is None for a in after)
    assert {a["model_version"] for a in after} == {source}

    rows = logged(settings, set(answers))
    assert set(rows.get_column("experiment")) == {"split-1"}
    assert rows.get_column("drafted_by").null_count() == rows.height
    for rec_id, answer in answers.items():
        mine = rows.filter(pl.col("rec_id") == rec_id).sort("position")
        assert set(mine.get_column("arm")) == {answer["arm"]}
        assert mine.get_column("item_id").to_list() == [i["item_id"] for i in answer["items"]]
        assert set(mine.get_column("model_version").to_list()) == {answer["model_version"]}
    after_rows = logged(settings, {a["rec_id"] for a in after})
    assert after_rows.get_column("experiment").null_count() == after_rows.height


def test_an_interleaved_experiment_labels_every_item_with_its_drafting_arm(served, cli):
    url, settings, source, challenger, users = served
    with Load(url, users) as load:
        started = cli(
            "experiments",
            "start",
            "--name",
            "interleave-1",
            "--mode",
            "interleave",
            "--arm",
            "control=production",
            "--arm",
            f"challenger=ranker:{challenger[:24]}",  # a prefix of the version is enough
        )
        assert started == 0
        wait_for(lambda: recommend(url, users[1])["experiment"] == "interleave-1", "interleaving")
        answers = [recommend(url, user) for user in users[:40]]
        assert cli("experiments", "stop", "interleave-1") == 0
        wait_for(lambda: recommend(url, users[1])["experiment"] is None, "production again")
    assert set(load.statuses) == {200}, load.statuses

    drafters: Counter[str] = Counter()
    for answer in answers:
        assert answer["experiment"] == "interleave-1" and answer["arm"] == "interleaved"
        arms = [item["arm"] for item in answer["items"]]
        assert set(arms) <= {"control", "challenger"} and len(arms) == 10
        assert abs(arms.count("control") - arms.count("challenger")) <= 1
        assert len({item["item_id"] for item in answer["items"]}) == 10
        drafters.update(arms)
    assert drafters["control"] > 0 and drafters["challenger"] > 0

    rows = logged(settings, {answer["rec_id"] for answer in answers})
    assert set(rows.get_column("arm")) == {"interleaved"}
    versions = {"control": source, "challenger": challenger}  # the prefix resolved at start
    for answer in answers:
        assert answer["model_version"] == source  # the control's
        mine = rows.filter(pl.col("rec_id") == answer["rec_id"]).sort("position")
        assert mine.get_column("item_id").to_list() == [i["item_id"] for i in answer["items"]]
        drafted = mine.get_column("drafted_by").to_list()
        assert drafted == [item["arm"] for item in answer["items"]]
        assert mine.get_column("model_version").to_list() == [versions[by] for by in drafted]


def test_the_experiments_endpoint_lists_the_book_with_results_behind_the_token(served, cli):
    url, settings, *_ = served
    lake = Lake(settings.lake_url)

    def listed() -> dict[str, dict]:
        response = httpx.post(f"{url}/experiments", json={}, headers=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return {entry["name"]: entry for entry in response.json()["experiments"]}

    assert httpx.post(f"{url}/experiments", json={}, timeout=10).status_code == 401
    bad = httpx.post(f"{url}/experiments", json={"x": 1}, headers=AUTH, timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "x"
    args = ["--name", "listed-1", "--arm", "control=production", "--arm", "order=candidates"]
    assert cli("experiments", "start", *args) == 0
    entry = listed()["listed-1"]
    assert entry["status"] == "running" and entry["mode"] == "split"
    assert entry["stopped_at"] is None and entry["results"] is None
    assert entry["arms"] == [
        {"name": "control", "kind": "production", "model": None, "share": 1.0},
        {"name": "order", "kind": "candidates", "model": None, "share": 1.0},
    ]
    write_results(
        lake,
        {
            "listed-1": ExperimentResults(
                updated_at=datetime.now(UTC),
                arms=[
                    {"arm": "control", "impressions": 100, "clicks": 7, "carts": 2, "purchases": 1},
                    {"arm": "order", "impressions": 90, "clicks": 3, "carts": 0, "purchases": 0},
                ],
                winner="control",
            )
        },
    )
    assert cli("experiments", "stop", "listed-1") == 0
    book = listed()
    assert list(book) == [experiment.name for experiment in read_experiments(lake)]
    entry = book["listed-1"]
    assert entry["status"] == "stopped" and entry["stopped_at"] is not None
    assert entry["results"]["winner"] == "control"
    assert [arm["arm"] for arm in entry["results"]["arms"]] == ["control", "order"]
    assert all(e["results"] is None for name, e in book.items() if name != "listed-1")
