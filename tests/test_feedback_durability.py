"""`kill -9` of the whole server: after a restart every acknowledged event is in the lake exactly
once, re-sending it is answered as a duplicate (the seen ids are restored from the log and the
lake), and every acknowledged stock update is in force again."""

import os
import signal
import threading
import time
import uuid

import httpx
import polars as pl
import pytest

from shelfwise.lake import EVENTS, SERVING_CANDIDATES, Lake
from shelfwise.runtime.feedback import OUTPUT_PREFIX, compact_feedback
from tests.support import copy_state, processes_serving, served_from_source


def test_no_acknowledged_event_is_lost_or_doubled_by_a_kill_9_nor_by_resending_it(
    pipeline_run, tmp_path
):
    assert pipeline_run.result.success, pipeline_run.failures
    settings = copy_state(pipeline_run.settings, tmp_path)
    env = {"SHELFWISE_COMPACT_EVERY_S": "1"}  # compaction runs during the load, too
    acknowledged: list[str] = []
    stop = threading.Event()

    def post_batches(url: str) -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                batch = [
                    {
                        "event_id": uuid.uuid4().hex,
                        "user_id": "u1",
                        "item_id": "i1",
                        "event_type": "view",
                    }
                    for _ in range(50)
                ]
                try:
                    response = client.post(f"{url}/events", json={"events": batch})
                except httpx.HTTPError:
                    return  # the server is gone: what was not acknowledged may be lost
                if response.status_code == 200:
                    assert response.json()["accepted"] == len(batch)
                    acknowledged.extend(event["event_id"] for event in batch)

    with served_from_source(settings, tmp_path, env) as url:
        threads = [threading.Thread(target=post_batches, args=(url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        victims = processes_serving(settings)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=30)
        stop.set()
    assert len(acknowledged) > 1000

    # A restart compacts what the killed workers left in the log.
    (tmp_path / "restart").mkdir()
    lake = Lake(settings.lake_url)

    def published() -> list[str]:
        files = [
            f for f in lake.list_files(EVENTS) if f.rsplit("/", 1)[1].startswith(OUTPUT_PREFIX)
        ]
        return [i for f in files for i in lake.read_frame(f).get_column("event_id").to_list()]

    with served_from_source(settings, tmp_path / "restart", env) as url:
        deadline = time.monotonic() + 60
        while len(set(published())) < len(acknowledged) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert set(acknowledged) <= set(published())

        # The client never heard back for some batches and re-sends everything: each event it
        # was told about is a duplicate (its id restored from the lake and the killed log).
        answers = []
        with httpx.Client(timeout=30) as client:
            for start in range(0, len(acknowledged), 1000):
                batch = [
                    {"event_id": event_id, "user_id": "u1", "item_id": "i1", "event_type": "view"}
                    for event_id in acknowledged[start : start + 1000]
                ]
                response = client.post(f"{url}/events", json={"events": batch})
                assert response.status_code == 200
                answers.append(response.json())
        assert sum(answer["accepted"] for answer in answers) == 0
        assert sum(answer["duplicates"] for answer in answers) == len(acknowledged)

    compact_feedback(settings.wal_dir, lake)  # whatever the stopped server still logged
    event_ids = published()
    assert set(acknowledged) <= set(event_ids)
    assert pl.Series(event_ids).is_duplicated().sum() == 0


# With compaction off the update is still only in the log when the server dies.
@pytest.mark.parametrize("compact_every_s", ["30", "0"])
def test_an_acknowledged_stock_update_survives_a_kill_9(pipeline_run, tmp_path, compact_every_s):
    assert pipeline_run.result.success, pipeline_run.failures
    settings = copy_state(pipeline_run.settings, tmp_path)
    user = Lake(settings.lake_url).read_frame(SERVING_CANDIDATES).get_column("user_id").min()

    def shown(url: str, **body) -> list[str]:
        response = httpx.post(f"{url}/recommend", json={"user_id": user, **body}, timeout=10)
        assert response.status_code == 200
        return [item["item_id"] for item in response.json()["items"]]

    env = {"SHELFWISE_COMPACT_EVERY_S": compact_every_s}
    with served_from_source(settings, tmp_path, env) as url:
        sold_out = shown(url)[0]
        update = {"stock": [{"item_id": sold_out, "is_in_stock": False}]}
        response = httpx.post(f"{url}/events", json=update, timeout=10)
        assert response.status_code == 200 and response.json()["stock_updates"] == 1
        assert sold_out not in shown(url)
        for pid in processes_serving(settings):
            os.kill(pid, signal.SIGKILL)

    (tmp_path / "restart").mkdir()
    with served_from_source(settings, tmp_path / "restart", env) as url:
        assert sold_out not in shown(url)
        assert sold_out in shown(url, filters={"in_stock_only": False})
