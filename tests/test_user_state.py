"""Each user's compact serving state decodes to exactly the snapshot's rows (the pipeline's real
snapshot, and rows built so that every prediction of the codec is wrong), and is much smaller."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from models import candidates
from models.features import FEATURE_COLUMNS
from models.session import NeighbourIndex
from models.snapshot import (
    CandidateSnapshot,
    PackedStates,
    encode_snapshot,
    read_user_states,
    states_fit,
    write_user_states,
)
from models.user_state import (
    ITEM_COLUMNS,
    ITEM_LEVEL_SCORES,
    NO_DICTIONARY,
    PAIR_COLUMNS,
    ItemTable,
    candidate_count,
    decode_user,
    encode_user,
    train_codec,
)
from shelfwise.lake import (
    SERVING,
    SERVING_CANDIDATES,
    SERVING_NEIGHBOUR_ARRAYS,
    SERVING_NEIGHBOURS,
    SERVING_PURCHASES,
    SERVING_STATE_DICTIONARY,
    SERVING_USER_STATES,
    Lake,
)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


def test_every_state_the_pipeline_wrote_decodes_to_its_snapshot_rows(pipeline_run):
    lake = pipeline_run.lake
    assert states_fit(lake)
    snapshot = read_user_states(lake)
    rows = lake.read_frame(SERVING_CANDIDATES).sort("user_id", "candidate_rank")
    bought = dict(lake.read_frame(SERVING_PURCHASES).group_by("user_id").agg("item_id").iter_rows())
    users = rows.partition_by("user_id", maintain_order=True, as_dict=True)
    assert snapshot.known_users == len(users) > 100
    for (user_id,), expected in users.items():
        found = snapshot.candidates_of(user_id)
        assert found is not None, user_id
        assert found.item_ids.tolist() == expected["item_id"].to_list()
        np.testing.assert_array_equal(found.ranks, expected["candidate_rank"].to_numpy())
        matrix = expected.select(FEATURE_COLUMNS).to_numpy().astype(np.float32)
        assert same(found.matrix, matrix), user_id
        assert found.bought == set(bought.get(user_id, ())), user_id
    # Buyers without candidates keep their purchases (the already-bought rule reads them).
    for user_id in set(bought) - {user for (user,) in users}:
        found = snapshot.candidates_of(user_id)
        assert found is not None and not len(found.item_ids)
        assert found.bought == set(bought[user_id])
    # Compact: the values hold a small part of the rows' float32 feature vectors.
    dense = rows.height * len(PAIR_COLUMNS) * 4
    held = sum(len(v) for v in snapshot.states.values())
    assert held < dense / 4, (held, dense)
    # Compressed with the dictionary trained for this snapshot, written beside the values: they
    # are smaller than the same bytes compressed without it.
    dictionary = lake.read_bytes(SERVING_STATE_DICTIONARY)
    assert dictionary and snapshot.table.codec.dictionary == dictionary
    unpacked = [snapshot.table.codec.decompress(value) for value in snapshot.states.values()]
    assert held < sum(len(NO_DICTIONARY.compress(value)) for value in unpacked)
    # The session's neighbours come with the states, indexed as from the rows.
    index = NeighbourIndex.from_frame(lake.read_frame(SERVING_NEIGHBOURS), snapshot.table.ids)
    assert len(index.codes) > 1000
    assert snapshot.neighbours.ids.tolist() == index.ids.tolist()
    for name in ("starts", "codes", "scores"):
        np.testing.assert_array_equal(getattr(snapshot.neighbours, name), getattr(index, name))


def random_user(rng: np.random.Generator, table: ItemTable, n: int) -> tuple:
    codes = rng.choice(len(table), n, replace=False)
    rows = rng.standard_normal((n, len(FEATURE_COLUMNS))).astype(np.float32)
    rows[rng.random(rows.shape) < 0.1] = np.nan
    column = {name: i for i, name in enumerate(FEATURE_COLUMNS)}
    rows[:, [column[c] for c in ITEM_COLUMNS]] = table.features[codes]
    user = rng.standard_normal(len(FEATURE_COLUMNS)).astype(np.float32)
    pair = {column[c] for c in PAIR_COLUMNS} | {column[c] for c in ITEM_COLUMNS}
    for j in set(range(len(FEATURE_COLUMNS))) - pair:
        rows[:, j] = user[j]
    return codes, rows


def random_table(rng: np.random.Generator, items: int) -> ItemTable:
    frame = pl.DataFrame({"item_id": [f"i{n}" for n in range(items)]}).with_columns(
        [pl.lit(rng.standard_normal(items).astype(np.float32)).alias(c) for c in ITEM_COLUMNS]
        + [pl.lit(rng.random(items).astype(np.float32)).alias(c) for c in ITEM_LEVEL_SCORES]
    )
    facts = pl.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(items)],
            "price": rng.random(items) * 10,
            "category_id": [f"c{n % 7}" for n in range(items)],
            "brand": [f"b{n % 11}" if n % 5 else None for n in range(items)],
        }
    )
    return ItemTable.build(frame, facts)


@pytest.mark.parametrize(("items", "candidates"), [(40, 12), (70_000, 300)])
def test_any_rows_round_trip_exactly_when_every_prediction_is_wrong(items, candidates):
    """Random pair features: no score is 0, no category value repeats, no price ratio fits; the
    codec stores them all, and decodes them bit for bit (including item codes past uint16 and
    positions past uint8)."""
    rng = np.random.default_rng(items)
    table = random_table(rng, items)
    codes, rows = random_user(rng, table, candidates)
    ranks = rng.permutation(candidates).astype(np.int32) + 1
    bought = rng.choice(len(table), 5, replace=False)
    raw = encode_user(table, codes, ranks, rows, bought, mean_price=3.7)
    found = decode_user(raw, table)
    assert candidate_count(raw, table) == candidates
    assert same(found.matrix, rows)
    np.testing.assert_array_equal(found.item_ids, table.ids[codes])
    np.testing.assert_array_equal(found.ranks, ranks)
    assert found.bought == set(table.ids[bought].tolist())


def test_values_round_trip_with_a_dictionary_trained_on_them():
    """Values compressed with a dictionary trained on them decode to the same rows, in one thread
    or several at once; a handful of values is too few to train on and goes without one,
    decoded the same."""
    rng = np.random.default_rng(4)
    table = random_table(rng, 500)
    users = {}
    for n in range(300):
        codes, rows = random_user(rng, table, int(rng.integers(1, 40)))
        users[f"u{n}"] = (codes, np.arange(1, len(codes) + 1, dtype=np.int32), rows)
    unpacked = (
        (user_id, encode_user(table, *user, np.zeros(0, int), 2.0, compressed=False))
        for user_id, user in users.items()
    )
    trained, values = train_codec(table, unpacked)
    values = dict(values)
    assert list(values) == list(users) and trained.codec.dictionary
    for user_id, (codes, ranks, rows) in users.items():
        found = decode_user(values[user_id], trained)
        assert same(found.matrix, rows)
        np.testing.assert_array_equal(found.item_ids, table.ids[codes])
        np.testing.assert_array_equal(found.ranks, ranks)
        assert candidate_count(values[user_id], trained) == len(codes)
    # The service decodes from its event loop and its threads at once: the same rows.
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda value: decode_user(value, trained), values.values()))
    for (codes, ranks, rows), user in zip(users.values(), found, strict=True):
        assert same(user.matrix, rows)
        np.testing.assert_array_equal(user.item_ids, table.ids[codes])
        np.testing.assert_array_equal(user.ranks, ranks)
    few = [
        (user_id, encode_user(table, *users[user_id], np.zeros(0, int), compressed=False))
        for user_id in ("u0", "u1", "u2")
    ]
    untrained, values = train_codec(table, few)
    assert untrained.codec.dictionary == b""
    for user_id, value in values:
        assert same(decode_user(value, untrained).matrix, users[user_id][2])


def test_a_tiny_shop_writes_its_states_without_a_dictionary_and_reads_them(pipeline_run, tmp_path):
    """Three users (and no buyer besides): too few values to train a dictionary on. The lake
    holds an empty one, and the states read back to the snapshot's rows."""
    source = pipeline_run.lake
    shutil.copytree(source.path(SERVING), tmp_path / SERVING)
    lake = Lake(str(tmp_path))
    rows = source.read_frame(SERVING_CANDIDATES)
    three = rows["user_id"].unique(maintain_order=True).head(3).to_list()
    rows = rows.filter(pl.col("user_id").is_in(three))
    lake.write_parquet(rows.to_arrow(), SERVING_CANDIDATES)
    purchases = lake.read_frame(SERVING_PURCHASES).filter(pl.col("user_id").is_in(three))
    lake.write_parquet(purchases.to_arrow(), SERVING_PURCHASES)
    written = write_user_states(lake)
    assert written.users == written.known_users == 3
    assert states_fit(lake) and lake.read_bytes(SERVING_STATE_DICTIONARY) == b""
    snapshot = read_user_states(lake)
    for (user_id,), expected in rows.partition_by("user_id", as_dict=True).items():
        found = snapshot.candidates_of(user_id)
        expected = expected.sort("candidate_rank")
        assert found.item_ids.tolist() == expected["item_id"].to_list()
        assert same(found.matrix, expected.select(FEATURE_COLUMNS).to_numpy().astype(np.float32))


