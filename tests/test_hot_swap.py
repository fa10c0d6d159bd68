"""A newly promoted model reaches the running service without a restart, under load, without a
failed request."""

import json
import re
import threading
import time

import httpx

from shelfwise.lake import SERVING_CANDIDATES, Lake
from shelfwise.runtime.registry import (
    describe_rankers,
    production,
    production_path,
    promote,
    register_ranker,
)
from tests.support import served_copy


def test_a_promoted_model_is_swapped_in_under_load_without_a_failed_request(pipeline_run, tmp_path):
    assert pipeline_run.result.success, pipeline_run.failures
    env = {"SHELFWISE_MODEL_POLL_S": "0"}  # only /admin/reload: the test decides the moment
    with served_copy(pipeline_run.settings, tmp_path, env) as (url, settings):
        home = settings.bentoml_home
        old = production(home).source_tag
        user = Lake(settings.lake_url).read_frame(SERVING_CANDIDATES).get_column("user_id")[0]
        # A second, real ranker version: the production booster registered anew.
        model_dir = production_path(home)
        [record] = [r for r in describe_rankers(home) if r.tag == old]
        new = register_ranker(
            home,
            (model_dir / "model.txt").read_text(),
            json.loads((model_dir / "model.json").read_text()),
            record.metadata,
        )
        results: list[tuple[float, int, str | None]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    response = client.post(f"{url}/recommend", json={"user_id": user})
                    version = response.json().get("model_version") if response.is_success else None
                    results.append((started, response.status_code, version))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        promote(home, new)
        reload = httpx.post(f"{url}/admin/reload", json={}, timeout=30)
        swapped_at = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join()
        # The new production version carries no compiled library (promoted without the
        # pipeline's hook): LightGBM serves it at once, and the service compiles it in the
        # background, then serves it compiled.
        engine = re.compile(r'^shelfwise_ranker_engine\{[^}]*engine="compiled"[^}]*\} 1\.0$', re.M)
        deadline = time.monotonic() + 180
        while not engine.search(metrics := httpx.get(f"{url}/metrics", timeout=10).text):
            assert time.monotonic() < deadline, "the swapped-in model was never compiled"
            time.sleep(0.5)
        after = httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=10)
        compiled_dir = settings.compiled_ranker_dir

    assert reload.status_code == 200 and reload.json() == {"reloaded": True, "model_version": new}
    assert results and {status for _, status, _ in results} == {200}
    assert {version for _, _, version in results} == {old, new}
    # Every request that started after the swap answered with the new version.
    assert {version for started, _, version in results if started > swapped_at} == {new}
    assert any(version == old for started, _, version in results if started < swapped_at)
    assert engine.search(metrics)
    assert any(compiled_dir.glob("*/ranker.lleaves.o"))
    assert after.status_code == 200 and after.json()["model_version"] == new
