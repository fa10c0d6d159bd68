"""Canonical column names the importers fill, and the helper column of normalized frames."""

from shelfwise.contracts import EVENTS_SCHEMA, IS_RECOMMENDABLE

# Canonical names a source column may be mapped to (the generic format and the catalog file).
_EVENT_COLUMNS = tuple(f.name for f in EVENTS_SCHEMA)
_ITEM_ATTRIBUTES = (
    "title",
    "category_id",
    "category_path",
    "brand",
    "is_in_stock",
    IS_RECOMMENDABLE,
)
_BOOLEAN_ATTRIBUTES = ("is_in_stock", IS_RECOMMENDABLE)
_USER_ATTRIBUTES = ("country", "device")

# Helper column of the normalized frames: the row's position in its source file.
_ORDINAL = "_ordinal"
