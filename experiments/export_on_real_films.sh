#!/usr/bin/env bash
# Issue 20's target: `train` with its default export succeeds on real films (the export check then
# requires identical pixels and equal outputs on them), for a classifier, a U-Net segmenter and a
# multi-task model, at 64 and 128 px, on the TensorFlow and JAX backends.
#   bash experiments/export_on_real_films.sh OUT_DIR [SIZES] [BACKENDS]
# Prints one line per run: backend, task, arch, size, exit code, and the export's check line.
set -u
out=${1:?usage: export_on_real_films.sh OUT_DIR [SIZES] [BACKENDS]}; sizes=${2:-"64 128"}; backends=${3:-"tensorflow jax"}
here=$(cd "$(dirname "$0")/.." && pwd); py=${PYTHON:-$here/.venv/bin/python}
quex="$here/../shared/data/covid-qu-ex-train"; kaggle="$here/../shared/data/cxr-sample"
mkdir -p "$out"
run() {  # backend size name data args...
  local be=$1 size=$2 name=$3 data=$4; shift 4
  local dir="$out/$be-$name-$size"
  KERAS_BACKEND=$be "$py" -m covidcxr.train --data "$data" --image-size "$size" --epochs 2 --fine-tune-epochs 0 \
    --weights none --batch-size 16 --run-dir "$dir/run" --export-dir "$dir/export" "$@" > "$dir.log" 2>&1
  local rc=$?
  echo "$be $name ${size}px exit $rc: $(grep -h -E '^exported|EXPORT FAILED' "$dir.log" | tail -1)"
}
for be in $backends; do
  for size in $sizes; do
    run "$be" "$size" classifier-efficientnetb0 "$quex" --arch efficientnetb0
    run "$be" "$size" segment-unet "$quex" --task segment --target lung --arch unet
    run "$be" "$size" multitask-unet_efficientnetb0 "$quex" --task multitask --arch unet_efficientnetb0
    run "$be" "$size" kaggle-multitask-unet "$kaggle" --task multitask --arch unet
  done
done
