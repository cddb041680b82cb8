"""Datasets: sources, specs, copy-only snapshots, captions, validation and the report."""
