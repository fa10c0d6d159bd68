"""Strong baselines: what a shop could do without a learned ranker, as pure functions.

Each baseline reads the raw interaction history (the lake's `events`: user_id, item_id,
event_type, occurred_at) and keeps only the events strictly before each cutoff (`as_of`), so an
event after the cutoff changes nothing; `basket_cooccurrence` also reads the point-in-time
`item_bought_together` mart. Each returns a scored frame (as_of, user_id, item_id, score) for the
given users; `ranked` turns it into a top-k list. Items whose `is_recommendable` is false never
appear (an absent column or a null counts as recommendable).

Decisions, fixed for every shop (never tuned on one dataset):

* `buy_again_recency`: score = sum over the user's events of `weight(event) * 2^(-age / 30 d)`,
  with weights purchase 1, add_to_cart 0.3, view 0.1. The 30-day half-life is one monthly
  shopping cycle: a weekly grocer's item bought four times in the last month outranks one bought
  once, a month-old purchase counts half, a year-old one about nothing.
* `basket_cooccurrence`: score(j) = sum over the user's items i of `r(i) * together(i, j)`,
  `r` the buy-again-recency score and `together` the `item_bought_together` mart (carted or
  bought by the same user within a day, decayed, top partners per item).
* `item_knn`: cosine similarity of items on the binary user x item matrix of all users before
  the cutoff, the top 100 neighbours per item; score(j) = sum over the user's items i of
  sim(i, j). At most the 20,000 items with the most users.
* `ease`: EASE (Steck 2019): B = I - P / diag(P), P = (X'X + 500 I)^-1 on the binary matrix of
  the 5,000 items with the most users (float32; seconds on two cores); scores X_u B. lambda =
  500 is the order of magnitude Steck reports for implicit data and stays fixed.
* The three collaborative baselines keep the user's own items: an own item is scored only by the
  evidence of the user's *other* items (no self-similarity), so a re-buy that fits the basket
  can rank, as grocery shoppers re-buy most of what they buy.
* `blend`: per user each score divided by the user's largest, then `w * buy_again_recency +
  (1 - w) * partner` over the union of both top-100 lists. Partner and `w` in (0.25, 0.5,
  0.75) are chosen by NDCG@10 on a *validation* cutoff (the last training cutoff, whose label
  window ends where the evaluation window starts: the evaluation labels are never seen); with
  no validation data the partner is `item_knn` and `w` 0.5.
"""

import math
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl
import scipy.sparse as sp

from models.collaborative import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_REGULARISATION,
    InteractionMatrix,
    ease_weights,
    interaction_matrix,
    top_items_per_user,
)
from models.metrics import QUERY, mean_metrics, per_user_metrics, top_k

HALF_LIFE_DAYS = 30.0
EVENT_WEIGHTS = {"purchase": 1.0, "add_to_cart": 0.3, "view": 0.1}
NEIGHBOURS = 100
KNN_MAX_ITEMS = 20_000
EASE_MAX_ITEMS = DEFAULT_MAX_ITEMS
EASE_LAMBDA = DEFAULT_REGULARISATION
# Each scored list keeps this many items per user (the blend mixes two such lists).
DEPTH = 100
BLEND_WEIGHTS = (0.25, 0.5, 0.75)
DEFAULT_BLEND = ("item_knn", 0.5)
BUY_AGAIN_RECENCY = "buy_again_recency"
BASKET = "basket_cooccurrence"
ITEM_KNN = "item_knn"
EASE = "ease"
BLEND = "blend"
BLEND_PARTNERS = (BASKET, ITEM_KNN, EASE)
STRONG_BASELINES = (BUY_AGAIN_RECENCY, BASKET, ITEM_KNN, EASE, BLEND)
HISTORY_COLUMNS = ["user_id", "item_id", "event_type", "occurred_at"]
_SCORE = pl.Float64


def _empty_scores() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"as_of": pl.Datetime("us", "UTC"), "user_id": pl.String, "item_id": pl.String}
    ).with_columns(pl.lit(None, _SCORE).alias("score"))


