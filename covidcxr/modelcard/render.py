"""MODEL_CARD.md from the facts (``facts.gather``): Hugging Face model-card format, YAML front matter
then fixed sections, every number taken from the facts."""
from __future__ import annotations

import json

import yaml

from covidcxr.modelcard import checklist
from covidcxr.modelcard import results as R
from covidcxr.modelcard.facts import SMALL
from covidcxr.modelcard.results import NOT, fmt, slug, table

INTENDED = "research use only; not a medical device"
TITLES = {"model": "Model", "intended-use": "Intended use", "training-data": "Training data",
          "preprocessing": "Preprocessing", "training": "Training", "results": "Results", "probes": "Probes",
          "known-limitations": "Known limitations",
          "reporting-checklist": "Reporting checklist"}
CLS_METRICS = ("accuracy", "f1", "roc_auc")


def front_matter(f: dict) -> str:
    card, cfg, data = f.get("model") or {}, f.get("config") or {}, f.get("data") or {}
    task, heads = card.get("task", "?"), f.get("heads") or {"classifies": True, "segments": bool(card.get("target"))}
    metrics = (list(CLS_METRICS) + ["ece"] if heads["classifies"] else []) \
        + (["dice", "iou", "hd95"] if heads["segments"] else [])
    src = data.get("source")
    doc = {"library_name": "keras", "license": cfg.get("license") or "other",
           "tags": ["chest-x-ray", "covid-19", task] + ([card["arch"]] if card.get("arch") else []) + ["covidcxr"],
           "datasets": [str(src).rstrip("/").split("/")[-1]] if src else [],
           "metrics": metrics,
           "pipeline_tag": "image-classification" if heads["classifies"] else "image-segmentation"}
    return "---\n" + yaml.safe_dump(doc, sort_keys=False) + "---\n"


def model_section(f: dict) -> str:
    card = f.get("model") or {}
    rows = [["task", fmt(card.get("task")) + (f" ({card['target']})" if card.get("target") else "")],
            ["classes (output order)", ", ".join(card.get("classes") or []) or NOT],
            ["architecture", fmt(card.get("arch"))],
            ["initial weights", fmt(((f.get("training") or {}).get("settings") or {}).get("weights", NOT))],
            ["Keras backend it was trained on", fmt(card.get("backend") or NOT)],
            ["software", f"covidcxr {fmt(f.get('covidcxr'))} (Keras 3); code: the covidcxr repository"],
            ["written from", f"`{fmt(f.get('source'))}`"]]
    if f.get("export"):
        rows.append(["export", f"`{fmt(f['export'].get('folder'))}`; check: {fmt(f['export'].get('check'))}"])
    return "## Model\n\n" + table(["", ""], rows)


def intended_use(f: dict) -> str:
    return ("## Intended use\n\n"
            f"**{INTENDED}.** For research on chest X-ray classification and segmentation; not for diagnosis, "
            "triage or any clinical decision. The figures below describe this model on the images named; they do "
            "not establish clinical performance on other data.\n")


def _counts_table(counts: dict) -> str:
    splits = [s for s in ("train", "val", "test", "unused") if any(s in v for v in counts.values())]
    splits += sorted({s for v in counts.values() for s in v} - set(splits))
    rows = [[c] + [str(v.get(s, 0)) for s in splits] + [str(sum(v.values()))] for c, v in counts.items()]
    rows.append(["**all**"] + [str(sum(v.get(s, 0) for v in counts.values())) for s in splits]
                + [str(sum(sum(v.values()) for v in counts.values()))])
    return table(["class"] + splits + ["all"], rows)


