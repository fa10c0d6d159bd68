"""Collaborative filtering: item-item weights learned from the user x item matrix at a cutoff.

EASE (Steck 2019, "Embarrassingly Shallow Autoencoders") on the binary user x item matrix:
`B = I - P / diag(P)` with `P = (X'X + lambda I)^-1`, a user's score for item j is `X_u B[:, j]`.
It is the collaborative model both the `ease` baseline (`models.baselines`) and the
`collaborative` candidate generator (`models.candidates`) use, and its strongest weights per item
are the "vectors" the service reuses: `/similar` and the session rung of users it does not know
read them as a neighbour table, like co-visitation.

Why EASE and not matrix factorisation, measured (`benchmarks/collaborative_model_benchmark.py`:
each model alone, NDCG@10 on a pipeline run's evaluation users, paired with EASE): on The
Complete Journey (600-household sample) implicit's ALS with 64 factors is 0.025 worse
[-0.035, -0.016], with 128 factors 0.028 worse, BPR 0.056 worse; on the demo shop ALS-64 ties
(+0.001 [-0.001, +0.003]), ALS-128 is 0.004 worse and BPR 0.020 worse. EASE also has one
hyper-parameter with a well-known order of magnitude (lambda about 500 for implicit data)
instead of factors, iterations and regularisation to tune per shop, is deterministic, and needs
no further compiled dependency. Its cost is a dense items x items inverse, so the model keeps the
`max_items` items with the most users (5,000 by default: about 100 MB of float32 weights and a
few seconds per cutoff on two cores); items outside it are left to the other generators.

Point in time: a model is fitted from the `user_item_features` rows of one cutoff (`as_of`),
which dbt builds from events strictly before that cutoff, so an event at or after the cutoff
changes nothing in that cutoff's weights or scores.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

# SciPy (~0.1-0.25 s to import) is imported by the functions that fit or score the model: the
# service imports this module (through `models.candidates`) but never fits one.
if TYPE_CHECKING:
    import scipy.sparse as sp

DEFAULT_MAX_ITEMS = 5_000
DEFAULT_REGULARISATION = 500.0
# Neighbours kept per item when the model is exported for /similar and sessions.
NEIGHBOURS_PER_ITEM = 50
# Users scored at a time: the dense scores of one block are users x items float32.
USER_BLOCK = 1_000


@dataclass
class InteractionMatrix:
    """A binary user x item matrix and its row and column labels.

    Attributes:
        matrix: users x items, 1.0 where the user interacted with the item (float32 CSR).
        users: The user id of each row.
        items: The item id of each column, most users first.
    """

    matrix: "sp.csr_matrix"
    users: list[str]
    items: np.ndarray


def interaction_matrix(pairs: pl.DataFrame, max_items: int) -> InteractionMatrix:
    """The binary user x item matrix of the `max_items` items with the most users.

    Args:
        pairs: Columns user_id, item_id (duplicates allowed).
        max_items: Columns kept: the items with the most distinct users (ties by item id).

    Returns:
        The matrix; users without any kept item have no row.
    """
    import scipy.sparse as sp

    pairs = pairs.select("user_id", "item_id").unique()
    items = (
        pairs.group_by("item_id")
        .agg(pl.len().alias("users"))
        .sort(["users", "item_id"], descending=[True, False])
        .head(max_items)
        .with_row_index("column")
    )
    pairs = pairs.join(items.select("item_id", "column"), on="item_id", how="inner")
    user_ids = pairs.get_column("user_id").unique().sort()
    rows = pl.DataFrame({"user_id": user_ids}).with_row_index("row")
    pairs = pairs.join(rows, on="user_id", how="inner")
    matrix = sp.csr_matrix(
        (
            np.ones(pairs.height, dtype=np.float32),
            (pairs.get_column("row").to_numpy(), pairs.get_column("column").to_numpy()),
        ),
        shape=(rows.height, items.height),
        dtype=np.float32,
    )
    matrix.sort_indices()  # the same sums in the same order, whatever order the rows came in
    return InteractionMatrix(matrix, user_ids.to_list(), items.get_column("item_id").to_numpy())


def ease_weights(matrix: "sp.csr_matrix", regularisation: float) -> np.ndarray:
    """EASE's item-item weights `B` (zero diagonal) of a binary user x item matrix.

    Args:
        matrix: users x items.
        regularisation: Lambda added to the Gram matrix's diagonal.

    Returns:
        items x items float32 weights; column j scores item j.

    Raises:
        numpy.linalg.LinAlgError: The regularised Gram matrix could not be inverted.
    """
    from scipy.linalg import lapack

    # X'X + lambda I is symmetric positive definite: invert it through its Cholesky factor
    # (LAPACK potrf + potri, float32), about four times faster than a float64 LU inverse.
    gram = (matrix.T @ matrix).toarray().astype(np.float32)
    gram[np.diag_indices_from(gram)] += regularisation
    factor, info = lapack.spotrf(gram, lower=False, overwrite_a=True, clean=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: the Gram matrix is not positive definite ({info})")
    upper, info = lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: the Gram matrix could not be inverted ({info})")
    precision = np.triu(upper) + np.triu(upper, 1).T
    weights = -precision / np.diag(precision)[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


@dataclass
class ItemItemModel:
    """EASE weights of one cutoff.

    Attributes:
        items: The item id of each row and column of `weights`.
        weights: items x items, column j scores item j.
    """

    items: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        self.column = {str(item): n for n, item in enumerate(self.items.tolist())}


def fit_item_models(
    user_items: pl.DataFrame,
    max_items: int = DEFAULT_MAX_ITEMS,
    regularisation: float = DEFAULT_REGULARISATION,
) -> dict[datetime, ItemItemModel]:
    """One EASE model per cutoff, each from that cutoff's user x item rows only.

    Args:
        user_items: The `user_item_features` mart (as_of, user_id, item_id), any cutoffs; every
            row is an interaction before its cutoff.
        max_items: Items kept per cutoff (those with the most users).
        regularisation: EASE's lambda.

    Returns:
        as_of → model; a cutoff with fewer than two items has none.
    """
    models: dict[datetime, ItemItemModel] = {}
    for (as_of,), rows in user_items.select("as_of", "user_id", "item_id").group_by(
        "as_of", maintain_order=True
    ):
        built = interaction_matrix(rows, max_items)
        if built.matrix.shape[1] < 2:
            continue
        models[as_of] = ItemItemModel(built.items, ease_weights(built.matrix, regularisation))
    return models


def collaborative_scores(
    queries: pl.DataFrame,
    user_items: pl.DataFrame,
    models: Mapping[datetime, ItemItemModel],
    per_user: int,
    blocked: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Each user's top `per_user` items by EASE score among items they never interacted with.

    The user's own items are left to the history and buy-again generators: this generator is
    the discovery one, what users like this one also took.

    Args:
        queries: Columns as_of, user_id.
        user_items: `user_item_features` rows (as_of, user_id, item_id) of at least the queries.
        models: as_of → model (`fit_item_models`); a cutoff without one proposes nothing.
        per_user: Items proposed per user.
        blocked: (as_of, item_id) never to propose (not recommendable), if any.

    Returns:
        Columns as_of, user_id, item_id, collaborative_score (> 0 only).
    """
    schema = {
        "as_of": queries.schema["as_of"],
        "user_id": pl.String,
        "item_id": pl.String,
        "collaborative_score": pl.Float64,
    }
    frames = [pl.DataFrame(schema=schema)]
    own = user_items.join(queries.select("as_of", "user_id"), on=["as_of", "user_id"], how="semi")
    for (as_of,), rows in own.select("as_of", "user_id", "item_id").group_by(
        "as_of", maintain_order=True
    ):
        model = models.get(as_of)
        if model is None or per_user <= 0:
            continue
        mask = np.zeros(len(model.items), dtype=bool)
        if blocked is not None and blocked.height:
            out = blocked.filter(pl.col("as_of") == as_of).get_column("item_id")
            mask = np.isin(model.items, out.to_numpy())
        frames.append(_top_unseen(as_of, rows, model, per_user, mask, schema))
    return pl.concat(frames)


