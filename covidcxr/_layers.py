"""The layers of the package, bottom to top: the one table ``tests/test_layering.py`` checks.

A module may import from its own layer (without a circle) and from the layers below it, never from a
layer above; imports between covidcxr modules are made at module level, never inside a function.

- L0 ``foundation``: errors, the command runner, run/export folders (artifacts; ``hub`` turns hf:// handles
  into such folders and uploads them), the data layer
  (``data/``, which imports nothing above it) and leaf utilities that need no model: metrics,
  segmentation metrics, calibration, plots, mask pictures, Keras losses, and the MODEL_CARD.md writer
  (``modelcard``, which reads the files of a run, export or evaluation folder).
- L1 ``models``: the architecture table, backbones, hub presets, ViT token layers, normalisations,
  classifiers and segmenters.
- L2 ``tasks``: what differs between classify / segment / multitask (``tasks``), the augmentation
  layer (``augment``) and the typed run configuration (``config``).
- L3 ``inference``: loading saved models and running them on files (``inference``), Grad-CAM and
  lung-cropping with a segmenter.
- L4 ``workflows``: training, evaluation, prediction outputs, export, vision-language (``vlm``:
  CLIP / SigLIP zero-shot, prompted SAM segmentation), the web viewer's logic and layout (``app``).
- L5 ``commands``: the ``python -m covidcxr.<command>`` modules (and ``covidcxr/app/__main__.py``).

Exemptions (``FACADE``): ``covidcxr/__init__.py`` imports ``covidcxr.inference`` inside ``load_model``
so that ``import covidcxr`` does not import Keras; ``covidcxr.exporting.export_run`` imports the
SavedModel writer (which imports TensorFlow, optional under JAX) only when TensorFlow is the backend.
"""
from __future__ import annotations

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("covidcxr", "covidcxr._layers", "covidcxr.errors", "covidcxr.cli", "covidcxr.hub",
                    "covidcxr.artifacts", "covidcxr.data", "covidcxr.metrics", "covidcxr.segmetrics", "covidcxr.calibration",
                    "covidcxr.operating",
                    "covidcxr.plots", "covidcxr.masks", "covidcxr.losses", "covidcxr.modelcard")),
    ("models", ("covidcxr.models",)),
    ("tasks", ("covidcxr.tasks", "covidcxr.augment", "covidcxr.config")),
    ("inference", ("covidcxr.inference", "covidcxr.gradcam", "covidcxr.lungcrop")),
    ("workflows", ("covidcxr.training", "covidcxr.evaluation", "covidcxr.prediction", "covidcxr.exporting",
                   "covidcxr.vlm", "covidcxr.app")),
    ("commands", ("covidcxr.train", "covidcxr.evaluate", "covidcxr.predict", "covidcxr.export",
                  "covidcxr.pretrain", "covidcxr.zeroshot", "covidcxr.app.__main__")),
)

# (module, imported module) pairs allowed inside a function
FACADE = {("covidcxr", "covidcxr.inference"),
          # the SavedModel writer imports TensorFlow, which is optional under JAX/PyTorch: loaded only
          # where TensorFlow is the backend (export_run), so training imports on a machine without it
          ("covidcxr.exporting", "covidcxr.exporting.savedmodel")}


def layer_of(module: str) -> int:
    """The layer index of a module name (the longest matching prefix in ``LAYERS``)."""
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    if where is None:
        raise KeyError(f"{module} is in no layer of covidcxr/_layers.py")
    return where
