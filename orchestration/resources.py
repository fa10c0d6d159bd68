"""Resources: where the lake and the state live. Nothing is read from the environment at import."""

import os

import dagster as dg

from shelfwise.lake import Lake
from shelfwise.settings import Settings


class ShelfwiseResource(dg.ConfigurableResource):
    """The Shelfwise installation a run works on.

    Each unset field falls back to its environment variable (SHELFWISE_HOME, SHELFWISE_LAKE),
    read when the run uses the resource.
    """

    home: str | None = None
    lake_url: str | None = None

    def settings(self) -> Settings:
        environ = dict(os.environ)
        if self.home:
            environ["SHELFWISE_HOME"] = self.home
        if self.lake_url:
            environ["SHELFWISE_LAKE"] = self.lake_url
        return Settings.from_env(environ)

    def lake(self) -> Lake:
        return Lake(self.settings().lake_url)