def _top_unseen(
    as_of: datetime,
    rows: pl.DataFrame,
    model: ItemItemModel,
    per_user: int,
    mask: np.ndarray,
    schema: dict[str, pl.DataType],
) -> pl.DataFrame:
    import scipy.sparse as sp

    columns = rows.get_column("item_id").replace_strict(model.column, default=None).cast(pl.Int64)
    known = rows.with_columns(columns.alias("column")).filter(pl.col("column").is_not_null())
    user_ids = known.get_column("user_id").unique().sort()
    if user_ids.len() == 0:
        return pl.DataFrame(schema=schema)
    index = pl.DataFrame({"user_id": user_ids}).with_row_index("row")
    known = known.join(index, on="user_id", how="inner")
    matrix = sp.csr_matrix(
        (
            np.ones(known.height, dtype=np.float32),
            (known.get_column("row").to_numpy(), known.get_column("column").to_numpy()),
        ),
        shape=(index.height, len(model.items)),
    )
    matrix.sort_indices()
    users = np.asarray(user_ids.to_list(), dtype=object)
    # The user's own items are not this generator's job: the history generators propose them.
    top = top_items_per_user(matrix, model.weights, users, model.items, per_user, mask, True)
    return top.select(
        pl.lit(as_of).cast(schema["as_of"]).alias("as_of"),
        "user_id",
        "item_id",
        pl.col("score").alias("collaborative_score"),
    )


