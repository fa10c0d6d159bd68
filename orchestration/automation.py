"""Closing the loop: the retraining job, the feedback-volume sensor that requests it, and a daily
schedule as a safety net."""

import json
from datetime import datetime

import dagster as dg

from orchestration.resources import ShelfwiseResource
from shelfwise.intake.ingest import feedback_files
from shelfwise.runtime.registry import DATA_READ_AT, production

# Every asset, in lineage order: new feedback ingested → features → candidates → training →
# evaluation → gate → registration → promotion → bento. The blocking gate check stops
# promotion and the bento when the new ranker is not good enough.
retraining = dg.define_asset_job(
    "retraining",
    selection=dg.AssetSelection.all(),
    description="Retrains on everything in the lake, new feedback included, and promotes the "
    "new ranker only if it passes the promotion gate.",
)

# Off by default: the feedback sensor is the primary trigger; turn this on in the UI for shops
# whose feedback trickles in too slowly to reach the threshold.
daily_retraining = dg.ScheduleDefinition(
    name="daily_retraining",
    job=retraining,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)


@dg.sensor(
    job=retraining,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def feedback_volume(context: dg.SensorEvaluationContext, shelfwise: ShelfwiseResource):
    """Requests a retraining once enough feedback events arrived since the production model's
    features were built (SHELFWISE_RETRAIN_AFTER_EVENTS). Cheap: a listing of the lake's event
    files and the footers of new feedback files. The run key names the production model and how
    many thresholds were crossed, so a restarted daemon or a repeated tick launches nothing twice,
    and a ranker that failed the gate is retried only after another threshold's worth."""
    settings = shelfwise.settings()
    current = production(settings.bentoml_home)
    if current is None or DATA_READ_AT not in current.metadata:
        return dg.SkipReason("No production model with a known training time: run the pipeline.")
    since = datetime.fromisoformat(current.metadata[DATA_READ_AT])
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = cursor.get("files", {}) if cursor.get("model") == current.source_tag else {}
    files = feedback_files(shelfwise.lake(), since, known)
    context.update_cursor(json.dumps({"model": current.source_tag, "files": files}))
    arrived, threshold = sum(files.values()), settings.retrain_after_events
    if arrived < threshold:
        return dg.SkipReason(
            f"{arrived} feedback events since {since.isoformat()} ({current.source_tag}); "
            f"retraining at {threshold}."
        )
    return dg.RunRequest(
        run_key=f"{current.source_tag}:{arrived // threshold}",
        tags={"shelfwise/trigger": "feedback", "shelfwise/feedback_events": str(arrived)},
    )
