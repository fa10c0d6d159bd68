"""The online store: the serving snapshot written to Redis for stateless service replicas."""

import dagster as dg

from models.online_store import open_client, write_from_lake
from orchestration.resources import ShelfwiseResource
from shelfwise.runtime.redis_clients import WRITER_CLUSTER_RETRIES


@dg.asset(deps=["serving_features"], group_name="serving")
def online_store(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The serving snapshot as a new version of the online store in Redis (SHELFWISE_REDIS_URL):
    each user's candidates and purchases as one compact value, the shared item parts once, then
    the version pointer switched in one step, so every service replica serves the new version
    within a second, without a restart; the version before stays until the next switch, older
    ones are removed. Without a Redis URL this is a no-op ("embedded mode"): each service worker
    loads the snapshot from the lake."""
    settings = shelfwise.settings()
    if not settings.redis_url:
        return dg.MaterializeResult(metadata={"mode": "embedded mode"})
    client = open_client(
        settings.redis_url,
        timeout_s=30.0,
        cluster=settings.redis_cluster,
        cluster_retries=WRITER_CLUSTER_RETRIES,
    )
    written = write_from_lake(client, shelfwise.lake())
    return dg.MaterializeResult(
        metadata={
            "mode": "redis",
            "version": written.version,
            "users": written.users,
            "known_users": written.known_users,
            "bytes_written": written.bytes,
            "seconds": round(written.seconds, 2),
            "previous_version": written.previous if written.previous is not None else -1,
            "removed_versions": ", ".join(map(str, written.removed)) or "none",
        }
    )
