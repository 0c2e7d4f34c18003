"""Where a backbone's starting weights come from: one small type for the ``--weights`` / ``--preset`` value.

The value is stored as text in ``config.json`` (unchanged format): ``auto``, ``imagenet``, ``none``, a local
PATH (a weights file, or a keras-hub / Hugging Face preset folder), ``preset:NAME`` (a keras-hub preset name,
``--preset NAME``) or an ``hf://`` / ``kaggle://`` handle. ``WeightsSource.parse`` reads it once;
code asks the source what it is instead of looking at prefixes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

PRESET = "preset:"                     # prefix of a keras-hub preset *name* (a preset folder is passed as its path)
HUB_SCHEMES = ("hf://", "kaggle://")   # handles accepted as weights values without the PRESET prefix


class WeightsKind(enum.Enum):
    AUTO = "auto"            # ImageNet where available, else from scratch with a warning
    IMAGENET = "imagenet"    # the architecture's published weights (keras.applications or its hub preset)
    NONE = "none"            # random initialisation
    PATH = "path"            # a local weights file or preset folder
    PRESET = "preset"        # a keras-hub preset name
    HANDLE = "handle"        # an hf:// or kaggle:// handle


@dataclass(frozen=True)
class WeightsSource:
    kind: WeightsKind
    where: str = ""          # the path, preset name or handle

    @classmethod
    def parse(cls, text: str | None) -> "WeightsSource":
        """``None`` means random initialisation (as the builders take it)."""
        w = "none" if text is None else str(text)
        for kind in (WeightsKind.AUTO, WeightsKind.IMAGENET, WeightsKind.NONE):
            if w == kind.value:
                return cls(kind)
        if w.startswith(PRESET):
            return cls(WeightsKind.PRESET, w[len(PRESET):])
        if w.startswith(HUB_SCHEMES):
            return cls(WeightsKind.HANDLE, w)
        return cls(WeightsKind.PATH, w)

    @property
    def preset(self) -> str | None:
        """The preset name or handle a keras-hub loader takes (None for the other kinds)."""
        return self.where if self.kind in (WeightsKind.PRESET, WeightsKind.HANDLE) else None

    @property
    def is_file_or_folder(self) -> bool:
        return self.kind is WeightsKind.PATH

    def __str__(self) -> str:
        """The text stored in config.json (``parse`` reads it back to the same source)."""
        if self.kind is WeightsKind.PRESET:
            return PRESET + self.where
        return self.where if self.where else self.kind.value
