"""Dagster wiring only: assets, resources and the one `definitions.py`."""
