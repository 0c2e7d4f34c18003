"""report.html: every figure, plot and caveat of an evaluation on one self-contained page."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from covidcxr.evaluation import cohort_report

from covidcxr.modelcard import MODEL_CARD, to_html

from covidcxr.evaluation.operating_point import html_section as operating_point_html

SCHEMA = "covidcxr.evaluate/2"
PLOTS = (("probabilities.png", "One class only: its predicted probability and the predicted classes"),
         ("confusion_matrix.png", "Confusion matrix"), ("roc.png", "ROC curves"), ("pr.png", "Precision-recall"),
         ("reliability.png", "Reliability diagram (n per bin at each bar's foot; faint, hatched bars hold few images)"),
         ("training_curves.png", "Training curves"), ("examples.png", "Examples"), ("gradcam.png", "Grad-CAM"),
         ("segmentation.png", "Predicted (red) and true (green) masks"), ("dice_histogram.png", "Dice per image"))
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
img{max-width:100%}figure{margin:1.5em 0}.note{background:#fff3cd;padding:.8em 2em;border:1px solid #e0c36c}
.alarm{background:#f8d7da;color:#58151c;padding:.8em 1.2em;border:2px solid #c0392b;font-size:1.1em;margin:0 0 1em}
pre{background:#f6f6f6;padding:.8em;overflow:auto}"""


def _img(out: Path, name: str, caption: str) -> str:
    p = out / name
    if not p.exists():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _f(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(m: dict, key: str, digits: int = 3) -> str:
    """m[key] with its interval m['ci95'][key], when there is one."""
    c = (m.get("ci95") or {}).get(key)
    return _f(m.get(key), digits) + (f" <small>[{_f(c['low'], digits)}, {_f(c['high'], digits)}]</small>" if c else "")


def _table(rows) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _classification(m: dict) -> str:
    cov = (m.get("ci95") or {}).get("covid_class")
    rows = [("accuracy", _ci(m, "accuracy")), ("macro F1", _ci(m, "macro_f1")), ("macro ROC-AUC", _ci(m, "macro_auc")),
            ("micro ROC-AUC", _f(m.get("micro_auc"))), ("weighted F1", _f(m["weighted_f1"])),
            ("cosine similarity (probabilities vs one-hot)", _f(m["cosine_similarity"])),
            ("ECE (15 bins), uncalibrated", _f(m["ece"])),
            ("ECE after temperature scaling", _f(m["calibration"]["ece_after"]) +
             (f" (T = {m['calibration']['temperature']:.3f}, {html.escape(m['calibration']['note'])})"
              if m["calibration"]["temperature"] else f" ({html.escape(m['calibration']['note'])})"))]
    base = m.get("majority_baseline")
    if base:
        rows.insert(2, (f"majority-class baseline (always predicting {_always(base)}, the most frequent class here): "
                        f"accuracy / macro F1", f"{_f(base['accuracy'])} / {_f(base['macro_f1'])}"))
    if cov:
        c = m["ci95"].get("covid_sensitivity")
        rows.insert(3, (f"{cov} sensitivity", _f(m["per_class"][cov]["sensitivity"]) +
                        (f" <small>[{_f(c['low'])}, {_f(c['high'])}]</small>" if c else "")))
    if m.get("tta"):
        t = m["tta"]
        rows.append(("with test-time augmentation: accuracy / macro F1 / macro AUC",
                     f"{_f(t['accuracy'])} / {_f(t['macro_f1'])} / {_f(t['macro_auc'])}"))
    pc = "".join(f"<tr><td>{html.escape(c)}</td><td>{_f(v['precision'])}</td><td>{_f(v['recall'])}</td>"
                 f"<td>{_f(v['specificity'])}</td><td>{_f(v['f1'])}</td><td>{_f(v['roc_auc'])}</td>"
                 f"<td>{_f(v['average_precision'])}</td><td>{v['support']}</td></tr>" for c, v in m["per_class"].items())
    return (f"<h2>Figures</h2>{_table(rows)}<h2>Per class</h2><table><tr><th>class</th><th>precision</th>"
            f"<th>recall (sensitivity)</th><th>specificity</th><th>F1</th><th>ROC-AUC</th><th>average precision</th>"
            f"<th>support</th></tr>{pc}</table>" + _probe(m.get("mask_lungs")))


def _always(base: dict) -> str:
    """'Normal', or 'COVID' (tied with Normal) when several classes are the most frequent (plain text)."""
    tied = base.get("tied_with") or []
    return f"'{base['class']}'" + (f" (tied with {', '.join(tied)})" if tied else "")


def _probe(ml: dict | None) -> str:
    if not ml:
        return ""
    body = f"<h2>Shortcut probe: lungs blacked out</h2><p>{html.escape(ml['verdict'])}</p>"
    if not ml.get("n"):
        return body
    base = ml.get("majority_baseline")
    rows = "".join(f"<tr><th>{n}</th><td>{_ci(ml[k], 'accuracy')}</td><td>{_f(ml[k]['macro_f1'])}</td>"
                   f"<td>{_ci(ml[k], 'macro_auc')}</td></tr>"
                   for n, k in (("lungs visible", "normal"), ("lungs blacked out", "lungs_masked")))
    if base:
        rows += (f"<tr><th>always {html.escape(_always(base))} (majority-class baseline)</th><td>"
                 f"{_f(base['accuracy'])}</td><td>{_f(base['macro_f1'])}</td><td>0.500 (chance)</td></tr>")
    reps = ml.get("bootstrap_replicates")
    return body + (f"<p>{ml['n']} images with lung masks (classes {html.escape(', '.join(ml['classes_with_masks']))})."
                   + (f" Intervals: {reps} stratified bootstrap replicates (at least {reps} for this probe, whatever "
                      f"--bootstrap says)." if reps else "") + "</p>"
                   "<table><tr><th></th><th>accuracy</th><th>macro F1</th><th>macro AUC</th></tr>" + rows + "</table>")


def _single(m: dict) -> str:
    """A set of one class: what it can say, and what it cannot, with why."""
    one = m["single_class"]
    c, ci, pr = one["class"], one["sensitivity_ci95"], one["probability"]
    q = ", ".join(f"{k} {_f(v)}" for k, v in pr["quantiles"].items())
    rows = [("images scored (all of one class)", f"{one['n']} ({html.escape(c)})"),
            (f"sensitivity of {c} (share predicted {c})", f"{_f(one['sensitivity'])} <small>[{_f(ci['low'])}, "
             f"{_f(ci['high'])}], {ci['method']} 95% interval</small> ({one['correct']} of {one['n']})"),
            (f"predicted probability of {c}", f"mean {_f(pr['mean'])}, sd {_f(pr['std'])}, range {_f(pr['min'])} to "
             f"{_f(pr['max'])}; quantiles {q}")]
    rows += [(f"specificity of {o} (these images are all negatives for it: share not predicted {o})",
              f"{_f(v['specificity'])} ({v['predicted']} predicted {html.escape(o)})")
             for o, v in one["other_classes"].items()]
    if m.get("tta"):
        rows.append((f"with test-time augmentation: sensitivity of {c}",
                     _f((m["tta"]["per_class"].get(c) or {}).get("recall"))))
    counts = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in one["predicted_counts"].items())
    cannot = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}.</li>" for k, v in one["not_computable"].items())
    return (f"<h2>One class only: {html.escape(c)}</h2>{_table(rows)}"
            f"<h3>Predicted class</h3><table>{counts}</table>"
            f"<h3>Cannot be computed on one class</h3><ul>{cannot}</ul>" + _probe(m.get("mask_lungs")))


