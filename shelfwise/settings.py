"""Where Shelfwise keeps its state, read from the environment when a process starts."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from shelfwise.contracts import DEFAULT_EARLIEST_EVENT_AT, parse_earliest


@dataclass(frozen=True)
class Settings:
    """Locations and secrets of one Shelfwise installation.

    Attributes:
        home: Local state folder (`SHELFWISE_HOME`, default `./data`), always absolute.
        lake_url: Lake root (`SHELFWISE_LAKE`): a local path or `s3://bucket/prefix`.
        api_token: When set, write and admin endpoints require this bearer token (never shown
            in the settings' repr).
        max_per_category: At most this many items of one category per recommendation list
            (`SHELFWISE_MAX_PER_CATEGORY`; 0, the default, means no cap).
        redis_url: When set (`SHELFWISE_REDIS_URL`), the service keeps its online state (sessions,
            purchases, stock updates) in this Redis, shared by all workers and replicas (never
            shown in the settings' repr: the URL may carry a password).
        redis_cluster: Whether `redis_url` names a node of a Redis Cluster
            (`SHELFWISE_REDIS_CLUSTER`, `true` or `false`, the default): the service and the
            pipeline then talk to the cluster through redis-py's cluster client, which finds the
            other nodes and sends each key to the node owning its slot.
        ranker_budget_ms: Milliseconds the ranker may take per request before the service serves
            the candidate order instead (`SHELFWISE_RANKER_BUDGET_MS`, default 50; 0: no limit).
        max_body_bytes: The largest request body the service reads (`SHELFWISE_MAX_BODY_BYTES`,
            default 1 MiB).
        retrain_after_events: The feedback sensor requests a retraining once this many feedback
            events arrived since the production model was trained
            (`SHELFWISE_RETRAIN_AFTER_EVENTS`, default 10,000).
        model_poll_s: How often the service looks for a newly promoted model, in seconds
            (`SHELFWISE_MODEL_POLL_S`, default 10; 0: only `POST /admin/reload`).
        experiment_poll_s: How often the service reads the book of experiments from the lake, in
            seconds (`SHELFWISE_EXPERIMENT_POLL_S`, default 10; 0: only `POST /admin/reload`).
        compact_every_s: How often the service compacts its feedback log into the lake, in
            seconds (`SHELFWISE_COMPACT_EVERY_S`, default 30; 0: never, leave it to the pipeline).
        earliest_event_at: Events and stock updates dated before this are refused by the API
            (`SHELFWISE_EARLIEST_EVENT_AT`, ISO 8601, UTC when naive; default 2000-01-01).
        max_concurrency: Requests in progress per service worker above which the service answers
            429 with `Retry-After` at once (`SHELFWISE_MAX_CONCURRENCY`, default 8; 0: no limit).
        header_timeout_s: Seconds a client has to send a request's headers, from the connection's
            opening or the request's first byte, before the server closes the connection
            (`SHELFWISE_HEADER_TIMEOUT_S`, default 10; 0: no limit).
        max_requests_per_connection: About how many requests a service worker answers on one
            keep-alive connection before it asks the client to reconnect (`Connection: close`),
            so that connections spread over the workers; each connection's number is drawn
            between half and one and a half times it (`SHELFWISE_MAX_REQUESTS_PER_CONNECTION`,
            default 250; 0: no limit).
        ranker_engine: What predicts the ranker's scores in the service
            (`SHELFWISE_RANKER_ENGINE`): `compiled` (the default) serves the ranker compiled by
            lleaves when it can (`models.compiled_ranker`), else LightGBM; `lightgbm` always
            serves LightGBM.
        feature_sample_rate: The share of personalised `/recommend` requests whose ranked
            candidates' feature rows the service logs for the drift check
            (`SHELFWISE_FEATURE_SAMPLE_RATE`, default 0.01; 0: none; at most 1).
        feature_sample_rows: The most candidate rows logged per sampled request, a uniform draw
            among them (`SHELFWISE_FEATURE_SAMPLE_ROWS`, default 20; 0: all of them).
        feature_samples_per_s: The most requests sampled per second and worker, whatever the
            share (`SHELFWISE_FEATURE_SAMPLES_PER_S`, default 0.1; 0: no bound).
        otlp_endpoint: When set (`SHELFWISE_OTLP_ENDPOINT`), the service traces `/recommend` and
            its stages with OpenTelemetry and exports the spans over OTLP/HTTP (protobuf) to this
            URL: a collector's base URL (`http://collector:4318`, `/v1/traces` is appended) or
            its full traces URL. Unset (the default), nothing is traced (never shown in the
            settings' repr: the URL may carry credentials).
        trace_sample_rate: The share of `/recommend` requests traced when tracing is on
            (`SHELFWISE_TRACE_SAMPLE_RATE`, 0 to 1, default 1); a request whose caller sent a
            W3C `traceparent` follows the caller's sampling decision instead.
    """

    home: Path
    lake_url: str
    api_token: str | None = field(default=None, repr=False)
    max_per_category: int = 0
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    ranker_budget_ms: float = 50.0
    max_body_bytes: int = 1 << 20
    retrain_after_events: int = 10_000
    model_poll_s: float = 10.0
    experiment_poll_s: float = 10.0
    compact_every_s: float = 30.0
    earliest_event_at: datetime = DEFAULT_EARLIEST_EVENT_AT
    max_concurrency: int = 8
    header_timeout_s: float = 10.0
    # A new connection's first request waits about a loop round for its accept: after 100
    # requests that was 1% of requests, the p99 (+1 ms at c=8, measured); 250 keeps it under
    # 0.5%, and still re-spreads a busy worker's connections (hundreds of requests a second
    # each) within a second or two. nginx closes its clients' connections after 1,000.
    max_requests_per_connection: int = 250
    ranker_engine: str = "compiled"
    # 1% of requests, 20 rows each: at 100,000 personalised requests a day, 1,000 requests and
    # 20,000 rows a day (a few MB of Parquet), enough for a stable PSI over a week (its noise at
    # 10 bins is about 9 / sampled requests for the user features every row of a request
    # shares); at the 750 requests/s of one worker flat out, 7.5 sampled requests/s, logged off
    # the request path. Rows per request are bounded because a request's 200+ candidates share
    # their user features: more requests tell more than more rows of one.
    feature_sample_rate: float = 0.01
    feature_sample_rows: int = 20
    # A sampled request is re-ranked (1-4 ms under the GIL, which every request in flight waits
    # out), so the share alone would make the cost grow with the traffic: one worker flat out at
    # 1,300 requests/s sampled 13 a second, each adding its re-ranking to about 8 other
    # requests' latency (about 8% of them: the p99). One every 10 s per worker is still 8,640
    # sampled requests (172,800 rows) a day, more than the drift check reads in a week (100,000
    # rows); one a second measured p99 -0.87 ms [-2.01, +0.26] and 1.02x the requests against it
    # (paired, demo shop, c=8): a cost with nothing bought.
    feature_samples_per_s: float = 0.1
    otlp_endpoint: str | None = field(default=None, repr=False)
    trace_sample_rate: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Reads the settings from environment variables (call it at start-up, not at import).

        Args:
            environ: The environment to read; `os.environ` when omitted.

        Returns:
            The settings, with `home` made absolute.
        """
        env = os.environ if environ is None else environ
        home = Path(env.get("SHELFWISE_HOME") or "data").expanduser().resolve()
        lake_url = env.get("SHELFWISE_LAKE") or str(home / "lake")
        earliest = env.get("SHELFWISE_EARLIEST_EVENT_AT")
        return cls(
            home=home,
            lake_url=lake_url,
            api_token=env.get("SHELFWISE_API_TOKEN") or None,
            max_per_category=int(env.get("SHELFWISE_MAX_PER_CATEGORY") or 0),
            redis_url=env.get("SHELFWISE_REDIS_URL") or None,
            redis_cluster=_flag("SHELFWISE_REDIS_CLUSTER", env.get("SHELFWISE_REDIS_CLUSTER")),
            ranker_budget_ms=float(env.get("SHELFWISE_RANKER_BUDGET_MS") or 50.0),
            max_body_bytes=int(env.get("SHELFWISE_MAX_BODY_BYTES") or 1 << 20),
            retrain_after_events=int(env.get("SHELFWISE_RETRAIN_AFTER_EVENTS") or 10_000),
            model_poll_s=float(env.get("SHELFWISE_MODEL_POLL_S") or 10.0),
            experiment_poll_s=float(env.get("SHELFWISE_EXPERIMENT_POLL_S") or 10.0),
            compact_every_s=float(env.get("SHELFWISE_COMPACT_EVERY_S") or 30.0),
            earliest_event_at=parse_earliest(earliest) if earliest else DEFAULT_EARLIEST_EVENT_AT,
            max_concurrency=int(env.get("SHELFWISE_MAX_CONCURRENCY") or 8),
            header_timeout_s=float(env.get("SHELFWISE_HEADER_TIMEOUT_S") or 10.0),
            max_requests_per_connection=_not_negative(
                "SHELFWISE_MAX_REQUESTS_PER_CONNECTION",
                int(env.get("SHELFWISE_MAX_REQUESTS_PER_CONNECTION") or 250),
            ),
            ranker_engine=_ranker_engine(env.get("SHELFWISE_RANKER_ENGINE") or "compiled"),
            feature_sample_rate=_share(
                "SHELFWISE_FEATURE_SAMPLE_RATE", env.get("SHELFWISE_FEATURE_SAMPLE_RATE") or 0.01
            ),
            feature_sample_rows=_not_negative(
                "SHELFWISE_FEATURE_SAMPLE_ROWS", int(env.get("SHELFWISE_FEATURE_SAMPLE_ROWS") or 20)
            ),
            feature_samples_per_s=_not_negative(
                "SHELFWISE_FEATURE_SAMPLES_PER_S",
                float(env.get("SHELFWISE_FEATURE_SAMPLES_PER_S") or 0.1),
            ),
            otlp_endpoint=env.get("SHELFWISE_OTLP_ENDPOINT") or None,
            trace_sample_rate=_share(
                "SHELFWISE_TRACE_SAMPLE_RATE", env.get("SHELFWISE_TRACE_SAMPLE_RATE") or "1"
            ),
        )

    @property
    def dagster_home(self) -> Path:
        """`DAGSTER_HOME`: run history, event logs and sensor cursors."""
        return self.home / "dagster"

    @property
    def bentoml_home(self) -> Path:
        """`BENTOML_HOME`: the BentoML model store and bentos."""
        return self.home / "bentoml"

    @property
    def wal_dir(self) -> Path:
        """The write-ahead log of feedback (events, impressions) not yet compacted into the lake."""
        return self.home / "wal"

    @property
    def compiled_ranker_dir(self) -> Path:
        """Rankers the service compiled itself (when the model shipped none that fits), by key."""
        return self.home / "compiled_rankers"

    @property
    def warehouse_path(self) -> Path:
        """The DuckDB file that only dbt writes."""
        return self.home / "warehouse" / "shelfwise.duckdb"


def _share(name: str, value: str | float) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be a share between 0 and 1, not {value!r}")
    return share


Number = TypeVar("Number", int, float)


def _not_negative(name: str, value: Number) -> Number:
    if not value >= 0:  # NaN fails too
        raise ValueError(f"{name} must be 0 or more, not {value}")
    return value


def _flag(name: str, value: str | None) -> bool:
    """A true-or-false setting; unset or empty is false."""
    text = (value or "false").strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return text in ("true", "1", "yes")


def _ranker_engine(value: str) -> str:
    if value not in ("compiled", "lightgbm"):
        raise ValueError(f"SHELFWISE_RANKER_ENGINE must be compiled or lightgbm, not {value!r}")
    return value