def blocked_items(item_features: pl.DataFrame | None) -> set[str]:
    """Items that must never be recommended: `is_recommendable` false at any cutoff given.

    Args:
        item_features: The `item_features` mart (item_id, optionally is_recommendable), or None.

    Returns:
        The item ids (empty when the column is absent; a null counts as recommendable).
    """
    if item_features is None or "is_recommendable" not in item_features.columns:
        return set()
    return set(
        item_features.filter(~pl.col("is_recommendable").fill_null(True))
        .get_column("item_id")
        .to_list()
    )


def history_before(events: pl.DataFrame, cutoff: datetime) -> pl.DataFrame:
    """The weighted interactions strictly before `cutoff` (views, carts, purchases).

    Args:
        events: Columns user_id, item_id, event_type, occurred_at.
        cutoff: The cutoff (`as_of`).

    Returns:
        user_id, item_id, weight (`EVENT_WEIGHTS`), age_days (days before the cutoff).
    """
    weights = pl.DataFrame(
        {"event_type": list(EVENT_WEIGHTS), "weight": list(EVENT_WEIGHTS.values())}
    )
    at = pl.lit(cutoff).cast(events.schema["occurred_at"])
    return (
        events.filter(pl.col("occurred_at") < at)
        .join(weights, on="event_type", how="inner")
        .select(
            "user_id",
            "item_id",
            "weight",
            ((at - pl.col("occurred_at")).dt.total_microseconds() / 86_400e6).alias("age_days"),
        )
    )


def _cutoffs(users: pl.DataFrame) -> list[datetime]:
    return sorted(users.get_column("as_of").unique().to_list())


def _users_at(users: pl.DataFrame, cutoff: datetime) -> pl.DataFrame:
    return users.filter(pl.col("as_of") == cutoff).select("user_id").unique()


def buy_again_recency_scores(
    users: pl.DataFrame, events: pl.DataFrame, blocked: AbstractSet[str] = frozenset()
) -> pl.DataFrame:
    """Buy-again with recency decay: `sum weight(event) * 2^(-age / HALF_LIFE_DAYS)`.

    Args:
        users: Columns as_of, user_id.
        events: The interaction history (`HISTORY_COLUMNS`), any time; only events before each
            cutoff count.
        blocked: Items never to score (not recommendable).

    Returns:
        Columns as_of, user_id, item_id, score: the users' own past items.
    """
    frames = []
    for cutoff in _cutoffs(users):
        history = history_before(events, cutoff).join(
            _users_at(users, cutoff), on="user_id", how="semi"
        )
        frames.append(
            history.filter(~pl.col("item_id").is_in(list(blocked)))
            .group_by("user_id", "item_id")
            .agg(
                (pl.col("weight") * (-math.log(2) * pl.col("age_days") / HALF_LIFE_DAYS).exp())
                .sum()
                .cast(_SCORE)
                .alias("score")
            )
            .select(
                pl.lit(cutoff).cast(users.schema["as_of"]).alias("as_of"),
                "user_id",
                "item_id",
                "score",
            )
        )
    return pl.concat(frames) if frames else _empty_scores()


def basket_cooccurrence_scores(
    users: pl.DataFrame,
    events: pl.DataFrame,
    bought_together: pl.DataFrame,
    blocked: AbstractSet[str] = frozenset(),
) -> pl.DataFrame:
    """Items bought together with the user's past items, weighted by their recency.

    Args:
        users: Columns as_of, user_id.
        events: The interaction history (`HISTORY_COLUMNS`).
        bought_together: The `item_bought_together` mart (as_of, item_id, neighbour_item_id,
            score) at the same cutoffs.
        blocked: Items never to score.

    Returns:
        Columns as_of, user_id, item_id, score (the user's top `DEPTH`).
    """
    own = buy_again_recency_scores(users, events)
    if own.height == 0 or bought_together.height == 0:
        return _empty_scores()
    together = bought_together.select(
        pl.col("as_of").cast(own.schema["as_of"]),
        "item_id",
        "neighbour_item_id",
        pl.col("score").cast(_SCORE).alias("together"),
    ).filter(~pl.col("neighbour_item_id").is_in(list(blocked)))
    scored = (
        own.join(together, on=["as_of", "item_id"], how="inner")
        .group_by(*QUERY, "neighbour_item_id")
        .agg((pl.col("score") * pl.col("together")).sum().alias("score"))
        .rename({"neighbour_item_id": "item_id"})
    )
    return _depth(scored)