def test_predictable_pair_features_cost_no_bytes():
    rng = np.random.default_rng(1)
    table = random_table(rng, 50)
    codes, rows = random_user(rng, table, 20)
    column = {name: i for i, name in enumerate(FEATURE_COLUMNS)}
    scores = [c for c in PAIR_COLUMNS if c.endswith("_score") or c.endswith("_hits")]
    rows[:, [column[c] for c in scores]] = 0.0
    for n, name in enumerate(ITEM_LEVEL_SCORES):
        rows[:, column[name]] = table.item_scores[codes, n]
    generators = [column[c] for c in scores if c.endswith("_score")]
    rows[:, column["sources"]] = (rows[:, generators] > 0).sum(axis=1)
    user_item = [c for c in PAIR_COLUMNS if c.startswith("user_item_")]
    rows[:, [column[c] for c in user_item]] = np.nan
    for kind in ("category", "brand"):
        names = [c for c in PAIR_COLUMNS if c.startswith(f"user_{kind}_")]
        keys = getattr(table, kind)[codes]
        values = rng.standard_normal((keys.max() + 2, len(names))).astype(np.float32)
        rows[:, [column[c] for c in names]] = np.where(keys[:, None] >= 0, values[keys], np.nan)
    rows[:, column["price_to_user_mean"]] = (table.price[codes] / 2.5).astype(np.float32)
    ranks = np.arange(1, 21, dtype=np.int32)
    predictable = encode_user(table, codes, ranks, rows, np.zeros(0, int), mean_price=2.5)
    assert same(decode_user(predictable, table).matrix, rows)
    rows[3, column["covisit_score"]] = 0.5  # one exception: one position and two values
    with_one = encode_user(table, codes, ranks, rows, np.zeros(0, int), mean_price=2.5)
    assert same(decode_user(with_one, table).matrix, rows)
    # Sizes before compression: one position and two values, and sources changes too.
    unpacked = table.codec.decompress
    assert len(unpacked(with_one)) == len(unpacked(predictable)) + 1 + 2 * 4 + 1 + 4


