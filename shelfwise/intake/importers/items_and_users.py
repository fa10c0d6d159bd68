"""The items and users an import saw, with their latest attributes, written to landing."""

import posixpath
from collections.abc import Mapping, Sequence

import polars as pl
import pyarrow as pa

from shelfwise import lake as paths
from shelfwise.contracts import (
    IS_RECOMMENDABLE,
    ITEMS_SCHEMA,
    STOCK_UPDATED_AT,
    UNKNOWN_CATEGORY,
    USERS_SCHEMA,
)
from shelfwise.intake.importers.columns import _ITEM_ATTRIBUTES, _USER_ATTRIBUTES
from shelfwise.intake.importers.landing import _landing_prefix, _landing_table
from shelfwise.intake.importers.report import ImportReport
from shelfwise.intake.importers.values import normalize_ids
from shelfwise.lake import Lake

_LAST_WORD = 2**62  # an attribute time later than any event's


class _Latest:
    """The latest value of each attribute per key, and every key seen; memory grows with keys."""

    def __init__(self, most_frequent: Sequence[str] = ()) -> None:
        self.latest = pl.DataFrame(
            schema={"key": pl.String, "attribute": pl.String, "value": pl.String, "at": pl.Int64}
        )
        # Attributes that take their most frequent value (ties: the latest), counted per value.
        self.most_frequent = tuple(most_frequent)
        self.frequent = pl.DataFrame(
            schema={
                "key": pl.String,
                "attribute": pl.String,
                "value": pl.String,
                "count": pl.Int64,
                "at": pl.Int64,
            }
        )
        self.seen = pl.DataFrame(schema={"key": pl.String})

    def see(self, keys: pl.Series) -> None:
        fresh = keys.drop_nulls().unique().alias("key").to_frame()
        self.seen = pl.concat([self.seen, fresh]).unique()

    def update(self, long: pl.DataFrame) -> None:
        """Merges rows (key, attribute, value, at); later `at` wins, then later arrival."""
        long = long.select(
            pl.col("key").cast(pl.String),
            pl.col("attribute").cast(pl.String),
            pl.col("value").cast(pl.String),
            pl.col("at").cast(pl.Int64),
        ).drop_nulls(["key", "value"])
        counted = long.filter(pl.col("attribute").is_in(self.most_frequent))
        if counted.height:
            counts = counted.group_by("key", "attribute", "value").agg(
                pl.len().cast(pl.Int64).alias("count"), pl.col("at").max()
            )
            self.frequent = (
                pl.concat([self.frequent, counts])
                .group_by("key", "attribute", "value")
                .agg(pl.col("count").sum(), pl.col("at").max())
            )
            long = long.filter(~pl.col("attribute").is_in(self.most_frequent))
        merged = pl.concat([self.latest, long]).sort("at", nulls_last=False, maintain_order=True)
        self.latest = merged.unique(["key", "attribute"], keep="last", maintain_order=False)

    def wide(self, attributes: Sequence[str]) -> pl.DataFrame:
        """One row per key with attributes, a column per attribute (null when never seen)."""
        latest = self.latest
        if self.frequent.height:  # most frequent values replace the latest ones
            mode = (
                self.frequent.sort(
                    ["key", "attribute", "count", "at", "value"],
                    descending=[False, False, True, True, False],
                )
                .unique(["key", "attribute"], keep="first")
                .select("key", "attribute", "value", "at")
            )
            latest = pl.concat([latest.join(mode, on=["key", "attribute"], how="anti"), mode])
        if latest.height:
            wide = latest.pivot(on="attribute", index="key", values="value")
        else:
            wide = pl.DataFrame(schema={"key": pl.String})
        return wide.with_columns(
            pl.lit(None, dtype=pl.String).alias(name)
            for name in attributes
            if name not in wide.columns
        )


