"""The one Dagster code location of Shelfwise: every asset from raw events to the bento, and the
retraining loop (job, feedback sensor, daily schedule)."""

import sys
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from orchestration.assets.bento import bento
from orchestration.assets.drift import feature_drift
from orchestration.assets.evaluation import evaluation
from orchestration.assets.experiments import experiment_results
from orchestration.assets.features import dbt_feature_tables
from orchestration.assets.lake import raw_events
from orchestration.assets.online_store import online_store
from orchestration.assets.promotion import production_model, registered_model
from orchestration.assets.ranked_lists import ranked_lists
from orchestration.assets.ranking import candidates, ranker, training_set
from orchestration.assets.snapshot import serving_features
from orchestration.automation import daily_retraining, feedback_volume, retraining
from orchestration.concurrency import pipeline_executor
from orchestration.dbt_project import dbt_project
from orchestration.resources import ShelfwiseResource

DBT_EXECUTABLE = str(Path(sys.executable).with_name("dbt"))

defs = dg.Definitions(
    assets=[
        raw_events,
        dbt_feature_tables,
        experiment_results,
        candidates,
        training_set,
        ranker,
        evaluation,
        serving_features,
        online_store,
        registered_model,
        production_model,
        ranked_lists,
        bento,
    ],
    asset_checks=[feature_drift],
    jobs=[retraining],
    schedules=[daily_retraining],
    sensors=[feedback_volume],
    executor=pipeline_executor,
    resources={
        "shelfwise": ShelfwiseResource(),
        # The dbt of this virtual environment, also when it is not activated.
        "dbt": DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE),
    },
)


def bound_to(shelfwise: ShelfwiseResource) -> dg.Definitions:
    """These definitions working on another installation than the environment's (tests and
    benchmarks run several side by side)."""
    return dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        jobs=defs.jobs,
        schedules=defs.schedules,
        sensors=defs.sensors,
        executor=defs.executor,
        resources={**defs.resources, "shelfwise": shelfwise},
    )
