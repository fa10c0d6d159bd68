"""Item neighbours as arrays by item code, as written once and loaded by every worker.

The pipeline writes them next to the users' values (`SERVING_NEIGHBOUR_ARRAYS` in the lake) and
into each version of the online store (`models.online_store`), so a worker, in process or with
Redis, loads the same arrays instead of sorting, grouping and joining the neighbour rows at
start-up (seconds and a few hundred MB of transient memory on the 10M-event shop).
"""

import io

import numpy as np
import polars as pl

from models.session import NEIGHBOUR_KINDS as SESSION_KINDS
from models.session import NeighbourIndex
from models.user_state import NEIGHBOUR_KINDS as CODEC_KINDS
from models.user_state import ItemTable, NeighbourTable


def neighbour_arrays(table: ItemTable, neighbours: pl.DataFrame) -> bytes:
    """The neighbours as written: one index serving the session and the codec (`.npz` bytes).

    The session's `NeighbourIndex` (every kind, each item's neighbours strongest first; its
    codes the table's, then those of items only the neighbours name) is stored whole. The
    codec's `NeighbourTable` (the one the users' values were encoded with, `table.neighbours`)
    holds a subset of the same neighbours in another order (as the rows came): it is stored as
    its row starts and, per neighbour, its place within the index's row of the same kind and
    item, so the scores are stored once. Reading these arrays is a copy, where building the two
    indexes from the rows took a worker 1.5 s and a few hundred MB on the 10M-event shop.

    Args:
        table: The item table the users' values refer to.
        neighbours: kind, item_id, neighbour_item_id, score (those `table.neighbours` was built
            from, when it has them).

    Returns:
        The `.npz` bytes `read_neighbour_arrays` reads.

    Raises:
        ValueError: `table.neighbours` holds a neighbour the rows lack.
    """
    index = NeighbourIndex.from_frame(neighbours, table.ids.tolist())
    arrays = {
        "index_more_ids": np.array(index.ids[len(table) :].tolist(), dtype=np.str_),
        "index_starts": index.starts,
        # Item codes as the smallest unsigned integers that hold them (uint16 up to 65,535 items).
        "index_codes": index.codes.astype(_code_dtype(len(index.ids))),
        "index_scores": index.scores,
    }
    codec = table.neighbours
    if codec is not None:
        rows = _codec_rows(len(table), len(index.ids))
        lengths = np.diff(codec.starts)
        # Matched on (index row, neighbour, score bits, occurrence): equal entries are
        # interchangeable, so any duplicate finds a place of its own.
        keys = ["row", "neighbour", "bits"]
        wanted = pl.DataFrame(
            {
                "row": np.repeat(rows, lengths),
                "neighbour": codec.codes.astype(np.int64),
                "bits": codec.scores.view(np.int64),
            }
        ).with_columns(pl.int_range(pl.len()).over(keys).alias("occurrence"))
        held = pl.DataFrame(
            {
                "row": np.repeat(np.arange(len(index.starts) - 1), np.diff(index.starts)),
                "neighbour": index.codes.astype(np.int64),
                "bits": index.scores.view(np.int64),
                "at": np.arange(len(index.codes)),
            }
        ).with_columns(pl.int_range(pl.len()).over(keys).alias("occurrence"))
        found = wanted.join(held, on=[*keys, "occurrence"], how="left", maintain_order="left")
        at = found.get_column("at")
        if at.null_count():
            raise ValueError("the item table's neighbours are not those of the neighbour rows")
        offsets = at.to_numpy() - np.repeat(index.starts[rows], lengths)
        arrays |= {
            "table_starts": codec.starts,
            "table_offsets": offsets.astype(_code_dtype(int(offsets.max(initial=0)) + 1)),
        }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_neighbour_arrays(table: ItemTable, raw: bytes) -> tuple[ItemTable, NeighbourIndex]:
    """The item table with its codec neighbours, and the session's index (`neighbour_arrays`).

    Args:
        table: The version's item table (without neighbours).
        raw: The bytes `neighbour_arrays` wrote.

    Returns:
        The table with `neighbours` set as when the values were encoded, and the index.
    """
    with np.load(io.BytesIO(raw), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    more = np.array(arrays["index_more_ids"].tolist(), dtype=object)
    index = NeighbourIndex(
        np.concatenate([table.ids, more]) if len(more) else table.ids,
        arrays["index_starts"],
        arrays["index_codes"],
        arrays["index_scores"],
    )
    if "table_starts" in arrays:
        starts = arrays["table_starts"]
        lengths = np.diff(starts)
        rows = _codec_rows(len(table), len(index.ids))
        at = np.repeat(index.starts[rows], lengths) + arrays["table_offsets"]
        codec = NeighbourTable(starts, index.codes[at].astype(np.int64), index.scores[at])
        table = table.with_neighbours(codec)
    return table, index


def _codec_rows(items: int, index_items: int) -> np.ndarray:
    """Per row of the codec's `NeighbourTable`, the `NeighbourIndex` row of its kind and item.

    The table's items have the same codes in both.
    """
    kinds = np.array([SESSION_KINDS.index(kind) for kind in CODEC_KINDS], np.int64)
    return (kinds[:, None] * index_items + np.arange(items)[None, :]).ravel()


def _code_dtype(values: int) -> type:
    """The smallest unsigned integer type holding 0 … values - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if values <= np.iinfo(dtype).max + 1:
            return dtype
    return np.uint64
