"""Explanations (`models/explanations.py`, `/recommend` with `"explain": true`) on the real model.

The pipeline's production ranker and serving snapshot, in process and through the served bento:
the contributions add up to the served score, the top three are the largest, the texts name the
row's values and the user's item that links a candidate.
"""

import math
import re

import httpx
import numpy as np
import polars as pl
import pytest

from models.candidates import GENERATORS
from models.explanations import (
    TEXTS,
    RecentLinks,
    explain_answer,
    feature_contributions,
    feature_text,
)
from models.features import FEATURE_COLUMNS
from models.ranker import booster_from_text
from models.recommender import FALLBACK_CANDIDATE_ORDER, FALLBACK_NONE, Recommender
from models.session import BOUGHT_TOGETHER, Session
from shelfwise.lake import SERVING_CANDIDATES
from shelfwise.runtime.registry import production_path, read_ranker

COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
# Features whose text states their (whole) value.
COUNTED = {
    "sources",
    "item_views_1d",
    "item_views_7d",
    "item_views_30d",
    "item_purchases_7d",
    "item_purchases_30d",
    "item_users_30d",
    "item_buyers",
    "user_events",
    "user_views",
    "user_carts",
    "user_purchases",
    "user_events_1d",
    "user_events_7d",
    "user_sessions",
    "user_item_views",
    "user_item_carts",
    "user_item_purchases",
    "user_category_purchases",
    "user_brand_purchases",
}


@pytest.fixture(scope="module")
def production(pipeline_run):
    """The production ranker's booster and features, and a recommender on the lake with it."""
    assert pipeline_run.result.success, pipeline_run.failures
    text, info = read_ranker(production_path(pipeline_run.settings.bentoml_home))
    booster = booster_from_text(text)
    recommender = Recommender.from_lake(pipeline_run.lake, booster, info["features"])
    return booster, info["features"], recommender


@pytest.fixture(scope="module")
def snapshot(pipeline_run) -> pl.DataFrame:
    return pipeline_run.lake.read_frame(SERVING_CANDIDATES)


@pytest.fixture(scope="module")
def users(snapshot) -> list[str]:
    sizes = snapshot.group_by("user_id").len().sort("len", "user_id", descending=[True, False])
    return sizes.get_column("user_id").head(25).to_list()


def row(number: float = math.nan, **values: float) -> np.ndarray:
    """A row of FEATURE_COLUMNS: every feature `number`, some set."""
    found = np.full(len(FEATURE_COLUMNS), number, dtype=np.float32)
    for name, value in values.items():
        found[COLUMN[name]] = value
    return found


def test_every_feature_has_a_text_of_its_own():
    assert set(FEATURE_COLUMNS) <= set(TEXTS)


def test_texts_name_the_values_of_the_row():
    bought = row(user_item_purchases=3, user_item_days_since_last_purchase=12.4)
    assert feature_text(bought, "user_item_purchases") == "bought 3 times, last 12 days ago"
    assert feature_text(row(user_item_purchases=0), "user_item_purchases") == "never bought by you"
    assert feature_text(row(), "user_item_purchases") == "never bought by you"
    once = row(user_item_views=1, user_item_days_since_last=0.5)
    assert feature_text(once, "user_item_views") == "viewed 1 time, last today"
    assert feature_text(row(history_score=1 / 4), "history_score") == "your #4 most recent item"
    assert feature_text(row(user_category_affinity=0.42), "user_category_affinity") == (
        "42% of your interest is in its category"
    )
    assert feature_text(row(item_age_days=3.7), "item_age_days") == "in the catalog for 3 days"
    assert feature_text(row(sources=4), "sources") == "proposed by 4 generators"
    # Without the user's items and the neighbours, a link is told generically.
    together = row(bought_together_score=0.5)
    assert feature_text(together, "bought_together_score") == "often bought with items you chose"
    for feature in FEATURE_COLUMNS:  # missing values are told too, never an empty text
        assert feature_text(row(), feature)
        assert feature_text(row(0.0), feature)


def test_contributions_add_up_to_the_served_score_and_the_top_three_are_the_largest(
    production, users
):
    booster, features, recommender = production
    explained = 0
    for user_id in users:
        answer = recommender.recommend(user_id, 10)
        assert answer.fallback_level == FALLBACK_NONE and answer.rows is not None
        explanations = explain_answer(answer, booster, features, recommender.neighbours)
        assert len(explanations) == len(answer.items)
        row_of = {item: n for n, item in enumerate(answer.rows.item_ids.tolist())}
        for item, explanation in zip(answer.items, explanations, strict=True):
            if item.item_id not in row_of:  # a popular item topping the list up
                assert explanation.generators == [item.source] == ["popular"]
                assert explanation.contributions == []
                continue
            values = answer.rows.matrix[row_of[item.item_id]]
            proposed = [g for g in GENERATORS if values[COLUMN[f"{g}_score"]] > 0]
            assert explanation.generators == proposed and item.source in proposed
            listed = explanation.contributions
            assert len(listed) == 3
            total = explanation.bias + sum(c.contribution for c in listed) + explanation.rest
            assert total == pytest.approx(item.score, abs=1e-5)
            # The three largest of all contributions, by absolute value, largest first.
            _, everything = feature_contributions(values[None, :], booster, features)
            largest = np.sort(np.abs(everything[0, :-1]))[::-1][:3]
            assert [abs(c.contribution) for c in listed] == pytest.approx(largest.tolist())
            for contribution in listed:
                value = float(values[COLUMN[contribution.feature]])
                if math.isnan(value):
                    assert contribution.value is None
                else:
                    assert contribution.value == value
                    if contribution.feature in COUNTED and value.is_integer():
                        assert str(int(value)) in contribution.text, contribution
                assert contribution.text
            explained += 1
    assert explained >= 100


