"""report.html: every figure, plot and caveat of an evaluation on one self-contained page."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

SCHEMA = "covidcxr.evaluate/2"
PLOTS = (("confusion_matrix.png", "Confusion matrix"), ("roc.png", "ROC curves"), ("pr.png", "Precision-recall"),
         ("reliability.png", "Reliability diagram"), ("training_curves.png", "Training curves"),
         ("examples.png", "Examples"), ("gradcam.png", "Grad-CAM"),
         ("segmentation.png", "Predicted (red) and true (green) masks"))


def _img(out: Path, name: str, caption: str) -> str:
    p = out / name
    if not p.exists():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _f(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(m: dict, key: str) -> str:
    c = (m.get("ci95") or {}).get(key)
    return _f(m.get(key)) + (f" <small>[{_f(c['low'])}, {_f(c['high'])}]</small>" if c else "")


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


def _probe(ml: dict | None) -> str:
    if not ml:
        return ""
    body = f"<h2>Shortcut probe: lungs blacked out</h2><p>{html.escape(ml['verdict'])}</p>"
    if ml.get("n"):
        body += (f"<p>{ml['n']} images with lung masks (classes {html.escape(', '.join(ml['classes_with_masks']))}).</p>"
                 "<table><tr><th></th><th>accuracy</th><th>macro F1</th><th>macro AUC</th></tr>"
                 + "".join(f"<tr><th>{n}</th><td>{_f(ml[k]['accuracy'])}</td><td>{_f(ml[k]['macro_f1'])}</td>"
                           f"<td>{_f(ml[k]['macro_auc'])}</td></tr>"
                           for n, k in (("lungs visible", "normal"), ("lungs blacked out", "lungs_masked"))) + "</table>")
    return body


def _segmentation(seg: dict) -> str:
    if not seg.get("n"):
        return f"<h2>Segmentation</h2><p>{html.escape(seg.get('note', 'no masks scored'))}</p>"
    ci = seg.get("ci95") or {}
    rows = [("all images", seg)] + list((seg.get("per_class") or {}).items())
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v['n']}</td><td>{_f(v['dice'])}</td><td>{_f(v['iou'])}</td>"
                   f"<td>{_f(v['hd95'], 2)}</td><td>{v['hd95_undefined']}</td></tr>" for k, v in rows)
    cis = "; ".join(f"{k} 95% CI [{_f(c['low'])}, {_f(c['high'])}]" for k, c in ci.items() if c)
    return (f"<h2>Segmentation: {html.escape(seg['target'])} masks</h2><table><tr><th></th><th>images</th>"
            f"<th>Dice</th><th>IoU</th><th>HD95 (px)</th><th>HD95 undefined</th></tr>{body}</table>"
            f"<p><small>Means over images, scored at {html.escape(seg['scored_at'])}. HD95 is undefined when exactly "
            f"one of truth and prediction is empty. {html.escape(cis)}</small></p>")


def _caveats(m: dict) -> str:
    notes = list(m.get("warnings", []))
    ov = m.get("train_overlap") or {}
    if ov.get("matched"):
        notes.insert(0, ov["summary"])
    if m.get("external"):
        notes.insert(0, f"EXTERNAL validation: the model's classes were mapped onto this data's with "
                        f"{m['label_map']['text']!r}; figures are on the mapped classes {m['classes']}.")
    if (m.get("gradcam") or {}).get("note"):
        notes.append("Grad-CAM: " + m["gradcam"]["note"])
    return f'<ul class="note">{"".join(f"<li>{html.escape(w)}</li>" for w in notes)}</ul>' if notes else ""


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


def report_skipped(skipped: list[tuple[str, str]], out: Path, log=print) -> None:
    """Every file that could not be read: count and the first few on the console, all in skipped.csv."""
    if not skipped:
        return
    import pandas as pd

    pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(out / "skipped.csv", index=False)
    log(f"WARNING: {len(skipped)} file(s) could not be read and are left out (all in skipped.csv), e.g.:")
    for path, reason in skipped[:5]:
        log(f"  - {path}: {reason}")


def write(out: Path, m: dict) -> Path:
    classification = _classification(m) if "accuracy" in m else ""
    seg = _segmentation(m["segmentation"]) if m.get("segmentation") else ""
    skipped = "".join(f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in m.get("skipped", [])[:50])
    figs = "".join(_img(out, n, c) for n, c in PLOTS)
    report = f"<h2>Classification report</h2><pre>{html.escape(m['classification_report'])}</pre>" \
        if "classification_report" in m else ""
    gc = (m.get("gradcam") or {}).get("layer_description")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>covidcxr evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{max-width:100%}}figure{{margin:1.5em 0}}.note{{background:#fff3cd;padding:.8em 2em;border:1px solid #e0c36c}}
pre{{background:#f6f6f6;padding:.8em;overflow:auto}}</style></head><body>
<h1>Evaluation{' (external)' if m.get('external') else ''}: {html.escape(Path(m['model']).name)} on split
'{html.escape(m['split'])}', n={m['n']}</h1>
<p class="note"><b>Intended use: research only, not for diagnosis.</b> These figures describe this model on these
images; they do not establish clinical performance. Intervals are 95% stratified bootstrap percentile intervals
({(m.get('bootstrap') or {}).get('replicates', 0)} replicates).</p>
<p>Model: <code>{html.escape(m['model'])}</code> ({m['model_kind']}, {m['task']}); data: {html.escape(m['data'])};
{m['n']} images scored, {len(m.get('skipped', []))} unreadable and skipped,
{(m.get('train_overlap') or {}).get('excluded', 0)} left out as training overlap.</p>
{_caveats(m)}{classification}{seg}
<h2>Plots</h2>{f'<p>Grad-CAM layer: {html.escape(gc)}.</p>' if gc else ''}{figs}
{report}
<h2>Data</h2><pre>{html.escape(json.dumps(m['data_summary'], indent=2))}</pre>
{f'<h3>Skipped files</h3><ul>{skipped}</ul>' if skipped else ''}
<h2>Model configuration</h2><pre>{html.escape(json.dumps(m['model_config'], indent=2))}</pre>
<p><small>covidcxr, metrics.json schema {SCHEMA}.</small></p></body></html>"""
    (out / "report.html").write_text(doc)
    return out / "report.html"
