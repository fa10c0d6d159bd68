"""The loop closed end to end: feedback posted to the running service → the feedback sensor
requests the retraining job → the run promotes a new ranker → the service answers with it. And a
ranker that fails the gate changes nothing in production."""

import time
import uuid
from datetime import UTC, datetime

import dagster as dg
import httpx
import polars as pl
import pytest

from models.artifacts import read_mart
from models.attribution import attribution_totals
from orchestration.automation import feedback_volume
from orchestration.definitions import bound_to
from orchestration.resources import ShelfwiseResource
from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.lake import SERVING_CANDIDATES, Lake
from shelfwise.runtime.registry import production
from shelfwise.settings import Settings
from tests.support import served_from_source

THRESHOLD = 300
KINDS = ("view", "view", "add_to_cart", "purchase")


def loop_definitions(settings: Settings) -> dg.Definitions:
    """The project's definitions, bound to this test's state."""
    shelfwise = ShelfwiseResource(
        home=str(settings.home), lake_url=settings.lake_url, retrain_after_events=THRESHOLD
    )
    return bound_to(shelfwise)


@pytest.fixture(scope="module")
def shop_today(tmp_path_factory):
    """A shop whose data runs up to today, trained and promoted once, and served with fast
    polling and compaction."""
    home = tmp_path_factory.mktemp("loop")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home / "home")})
    prepare_home(settings)
    config = ShopConfig(
        users=800, items=400, days=35, events=60_000, seed=5, end_date=datetime.now(UTC).date()
    )
    write_shop(generate_shop(config), Lake(settings.lake_url), seed=config.seed)
    definitions = loop_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    first = definitions.resolve_job_def("retraining").execute_in_process(instance=instance)
    assert first.success
    env = {"SHELFWISE_MODEL_POLL_S": "1", "SHELFWISE_COMPACT_EVERY_S": "1"}
    with served_from_source(settings, home, env) as url:
        yield url, settings, definitions, instance


def evaluate_sensor(definitions, instance, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=definitions.resources
    )
    return feedback_volume(context), context.cursor


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.5)


def post_feedback(url: str, settings: Settings, count: int) -> None:
    """Shoppers act on what they were shown: views, carts and purchases carrying the rec_id."""
    users = (
        Lake(settings.lake_url).read_frame(SERVING_CANDIDATES).get_column("user_id").unique()
    ).sort()
    events = []
    for user in users.to_list():
        answer = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=10).json()
        for item, kind in zip(answer["items"], KINDS, strict=False):
            events.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "user_id": user,
                    "item_id": item["item_id"],
                    "event_type": kind,
                    "rec_id": answer["rec_id"],
                }
            )
        if len(events) >= count:
            break
    for start in range(0, count, 100):
        response = httpx.post(f"{url}/events", json={"events": events[start : start + 100]})
        assert response.status_code == 200 and not response.json()["rejected"]


def served_version(url: str, settings: Settings) -> str:
    user = Lake(settings.lake_url).read_frame(SERVING_CANDIDATES).get_column("user_id")[0]
    return httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=10).json()[
        "model_version"
    ]


def test_feedback_triggers_a_retraining_that_the_service_picks_up(shop_today):
    url, settings, definitions, instance = shop_today
    before = production(settings.bentoml_home).source_tag
    assert served_version(url, settings) == before

    request, cursor = evaluate_sensor(definitions, instance)
    assert isinstance(request, dg.SkipReason)  # nothing new yet

    post_feedback(url, settings, THRESHOLD + 100)
    # The service compacts its log into the lake; the sensor then sees the feedback.
    evaluations = []

    def requested() -> dg.RunRequest | None:
        evaluations.append(evaluate_sensor(definitions, instance, cursor)[0])
        return evaluations[-1] if isinstance(evaluations[-1], dg.RunRequest) else None

    request = wait_for(requested, what=lambda: f"a run request; last: {evaluations[-1]}")
    again, _ = evaluate_sensor(definitions, instance, cursor)
    assert again.run_key == request.run_key  # a repeated tick asks for the same run
    assert request.run_key.startswith(before)

    run = definitions.resolve_job_def("retraining").execute_in_process(
        instance=instance, tags=request.tags
    )
    assert run.success
    after = production(settings.bentoml_home).source_tag
    assert after != before
    wait_for(lambda: served_version(url, settings) == after, what="the service to swap models")

    # The feedback is attributed to the responses it came from.
    daily = read_mart(Lake(settings.lake_url), "feedback_attribution")
    totals = attribution_totals(daily.filter(pl.col("model_version") == before))
    assert totals.get_column("impressions").sum() >= THRESHOLD
    assert totals.get_column("clicks").sum() > 0 and totals.get_column("purchases").sum() > 0

    # The new production model's feedback count starts again from zero.
    skipped, _ = evaluate_sensor(definitions, instance)
    assert isinstance(skipped, dg.SkipReason)


def test_a_ranker_that_fails_the_gate_leaves_production_serving(shop_today):
    url, settings, definitions, instance = shop_today
    before = production(settings.bentoml_home).source_tag
    impossible = {"ops": {"registered_model": {"config": {"min_paired_lower_bound": 10.0}}}}
    run = definitions.resolve_job_def("retraining").execute_in_process(
        instance=instance, run_config=impossible, raise_on_error=False
    )
    gate = [
        evaluation
        for evaluation in run.get_asset_check_evaluations()
        if evaluation.check_name == "promotion_gate"
    ]
    assert gate and not gate[0].passed
    assert production(settings.bentoml_home).source_tag == before
    time.sleep(2.5)  # more than one poll of the service
    assert served_version(url, settings) == before


def test_the_sensor_waits_for_a_production_model(tmp_path):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path)})
    prepare_home(settings)
    skipped, _ = evaluate_sensor(loop_definitions(settings), dg.DagsterInstance.ephemeral())
    assert isinstance(skipped, dg.SkipReason) and "No production model" in skipped.skip_message


def test_shelfwise_retrain_runs_the_job_through_dagster(tmp_path):
    """`shelfwise retrain` launches the retraining job in DAGSTER_HOME; on an empty lake the
    run fails at its first asset with the reason, and the command says so with its exit code."""
    import subprocess

    from tests.support import VENV_BIN, service_env

    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path)})
    result = subprocess.run(
        [str(VENV_BIN / "shelfwise"), "retrain"],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "holds no events" in result.stdout + result.stderr
    from dagster._core.instance.ref import InstanceRef

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(settings.dagster_home)))
    [run] = instance.get_runs()
    assert run.job_name == "retraining"
