"""Shelfwise core: settings, lake paths and I/O, data contracts, demo data, CLI."""
