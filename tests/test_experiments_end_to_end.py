"""An experiment from start to promotion, on a real service and generated shoppers.

`shelfwise experiments start` → the service serves the arms → simulated shoppers post views,
carts and purchases with the rec_ids they were shown to /events → the service compacts its log
into the lake → the real dbt build and `experiment_results` → `shelfwise models promote
--winner-of` → the service answers with the winner. Three experiments run in turn on the trained
shop: a split and an interleaving whose shoppers prefer the challenger's items, and a split of
identical arms whose shoppers cannot tell them apart."""

import json
import time
import uuid
import zlib

import dagster as dg
import httpx
import numpy as np
import pytest

from orchestration.definitions import defs
from orchestration.resources import ShelfwiseResource
from shelfwise.cli import main
from shelfwise.lake import EVENTS, EXPERIMENT_RESULTS, IMPRESSIONS, SERVING_CANDIDATES, Lake
from shelfwise.runtime.registry import (
    describe_rankers,
    production,
    production_path,
    register_ranker,
)
from tests.support import served_copy

pytestmark = pytest.mark.slow

ROUNDS = 2  # responses per shopper and experiment
K = 8
# Click probabilities by the arm that served (split) or drafted (interleave) the item.
PREFERS_CHALLENGER = {"control": 0.12, "challenger": 0.24}
INDIFFERENT = {"control": 0.15, "twin": 0.15}


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)
    return value


def recommend(client: httpx.Client, url: str, user: str) -> dict:
    response = client.post(f"{url}/recommend", json={"user_id": user, "k": K})
    assert response.status_code == 200, response.text
    return response.json()


def shoppers(
    client: httpx.Client, url: str, users: list[str], name: str, clicks: dict[str, float]
) -> tuple[set[str], int]:
    """Every user asks for recommendations and acts on them: a shown item is viewed with the
    probability of its arm, a viewed one carted with 0.3, a carted one bought with 0.5. The
    draws are seeded by experiment and user, so the same answers give the same feedback.

    Returns:
        The rec_ids of the experiment's responses and the number of events posted.
    """
    rec_ids, events = set(), []
    for user in users:
        rng = np.random.default_rng([zlib.crc32(name.encode()), zlib.crc32(user.encode())])
        for _ in range(ROUNDS):
            answer = recommend(client, url, user)
            if answer["experiment"] != name:
                continue  # a replica that has not read the book yet: not part of it
            rec_ids.add(answer["rec_id"])
            for item in answer["items"]:
                arm = item["arm"] or answer["arm"]
                if rng.random() >= clicks[arm]:
                    continue
                kinds = ["view"]
                if rng.random() < 0.3:
                    kinds.append("add_to_cart")
                    if rng.random() < 0.5:
                        kinds.append("purchase")
                for kind in kinds:
                    event = {
                        "event_id": uuid.uuid4().hex,
                        "user_id": user,
                        "item_id": item["item_id"],
                        "event_type": kind,
                        "rec_id": answer["rec_id"],
                    }
                    if kind == "purchase":
                        event |= {"price": 9.5, "quantity": 2}
                    events.append(event)
    for start in range(0, len(events), 100):
        response = client.post(f"{url}/events", json={"events": events[start : start + 100]})
        assert response.status_code == 200 and not response.json()["rejected"], response.text
    return rec_ids, len(events)


def run_experiment(cli, client, url, users, name: str, arms: list[str], clicks, mode="split"):
    """Starts an experiment, waits until it is served, lets the shoppers shop, stops it.

    Returns:
        The rec_ids of all its responses and the number of events the shoppers posted.
    """
    args = ["--name", name, "--mode", mode]
    for arm in arms:
        args += ["--arm", arm]
    assert cli("experiments", "start", *args) == 0
    probes: set[str] = set()  # responses of the experiment while waiting for it: logged too

    def served(expected: str | None) -> bool:
        answer = recommend(client, url, users[0])
        if answer["experiment"] == name:
            probes.add(answer["rec_id"])
        return answer["experiment"] == expected

    wait_for(lambda: served(name), f"{name} served")
    rec_ids, events = shoppers(client, url, users, name, clicks)
    assert cli("experiments", "stop", name) == 0
    wait_for(lambda: served(None), "production again")
    return rec_ids | probes, events


