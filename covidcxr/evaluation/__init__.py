"""Evaluation: which images are scored (data), one forward pass (passes), the numbers (figures),
probes that re-run the model (probes), pictures (visuals), the HTML page (report), and the
``Evaluator`` that ties them together (evaluator). ``python -m covidcxr.evaluate`` is its CLI."""