def test_rows_that_are_not_one_users_snapshot_are_refused():
    rng = np.random.default_rng(2)
    table = random_table(rng, 30)
    codes, rows = random_user(rng, table, 6)
    column = {name: i for i, name in enumerate(FEATURE_COLUMNS)}
    broken = rows.copy()
    broken[0, column[ITEM_COLUMNS[0]]] += 1.0
    with pytest.raises(ValueError, match="item features"):
        encode_user(table, codes, np.arange(1, 7), broken, np.zeros(0, int))
    broken = rows.copy()
    broken[1, column["user_events"]] += 1.0
    with pytest.raises(ValueError, match="user's features"):
        encode_user(table, codes, np.arange(1, 7), broken, np.zeros(0, int))


@pytest.mark.parametrize("missing", [SERVING_USER_STATES, SERVING_NEIGHBOUR_ARRAYS])
def test_a_lake_without_states_is_encoded_from_the_rows_the_same(
    pipeline_run, tmp_path, caplog, missing
):
    """A snapshot written by another pipeline (no states, states without their neighbour arrays,
    or states of another layout) is served all the same: the worker encodes the rows itself
    (bigger: without the mean prices)."""
    source = pipeline_run.lake
    shutil.copytree(source.path(SERVING), tmp_path / SERVING)
    lake = Lake(str(tmp_path))
    lake.remove([missing])
    assert not states_fit(lake)
    with caplog.at_level("WARNING", logger="models.snapshot"):
        encoded = read_user_states(lake)
    assert "encoding the rows" in caplog.text
    stored = read_user_states(source)
    assert encoded.states.keys() == stored.states.keys()
    for user_id in list(stored.states)[:200]:
        a, b = encoded.candidates_of(user_id), stored.candidates_of(user_id)
        assert same(a.matrix, b.matrix) and a.bought == b.bought
    # In memory, from rows alone (a recommender built from a frame), the same numbers again.
    frame = source.read_frame(SERVING_CANDIDATES)
    from_rows = CandidateSnapshot.from_frame(frame)
    user_id = frame["user_id"][0]
    assert same(from_rows.candidates_of(user_id).matrix, stored.candidates_of(user_id).matrix)
    table, values = encode_snapshot(source, batch_rows=997)  # users cut between batches
    assert {user for user, _, _ in values} == set(stored.states)
    assert len(table) == len(stored.table)


