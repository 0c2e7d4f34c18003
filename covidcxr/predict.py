"""Classify X-ray files: ``python -m covidcxr.predict --model PATH INPUT...``.

PATH is a run directory, an export directory (``model.keras`` + ``labels.json``)
or a SavedModel directory (``serving/1``). INPUTs are files or folders
(PNG, JPEG, BMP, TIFF, DICOM). Writes a CSV (path, label, one probability
column per class) and prints a table. Unreadable files are reported and skipped.
Segmentation and multi-task models also write each predicted mask as a PNG at
the input's own size (``--masks DIR``) and add mask_path and mask_fraction columns.

``--calibrated`` divides the log-probabilities by the temperature that
``python -m covidcxr.evaluate`` fitted on the validation split (``calibration.json``
beside the model, or ``--calibration FILE``). ``--gradcam DIR`` writes a Grad-CAM
overlay per input (Keras models only).
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
        self.segmenter = None
        if self.labels is not None and self.kind == "keras" and self.labels.get("lung_crop") == "model":
            from covidcxr.lungcrop import find_segmenter

            self.segmenter = find_segmenter(path if path.is_dir() else path.parent)

    @property
    def classes(self) -> list[str]:
        return self.labels["classes"]

    @property
    def task(self) -> str:
        return self.labels.get("task", "classify")

    @property
    def needs_lung_masks(self) -> bool:
        return self.labels.get("lung_crop") == "given"

    def outputs(self, gray01: np.ndarray, lung_mask: str | Path | None = None) -> dict:
        """One image [H, W] in [0, 1] -> {"probabilities": [K]} and/or {"mask": [h, w] at model resolution}.
        ``lung_mask``: the image's lung mask file, for classifiers trained on given lung crops."""
        import tensorflow as tf

        from covidcxr.data import preprocess as P
        from covidcxr.lungcrop import crop_one

        if self.needs_lung_masks and not lung_mask:
            raise DataError("this classifier was trained on lung-cropped images (given masks): pass each image's "
                            "lung mask with --lung-masks DIR.")
        if self.kind == "savedmodel":
            feed = {"image_bytes": tf.constant([P.numpy_to_png_bytes(gray01)])}
            if self.needs_lung_masks:
                feed["lung_mask_bytes"] = tf.reshape(tf.io.read_file(str(lung_mask)), [1])
            res = self.fn(**feed)
            out = {k: res[k].numpy()[0] for k in ("probabilities", "mask") if k in res}
        else:
            L = self.labels
            x = P.normalize(tf.constant(crop_one(gray01, L, self.segmenter, lung_mask)), L["normalization"])
            y = self.model(x[None], training=False)
            if isinstance(y, dict):
                out = {"probabilities": np.asarray(y["label"])[0], "mask": np.asarray(y["mask"])[0, ..., 0]}
            elif self.task == "segment":
                out = {"mask": np.asarray(y)[0, ..., 0]}
            else:
                out = {"probabilities": np.asarray(y)[0]}
        return out

    def predict(self, gray01: np.ndarray, lung_mask: str | Path | None = None) -> np.ndarray:
        """Class probabilities of one image [H, W] in [0, 1]."""
        return self.outputs(gray01, lung_mask)["probabilities"]


def _temperature(args, pred) -> float:
    from covidcxr.calibration import load_temperature

    if args.calibration:
        path = Path(args.calibration)
    else:
        home = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
        cands = [home / "calibration.json", home.parent / "calibration.json", home.parent.parent / "calibration.json"]
        path = next((c for c in cands if c.exists()), cands[0])
    if not path.exists():
        raise CovidCXRError(f"--calibrated: {path} not found. Run python -m covidcxr.evaluate on this model first "
                            f"(it fits the temperature on the validation split), or pass --calibration FILE.")
    try:
        t = load_temperature(path)
    except (ValueError, KeyError) as exc:
        raise CovidCXRError(f"--calibrated: {path} is not a calibration file ({exc}).") from exc
    print(f"calibrated: temperature {t:.4f} from {path}")
    return t


def _write_gradcam(cam, pred, gray: np.ndarray, src: Path, out_dir: Path, lung_mask=None) -> Path:
    import tensorflow as tf
    from PIL import Image

    from covidcxr.data import preprocess as P
    from covidcxr.gradcam import overlay
    from covidcxr.lungcrop import crop_one

    L = pred.labels
    x = P.normalize(tf.constant(crop_one(gray, L, pred.segmenter, lung_mask))[None], L.get("normalization", "unit"))
    heat, _ = cam.heatmaps(x)
    dest = _unique(out_dir / f"{src.stem}_gradcam.png")
    Image.fromarray(overlay(gray, heat[0])).save(dest)
    return dest