def top_items_per_user(
    interactions: "sp.csr_matrix",
    weights: "np.ndarray | sp.csr_matrix",
    users: np.ndarray,
    items: np.ndarray,
    depth: int,
    blocked: np.ndarray,
    exclude_own: bool,
) -> pl.DataFrame:
    """Each user's best items by `interactions @ weights`, scored in blocks of users.

    The one scorer of every item-item model (the collaborative generator, the EASE and item-kNN
    baselines): a block's dense scores are users × items, so memory stays one block's.

    Args:
        interactions: Users × items (rows in the order of `users`).
        weights: Items × items, dense or sparse.
        users: The user id of each row.
        items: The item id of each column.
        depth: Items kept per user (at most the number of items).
        blocked: A boolean mask of the items never to propose.
        exclude_own: Whether a user's own items (non-zero in `interactions`) are left out.

    Returns:
        Columns user_id, item_id, score (> 0 only), up to `depth` rows per user.
    """
    import scipy.sparse as sp

    schema = {"user_id": pl.String, "item_id": pl.String, "score": pl.Float64}
    depth = min(depth, len(items))
    parts = [pl.DataFrame(schema=schema)]
    if depth <= 0:
        return parts[0]
    for start in range(0, interactions.shape[0], USER_BLOCK):
        block = interactions[start : start + USER_BLOCK]
        scores = block @ weights
        scores = scores.toarray() if sp.issparse(scores) else np.asarray(scores)
        if exclude_own:
            scores[block.nonzero()] = -np.inf
        scores[:, blocked] = -np.inf
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        values = np.take_along_axis(scores, top, axis=1)
        parts.append(
            pl.DataFrame(
                {
                    "user_id": np.repeat(users[start : start + block.shape[0]], depth),
                    "item_id": np.asarray(items)[top.ravel()].astype(str),
                    "score": values.ravel().astype(np.float64),
                },
                schema=schema,
            )
        )
    return pl.concat(parts).filter(pl.col("score") > 0)


def item_neighbours(
    models: Mapping[datetime, ItemItemModel], per_item: int, as_of_type: pl.DataType
) -> pl.DataFrame:
    """Each item's strongest positive EASE weights: the neighbour table `/similar` reads.

    Args:
        models: as_of → model.
        per_item: Neighbours kept per item.
        as_of_type: The dtype of the `as_of` column.

    Returns:
        Columns as_of, item_id, neighbour_item_id, score (> 0), strongest first per item.
    """
    frames = [
        pl.DataFrame(
            schema={
                "as_of": as_of_type,
                "item_id": pl.String,
                "neighbour_item_id": pl.String,
                "score": pl.Float64,
            }
        )
    ]
    for as_of, model in models.items():
        n_items = len(model.items)
        depth = min(per_item, n_items - 1)
        if depth <= 0:
            continue
        # Row i of B scores how much item i speaks for every other item: i's neighbours.
        top = np.argpartition(-model.weights, depth - 1, axis=1)[:, :depth]
        values = np.take_along_axis(model.weights, top, axis=1)
        frame = pl.DataFrame(
            {
                "item_id": np.repeat(model.items.astype(str), depth),
                "neighbour_item_id": model.items[top.ravel()].astype(str),
                "score": values.ravel().astype(np.float64),
            }
        )
        frames.append(
            frame.filter(pl.col("score") > 0)
            .select(pl.lit(as_of).cast(as_of_type).alias("as_of"), pl.all())
            .sort("item_id", "score", descending=[False, True])
        )
    return pl.concat(frames)
