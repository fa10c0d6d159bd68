"""Online state: what shoppers did since the serving snapshot, shared by every serving worker.

`/events` records views, carts and purchases here after they are durable in the write-ahead log;
`/recommend` reads a user's session from here. Two implementations with one interface:

- `InProcessState` (default): dictionaries in the worker's memory. Fast, but each worker and each
  replica has its own, and a restart forgets it (the events themselves are in the lake).
- `RedisState` (`SHELFWISE_REDIS_URL`): the same in Redis, so workers and replicas share it.

Per user: the session (viewed or carted items, most recent first, distinct, at most
`SESSION_ITEMS`, forgotten after `SESSION_TTL_S` without activity), the cart, and the items
bought since the snapshot (kept `PURCHASES_TTL_S`, longer than a retraining cycle). Shop-wide:
stock changes, each with its time: the newest change of an item wins, whatever order they arrive
in (two workers, a restart restoring the log). Event ids seen recently (`SEEN_TTL_S`) make a
re-sent event harmless, also across restarts: at start-up the service gives the state the ids of
the window that the log and the lake hold (`shelfwise.runtime.feedback.restore_seen_events`,
`remember_seen`). Cost per million 32-character ids: about 160 MB in process (the strings and the
ordered dictionary), about 150 MB in Redis (a key with a TTL each); both measured.
"""

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from shelfwise.runtime.redis_clients import redis_client

