"""Clients of a single Redis or of a Redis Cluster (`SHELFWISE_REDIS_CLUSTER`).

Built here for the online store (`models.online_store.open_client`) and the online state
(`shelfwise.runtime.online_state.RedisState`).

A cluster client (`redis.cluster.RedisCluster`) reads the slot map from the node named by the URL
when it is built (so an unreachable cluster fails then, not at the first command), sends each key
to the primary owning its slot, splits pipelines and multi-key `UNLINK`s by node and `SCAN`s
every primary. redis-py retries a cluster command after a connection error or a `CLUSTERDOWN`
reply, reloading the slot map each time; on `CLUSTERDOWN` it first sleeps 0.25 s, so its default
of 10 retries held a request 2.8 s while a cluster was down (measured: 3 primaries, one stopped).
The serving side retries once (0.5 s at most, then the request is answered without Redis); the
pipeline's writers, with 30 s per command, keep redis-py's 10 to ride out a failover.
"""

from typing import Any

# Retries of a cluster command on the request path (see above); a writer passes its own.
SERVING_CLUSTER_RETRIES = 1
# redis-py's default (`redis._defaults.DEFAULT_RETRY_COUNT`), for writers.
WRITER_CLUSTER_RETRIES = 10


def redis_client(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float = 2.0,
    connect_timeout_s: float | None = None,
    decode_responses: bool = False,
    cluster_retries: int = SERVING_CLUSTER_RETRIES,
) -> Any:  # noqa: ANN401 - a redis.Redis or a redis.cluster.RedisCluster
    """A client of a single Redis, or of a Redis Cluster when `cluster` is set.

    Args:
        url: A Redis URL (`redis://host:port/db`); with `cluster`, any node of the cluster
            (database 0 only).
        cluster: Whether `url` is a node of a Redis Cluster.
        timeout_s: Seconds a command may take before it fails.
        connect_timeout_s: Seconds a connection may take (None: redis-py's default, no limit).
        decode_responses: Whether replies are decoded to `str`.
        cluster_retries: With `cluster`, attempts after the first on a connection error or a
            cluster-down reply.

    Raises:
        redis.RedisError: With `cluster`, the node is unreachable or the slots are not all
            covered.
    """
    import redis

    options: dict[str, Any] = {"socket_timeout": timeout_s, "decode_responses": decode_responses}
    if connect_timeout_s is not None:
        options["socket_connect_timeout"] = connect_timeout_s
    if not cluster:
        return redis.Redis.from_url(url, **options)
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry

    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), retries=cluster_retries)
    return RedisCluster.from_url(url, retry=retry, **options)