def _split_text(sp: dict) -> str:
    text = (f"Stratified group split {fmt(sp.get('fractions'))} (train, val, test), seed {fmt(sp.get('seed'))}; "
            f"a group never spans two splits.")
    if "duplicate_groups" in sp:
        text += (f" Groups: exact and near duplicates ({sp['duplicate_groups']} groups of 2+ images, "
                 f"{sp['images_in_duplicate_groups']} images; {sp['duplicate_groups_crossing_splits']} cross a split)")
    if sp.get("patients"):
        text += (f" and patients ({sp['patients']} patients over {sp['images_with_patient_id']} images with a "
                 f"patient ID; {sp['patients_crossing_splits']} patients cross a split).")
    else:
        text += ". Patients: not recorded (no patient IDs in the manifest), so films of one patient may sit in two splits."
    if sp.get("label_fraction") not in (None, 1, 1.0):
        text += f" Label fraction {fmt(sp['label_fraction'])}: the rest of the training split is marked 'unused'."
    return text + "\n"


def _left_out(data: dict) -> str:
    lo = data.get("left_out")
    if lo is None:
        return "Left out: not recorded (the folder has no skipped.csv, which lists the files left out when there are any).\n"
    reasons = "; ".join(f"{k} ({v})" for k, v in lo["reasons"].items())
    return f"Left out: {lo['n']} files (skipped.csv), because: {reasons}.\n"


def _characteristics(meta: dict) -> str:
    parts = [f"{k}: " + ", ".join(f"{a} {b}" for a, b in v.items()) for k, v in meta.items()
             if k not in ("columns", "age") and isinstance(v, dict)]
    age = meta.get("age")
    if age:
        parts.append(f"age: {age['known']} known" + (f", median {fmt(age['median'], 1)} (range {fmt(age['min'], 0)}"
                                                     f" to {fmt(age['max'], 0)})" if age.get("known") else "")
                     + f", {age['unknown']} unknown")
    return ("Characteristics: " + "; ".join(parts) + ".\n") if parts else \
        "Characteristics (view, sex, age, site): not recorded in the manifest.\n"


def training_data(f: dict) -> str:
    data = f.get("data")
    if not data:
        return "## Training data\n\nnot reported (no manifest.csv where this card was written).\n"
    return ("## Training data\n\n"
            f"Source: `{fmt(data.get('source') or NOT)}`; {data['images']} images in the run's manifest.\n\n"
            + _counts_table(data["counts"]) + "\n" + _split_text(data.get("split") or {}) + "\n" + _left_out(data)
            + "\n" + _characteristics(data.get("metadata") or {}))


def preprocessing(f: dict) -> str:
    card = f.get("model")
    if not card:
        return "## Preprocessing\n\nnot reported (no model_card.json).\n"
    crop = {"": "none", "given": "the image times its given lung mask", "model": "the image times the lung mask an "
            "embedded lung segmenter predicts"}.get(card.get("lung_crop", ""), card.get("lung_crop"))
    aug = ((f.get("training") or {}).get("settings") or {}).get("augment")
    rows = [["input", f"uint8-range grayscale {card.get('image_size')} x {card.get('image_size')} "
                      f"(`{fmt(card.get('input_format'))}`), exact antialiased bilinear resize"],
            ["contrast", fmt(card.get("contrast"))], ["normalisation (inside the model)", fmt(card.get("normalization"))],
            ["lung crop", fmt(crop)], ["training augmentation", fmt(json.dumps(aug)) if aug else NOT]]
    return "## Preprocessing\n\n" + table(["", ""], rows)


def training(f: dict) -> str:
    t = f.get("training")
    if not t:
        return "## Training\n\nnot reported (no config.json).\n"
    s = t.get("settings") or {}
    rows = [[k, fmt(json.dumps(v) if isinstance(v, (dict, list)) else f"{v:g}" if isinstance(v, float) else v)]
            for k, v in s.items() if k != "augment"]
    best = t.get("best_epoch") or {}
    rows += [["epochs run", fmt(t.get("epochs_run"))],
             ["final model", f"the checkpoint of epoch {fmt(best.get('epoch'))} (0-based, as in history.csv; best {fmt(s.get('monitor'))} = "
                             f"{fmt(best.get('value'))})" if best else NOT]]
    return "## Training\n\n" + table(["setting", "value"], rows)


