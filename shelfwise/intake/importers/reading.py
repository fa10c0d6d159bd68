"""Reading source files: opening CSV (gzip/bz2, delimiter sniffed) or Parquet, in batches."""

import csv
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shelfwise.contracts import ContractError
from shelfwise.intake.importers.columns import _ORDINAL
from shelfwise.intake.importers.report import _MALFORMED_KEPT, ImportReport

DEFAULT_BATCH_ROWS = 1_000_000

_HEADER_BYTES = 1 << 16
_CSV_BLOCK_BYTES = 1 << 20
_PARQUET_READ_ROWS = 65_536


@dataclass
class _Source:
    """An opened source file: its columns and how to read it in batches."""

    path: str
    columns: list[str]
    delimiter: str | None  # None: Parquet

    def batches(
        self, include: Sequence[str], batch_rows: int, report: ImportReport
    ) -> Iterator[pl.DataFrame]:
        """Yields frames of exactly `batch_rows` rows (the last one shorter) with `_ordinal`."""
        include = [c for c in dict.fromkeys(include) if c in self.columns]
        tables = self._csv(include, report) if self.delimiter else self._parquet(include)
        ordinal = 0
        for table in _rebatch(tables, batch_rows):
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_columns(
                pl.int_range(ordinal, ordinal + frame.height, dtype=pl.Int64).alias(_ORDINAL)
            )
            ordinal += frame.height
            report.rows_read += frame.height
            yield frame

    def _csv(self, include: list[str], report: ImportReport) -> Iterator[pa.RecordBatch]:
        malformed: list[str] = []

        def skip(row: pacsv.InvalidRow) -> str:
            malformed.append(row.text)
            return "skip"

        good = 0
        try:
            reader = pacsv.open_csv(
                pa.input_stream(self.path, compression="detect"),
                read_options=pacsv.ReadOptions(
                    column_names=self.columns, skip_rows=1, block_size=_CSV_BLOCK_BYTES
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.delimiter, invalid_row_handler=skip
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in include},
                    include_columns=include,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                    null_values=[""],
                ),
            )
            for batch in reader:
                good += batch.num_rows
                yield batch
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise ContractError(self._explain(error)) from error
        report.rows_read += len(malformed)
        report.rows_malformed += len(malformed)
        room = _MALFORMED_KEPT - len(report.malformed_rows)
        report.malformed_rows += [f"{self.path}: {text[:200]}" for text in malformed[:room]]
        if malformed and not good:
            raise ContractError(
                f"{self.path}: no row has the header's {len(self.columns)} fields "
                f"({', '.join(self.columns)}); first row: {malformed[0][:200]!r}"
            )

    def _parquet(self, include: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            handle = pq.ParquetFile(self.path)
            yield from handle.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=include)
        except (pa.ArrowInvalid, OSError) as error:
            raise ContractError(f"{self.path}: cannot be read as Parquet: {error}") from error

    def _explain(self, error: Exception) -> str:
        text = str(error)
        match = re.search(r"column #(\d+)", text)
        if match and int(match.group(1)) < len(self.columns):
            name = self.columns[int(match.group(1))]
            return f"{self.path}: column '{name}' cannot be parsed: {text}"
        return f"{self.path}: cannot be parsed as CSV: {text}"


def _open_source(path: str, delimiter: str | None) -> _Source:
    """Opens a source file and reads its column names (CSV header or Parquet schema)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.lower().endswith((".parquet", ".pq")):
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as error:
            raise ContractError(f"{path}: cannot be read as Parquet: {error}") from error
        return _Source(path=path, columns=names, delimiter=None)
    try:
        with pa.input_stream(path, compression="detect") as stream:
            head = stream.read(_HEADER_BYTES)
    except (pa.ArrowInvalid, OSError) as error:
        raise ContractError(f"{path}: cannot be read: {error}") from error
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        line = first.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ContractError(f"{path}: the header is not UTF-8 text: {error}") from error
    if not line.strip():
        raise ContractError(f"{path}: the file is empty or has no header line")
    if delimiter is None:
        delimiter = max([",", "\t", ";", "|"], key=line.count)
    names = [name.strip() for name in next(csv.reader([line], delimiter=delimiter))]
    return _Source(path=path, columns=names, delimiter=delimiter)


def _require(source: _Source, columns: Iterable[str]) -> None:
    for column in columns:
        if column not in source.columns:
            raise ContractError(
                f"{source.path}: required column '{column}' is missing; "
                f"the file has {', '.join(source.columns)}"
            )


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-cuts a stream of record batches into tables of exactly `rows` rows (last shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    schema = None
    for batch in batches:
        schema = batch.schema
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.Table.from_batches(pending, schema=schema)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending, schema=schema)


def _check_batch_rows(batch_rows: int) -> None:
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")