def _seg_rows(seg: dict) -> str:
    rows = [("all images", seg)] + list((seg.get("per_class") or {}).items())
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v['n']}</td><td>{_ci(v, 'dice')}</td><td>{_ci(v, 'iou')}</td>"
                   f"<td>{_ci(v, 'hd95', 2)}</td><td>{v['hd95_undefined']}</td></tr>" for k, v in rows)


def _seg_model_resolution(seg: dict) -> str:
    at = seg.get("hd95_at_model_resolution")
    if not at:
        return ""
    per = ", ".join(f"{html.escape(c)} {_ci(v, 'hd95', 2)}" for c, v in at["per_class"].items())
    log = at["training_log"][:1].upper() + at["training_log"][1:]
    return (f"<p><b>HD95 at the model's resolution</b> ({html.escape(at['unit'])}): {_ci(at, 'hd95', 2)} "
            f"({at['hd95_undefined']} undefined); per class {per}. {html.escape(log)}</p>")


def _segmentation(seg: dict) -> str:
    if not seg.get("n"):
        return f"<h2>Segmentation</h2><p>{html.escape(seg.get('note', 'no masks scored'))}</p>"
    ci = seg.get("ci95") or {}
    reps = next((c["n"] for c in ci.values() if c), None)
    boot = (f"In brackets: 95% stratified bootstrap percentile intervals, {reps} replicates, resampling the images "
            f"within each class" + (" (one draw for every column and row)." if "hd95" in ci else ".") if reps else
            "No intervals: --bootstrap 0.")
    unit = seg.get("hd95_unit", "px")
    return (f"<h2>Segmentation: {html.escape(seg['target'])} masks</h2><table><tr><th></th><th>images</th>"
            f"<th>Dice</th><th>IoU</th><th>HD95 ({html.escape(unit)})</th><th>HD95 undefined</th></tr>"
            f"{_seg_rows(seg)}</table>{_seg_model_resolution(seg)}"
            f"<p><small>Means over images, scored at {html.escape(seg['scored_at'])}. HD95 is undefined when exactly "
            f"one of truth and prediction is empty; undefined values are left out of its mean and interval. "
            f"{boot}</small></p>")


def _alarm(m: dict) -> str:
    """The warning that must come first: the scored images chose the model's checkpoint."""
    cp = m.get("checkpoint_images")
    return f'<div class="alarm" role="alert"><b>WARNING</b>: {html.escape(cp["warning"])}</div>' if cp else ""