def test_the_neighbourhood_candidates_cost_no_item_codes():
    """Candidates the neighbour generators propose (in their order, up to a point) are not listed
    by code: the decoder recomputes the neighbourhood from the user's recent items. Holes in it
    and candidates past it are still stored, and the rows decode bit for bit."""
    rng = np.random.default_rng(3)
    table = random_table(rng, 400)
    items = table.ids.tolist()
    neighbours = pl.DataFrame(
        {
            "kind": [kind for kind in ("covisit", "bought_together") for _ in range(400 * 6)],
            "item_id": [items[n // 6] for _ in range(2) for n in range(400 * 6)],
            "neighbour_item_id": [items[c] for c in rng.integers(0, 400, 2 * 400 * 6)],
            "score": rng.random(2 * 400 * 6),
        }
    )
    hooded = table.with_neighbours(neighbours)
    seeds = rng.choice(400, 5, replace=False)
    carts = [1, 0, 2, 0, 0]  # the first and third seed also seed bought-together
    # The neighbour generators' proposals, by the generators themselves, in their order.
    recent = pl.DataFrame(
        {
            "as_of": 0,
            "user_id": "u",
            "item_id": [items[c] for c in seeds],
            "recency_rank": range(1, 6),
        }
    )
    marts = {
        kind: neighbours.filter(kind=kind).drop("kind").with_columns(as_of=0)
        for kind in ("covisit", "bought_together")
    }
    proposed = (
        candidates.neighbours(recent, marts["covisit"], "covisit_score")
        .join(
            candidates.neighbours(
                recent.filter(pl.Series(carts) > 0),
                marts["bought_together"],
                "bought_together_score",
            ),
            on=["as_of", "user_id", "item_id"],
            how="full",
            coalesce=True,
        )
        .fill_null(0.0)
        .filter(~pl.col("item_id").is_in([items[c] for c in seeds]))
        .sort(["covisit_score", "bought_together_score", "item_id"], descending=[True, True, False])
    )
    near = table.codes_of(proposed["item_id"]).tolist()
    dropped = set(near[:: max(1, len(near) // 3)][:-1])  # holes in the neighbourhood
    others = [c for c in rng.permutation(400) if c not in near and c not in seeds][:4]
    codes = np.array([*seeds, *[c for c in near if c not in dropped], *others])
    _, rows = random_user(rng, table, len(codes))
    rows[:, [FEATURE_COLUMNS.index(c) for c in ITEM_COLUMNS]] = table.features[codes]
    column = {name: i for i, name in enumerate(FEATURE_COLUMNS)}
    rows[:, column["history_score"]] = 0.0
    rows[: len(seeds), column["history_score"]] = 1.0 / np.arange(1, len(seeds) + 1)
    rows[: len(seeds), column["user_item_carts"]] = carts
    ranks = np.arange(1, len(codes) + 1, dtype=np.int32)
    with_hood = encode_user(hooded, codes, ranks, rows, np.zeros(0, int))
    without = encode_user(table, codes, ranks, rows, np.zeros(0, int))
    for value, item_table in ((with_hood, hooded), (without, table)):
        found = decode_user(value, item_table)
        assert same(found.matrix, rows)
        np.testing.assert_array_equal(found.item_ids, table.ids[codes])
        np.testing.assert_array_equal(found.ranks, ranks)
    taken = len(codes) - len(seeds) - len(others)
    assert taken > 20
    # Each candidate taken from the neighbourhood saves its two-byte code; a hole costs a byte,
    # and the value a bit per candidate (sizes before compression).
    saved = len(table.codec.decompress(without)) - len(hooded.codec.decompress(with_hood))
    assert saved == 2 * taken - len(dropped) - (len(codes) + 7) // 8, (saved, taken)


def test_packed_states_find_every_user_and_no_other():
    values = {f"user-{n}": bytes([n % 251]) * (n % 7) for n in range(5_000)}
    values.update({"": b"e", "ü-ñ": b"u", "用户-7": b"z", "user-1\x00": b"n"})  # ids are bytes
    states = PackedStates.from_pairs(values.items())
    assert len(states) == len(values)
    assert all(states[user] == value for user, value in values.items())
    assert states.get("user-5000") is None and "nobody" not in states
    assert dict(states.items()) == values and list(states) == list(values)
    assert states.value_bytes == sum(map(len, values.values()))
    # Read a table at a time (slices: arrays that start inside their buffers), the same.
    whole = pa.table({"user_id": list(values), "state": list(values.values())})
    tables = (whole.slice(start, 1_234) for start in range(0, whole.num_rows, 1_234))
    read = PackedStates.from_tables(tables)
    assert dict(read.items()) == values and read.value_bytes == states.value_bytes
    assert read["user-4999"] == values["user-4999"] and "user-5000" not in read
    assert read["用户-7"] == b"z" and "用户-8" not in read and "ü" not in read
