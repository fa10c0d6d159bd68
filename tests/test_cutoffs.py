from datetime import UTC, datetime, timedelta

import pytest

from models.cutoffs import CutoffPlan, plan_cutoffs

END = datetime(2026, 3, 1, tzinfo=UTC)


def test_cutoffs_are_one_label_window_apart_ending_at_the_data_end():
    plan = plan_cutoffs(END, label_window_days=7, training_cutoffs=3)
    assert plan.serving == END
    assert plan.evaluation == END - timedelta(days=7)
    assert plan.training == tuple(END - timedelta(days=d) for d in (28, 21, 14))
    gaps = {b - a for a, b in zip(plan.all, plan.all[1:], strict=False)}
    assert gaps == {timedelta(days=7)}


def test_roles_come_back_from_the_exported_cutoff_list():
    plan = plan_cutoffs(END, label_window_days=7, training_cutoffs=2)
    shuffled = [plan.all[2], plan.all[0], plan.all[3], plan.all[1]]
    assert CutoffPlan.from_cutoffs(shuffled) == plan
    assert plan.as_dbt_vars()[-1] == "2026-03-01T00:00:00+00:00"


@pytest.mark.parametrize("cutoffs", [[], [END], [END, END - timedelta(days=7)]])
def test_too_few_cutoffs_are_refused(cutoffs):
    with pytest.raises(ValueError, match="need at least 3 cutoffs"):
        CutoffPlan.from_cutoffs(cutoffs)


def test_non_positive_window_is_refused():
    with pytest.raises(ValueError):
        plan_cutoffs(END, label_window_days=0, training_cutoffs=1)
