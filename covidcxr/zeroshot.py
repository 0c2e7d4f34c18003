"""Zero-shot chest-X-ray classification and text-prompted segmentation with foundation models.

Classify (no training; each class is described by text prompts)::

  python -m covidcxr.zeroshot [--model clip] --preset CLIP --data DIR|manifest.csv [--split S]
                              [--prompts FILE] [--logit-scale 100]
  python -m covidcxr.zeroshot --model medsiglip --preset SIGLIP --data DIR|manifest.csv [--prompts FILE]

  clip:      softmax(logit_scale * cos(image, class)) (CLIP's contrastive softmax; --logit-scale).
  medsiglip: sigmoid(scale * cos + bias) with the model's own learned scale and bias: an independent
             score per class (predictions.csv: score_<class>); the scores are renormalised per
             image to probabilities (prob_<class>) for the metrics, which is our choice, not SigLIP's.
  Each class gets a chest-X-ray prompt ensemble (built in for the Kaggle and COVID-QU-Ex class
  names); --prompts FILE (JSON/YAML {class: [prompt, ...]}) replaces them. Writes metrics.json,
  predictions.csv, skipped.csv, confusion_matrix.png, roc.png, pr.png, reliability.png,
  examples.png and report.html, as covidcxr.evaluate does.

Segment (a mask from a text prompt)::

  python -m covidcxr.zeroshot --task segment [--model medsiglip] --preset SIGLIP --sam SAM
                              --prompt lungs|opacity|"free text" [--prompt-file FILE] --data DIR [--target T]

  Per image: MedSigLIP's patch-text similarity map for the prompt -> a box and points -> SAM ->
  a mask, written at the image's own size as masks/<class>/<name>.png. Prompt names: 'lungs',
  'opacity' (built-in phrasings) or a name from --prompt-file ({name: [prompt, ...]}); any other
  text is used as it is. Scored against ground truth where the data has it: --target lung uses the
  lung_mask column, --target infection the infection_mask column. Default: 'lungs' -> lung,
  'opacity' -> infection; other prompts -> infection if they name an opacity, consolidation,
  ground-glass, infiltrate, lesion, pneumonia, COVID or infection, else lung if they name the
  lungs, else not scored (--target none: never scored). Dice, IoU and HD95 at each truth mask's own resolution,
  segmentation.png (prediction red, truth green), predictions.csv (per image), metrics.json and
  report.html.

Output: --out (default experiments/zeroshot/<preset name>-<split>, segmentation
<preset name>-segment-<prompt>-<split>), written as OUT.partial and renamed when complete; an
existing folder is kept unless --overwrite. Presets: a keras-hub preset name (downloaded) or a
local folder holding the backbone and its tokenizer (save_to_preset of both); a SigLIP preset
with --model clip, or a CLIP preset with --model medsiglip, is refused.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from covidcxr import cli

with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    import numpy as np
    import pandas as pd
    from covidcxr.artifacts import report_skipped, staged
    from covidcxr.data.imageio import read_mask
    from covidcxr.data.preprocess import mask_from_probs
    from covidcxr.errors import ConfigError, DataError
    from covidcxr.evaluation.data import check_classes
    from covidcxr.evaluation.report import SCHEMA
    from covidcxr.masks import save_png
    from covidcxr.vlm import clip as C
    from covidcxr.vlm import prompted as P
    from covidcxr.vlm import inputs as VI
    from covidcxr.vlm import outputs as VO
    from covidcxr.vlm import siglip as S
    from covidcxr.vlm.clip import DEFAULT_LOGIT_SCALE, default_prompts, load_clip, text_embeddings
    from covidcxr.vlm.prompted import read_prompt_file
    from covidcxr.vlm.inputs import decoded_batches
    from covidcxr.vlm.outputs import SegScores
    from covidcxr.vlm.siglip import check_prompts

# Re-exported: covidcxr.vlm.siglip.cxr_prompts imports default_prompts from here, and older callers
# use zeroshot.load_clip / zeroshot.text_embeddings (CLIP).
__all__ = ["build_parser", "classify", "default_prompts", "load_clip", "main", "run", "segment", "text_embeddings"]

CLASSIFY_ONLY = ("prompts", "logit_scale")
SEGMENT_ONLY = ("prompt", "prompt_file", "sam", "target", "threshold", "top_k", "negatives", "overlays")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", dest="mode", default="classify", choices=["classify", "segment"])  # a zero-shot mode, not a Task
    a("--model", default=None, choices=["clip", "medsiglip"],
      help="model family of --preset (default: clip to classify, medsiglip to segment)")
    a("--preset", required=True, help="keras-hub preset name or local preset folder (backbone + tokenizer)")
    a("--data", required=True, help="dataset folder or manifest CSV")
    a("--split", default="auto", choices=["auto", "train", "val", "test", "all"],
      help="images to score (auto: the data's test split, else val; a plain folder: all)")
    a("--out", default=None, help="output folder (default experiments/zeroshot/<preset name>-<split>)")
    a("--prompts", default=None, help="classify: JSON/YAML {class: [prompt, ...]} (default: built-in CXR prompts)")
    a("--logit-scale", type=float, default=DEFAULT_LOGIT_SCALE,
      help="classify, clip: inverse temperature of the softmax (default 100)")
    a("--prompt", default=None, help="segment: lungs, opacity, a name from --prompt-file, or free text")
    a("--prompt-file", default=None, help="segment: JSON/YAML {name: [prompt, ...]} adding to/overriding the sets")
    a("--sam", default=None, help="segment: keras-hub SAM preset name (e.g. sam_base_sa1b) or local preset folder")
    a("--target", default=None, choices=["lung", "infection", "none"],
      help="segment: which ground-truth masks to score against (default: from the prompt)")
    a("--threshold", type=float, default=0.5, help="segment: box = map cells >= this fraction of the map's range")
    a("--top-k", type=int, default=3, help="segment: positive points (best map cells)")
    a("--negatives", type=int, default=0, help="segment: negative points (worst map cells)")
    a("--overlays", type=int, default=8, help="segment: images shown in segmentation.png")
    a("--batch-size", type=int, default=8)
    a("--workers", type=int, default=None, help="image-decoding threads (default: CPU count, at most 8)")
    a("--bootstrap", type=int, default=1000, help="bootstrap replicates for 95%% CIs (0: none)")
    a("--seed", type=int, default=0)
    a("--quiet", action="store_true", help="no progress bar")
    a("--overwrite", action="store_true")
    return p


def check_flags(a, explicit: set[str]) -> None:
    """Refuse, never ignore, a flag that does not apply to this task or model."""
    if a.mode == "classify":
        if a.prompt is not None:
            raise ConfigError(f"--prompt {a.prompt!r} is for --task segment (a text-prompted mask); to classify with "
                              f"prompts of your own pass --prompts FILE ({{class: [prompt, ...]}}).")
        bad = [f for f in SEGMENT_ONLY if f in explicit]
        if a.model == "medsiglip" and "logit_scale" in explicit:
            raise ConfigError("--logit-scale is for --model clip: MedSigLIP scores with its own learned scale and "
                              "bias.")
    else:
        if a.model == "clip":
            said = f"--prompt {a.prompt!r}: " if a.prompt else ""
            raise ConfigError(f"{said}--model clip is a classification-only model: CLIP has no image-text patch "
                              f"features to place a prompt; use --model medsiglip --preset SIGLIP (both towers) with "
                              f"--sam SAM.")
        if not a.prompt or not a.sam:
            raise ConfigError("--task segment needs --prompt (lungs, opacity, a name from --prompt-file, or free text) "
                              "and --sam (a SAM preset name or folder).")
        bad = [f for f in CLASSIFY_ONLY if f in explicit]
    if bad:
        raise ConfigError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} do(es) not apply to --task {a.mode}.")
    if a.logit_scale <= 0 or a.batch_size < 1 or min(a.bootstrap, a.overlays, a.negatives) < 0 or a.top_k < 1:
        raise ConfigError("--logit-scale must be positive, --batch-size and --top-k 1 or more, --bootstrap, "
                          "--overlays and --negatives 0 or more.")


def _out(a, split: str) -> Path:
    if a.out:
        return Path(a.out)
    name = Path(str(a.preset).rstrip("/")).name
    if a.mode == "segment":
        name += "-segment-" + (re.sub(r"[^A-Za-z0-9]+", "-", a.prompt).strip("-")[:40] or "prompt")
    return Path("experiments") / "zeroshot" / f"{name}-{split}"


def _base_metrics(a, rows, skipped: list, warnings: list, kind: str) -> dict:
    return {"schema": SCHEMA, "model": str(a.preset), "model_kind": kind, "task": a.mode, "data": rows.description,
            "split": rows.split, "classes": rows.classes, "external": False, "label_map": None,
            "train_overlap": None, "skipped": skipped, "warnings": warnings, "tta": None, "mask_lungs": None,
            "gradcam": None, "segmentation": None}


# ---------------------------------------------------------------- classify


def _class_prompts(a, classes: list[str]) -> dict[str, list[str]]:
    if not a.prompts:
        return default_prompts(classes)
    return check_prompts(read_prompt_file(a.prompts), classes, f"--prompts {a.prompts}")


def _embed(a, backbone, tokenizer, prompts, df, failed: list):
    """(kept row indices, probabilities [n, K], raw sigmoid scores [n, K] or None, scoring description)."""
    lib = C if a.model == "clip" else S
    txt = lib.text_embeddings(backbone, tokenizer, prompts)
    keys, embs = [], []
    for k, x, _ in decoded_batches(df["path"].tolist(), lib.image_size_of(backbone), a.batch_size, failed,
                                   a.quiet, a.workers):
        keys += k
        embs.append(lib.image_embeddings(backbone, x, a.batch_size))
    if not keys:
        return keys, None, None, None
    img = np.concatenate(embs)
    if a.model == "clip":
        return keys, C.softmax_probs(img, txt, a.logit_scale), None, \
            {"rule": "softmax(logit_scale * cosine)", "logit_scale": a.logit_scale}
    scale, bias = S.logit_params(backbone)
    scores = S.sigmoid_scores(img, txt, scale, bias)
    return keys, S.scores_to_probabilities(scores), scores, \
        {"rule": "sigmoid(scale * cosine + bias), renormalised per image for the metrics", "logit_scale": scale,
         "logit_bias": bias}


def classify(a) -> Path:
    t0 = time.perf_counter()
    VI.check_family(a.preset, a.model)  # reads config.json only: before indexing the data
    rows = VI.load_rows(a.data, a.split, a.quiet)
    prompts = _class_prompts(a, rows.classes)
    out = _out(a, rows.split)
    VI.check_out(out, a.overwrite)
    backbone, tok = load_clip(a.preset) if a.model == "clip" else S.load_siglip(a.preset)
    kind = "zero-shot CLIP" if a.model == "clip" else "zero-shot MedSigLIP (SigLIP sigmoid scores)"
    print(f"{kind}: {a.preset} on {len(rows.df)} images of split '{rows.split}' from {rows.description}")
    with staged(out, a.overwrite) as tmp:
        failed: list = []
        keys, probs, scores, scoring = _embed(a, backbone, tok, prompts, rows.df, failed)
        skipped = rows.problems + failed
        if not keys:
            raise VI.nothing_readable(len(rows.df), failed)
        report_skipped(tmp, skipped)
        m = _base_metrics(a, rows, skipped, check_classes(rows.df, rows.classes), kind)
        m.update(prompts=prompts, scoring=scoring,
                 model_config={"model": a.model, "preset": str(a.preset), "image_size": S.image_size_of(backbone),
                               "prompt_ensembling": "mean of L2-normalised prompt embeddings", **scoring})
        VO.write_classification(tmp, m, rows.df.iloc[keys].reset_index(drop=True), probs, scores, a.bootstrap,
                               a.seed)
        VO.finish(tmp, m, rows)
    auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
    print(f"zero-shot on {m['n']} images: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, macro-AUC "
          f"{auc}; written to {out} ({time.perf_counter() - t0:.0f} s); open {out / 'report.html'}")
    return out


# ---------------------------------------------------------------- segment


def _segment_batch(a, backbone, txt, sam, x):
    """SAM masks ``[n, S, S]`` bool and boxes ``[n, 4]`` (S frame) for one batch."""
    sim = np.einsum("bhwd,d->bhw", P.patch_embeddings(backbone, x, a.batch_size), txt)
    boxes, points, labels = P.prompts_from_map(sim, x.shape[1], a.threshold, a.top_k, a.negatives)
    return P.sam_segment(sam, x, boxes, points, labels, a.batch_size), boxes


class _MaskWriter:
    """Writes each mask at its image's own size (masks/<class>/<name>.png) and scores it at its truth's own size."""

    def __init__(self, out: Path, col: str | None):
        self.out, self.col, self.scores = out, col, SegScores()
        self.names: set[str] = set()
        self.table: list[dict] = []
        self.warnings: list[str] = []

    def _name(self, row) -> str:
        stem, n = Path(row["path"]).stem, 0
        name = f"masks/{row['label']}/{stem}.png"
        while name in self.names:  # two images with one name in a class (other folders)
            n += 1
            name = f"masks/{row['label']}/{stem}-{n}.png"
        self.names.add(name)
        return name

    def write(self, mask_s: np.ndarray, box, hw, row) -> np.ndarray:
        """The mask at the image's size (bool [h, w]); its table row (and scores) appended."""
        (h, w), s = hw, mask_s.shape[0]
        full = mask_from_probs(mask_s.astype(np.float32), h, w)
        name = self._name(row)
        (self.out / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(full, self.out / name)
        rec = {"path": row["path"], "label": row["label"], "mask": name, "height": h, "width": w,
               "mask_fraction": float(full.mean()), "box_x0": box[0] * w / s, "box_y0": box[1] * h / s,
               "box_x1": box[2] * w / s, "box_y1": box[3] * h / s}
        self.table.append(rec)
        truth_path = str(row[self.col]) if self.col and self.col in row else ""
        if truth_path:
            try:
                truth = read_mask(truth_path)
            except Exception as exc:
                self.warnings.append(f"mask left out: {exc}")
                return full
            pred = full if truth.shape == full.shape else mask_from_probs(mask_s.astype(np.float32), *truth.shape)
            rec["dice"], rec["iou"], rec["hd95"] = self.scores.add(truth, pred, row["label"])
        return full


def _seg_summary(a, w: _MaskWriter, target: str | None) -> dict:
    if not w.scores.rows:
        why = (f"no {target} masks ({w.col}) in the segmented images" if target else
               f"prompt {a.prompt!r} names no lung or infection target; pass --target lung|infection to score it")
        w.warnings.append(f"not scored: {why}")
        return {"n": 0, "target": target, "note": why}
    seg = w.scores.summary(a.bootstrap, a.seed)
    seg.update(target=target, truth_column=w.col, images_segmented=len(w.table), scored_at=(
        "each ground-truth mask's own resolution (SAM's mask at its input size, resized bilinearly and "
        "thresholded at 0.5); HD95 in those pixels"))
    return seg


def _segment_all(a, rows, backbone, txt, sam, size: int, w: _MaskWriter) -> tuple[list, dict, dict]:
    """Every image through map -> prompts -> SAM -> mask; (unreadable, overlay masks, overlay Dice) by row."""
    df = rows.df
    truth = df[w.col].astype(str).ne("").to_numpy() if w.col and w.col in df else np.zeros(len(df), bool)
    picks = VO.overlay_picks(df, truth if truth.any() else np.ones(len(df), bool), a.overlays, a.seed)
    failed, shown, dice = [], {}, {}
    for keys, x, hws in VI.decoded_batches(df["path"].tolist(), size, a.batch_size, failed, a.quiet, a.workers,
                                          "segmenting"):
        masks, boxes = _segment_batch(a, backbone, txt, sam, x)
        for j, k in enumerate(keys):
            full = w.write(masks[j], boxes[j], hws[j], df.iloc[k])
            if k in picks:
                shown[k] = full
                if "dice" in w.table[-1]:
                    dice[k] = w.table[-1]["dice"]
    return failed, shown, dice


def _prompt_sets(path: str | None) -> dict[str, list[str]] | None:
    """``--prompt-file``: {name: [prompt, ...]} adding to / overriding ``prompted.SEG_PROMPTS``."""
    if not path:
        return None
    try:
        return read_prompt_file(path)
    except DataError as exc:  # read_prompt_file names the classification flag
        raise DataError(str(exc).replace("--prompts", "--prompt-file", 1)) from exc


def segment(a) -> Path:
    t0 = time.perf_counter()
    VI.check_family(a.preset, "medsiglip")  # config.json only: before indexing the data
    P.check_sam(a.sam)
    phrasings = P.resolve_prompt(a.prompt, _prompt_sets(a.prompt_file))
    target = VO.seg_target(a.prompt, phrasings, a.target)
    rows = VI.load_rows(a.data, a.split, a.quiet)
    out = _out(a, rows.split)
    VI.check_out(out, a.overwrite)
    sam, size = P.load_sam(a.sam)
    backbone, tok = S.load_siglip(a.preset)
    P.check_segmentation_prompt(backbone, a.prompt)
    col = f"{target}_mask" if target else None
    print(f"segmenting {len(rows.df)} images of split '{rows.split}' from {rows.description}: prompt {a.prompt!r} "
          f"({len(phrasings)} phrasing(s)), scored against {col or 'nothing'}")
    with staged(out, a.overwrite) as tmp:
        w = _MaskWriter(tmp, col)
        txt = S.text_embeddings(backbone, tok, {"prompt": phrasings})[0]
        failed, shown, dice = _segment_all(a, rows, backbone, txt, sam, size, w)
        skipped = rows.problems + failed
        if not w.table:
            raise VI.nothing_readable(len(rows.df), failed)
        report_skipped(tmp, skipped)
        pd.DataFrame(w.table).to_csv(tmp / "predictions.csv", index=False, float_format="%.17g")
        m = _base_metrics(a, rows, skipped, w.warnings, "zero-shot text-prompted segmentation (MedSigLIP + SAM)")
        m.update(n=len(w.table), prompt={"text": a.prompt, "phrasings": phrasings, "target": target},
                 segmentation=_seg_summary(a, w, target),
                 bootstrap={"replicates": a.bootstrap, "seed": a.seed, "stratified": True} if a.bootstrap else None,
                 model_config={"model": "medsiglip", "preset": str(a.preset), "sam": str(a.sam), "working_size": size,
                               "threshold": a.threshold, "top_k": a.top_k, "negatives": a.negatives})
        VO.overlay_grid(rows.df, shown, col, dice, tmp, f"{a.prompt}: prediction red, ground truth green",
                       f"{rows.split} split, n={len(w.table)}")
        VO.finish(tmp, m, rows)
    seg = m["segmentation"]
    print(f"{len(w.table)} masks written to {out / 'masks'}" + (
        f"; {seg['target']} masks (n={seg['n']}): Dice {seg['dice']:.4f}, IoU {seg['iou']:.4f}" if seg["n"] else
        f"; not scored ({seg['note']})") + f" ({time.perf_counter() - t0:.0f} s); open {out / 'report.html'}")
    return out


def run(args) -> int:
    args.model = args.model or ("clip" if args.mode == "classify" else "medsiglip")
    check_flags(args, cli.explicit(args.argv, build_parser()))
    {"classify": classify, "segment": segment}[args.mode](args)
    return 0


main = cli.entry(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
