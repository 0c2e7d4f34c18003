"""report.html's sections on subgroups (a table per attribute, the gaps, the forest plot) and on the
patient-level figures, from metrics.json's ``subgroups`` and ``patient_level``."""
from __future__ import annotations

import html

import numpy as np

LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "macro_auc": "macro AUC",
          "covid_sensitivity": "{c} sensitivity", "covid_specificity": "{c} specificity", "dice": "Dice"}
FOREST = ("Subgroups: macro-AUC (Dice for segmenters) with 95% intervals; dashed: all scored images; hollow: "
          "fewer than 30 images")


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _cell(e: dict) -> str:
    if e["value"] is None:
        return f'n/a <small title="{html.escape(e["reason"] or "")}">({html.escape(e["reason"] or "")})</small>'
    ci = e.get("ci95")
    return _f(e["value"]) + (f" <small>[{_f(ci['low'])}, {_f(ci['high'])}]</small>" if ci else "")


def _head(sub: dict) -> str:
    c = sub.get("covid_class") or "COVID"
    return "".join(f"<th>{html.escape(LABELS[k].format(c=c))}</th>" for k in sub["metrics"])


def _gap_row(sub: dict, gaps: dict) -> str:
    cells = []
    for k in sub["metrics"]:
        g = gaps[k]
        if g["value"] is None:
            cells.append(f"<td><small>{html.escape(g['reason'])}</small></td>")
            continue
        ci = g["ci95"]
        cells.append(f"<td>{_f(g['value'])}" + (f" <small>[{_f(ci['low'])}, {_f(ci['high'])}]</small>" if ci else "")
                     + f"<br><small>{html.escape(g['high_group'])} &minus; {html.escape(g['low_group'])}"
                     + (" (a small subgroup)" if g["involves_small"] else "") + "</small></td>")
    return f"<tr><th>largest gap</th><td></td>{''.join(cells)}</tr>"


def _attribute(sub: dict, attr: str, a: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(g['value'])}{' <b>(small)</b>' if g['small'] else ''}</td><td>{g['n']}</td>"
                   + "".join(f"<td>{_cell(g['metrics'][k])}</td>" for k in sub["metrics"]) + "</tr>"
                   for g in a["groups"])
    return (f"<h3>By {html.escape(attr)}</h3><table><tr><th>{html.escape(attr)}</th><th>images</th>{_head(sub)}"
            f"</tr>{rows}{_gap_row(sub, a['gaps'])}</table>")


def subgroups(m: dict, forest_img: str = "") -> str:
    sub = m.get("subgroups")
    if not sub:
        return ""
    if not sub["attributes"]:
        return f"<h2>Subgroups</h2><p>{html.escape(sub.get('note', ''))}.</p>"
    ov = sub["overall"]
    overall = (f"<tr><th>all scored images</th><td>{ov['n']}</td>"
               + "".join(f"<td>{_cell(ov['metrics'][k])}</td>" for k in sub["metrics"]) + "</tr>")
    bands = ", ".join(sub["age_bands"]["labels"])
    return (f"<h2>Subgroups</h2><p>Every value of each attribute is a subgroup, 'unknown' included; subgroups of "
            f"fewer than {sub['min_n']} images are shown and marked <b>(small)</b>: their intervals are wide. Age "
            f"bands: {html.escape(bands)}. Macro F1 and macro AUC are over the classes a subgroup has images of. "
            f"Largest gap: between two known subgroups ('unknown' excluded), high minus low, its interval from "
            f"the same bootstrap replicates ({sub['bootstrap']}, stratified by true class within each subgroup)."
            f"</p><table><tr><th></th><th>images</th>{_head(sub)}</tr>{overall}</table>"
            + "".join(_attribute(sub, k, a) for k, a in sub["by_attribute"].items()) + forest_img)


def _ci(f: dict, key: str) -> str:
    c = (f.get("ci95") or {}).get(key)
    return _f(f.get(key)) + (f" <small>[{_f(c['low'])}, {_f(c['high'])}]</small>" if c else "")


def patient_level(m: dict) -> str:
    pl = m.get("patient_level")
    if not pl:
        return ""
    f = pl.get("figures") or {}
    head = (f"<h2>Patient level</h2><p>{pl['n_patients']} patients ({pl['n_images']} images), each scored by the "
            f"{html.escape(pl['aggregation'])}; {pl['mixed_label_patients']} patient(s) whose films have different "
            f"true labels ({pl['mixed_label_images']} images) and {pl['images_without_patient_id']} image(s) "
            f"without a patient ID are left out (patient_predictions.csv lists every patient).</p>")
    if "accuracy" not in f:
        one = f.get("single_class")
        return head + (f"<p>One class only ({html.escape(one['class'])}): sensitivity {_f(one['sensitivity'])}.</p>"
                       if one else f"<p>{html.escape(pl.get('note', ''))}</p>")
    image = m if "accuracy" in m else {}
    rows = [("accuracy", "accuracy"), ("macro F1", "macro_f1"), ("macro ROC-AUC", "macro_auc")]
    body = "".join(f"<tr><th>{n}</th><td>{_ci(image, k) if image else 'n/a'}</td><td>{_ci(f, k)}</td></tr>"
                   for n, k in rows)
    cov = (f.get("ci95") or {}).get("covid_class")
    if cov:
        c, ci = f["per_class"][cov]["sensitivity"], f["ci95"].get("covid_sensitivity")
        img = (m.get("per_class") or {}).get(cov, {}).get("sensitivity")
        body += (f"<tr><th>{html.escape(cov)} sensitivity</th><td>{_f(img)}</td><td>{_f(c)}"
                 + (f" <small>[{_f(ci['low'])}, {_f(ci['high'])}]</small>" if ci else "") + "</td></tr>")
    return head + f"<table><tr><th></th><th>per image</th><th>per patient</th></tr>{body}</table>"


def patient_overlap_note(m: dict) -> str | None:
    """The caveat line when scored images' patients trained the model."""
    po = m.get("patient_overlap") or {}
    return po.get("summary") or None
