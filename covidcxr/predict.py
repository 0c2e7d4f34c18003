"""Classify X-ray files: ``python -m covidcxr.predict --model PATH INPUT...``.

PATH is a run directory, an export directory (``model.keras`` + ``labels.json``)
or a SavedModel directory (``serving/1``). INPUTs are files or folders
(PNG, JPEG, BMP, TIFF, DICOM). Writes a CSV (path, label, one probability
column per class) and prints a table. Unreadable files are reported and skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from covidcxr.data.imageio import ImageReadError, is_image_file, read_image
from covidcxr.errors import CovidCXRError, DataError


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    files, problems = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                problems.append(f"{p}: folder holds no image files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


class Predictor:
    """Wraps a Keras model or a SavedModel behind one ``predict(gray01 list)``."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.exists():
            raise DataError(f"--model {path}: no such file or folder.")
        sm = path if (path / "saved_model.pb").exists() else None
        if sm is None and (path / "serving" / "1" / "saved_model.pb").exists() and not (path / "model.keras").exists():
            sm = path / "serving" / "1"
        if sm is not None:
            import tensorflow as tf

            self.fn = tf.saved_model.load(str(sm)).signatures["serving_default"]
            labels = next((p / "labels.json" for p in (sm, sm.parent, sm.parent.parent) if (p / "labels.json").exists()),
                          None)
            self.labels = json.loads(labels.read_text()) if labels else None
            self.kind = "savedmodel"
        else:
            from covidcxr.export import find_model

            self.model, self.labels = find_model(path)
            self.kind = "keras"

    @property
    def classes(self) -> list[str]:
        return self.labels["classes"]

    def predict(self, gray01: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        from covidcxr.data import preprocess as P

        if self.kind == "savedmodel":
            data = P.numpy_to_png_bytes(gray01)
            return self.fn(image_bytes=tf.constant([data]))["probabilities"].numpy()[0]
        L = self.labels
        x = P.normalize(tf.cast(P.prepare(tf.constant(gray01[..., None]), L["image_size"], L["contrast"]),
                                tf.float32) / 255.0, L["normalization"])
        return np.asarray(self.model(x[None], training=False))[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covidcxr.predict", description=__doc__)
    p.add_argument("--model", required=True, help="run directory, export directory, .keras file or SavedModel")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise CovidCXRError(f"{out} already exists; pass --overwrite or another --out.")
        files, problems = collect_inputs(args.inputs)
        if not files:
            raise DataError("no image files to predict: " + "; ".join(problems))
        pred = Predictor(args.model)
        if pred.labels is None:
            raise DataError(f"{args.model}: no labels.json found next to the SavedModel.")
        classes = pred.classes
        rows = []
        for f in files:
            try:
                probs = pred.predict(read_image(f))
            except ImageReadError as exc:
                problems.append(str(exc))
                continue
            rows.append({"path": str(f), "label": classes[int(np.argmax(probs))],
                         **{f"prob_{c}": float(v) for c, v in zip(classes, probs)}})
        import pandas as pd

        df = pd.DataFrame(rows, columns=["path", "label"] + [f"prob_{c}" for c in classes])
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        if len(df):
            show = df.copy()
            show["path"] = [Path(x).name for x in show["path"]]
            print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {out} ({len(df)} predictions)")
        if problems:
            print(f"{len(problems)} input(s) skipped:", file=sys.stderr)
            for pr in problems:
                print(f"  - {pr}", file=sys.stderr)
        return 0 if len(df) else 1
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