SESSION_ITEMS = 20
SESSION_TTL_S = 2 * 3600
PURCHASES_TTL_S = 14 * 24 * 3600
SEEN_TTL_S = 7 * 24 * 3600
# The restore mark of the state in process (`OnlineState.restored_mark`): it is never lost.
IN_PROCESS_MARK = "in-process"
# The in-process state remembers at most this many event ids (oldest forgotten first; ~320 MB).
SEEN_CAPACITY = 2_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StockChange(NamedTuple):
    """An item's stock as of a time.

    Attributes:
        in_stock: Whether the item can be sold.
        updated_at_us: When this became true, in microseconds since the epoch (UTC).
    """

    in_stock: bool
    updated_at_us: int

    @classmethod
    def at(cls, in_stock: bool, updated_at: datetime) -> "StockChange":
        """The change made at `updated_at` (a time-zone aware datetime)."""
        return cls(in_stock, (updated_at - _EPOCH) // timedelta(microseconds=1))


@dataclass(frozen=True)
class UserActivity:
    """One user's online state (plain values, independent of the ML code).

    Attributes:
        item_ids: Viewed or carted items, most recent first, distinct.
        carted_ids: Items in the cart.
        purchased_ids: Items bought since the snapshot.
    """

    item_ids: tuple[str, ...] = ()
    carted_ids: frozenset[str] = frozenset()
    purchased_ids: frozenset[str] = frozenset()


class StateRead(NamedTuple):
    """What one request reads from the online state.

    Attributes:
        activity: The user's session, cart and purchases.
        stock: The stock changes (item_id → change), shop-wide.
        values: The raw values of the keys the request asked for with it (the user's ranked
            list and candidates in the online store), in order; None for a key that does not
            exist, and always in process.
    """

    activity: UserActivity
    stock: Mapping[str, StockChange]
    values: tuple[bytes | None, ...] = ()


class OnlineState(Protocol):
    """The interface both implementations share."""

    def unseen(self, event_ids: list[str]) -> list[bool]:
        """Per event id, whether it was not recorded before (read-only)."""
        ...

    def remember_seen(self, seen: Iterable[tuple[str, float]]) -> int:
        """Records event ids as seen without applying their events (a restart's restore).

        Args:
            seen: `(event_id, seen_at)` pairs, oldest first; `seen_at` in seconds since the epoch
                (when the id was first seen, or an upper bound): it is forgotten `SEEN_TTL_S`
                after that. Ids older than that are skipped.

        Returns:
            How many ids were new to the state.
        """
        ...

    def seen_restored_through(self) -> float | None:
        """When the last completed restore the state still holds began (epoch seconds), or None.

        Every feedback file published before that time is in the state already.
        """
        ...

    def mark_seen_restored(self, started_at: float) -> None:
        """Notes a completed restore that began at `started_at` (epoch seconds)."""
        ...

    def restored_mark(self) -> str | None:
        """The mark of the restores the state holds (`mark_restored`), or None.

        None once Redis lost its data (restarted without persistence, flushed): the stock
        updates and seen event ids must be restored again, by every worker (each from its own
        log). A worker that finds another mark than its own knows another one did it after a
        loss, and restores its own part.
        """
        ...

    def mark_restored(self) -> str:
        """Notes that this worker restored the stock updates and seen event ids.

        Returns:
            The mark the state now holds: a new one if it held none, else the one it held.
        """
        ...

    def record(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Applies events (event_id, user_id, item_id, event_type), oldest first."""
        ...

    def activity(self, user_id: str) -> UserActivity:
        """The user's session, cart and purchases."""
        ...

    def activity_and_stock(self, user_id: str) -> tuple[UserActivity, Mapping[str, StockChange]]:
        """What a recommendation reads: the user's activity and the stock changes, together."""
        ...

    def activity_stock_and_value(
        self, user_id: str, key: str
    ) -> tuple[UserActivity, Mapping[str, StockChange], bytes | None]:
        """`activity_and_stock` and the raw value of another key of the same Redis, together.

        One round trip for a request's ranked list too; in process the value is always None.
        """
        ...

    def read_requests(
        self, requests: Sequence[tuple[str, Sequence[str]]]
    ) -> list[StateRead | Exception]:
        """What several requests read, together: one Redis round trip for all of them.

        Args:
            requests: Per request, the user and the keys of the same Redis whose raw values it
                reads with the user's activity (its ranked list and candidates; may be empty).

        Returns:
            One `StateRead` per request, in order; in a Redis Cluster with a node failing, the
            error instead for the requests whose keys are on that node.

        Raises:
            Exception: The read failed for every request (Redis unreachable).
        """
        ...

    def update_stock(self, changes: Mapping[str, StockChange]) -> None:
        """Records stock changes (item_id → change) that are newer than the item's recorded one.

        So a restart may restore what the log kept without undoing a newer change another worker
        recorded meanwhile, and two workers' changes may arrive in any order.
        """
        ...


@dataclass
class _User:
    items: list[str] = field(default_factory=list)
    cart: set[str] = field(default_factory=set)
    bought: set[str] = field(default_factory=set)
    active_at: float = 0.0
    bought_at: float = 0.0


class InProcessState:
    """Online state in this process's memory (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        # event_id -> when first seen (epoch seconds; one float object shared per batch), in the
        # order seen: the oldest are forgotten first, after SEEN_TTL_S or beyond SEEN_CAPACITY.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._stock: dict[str, StockChange] = {}

    def unseen(self, event_ids: list[str]) -> list[bool]:  # noqa: D102
        with self._lock:
            self._forget_expired(time.time())
            return [event_id not in self._seen for event_id in event_ids]

    def record(self, events: Iterable[Mapping[str, Any]]) -> None:  # noqa: D102
        now = time.monotonic()
        seen_at = time.time()
        with self._lock:
            self._forget_expired(seen_at)
            for event in events:
                if event["event_id"] in self._seen:
                    continue
                self._remember(event["event_id"], seen_at)
                user = self._users.setdefault(event["user_id"], _User())
                _apply(user, event["event_type"], event["item_id"], now)

    def remember_seen(self, seen: Iterable[tuple[str, float]]) -> int:  # noqa: D102
        oldest = time.time() - SEEN_TTL_S
        added = 0
        with self._lock:
            for event_id, seen_at in seen:
                if seen_at > oldest and event_id not in self._seen:
                    self._remember(event_id, seen_at)
                    added += 1
        return added

    def seen_restored_through(self) -> float | None:  # noqa: D102
        return None  # a new process remembers nothing: restore the whole window

    def mark_seen_restored(self, started_at: float) -> None:  # noqa: D102
        pass

    def restored_mark(self) -> str | None:  # noqa: D102
        return IN_PROCESS_MARK  # the memory goes only with the process, and a new one restores

    def mark_restored(self) -> str:  # noqa: D102
        return IN_PROCESS_MARK

    def _remember(self, event_id: str, seen_at: float) -> None:
        self._seen[event_id] = seen_at
        if len(self._seen) > SEEN_CAPACITY:
            self._seen.popitem(last=False)

    def _forget_expired(self, now: float) -> None:
        oldest = now - SEEN_TTL_S
        seen = self._seen
        while seen:
            event_id, seen_at = next(iter(seen.items()))
            if seen_at > oldest:
                return
            del seen[event_id]

    def activity(self, user_id: str) -> UserActivity:  # noqa: D102
        now = time.monotonic()
        with self._lock:
            user = self._users.get(user_id)
            if user is None:
                return UserActivity()
            fresh = now - user.active_at < SESSION_TTL_S
            bought = now - user.bought_at < PURCHASES_TTL_S
            return UserActivity(
                tuple(user.items) if fresh else (),
                frozenset(user.cart) if fresh else frozenset(),
                frozenset(user.bought) if bought else frozenset(),
            )

    def activity_and_stock(  # noqa: D102
        self, user_id: str
    ) -> tuple[UserActivity, Mapping[str, StockChange]]:
        return self.activity(user_id), self._stock

    def activity_stock_and_value(  # noqa: D102
        self, user_id: str, key: str
    ) -> tuple[UserActivity, Mapping[str, StockChange], bytes | None]:
        return self.activity(user_id), self._stock, None

    def read_requests(  # noqa: D102
        self, requests: Sequence[tuple[str, Sequence[str]]]
    ) -> list[StateRead | Exception]:
        return [
            StateRead(self.activity(user_id), self._stock, (None,) * len(keys))
            for user_id, keys in requests
        ]

    def update_stock(self, changes: Mapping[str, StockChange]) -> None:  # noqa: D102
        with self._lock:
            for item, change in changes.items():
                current = self._stock.get(item)
                if current is None or current.updated_at_us <= change.updated_at_us:
                    self._stock[item] = change


def _apply(user: _User, event_type: str, item_id: str, now: float) -> None:
    if now - user.active_at >= SESSION_TTL_S:
        user.items, user.cart = [], set()
    if event_type in ("view", "add_to_cart"):
        if item_id in user.items:
            user.items.remove(item_id)
        user.items.insert(0, item_id)
        del user.items[SESSION_ITEMS:]
        user.active_at = now
    if event_type == "add_to_cart":
        user.cart.add(item_id)
    elif event_type == "remove_from_cart":
        user.cart.discard(item_id)
        user.active_at = now
    elif event_type == "purchase":
        user.cart.discard(item_id)
        user.bought.add(item_id)
        user.bought_at = now


class RedisState:
    """Online state in Redis, shared by every worker and replica.

    Keys (prefix `shelfwise:`): `seen:<event_id>` (string with a TTL), `seen-restored` (the start
    of the last completed restore of seen ids, see `seen_restored_through`), `session:{<user>}`
    (list, most recent first), `cart:{<user>}` and `bought:{<user>}` (sets), `{stock}` (hash
    item → `<0|1>|<updated_at_us>`, set by a script that keeps the newer change) with
    `{stock}:version` (a counter, so each worker re-reads the hash only when it changed), and
    `{stock}:restored` (a mark set by the first worker that restored the stock and seen ids:
    missing, Redis lost its data and the workers restore them again, see `restored_mark`).

    The braces are Redis Cluster hash tags: a user's keys share the slot of the user's keys in
    the online store (`store_keys.user_key`, `ranked_key`), so a request's reads of the user go
    to one node; the stock hash and its counter share one, as the script that sets them must.

    Args:
        url: A Redis URL, e.g. `redis://127.0.0.1:6379/0`; with `cluster`, any one node.
        prefix: Key prefix (several installations may share one Redis).
        cluster: Whether `url` is a node of a Redis Cluster (`redis.cluster.RedisCluster`).
    """

    def __init__(self, url: str, prefix: str = "shelfwise:", cluster: bool = False) -> None:
        from redis.client import NEVER_DECODE

        self._never_decode = NEVER_DECODE
        # A cluster's pipelines pass NEVER_DECODE on to each node's reply, as a single Redis'.
        self._redis = redis_client(url, cluster=cluster, timeout_s=2, decode_responses=True)
        self._redis.ping()  # fail at start-up, not on the first request
        self._prefix = prefix
        self._cluster = cluster
        # One hash tag: the script reads and writes both, and Redis Cluster runs a script only
        # over keys of one slot.
        self._stock_key = f"{prefix}{{stock}}"
        self._stock_version_key = f"{prefix}{{stock}}:version"
        # No TTL, on the stock's node: gone only with the data the restore put there.
        self._restored_key = f"{prefix}{{stock}}:restored"
        self._stock: dict[str, StockChange] = {}
        self._stock_version: str | None = None
        self._lock = threading.Lock()
        self._keep_newer = self._redis.register_script(_KEEP_NEWER_STOCK)

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _user_key(self, kind: str, user_id: str) -> str:
        return f"{self._prefix}{kind}:{{{user_id}}}"

    def unseen(self, event_ids: list[str]) -> list[bool]:  # noqa: D102
        pipe = self._redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.exists(self._key("seen", event_id))
        return [not found for found in pipe.execute()]

    def remember_seen(self, seen: Iterable[tuple[str, float]]) -> int:  # noqa: D102
        # SET NX keeps an id's TTL from its first sighting; pipelined in chunks (one round trip
        # per chunk, bounded client memory).
        now = time.time()
        added = 0
        chunk: list[tuple[str, int]] = []
        for event_id, seen_at in seen:
            left = int(SEEN_TTL_S - (now - seen_at))
            if left > 0:
                chunk.append((event_id, left))
            if len(chunk) == _RESTORE_CHUNK:
                added += self._set_seen(chunk)
                chunk = []
        return added + (self._set_seen(chunk) if chunk else 0)

    def _set_seen(self, chunk: list[tuple[str, int]]) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for event_id, ttl in chunk:
            pipe.set(self._key("seen", event_id), 1, nx=True, ex=ttl)
        return sum(1 for done in pipe.execute() if done)

    def seen_restored_through(self) -> float | None:  # noqa: D102
        value = self._redis.get(self._key("seen-restored"))
        return float(value) if value else None

    def mark_seen_restored(self, started_at: float) -> None:  # noqa: D102
        # Any completed restore may set it, in any order: each covers every file published before
        # its own start. Gone with the ids when Redis restarts empty (then the next start restores
        # the whole window); a snapshot restores it with ids at least as new.
        self._redis.set(self._key("seen-restored"), repr(started_at), ex=SEEN_TTL_S)

    def restored_mark(self) -> str | None:  # noqa: D102
        return self._redis.get(self._restored_key)

    def mark_restored(self) -> str:  # noqa: D102
        self._redis.set(self._restored_key, uuid.uuid4().hex, nx=True)
        return self._redis.get(self._restored_key)

    def record(self, events: Iterable[Mapping[str, Any]]) -> None:  # noqa: D102
        events = list(events)
        claim = self._redis.pipeline(transaction=False)
        for event in events:
            claim.set(self._key("seen", event["event_id"]), 1, nx=True, ex=SEEN_TTL_S)
        pipe = self._redis.pipeline(transaction=False)
        for event, claimed in zip(events, claim.execute(), strict=True):
            if not claimed:  # recorded before (a re-sent event)
                continue
            user, item, kind = event["user_id"], event["item_id"], event["event_type"]
            session, cart = self._user_key("session", user), self._user_key("cart", user)
            if kind in ("view", "add_to_cart"):
                pipe.lrem(session, 0, item)
                pipe.lpush(session, item)
                pipe.ltrim(session, 0, SESSION_ITEMS - 1)
                pipe.expire(session, SESSION_TTL_S)
            if kind == "add_to_cart":
                pipe.sadd(cart, item)
                pipe.expire(cart, SESSION_TTL_S)
            elif kind == "remove_from_cart":
                pipe.srem(cart, item)
            elif kind == "purchase":
                pipe.srem(cart, item)
                bought = self._user_key("bought", user)
                pipe.sadd(bought, item)
                pipe.expire(bought, PURCHASES_TTL_S)
        pipe.execute()

    def activity(self, user_id: str) -> UserActivity:  # noqa: D102
        pipe = self._redis.pipeline(transaction=False)
        self._queue_activity(pipe, user_id)
        items, cart, bought = pipe.execute()
        return UserActivity(tuple(items), frozenset(cart), frozenset(bought))

    def activity_and_stock(  # noqa: D102
        self, user_id: str
    ) -> tuple[UserActivity, Mapping[str, StockChange]]:
        read = self._read_together([(user_id, ())])[0]
        return read.activity, read.stock

    def activity_stock_and_value(  # noqa: D102
        self, user_id: str, key: str
    ) -> tuple[UserActivity, Mapping[str, StockChange], bytes | None]:
        activity, stock, (value,) = self._read_together([(user_id, (key,))])[0]
        return activity, stock, value

    def read_requests(  # noqa: D102
        self, requests: Sequence[tuple[str, Sequence[str]]]
    ) -> list[StateRead | Exception]:
        try:
            return list(self._read_together(requests))
        except Exception:
            if not self._cluster or len(requests) == 1:
                raise
        # A node of the cluster failing fails the whole pipeline: each request alone then, so
        # that users whose keys are on the other nodes keep their session.
        reads: list[StateRead | Exception] = []
        for request in requests:
            try:
                reads.extend(self._read_together([request]))
            except Exception as error:  # noqa: BLE001 - that request's answer degrades
                reads.append(error)
        return reads

    def _read_together(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[StateRead]:
        # One round trip: the stock's version travels with the activity (once for all the
        # requests); the hash itself is read again only when another worker changed it.
        if not self._cluster:
            return self._read_packed(requests)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._stock_version_key)
        for user_id, keys in requests:
            self._queue_activity(pipe, user_id)
            for key in keys:
                # Binary, unlike this client's other replies: read undecoded.
                pipe.execute_command("GET", key, **{self._never_decode: []})
        replies = iter(pipe.execute())
        stock = self._stock_at(next(replies))
        reads = []
        for _, keys in requests:
            items, cart, bought = next(replies), next(replies), next(replies)
            values = tuple(next(replies) for _ in keys)
            activity = UserActivity(tuple(items), frozenset(cart), frozenset(bought))
            reads.append(StateRead(activity, stock, values))
        return reads

    def _read_packed(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[StateRead]:
        """`_read_together` on a single Redis, without redis-py's pipeline.

        The same commands, packed here and their replies read in order from one pooled
        connection: redis-py's pipeline spends about as much CPU again per command on its
        bookkeeping (measured: 8 requests a round trip, 590–650 µs of CPU against 350–395).
        Retried as redis-py retries a pipeline (the connection's `Retry`, the connection dropped
        after each failure); dropped too on any other error, as replies may be left unread.
        """
        commands = [_command(b"GET", self._stock_version_key.encode())]
        for user_id, keys in requests:
            commands.append(
                _command(
                    b"LRANGE",
                    self._user_key("session", user_id).encode(),
                    b"0",
                    _LAST_SESSION_INDEX,
                )
            )
            commands.append(_command(b"SMEMBERS", self._user_key("cart", user_id).encode()))
            commands.append(_command(b"SMEMBERS", self._user_key("bought", user_id).encode()))
            commands.extend(_command(b"GET", key.encode()) for key in keys)
        packed = b"".join(commands)
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            return connection.retry.call_with_retry(
                lambda: self._send_and_read(connection, packed, requests),
                lambda _: connection.disconnect(),
            )
        finally:
            pool.release(connection)

    def _send_and_read(
        self,
        connection: Any,  # noqa: ANN401 - a redis.connection.Connection
        packed: bytes,
        requests: Sequence[tuple[str, Sequence[str]]],
    ) -> list[StateRead]:
        try:
            connection.send_packed_command([packed])
            read = connection.read_response
            stock = self._stock_at(read())
            reads = []
            for _, keys in requests:
                items, cart, bought = read(), read(), read()
                values = tuple(read(disable_decoding=True) for _ in keys)
                activity = UserActivity(tuple(items), frozenset(cart), frozenset(bought))
                reads.append(StateRead(activity, stock, values))
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it
            raise
        return reads

    def _queue_activity(self, pipe: Any, user_id: str) -> None:  # noqa: ANN401 - redis' Pipeline
        pipe.lrange(self._user_key("session", user_id), 0, SESSION_ITEMS - 1)
        pipe.smembers(self._user_key("cart", user_id))
        pipe.smembers(self._user_key("bought", user_id))

    def update_stock(self, changes: Mapping[str, StockChange]) -> None:  # noqa: D102
        if not changes:
            return
        args = [
            part
            for item, change in changes.items()
            for part in (item, int(change.in_stock), change.updated_at_us)
        ]
        self._keep_newer(keys=[self._stock_key, self._stock_version_key], args=args)

    def _stock_at(self, version: str | None) -> Mapping[str, StockChange]:
        """The stock hash as of `version`, re-read only when it is not the cached one."""
        if version != self._stock_version:
            with self._lock:
                raw = self._redis.hgetall(self._stock_key)
                self._stock = {item: _parse_stock(value) for item, value in raw.items()}
                self._stock_version = version
        return self._stock


_RESTORE_CHUNK = 10_000
_LAST_SESSION_INDEX = str(SESSION_ITEMS - 1).encode()


def _command(*args: bytes) -> bytes:
    """One command in Redis' protocol (RESP): an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


# KEYS: the stock hash, its version counter. ARGV: item, 0|1, updated_at_us, repeated. Sets each
# item whose stored change is not newer (a value without a time, "0" or "1", counts as oldest)
# and bumps the version when anything changed; atomic, as Redis runs a script whole.
_KEEP_NEWER_STOCK = """
local changed = 0
for i = 1, #ARGV, 3 do
    local stored = redis.call('HGET', KEYS[1], ARGV[i])
    local stored_at = stored and tonumber(string.match(stored, '|(%d+)$')) or -1
    if stored_at <= tonumber(ARGV[i + 2]) then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2])
        changed = 1
    end
end
if changed == 1 then redis.call('INCR', KEYS[2]) end
return changed
"""


def _parse_stock(value: str) -> StockChange:
    in_stock, _, updated_at_us = value.partition("|")
    return StockChange(in_stock == "1", int(updated_at_us or 0))


def open_state(redis_url: str | None, cluster: bool = False) -> OnlineState:
    """In Redis when a URL is given (with `cluster`: any node of a cluster), else in process."""
    return RedisState(redis_url, cluster=cluster) if redis_url else InProcessState()
