"""Resources: where the lake and the state live. Nothing is read from the environment at import."""

import os

import dagster as dg

from shelfwise.lake import Lake
from shelfwise.settings import Settings


class ShelfwiseResource(dg.ConfigurableResource):
    """The Shelfwise installation a run works on.

    Each unset field falls back to its environment variable (SHELFWISE_HOME, SHELFWISE_LAKE,
    SHELFWISE_RETRAIN_AFTER_EVENTS, SHELFWISE_REDIS_URL, SHELFWISE_REDIS_CLUSTER), read when a run
    or a sensor uses the resource.
    """

    home: str | None = None
    lake_url: str | None = None
    retrain_after_events: int | None = None
    redis_url: str | None = None
    redis_cluster: bool | None = None

    def settings(self) -> Settings:
        environ = dict(os.environ)
        if self.home:
            environ["SHELFWISE_HOME"] = self.home
        if self.lake_url:
            environ["SHELFWISE_LAKE"] = self.lake_url
        if self.retrain_after_events:
            environ["SHELFWISE_RETRAIN_AFTER_EVENTS"] = str(self.retrain_after_events)
        if self.redis_url:
            environ["SHELFWISE_REDIS_URL"] = self.redis_url
        if self.redis_cluster is not None:
            environ["SHELFWISE_REDIS_CLUSTER"] = str(self.redis_cluster).lower()
        return Settings.from_env(environ)

    def lake(self) -> Lake:
        return Lake(self.settings().lake_url)
