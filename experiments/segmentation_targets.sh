#!/usr/bin/env bash
# Issue 5 real-data targets on this CPU (weights none), recorded in benchmarks/RESULTS.md and README.
# Trains on ../shared/data/covid-qu-ex-train (900 real images: 630 train / 135 val / 135 test by our
# seeded split), evaluates on the COVID-QU-Ex validation images of ../shared/data/covid-qu-ex-sample.
#   bash experiments/segmentation_targets.sh [STEP...]   steps: unet arches multitask (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TRAIN=${TRAIN:-../shared/data/covid-qu-ex-train}
EVAL=${EVAL:-../shared/data/covid-qu-ex-sample}
RUNS=${RUNS:-experiments/runs}
STEPS=${*:-unet arches multitask}

train() { $PY -m covidcxr.train --data "$TRAIN" --weights none --image-size 128 --export-dir none "$@"; }
evaluate() { $PY -m covidcxr.evaluate --model "$1" --data "$EVAL" --split val --out "$1/eval-sample-val" \
             --overwrite --gradcam 0 --bootstrap 1000; }

for step in $STEPS; do case $step in
  unet)      # lung U-Net from scratch, 12 epochs
    train --task segment --target lung --arch unet --epochs 12 --fine-tune-epochs 0 --batch-size 16 \
          --run-dir $RUNS/quex-unet-lung-128
    evaluate $RUNS/quex-unet-lung-128 ;;
  arches)    # the three decoder families on one registry encoder, 8 epochs each
    for a in unet_mobilenetv3small unetpp_mobilenetv3small deeplabv3plus_mobilenetv3small; do
      train --task segment --target lung --arch $a --epochs 8 --fine-tune-epochs 0 --batch-size 16 \
            --run-dir $RUNS/quex-$a-lung-128
      evaluate $RUNS/quex-$a-lung-128
    done ;;
  multitask) # same encoder, same budget: multi-task (label + lung mask) against the classifier alone
    train --task multitask --target lung --arch unet_mobilenetv3small --epochs 20 --fine-tune-epochs 0 \
          --run-dir $RUNS/quex-mt-mnv3s-128
    evaluate $RUNS/quex-mt-mnv3s-128
    train --task classify --arch mobilenetv3small --epochs 20 --fine-tune-epochs 0 \
          --run-dir $RUNS/quex-cls-mnv3s-128
    evaluate $RUNS/quex-cls-mnv3s-128 ;;
  *) echo "unknown step $step (unet arches multitask)" >&2; exit 2 ;;
esac; done
