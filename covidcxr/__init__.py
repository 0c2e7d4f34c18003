"""covidcxr: a Keras 3 toolkit for chest X-ray research.

Importing the package is cheap: TensorFlow and Keras are imported only by the
modules that need them (models, pipeline, training, export).
"""

__version__ = "0.1.0"
