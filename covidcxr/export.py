"""Export a trained classifier for serving: ``python -m covidcxr.export RUN_OR_MODEL --out DIR``.

Writes ``DIR/serving/1/`` (TF SavedModel, servable by TF Serving with
``model_base_path=DIR/serving``), ``DIR/model.keras`` and ``DIR/labels.json``.
The ``serving_default`` signature takes ``image_bytes`` (tf.string [batch],
PNG/JPEG/BMP/GIF of any size, grayscale or RGB), runs the same TF
preprocessing as training, and returns ``probabilities`` and ``label``.
The export is reloaded and checked against the Keras model before it is kept.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from covidcxr.errors import CovidCXRError, DataError, RunExistsError

TOLERANCE = 1e-5


def make_serving_fn(model, labels_doc: dict, segmenter=None):
    """The serving function. Lung-crop classifiers (see covidcxr.lungcrop) crop inside it: with
    their embedded segmenter (``segmenter`` = (model, labels doc)), or, when trained on given
    masks, with a second input ``lung_mask_bytes`` (one mask file per image)."""
    import tensorflow as tf

    from covidcxr import lungcrop
    from covidcxr.data import preprocess as P
    from covidcxr.data.preprocess import serve_image

    size, contrast, norm = labels_doc["image_size"], labels_doc["contrast"], labels_doc["normalization"]
    classes = tf.constant(labels_doc["classes"])
    crop = lungcrop.mode(labels_doc)

    def result(x):
        probs = tf.cast(model(x, training=False), tf.float32)
        return {"probabilities": probs, "label": tf.gather(classes, tf.argmax(probs, axis=-1))}

    if not crop:
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(image_bytes):
            x = tf.map_fn(lambda b: serve_image(b, size, contrast, norm), image_bytes,
                          fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return result(x)

        return serve

    def image01(b):
        return tf.cast(P.prepare(P.decode_bytes(b), size, contrast), tf.float32) / 255.0

    if crop == "given":
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                      tf.TensorSpec([None], tf.string, name="lung_mask_bytes")])
        def serve_given(image_bytes, lung_mask_bytes):
            def one(args):
                b, mb = args
                m = tf.image.resize(P.decode_mask(mb), (size, size), method="nearest")
                return image01(b) * m

            img = tf.map_fn(one, (image_bytes, lung_mask_bytes),
                            fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32))
            return result(P.normalize(img, norm))

        return serve_given

    if segmenter is None:
        raise CovidCXRError("this classifier crops with a lung segmenter, and none was given to the export.")
    seg, sl = segmenter
    ss = sl["image_size"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_model(image_bytes):
        def one(b):
            img = P.decode_bytes(b)
            seg_x = P.normalize(tf.cast(P.prepare(img, ss, sl.get("contrast", "none")), tf.float32) / 255.0,
                                sl["normalization"])
            return tf.cast(P.prepare(img, size, contrast), tf.float32) / 255.0, seg_x

        img, seg_x = tf.map_fn(one, image_bytes, fn_output_signature=(
            tf.TensorSpec([size, size, 1], tf.float32), tf.TensorSpec([ss, ss, 3], tf.float32)))
        mask = lungcrop.mask_from_probs(lungcrop.seg_probs(seg, seg_x), size)
        return result(P.normalize(img * mask, norm))

    return serve_model


def _write_export(model, labels_doc: dict, out_dir: str | Path, overwrite: bool, serving_fn, check_images,
                  difference, home: Path | None = None, extra=None) -> Path:
    """Save model.keras, labels.json and the SavedModel into OUT.partial, reload the SavedModel,
    and keep it (rename to OUT) only if ``difference(signature, image_bytes)`` stays within
    TOLERANCE on every check image."""
    import keras
    import tensorflow as tf

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"export directory {out_dir} already exists; pass --overwrite or another --out.")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save(tmp / "model.keras")
        (tmp / "labels.json").write_text(json.dumps(labels_doc, indent=2))
        if home is not None:
            from covidcxr.lungcrop import copy_segmenter

            copy_segmenter(Path(home), tmp)
        archive = keras.export.ExportArchive()
        archive.track(model)
        if extra is not None:
            archive.track(extra)
        archive.add_endpoint("serving_default", serving_fn)
        archive.write_out(str(tmp / "serving" / "1"), verbose=False)
        # Check: the reloaded SavedModel must reproduce the Keras model on real files.
        fn = tf.saved_model.load(str(tmp / "serving" / "1")).signatures["serving_default"]
        worst = 0.0
        for i, path in enumerate(check_images):
            if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                worst = max(worst, difference(fn, tf.io.read_file(path), i))
        if worst > TOLERANCE:
            raise CovidCXRError(f"exported SavedModel differs from the Keras model by {worst:.2e} (> {TOLERANCE}); "
                                f"export discarded.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def export_classifier(model, labels_doc: dict, out_dir: str | Path, overwrite: bool = False,
                      check_images: list[str] = (), home: str | Path | None = None,
                      check_masks: list[str] | None = None) -> Path:
    """``home``: the run (or export) directory, whence a lung-crop classifier's segmenter comes;
    ``check_masks``: the lung mask of each check image (given-mask lung-crop classifiers)."""
    import keras
    import tensorflow as tf

    from covidcxr import lungcrop
    from covidcxr.data.imageio import read_image

    crop = lungcrop.mode(labels_doc)
    segmenter = lungcrop.find_segmenter(Path(home)) if crop == "model" and home is not None else None
    if crop == "model" and segmenter is None:
        raise CovidCXRError("a lung-crop classifier is exported from its run directory (it holds the segmenter).")
    if crop == "given" and not check_masks:
        check_images = []  # nothing to check against without masks; the signature still takes them
    fn_serve = make_serving_fn(model, labels_doc, segmenter)

    def difference(fn, data, i) -> float:
        if crop == "given":
            mpath = check_masks[i]
            got = fn(image_bytes=tf.reshape(data, [1]),
                     lung_mask_bytes=tf.reshape(tf.io.read_file(mpath), [1]))["probabilities"].numpy()
        else:
            got = fn(image_bytes=tf.reshape(data, [1]))["probabilities"].numpy()
        if crop:
            from covidcxr.data import preprocess as P

            gray = P.decode_bytes(data).numpy()[..., 0]
            x = P.normalize(lungcrop.crop_one(gray, labels_doc, segmenter, check_masks[i] if check_masks else None),
                            labels_doc["normalization"])
        else:
            from covidcxr.data.preprocess import serve_image

            x = serve_image(data, labels_doc["image_size"], labels_doc["contrast"], labels_doc["normalization"])
        ref = keras.ops.convert_to_numpy(model(x[None], training=False))
        return float(np.abs(got - ref).max())

    return _write_export(model, labels_doc, out_dir, overwrite, fn_serve, check_images, difference,
                         home=home if crop == "model" else None, extra=segmenter[0] if segmenter else None)


def make_segment_serving_fn(model, labels_doc: dict):
    """image_bytes [B] -> mask (model resolution), mask_png (PNG at each input's own size),
    height, width, and for multi-task models probabilities and label."""
    import tensorflow as tf

    from covidcxr.data import preprocess as P

    size, contrast, norm = labels_doc["image_size"], labels_doc["contrast"], labels_doc["normalization"]
    classes = tf.constant(labels_doc["classes"])
    multitask = labels_doc.get("task") == "multitask"

    def one(b):
        img = P.decode_bytes(b)
        x = P.normalize(tf.cast(P.prepare(img, size, contrast), tf.float32) / 255.0, norm)
        return x, tf.shape(img)[0], tf.shape(img)[1]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        x, h, w = tf.map_fn(one, image_bytes, fn_output_signature=(
            tf.TensorSpec([size, size, 3], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)))
        out = model(x, training=False)
        mask = tf.cast(out["mask"] if multitask else out, tf.float32)

        def png(args):
            m, hh, ww = args
            full = tf.image.resize(m, tf.stack([hh, ww]), method="bilinear")
            return tf.io.encode_png(tf.cast(full >= 0.5, tf.uint8) * 255)

        pngs = tf.map_fn(png, (mask, h, w), fn_output_signature=tf.TensorSpec([], tf.string))
        res = {"mask": mask[..., 0], "mask_png": pngs, "height": h, "width": w}
        if multitask:
            probs = tf.cast(out["label"], tf.float32)
            res.update(probabilities=probs, label=tf.gather(classes, tf.argmax(probs, axis=-1)))
        return res

    return serve


def export_segmenter(model, labels_doc: dict, out_dir: str | Path, overwrite: bool = False,
                     check_images: list[str] = (), home=None, check_masks=None) -> Path:
    """Like export_classifier, for segment and multitask models; the mask PNG must also come
    back at the input image's own size."""
    import keras
    import tensorflow as tf

    from covidcxr.data import preprocess as P

    def difference(fn, data, i) -> float:
        got = fn(image_bytes=tf.reshape(data, [1]))
        x = P.serve_image(data, labels_doc["image_size"], labels_doc["contrast"], labels_doc["normalization"])
        ref = model(x[None], training=False)
        ref_mask = ref["mask"] if isinstance(ref, dict) else ref
        png = tf.io.decode_png(got["mask_png"][0])
        img = P.decode_bytes(data)
        if tuple(png.shape[:2]) != tuple(img.shape[:2]):
            raise CovidCXRError(f"exported mask is {png.shape[:2]} for a {img.shape[:2]} image; export discarded.")
        return float(np.abs(got["mask"].numpy() - keras.ops.convert_to_numpy(ref_mask)[..., 0]).max())

    return _write_export(model, labels_doc, out_dir, overwrite, make_segment_serving_fn(model, labels_doc),
                         check_images, difference)


def find_model(path: str | Path):
    """A run directory, an export directory or a .keras file -> (keras model, labels doc)."""
    import keras

    import covidcxr.losses  # noqa: F401  (registers the segmentation losses and metrics)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such model file or folder.")
    if path.is_dir():
        for cand in ("best.keras", "model.keras"):
            if (path / cand).exists():
                labels = path / "labels.json"
                if not labels.exists():
                    raise DataError(f"{path}: has {cand} but no labels.json; cannot tell the class names.")
                return keras.saving.load_model(path / cand), json.loads(labels.read_text())
        raise DataError(f"{path}: not a run or export directory (no best.keras or model.keras).")
    labels = path.parent / "labels.json"
    if not labels.exists():
        raise DataError(f"{path}: no labels.json beside it; cannot tell the class names.")
    try:
        model = keras.saving.load_model(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot load this Keras model ({exc})") from exc
    return model, json.loads(labels.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covidcxr.export", description=__doc__)
    p.add_argument("model", help="run directory, export directory or .keras file")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--check", nargs="*", default=[], help="image files to compare Keras and SavedModel on")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        model, labels = find_model(args.model)
        checks = list(args.check)
        if not checks and Path(args.model).is_dir() and (Path(args.model) / "manifest.csv").exists():
            import pandas as pd

            checks = pd.read_csv(Path(args.model) / "manifest.csv")["path"].tolist()[:4]
        export = export_classifier if labels.get("task", "classify") == "classify" else export_segmenter
        home = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
        masks = None
        if labels.get("lung_crop") == "given" and (home / "manifest.csv").exists():
            import pandas as pd

            man = pd.read_csv(home / "manifest.csv", dtype=str, keep_default_na=False).set_index("path")
            masks = [man["lung_mask"].get(c, "") for c in checks]
            checks = [c for c, m in zip(checks, masks) if m]
            masks = [m for m in masks if m]
        out = export(model, labels, args.out, args.overwrite, checks, home=home, check_masks=masks)
        print(f"exported {out} (SavedModel: {out / 'serving' / '1'})")
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