def _internal(f: dict) -> str:
    inner = f.get("internal")
    if not inner:
        return "### Held-out splits at training\n\nnot reported.\n"
    rows = [[s, fmt(m.get("n")), fmt(m.get("accuracy")), fmt(m.get("macro_f1")), fmt(m.get("macro_auc"))]
            for s, m in inner.items()]
    return ("### Held-out splits at training\n\nWritten by training, without intervals (an evaluation adds them).\n\n"
            + table(["split", "n", "accuracy", "macro F1", "macro ROC-AUC"], rows))


def eval_title(i: int, ev: dict) -> str:
    kind = "external" if ev.get("external") else "internal"
    return f"Evaluation {i} ({kind}): split {ev.get('split', '?')}, n={ev.get('n', '?')}"


def evaluation(i: int, ev: dict) -> str:
    out = [f"### {eval_title(i, ev)}\n", f"Data: `{fmt(ev.get('data'))}`; model `{fmt(ev.get('model'))}` "
           f"({fmt(ev.get('model_kind'))}); {fmt(ev.get('skipped_n', 0))} files unreadable; "
           f"{fmt((ev.get('train_overlap') or {}).get('excluded', 0))} left out as training overlap.\n"]
    if ev.get("external"):
        out.append(f"External validation with the label map `{fmt((ev.get('label_map') or {}).get('text'))}`; "
                   f"figures on the mapped classes {fmt(', '.join(ev.get('classes') or []))}.\n")
    b = ev.get("bootstrap")
    out.append(f"Intervals: 95% stratified bootstrap, {b['replicates']} replicates, seed {b['seed']}.\n" if b else
               "Intervals: none (--bootstrap 0), except where a probe draws its own.\n")
    if "accuracy" in ev:
        out += [R.headline(ev), R.per_class(ev.get("per_class")), "**Calibration**: " + R.calibration(ev.get("calibration"))]
    out += [x for x in (R.single_class(ev.get("single_class")), R.segmentation(ev.get("segmentation"))) if x]
    out += ["**Subgroups**\n\n" + R.subgroups(ev.get("subgroups")),
            "**Operating point**\n\n" + R.operating_point(ev.get("operating_point")),
            "**Patient level**\n\n" + R.kv_table(ev.get("patient_level")),
            "**Patient overlap with training**\n\n" + R.kv_table(ev.get("patient_overlap"))]
    figs = ev.get("figure_files") or []
    if figs and ev.get("local"):
        out.append("**Figures**\n\n" + "\n".join(f"![{n}]({n})" for n in figs) + "\n")
    return "\n".join(out)


def results(f: dict) -> str:
    evs = f.get("evaluations") or []
    body = "\n".join(evaluation(i + 1, e) for i, e in enumerate(evs)) if evs else \
        ("### Evaluations\n\nnot reported: run `python -m covidcxr.evaluate --model FOLDER` for figures with 95% "
         "intervals, subgroups, an operating point and calibration.\n")
    return "## Results\n\n" + _internal(f) + "\n" + body


def _probe_rows(i: int, ev: dict) -> list[list[str]]:
    ml, sp = ev.get("mask_lungs"), ev.get("site_probe")
    lungs = ml.get("verdict") if ml else "not run (evaluate --mask-lungs)"
    if sp is None:
        site = "not run: the scored data has no site column"
    elif not sp.get("ran"):
        site = f"skipped: {sp.get('reason')}"
    else:
        site = (f"{sp.get('verdict')} n={sp.get('n')}, sites {', '.join(sp.get('sites') or [])}; "
                f"{sp.get('method')}; warning when the AUC interval is above {sp['thresholds']['auc_ci_low_above']} "
                f"and Cramér's V >= {sp['thresholds']['cramers_v_at_least']} with p < "
                f"{sp['thresholds']['p_value_below']}")
    return [[f"[{i}](#{slug(eval_title(i, ev))})", "lungs blacked out (`--mask-lungs`)", fmt(lungs)],
            [f"[{i}](#{slug(eval_title(i, ev))})", "site from penultimate features", fmt(site)]]


