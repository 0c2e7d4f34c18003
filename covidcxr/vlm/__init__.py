"""Vision-language models on chest X-rays (``python -m covidcxr.zeroshot`` is their command):

- ``clip``: CLIP zero-shot classification (softmax over prompt embeddings);
- ``siglip``: MedSigLIP zero-shot classification with SigLIP's sigmoid scores;
- ``prompted``: text-prompted segmentation (SigLIP patch similarity -> SAM prompts -> SAM), loading SAM;
- ``inputs``: the rows of a zero-shot run, preset families, decoded batches;
- ``outputs``: its predictions, figures, plots, report and segmentation scores.

The image towers as trainable backbones (``rad_dino``, ``medsiglip``, ``setr_*``) live in
``covidcxr.models`` (``registry``, ``presets``, ``tokens``).
"""
