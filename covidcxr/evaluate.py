"""Evaluate a trained model: ``python -m covidcxr.evaluate --model PATH [--data DIR|manifest.csv]``.

PATH is a run directory, an export directory, a ``.keras`` file or a SavedModel directory.
Without ``--data`` (or with the run's own data folder) the run's manifest decides the
images and ``--split auto`` is its held-out split (test, else val). Images that match any
training image of the model (exact or near duplicate), even when they match a validation image
too, are counted, listed (train_overlap.csv) and left out unless ``--include-train-overlap``.
``--label-map`` scores the model on another dataset's classes (external validation). Writes,
into ``--out`` (default ``<model dir>/eval-<split>``):

  metrics.json      every figure, with 95% bootstrap intervals and the majority-class baseline
  predictions.csv   path, true_label, pred_label, prob_<class>..., train_overlap, then the metadata columns
                    the data has (patient_id, study_id, view, sex, age, age_band, site, manufacturer)
  subgroups.png     macro-AUC (Dice for segmenters) with 95% CI per subgroup (--subgroups, --age-bands);
                    metrics.json "subgroups" holds every subgroup's figures and the largest gaps
  patient_predictions.csv  --aggregate patient: one row per patient (mean probability over its films);
                    metrics.json "patient_level"
  patient_overlap.csv  scored images whose patient ID is a training patient's (run manifest's train
                    split); left out like training overlap unless --include-train-overlap
  skipped.csv       files that could not be read, with the reason
  confusion_matrix.png  roc.png  pr.png  reliability.png (n per bin)  examples.png
  probabilities.png (a set of one class: its sensitivity and probability distribution; AUC and
                    the like cannot be computed there, and metrics.json and the report say why)
  gradcam.png + gradcam/<class>/*.png   training_curves.png (run directories)
  segmentation.png + overlays/<class>/*.png (the lowest-Dice images of each class),
  dice_histogram.png, segmentation.csv (every image's Dice, IoU, HD95)   (segmentation and
                    multi-task models; HD95 at the masks' native resolution and at the model's)
  calibration.json  the temperature fitted on the validation split (predict --calibrated)
  operating_point.json  with --operating-point [SPEC]: one class's threshold, chosen on the
                    validation split (the one the temperature is fitted on) and applied unchanged
                    to the scored split: SPEC is CLASS:sensitivity=S (the highest threshold whose
                    validation sensitivity is >= S), CLASS:specificity=S (the lowest whose
                    specificity is >= S), CLASS:youden or CLASS:threshold=T (fixed, any split);
                    bare: COVID:sensitivity=0.95. An image is flagged when p(CLASS) >= T, on the
                    uncalibrated probabilities of predictions.csv. Sensitivity, specificity, PPV,
                    NPV (with CIs) and TP/FN/FP/TN at T, on the scored and validation images, go in
                    metrics.json (operating_point), on roc.png and in the report; the file is also
                    saved beside the model (if absent, or with --overwrite) for export and
                    predict --operating-point. Choosing on the scored images is refused.
  report.html       all of it on one self-contained page; a warning box first when the scored
                    images are the model's validation images (they chose its checkpoint)

The folder is written as ``OUT.partial`` and renamed only when complete.
"""
from __future__ import annotations

import argparse

from covidcxr import cli
with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.evaluator import EvalOptions, Evaluator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="run directory, export directory, .keras file, SavedModel or "
                                    "hf://OWNER/NAME[@REVISION] (an export on the Hugging Face Hub)")
    a("--data", default=None, help="dataset folder or manifest CSV (default: the run's own data, via its manifest)")
    a("--split", default="auto", choices=["auto", "train", "val", "test", "all"],
      help="images to evaluate (auto: the run's or the data's test split, else val; a plain folder: all)")
    a("--label-map", default=None, help="external validation: MODEL_CLASS=DATA_CLASS[+DATA_CLASS],... or a YAML "
                                        "file mapping model classes to data classes")
    a("--operating-point", nargs="?", const="", default=None, metavar="SPEC",
      help="choose a threshold on the validation split: [CLASS:]sensitivity=S | specificity=S | youden | "
           "threshold=T (bare: COVID:sensitivity=0.95)")
    a("--include-train-overlap", action="store_true",
      help="keep images that match a training image of the model (they are counted and listed either way)")
    a("--subgroups", default=None, help="metadata columns to report subgroup figures by, e.g. view,sex,age,site "
                                        "(default: every one with data among the scored images; 'none': off)")
    a("--age-bands", default=None, help="age band edges in years (default 40,60,80: <40, 40-59, 60-79, 80+)")
    a("--aggregate", default="image", choices=["image", "patient"],
      help="patient: also score per patient (mean probability over its films), beside the image-level figures")
    a("--out", default=None, help="output folder (default <model dir>/eval-<split>)")
    a("--bootstrap", type=int, default=1000, help="bootstrap replicates for 95%% CIs (0: none)")
    a("--seed", type=int, default=0, help="bootstrap and example-picking seed")
    a("--tta", action="store_true", help="also report test-time augmentation (4 fixed views)")
    a("--mask-lungs", action="store_true", help="shortcut probe: also evaluate with the lungs blacked out")
    a("--gradcam", type=int, default=4, help="Grad-CAM overlays per class (0: none; classifiers)")
    a("--gradcam-layer", default=None, help="layer inside the backbone (default: its last block)")
    a("--overlays", type=int, default=8, help="segmentation/multi-task: overlay PNGs of predicted vs true masks")
    a("--batch-size", type=int, default=32)
    a("--workers", type=int, default=None, help="image-decoding threads (default: CPU count, at most 8)")
    a("--engine", "--prefer", dest="prefer", default="keras", choices=["keras", "savedmodel", "onnx"],
      help="which model file runs: keras (default), savedmodel, onnx (model.onnx in ONNX Runtime)")
    a("--quiet", action="store_true", help="no progress bar")
    a("--overwrite", action="store_true")
    return p


def run(args) -> int:
    if min(args.bootstrap, args.gradcam, args.overlays) < 0 or args.batch_size < 1:
        raise ConfigError("--bootstrap, --gradcam and --overlays must be 0 or more, --batch-size 1 or more.")
    opts = EvalOptions(**{k: getattr(args, k) for k in EvalOptions.__dataclass_fields__})
    Evaluator(opts, cli.explicit(args.argv, build_parser())).run()
    return 0


main = cli.entry(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
