#!/usr/bin/env bash
# Issue 6 target: fine-tuning from our own SimCLR weights against training from scratch at 10% of the
# labels, 3 seeds, the same CPU budget for the whole pipeline. Recorded in benchmarks/RESULTS.md.
#   bash experiments/ssl_vs_scratch.sh [STEP...]   steps: manifest pretrain ssl scratch probe (default: all)
# One manifest (split seed 42) fixes train/val/test for every run; SimCLR sees its training rows only
# (labels ignored); each seed then draws its own stratified 10% of the training labels, the same draw for
# both arms. The scratch arm gets as many epochs as the SSL arm's pretraining + fine-tuning take.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/covid-qu-ex-train}
OUT=${OUT:-experiments/runs/ssl}
ARCH=${ARCH:-mobilenetv3small}
SEEDS=${SEEDS:-0,1,2}
STEPS=${*:-manifest pretrain ssl scratch probe}
W=$OUT/simclr-$ARCH-128.weights.h5
curve() { $PY experiments/label_efficiency.py --arch $ARCH --data $OUT/manifest.csv "$@"; }

for step in $STEPS; do case $step in
  manifest) $PY -m covidcxr.data index "$DATA" --out $OUT/manifest.csv --quiet --overwrite ;;
  pretrain) # about 5 minutes on 2 CPU cores
    $PY -m covidcxr.pretrain --method simclr --arch $ARCH --data $OUT/manifest.csv --image-size 128 \
        --epochs 30 --batch-size 64 --out $W --overwrite ;;
  ssl)      # linear probe first (40 epochs), then the whole encoder at lr/10 (30 epochs)
    curve --fractions 0.1 --seeds $SEEDS --weights $W --out $OUT/simclr-lpft -- \
          --image-size 128 --epochs 40 --fine-tune-epochs 30 --patience 15 ;;
  scratch)  # 110 epochs, no early stop: at least the SSL arm's pretraining + fine-tuning time
    curve --fractions 0.1 --seeds $SEEDS --weights none --out $OUT/scratch-equal-cpu -- \
          --image-size 128 --epochs 110 --fine-tune-epochs 0 --patience 110 ;;
  probe)    # linear-probe label-efficiency curve of the SimCLR encoder
    curve --fractions 0.05,0.1,0.25,1.0 --seeds 0 --weights $W --freeze-encoder \
          --out $OUT/simclr-probe-curve -- --image-size 128 --epochs 40 --patience 15 ;;
  *) echo "unknown step $step (manifest pretrain ssl scratch probe)" >&2; exit 2 ;;
esac; done
