"""MODEL_CARD.md (Hugging Face model-card format) for every run, export and evaluation.

- ``write_run(run_dir, task)``: at the end of training, into the run folder.
- ``write_export(src, export_dir, task)``: beside the exported model (``model.keras`` and ``serving/``), from
  the facts of the folder it was exported from; ``model_card_facts.json`` travels with it.
- ``write_evaluation(model_root, out, metrics, task)``: into the evaluation's own folder: the model's card
  with this evaluation's figures added. The model's folder is never written.

``task`` is the model's ``covidcxr.tasks.Task`` (what it outputs). The card is a pure rendering (``render.render``) of facts read from files (``facts.gather``).
"""
from __future__ import annotations

from pathlib import Path

from covidcxr import artifacts as A
from covidcxr.modelcard import facts as F
from covidcxr.modelcard.mdhtml import to_html
from covidcxr.modelcard.render import INTENDED, render

MODEL_CARD = "MODEL_CARD.md"
__all__ = ["MODEL_CARD", "INTENDED", "render", "to_html", "write_run", "write_export", "write_evaluation"]


def _heads(task) -> dict:
    """What the model outputs, from its ``covidcxr.tasks.Task`` (passed in: this layer cannot import it)."""
    return {"classifies": bool(task.classifies), "segments": bool(task.segments)}


def _write(folder: Path, facts: dict, task) -> Path:
    facts["heads"] = _heads(task)
    F.save(folder, facts)
    path = folder / MODEL_CARD
    A.atomic_write_text(path, render(facts))
    return path


def write_run(run_dir: str | Path, task) -> Path:
    return _write(Path(run_dir), F.gather(run_dir), task)


def write_export(src: str | Path, export_dir: str | Path, task, check: str = "") -> Path:
    facts = F.gather(src)
    facts["export"] = {"folder": str(export_dir), "check": check}
    return _write(Path(export_dir), facts, task)


def write_evaluation(model_root: str | Path, out: str | Path, metrics: dict, task) -> Path:
    facts = F.gather(model_root)
    ev = F.evaluation_facts(metrics, out)
    ev["local"] = True      # its figure files lie beside this card
    facts["evaluations"] = [{**e, "local": False} for e in facts.get("evaluations") or []] + [ev]
    return _write(Path(out), facts, task)
