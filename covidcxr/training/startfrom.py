"""``train --weights MODEL``: start from a covidcxr model instead of a backbone's weights.

MODEL is a run or export folder (it holds ``model_card.json``), a ``.keras`` file with its card beside
it, or ``hf://OWNER/NAME[@REVISION]``, an export pushed to the Hugging Face Hub (``export --push-to-hub``;
downloaded once into the Hub cache, ``HF_HUB_OFFLINE=1`` reads only the cache). For a keras-hub
architecture an ``hf://`` repo without ``model_card.json`` keeps its other meaning: a backbone preset
(``covidcxr/models/weights.py``).

MODEL must be of this run's architecture and task. The new network is built at this run's size and
classes, and each of its weighted layers takes the weights of MODEL's layer at the same place when their
shapes match (the backbone; the heads too when the number of classes is the same); the others keep their
initialisation, and the log says how many of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidcxr import hub
from covidcxr.artifacts import CARD, Located, locate
from covidcxr.errors import ConfigError, DataError
from covidcxr.inference import load_keras
from covidcxr.models.weights import WeightsKind, WeightsSource


@dataclass
class Copied:
    layers: int          # layers whose weights came from the model
    kept: list[str]      # layers with weights that kept their initialisation (no match by name and shapes)

    def describe(self, source: str) -> str:
        rest = f"; {len(self.kept)} kept their initialisation ({', '.join(self.kept[:4])}" \
               f"{', ...' if len(self.kept) > 4 else ''})" if self.kept else ""
        return f"{source}: weights of {self.layers} layers copied{rest}"


def starting_model(weights: str | None, arch: str, task: str, keras_hub_arch: bool) -> Located | None:
    """The covidcxr model ``--weights`` names, or None when it names something else (a weights file, a
    preset). Refuses a model of another architecture, and an ``hf://`` repo that holds no covidcxr model
    when the architecture has no presets."""
    w = WeightsSource.parse(weights)
    found = None
    if w.kind is WeightsKind.PATH:
        p = Path(w.where)
        if (p.is_dir() and (p / CARD).exists()) or (p.suffix == ".keras" and (p.parent / CARD).exists()):
            found = locate(p)
    elif w.kind is WeightsKind.HANDLE and hub.is_handle(w.where):
        try:
            folder = hub.resolve(w.where)
        except (ConfigError, DataError):
            if keras_hub_arch:
                return None          # perhaps a keras-hub preset: its own loader reports what is wrong
            raise
        if not (folder / CARD).exists():
            if keras_hub_arch:
                return None
            raise ConfigError(f"--weights {w.where}: the repo holds no covidcxr model ({CARD}); {arch} takes "
                              f"--weights imagenet | none | PATH | hf://OWNER/NAME of a covidcxr export.")
        found = locate(folder)
    if found is None:
        return None
    if found.keras_path is None:
        raise ConfigError(f"--weights {weights}: that model has no model.keras (a bare SavedModel); pass its run "
                          f"or export folder.")
    if (found.card.arch, found.card.task) != (arch, task):
        raise ConfigError(f"--weights {weights} is a {found.card.arch} {found.card.task} model; start from it with "
                          f"--arch {found.card.arch} --task {found.card.task} (a model of another architecture or "
                          f"task does not pair up layer by layer).")
    return found


def units(model) -> list:
    """The layers that own weights, depth-first: a layer none of whose sub-layers hold weights (a convolution, a
    normalisation, a dense head), or one that holds weights of its own beside theirs."""
    out = []

    def walk(layer):
        subs = [s for s in (getattr(layer, "_layers", None) or []) if s.weights]
        if layer.weights and (not subs or len(layer.weights) > sum(len(s.weights) for s in subs)):
            out.append(layer)
            return
        for sub in subs:
            walk(sub)

    walk(model)
    return out


def copy_weights(net, source: Located) -> Copied:
    """Copy into ``net`` the weights of ``source``'s model, layer by layer in build order (both are the same
    architecture and task, so their layers pair up whatever names this session gave them); a pair whose
    shapes differ (the head of another class count, position embeddings of another size) keeps ``net``'s."""
    model = load_keras(source.keras_path)
    mine, theirs = units(net), units(model)
    if [type(u).__name__ for u in mine] != [type(u).__name__ for u in theirs]:
        raise ConfigError(f"--weights {source.root}: its layers do not pair up with this {source.card.arch} network "
                          f"({len(theirs)} against {len(mine)} weighted layers); it was built by another covidcxr "
                          f"version or with other options.")
    copied, kept = 0, []
    for a, b in zip(mine, theirs):
        if [tuple(v.shape) for v in a.weights] == [tuple(v.shape) for v in b.weights]:
            a.set_weights(b.get_weights())
            copied += 1
        else:
            kept.append(a.name)
    return Copied(copied, kept)
