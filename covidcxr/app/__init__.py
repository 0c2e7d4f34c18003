"""``python -m covidcxr.app``: a local web viewer (Gradio, the optional extra ``[app]``) for single films
(``film``) and for an evaluation's errors (``evaltab``); ``present`` writes the page's text and ``ui`` lays
it out. Research use only; not a medical device."""