def test_often_bought_with_names_a_recent_item_of_the_user_that_links_the_candidate(
    production, users
):
    _, _, recommender = production
    named = 0
    for user_id in users:
        rows = recommender.recommend(user_id, 10).rows
        links = RecentLinks(rows, recommender.neighbours)
        recent = set(links.recent())
        history = rows.matrix[:, COLUMN["history_score"]]
        assert recent == {str(i) for i, h in zip(rows.item_ids, history, strict=True) if h > 0}
        together = rows.matrix[:, COLUMN["bought_together_score"]]
        for n in np.flatnonzero(together > 0).tolist():
            item = str(rows.item_ids[n])
            seed = links.linking(BOUGHT_TOGETHER, item)
            text = feature_text(rows.matrix[n], "bought_together_score", item, links)
            if seed is None:  # its seed is not among the rows (cut from the candidates)
                assert text == "often bought with items you chose"
                continue
            assert seed in recent and seed != item
            assert item in {i for i, _ in recommender.neighbours.of(BOUGHT_TOGETHER, seed)}
            assert text == f"often bought with {seed}"
            named += 1
    assert named > 0


def test_without_a_ranker_the_explanation_has_the_generators_and_no_contributions(
    pipeline_run, users
):
    recommender = Recommender.from_lake(pipeline_run.lake, None)
    answer = recommender.recommend(users[0], 10)
    assert answer.fallback_level == FALLBACK_CANDIDATE_ORDER
    explanations = explain_answer(answer, None, None, recommender.neighbours)
    assert all(e.contributions == [] and e.bias is None for e in explanations)
    assert all(
        item.source in e.generators for item, e in zip(answer.items, explanations, strict=True)
    )


def test_a_session_item_is_explained_from_its_row(production, users):
    booster, features, recommender = production
    viewed = recommender.recommend(users[1], 1).items[0].item_id
    answer = recommender.recommend(users[0], 10, session=Session((viewed,)))
    explanations = explain_answer(answer, booster, features, recommender.neighbours)
    for item, explanation in zip(answer.items, explanations, strict=True):
        if explanation.contributions:
            total = explanation.bias + sum(c.contribution for c in explanation.contributions)
            assert total + explanation.rest == pytest.approx(item.score, abs=1e-5)


# Through the served bento.


def recommend(server, body):
    return httpx.post(f"{server.url}/recommend", json=body, timeout=10)


def test_the_service_explains_an_item_when_asked(bento_server, users, snapshot):
    # The bento serves the compiled ranker, which has no contributions: the booster it was
    # compiled from explains, and its contributions add up to the compiled ranker's scores.
    metrics = httpx.get(f"{bento_server.url}/metrics", timeout=10).text
    assert re.search(
        r'^shelfwise_ranker_engine\{[^}]*engine="compiled"[^}]*\} 1\.0$', metrics, re.M
    )
    user_id = users[0]
    plain = recommend(bento_server, {"user_id": user_id, "k": 10}).json()
    assert all(item["explanation"] is None for item in plain["items"])
    response = recommend(bento_server, {"user_id": user_id, "k": 10, "explain": True})
    assert response.status_code == 200
    body = response.json()
    assert body["strategy"] == "personalized" and body["fallback_level"] == 0
    # Explaining changes nothing of the answer. The plain request is answered from the user's
    # ranked list, whose scores are kept as float32 (docs/serving-api.md, Ranked lists).
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in plain["items"]]
    assert [i["score"] for i in body["items"]] == pytest.approx(
        [i["score"] for i in plain["items"]], rel=1e-6, abs=1e-6
    )
    rows = snapshot.filter(pl.col("user_id") == user_id)
    by_item = {r["item_id"]: r for r in rows.iter_rows(named=True)}
    for item in body["items"]:
        explanation = item["explanation"]
        assert item["source"] in explanation["generators"]
        assert set(explanation["generators"]) <= set(GENERATORS)
        listed = explanation["contributions"]
        assert len(listed) == 3
        magnitudes = [abs(c["contribution"]) for c in listed]
        assert magnitudes == sorted(magnitudes, reverse=True)
        total = explanation["bias"] + sum(c["contribution"] for c in listed) + explanation["rest"]
        assert total == pytest.approx(item["score"], abs=1e-5)
        stored = by_item[item["item_id"]]
        for contribution in listed:
            assert contribution["text"]
            expected = stored[contribution["feature"]]
            if expected is None or math.isnan(expected):
                assert contribution["value"] is None
            else:
                assert contribution["value"] == pytest.approx(expected, rel=1e-6)


def test_a_popular_answer_is_explained_by_its_source_without_contributions(bento_server):
    body = recommend(bento_server, {"user_id": "nobody-known", "k": 5, "explain": True}).json()
    assert body["strategy"] == "popular"
    for item in body["items"]:
        assert item["explanation"] == {
            "generators": ["popular"],
            "contributions": [],
            "bias": None,
            "rest": None,
        }


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_explain_must_be_a_boolean(bento_server, value):
    response = recommend(bento_server, {"user_id": "u1", "explain": value})
    assert response.status_code == 400
    assert response.json()["field"] == "explain"
