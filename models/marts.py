"""The dbt marts the ranking code reads, bundled under one set of names.

The candidate generators, the feature assembly (training, evaluation, serving snapshot) and the
evaluation all read the same marts; `Marts` is the one bundle they share, loaded from the lake
for some cutoffs and cut down to a chunk of queries with `for_queries`.
"""

import dataclasses
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from models.queries import at_cutoffs, cutoffs_of, restrict_to_queries
from shelfwise.lake import Lake, feature_table

# Bundle field → dbt mart.
MART_OF_FIELD = {
    "items": "item_features",
    "users": "user_features",
    "user_items": "user_item_features",
    "user_categories": "user_category_features",
    "user_brands": "user_brand_features",
    "covisitation": "item_covisitation",
    "bought_together": "item_bought_together",
    "repurchase_rates": "category_repurchase_rates",
}
# The marts of the ranker's feature vector (`models.features.assemble_features`).
FEATURE_FIELDS = ("items", "users", "user_items", "user_categories", "user_brands")
# The marts the candidate generators read.
CANDIDATE_FIELDS = (
    "items",
    "users",
    "user_items",
    "user_categories",
    "covisitation",
    "bought_together",
    "repurchase_rates",
)
# Rows keyed by (as_of, user_id): a chunk of queries keeps its own users' rows only.
_PER_USER = ("users", "user_items", "user_categories", "user_brands")


@dataclass(frozen=True)
class Marts:
    """The dbt marts, possibly restricted to some cutoffs; a mart not loaded is None.

    Attributes:
        items: `item_features` (as_of, item_id, ...).
        users: `user_features` (as_of, user_id, ...).
        user_items: `user_item_features` (as_of, user_id, item_id, ...).
        user_categories: `user_category_features` (as_of, user_id, category_id, ...).
        user_brands: `user_brand_features` (as_of, user_id, brand, ...).
        covisitation: `item_covisitation` (as_of, item_id, neighbour_item_id, score).
        bought_together: `item_bought_together` (as_of, item_id, neighbour_item_id, score).
        repurchase_rates: `category_repurchase_rates` (as_of, category_id, repeat_rate).
    """

    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    user_items: pl.DataFrame | None = None
    user_categories: pl.DataFrame | None = None
    user_brands: pl.DataFrame | None = None
    covisitation: pl.DataFrame | None = None
    bought_together: pl.DataFrame | None = None
    repurchase_rates: pl.DataFrame | None = None

    @classmethod
    def load(
        cls,
        lake: Lake,
        as_of: list[datetime] | None = None,
        fields: tuple[str, ...] = FEATURE_FIELDS,
    ) -> "Marts":
        """Reads marts from `<lake>/features/`.

        Args:
            lake: The lake dbt exported to.
            as_of: Keep only these cutoffs; all when omitted.
            fields: The bundle fields to read (the feature vector's marts by default).

        Returns:
            The bundle, the marts not in `fields` left None.
        """
        frames = {name: lake.read_frame(feature_table(MART_OF_FIELD[name])) for name in fields}
        if as_of is not None:
            frames = {name: at_cutoffs(frame, *as_of) for name, frame in frames.items()}
        return cls(**frames)

    def for_queries(self, queries: pl.DataFrame) -> "Marts":
        """The marts cut down to what the queries' rows can read.

        The per-user marts keep the queries' users' rows, the others the queries' cutoffs, each
        in its original order. Everything downstream joins on the query or on the cutoff, so
        candidates generated or features assembled from the restricted marts are exactly those
        from the whole marts, without joining every chunk against every user.

        Args:
            queries: Columns as_of, user_id (others are ignored; duplicates are fine).

        Returns:
            The restricted bundle (of the same class, other fields kept).
        """
        cutoffs = cutoffs_of(queries)
        restricted = {}
        for name in MART_OF_FIELD:
            frame = getattr(self, name)
            if frame is not None:
                restricted[name] = (
                    restrict_to_queries(frame, queries)
                    if name in _PER_USER
                    else at_cutoffs(frame, *cutoffs)
                )
        return dataclasses.replace(self, **restricted)