def _unique(dest: Path) -> Path:
    """``dest``, or ``<stem>_2.png``... when two inputs share a file name."""
    n, first = 1, dest
    while dest.exists():
        n += 1
        dest = first.with_name(f"{first.stem}_{n}{first.suffix}")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covidcxr.predict", description=__doc__)
    p.add_argument("--model", required=True, help="run directory, export directory, .keras file or SavedModel")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
    p.add_argument("--calibrated", action="store_true",
                   help="apply the temperature fitted by covidcxr.evaluate (calibration.json beside the model)")
    p.add_argument("--calibration", default=None, help="calibration.json to use with --calibrated")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write a Grad-CAM overlay PNG per input into DIR")
    p.add_argument("--gradcam-layer", default=None, help="layer inside the backbone (default: its last block)")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="segmentation/multi-task models: folder for the mask PNGs, one per input at its own size "
                        "(default: <CSV name>_masks beside the CSV)")
    p.add_argument("--lung-masks", default=None, metavar="DIR",
                   help="classifiers trained with --lung-crop given: folder of lung masks, one per input with the "
                        "same file name")
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
        classes, task = pred.classes, pred.task
        if task == "segment" and (args.calibrated or args.gradcam):
            raise CovidCXRError("--calibrated and --gradcam apply to classifiers; this is a segmentation model.")
        temperature = _temperature(args, pred) if args.calibrated else None
        mdir = None
        if task != "classify":
            mdir = Path(args.masks) if args.masks else out.with_name(out.stem + "_masks")
            if mdir.exists() and any(mdir.iterdir()) and not args.overwrite:
                raise CovidCXRError(f"mask folder {mdir} already exists; pass --overwrite or another --masks.")
            mdir.mkdir(parents=True, exist_ok=True)
        cam = None
        if args.gradcam:
            if task != "classify":
                raise CovidCXRError("--gradcam draws heatmaps for classifiers; this is a multi-task model.")
            if pred.kind != "keras":
                raise CovidCXRError("--gradcam needs the Keras model: pass the run or export directory, not the "
                                    "bare SavedModel.")
            from covidcxr.gradcam import GradCAM

            cam = GradCAM(pred.model, args.gradcam_layer)
            gdir = Path(args.gradcam)
            if gdir.exists() and any(gdir.iterdir()) and not args.overwrite:
                raise CovidCXRError(f"--gradcam {gdir} already exists; pass --overwrite or another folder.")
            gdir.mkdir(parents=True, exist_ok=True)
        if pred.needs_lung_masks and not args.lung_masks:
            raise CovidCXRError("this classifier was trained on lung-cropped images (--lung-crop given): pass "
                                "--lung-masks DIR with each input's lung mask under the same file name.")
        rows = []
        for f in files:
            lung = None
            if pred.needs_lung_masks:
                lung = next((c for c in (Path(args.lung_masks) / f.name, Path(args.lung_masks) / (f.stem + ".png"))
                             if c.exists()), None)
                if lung is None:
                    problems.append(f"{f}: no lung mask named {f.name} in {args.lung_masks}")
                    continue
            try:
                gray = read_image(f)
                res = pred.outputs(gray, lung)
            except ImageReadError as exc:
                problems.append(str(exc))
                continue
            row = {"path": str(f)}
            if "probabilities" in res:
                probs = res["probabilities"]
                if temperature is not None:
                    from covidcxr.calibration import apply_temperature

                    probs = apply_temperature(probs[None], temperature)[0]
                row.update(label=classes[int(np.argmax(probs))], **{f"prob_{c}": float(v)
                                                                     for c, v in zip(classes, probs)})
            if mdir is not None:
                from covidcxr.masks import save_png, to_size

                mask = to_size(res["mask"], *gray.shape)
                dest = _unique(mdir / f"{f.stem}_mask.png")
                save_png(mask, dest)
                row.update(mask_path=str(dest), mask_fraction=float(mask.mean()), height=gray.shape[0],
                           width=gray.shape[1])
            if cam is not None:
                _write_gradcam(cam, pred, gray, f, Path(args.gradcam), lung)
            rows.append(row)
        import pandas as pd

        cols = ["path"] + (["label"] + [f"prob_{c}" for c in classes] if task != "segment" else []) \
            + (["mask_path", "mask_fraction", "height", "width"] if mdir is not None else [])
        df = pd.DataFrame(rows, columns=cols)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        if len(df):
            show = df.copy()
            show["path"] = [Path(x).name for x in show["path"]]
            print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {out} ({len(df)} predictions)" + (f"; Grad-CAM overlays in {args.gradcam}" if cam else "")
              + (f"; {pred.labels.get('target', 'lung')} masks in {mdir}" if mdir is not None else ""))
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
