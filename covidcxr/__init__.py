"""covidcxr: a Keras 3 toolkit for chest X-ray research.

Importing the package is cheap: Keras and its backend are imported only by the modules
that need them (models, training, inference, evaluation, export).
"""

__version__ = "0.2.0"
