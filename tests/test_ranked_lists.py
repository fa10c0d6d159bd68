"""Ranked lists: a request without a session answered from its user's precomputed list gets
exactly the answer re-ranking gives (same items, order, sources, strategy, fallback level;
scores within the compiled ranker's 1e-6), whatever the filters, k and stock; lists are used only
for their own snapshot and model; in Redis each ranking is switched in whole and the one before
is removed; a real service answers from them and picks new ones up without a restart."""

import dataclasses
import random
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from models.business_rules import RequestFilters
from models.online_store import (
    load_version,
    ranked_info,
    write_from_lake,
    write_ranked,
    write_ranked_from_lake,
)
from models.ranked_lists import RankedListsInfo, decode_ranked, read_ranked_info
from models.ranker import booster_from_text
from models.recommender import Recommender
from models.segments import SegmentPolicy
from models.session import Session
from models.snapshot import CandidateSnapshot, snapshot_id
from shelfwise.lake import SERVING_RANKED_LISTS, Lake
from shelfwise.runtime import store_keys as keys
from shelfwise.runtime.online_state import StockChange
from shelfwise.runtime.registry import production, production_path, read_ranker
from tests.support import copy_state, redis_server, served_copy, served_from_source


@pytest.fixture(scope="module")
def production_recommender(pipeline_run) -> tuple[Recommender, str]:
    """The pipeline's snapshot with its production ranker (LightGBM), and that model's version."""
    assert pipeline_run.result.success, pipeline_run.failures
    home = pipeline_run.settings.bentoml_home
    text, info = read_ranker(production_path(home))
    recommender = Recommender.from_lake(
        pipeline_run.lake,
        booster_from_text(text),
        info["features"],
        segment_policy=SegmentPolicy.from_dict(info.get("segment_policy")),
    )
    return recommender, production(home).source_tag


def _same_answer(fast, full) -> None:
    assert [(i.item_id, i.source) for i in fast.items] == [
        (i.item_id, i.source) for i in full.items
    ]
    assert (fast.strategy, fast.fallback_level) == (full.strategy, full.fallback_level)
    np.testing.assert_allclose(
        [i.score for i in fast.items], [i.score for i in full.items], rtol=1e-6, atol=1e-6
    )


def test_the_pipeline_ranks_every_known_user_for_its_snapshot_and_production_model(
    pipeline_run, production_recommender
):
    recommender, model_version = production_recommender
    info = read_ranked_info(pipeline_run.lake)
    assert info is not None
    assert info.snapshot_id == snapshot_id(pipeline_run.lake)
    assert info.model_version == model_version
    assert 0 < info.users <= recommender.known_users
    store = recommender.store
    assert isinstance(store, CandidateSnapshot) and store.ranked is not None
    assert recommender.with_ranked_lists(model_version).answers_from_ranked_lists


def test_a_list_is_the_full_ranking_without_what_the_rules_always_reject(
    production_recommender,
):
    recommender, model_version = production_recommender
    store = recommender.store
    checked = 0
    for user_id in list(store.states)[:200]:
        listed = store.ranked_of(user_id)
        if listed is None:
            continue
        found = store.candidates_of(user_id)
        full = recommender.recommend(user_id, k=len(found.item_ids), need_rows=True)
        scores = full.rows.scores
        order = np.argsort(-scores, kind="stable")
        expected = [
            str(found.item_ids[row])
            for row in order
            if not recommender.rules.rejects_always(found.bought, str(found.item_ids[row]))
        ][: len(listed)]
        assert [item for item, _ in listed] == expected
        checked += 1
    assert checked > 50


def test_answers_from_lists_equal_re_ranking_whatever_the_request(production_recommender):
    recommender, model_version = production_recommender
    served = recommender.with_ranked_lists(model_version)
    users = list(served.store.states)
    categories = sorted({f.category_id for f in served.rules.items.values() if f.category_id})
    rng = random.Random(3)
    # Items at the top of many lists go out of stock (a posted update newer than the catalog).
    tops = [
        served.store.ranked_of(user)[0][0] for user in users[:50] if served.store.ranked_of(user)
    ]
    stock = {item: StockChange(False, 2**62) for item in tops[:5]}
    from_lists = requests = 0
    for user_id in users:
        for k, filters, changes in (
            (10, RequestFilters(), None),
            (3, RequestFilters(category_ids=frozenset(rng.sample(categories, 2))), None),
            (5, RequestFilters(price_max=30.0), stock),
            (10, RequestFilters(exclude_item_ids=frozenset(tops[:3])), stock),
            (40, RequestFilters(), None),  # more than a list holds
        ):
            fast = served.recommend(user_id, k, filters, stock=changes)
            full = served.recommend(user_id, k, filters, stock=changes, need_rows=True)
            assert full.rows is not None or full.strategy != "personalized"
            _same_answer(fast, full)
            requests += 1
            from_lists += fast.rows is None and full.rows is not None
    assert from_lists > requests * 0.3  # the default request of most users, at least


def test_answers_from_lists_equal_re_ranking_under_a_category_cap(pipeline_run):
    """The cap counts only items the rules allow, so lists without the always-rejected items
    walk to the same answer; the pipeline ranked them without any cap."""
    home = pipeline_run.settings.bentoml_home
    text, info = read_ranker(production_path(home))
    capped = Recommender.from_lake(
        pipeline_run.lake,
        booster_from_text(text),
        info["features"],
        max_per_category=1,
        segment_policy=SegmentPolicy.from_dict(info.get("segment_policy")),
    ).with_ranked_lists(production(home).source_tag)
    from_lists = 0
    for user_id in list(capped.store.states)[:300]:
        fast = capped.recommend(user_id, 4)
        _same_answer(fast, capped.recommend(user_id, 4, need_rows=True))
        from_lists += fast.rows is None
    assert from_lists > 0


