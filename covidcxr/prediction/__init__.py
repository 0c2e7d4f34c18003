"""Helpers of ``python -m covidcxr.predict``: output files (outputs) and shards and merging (shards)."""
