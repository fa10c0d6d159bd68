from datetime import UTC, datetime

import polars as pl
import pytest

from models.report import rebuy_shares, render_rebuy_markdown

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)


def test_rebuy_shares_count_slots_of_items_bought_before_the_cutoff():
    user_items = pl.DataFrame(
        {
            "as_of": [AS_OF] * 3,
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["a", "b", "a"],
            "purchases": [2, 0, 1],  # u1 only viewed b
        }
    )
    ranked = pl.DataFrame(
        {
            "as_of": [AS_OF] * 4,
            "user_id": ["u1", "u1", "u2", "u2"],
            "item_id": ["a", "b", "c", "a"],
            "rank": [1, 2, 1, 2],
        }
    )
    labels = pl.DataFrame(
        {
            "as_of": [AS_OF] * 3,
            "user_id": ["u1", "u2", "u2"],
            "item_id": ["a", "c", "d"],
            "label": [3, 3, 1],
        }
    )
    shares = rebuy_shares(ranked, labels, user_items)
    assert shares == {
        "ranker_top10": pytest.approx(2 / 4),
        "truth_purchases": pytest.approx(1 / 2),
        "truth_positives": pytest.approx(1 / 3),
    }
    assert rebuy_shares(ranked, labels.clear(), user_items)["truth_purchases"] is None
    markdown = render_rebuy_markdown(shares)
    assert "| ranker top 10 slots | 50.0% |" in markdown
