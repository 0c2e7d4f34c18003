"""The network of a run: its ``--arch``, ``--image-size`` and ``--weights`` checked before any data work
(``check_model``, one line per mistake), then built with the weights resolved (``build_network``): a
backbone's weights, or a whole covidcxr model's (``training/startfrom.py``)."""
from __future__ import annotations

from covidcxr.config import TrainConfig
from covidcxr.errors import ConfigError
from covidcxr.models.catalog import check_arch
from covidcxr.models.registry import check_weights, imagenet_available
from covidcxr.models.weights import WeightsKind, WeightsSource
from covidcxr.training.startfrom import copy_weights, starting_model


def check_model(cfg: TrainConfig, task):
    """--arch (a name of the task), --image-size for it and --weights/--preset checked before any data work,
    each refused in one line; returns the registry backbone (None for the plain U-Net)."""
    check_arch(task, cfg.arch)
    spec = task.spec(cfg.arch, cfg.image_size)
    backbone = getattr(spec, "backbone", spec)  # segmentation specs wrap a registry backbone (or none)
    if _start(cfg, backbone) is not None:     # a covidcxr model (run, export, hf:// export): checked there
        return backbone
    w = WeightsSource.parse(cfg.weights)
    if backbone is None and w.kind not in (WeightsKind.NONE, WeightsKind.AUTO):
        raise ConfigError(f"--weights {w}: {cfg.arch} has no pretrained encoder; use --weights none.")
    if backbone is not None and w.kind is WeightsKind.AUTO and backbone.needs_preset:
        raise ConfigError(f"--arch {cfg.arch}: pass its weights with --preset (a local folder, or "
                          f"{backbone.hub_preset}); a randomly initialised foundation model is not what "
                          f"this architecture is for (use --weights none to train one from scratch anyway).")
    if backbone is not None and w.kind not in (WeightsKind.NONE, WeightsKind.AUTO):
        check_weights(backbone, cfg.weights)
    return backbone


def _start(cfg: TrainConfig, backbone):
    """The covidcxr model --weights names (training/startfrom.py), or None."""
    return starting_model(cfg.weights, cfg.arch, cfg.task, backbone is not None and backbone.source == "keras-hub")


def build_network(cfg: TrainConfig, task, n_classes: int, log):
    """(network, resolved weights string) from --weights auto | imagenet | none | PATH | preset | MODEL."""
    backbone = check_model(cfg, task)

    def build(weights, bn):
        return task.build(cfg.arch, cfg.image_size, n_classes, weights, cfg.dropout, bn)

    start = _start(cfg, backbone)
    if start is not None:
        net = build(None, None)
        log(copy_weights(net, start).describe(f"--weights {cfg.weights} ({start.card.arch} {start.card.task} model "
                                              f"at {start.card.image_size} px, classes {', '.join(start.card.classes)})"))
        return net, cfg.weights

    w = WeightsSource.parse(cfg.weights)
    if w.kind is WeightsKind.NONE or backbone is None:
        return build(None, cfg.bn_momentum), str(WeightsSource(WeightsKind.NONE))
    if w.kind is WeightsKind.AUTO:
        try:
            if backbone.source == "keras-hub" and not imagenet_available(backbone):
                raise ConfigError("keras-hub presets are not fetched automatically")
            return build("imagenet", None), str(WeightsSource(WeightsKind.IMAGENET))
        except ConfigError as exc:
            log(f"WARNING: --weights auto: ImageNet weights unavailable ({str(exc)[:160]}...). Training FROM "
                f"SCRATCH instead (--weights none). Pass --weights imagenet to make this an error, or --weights "
                f"PATH for a local file.")
            return build(None, cfg.bn_momentum), str(WeightsSource(WeightsKind.NONE))
    return build(cfg.weights, None), cfg.weights