def test_lists_answer_only_their_own_model_and_only_requests_without_activity(
    production_recommender,
):
    recommender, model_version = production_recommender
    assert not recommender.answers_from_ranked_lists  # not until asked for, with a model
    assert not recommender.with_ranked_lists("shelfwise_ranker:another").answers_from_ranked_lists
    served = recommender.with_ranked_lists(model_version)
    assert not served.with_ranker(served._booster).answers_from_ranked_lists  # an arm's model
    assert not served.without_ranker().answers_from_ranked_lists
    other_snapshot = served.store.with_ranked(
        dataclasses.replace(
            served.store.ranked, info=RankedListsInfo("another-snapshot", model_version, 16)
        )
    )
    assert (
        not served.with_store(other_snapshot)
        .with_ranked_lists(model_version)
        .answers_from_ranked_lists
    )
    user_id = next(u for u in served.store.states if served.store.ranked_of(u))
    assert served.recommend(user_id, 5).rows is None
    item = served.store.ranked_of(user_id)[3][0]
    for session in (Session((item,)), Session((), frozenset(), frozenset({item}))):
        answer = served.recommend(user_id, 5, session=session)
        assert answer.rows is not None  # re-ranked with the session
        assert item not in [i.item_id for i in answer.items] or session.item_ids


def test_rankings_switch_whole_in_redis_and_the_one_before_is_removed(pipeline_run, redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/7")
    client.flushdb()
    try:
        version = write_from_lake(client, pipeline_run.lake).version
        lake_info = read_ranked_info(pipeline_run.lake)
        store = load_version(client, version).store
        assert store.snapshot_id == lake_info.snapshot_id
        assert store.ranked_lists is None  # a version holds no lists until they are ranked
        held = Recommender.from_lake(pipeline_run.lake, None).store
        lists = [(user, held.ranked.at(row) or b"") for row, user in enumerate(held.states)]
        first = write_ranked(client, version, lists, lake_info)
        store = load_version(client, version).store
        assert store.ranked_lists == first == ranked_info(client, version)
        for user_id, value in lists[:100]:
            expected = (
                decode_ranked(value, held.table.ids, held.table.wide_codes) if value else None
            )
            assert store.ranked_of(user_id) == expected == held.ranked_of(user_id)
        second = write_ranked(client, version, lists[:10], lake_info)
        assert second.ranking == first.ranking + 1
        assert not list(client.scan_iter(keys.ranking_prefix(version, first.ranking) + "*"))
        kept = list(client.scan_iter(keys.ranking_prefix(version, second.ranking) + "*"))
        assert len(kept) == sum(bool(value) for _, value in lists[:10])
        # The store read under the first description finds its keys gone: it re-ranks.
        assert store.ranked_of(lists[0][0]) is None
    finally:
        client.flushdb()


def _assert_served_as_re_ranked(url: str, users: list[str], k: int) -> None:
    """Each user's plain answer (from the list) equals the explained one (re-ranked)."""
    for user_id in users:
        plain, explained = (
            httpx.post(
                f"{url}/recommend",
                json={"user_id": user_id, "k": k, "explain": explain},
                timeout=10,
            ).json()
            for explain in (False, True)  # an explained request is re-ranked
        )
        fast, full = ([(i["item_id"], i["source"]) for i in b["items"]] for b in (plain, explained))
        assert fast == full
        assert plain["strategy"] == explained["strategy"]
        np.testing.assert_allclose(
            [i["score"] for i in plain["items"]],
            [i["score"] for i in explained["items"]],
            rtol=1e-6,
            atol=1e-6,
        )


def test_a_service_answers_from_lists_as_it_would_by_re_ranking(bento_server, pipeline_run):
    users = sorted(Recommender.from_lake(pipeline_run.lake, None).store.states)[:40]
    _assert_served_as_re_ranked(bento_server.url, users, k=8)


def test_a_service_picks_up_lists_written_after_it_started(pipeline_run, tmp_path):
    settings = copy_state(pipeline_run.settings, tmp_path)
    ranked_file = Path(Lake(settings.lake_url).path(SERVING_RANKED_LISTS))
    aside = tmp_path / "ranked_lists.parquet"
    shutil.move(ranked_file, aside)
    with served_from_source(settings, tmp_path) as url:
        log = tmp_path / "bentoml.log"
        assert "switched in" not in log.read_text()
        shutil.move(aside, ranked_file)
        reloaded = httpx.post(f"{url}/admin/reload", json={}, timeout=30)
        assert reloaded.status_code == 200, reloaded.text
        assert "switched in (answering from them: True)" in log.read_text()


def test_a_replica_on_redis_switches_to_lists_written_into_its_version(pipeline_run, tmp_path):
    with redis_server(tmp_path) as redis_url:
        client = redis.Redis.from_url(redis_url)
        version = write_from_lake(client, pipeline_run.lake).version
        env = {"SHELFWISE_REDIS_URL": redis_url}
        with served_copy(pipeline_run.settings, tmp_path / "serve", env) as (url, _):
            log = tmp_path / "serve" / "bentoml.log"
            assert "switched in" not in log.read_text()
            written, ranking = write_ranked_from_lake(client, pipeline_run.lake)
            assert written == version and ranking is not None
            deadline = time.monotonic() + 10
            while "switched in (answering from them: True)" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            users = sorted(Recommender.from_lake(pipeline_run.lake, None).store.states)[:30]
            _assert_served_as_re_ranked(url, users, k=6)
