"""Which user segments the ranker serves, and which get their fallback: chosen on validation.

Users fall into segments by their events before the cutoff (`models.evaluation.user_segments`,
the `user_events` feature in the serving snapshot): `new` (none), `light` (1 to
`heavy_threshold`), `heavy` (more). The *fallback* of every segment is popularity: what the
service serves a user it does not know (the cold-start ladder of `models.recommender`; without a
session or a context item, the shop's popular items, which the evaluation scores as
`popularity`).

The policy (`choose_segment_policy`), decided for every shop by one rule:

* `new` always gets the fallback: a user without an event has no row in `user_features`, so
  none in the serving snapshot, and the service serves them the cold-start ladder whatever the
  model (the evaluation still scores the ranker on their candidates, reported but not served).
* every other segment gets the ranker, unless on the *validation* cutoff (the last training
  cutoff, whose label window ends where the evaluation's starts: the evaluation labels are never
  seen, as for the blend of `models.baselines`) the ranker's mean `metric` (NDCG@10) over the
  segment's validation users is below popularity's. Point values, not intervals: the choice is
  which of two lists is better in expectation, and the promotion gate then checks each segment
  *as served* on the evaluation cutoff with its paired interval (`models.gate`). A tie, and a
  segment without validation users (no evidence), keep the ranker. The validation users are
  those with a positive label and with ranker scores (the sampled training queries at that
  cutoff). The scores come from a ranker that never learned from that window: when the ranker
  is refit on it (`refit_with_validation`), the early-stopped model it was refit from (same
  features, parameters and rounds, one window less), else the ranker itself. Early stopping
  watched that window, so the ranker's validation value is slightly optimistic; the gate's
  check of each segment on the evaluation cutoff is the guard.

The policy travels with the model (the ranker's `model.json` info in the registry, under
`segment_policy`), and the service obeys it: a known user whose segment gets the fallback is
answered like an unknown user, with `fallback_level` `FALLBACK_SEGMENT` (3) in the response.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from models.metrics import QUERY, mean_metrics, per_user_metrics, top_k

SEGMENTS = ("new", "light", "heavy")
RANKER = "ranker"
FALLBACK = "fallback"
# The approach of the evaluation that a segment's fallback is.
FALLBACK_APPROACH = "popularity"
DEFAULT_METRIC = "ndcg@10"
DEFAULT_HEAVY_THRESHOLD = 20
# Segments the service never serves with the ranker (not in the serving snapshot).
ALWAYS_FALLBACK = ("new",)


def segment_of(events: float | None, heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD) -> str:
    """The segment of a user with `events` events before the cutoff (None or NaN: none).

    Args:
        events: The user's events before the cutoff (`user_events`).
        heavy_threshold: Events above which a user is `heavy`.

    Returns:
        `new`, `light` or `heavy`, as `models.evaluation.user_segments` assigns them.
    """
    if events is None or events != events or events <= 0:  # None, NaN or none
        return "new"
    return "light" if events <= heavy_threshold else "heavy"


@dataclass(frozen=True)
class SegmentPolicy:
    """Who serves each segment: `ranker` or `fallback`.

    Attributes:
        serves: Segment → `ranker` or `fallback`; a segment absent is served by the ranker.
        heavy_threshold: Events above which a user is `heavy`.
        metric: The metric the choice compared.
        validation: Segment → `users`, `ranker` and `fallback` (the metric's means on the
            validation cutoff); empty without validation data.
        chosen_on: The validation cutoff (ISO 8601), or None when nothing was compared (an
            empty string in `to_dict`).
        reasons: Segment → why it is served so, for the report.
    """

    serves: dict[str, str]
    heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD
    metric: str = DEFAULT_METRIC
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen_on: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def serves_fallback(self, segment: str) -> bool:
        """Whether the segment is served its fallback instead of the ranker."""
        return self.serves.get(segment, RANKER) == FALLBACK

    def fallback_for(self, events: float | None) -> bool:
        """Whether a user with `events` events before the cutoff gets the fallback."""
        return self.serves_fallback(segment_of(events, self.heavy_threshold))

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain values (JSON-ready; `from_dict` reads it back)."""
        return {
            "serves": {name: str(value) for name, value in self.serves.items()},
            "heavy_threshold": int(self.heavy_threshold),
            "metric": str(self.metric),
            "fallback": FALLBACK_APPROACH,
            "validation": {
                name: {key: float(value) for key, value in values.items()}
                for name, values in self.validation.items()
            },
            "chosen_on": self.chosen_on or "",
            "reasons": dict(self.reasons),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SegmentPolicy | None":
        """Reads `to_dict`'s output; None (a model without a policy) gives None.

        Raises:
            ValueError: A segment is served by something other than `ranker` or `fallback`.
        """
        if not values:
            return None
        serves = {str(name): str(value) for name, value in dict(values["serves"]).items()}
        unknown = sorted(value for value in serves.values() if value not in (RANKER, FALLBACK))
        if unknown:
            raise ValueError(f"a segment policy serves {RANKER} or {FALLBACK}, got {unknown}")
        return cls(
            serves=serves,
            heavy_threshold=int(values.get("heavy_threshold", DEFAULT_HEAVY_THRESHOLD)),
            metric=str(values.get("metric", DEFAULT_METRIC)),
            validation={
                str(name): {str(key): float(value) for key, value in dict(inner).items()}
                for name, inner in dict(values.get("validation") or {}).items()
            },
            chosen_on=values.get("chosen_on") or None,
            reasons={str(k): str(v) for k, v in dict(values.get("reasons") or {}).items()},
        )


def default_policy(heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD) -> SegmentPolicy:
    """The policy without validation data: the ranker for every segment it can serve."""
    return SegmentPolicy(
        serves={name: FALLBACK if name in ALWAYS_FALLBACK else RANKER for name in SEGMENTS},
        heavy_threshold=heavy_threshold,
        reasons={
            **{name: "no validation cutoff: the ranker" for name in SEGMENTS},
            **{name: _NOT_IN_SNAPSHOT for name in ALWAYS_FALLBACK},
        },
    )


_NOT_IN_SNAPSHOT = "not in the serving snapshot: the service serves the cold-start ladder"


def choose_segment_policy(
    ranker_scores: pl.DataFrame,
    fallback: pl.DataFrame,
    labels: pl.DataFrame,
    segments: pl.DataFrame,
    metric: str = DEFAULT_METRIC,
    heavy_threshold: int = DEFAULT_HEAVY_THRESHOLD,
) -> SegmentPolicy:
    """Chooses per segment the ranker or its fallback by `metric` on a validation cutoff.

    See the module docstring for the rule.

    Args:
        ranker_scores: The ranker's scores of the validation users' candidates (as_of, user_id,
            item_id, score); users without a row are left out of the comparison.
        fallback: The fallback's lists at the validation cutoff (as_of, user_id, item_id, rank).
        labels: Labels of the validation window (as_of, user_id, item_id, label).
        segments: The validation users' segments (as_of, user_id, segment; see
            `models.evaluation.user_segments`).
        metric: A per-user metric `<name>@<k>` (higher is better).
        heavy_threshold: The threshold the segments were cut with (recorded in the policy).

    Returns:
        The policy, with each segment's validation means and the reason for its choice.
    """
    k = int(metric.rsplit("@", 1)[1])
    scored_users = ranker_scores.select(QUERY).unique()
    users = (
        labels.filter(pl.col("label") > 0)
        .select(QUERY)
        .unique()
        .join(scored_users, on=QUERY, how="semi")
    )
    labels = labels.join(users, on=QUERY, how="semi")
    ranker = per_user_metrics(top_k(ranker_scores, "score", k), labels, (k,))
    popular = per_user_metrics(fallback, labels, (k,))
    serves: dict[str, str] = {}
    validation: dict[str, dict[str, float]] = {}
    reasons: dict[str, str] = {}
    for segment in SEGMENTS:
        members = segments.filter(pl.col("segment") == segment).select(QUERY)
        ranker_mean = mean_metrics(ranker.join(members, on=QUERY, how="semi"))
        fallback_mean = mean_metrics(popular.join(members, on=QUERY, how="semi"))
        count = int(ranker_mean["users"])
        validation[segment] = {
            "users": float(count),
            RANKER: float(ranker_mean.get(metric, 0.0)),
            FALLBACK: float(fallback_mean.get(metric, 0.0)),
        }
        values = validation[segment]
        shown = f"{metric} ranker {values[RANKER]:.4f} vs popularity {values[FALLBACK]:.4f}"
        if segment in ALWAYS_FALLBACK:
            serves[segment], reasons[segment] = FALLBACK, _NOT_IN_SNAPSHOT
        elif count == 0:
            serves[segment] = RANKER
            reasons[segment] = "no validation user: the ranker"
        elif values[RANKER] < values[FALLBACK]:
            serves[segment] = FALLBACK
            reasons[segment] = f"{shown} on {count} validation users: popularity"
        else:
            serves[segment] = RANKER
            reasons[segment] = f"{shown} on {count} validation users: the ranker"
    cutoffs = sorted(users.get_column("as_of").unique().to_list())
    return SegmentPolicy(
        serves=serves,
        heavy_threshold=heavy_threshold,
        metric=metric,
        validation=validation,
        chosen_on=", ".join(cutoff.isoformat() for cutoff in cutoffs) or None,
        reasons=reasons,
    )
