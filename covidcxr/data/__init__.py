"""Data layer (the bottom layer: imports nothing above it, never Keras): dataset layouts, file checks,
near-duplicate grouping, manifests, splits, synthetic demo data, bit-exact host preprocessing
(``preprocess``, ``resample``), the uint8 on-disk cache, and the same preprocessing as a TensorFlow
graph for SavedModel signatures (``tfgraph``, imported only by the exporter).

Run ``python -m covidcxr.data --help`` for the command-line interface.
"""