def _depth(scored: pl.DataFrame, depth: int = DEPTH) -> pl.DataFrame:
    return (
        scored.filter(pl.col("score") > 0)
        .sort([*QUERY, "score", "item_id"], descending=[False, False, True, False])
        .filter(pl.int_range(pl.len()).over(QUERY) < depth)
        .select(*QUERY, "item_id", pl.col("score").cast(_SCORE))
    )


def _knn_similarity(matrix: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Top-`neighbours` cosine similarities per item (rows: item, columns: its neighbours)."""
    columns = matrix.tocsc()
    counts = np.asarray(matrix.sum(axis=0)).ravel()
    norms = np.sqrt(np.maximum(counts, 1.0)).astype(np.float32)
    n_items = matrix.shape[1]
    keep = min(neighbours, max(n_items - 1, 0))
    data, indices, indptr = [], [], [0]
    block = 512
    for start in range(0, n_items, block):
        stop = min(start + block, n_items)
        common = (columns[:, start:stop].T @ matrix).toarray()
        similarity = common / norms[start:stop, None] / norms[None, :]
        similarity[np.arange(stop - start), np.arange(start, stop)] = 0.0
        for row in similarity:
            if keep == 0:
                indptr.append(indptr[-1])
                continue
            top = np.argpartition(-row, keep - 1)[:keep]
            top = top[row[top] > 0]
            data.append(row[top])
            indices.append(top)
            indptr.append(indptr[-1] + len(top))
    return sp.csr_matrix(
        (
            np.concatenate(data) if data else np.zeros(0, np.float32),
            np.concatenate(indices) if indices else np.zeros(0, np.int64),
            np.asarray(indptr),
        ),
        shape=(n_items, n_items),
        dtype=np.float32,
    )


def _score_users(
    built: InteractionMatrix,
    model: sp.csr_matrix | np.ndarray,
    users: pl.DataFrame,
    cutoff: datetime,
    as_of_type: pl.DataType,
    blocked: set[str],
) -> pl.DataFrame:
    """Top-`DEPTH` scores of `users` from `X_u @ model`, blocked items masked."""
    wanted = set(_users_at(users, cutoff).get_column("user_id").to_list())
    rows = [row for row, user in enumerate(built.users) if user in wanted]
    n_items = len(built.items)
    if not rows or n_items == 0:
        return _empty_scores()
    mask = np.isin(built.items, list(blocked)) if blocked else np.zeros(n_items, bool)
    users = np.asarray(built.users, dtype=object)[rows]
    top = top_items_per_user(built.matrix[rows], model, users, built.items, DEPTH, mask, False)
    return top.select(
        pl.lit(cutoff).cast(as_of_type).alias("as_of"),
        "user_id",
        "item_id",
        pl.col("score").cast(_SCORE),
    )


def _collaborative(
    users: pl.DataFrame,
    events: pl.DataFrame,
    blocked: set[str],
    max_items: int,
    fit,
) -> pl.DataFrame:
    frames = []
    for cutoff in _cutoffs(users):
        built = interaction_matrix(history_before(events, cutoff), max_items)
        if built.matrix.shape[1] == 0:
            continue
        model = fit(built.matrix)
        frames.append(_score_users(built, model, users, cutoff, users.schema["as_of"], blocked))
    return _depth(pl.concat(frames)) if frames else _empty_scores()


def item_knn_scores(
    users: pl.DataFrame,
    events: pl.DataFrame,
    blocked: AbstractSet[str] = frozenset(),
    neighbours: int = NEIGHBOURS,
    max_items: int = KNN_MAX_ITEMS,
) -> pl.DataFrame:
    """Item-kNN: cosine similarity on the binary user x item matrix before each cutoff.

    Args:
        users: Columns as_of, user_id.
        events: The interaction history (`HISTORY_COLUMNS`) of all users.
        blocked: Items never to score.
        neighbours: Neighbours kept per item.
        max_items: The items with the most users kept in the matrix.

    Returns:
        Columns as_of, user_id, item_id, score (the user's top `DEPTH`).
    """
    return _collaborative(
        users, events, blocked, max_items, lambda matrix: _knn_similarity(matrix, neighbours)
    )


def ease_scores(
    users: pl.DataFrame,
    events: pl.DataFrame,
    blocked: AbstractSet[str] = frozenset(),
    regularisation: float = EASE_LAMBDA,
    max_items: int = EASE_MAX_ITEMS,
) -> pl.DataFrame:
    """EASE (Steck 2019) on the binary user x item matrix before each cutoff.

    Args:
        users: Columns as_of, user_id.
        events: The interaction history (`HISTORY_COLUMNS`) of all users.
        blocked: Items never to score.
        regularisation: Lambda added to the Gram matrix's diagonal.
        max_items: The items with the most users kept (the inverse is dense).

    Returns:
        Columns as_of, user_id, item_id, score (the user's top `DEPTH`).
    """
    return _collaborative(
        users, events, blocked, max_items, lambda matrix: ease_weights(matrix, regularisation)
    )


def _normalised(scores: pl.DataFrame, name: str) -> pl.DataFrame:
    return scores.select(
        *QUERY, "item_id", (pl.col("score") / pl.col("score").max().over(QUERY)).alias(name)
    )


def blend_scores(buy_again: pl.DataFrame, partner: pl.DataFrame, weight: float) -> pl.DataFrame:
    """`weight * buy_again + (1 - weight) * partner`, each divided by the user's largest score.

    Args:
        buy_again: Scored rows (as_of, user_id, item_id, score) of `buy_again_recency`.
        partner: Scored rows of the other baseline.
        weight: The buy-again share, in [0, 1].

    Returns:
        Columns as_of, user_id, item_id, score over the union of both lists.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the blend weight must be in [0, 1], got {weight}")
    mixed = _normalised(_depth(buy_again), "_a").join(
        _normalised(_depth(partner), "_b"), on=[*QUERY, "item_id"], how="full", coalesce=True
    )
    return mixed.select(
        *QUERY,
        "item_id",
        (weight * pl.col("_a").fill_null(0.0) + (1 - weight) * pl.col("_b").fill_null(0.0))
        .cast(_SCORE)
        .alias("score"),
    )


def choose_blend(
    buy_again: pl.DataFrame, partners: Mapping[str, pl.DataFrame], labels: pl.DataFrame
) -> tuple[str, float, float]:
    """The partner and weight whose blend has the highest NDCG@10 on validation labels.

    Ties go to the earlier partner (`BLEND_PARTNERS` order) and the smaller weight.

    Args:
        buy_again: `buy_again_recency` scores at the validation cutoff.
        partners: Name → scores at the validation cutoff (empty frames are skipped).
        labels: Labels of the validation window (as_of, user_id, item_id, label).

    Returns:
        (partner, weight, validation NDCG@10); `DEFAULT_BLEND` with NaN when nothing is scored.
    """
    best: tuple[str, float, float] = (*DEFAULT_BLEND, float("nan"))
    for name, partner in partners.items():
        if partner.height == 0:
            continue
        for weight in BLEND_WEIGHTS:
            ranked = top_k(blend_scores(buy_again, partner, weight), "score", 10)
            value = mean_metrics(per_user_metrics(ranked, labels, (10,))).get("ndcg@10", 0.0)
            if math.isnan(best[2]) or value > best[2] + 1e-12:
                best = (name, weight, float(value))
    return best


@dataclass
class Validation:
    """A validation cutoff for the blend's choice (never the evaluation window).

    Attributes:
        users: The validation queries (as_of, user_id) with a positive label.
        labels: Their labels (as_of, user_id, item_id, label).
        bought_together: `item_bought_together` at the validation cutoff.
        ranker_scores: The ranker's scores of the validation users' candidates (as_of, user_id,
            item_id, score), for the segment policy (`models.segments`); None: not chosen.
        item_features: `item_features` at the validation cutoff (the fallback's popularity).
        user_features: `user_features` at the validation cutoff (the users' segments).
    """

    users: pl.DataFrame
    labels: pl.DataFrame
    bought_together: pl.DataFrame
    ranker_scores: pl.DataFrame | None = None
    item_features: pl.DataFrame | None = None
    user_features: pl.DataFrame | None = None


def _all_scores(
    users: pl.DataFrame,
    events: pl.DataFrame,
    bought_together: pl.DataFrame | None,
    blocked: set[str],
) -> dict[str, pl.DataFrame]:
    scores = {BUY_AGAIN_RECENCY: _depth(buy_again_recency_scores(users, events, blocked))}
    if bought_together is not None:
        scores[BASKET] = basket_cooccurrence_scores(users, events, bought_together, blocked)
    scores[ITEM_KNN] = item_knn_scores(users, events, blocked)
    scores[EASE] = ease_scores(users, events, blocked)
    return scores


@dataclass
class StrongBaselines:
    """The strong baselines' lists and what the report says about them.

    Attributes:
        ranked: Name → top-k frame (as_of, user_id, item_id, rank).
        not_applicable: Name → why the data cannot define it.
        notes: Name → a line for the report (the blend used and how it was chosen).
        scored: Name → the scored rows behind `ranked`, up to `DEPTH` per user (as_of,
            user_id, item_id, score): deeper than k, for views that drop items from the lists.
    """

    ranked: dict[str, pl.DataFrame]
    not_applicable: dict[str, str]
    notes: dict[str, str]
    scored: dict[str, pl.DataFrame] = field(default_factory=dict)


def strong_baselines(
    users: pl.DataFrame,
    events: pl.DataFrame,
    item_features: pl.DataFrame | None,
    k: int,
    bought_together: pl.DataFrame | None = None,
    validation: Validation | None = None,
) -> StrongBaselines:
    """Every strong baseline for `users`, with the blend chosen on `validation` when given.

    A baseline with no list for any user is not applicable (e.g. no item bought together with
    another, a history without repeat interactions).

    Args:
        users: The evaluated queries (as_of, user_id).
        events: The interaction history (`HISTORY_COLUMNS`) of all users, any time.
        item_features: The `item_features` mart (is_recommendable), or None.
        k: List length.
        bought_together: The `item_bought_together` mart at the evaluation cutoff, if any.
        validation: A validation cutoff for the blend, if any.

    Returns:
        The lists, the not-applicable reasons and the report's notes.
    """
    blocked = blocked_items(item_features)
    scores = _all_scores(users, events, bought_together, blocked)
    not_applicable: dict[str, str] = {}
    if bought_together is None:
        not_applicable[BASKET] = "no item_bought_together mart"
    for name, frame in scores.items():
        if frame.height == 0:
            not_applicable[name] = "no evaluated user has a score (no history to build it from)"
    partners = [name for name in BLEND_PARTNERS if name in scores and name not in not_applicable]
    notes: dict[str, str] = {}
    if BUY_AGAIN_RECENCY in not_applicable or not partners:
        not_applicable[BLEND] = "buy_again_recency or every partner is not applicable"
    else:
        if validation is not None and validation.users.height:
            valid = _all_scores(validation.users, events, validation.bought_together, blocked)
            partner, weight, value = choose_blend(
                valid[BUY_AGAIN_RECENCY],
                {name: valid[name] for name in partners if name in valid},
                validation.labels,
            )
            how = f"chosen on the validation cutoff (NDCG@10 {value:.3f} there)"
        else:
            partner, weight = DEFAULT_BLEND
            how = "fixed (no validation cutoff)"
        if partner not in partners:
            partner = partners[0]
        scores[BLEND] = blend_scores(scores[BUY_AGAIN_RECENCY], scores[partner], weight)
        notes[BLEND] = f"{weight:g} x buy_again_recency + {1 - weight:g} x {partner}, {how}"
    ranked = {
        name: top_k(frame, "score", k)
        for name, frame in scores.items()
        if name not in not_applicable
    }
    return StrongBaselines(
        ranked=ranked,
        not_applicable=not_applicable,
        notes=notes,
        scored={name: frame for name, frame in scores.items() if name not in not_applicable},
    )
