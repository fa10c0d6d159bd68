"""A serving snapshot built for another ranker's features is refused, not served empty."""

import pytest

from models.features import FEATURE_COLUMNS
from models.recommender import Recommender
from models.snapshot import SnapshotFeaturesError


def test_a_snapshot_built_for_another_ranker_is_refused_not_served_empty(pipeline_run):
    lake = pipeline_run.lake
    with pytest.raises(SnapshotFeaturesError, match="not_a_feature"):
        Recommender.from_lake(lake, None, [*FEATURE_COLUMNS, "not_a_feature"])
    # Without that ranker the same snapshot serves its users.
    assert Recommender.from_lake(lake, None).known_users > 0
