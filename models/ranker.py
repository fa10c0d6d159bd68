"""Training the LightGBM LambdaRank ranker on the multi-cutoff training set."""

import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from models.features import FEATURE_COLUMNS, feature_matrix

# LightGBM (with the pandas and SciPy it imports, ~0.5 s) is imported by the functions that use
# it: the service imports this module for `booster_from_text`, and `bentoml serve` imports the
# service in its own process too, which never loads a model.
if TYPE_CHECKING:
    import lightgbm as lgb

QUERY = ["as_of", "user_id"]


@dataclass(frozen=True)
class RankerParams:
    """LambdaRank hyper-parameters (defaults suit a few hundred thousand rows on 2 cores).

    Attributes:
        learning_rate: LightGBM's shrinkage per boosting round.
        num_leaves: Leaves per tree.
        min_data_in_leaf: Rows a leaf needs at least.
        feature_fraction: Share of the features each tree sees.
        bagging_fraction: Share of the rows each bagging round sees.
        bagging_freq: Bagging every this many rounds.
        lambdarank_truncation_level: Positions of a list the LambdaRank gradients look at.
        num_boost_round: Boosting rounds at most.
        early_stopping_rounds: Rounds without a better validation NDCG@10 before stopping.
        num_threads: LightGBM's threads.
        seed: LightGBM's seed (bagging, feature sampling).
        refit_with_validation: After early stopping has chosen the number of rounds on the
            validation window, train again on every training cutoff, that window included.
    """

    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambdarank_truncation_level: int = 20
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    num_threads: int = 2
    seed: int = 7
    # The validation window is the most recent one, the closest to what the model will serve: a
    # model that never saw it learns from stale data (see `train_ranker`).
    refit_with_validation: bool = True

    def lightgbm_params(self) -> dict[str, object]:
        """The parameters in LightGBM's own vocabulary."""
        params = asdict(self)
        for key in ("num_boost_round", "early_stopping_rounds", "refit_with_validation"):
            params.pop(key)
        return {
            **params,
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "label_gain": [0.0, 1.0, 3.0, 7.0],  # 2^label - 1, as in our NDCG
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }


def keep_queries_with_positives(rows: pl.DataFrame) -> pl.DataFrame:
    """Drops (as_of, user) queries with no positive label: they carry no ranking signal."""
    return rows.filter((pl.col("label") > 0).any().over(QUERY))


def query_sizes(rows: pl.DataFrame) -> np.ndarray:
    """Group sizes for LightGBM; the rows must be sorted by (as_of, user_id)."""
    return rows.group_by(QUERY, maintain_order=True).agg(pl.len()).get_column("len").to_numpy()


def _dataset(rows: pl.DataFrame, reference: "lgb.Dataset | None" = None) -> "lgb.Dataset":
    import lightgbm as lgb

    rows = rows.sort(QUERY, maintain_order=True)
    return lgb.Dataset(
        feature_matrix(rows),
        label=rows.get_column("label").to_numpy(),
        group=query_sizes(rows),
        feature_name=FEATURE_COLUMNS,
        reference=reference,
        free_raw_data=True,
    )


def train_ranker(
    train: pl.DataFrame, validation: pl.DataFrame | None, params: RankerParams
) -> "lgb.Booster":
    """Trains a LambdaRank booster, early-stopping on the validation queries when given.

    The final booster of `train_ranker_with_validation_model`; see there.

    Args:
        train: Assembled rows (see `models.features.assemble_features`) with a graded `label`.
        validation: Later-in-time rows for early stopping, or None to train all rounds.
        params: Hyper-parameters.

    Returns:
        The trained booster (best iteration when early stopping was used).
    """
    return train_ranker_with_validation_model(train, validation, params)[0]


def train_ranker_with_validation_model(
    train: pl.DataFrame, validation: pl.DataFrame | None, params: RankerParams
) -> tuple["lgb.Booster", "lgb.Booster | None"]:
    """Trains a LambdaRank booster, early-stopping on the validation queries when given.

    With validation rows and `params.refit_with_validation`, the rounds early stopping chose
    are then trained again on the training and validation rows together (the usual
    "choose the rounds, then refit on everything" of time-based validation): the final model
    has seen the latest window too.

    Args:
        train: Assembled rows (see `models.features.assemble_features`) with a graded `label`.
        validation: Later-in-time rows for early stopping, or None to train all rounds.
        params: Hyper-parameters.

    Returns:
        The final booster (best iteration when early stopping was used), and the early-stopped
        booster that never saw the validation rows when the final one was refit on them (None
        otherwise: the final booster is then that one, or there was no validation). Decisions
        taken on the validation window (the segment policy, `models.segments`) need a model
        that did not learn from it.
    """
    import lightgbm as lgb

    train_set = _dataset(train)
    callbacks = []
    valid_sets = []
    if validation is not None and validation.height:
        valid_sets = [_dataset(validation, reference=train_set)]
        callbacks.append(lgb.early_stopping(params.early_stopping_rounds, verbose=False))
    booster = lgb.train(
        params.lightgbm_params(),
        train_set,
        num_boost_round=params.num_boost_round,
        valid_sets=valid_sets,
        callbacks=callbacks,
    )
    if not valid_sets or not params.refit_with_validation:
        return booster, None
    rounds = booster.best_iteration or booster.current_iteration()
    everything = _dataset(pl.concat([train, validation], how="vertical_relaxed"))
    return lgb.train(params.lightgbm_params(), everything, num_boost_round=rounds), booster


def feature_importance(booster: "lgb.Booster") -> dict[str, float]:
    """Total gain per feature, largest first."""
    gains = booster.feature_importance(importance_type="gain")
    pairs = sorted(zip(booster.feature_name(), gains, strict=True), key=lambda p: -p[1])
    return {name: float(gain) for name, gain in pairs}


def booster_from_text(model_text: str) -> "lgb.Booster":
    """A ranker from LightGBM's text format.

    The one loader for the lake's file, the model store's and the service's.

    Args:
        model_text: What `lgb.Booster.model_to_string` wrote.

    Returns:
        The booster.
    """
    import lightgbm as lgb

    return lgb.Booster(model_str=model_text)


class LazyBooster:
    """A model's LightGBM booster, loaded on first use: predicts like `lgb.Booster`.

    What a worker serving the compiled ranker keeps for explanations (`pred_contrib`), which
    only LightGBM computes: a worker that is never asked for one never imports LightGBM (with
    its pandas and SciPy) nor holds the booster. Safe to share between threads.

    Args:
        text: The model in LightGBM's text format.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._booster: lgb.Booster | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the booster has been loaded."""
        return self._booster is not None

    def get(self) -> "lgb.Booster":
        """The booster, loaded now if it was not."""
        if self._booster is None:
            with self._lock:
                if self._booster is None:
                    self._booster = booster_from_text(self._text)
        return self._booster

    def predict(self, data: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - as lgb.Booster.predict
        """`lgb.Booster.predict` of the loaded booster."""
        return self.get().predict(data, **kwargs)


def model_text(booster: "lgb.Booster") -> str:
    """A trained ranker in LightGBM's text format, cut at its best iteration."""
    return booster.model_to_string(num_iteration=booster.best_iteration or None)
