"""``python -m covidcxr.data {synth,index,audit,download}``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from covidcxr import cli
from covidcxr.data.audit import audit, format_audit
from covidcxr.data.download import download
from covidcxr.data.manifest import build_manifest, class_split_table, write_manifest
from covidcxr.data.metadata import coverage, format_coverage, format_crossing_patient
from covidcxr.data.splits import parse_fractions
from covidcxr.data.synth import write_synthetic_dataset
from covidcxr.errors import CovidCXRError


def _cmd_synth(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CovidCXRError(f"{out} exists and is not empty; pass --overwrite or choose another folder.")
    write_synthetic_dataset(out, args.per_class, args.size, args.seed, progress=not args.quiet)
    print(f"wrote {args.per_class * 4} synthetic images with lung masks to {out} (Kaggle layout)")
    return 0


def _print_index(df, report) -> None:
    """What index found: layout, split, class table, duplicates, metadata, crossing groups/patients."""
    print(f"layout: {report.layout} ({report.root})")
    print(f"split: {report.split_source}")
    print(class_split_table(df))
    d = report.dedup
    print(f"duplicate groups: {len(d.duplicate_groups)} ({sum(len(m) for m in d.duplicate_groups.values())} images; "
          f"{d.exact_pairs} exact, {d.near_pairs} near, {d.mirrored_pairs} mirrored pairs)")
    for line in report.metadata.lines():
        print(line)
    if report.metadata.source != "none" or (df["patient_id"] != "").any():
        for line in format_coverage(coverage(df)):
            print(line)
        print(f"split groups: {report.split_groups} (duplicates and patients joined; a group never straddles "
              f"a split of ours)")
    if report.crossing_groups:
        print(f"WARNING: {len(report.crossing_groups)} duplicate groups cross the dataset's own splits:")
        for g in report.crossing_groups[:10]:
            print("  - " + " | ".join(f"{df['split'][i]}: {df['path'][i]}" for i in g))
    if report.crossing_patients:
        print(f"WARNING: {len(report.crossing_patients)} patients cross the dataset's own splits:")
        for p in report.crossing_patients[:10]:
            print("  - " + format_crossing_patient(p))
        if len(report.crossing_patients) > 10:
            print(f"  ... {len(report.crossing_patients) - 10} more (all in 'audit --json')")


def _cmd_index(args) -> int:
    fractions = parse_fractions(args.split)
    out = Path(args.out) if args.out else Path("manifest.csv")
    data = Path(args.data).resolve()
    if data.is_dir() and (out.resolve() == data or data in out.resolve().parents):
        raise CovidCXRError(f"--out {out}: inside the data folder {args.data}; index never writes into a dataset. "
                            f"Choose a path outside it (default: manifest.csv in the current folder).")
    if out.exists() and not args.overwrite:
        raise CovidCXRError(f"{out} already exists; pass --overwrite or choose another --out.")
    df, report = build_manifest(args.data, fractions, args.seed, args.workers, not args.quiet,
                                metadata=args.metadata, metadata_columns=args.metadata_columns)
    _print_index(df, report)
    if report.problems:
        print(f"{len(report.problems)} problem file(s), left out:", file=sys.stderr)
        for p in report.problems:
            print(f"  - {p}", file=sys.stderr)
        if args.strict:
            print("error: --strict and problem files were found; fix or remove them.", file=sys.stderr)
            return 1
    if args.strict and (report.crossing_groups or report.crossing_patients):
        print("error: --strict and duplicate groups or patients cross splits.", file=sys.stderr)
        return 1
    write_manifest(df, out, overwrite=args.overwrite)
    print(f"wrote {out} ({len(df)} images)")
    return 0


def _cmd_audit(args) -> int:
    a = audit(args.source, parse_fractions(args.split), args.seed, args.workers, not args.quiet)
    print(format_audit(a))
    if args.json:
        Path(args.json).write_text(json.dumps(a, indent=2))
        print(f"wrote {args.json}")
    if args.strict and (a["crossing_groups"] or a["crossing_patients"]):
        print(f"error: {len(a['crossing_groups'])} duplicate groups and {len(a['crossing_patients'])} patients "
              f"cross splits (--strict).", file=sys.stderr)
        return 1
    return 0


def _cmd_download(args) -> int:
    out = download(args.dataset, args.out, args.overwrite)
    print(f"downloaded {args.dataset} to {out}; next: {shlex.join(['python', '-m', 'covidcxr.data', 'index', str(out)])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic CXR-like dataset (Kaggle layout, lung masks)")
    s.add_argument("out", help="output folder")
    s.add_argument("--per-class", type=int, default=60, help="images per class (default 60)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_synth)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--split", default=None,
                        help="train,val[,test] fractions when the data has no split of its own "
                             "(default 0.7,0.15,0.15)")
    common.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    common.add_argument("--workers", type=int, default=None, help="parallel readers (default: CPU count)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("index", parents=[common], help="check every file and write the manifest CSV")
    s.add_argument("data", help="dataset folder (Kaggle, COVID-QU-Ex or folder-per-class layout)")
    s.add_argument("--out", default=None, help="manifest path (default: manifest.csv in the current folder; never "
                                               "inside the data folder)")
    s.add_argument("--strict", action="store_true", help="fail on any problem file, crossing group or patient")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--metadata", default=None, metavar="META.csv",
                   help="per-image table (patient, study, view, sex, age, site, manufacturer) joined by file "
                        "name or path relative to DATA; without it, DICOM files' own tags are read")
    s.add_argument("--metadata-columns", default=None, metavar="KEY=COL,...",
                   help="name the table's columns, e.g. patient='Patient ID',view=ViewPosition,file='Image Index' "
                        "(keys: file, patient, study, view, sex, age, site, manufacturer; others are detected)")
    s.set_defaults(func=_cmd_index)

    s = sub.add_parser("audit", parents=[common], help="balance, sizes, masks, duplicates, leakage")
    s.add_argument("source", help="dataset folder or manifest CSV")
    s.add_argument("--json", default=None, help="also write the audit as JSON")
    s.add_argument("--strict", action="store_true", help="exit 1 if a duplicate group or a patient crosses splits")
    s.set_defaults(func=_cmd_audit)

    s = sub.add_parser("download", help="download a dataset with kagglehub")
    s.add_argument("--dataset", required=True, choices=["covid19-radiography", "covid-qu-ex"])
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_download)
    return p


def run(args) -> int:
    return args.func(args)


main = cli.entry(build_parser, run, keras_needed=False)


if __name__ == "__main__":
    raise SystemExit(main())