def _caveats(m: dict) -> str:
    top = (m.get("checkpoint_images") or {}).get("warning")
    notes = [w for w in m.get("warnings", []) if w != top]   # that one is in the box at the top
    ov = m.get("train_overlap") or {}
    if ov.get("matched") or ov.get("validation_matched"):
        notes.insert(0, ov["summary"])
    if cohort_report.patient_overlap_note(m):
        notes.insert(0, cohort_report.patient_overlap_note(m))
    if m.get("external"):
        notes.insert(0, f"EXTERNAL validation: the model's classes were mapped onto this data's with "
                        f"{m['label_map']['text']!r}; figures are on the mapped classes {m['classes']}.")
    if (m.get("gradcam") or {}).get("note"):
        notes.append("Grad-CAM: " + m["gradcam"]["note"])
    return f'<ul class="note">{"".join(f"<li>{html.escape(w)}</li>" for w in notes)}</ul>' if notes else ""


def _model_card(out: Path) -> str:
    """MODEL_CARD.md of this evaluation's folder (the model's card with these figures), as HTML."""
    p = out / MODEL_CARD
    return f"<h2>Model card ({MODEL_CARD})</h2><div class=\"card\">{to_html(p.read_text())}</div>" if p.exists() else ""


def json_default(o):
    """numpy scalars and arrays in metrics.json."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def write_metrics(out: Path, m: dict) -> Path:
    (out / "metrics.json").write_text(json.dumps(m, indent=2, default=json_default))
    return out / "metrics.json"


def _intervals(m: dict) -> str:
    """What the intervals on the page are, with the real number of replicates."""
    reps = (m.get("bootstrap") or {}).get("replicates")
    if m.get("single_class"):
        return ("One class only: the sensitivity has a Wilson score 95% interval; no bootstrap intervals"
                + (f" (the shortcut probe uses {m['mask_lungs']['bootstrap_replicates']} replicates)."
                   if (m.get("mask_lungs") or {}).get("bootstrap_replicates") else "."))
    text = (f"Intervals are 95% stratified bootstrap percentile intervals ({reps} replicates)" if reps else
            "No bootstrap intervals were computed (--bootstrap 0)")
    if (m.get("mask_lungs") or {}).get("bootstrap_replicates"):
        text += f"; the shortcut probe uses {m['mask_lungs']['bootstrap_replicates']}"
    return text + "."


def _sections(m: dict) -> str:
    if m.get("single_class"):
        return _single(m) + operating_point_html(m.get("operating_point"))
    return (_classification(m) if "accuracy" in m else "") + operating_point_html(m.get("operating_point"))


def write(out: Path, m: dict) -> Path:
    seg = _segmentation(m["segmentation"]) if m.get("segmentation") else ""
    skipped = "".join(f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in m.get("skipped", [])[:50])
    sel = (m.get("segmentation") or {}).get("overlay_selection")
    captions = {"segmentation.png": f"Predicted (red) and true (green) masks: {sel}"} if sel else {}
    figs = "".join(_img(out, n, captions.get(n, c)) for n, c in PLOTS)
    report = f"<h2>Classification report</h2><pre>{html.escape(m['classification_report'])}</pre>" \
        if "classification_report" in m else ""
    gc = (m.get("gradcam") or {}).get("layer_description")
    alarm = _alarm(m)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{'WARNING: ' if alarm else ''}covidcxr evaluation\
</title><style>{STYLE.replace(chr(10), "")}</style></head><body>
{alarm}<h1>Evaluation{' (external)' if m.get('external') else ''}: {html.escape(Path(m['model']).name)} on split
'{html.escape(m['split'])}', n={m['n']}</h1>
<p class="note"><b>Intended use: research only, not for diagnosis.</b> These figures describe this model on these
images; they do not establish clinical performance. {_intervals(m)}</p>
<p>Model: <code>{html.escape(m['model'])}</code> ({m['model_kind']}, {m['task']}); data: {html.escape(m['data'])};
{m['n']} images scored, {len(m.get('skipped', []))} unreadable and skipped,
{(m.get('train_overlap') or {}).get('excluded', 0)} left out as training overlap.</p>
{_caveats(m)}{_sections(m)}{seg}
{cohort_report.subgroups(m, _img(out, "subgroups.png", cohort_report.FOREST))}{cohort_report.patient_level(m)}
<h2>Plots</h2>{f'<p>Grad-CAM layer: {html.escape(gc)}.</p>' if gc else ''}{figs}
{report}
<h2>Data</h2><pre>{html.escape(json.dumps(m['data_summary'], indent=2))}</pre>
{f'<h3>Skipped files</h3><ul>{skipped}</ul>' if skipped else ''}
<h2>Model configuration</h2><pre>{html.escape(json.dumps(m['model_config'], indent=2))}</pre>
{_model_card(out)}
<p><small>covidcxr, metrics.json schema {SCHEMA}.</small></p></body></html>"""
    (out / "report.html").write_text(doc)
    return out / "report.html"
