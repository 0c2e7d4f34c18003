"""The figures of one evaluation as markdown, read defensively from its metrics.json facts: a key
that is missing (an older evaluation, or a figure it did not compute) reads "not reported"."""
from __future__ import annotations

import json
import re

NOT = "not reported"
CI_VALUE = ("value", "estimate", "point", "mean", "gap", "difference")


def slug(heading: str) -> str:
    """GitHub's (and Hugging Face's) anchor of a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading.strip().lower()))


def fmt(v, digits: int = 3) -> str:
    if hasattr(v, "item") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 1) == 0:
        v = v.item()   # a numpy scalar from an evaluation's live metrics
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.{digits}f}"
    return str(v).replace("|", "/").replace("\n", " ")


def is_ci(v) -> bool:
    return isinstance(v, dict) and "low" in v and "high" in v


def cell(v, ci=None) -> str:
    """A figure with its 95% interval: ``0.912 [0.88, 0.94]``; a CI dict may carry its own value."""
    if is_ci(v):
        ci, v = v, next((v[k] for k in CI_VALUE if k in v), None)
    text = fmt(v) if v is not None or not ci else ""
    if is_ci(ci):
        text += f" [{fmt(ci['low'])}, {fmt(ci['high'])}]"
    return text.strip() or "n/a"


def table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def kv_table(d: dict | None, skip=()) -> str:
    """Every scalar or interval of a dict as rows (nested dicts compactly, lists by their length)."""
    if not isinstance(d, dict):
        return NOT + "\n"
    ci95 = d.get("ci95") if isinstance(d.get("ci95"), dict) else {}
    rows = []
    for k, v in d.items():
        if k in skip or k == "ci95":
            continue
        if isinstance(v, (int, float, str, bool)) or v is None or is_ci(v):
            rows.append([fmt(k), cell(v, ci95.get(k) or d.get(f"{k}_ci95"))])
        elif isinstance(v, dict):
            rows.append([fmt(k), fmt(json.dumps(v, default=str))[:300]])
        elif isinstance(v, list) and not k.endswith("_ci95"):
            rows.append([fmt(k), fmt(json.dumps(v, default=str))[:300]])
    return table(["", "value"], rows)


def headline(ev: dict) -> str:
    ci = ev.get("ci95") or {}
    rows = [[name, cell(ev.get(k), ci.get(k))] for name, k in (("accuracy", "accuracy"), ("macro F1", "macro_f1"),
                                                               ("macro ROC-AUC", "macro_auc"))]
    cov = ci.get("covid_class")
    if cov:
        rows.append([f"{cov} sensitivity", cell(((ev.get("per_class") or {}).get(cov) or {}).get("sensitivity"),
                                                ci.get("covid_sensitivity"))])
    base = ev.get("majority_baseline")
    if base:
        rows.append([f"majority-class baseline (always {fmt(base.get('class'))}): accuracy / macro F1",
                     f"{fmt(base.get('accuracy'))} / {fmt(base.get('macro_f1'))}"])
    return table(["figure", "value [95% CI]"], rows)


def per_class(pc: dict | None) -> str:
    if not pc:
        return ""
    rows = [[fmt(c), fmt(v.get("support")), fmt(v.get("sensitivity", v.get("recall"))), fmt(v.get("specificity")),
             fmt(v.get("precision")), fmt(v.get("roc_auc"))] for c, v in pc.items() if isinstance(v, dict)]
    return table(["class", "n", "sensitivity", "specificity", "precision (PPV)", "ROC-AUC"], rows)


def calibration(cal: dict | None) -> str:
    if not cal:
        return NOT + "\n"
    t = cal.get("temperature")
    return (f"ECE (15 bins) {fmt(cal.get('ece_before'))} uncalibrated"
            + (f", {fmt(cal.get('ece_after'))} after temperature scaling at T = {fmt(t)}" if t else "")
            + f" ({fmt(cal.get('note') or cal.get('fitted_on'))}).\n")


def _figure(x) -> str:
    """One ``{"value", "ci95", "reason"}`` entry of ``covidcxr.evaluation.subgroups``."""
    return "n/a" if not isinstance(x, dict) else cell(x.get("value"), x.get("ci95"))


def small_groups(sg) -> dict[str, list[dict]]:
    """Per attribute, its subgroups flagged small (fewer than ``min_n`` images)."""
    by = (sg or {}).get("by_attribute") if isinstance(sg, dict) else None
    return {a: [g for g in v.get("groups", []) if g.get("small")] for a, v in (by or {}).items()}


def subgroups(sg) -> str:
    """metrics.json ``subgroups`` (schema: ``covidcxr.evaluation.subgroups``): per attribute a table of its
    subgroups (n, the small flag, each figure with its interval) and the largest gap of each figure."""
    if not isinstance(sg, dict) or not sg.get("by_attribute"):
        return (sg.get("note") if isinstance(sg, dict) and sg.get("note") else NOT) + "\n"
    names, min_n = sg.get("metrics") or [], sg.get("min_n", 30)
    out = []
    for attr, v in sg["by_attribute"].items():
        rows = [[fmt(g.get("value")), fmt(g.get("n")), "yes" if g.get("small") else ""]
                + [_figure((g.get("metrics") or {}).get(k)) for k in names] for g in v.get("groups", [])]
        out.append(f"**{fmt(attr)}**\n\n" + table(["subgroup", "n", f"small (n < {min_n})"] + [fmt(k) for k in names],
                                                  rows))
        gaps = [f"{fmt(k)}: {fmt(g.get('high_group'))} - {fmt(g.get('low_group'))} = {cell(g['value'], g.get('ci95'))}"
                + (" (involves a small subgroup)" if g.get("involves_small") else "")
                for k, g in (v.get("gaps") or {}).items() if isinstance(g, dict) and g.get("value") is not None]
        if gaps:
            out.append("Largest gap between subgroups: " + "; ".join(gaps) + "\n")
    return "\n".join(out)


def operating_point(op) -> str:
    if not isinstance(op, dict):
        return NOT + "\n"
    head = ", ".join(f"{k} {fmt(op[k])}" for k in ("class", "threshold", "rule", "chosen_on") if k in op)
    ci = op.get("ci95") or {}
    rows = [[k, cell(op[k], ci.get(k))] for k in ("sensitivity", "specificity", "ppv", "npv") if k in op]
    conf = op.get("confusion") or op.get("confusion_matrix")
    return (head + "\n\n" if head else "") + table(["at this threshold", "value [95% CI]"], rows) \
        + (f"\nConfusion: `{json.dumps(conf, default=str)}`\n" if conf is not None else "")


def segmentation(seg: dict | None) -> str:
    if not seg or not seg.get("n"):
        return ""
    ci = seg.get("ci95") or {}
    return table(["masks", "n", "Dice", "IoU", f"HD95 ({fmt(seg.get('hd95_unit', 'px'))})"],
                 [[fmt(seg.get("target")), fmt(seg.get("n")), cell(seg.get("dice"), ci.get("dice")),
                   cell(seg.get("iou"), ci.get("iou")), cell(seg.get("hd95"), ci.get("hd95"))]])


def single_class(one: dict | None) -> str:
    if not one:
        return ""
    return (f"One class only ({fmt(one.get('class'))}, n={fmt(one.get('n'))}): sensitivity "
            f"{cell(one.get('sensitivity'), one.get('sensitivity_ci95'))}; not computable: "
            f"{fmt('; '.join((one.get('not_computable') or {}).keys()))}.\n")