class _Unit:
    """One import's items and users, written once at the end under the events file's name."""

    def __init__(
        self,
        lake: Lake,
        fmt: str,
        path: str,
        report: ImportReport,
        not_recommendable: Sequence[str] = (),
    ) -> None:
        self.lake = lake
        self.report = report
        self.prefix = _landing_prefix(fmt, path)
        # An item's title is its most frequent one: order lines carry the title typed at each
        # sale, and a single odd line ("damaged", "check") must not rename the item.
        self.items = _Latest(most_frequent=("title",))
        self.users = _Latest()
        self.not_recommendable = normalize_ids(not_recommendable)

    def observe(self, frame: pl.DataFrame) -> None:
        """Remembers the valid rows' items and users and their attributes.

        A price is an item attribute only when positive: a zero on an order line is a
        giveaway or a correction, not the item's price.
        """
        if "item:price" in frame.columns:
            frame = frame.with_columns(
                pl.when(pl.col("item:price") > 0).then(pl.col("item:price")).alias("item:price")
            )
        at = frame.get_column("occurred_at").dt.epoch("us")
        for target, key, tag in (
            (self.items, "item_id", "item:"),
            (self.users, "user_id", "user:"),
        ):
            target.see(frame.get_column(key))
            attributes = [c for c in frame.columns if c.startswith(tag)]
            if not attributes:
                continue
            long = (
                frame.select(
                    pl.col(key).alias("key"),
                    at.alias("at"),
                    *[pl.col(c).cast(pl.String).alias(c.removeprefix(tag)) for c in attributes],
                )
                .unpivot(index=["key", "at"], variable_name="attribute", value_name="value")
                .drop_nulls(["key", "value"])
            )
            target.update(long)

    def write_catalog(self, category_paths: Mapping[str, str] | None = None) -> None:
        """Writes the items and users files (rows described in the package docstring)."""
        items_path = paths.dataset_file(paths.LANDING_ITEMS, f"{self.prefix}-items")
        if self.not_recommendable:  # the command line's word is the last one
            self.items.update(
                pl.DataFrame(
                    {
                        "key": self.not_recommendable,
                        "attribute": IS_RECOMMENDABLE,
                        "value": "false",
                        "at": _LAST_WORD,
                    }
                )
            )
        wide = self.items.wide([*_ITEM_ATTRIBUTES, "price"])
        if category_paths:
            from_tree = wide.get_column("category_id").replace_strict(
                dict(category_paths), default=None, return_dtype=pl.String
            )
            wide = wide.with_columns(pl.col("category_path").fill_null(from_tree))
        rich = wide.filter(pl.any_horizontal(pl.col(a).is_not_null() for a in _ITEM_ATTRIBUTES))
        placeholders = self._placeholders(self.items, rich, "item_id", paths.ITEMS, items_path)
        # The stock is as of the source row that said it (an `available` property, an event).
        stock_times = self.items.latest.filter(pl.col("attribute") == "is_in_stock").select(
            "key", pl.from_epoch("at", time_unit="us").dt.replace_time_zone("UTC").alias("_at")
        )
        items = (
            pl.concat([rich, placeholders.join(wide, on="key", how="left")], how="diagonal")
            .join(stock_times, on="key", how="left")
            .select(
                pl.col("key").alias("item_id"),
                pl.col("title"),
                pl.col("category_id").fill_null(UNKNOWN_CATEGORY),
                pl.col("category_path"),
                pl.col("brand"),
                pl.col("price").cast(pl.Float64, strict=False),
                (pl.col("is_in_stock") != "false").fill_null(True).alias("is_in_stock"),
                pl.col("_at").alias(STOCK_UPDATED_AT),
                (pl.col(IS_RECOMMENDABLE) != "false").alias(IS_RECOMMENDABLE),
            )
            .sort("item_id")
        )
        self.report.items_written += self._write(items, ITEMS_SCHEMA, items_path)

        users_path = paths.dataset_file(paths.LANDING_USERS, f"{self.prefix}-users")
        wide = self.users.wide(_USER_ATTRIBUTES)
        rich = wide.filter(pl.any_horizontal(pl.col(a).is_not_null() for a in _USER_ATTRIBUTES))
        placeholders = self._placeholders(self.users, rich, "user_id", paths.USERS, users_path)
        users = (
            pl.concat([rich, placeholders], how="diagonal")
            .select(pl.col("key").alias("user_id"), pl.col("country"), pl.col("device"))
            .sort("user_id")
        )
        self.report.users_written += self._write(users, USERS_SCHEMA, users_path)

    def _placeholders(
        self, latest: _Latest, rich: pl.DataFrame, key: str, catalog: str, own: str
    ) -> pl.DataFrame:
        """Keys seen without catalog attributes that the lake does not know yet."""
        landing = posixpath.dirname(own)
        known = [rich.select("key")]
        current = paths.catalog_file(catalog)
        sources = [current] if self.lake.exists(current) else []
        sources += [p for p in self.lake.list_files(landing) if p != own]
        for relpath in sources:
            try:
                frame = self.lake.read_frame(relpath, columns=[key])
            except (pa.ArrowInvalid, KeyError, FileNotFoundError):
                continue
            known.append(frame.select(pl.col(key).cast(pl.String).alias("key")))
        return latest.seen.join(pl.concat(known), on="key", how="anti")

    def _write(self, rows: pl.DataFrame, schema: pa.Schema, relpath: str) -> int:
        if not rows.height:
            self.lake.remove([relpath])
            return 0
        self.lake.write_parquet(_landing_table(rows, schema, relpath), relpath)
        self.report.files_written.append(relpath)
        return rows.height