def probes(f: dict) -> str:
    evs = f.get("evaluations") or []
    if not evs:
        return "## Probes\n\nnot reported: the shortcut probes run in `python -m covidcxr.evaluate`.\n"
    rows = [r for i, e in enumerate(evs) for r in _probe_rows(i + 1, e)]
    return "## Probes\n\n" + table(["evaluation", "probe", "verdict"], rows)


def _data_limits(data: dict | None) -> list[str]:
    if not data:
        return ["the training data are not recorded where this card was written"]
    out, train = [], {c: v.get("train", 0) for c, v in data["counts"].items()}
    out += [f"few training images of {c} ({n} < {SMALL})" for c, n in train.items() if n < SMALL]
    if not any("test" in v for v in data["counts"].values()):
        out.append("no test split: the held-out figures come from the validation split that chose the checkpoint")
    sp = data.get("split") or {}
    if not sp.get("patients"):
        out.append("no patient IDs: films of one patient may sit in both training and test")
    elif sp.get("patients_crossing_splits"):
        out.append(f"{sp['patients_crossing_splits']} patients have films in more than one split")
    if sp.get("duplicate_groups_crossing_splits"):
        out.append(f"{sp['duplicate_groups_crossing_splits']} duplicate groups cross a split (the dataset's own split)")
    if "synthetic" in str(data.get("source")):
        out.append("trained on synthetic images: no figure here says anything about real radiographs")
    return out


def _eval_limits(i: int, ev: dict) -> list[str]:
    out = [f"evaluation {i}: {w}" for w in ev.get("warnings") or []]
    for attr, small in R.small_groups(ev.get("subgroups")).items():
        if small:
            out.append(f"evaluation {i}: small {attr} subgroups (n < {SMALL}): " + ", ".join(
                f"{fmt(g.get('value'))} (n={fmt(g.get('n'))})" for g in small))
    ov = ev.get("train_overlap") or {}
    if ov.get("included"):
        out.append(f"evaluation {i}: the figures include {ov.get('matched')} images that trained the model "
                   f"(--include-train-overlap): optimistic")
    if ev.get("single_class"):
        out.append(f"evaluation {i}: one class only, so AUC and specificity cannot be computed")
    if (ev.get("patient_overlap") or {}).get("n") or (ev.get("patient_overlap") or {}).get("matched"):
        out.append(f"evaluation {i}: scored images whose patient is in the training set (see patient overlap)")
    return out


def limitations(f: dict) -> str:
    items = _data_limits(f.get("data"))
    if not f.get("evaluations"):
        items.append("not evaluated with intervals: only the training-time held-out figures are reported")
    items += [x for i, e in enumerate(f.get("evaluations") or []) for x in _eval_limits(i + 1, e)]
    seen = list(dict.fromkeys(items))
    return "## Known limitations\n\n" + "\n".join(f"- {fmt(x)}" for x in seen) + "\n"


def render(f: dict) -> str:
    card = f.get("model") or {}
    head = (f"# {card.get('arch', 'model')} ({card.get('task', '?')}): covidcxr model card\n\n"
            f"*{INTENDED.capitalize()}.* Written by covidcxr from the files of `{fmt(f.get('source'))}`; every "
            f"number below is read from them.\n")
    body = [head, model_section(f), intended_use(f), training_data(f), preprocessing(f), training(f), results(f),
            probes(f), limitations(f),
            "## Reporting checklist\n\nTRIPOD+AI (2024) and CLAIM (2024) items this toolkit can answer, by topic.\n\n"
            + checklist.render(f, TITLES)]
    return front_matter(f) + "\n" + "\n".join(body)
