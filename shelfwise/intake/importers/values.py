"""Value conversion: every source value arrives as text from CSV, typed from Parquet."""

from collections.abc import Iterable

import polars as pl

from shelfwise.contracts import ContractError

_TIMESTAMP_CHECK_ROWS = 1_000


def _texts(values: pl.Series) -> pl.Series:
    """Text, stripped; empty becomes null."""
    text = values.cast(pl.String).str.strip_chars()
    return text.to_frame("t").select(pl.when(pl.col("t") != "").then(pl.col("t"))).to_series()


_FLOAT_WRITTEN_ID = r"^([+-]?\d+)\.0*$"


def _ids(values: pl.Series) -> pl.Series:
    """Identifiers as trimmed text; a whole number written as a float (`17850.0`) loses `.0`.

    Spreadsheets and pandas exports write numeric ids with missing values as floats, as text
    (CSV) or typed (Parquet); the shop's own systems know them as `17850`. Each value is
    normalised on its own, so one non-integral value does not change the others.
    """
    if values.dtype.is_float():
        frame = values.to_frame("v")
        whole = pl.col("v").is_finite() & (pl.col("v") == pl.col("v").round(0))
        values = frame.select(
            pl.when(whole)
            .then(pl.col("v").cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(pl.col("v").cast(pl.String))
        ).to_series()
    return _texts(values).str.replace(_FLOAT_WRITTEN_ID, "${1}")


def normalize_ids(ids: Iterable[str]) -> list[str]:
    """Identifiers normalised as every importer does (trimmed, `17850.0` -> `17850`), unique.

    Args:
        ids: Identifiers as given (a command line list, a file's lines).

    Returns:
        The non-empty ones, normalised, in first-seen order.
    """
    normalized = _ids(pl.Series("id", list(ids), dtype=pl.String)).drop_nulls()
    return list(dict.fromkeys(normalized.to_list()))


def _floats(values: pl.Series) -> pl.Series:
    if values.dtype.is_numeric():
        return values.cast(pl.Float64)
    return _texts(values).cast(pl.Float64, strict=False)


def _quantities(values: pl.Series | None, height: int) -> pl.Series:
    """Quantities: a missing value is 1; a value that is not a whole number becomes null."""
    if values is None:
        return pl.repeat(1, height, eager=True, dtype=pl.Int32)
    raw = values if values.dtype.is_numeric() else _texts(values)
    frame = pl.DataFrame({"raw": raw, "number": raw.cast(pl.Float64, strict=False)})
    whole = pl.when(pl.col("number") == pl.col("number").round(0)).then(pl.col("number"))
    quantity = pl.when(pl.col("raw").is_null()).then(pl.lit(1.0)).otherwise(whole)
    return frame.select(quantity.cast(pl.Int32, strict=False).alias("quantity")).to_series()


def _booleans(values: pl.Series) -> pl.Series:
    if values.dtype == pl.Boolean:
        return values
    text = _texts(values).str.to_lowercase()
    truthy = text.is_in(["1", "true", "t", "yes", "y"])
    falsy = text.is_in(["0", "false", "f", "no", "n"])
    frame = pl.DataFrame({"truthy": truthy, "falsy": falsy})
    value = pl.when("truthy").then(pl.lit(True)).when("falsy").then(pl.lit(False))
    return frame.select(value.alias("is_in_stock")).to_series()


_UTC_US = pl.Datetime("us", "UTC")


def _timestamps(
    values: pl.Series, unit: str, timezone: str, pattern: str | None = None
) -> pl.Series:
    """Source timestamps as UTC microseconds; what cannot be read becomes null.

    Args:
        values: Epoch numbers, ISO text, text in `pattern`, or (Parquet) temporal values.
        unit: "s", "ms" or "iso"; temporal values ignore it.
        timezone: The zone of naive text and naive temporal values.
        pattern: A strftime pattern of the text (instead of ISO 8601); with `%z` the text
            carries its offset, otherwise it is read in `timezone`.
    """
    if values.dtype == pl.Date:
        values = values.cast(pl.Datetime("us"))
    if isinstance(values.dtype, pl.Datetime):
        if values.dtype.time_zone is None:
            values = values.dt.replace_time_zone(
                timezone, ambiguous="earliest", non_existent="null"
            )
        return values.dt.convert_time_zone("UTC").cast(_UTC_US)
    if unit in ("s", "ms"):
        factor = 1_000_000 if unit == "s" else 1_000
        if values.dtype.is_integer():
            micros = values.cast(pl.Int64) * factor
        else:
            text = values if values.dtype.is_float() else _texts(values)
            whole = text.cast(pl.Int64, strict=False) if text.dtype == pl.String else None
            fractional = (text.cast(pl.Float64, strict=False) * factor).round(0).cast(pl.Int64)
            micros = fractional if whole is None else (whole * factor).fill_null(fractional)
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if pattern:
        text = _texts(values.cast(pl.String))
        if "%z" in pattern or "%:z" in pattern:
            aware = text.str.to_datetime(pattern, strict=False, time_unit="us")
            return aware.cast(_UTC_US).alias(values.name)
        local = text.str.to_datetime(pattern, strict=False, time_unit="us").dt.replace_time_zone(
            timezone, ambiguous="earliest", non_existent="null"
        )
        return local.dt.convert_time_zone("UTC").cast(_UTC_US).alias(values.name)
    text = (
        _texts(values.cast(pl.String))
        .str.replace(r"^(\d{4}-\d{2}-\d{2})[T ]", "${1} ")
        .str.replace(r"(?i)\s*(Z|UTC)$", "+00:00")
    )
    frame = pl.DataFrame({"t": text})
    aware = pl.coalesce(
        [
            pl.col("t").str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC")
            for f in ("%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%d %H:%M%z")
        ]
    )
    naive = pl.coalesce(
        [
            pl.col("t").str.to_datetime(f, strict=False, time_unit="us")
            for f in ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M")
        ]
        + [pl.col("t").str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))]
    )
    local = naive.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
    has_offset = pl.col("t").str.contains(r"[+-]\d{2}:?\d{2}$")
    parsed = pl.when(has_offset).then(aware).otherwise(local.dt.convert_time_zone("UTC"))
    return frame.select(parsed.cast(_UTC_US).alias(values.name)).to_series()


def _check_timestamps(
    path: str,
    column: str,
    raw: pl.Series,
    parsed: pl.Series,
    unit: str,
    pattern: str | None = None,
) -> None:
    """Fails when none of the first timestamps can be read: the unit or pattern is wrong."""
    head_raw, head = raw.head(_TIMESTAMP_CHECK_ROWS), parsed.head(_TIMESTAMP_CHECK_ROWS)
    present = head_raw.is_not_null()
    if unit == "iso" and not head_raw.dtype.is_temporal():
        present = present & (head_raw.cast(pl.String).str.strip_chars() != "")
    if int(present.sum()) and not int((present & head.is_not_null()).sum()):
        example = head_raw.filter(present)[0]
        if pattern:
            raise ContractError(
                f"{path}: column '{column}' cannot be read with --timestamp-format {pattern!r} "
                f"(e.g. {example!r}); check the pattern (strftime codes, e.g. '%m/%d/%Y %H:%M')"
            )
        hint = {"iso": "ISO 8601 text", "s": "epoch seconds", "ms": "epoch milliseconds"}[unit]
        raise ContractError(
            f"{path}: column '{column}' cannot be read as {hint} (e.g. {example!r}); "
            "check timestamp_unit (--timestamp-unit s|ms|iso) or give a --timestamp-format"
        )