def in_lake(lake: Lake, rec_ids: set[str], events: int) -> bool:
    """Whether the service compacted every impression of these responses and every event."""
    if not lake.exists(IMPRESSIONS) or not lake.exists(EVENTS):
        return False
    wanted = list(rec_ids)
    shown = lake.read_frame(IMPRESSIONS, columns=["rec_id"]).get_column("rec_id")
    carried = lake.read_frame(EVENTS, columns=["rec_id"]).get_column("rec_id")
    return (
        shown.filter(shown.is_in(wanted)).n_unique() == len(rec_ids)
        and carried.is_in(wanted).sum() >= events
    )


def test_an_experiment_is_started_served_measured_and_its_winner_promoted(
    pipeline_run, tmp_path, monkeypatch
):
    assert pipeline_run.result.success, pipeline_run.failures
    env = {
        "SHELFWISE_EXPERIMENT_POLL_S": "1",
        "SHELFWISE_COMPACT_EVERY_S": "1",
        "SHELFWISE_MODEL_POLL_S": "1",
    }
    with served_copy(pipeline_run.settings, tmp_path, env) as (url, settings):
        home = settings.bentoml_home
        monkeypatch.setenv("SHELFWISE_HOME", str(settings.home))
        monkeypatch.setenv("SHELFWISE_LAKE", settings.lake_url)

        def cli(*args: str) -> int:
            return main(list(args))

        # The challenger: production's ranker registered again (a ranker arm of its own tag).
        source = production(home).source_tag
        [record] = [r for r in describe_rankers(home) if r.tag == source]
        folder = production_path(home)
        info = json.loads((folder / "model.json").read_text())
        challenger = register_ranker(
            home, (folder / "model.txt").read_text(), info, record.metadata
        )
        lake = Lake(settings.lake_url)
        users = lake.read_frame(SERVING_CANDIDATES).get_column("user_id").unique().sort().to_list()
        control, rival = "control=production", f"challenger=ranker:{challenger}"

        with httpx.Client(timeout=30) as client:
            split = run_experiment(
                cli, client, url, users, "e2e-split", [control, rival], PREFERS_CHALLENGER
            )
            interleaved = run_experiment(
                cli,
                client,
                url,
                users,
                "e2e-interleave",
                [control, rival],
                PREFERS_CHALLENGER,
                mode="interleave",
            )
            twin = f"twin=ranker:{challenger}"
            null = run_experiment(cli, client, url, users, "e2e-null", [control, twin], INDIFFERENT)
        rec_ids = split[0] | interleaved[0] | null[0]
        events = split[1] + interleaved[1] + null[1]
        wait_for(lambda: in_lake(lake, rec_ids, events), "the feedback in the lake")

        # The pipeline's measurement: ingestion, the dbt models of the mart, the asset.
        resources = {
            **defs.resources,
            "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
        }
        selection = (
            dg.AssetSelection.assets("experiment_results", "stg_lake__users")
            .upstream()
            .required_multi_asset_neighbors()
        )
        run = dg.materialize(defs.assets, selection=selection, resources=resources)
        assert run.success
        results = lake.read_json(EXPERIMENT_RESULTS)
        assert set(results) == {"e2e-split", "e2e-interleave", "e2e-null"}
        assert results["e2e-split"]["winner"] == "challenger"
        assert results["e2e-interleave"]["winner"] == "challenger"
        assert results["e2e-interleave"]["interleaving"]["p_value"] < 0.05
        assert results["e2e-null"]["winner"] is None
        for name, shown in (("e2e-split", split), ("e2e-null", null)):
            arms = results[name]["arms"]
            # Every response of the experiment, K items each.
            assert sum(arm["impressions"] for arm in arms) == len(shown[0]) * K
            assert all(arm["clicks"] > 0 and arm["purchases"] > 0 for arm in arms)
            assert all(arm["revenue_per_impression"] > 0 for arm in arms)

        # No winner, nothing promoted; the winner's ranker promoted, and served.
        assert cli("models", "promote", "--winner-of", "e2e-null") == 2
        assert production(home).source_tag == source
        assert cli("models", "promote", "--winner-of", "e2e-split") == 0
        assert production(home).source_tag == challenger
        with httpx.Client(timeout=30) as client:
            wait_for(
                lambda: recommend(client, url, users[0])["model_version"] == challenger,
                "the service to serve the promoted winner",
            )
