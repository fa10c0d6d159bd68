"""Which collaborative model the `collaborative` generator uses: EASE, implicit's ALS or BPR.

Each model alone ranks the evaluation users of a finished pipeline run (any lake the pipeline
wrote: the demo shop, The Complete Journey, ...), from the binary user x item matrix of every
interaction before the evaluation cutoff, own items kept (as the `ease` baseline does); NDCG@10
against the run's labels, and each model's paired difference to EASE on the same users (95%
bootstrap). EASE is Shelfwise's own (`models.collaborative`: the 5,000 items with the most users,
lambda 500); ALS (64 and 128 factors, regularisation 0.05, 15 iterations) and BPR (64 factors,
100 iterations) use every item, with implicit's defaults otherwise, seed 7.

`implicit` is not a Shelfwise dependency (the measurement chose EASE); this script needs it in
its interpreter, e.g. a scratch environment:

    python3 -m venv /tmp/als && /tmp/als/bin/pip install implicit==0.7.2 polars scipy
    PYTHONPATH=$PWD /tmp/als/bin/python benchmarks/collaborative_model_benchmark.py LAKE [LAKE ...]

Prints a table per lake and writes `benchmarks/results/collaborative_model.json`.
"""

import argparse

import numpy as np
import polars as pl
from harness import RESULTS_DIR, write_json
from implicit.als import AlternatingLeastSquares
from implicit.bpr import BayesianPersonalizedRanking

from models.collaborative import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_REGULARISATION,
    ease_weights,
    interaction_matrix,
)
from models.metrics import per_user_metrics

RESULTS = RESULTS_DIR / "collaborative_model.json"
K = 10


def _lists(cutoff, users: list[str], items: np.ndarray, top: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "as_of": [cutoff] * top.size,
            "user_id": np.repeat(np.array(users, dtype=object), K),
            "item_id": items[top.ravel()].astype(str),
            "rank": np.tile(np.arange(1, K + 1), len(users)),
        }
    )


def measure(lake: str) -> dict[str, dict[str, float]]:
    """Every model's NDCG@10 and paired difference to EASE on one lake's evaluation users."""
    queries = pl.read_parquet(f"{lake}/candidates/queries.parquet").filter(
        pl.col("role") == "evaluation"
    )
    cutoff = queries.get_column("as_of")[0]
    labels = (
        pl.read_parquet(f"{lake}/features/interaction_labels.parquet")
        .filter(pl.col("as_of") == cutoff)
        .join(queries.select("as_of", "user_id"), on=["as_of", "user_id"], how="semi")
    )
    events = pl.read_parquet(f"{lake}/events/**/*.parquet", hive_partitioning=True)
    history = events.filter(pl.col("occurred_at") < cutoff).select("user_id", "item_id")
    built = interaction_matrix(history, 10_000_000)  # every item, most users first
    rows = {user: n for n, user in enumerate(built.users)}
    users = [u for u in labels.get_column("user_id").unique().sort().to_list() if u in rows]
    index = np.array([rows[u] for u in users])
    matrix = built.matrix.tocsr()

    lists = {}
    kept = np.arange(min(DEFAULT_MAX_ITEMS, matrix.shape[1]))
    weights = ease_weights(matrix[:, kept], DEFAULT_REGULARISATION)
    scores = np.full((len(index), matrix.shape[1]), -np.inf, dtype=np.float32)
    scores[:, kept] = np.asarray(matrix[index][:, kept] @ weights)
    lists["ease"] = _lists(cutoff, users, built.items, np.argsort(-scores, axis=1)[:, :K])
    models = {
        "als_64": AlternatingLeastSquares(
            factors=64, regularization=0.05, iterations=15, random_state=7
        ),
        "als_128": AlternatingLeastSquares(
            factors=128, regularization=0.05, iterations=15, random_state=7
        ),
        "bpr_64": BayesianPersonalizedRanking(factors=64, iterations=100, random_state=7),
    }
    for name, model in models.items():
        model.fit(matrix, show_progress=False)
        top, _ = model.recommend(index, matrix[index], N=K, filter_already_liked_items=False)
        lists[name] = _lists(cutoff, users, built.items, top)

    per_user = {
        name: per_user_metrics(frame, labels, (K,)).select("user_id", "ndcg@10")
        for name, frame in lists.items()
    }
    rng = np.random.default_rng(0)
    figures = {}
    for name, frame in per_user.items():
        paired = per_user["ease"].join(frame, on="user_id", suffix="_model")
        diff = (paired["ndcg@10_model"] - paired["ndcg@10"]).to_numpy()
        means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(1000)]
        low, high = np.percentile(means, [2.5, 97.5])
        figures[name] = {
            "users": len(diff),
            "ndcg@10": float(frame["ndcg@10"].mean()),
            "minus_ease": float(diff.mean()),
            "minus_ease_ci95": [float(low), float(high)],
        }
    return figures


def main() -> None:
    """Measures every lake given and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lakes", nargs="+", help="lake folders of finished pipeline runs")
    results = {}
    for lake in parser.parse_args().lakes:
        figures = measure(lake)
        results[lake] = figures
        print(f"\n{lake}")
        print(f"{'model':10s} {'users':>6s} {'NDCG@10':>8s} {'minus EASE':>11s}  95% interval")
        for name, row in figures.items():
            low, high = row["minus_ease_ci95"]
            print(
                f"{name:10s} {row['users']:6d} {row['ndcg@10']:8.4f} {row['minus_ease']:+11.4f}"
                f"  [{low:+.4f}, {high:+.4f}]"
            )
    write_json(RESULTS, results)


if __name__ == "__main__":
    main()
