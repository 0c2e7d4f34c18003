"""Every ``--arch`` name of every task, and the table ``train --arch list`` prints. Imports no Keras,
so ``train --help`` can list them and a wrong name is refused before any data work.

- classify: every registry backbone (``covidcxr.models.registry``);
- segment / multitask (``covidcxr.models.segmentation``): ``unet`` from scratch; ``unet_<B>``,
  ``unetpp_<B>`` and ``deeplabv3plus_<B>`` for the backbones with skip layers (``SEG_BACKBONES``);
  ``setr_<V>`` for the ViT token encoders (``TOKEN_BACKBONES``).
"""
from __future__ import annotations

import difflib
import textwrap
from dataclasses import dataclass

from covidcxr.errors import ConfigError
from covidcxr.models.registry import ArchSpec, spec_table

SEG_KINDS = ("unet", "unetpp", "deeplabv3plus")
SEG_BACKBONES = ("resnet50", "resnet101", "efficientnetb0", "efficientnetb1", "efficientnetb2", "densenet121",
                 "mobilenetv3small", "resnet18")
TOKEN_KIND = "setr"  # decoder for ViT token encoders (no skips)
TOKEN_BACKBONES = ("dinov2_small", "dinov2_base", "rad_dino", "medsiglip", "vit_b16", "clip_vit_b16")
LIST = "list"        # --arch list: print the table
COMMAND = "python -m covidcxr.train"


def seg_arch_names() -> list[str]:
    table = spec_table()
    return (["unet"] + [f"{k}_{b}" for k in SEG_KINDS for b in SEG_BACKBONES if b in table]
            + [f"{TOKEN_KIND}_{b}" for b in TOKEN_BACKBONES if b in table])


def arch_names(segments: bool) -> list[str]:
    """The --arch names of a task: the registry backbones for a classifier, the segmentation names for a
    task with a mask output (``Task.segments``)."""
    return seg_arch_names() if segments else list(spec_table())


def check_arch(task, arch: str) -> None:
    """Refuse, in one line naming the choices, an ``--arch`` that ``task`` (a ``covidcxr.tasks.Task``) has
    no model for."""
    names = arch_names(task.segments)
    if arch in names:
        return
    if not task.segments and arch in seg_arch_names():
        raise ConfigError(f"--arch {arch} is a segmentation architecture: add --task segment (or multitask), or pick "
                          f"a classifier backbone ({COMMAND} --arch {LIST}).")
    if task.segments and arch in spec_table():
        wrap = f"{TOKEN_KIND}_{arch}" if arch in TOKEN_BACKBONES else \
            f"unet_{arch}" if arch in SEG_BACKBONES else "unet"
        raise ConfigError(f"--arch {arch} is a classifier backbone; --task {task.name} needs a segmentation name such as "
                          f"{wrap} ({COMMAND} --arch {LIST}).")
    close = difflib.get_close_matches(arch, names, n=1)
    raise ConfigError(f"--arch {arch}: unknown architecture for --task {task.name}"
                      + (f" (did you mean {close[0]}?)" if close else "")
                      + f"; choose from {', '.join(names)}, or see {COMMAND} --arch {LIST}.")


def arch_help() -> str:
    """The ``--arch`` help of ``train``: every name, by task."""
    return (f"classify: {', '.join(arch_names(segments=False))}; segment/multitask: {', '.join(seg_arch_names())}; "
            f"'{LIST}' prints them as a table (source, tasks, image sizes, pretrained weights) and exits")


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    name: str
    source: str
    tasks: str
    image_size: str
    weights: str

    @classmethod
    def of(cls, spec: ArchSpec) -> "Row":
        kinds = SEG_KINDS if spec.name in SEG_BACKBONES else (TOKEN_KIND,) if spec.name in TOKEN_BACKBONES else ()
        tasks = "classify" + (f", segment/multitask ({' '.join(f'{k}_' for k in kinds)})" if kinds else "")
        weights = "imagenet" if spec.source == "keras.applications" else spec.hub_preset
        return cls(spec.name, spec.source, tasks, _size(spec.size_multiple, spec.min_size), weights)


def _size(multiple: int, least: int) -> str:
    return f"multiple of {multiple}" + (f", >= {least}" if least > multiple else "")


def rows() -> list[Row]:
    """One row per registry backbone, and one for the plain U-Net."""
    return [Row.of(s) for s in spec_table().values()] + \
        [Row("unet", "covidcxr", "segment/multitask (from scratch)", _size(16, 16), "none")]


def format_table() -> str:
    """The registry as aligned text columns, with how the segmentation names are made."""
    head = Row("name", "source", "tasks (segment/multitask: as <decoder>_<name>)", "--image-size",
               "pretrained weights")
    table = [head] + rows()
    widths = [max(len(getattr(r, f)) for r in table) for f in Row.__dataclass_fields__]
    lines = ["  ".join(getattr(r, f).ljust(w) for f, w in zip(Row.__dataclass_fields__, widths)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = (f"segment/multitask names ({len(seg_arch_names())}): {', '.join(seg_arch_names())}. U-Net-family "
             f"decoders tap the registry's skip layers; setr_ lays a ViT's patch tokens on their grid. rad_dino and "
             f"medsiglip need their weights (--preset; README, chest-X-ray foundation models).")
    return "\n".join(lines + [""] + textwrap.wrap(notes, width=len(lines[1])))
