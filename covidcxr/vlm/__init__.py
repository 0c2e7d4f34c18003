"""Chest-X-ray foundation models: RAD-DINO and MedSigLIP encoders, zero-shot and prompted segmentation.

Modules (each imports Keras only when it needs it):

- ``presets``: what a keras-hub preset / Hugging Face folder holds, checked before loading;
  RAD-DINO's published normalisation;
- ``tokens``: SigLIP's image tower as a registry backbone and ViT patch tokens as feature
  maps (import it before ``keras.saving.load_model`` of a rad_dino / medsiglip / setr_* model:
  it registers the layers and the ``rad_dino`` normalisation);
- ``siglip``: zero-shot classification with SigLIP's sigmoid scores;
- ``prompted``: text-prompted segmentation (SigLIP patch similarity -> SAM prompts -> SAM);
- ``embeddings``: an on-disk cache of frozen-encoder embeddings;
- ``probe``: a softmax linear probe on cached embeddings.

The registry entries are ``rad_dino`` and ``medsiglip`` (``covidcxr.models.registry``) and the
segmentation names ``setr_<vit>`` (``covidcxr.models.segmentation``).
"""
