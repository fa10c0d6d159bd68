"""The names of the online store's keys in Redis, defined here and nowhere else.

The online store holds versions of the serving state (`models.online_store`): each version's
keys start with `sw:v<version>:`; one pointer key names the version replicas serve.

- `sw:current` — the version being served (a string holding the number); switched with one `SET`.
- `sw:next-version` — a counter; `INCR` gives a writer its new version number.
- `sw:versions` — a set of the versions written (complete or not), so old ones can be removed.
- `sw:v<version>:meta` — the version's description (JSON: users, rows, column layout, when).
- `sw:v<version>:shared:<part>` — a shared, O(items) part of the version (items and their
  features, popular items, the neighbours as arrays by item code, the business rules' item
  facts, the dictionary the users' values are compressed with).
- `sw:v<version>:u:{<user_id>}` — one user's candidates and purchases (compact binary). The user
  id is the key's hash tag, so in Redis Cluster every key of a user (of any version) lives on
  one shard.
- `sw:v<version>:r<ranking>:{<user_id>}` — the user's ranked list (`models.ranked_lists`) in
  one ranking of the version (by one production model), written into a version after it went
  live; same hash tag.
- `sw:v<version>:ranked` — the ranking replicas read (JSON: its number, snapshot, model),
  switched with one `SET` after its lists are written; the ranking before is removed after.
- `sw:v<version>:next-ranking` — a counter; `INCR` gives a ranking its number.

The online state of `shelfwise.runtime.online_state.RedisState` (sessions, carts, purchases, stock,
seen event ids) keeps its own `shelfwise:` keys; a user's carry the same `{<user_id>}` hash tag,
so in Redis Cluster a request's reads of one user go to one shard (docs/operations.md, Redis
Cluster).
"""

PREFIX = "sw:"
CURRENT = f"{PREFIX}current"
NEXT_VERSION = f"{PREFIX}next-version"
VERSIONS = f"{PREFIX}versions"

# The shared parts of a version.
SHARED_ITEMS = "items"
SHARED_POPULAR = "popular"
# Named apart from the Parquet rows older versions held under `neighbours`.
SHARED_NEIGHBOURS = "neighbour-arrays"
SHARED_FACTS = "facts"
# The zstd dictionary the version's user values are compressed with (empty: none).
SHARED_DICTIONARY = "state-dictionary"
SHARED_PARTS = (SHARED_ITEMS, SHARED_POPULAR, SHARED_NEIGHBOURS, SHARED_FACTS, SHARED_DICTIONARY)


def version_prefix(version: int) -> str:
    """What every key of a version starts with."""
    return f"{PREFIX}v{version}:"


def meta_key(version: int) -> str:
    """The key of a version's description."""
    return f"{version_prefix(version)}meta"


def shared_key(version: int, part: str) -> str:
    """The key of one of a version's shared parts (`SHARED_PARTS`)."""
    return f"{version_prefix(version)}shared:{part}"


def user_key(version: int, user_id: str) -> str:
    """The key of one user's state in a version, the user id as its hash tag."""
    return f"{version_prefix(version)}u:{{{user_id}}}"


def ranked_key(version: int, ranking: int, user_id: str) -> str:
    """The key of one user's list in a ranking of a version, the user id as its hash tag."""
    return f"{ranking_prefix(version, ranking)}{{{user_id}}}"


def ranking_prefix(version: int, ranking: int) -> str:
    """What every key of one ranking of a version starts with."""
    return f"{version_prefix(version)}r{ranking}:"


def next_ranking_key(version: int) -> str:
    """The counter numbering a version's rankings."""
    return f"{version_prefix(version)}next-ranking"


def ranked_meta_key(version: int) -> str:
    """The key of what a version's ranked lists were ranked for."""
    return f"{version_prefix(version)}ranked"
