"""String and binary columns copied out of Arrow's buffers into NumPy, and joined again.

The serving state is read table by table: each table's buffers are copied into NumPy arrays and
released before the next is read, so Arrow's allocator never holds more than one table (read
whole, it kept about 90 MB beyond the values of the 10M-event shop after returning what it
could). `models.snapshot` reads the users' states this way, `models.ranked_lists` their lists.
"""

import numpy as np
import pyarrow as pa


def binary_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A large string or binary column's offsets (from 0) and bytes, copied out of Arrow.

    Args:
        column: A `large_string` or `large_binary` column.

    Returns:
        The offsets (int64, one more than the values) and the values' bytes (uint8).
    """
    array = column.combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], np.int64, len(array) + 1, array.offset * 8)
    buffer = array.buffers()[2]  # None when every value is empty
    if buffer is None:
        return offsets - offsets[0], np.zeros(0, np.uint8)
    data = np.frombuffer(buffer, np.uint8)[offsets[0] : offsets[-1]].copy()
    return offsets - offsets[0], data


def joined_parts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The `binary_parts` of several columns as one: offsets and bytes, concatenated.

    Args:
        parts: (offsets, bytes) per column, in order.

    Returns:
        The offsets (int64, from 0, one more than the values in all) and all the bytes.
    """
    ends = np.cumsum([0, *(len(data) for _, data in parts)])
    offsets = np.concatenate(
        [np.zeros(1, np.int64), *(o[1:] + end for (o, _), end in zip(parts, ends, strict=False))]
    )
    data = np.concatenate([np.zeros(0, np.uint8), *(data for _, data in parts)])
    return offsets, data
