"""``Evaluator(options).run()``: one forward pass over the chosen images, reused by every figure.

Writes into ``OUT.partial`` and renames to ``OUT`` only when everything is written:
metrics.json, predictions.csv (every scored image, with its training-overlap flag),
skipped.csv, train_overlap.csv, the plots, Grad-CAM and overlay PNGs, calibration.json,
operating_point.json (--operating-point) and report.html.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import artifacts as A
from covidcxr import operating as OP
from covidcxr.calibration import apply_temperature, ece, reliability_bins, save_temperature
from covidcxr.errors import ConfigError, DataError
from covidcxr.evaluation import checks, cohorts, segscore, siteprobe, visuals
from covidcxr.evaluation import data as D
from covidcxr.evaluation import figures as F
from covidcxr.evaluation import patients as PT
from covidcxr.evaluation import operating_point as OPE
from covidcxr.evaluation.passes import forward, subset
from covidcxr.evaluation.report import SCHEMA, write, write_metrics
from covidcxr.inference import ModelFile, Predictor, chosen_file, require_keras
from covidcxr.modelcard import write_evaluation as write_model_card
from covidcxr.plots import plot_confusion, plot_history, plot_pr, plot_reliability, plot_roc, plot_single_class
from covidcxr.tasks import get_task


@dataclass
class EvalOptions:
    model: str
    data: str | None = None
    split: str = "auto"
    out: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    tta: bool = False
    mask_lungs: bool = False
    gradcam: int = 4
    gradcam_layer: str | None = None
    overlays: int = 8
    batch_size: int = 32
    workers: int | None = None
    label_map: str | None = None
    operating_point: str | None = None   # a SPEC (covidcxr/operating.py); '' = the default
    include_train_overlap: bool = False
    overwrite: bool = False
    quiet: bool = False
    prefer: str = "keras"
    subgroups: str | None = None       # None: every metadata column with data; "none": off
    age_bands: str | None = None       # "40,60,80" (the default)
    aggregate: str = "image"           # "patient": patient-level figures too


class Evaluator:
    def __init__(self, opts: EvalOptions, explicit: set[str] = frozenset(), log=print):
        self.o, self.log = opts, log
        self.loc = A.locate(opts.model)
        self.card = self.loc.card
        self.check_flags(explicit)
        self.op_spec, self._val = self._op_spec(), {}
        self.pred = Predictor(self.loc, opts.batch_size, opts.workers, opts.prefer)
        self.warnings: list[str] = []

    @property
    def task(self):
        """The model's ``covidcxr.tasks.Task`` (from its card)."""
        return get_task(self.card.task)

    def check_flags(self, explicit: set[str]) -> None:
        """A flag that does not apply to this model is refused, never ignored."""
        card, o, task = self.card, self.o, self.task
        bad = [f for f, applies in (("tta", task.classifies), ("mask_lungs", task.classifies and card.lung_crop is A.LungCrop.NONE),
                                    ("gradcam", task.only_classifies), ("gradcam_layer", task.only_classifies),
                                    ("label_map", task.classifies), ("overlays", task.segments),
                                    ("operating_point", task.classifies))
               if f in explicit and not applies]
        if bad:
            why = {"mask_lungs": "the lungs-out probe needs a classifier that sees the whole image",
                   "overlays": "mask overlays need a segmentation or multi-task model"}
            raise ConfigError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} do(es) not apply to this "
                              f"{card.task} model ({self.loc.root})" + (f": {why[bad[0]]}" if bad[0] in why else "")
                              + ".")
        require_keras(chosen_file(self.loc, o.prefer), *[f for f, on in (("--tta", o.tta), ("--mask-lungs", o.mask_lungs),
                                                   ("--gradcam", o.gradcam and task.only_classifies
                                                    and "gradcam" in explicit)) if on])

    def _op_spec(self) -> OP.Spec | None:
        """The --operating-point SPEC checked against the model's classes (None without the flag)."""
        if self.o.operating_point is None or not self.task.classifies:
            return None
        if self.o.label_map:
            raise ConfigError("--operating-point is chosen and saved on the model's own classes: evaluate without "
                              "--label-map to set it.")
        return OP.parse_spec(self.o.operating_point, list(self.card.classes))

    # ---------------------------------------------------------------- the run

    def run(self) -> Path:
        t0 = time.perf_counter()
        o = self.o
        ed = D.load(self.loc, o.data, o.split, progress=not o.quiet)
        df, lmap, classes = self._rows(ed)
        if self.op_spec is not None:
            OPE.check_split(self.op_spec, *self._validation_split(ed, lmap), df, ed.split)
        self._plan, self._scores = cohorts.plan(o, self.task, df, f"split '{ed.split}'"), cohorts.Scores()
        out = Path(o.out) if o.out else self.loc.root / f"eval-{ed.split}"
        A.check_free(out, o.overwrite)  # before the long part
        with A.staged(out, o.overwrite) as tmp:
            m = self._evaluate(ed, df, lmap, classes, tmp)
        self._calibration_beside_model(out, m)
        OPE.beside_model(out, self.loc.root, o.overwrite, self.log)
        self.log(f"evaluation written to {out} ({time.perf_counter() - t0:.0f} s); open {out / 'report.html'}")
        return out

    def _rows(self, ed: D.EvalData):
        card = self.card
        if self.task.only_segments:
            col = self.task.mask_column(card.target)
            has = ed.df[col].astype(str) != "" if col in ed.df else pd.Series(False, index=ed.df.index)
            if not has.any():
                raise DataError(f"this {card.target} segmentation model needs {card.target} masks to be scored, and no "
                                f"image of split '{ed.split}' has one ({col} is empty). Use data with such masks.")
            return ed.df[has].reset_index(drop=True), None, list(card.classes)
        if self.o.label_map:
            lmap = D.parse_label_map(self.o.label_map, card.classes, sorted(ed.df_all["label"].unique()))
            self.warnings += lmap.warnings()
            return ed.df.reset_index(drop=True), lmap, lmap.names
        self.warnings += D.check_classes(ed.df, card.classes)
        return ed.df.reset_index(drop=True), None, list(card.classes)

    def _evaluate(self, ed, df, lmap, classes, out: Path) -> dict:
        o, card = self.o, self.card
        self.log(f"evaluating {o.model} ({self.pred.kind}, {card.task}) on {len(df)} images of split '{ed.split}' "
                 f"from {ed.description}" + (" [external: label map]" if lmap else ""))
        full = forward(self.pred, df, fingerprint=True, quiet=o.quiet)
        skipped = list(ed.problems) + full.skipped
        A.report_skipped(out, skipped, self.log)
        p, overlap = self._guard(df, full, out)
        p, patient_overlap = self._patient_guard(df, p, out)
        if not len(p.rows):
            excluded = (overlap or {}).get("excluded", 0) + patient_overlap["excluded"]
            raise DataError(f"none of the {len(df)} images can be scored: {len(full.skipped)} unreadable, {excluded} "
                            f"match images that trained the model"
                            + (" (pass --include-train-overlap to score them anyway, knowing the figures are "
                               "optimistic)" if excluded else "") + ".")
        checkpoint = self._checkpoint_images(ed, df, p, overlap)
        m = {"schema": SCHEMA, "model": str(o.model), "model_kind": self.pred.kind, "task": card.task,
             "data": ed.description, "split": ed.split, "classes": classes, "external": lmap is not None,
             "label_map": None if lmap is None else {"text": lmap.text, "model_groups": lmap.model_groups,
                                                    "data_groups": lmap.data_groups, "absent": lmap.absent},
             "train_overlap": overlap, "checkpoint_images": checkpoint, "skipped": skipped, "warnings": self.warnings,
             "bootstrap": {"replicates": o.bootstrap, "seed": o.seed, "stratified": True} if o.bootstrap else None}
        m["patient_overlap"] = patient_overlap
        context = f"{ed.split} split, n={len(p.rows)}" + (" (external)" if lmap else "")
        if self.task.classifies:
            self._classification(m, ed, df, p, lmap, classes, out, context)
        if self.task.segments:
            self._segmentation(m, df, p, out, context)
        else:
            m["segmentation"] = None
        cohorts.score(self._plan, m, df.iloc[p.rows].reset_index(drop=True), self._scores, classes, o.bootstrap,
                      o.seed, out, context, self.log, self.warnings)
        self._finish(m, ed, df, out)
        return m

    def _checkpoint_images(self, ed: D.EvalData, df: pd.DataFrame, p, overlap: dict) -> dict | None:
        """Scored images that chose the checkpoint: the first warning, on the console and in the report."""
        found = D.checkpoint_images(ed, df.iloc[p.rows], overlap.get("validation_scored", 0), self.o.split)
        if found:
            self.warnings.insert(0, found["warning"])
            self.log("WARNING: " + found["warning"])
        return found

    def _guard(self, df: pd.DataFrame, p, out: Path):
        """Leave out (unless --include-train-overlap) the images that match any training image, exact or
        near duplicate, even when they match a validation image too (the Val copy of a Train film)."""
        ov = D.training_overlap(self.loc.fingerprints_path, p.fingerprints)
        if ov is None:
            self.warnings.append("this model carries no training fingerprints: overlap with its training images was "
                                 "not checked.")
            self._flags = np.full(len(p.rows), "", object)
            return p, {"checked": False, "matched": 0, "excluded": 0}
        self._flags = ov.flags()
        train, val, keep_all = ov.train, ov.val, self.o.include_train_overlap
        if train.any() or val.any():
            ov.table(df["path"].iloc[p.rows].to_numpy()).to_csv(out / "train_overlap.csv", index=False)
        drop = train if not keep_all else np.zeros_like(train)
        summary = ov.summary(keep_all)
        if train.any() or val.any():
            self.log(("WARNING: " if keep_all else "") + summary)
        info = {"checked": True, "matched": int(train.sum()), "validation_matched": int(val.sum()),
                "train_and_validation_matched": int((train & val).sum()),
                "validation_scored": int((val & ~drop).sum()), "excluded": int(drop.sum()),
                "included": bool(keep_all and train.any()), "summary": summary}
        self._flags = self._flags[~drop]
        return subset(p, ~drop), info

    def _patient_guard(self, df: pd.DataFrame, p, out: Path):
        """The same rule for images whose patient trained the model (``patients.guard``), when both sides
        have patient IDs."""
        g = PT.guard(self.loc.manifest_path, df.iloc[p.rows], self.o.include_train_overlap, out)
        if g.info["summary"]:
            self.log(("WARNING: " if g.info["included"] else "") + g.info["summary"])
        self._flags = PT.flags(self._flags, g.hit)[~g.dropped]
        return subset(p, ~g.dropped), g.info

    def _classification(self, m, ed, df, p, lmap, classes, out: Path, context: str) -> None:
        o = self.o
        merge = lmap.probs if lmap else (lambda x: x)
        labels = df["label"].iloc[p.rows]
        y = F.label_index([lmap.data_label(c) for c in labels] if lmap else labels, classes)
        probs = merge(p.probs)
        self._scores.y, self._scores.probs = y, probs
        self._predictions(out, df, p, classes, probs)
        if len(np.unique(y)) == 1:
            self._one_class(m, y, probs, classes, out, context)
            m["operating_point"] = self._operating_point(ed, lmap, y, probs, classes, out)
        else:
            self._figures(m, ed, p, y, probs, lmap, merge, classes, out, context)
        rows = df.iloc[p.rows].reset_index(drop=True)
        m["site_probe"] = siteprobe.probe(self.pred, rows, y, o.seed, o.bootstrap, o.quiet)
        siteprobe.announce(m["site_probe"], self.warnings, self.log)
        m["tta"] = checks.tta(self.pred, df, p.rows, y, classes, merge, o.bootstrap, o.seed, o.quiet) if o.tta else None
        m["mask_lungs"] = (checks.lungs_out(self.pred, df, p.rows, y, probs, classes, merge, o.bootstrap, o.seed,
                                            o.quiet) if o.mask_lungs else None)
        self._say(m)
        visuals.examples(rows, y, probs, classes, out, context, seed=o.seed)
        m["gradcam"] = None
        if o.gradcam and self.task.only_classifies and self.pred.kind is ModelFile.KERAS:
            of = [lmap.names[next(i for i, g in enumerate(lmap.model_groups) if k in g)] for k in
                  range(len(self.card.classes))] if lmap else None
            m["gradcam"] = visuals.gradcam(self.pred, rows, y, p.probs, classes, o.gradcam, o.gradcam_layer, out,
                                           o.seed, context, of)

    def _figures(self, m, ed, p, y, probs, lmap, merge, classes, out: Path, context: str) -> None:
        """Every figure of two or more classes, the temperature fit and the plots."""
        o = self.o
        m.update(F.classification(y, probs, classes, o.bootstrap, o.seed))
        fitted, note = self._temperature(ed, lmap)
        cal = {"bins": 15, "ece_before": m["ece"], "note": note, "temperature": None, "ece_after": None}
        after = None
        if fitted is not None:
            t, n_fit = fitted
            cal_probs = merge(apply_temperature(p.probs, t))
            cal.update(temperature=t, n_fit=n_fit, fitted_on=note, ece_after=ece(y, cal_probs))
            after = reliability_bins(y, cal_probs)
            save_temperature(out / A.CALIBRATION, t, note, n_fit, m["ece"], cal["ece_after"])
        m["calibration"] = cal
        m["operating_point"] = self._operating_point(ed, lmap, y, probs, classes, out)
        plot_reliability(m["reliability"], after, m["ece"], cal["ece_after"], cal["temperature"],
                         out / "reliability.png", context=context)
        plot_confusion(m["confusion_matrix"], classes, out / "confusion_matrix.png", context=context)
        plot_roc(y, probs, classes, out / "roc.png", context=context, point=OPE.roc_point(m["operating_point"]))
        plot_pr(y, probs, classes, out / "pr.png", context=context)

    def _one_class(self, m, y, probs, classes, out: Path, context: str) -> None:
        """Images of one class only (an external set of positives, say): what can be scored, and a
        clear list of what cannot (``figures.single_class``)."""
        one = F.single_class(y, probs, classes)
        m.update(n=one["n"], single_class=one)
        m["calibration"] = {"bins": 15, "ece_before": None, "ece_after": None, "temperature": None,
                            "note": "not fitted: every scored image is of one class"}
        self.warnings.append(f"only one class in the scored images ({one['class']}, n={one['n']}): scored are its "
                             f"sensitivity, the predicted-class counts and the probability distribution; not "
                             f"computable: {'; '.join(one['not_computable'])} (see single_class.not_computable)")
        plot_single_class(one, out / "probabilities.png", context=context)

    def _say(self, m: dict) -> None:
        if "single_class" in m:
            one, ci = m["single_class"], m["single_class"]["sensitivity_ci95"]
            self.log(f"one class only ({one['class']}, n={one['n']}): sensitivity {one['sensitivity']:.4f} "
                     f"[{ci['low']:.3f}, {ci['high']:.3f}], mean p({one['class']}) {one['probability']['mean']:.3f}; "
                     f"predicted: " + ", ".join(f"{k} {v}" for k, v in one["predicted_counts"].items())
                     + "; AUC, specificity and precision of this class cannot be computed (see the report)")
        else:
            cal, auc = m["calibration"], "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
            ci, base = (m.get("ci95") or {}).get("macro_f1"), m["majority_baseline"]
            self.log(f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
                     + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "")
                     + f", macro-AUC {auc}, ECE {m['ece']:.4f}"
                     + (f" -> {cal['ece_after']:.4f} at T={cal['temperature']:.3f}" if cal["temperature"] else "")
                     + f" (majority-class baseline '{base['class']}': accuracy {base['accuracy']:.4f}, macro-F1 "
                       f"{base['macro_f1']:.4f})")
        if m.get("tta"):
            self.log(f"TTA ({len(checks.TTA_VIEWS)} views): accuracy {m['tta']['accuracy']:.4f}, macro-F1 "
                     f"{m['tta']['macro_f1']:.4f}")
        if m.get("mask_lungs"):
            self.log("shortcut probe: " + m["mask_lungs"]["verdict"])

    def _predictions(self, out: Path, df, p, classes, probs) -> None:
        pred = pd.DataFrame({"path": df["path"].iloc[p.rows].to_numpy(), "true_label": df["label"].iloc[p.rows].to_numpy(),
                             "pred_label": [classes[i] for i in probs.argmax(axis=1)]})
        for i, c in enumerate(classes):
            pred[f"prob_{c}"] = probs[:, i]
        pred["train_overlap"] = self._flags
        pred = cohorts.with_metadata(pred, df.iloc[p.rows], self._plan)
        pred.to_csv(out / "predictions.csv", index=False, float_format="%.17g")

    def _temperature(self, ed: D.EvalData, lmap):
        """Fit on the data's validation split (model classes), else on the run's own."""
        val, note = self._validation_split(ed, lmap)
        if val is None:
            return None, note
        return checks.fit_temperature(self.pred, val, self.card.classes, note, self.o.quiet, keep=self._val)

    def _validation_split(self, ed: D.EvalData, lmap) -> tuple[pd.DataFrame | None, str]:
        """The validation rows (the data's val split, else the run's) and where they come from."""
        if ed.has_split and lmap is None and (ed.df_all["split"] == "val").any():
            val = ed.df_all[ed.df_all["split"] == "val"].reset_index(drop=True)
            note = "validation split of the data" + (" (the evaluated split itself: the calibrated ECE is optimistic)"
                                                     if ed.split == "val" else "")
        elif self.loc.manifest_path is not None:
            man = pd.read_csv(self.loc.manifest_path, dtype=str, keep_default_na=False)
            val = man[man["split"] == "val"].reset_index(drop=True)
            note = f"validation split of the run ({self.loc.manifest_path})"
        else:
            return None, "no validation split in the data or the run: temperature not fitted"
        return val, note

    def _operating_point(self, ed, lmap, y, probs, classes, out: Path) -> dict | None:
        """--operating-point on ``probs``: chosen on the temperature fit's validation pass (or its own)."""
        if self.op_spec is None:
            return None
        if self.op_spec.chosen and not self._val:
            val, note = self._validation_split(ed, lmap)
            self._val.update(OPE.validation_scores(self.pred, val, self.card.classes, note, self.o.quiet))
        op = OPE.operating_point(self.op_spec, classes, y, probs, self._val or None, self.o.bootstrap, self.o.seed)
        OP.save(out / A.OPERATING_POINT, op)
        self.log(OPE.console_line(op))
        return op

    def _segmentation(self, m: dict, df, p, out: Path, context: str) -> None:
        target = self.card.target or "lung"
        rows, kept = df.iloc[p.rows].reset_index(drop=True), {}
        seg = segscore.score(rows, self.task.mask_column(target), p.masks, target, self.o.bootstrap, self.o.seed, self.o.overlays,
                             out, context, self.warnings, kept)
        self._scores.dice_rows, self._scores.dice = kept.get("rows", []), kept.get("dice", [])
        m["segmentation"] = seg
        if "n" not in m:
            m["n"] = int(len(p.rows))
        if seg["n"]:
            self.log(segscore.console_line(seg))

    def _finish(self, m: dict, ed, df, out: Path) -> None:
        if self.loc.run_dir is not None and (self.loc.run_dir / A.HISTORY).exists():
            plot_history(self.loc.run_dir / A.HISTORY, out / "training_curves.png")
        m["data_summary"] = D.data_summary(ed.df_all, df, ed.has_split, m["skipped"])
        m["model_config"] = {"card": self.card.__dict__, "train_config": self.loc.config}
        write_metrics(out, m)
        write_model_card(self.loc.root, out, m, self.task)   # the model's card + this evaluation, here only
        write(out, m)

    def _calibration_beside_model(self, out: Path, m: dict) -> None:
        t = (m.get("calibration") or {}).get("temperature")
        if t is None or not self.loc.root.is_dir():
            return
        dest = self.loc.root / A.CALIBRATION
        if not dest.exists() or self.o.overwrite:
            shutil.copy(out / A.CALIBRATION, dest)
            self.log(f"temperature {t:.4f} saved to {dest} (predict --calibrated uses it)")
        else:
            self.log(f"note: {dest} exists; kept it (pass --overwrite to replace it with this fit)")
