"""The network of a run: its ``--arch``, ``--image-size`` and ``--weights`` checked before any data work
(``check_model``, one line per mistake), then built with the weights resolved (``build_network``)."""
from __future__ import annotations

from covidcxr.config import TrainConfig
from covidcxr.errors import ConfigError
from covidcxr.models.catalog import check_arch
from covidcxr.models.registry import check_weights, imagenet_available

FOUNDATION_WEIGHTS = {"rad_dino": "hf://microsoft/rad-dino", "medsiglip": "medsiglip_900m_448"}


def check_model(cfg: TrainConfig, task):
    """--arch (a name of the task), --image-size for it and --weights/--preset checked before any data work,
    each refused in one line; returns the registry backbone (None for the plain U-Net)."""
    check_arch(task, cfg.arch)
    spec = task.spec(cfg.arch, cfg.image_size)
    backbone = getattr(spec, "backbone", spec)  # segmentation specs wrap a registry backbone (or none)
    w = cfg.weights
    if backbone is None and w not in ("none", "auto"):
        raise ConfigError(f"--weights {w}: {cfg.arch} has no pretrained encoder; use --weights none.")
    if backbone is not None and w == "auto" and backbone.name in FOUNDATION_WEIGHTS:
        raise ConfigError(f"--arch {cfg.arch}: pass its weights with --preset (a local folder, or "
                          f"{FOUNDATION_WEIGHTS[backbone.name]}); a randomly initialised foundation model is not what "
                          f"this architecture is for (use --weights none to train one from scratch anyway).")
    if backbone is not None and w not in ("none", "auto"):
        check_weights(backbone, w)
    return backbone


def build_network(cfg: TrainConfig, task, n_classes: int, log):
    """(network, resolved weights string) from --weights auto | imagenet | none | PATH | preset."""
    backbone = check_model(cfg, task)

    def build(weights, bn):
        return task.build(cfg.arch, cfg.image_size, n_classes, weights, cfg.dropout, bn)

    w = cfg.weights
    if w == "none" or backbone is None:
        return build(None, cfg.bn_momentum), "none"
    if w == "auto":
        try:
            if backbone.source == "keras-hub" and not imagenet_available(backbone):
                raise ConfigError("keras-hub presets are not fetched automatically")
            return build("imagenet", None), "imagenet"
        except ConfigError as exc:
            log(f"WARNING: --weights auto: ImageNet weights unavailable ({str(exc)[:160]}...). Training FROM "
                f"SCRATCH instead (--weights none). Pass --weights imagenet to make this an error, or --weights "
                f"PATH for a local file.")
            return build(None, cfg.bn_momentum), "none"
    return build(w, None), w
