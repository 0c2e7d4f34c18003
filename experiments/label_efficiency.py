"""Label-efficiency curve: validation macro-F1 against the number of training labels used.

    python experiments/label_efficiency.py --arch dinov2_small --preset PATH_OR_NAME --freeze-encoder \
        --data ../shared/data/covid-qu-ex-train --fractions 0.05,0.1,0.25,1.0 --seeds 0,1,2 --out experiments/runs/le

Runs ``python -m covidcxr.train --label-fraction F --seed S`` for every fraction and seed (each
in its own run directory under --out), then writes ``results.csv`` (fraction, seed, training
images, val and test macro-F1 and macro-AUC, wall seconds) and ``label_efficiency.png`` (mean and spread over seeds).
Arguments after ``--`` go to covidcxr.train unchanged (e.g. ``-- --image-size 128 --epochs 5``).
A run directory that already holds a finished run is reused, so an interrupted curve resumes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", default="0.05,0.1,0.25,1.0")
    p.add_argument("--seeds", default="0")
    p.add_argument("--preset", default=None)
    p.add_argument("--weights", default="none")
    p.add_argument("--freeze-encoder", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in [float(x) for x in a.fractions.split(",")]:
        for s in [int(x) for x in a.seeds.split(",")]:
            run = out / f"frac{f:g}-seed{s}"
            state = run / "state.json"
            if not (state.exists() and json.loads(state.read_text()).get("finished")):
                cmd = [sys.executable, "-m", "covidcxr.train", "--arch", a.arch, "--data", a.data,
                       "--label-fraction", str(f), "--seed", str(s), "--run-dir", str(run), "--export-dir", "none",
                       "--overwrite"] + (["--preset", a.preset] if a.preset else ["--weights", a.weights]) \
                    + (["--freeze-encoder"] if a.freeze_encoder else []) + extra
                print(shlex.join(cmd), flush=True)
                t0 = time.perf_counter()
                rc = subprocess.call(cmd)
                (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
                if rc:
                    print(f"run {run} failed; stopping", file=sys.stderr)
                    return 1
            metrics = json.loads((run / "metrics.json").read_text())
            m, t = metrics["val"], metrics.get("test", {})
            man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
            wall = run / "wall_seconds.txt"
            rows.append({"fraction": f, "seed": s, "train_images": int((man["split"] == "train").sum()),
                         "val_macro_f1": m["macro_f1"], "val_macro_auc": m["macro_auc"],
                         "test_macro_f1": t.get("macro_f1"), "test_macro_auc": t.get("macro_auc"),
                         "wall_seconds": float(wall.read_text()) if wall.exists() else None})
    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    g = df.groupby("fraction").agg(n=("train_images", "mean"), f1=("val_macro_f1", "mean"),
                                   lo=("val_macro_f1", "min"), hi=("val_macro_f1", "max"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(g["n"], g["f1"], yerr=[g["f1"] - g["lo"], g["hi"] - g["f1"]], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("training images with labels")
    ax.set_ylabel("validation macro-F1")
    ax.set_title(f"{a.arch}{' (linear probe)' if a.freeze_encoder else ''}: label efficiency", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png", dpi=110)
    print(g.to_string())
    # Mean and sample standard deviation over seeds: validation picked the checkpoint, so the
    # test split is the unbiased figure.
    cols = ["val_macro_f1", "test_macro_f1", "wall_seconds"]
    print(df.groupby("fraction")[cols].agg(["mean", "std"]).round(4).to_string())
    print(f"wrote {out / 'results.csv'} and {out / 'label_efficiency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
