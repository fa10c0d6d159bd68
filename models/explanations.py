"""Why an item was recommended: the generators that proposed it and the ranker's reasons.

An explanation is built after the answer, from what the answer carries, and only when a request
asks for one (`/recommend` with `"explain": true`); a request without it does none of this.

- **Generators**: every candidate generator whose score column is positive in the item's row
  (`models.candidates.GENERATORS`), not only the first one (the response's `source`). Rungs
  without rows (session neighbours, category trending, popular) and the popular items that top
  a list up have their `source` alone.
- **Contributions**: LightGBM's per-feature contributions (SHAP values of the trees,
  `booster.predict(rows, pred_contrib=True)`) of the chosen items' rows only, the largest three
  by absolute value, each with the feature's value and a readable text. The contributions of
  all features plus the bias are the booster's raw score, which for LambdaRank is the served
  score (the compiled ranker predicts the same within `models.compiled_ranker.TOLERANCE`), so
  `bias + Σ listed + rest` gives the served score back. The compiled ranker has no contributions:
  the booster it was compiled from computes them. An answer not scored by the ranker (fallback
  level 1, no ranker, or another rung) has none: an empty list.
- **Links**: "often bought with X" names X, one of the user's recent items (the rows with a
  positive `history_score`, most recent first) whose neighbours of that kind hold the item; of
  several, the one weighing most in the generator's sum (neighbour score / recency rank, as
  `models.session.neighbour_scores` adds them up). It is looked up only for a text that needs
  it; when none is found the text says it generically.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.candidates import GENERATORS, SCORE_COLUMNS
from models.features import FEATURE_COLUMNS
from models.recommender import FALLBACK_NONE, Recommendation, ScoredRows
from models.session import BOUGHT_TOGETHER, COLLABORATIVE, COVISIT, NeighbourIndex

if TYPE_CHECKING:  # LightGBM is imported where a booster is loaded (`models.ranker`)
    import lightgbm as lgb

# How many feature contributions an explanation lists.
TOP_CONTRIBUTIONS = 3

_COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
_SCORE_COLUMNS = np.array([_COLUMN[name] for name in SCORE_COLUMNS])


@dataclass(frozen=True)
class FeatureContribution:
    """One feature's part in an item's score.

    Attributes:
        feature: The feature (a `models.features.FEATURE_COLUMNS` name).
        value: Its value in the item's row; None when missing.
        contribution: What it added to the score (LightGBM's contribution; negative lowers it).
        text: The value in words, e.g. "bought 3 times, last 12 days ago".
    """

    feature: str
    value: float | None
    contribution: float
    text: str


@dataclass(frozen=True)
class ItemExplanation:
    """Why one item is in an answer.

    Attributes:
        generators: The candidate generators that proposed it, in `GENERATORS` order.
        contributions: The ranker's largest feature contributions, largest |contribution|
            first; empty when the ranker did not score the item.
        bias: The ranker's bias term (its score before any feature); None without
            contributions.
        rest: The summed contributions of the features not listed; None without contributions.
    """

    generators: list[str]
    contributions: list[FeatureContribution]
    bias: float | None = None
    rest: float | None = None


class RecentLinks:
    """Which of the user's recent items link a candidate through a neighbour table.

    Built per explained answer; the recent items are read from the rows once, on first use.

    Args:
        rows: The rows the answer was ranked from.
        neighbours: The recommender's neighbour index.
    """

    def __init__(self, rows: ScoredRows, neighbours: NeighbourIndex) -> None:
        self._rows, self._neighbours = rows, neighbours
        self._recent: list[str] | None = None

    def recent(self) -> list[str]:
        """The user's recent items in the rows, most recent first (history_score = 1 / rank)."""
        if self._recent is None:
            history = self._rows.matrix[:, _COLUMN["history_score"]]
            positive = np.flatnonzero(history > 0)
            order = positive[np.argsort(-history[positive], kind="stable")]
            self._recent = [str(self._rows.item_ids[n]) for n in order]
        return self._recent

    def linking(self, kind: str, item_id: str) -> str | None:
        """The recent item whose `kind` neighbours hold `item_id` with the largest score / rank.

        Args:
            kind: A neighbour kind of `models.session.NEIGHBOUR_KINDS`.
            item_id: The candidate.

        Returns:
            The recent item, or None when none of them links it.
        """
        best, best_weight = None, 0.0
        for rank, seed in enumerate(self.recent(), start=1):
            if seed == item_id:
                continue
            for neighbour, score in self._neighbours.of(kind, seed):
                if neighbour == item_id:
                    if score / rank > best_weight:
                        best, best_weight = seed, score / rank
                    break
        return best


def explain_answer(
    answer: Recommendation,
    booster: "lgb.Booster | None",
    feature_names: Sequence[str] | None,
    neighbours: NeighbourIndex,
    top: int = TOP_CONTRIBUTIONS,
) -> list[ItemExplanation]:
    """An explanation of every item of an answer, in the answer's order.

    Args:
        answer: What `models.recommender.Recommender.recommend` answered.
        booster: The LightGBM booster of the ranker that scored it (never the compiled ranker,
            which has no contributions); None without a ranker.
        feature_names: The features the booster takes, in its order (None: FEATURE_COLUMNS).
        neighbours: The recommender's neighbour index (`Recommender.neighbours`), for the
            "often bought with X" texts.
        top: How many contributions per item.

    Returns:
        One explanation per `answer.items` entry.
    """
    rows = answer.rows
    if rows is None:
        return [ItemExplanation([item.source], []) for item in answer.items]
    row_of = {item: n for n, item in enumerate(rows.item_ids.tolist())}
    # An item is explained from its row only if the ranked rows gave it, score and all. The
    # popular items that top a short list up are not among the rows (the rules refused every
    # row not chosen, and refuse it again); the score check makes sure of it.
    picked = []
    for item in answer.items:
        row = row_of.get(item.item_id)
        picked.append(row if row is not None and float(rows.scores[row]) == item.score else None)
    scored = [row for row in picked if row is not None]
    contributions = None
    if booster is not None and answer.fallback_level == FALLBACK_NONE and scored:
        contributions = feature_contributions(rows.matrix[scored], booster, feature_names)
    links = RecentLinks(rows, neighbours)
    explanations, position = [], 0
    for item, row in zip(answer.items, picked, strict=True):
        if row is None:
            explanations.append(ItemExplanation([item.source], []))
            continue
        generators = proposing_generators(rows.matrix[row]) or [item.source]
        if contributions is None:
            explanations.append(ItemExplanation(generators, []))
            continue
        names, values = contributions
        listed, bias, rest = top_contributions(
            rows.matrix[row], names, values[position], item.item_id, links, top
        )
        position += 1
        explanations.append(ItemExplanation(generators, listed, bias, rest))
    return explanations


def proposing_generators(row: np.ndarray) -> list[str]:
    """The generators whose score is positive in a row of `FEATURE_COLUMNS` (a NaN is not)."""
    proposed = row[_SCORE_COLUMNS] > 0
    return [name for name, yes in zip(GENERATORS, proposed.tolist(), strict=True) if yes]


def feature_contributions(
    matrix: np.ndarray, booster: "lgb.Booster", feature_names: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    """LightGBM's per-feature contributions of rows of `FEATURE_COLUMNS`.

    Args:
        matrix: Rows × `FEATURE_COLUMNS`.
        booster: The ranker.
        feature_names: The booster's features in its order (None: FEATURE_COLUMNS).

    Returns:
        The booster's feature names and rows × (features + 1) contributions, float64; the
        last column is the bias, and each row sums to the row's raw score.
    """
    names = list(feature_names or FEATURE_COLUMNS)
    rows = matrix if names == FEATURE_COLUMNS else matrix[:, [_COLUMN[n] for n in names]]
    values = booster.predict(rows, pred_contrib=True, num_threads=1)
    return names, np.asarray(values, dtype=np.float64)


def top_contributions(
    row: np.ndarray,
    names: Sequence[str],
    contributions: np.ndarray,
    item_id: str,
    links: "RecentLinks | None" = None,
    top: int = TOP_CONTRIBUTIONS,
) -> tuple[list[FeatureContribution], float, float]:
    """The largest contributions of one row, with their texts.

    Args:
        row: The item's row of `FEATURE_COLUMNS`.
        names: The booster's features, in the order of `contributions`.
        contributions: The row's contributions (features, then the bias).
        item_id: The item.
        links: The user's recent items and the neighbour index, for "often bought with X"
            (None: such texts are generic).
        top: How many.

    Returns:
        The `top` largest by absolute contribution (on a tie, the booster's feature order),
        the bias, and the summed contributions of the other features.
    """
    features = contributions[:-1]
    order = np.argsort(-np.abs(features), kind="stable")[:top]
    facts = _Facts(row, item_id, links)
    listed = []
    for n in order.tolist():
        value = float(row[_COLUMN[names[n]]])
        listed.append(
            FeatureContribution(
                names[n],
                value if math.isfinite(value) else None,
                float(features[n]),
                facts.text(names[n]),
            )
        )
    rest = float(features.sum() - features[order].sum())
    return listed, float(contributions[-1]), rest


class _Facts:
    """One row's values by feature name, for the texts (NaN read as None)."""

    def __init__(self, row: np.ndarray, item_id: str, links: "RecentLinks | None") -> None:
        self.row, self.item_id, self.links = row, item_id, links

    def __getitem__(self, name: str) -> float | None:
        value = float(self.row[_COLUMN[name]])
        return value if math.isfinite(value) else None

    def positive(self, name: str) -> float:
        """The value, 0 when missing."""
        return self[name] or 0.0

    def linked(self, kind: str) -> str | None:
        return None if self.links is None else self.links.linking(kind, self.item_id)

    def text(self, feature: str) -> str:
        """The feature's value in words."""
        describe = TEXTS.get(feature)
        if describe is None:  # a feature this module does not know yet: its name and value
            value = self[feature]
            return f"{feature} = {'unknown' if value is None else _number(value)}"
        return describe(self)


def feature_text(
    row: np.ndarray, feature: str, item_id: str = "", links: RecentLinks | None = None
) -> str:
    """One feature of a row in words, e.g. "bought 3 times, last 12 days ago".

    Args:
        row: A row of `FEATURE_COLUMNS`.
        feature: The feature.
        item_id: The row's item (for the "often bought with X" texts).
        links: The user's recent items and the neighbours (None: such texts are generic).

    Returns:
        A short text; a feature without a text of its own gives its name and value.
    """
    return _Facts(row, item_id, links).text(feature)


def _number(value: float) -> str:
    """A count as an integer, anything else with up to two decimals."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _times(value: float | None) -> str:
    count = value or 0.0
    return f"{_number(count)} time{'' if count == 1 else 's'}"


def _days(value: float) -> str:
    """An age in days in words: today, yesterday, N days."""
    days = max(0.0, value)
    if days < 1:
        return "today"
    if days < 2:
        return "yesterday"
    return f"{int(days)} days ago"


def _share(value: float | None) -> str:
    return f"{(value or 0.0):.0%}"


def _linked_text(verb: str, kind: str, generic: str) -> Callable[["_Facts"], str]:
    def text(facts: _Facts) -> str:
        seed = facts.linked(kind)
        return f"{verb} {seed}" if seed is not None else generic

    return text


def _bought(facts: _Facts) -> str:
    purchases = facts["user_item_purchases"]
    if not purchases:
        return "never bought by you"
    last = facts["user_item_days_since_last_purchase"]
    when = "" if last is None else f", last {_days(last)}"
    return f"bought {_times(purchases)}{when}"


def _viewed(facts: _Facts) -> str:
    views = facts["user_item_views"]
    if not views:
        return "not viewed by you yet"
    last = facts["user_item_days_since_last"]
    when = "" if last is None else f", last {_days(last)}"
    return f"viewed {_times(views)}{when}"


def _recent(facts: _Facts) -> str:
    score = facts.positive("history_score")
    if score <= 0:
        return "not among your recent items"
    return f"your #{round(1 / score)} most recent item"


def _buy_again(facts: _Facts) -> str:
    if facts.positive("buy_again_score") <= 0:
        return f"not one you buy again ({_bought(facts)})"
    return f"one you buy again: {_bought(facts)}"


def _last_seen(facts: _Facts) -> str:
    last = facts["user_item_days_since_last"]
    return "never looked at by you" if last is None else f"you looked at it {_days(last)}"


def _last_bought(facts: _Facts) -> str:
    return _bought(facts)


def _due(facts: _Facts) -> str:
    ratio = facts["user_item_repurchase_due_ratio"]
    if ratio is None:
        return "no re-purchase rhythm known"
    return f"{_number(round(ratio, 1))}x its usual re-purchase gap since you last bought it"


def _own_interval(facts: _Facts) -> str:
    days = facts["user_item_own_repurchase_interval_days"]
    if days is None:
        return "not bought again by you yet"
    return f"you buy it again every {_number(round(days))} days"


def _basket_share(facts: _Facts) -> str:
    share = facts["user_item_purchase_basket_share"]
    if share is None:
        return "never bought by you"
    return f"in {_share(share)} of your baskets since you first bought it"


def _count_text(name: str, what: str) -> Callable[["_Facts"], str]:
    return lambda facts: what.format(_number(facts.positive(name)))


def _times_text(name: str, what: str) -> Callable[["_Facts"], str]:
    return lambda facts: what.format(_times(facts.positive(name)))


def _known_text(
    name: str, what: str, missing: str, shown: Callable[[float], str]
) -> Callable[["_Facts"], str]:
    """`what` with the feature's value as `shown` writes it, or `missing` when unknown."""

    def text(facts: _Facts) -> str:
        value = facts[name]
        return missing if value is None else what.format(shown(value))

    return text


def _value_text(name: str, what: str, missing: str) -> Callable[["_Facts"], str]:
    return _known_text(name, what, missing, lambda value: _number(round(value, 2)))


def _share_text(name: str, what: str, missing: str) -> Callable[["_Facts"], str]:
    return _known_text(name, what, missing, _share)


def _age_text(name: str, what: str, missing: str) -> Callable[["_Facts"], str]:
    return _known_text(name, what, missing, _days)


def _age(facts: _Facts) -> str:
    days = facts["item_age_days"]
    if days is None:
        return "no catalog age known"
    whole = int(max(0.0, days))
    return f"in the catalog for {whole} day{'' if whole == 1 else 's'}"


def _popularity(facts: _Facts) -> str:
    rank = facts["item_popularity_rank"]
    if rank is None:
        return "no popularity known"
    return f"the shop's #{_number(rank)} most popular item"


def _trend(facts: _Facts) -> str:
    trend = facts["item_trend"]
    if trend is None:
        return "no trend known"
    direction = "rising" if trend > 1 else "falling" if trend < 1 else "steady"
    return f"views {direction}: {_number(round(trend, 2))}x its 30-day rate this week"


def _proposed(name: str, yes: str, no: str) -> Callable[["_Facts"], str]:
    return lambda facts: yes if facts.positive(name) > 0 else no


def _hits(name: str, kind: str, verb: str) -> Callable[["_Facts"], str]:
    def text(facts: _Facts) -> str:
        hits = facts.positive(name)
        if hits <= 0:
            return f"{verb} none of your recent items"
        seed = facts.linked(kind)
        more = hits - 1
        if seed is None:
            return f"{verb} {_number(hits)} of your recent items"
        return f"{verb} {seed}" + (f" and {_number(more)} more of your items" if more else "")

    return text


def _price_to_mean(facts: _Facts) -> str:
    ratio = facts["price_to_user_mean"]
    if ratio is None:
        return "no usual price of yours known"
    return f"{_number(round(ratio, 2))}x the price you usually pay"


# The text of each feature. A test checks that every feature of FEATURE_COLUMNS has one.
TEXTS: Mapping[str, Callable[[_Facts], str]] = {
    # Candidate generators.
    "history_score": _recent,
    "buy_again_score": _buy_again,
    "covisit_score": _linked_text(
        "often viewed with", COVISIT, "often viewed with items you looked at"
    ),
    "bought_together_score": _linked_text(
        "often bought with", BOUGHT_TOGETHER, "often bought with items you chose"
    ),
    "collaborative_score": _linked_text(
        "taken by shoppers who took", COLLABORATIVE, "taken by shoppers with your taste"
    ),
    "category_popular_score": _proposed(
        "category_popular_score",
        "popular in one of your favourite categories",
        "not among your favourite categories' most popular",
    ),
    "content_score": _proposed(
        "content_score", "new in one of your favourite categories", "not a new item of yours"
    ),
    "trending_score": _proposed(
        "trending_score", "trending in the shop this week", "not among the shop's trending items"
    ),
    "popular_score": _proposed(
        "popular_score", "among the shop's most popular items", "not among the shop's top items"
    ),
    "covisit_hits": _hits("covisit_hits", COVISIT, "often viewed with"),
    "bought_together_hits": _hits("bought_together_hits", BOUGHT_TOGETHER, "often bought with"),
    "sources": lambda facts: f"proposed by {_number(facts.positive('sources'))} generators",
    # The item.
    "item_popularity": _popularity,
    "item_popularity_rank": _popularity,
    "item_views_1d": _times_text("item_views_1d", "viewed {} by shoppers today"),
    "item_views_7d": _times_text("item_views_7d", "viewed {} by shoppers this week"),
    "item_views_30d": _times_text("item_views_30d", "viewed {} by shoppers in 30 days"),
    "item_purchases_7d": _times_text("item_purchases_7d", "bought {} this week"),
    "item_purchases_30d": _times_text("item_purchases_30d", "bought {} in 30 days"),
    "item_users_30d": _count_text("item_users_30d", "{} shoppers in 30 days"),
    "item_trend": _trend,
    "item_view_to_cart_rate": _share_text(
        "item_view_to_cart_rate", "{} of its views end in a cart", "no view-to-cart rate known"
    ),
    "item_cart_to_purchase_rate": _share_text(
        "item_cart_to_purchase_rate", "{} of its carts are bought", "no cart-to-purchase rate known"
    ),
    "item_price": _value_text("item_price", "priced {}", "no price known"),
    "item_age_days": _age,
    "item_buyers": _count_text("item_buyers", "{} buyers"),
    "item_rebuyer_share": _share_text(
        "item_rebuyer_share", "{} of its buyers buy it again", "no re-buyers known"
    ),
    "item_repurchase_interval_days": _value_text(
        "item_repurchase_interval_days", "usually bought again after {} days", "rarely re-bought"
    ),
    # The user.
    "user_events": _count_text("user_events", "your {} events"),
    "user_views": _count_text("user_views", "your {} views"),
    "user_carts": _count_text("user_carts", "your {} carts"),
    "user_purchases": _count_text("user_purchases", "your {} purchases"),
    "user_spend": _count_text("user_spend", "your spend of {}"),
    "user_events_1d": _count_text("user_events_1d", "your {} events today"),
    "user_events_7d": _count_text("user_events_7d", "your {} events this week"),
    "user_sessions": _count_text("user_sessions", "your {} visits"),
    "user_session_conversion_rate": _share_text(
        "user_session_conversion_rate", "{} of your visits end in a purchase", "no visits yet"
    ),
    "user_days_since_last_event": _age_text(
        "user_days_since_last_event", "your last visit {}", "no visit yet"
    ),
    "user_repeat_purchase_share": _share_text(
        "user_repeat_purchase_share", "{} of your purchases are repeats", "no purchases yet"
    ),
    # The user and the item.
    "user_item_views": _viewed,
    "user_item_carts": lambda facts: (
        f"carted {_times(facts['user_item_carts'])} by you"
        if facts["user_item_carts"]
        else "never carted by you"
    ),
    "user_item_purchases": _bought,
    "user_item_days_since_last": _last_seen,
    "user_item_interest": _viewed,
    "user_item_purchases_decayed_7d": _bought,
    "user_item_purchases_decayed_30d": _bought,
    "user_item_purchases_decayed_90d": _bought,
    "user_item_days_since_last_purchase": _last_bought,
    "user_item_purchase_occasions": _bought,
    "user_item_purchase_basket_share": _basket_share,
    "user_item_own_repurchase_interval_days": _own_interval,
    "user_item_repurchase_due_ratio": _due,
    # The user and the item's category and brand.
    "user_category_affinity": _share_text(
        "user_category_affinity", "{} of your interest is in its category", "a category new to you"
    ),
    "user_category_purchases": _times_text(
        "user_category_purchases", "you bought {} in its category"
    ),
    "user_category_days_since_last": _age_text(
        "user_category_days_since_last", "you looked at its category {}", "a category new to you"
    ),
    "user_brand_affinity": _share_text(
        "user_brand_affinity", "{} of your interest is in its brand", "a brand new to you"
    ),
    "user_brand_purchases": _times_text("user_brand_purchases", "you bought its brand {}"),
    "user_brand_days_since_last": _age_text(
        "user_brand_days_since_last", "you looked at its brand {}", "a brand new to you"
    ),
    "price_to_user_mean": _price_to_mean,
}
