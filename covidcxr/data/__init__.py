"""Data layer: dataset layouts, file checks, near-duplicate grouping, manifests,
splits, synthetic demo data and the tf.data input pipeline.

Run ``python -m covidcxr.data --help`` for the command-line interface.
"""
