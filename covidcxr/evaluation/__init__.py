"""Evaluation: which images are scored (data), one forward pass (passes), the numbers (figures),
checks that re-run the model (checks: test-time augmentation and the lungs-out shortcut test), pictures
(visuals), segmentation scoring (segscore), the HTML page (report), and the ``Evaluator`` that ties them
together (evaluator). ``python -m covidcxr.evaluate`` is its CLI."""
