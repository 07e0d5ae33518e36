#!/usr/bin/env bash
# Train the four compared models side by side for a fixed time: single-task,
# sequential, static-weighted MTL with alpha 0.4 and uncertainty-weighted MTL.
# Then evaluate each on held-out phantom seeds twice: with the argmax rule, and
# with the lesion threshold that `cacs-node calibrate` chose on the validation seeds.
#
# Made for one GPU machine and one command of at most 10 minutes: the four
# runs share the GPU and the CPU cores. Each run stops after the first epoch
# that ends TRAIN_MINUTES after its first epoch began. So the runs get equal
# time rather than equal steps, and train.log gives the steps each one reached.
#
# Settings (environment): OUT, the folder for the results (default
# work-area/gpu-comparison); TRAIN_MINUTES (default 7); DEVICE (default cuda);
# TRAIN_SEEDS (default 0-39); VALIDATION_SEEDS (default 1000-1003);
# TEST_SEEDS (default 2000-2019); STEPS_PER_EPOCH (default 200); THREADS,
# CPU threads per run (default 4); PYTHON (default python3).
#
# Where the machine lacks the project's pure-Python dependencies (pydicom and
# the pylibjpeg decoders), put their wheels in .whl: they are installed into
# /tmp/site first.
#
# Results in OUT (at most 8 files): one calibrated model per run (weights,
# metadata and lesion threshold, no optimiser state), compare.json and
# compare.txt from `cacs-node evaluate`, and train.log with the four
# training logs and calibration tables. Where calibration keeps the argmax
# rule as best, the "-calibrated" model decides like the plain one.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-work-area/gpu-comparison}"
minutes="${TRAIN_MINUTES:-7}"
device="${DEVICE:-cuda}"
python="${PYTHON:-python3}"
threads="${THREADS:-4}"
runs="$(mktemp -d)"
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"

common=(
    --phantom-seeds "${TRAIN_SEEDS:-0-39}" --validation-seeds "${VALIDATION_SEEDS:-1000-1003}"
    --precision bf16 --candidate-crop-fraction 0.3 --body-crop-fraction 0.3
    --validation volumes --validation-every 5 --steps-per-epoch "${STEPS_PER_EPOCH:-200}"
    --epochs 100000 --patience 100000 --ema-decay 0.999 --seed 0
    --time-limit "$minutes" --device "$device" --threads "$threads" --no-progress
)
declare -A options=(
    [single]="--architecture single"
    [sequential]="--architecture sequential"
    [mtl-static]="--architecture mtl --weighting static --alpha 0.4"
    [mtl-uncertainty]="--architecture mtl --weighting uncertainty"
)
names=(single sequential mtl-static mtl-uncertainty)

pids=()
for name in "${names[@]}"; do
    # shellcheck disable=SC2086  # the options are separate words on purpose
    "$python" -m node.cli train "$runs/$name" ${options[$name]} "${common[@]}" \
        --export "$runs/$name.pt" >"$runs/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for index in "${!names[@]}"; do
    wait "${pids[$index]}" || { echo "training ${names[$index]} failed" >&2; status=1; }
done
for name in "${names[@]}"; do
    echo "=== $name"
    grep -E "epoch [0-9]+/|stopped after|early stop|^trained|Traceback|Error" "$runs/$name.log" \
        || tail -n 20 "$runs/$name.log"
done >"$out/train.log"
[ "$status" -eq 0 ] || { tail -n 40 "$out/train.log"; exit "$status"; }

models=()
for name in "${names[@]}"; do
    echo "=== calibration of $name" >>"$out/train.log"
    "$python" -m node.cli calibrate "$runs/$name.pt" "$out/$name.pt" --device "$device" \
        --threads "$threads" --phantom-seeds "${VALIDATION_SEEDS:-1000-1003}" \
        >>"$out/train.log" 2>&1 || {
        echo "calibration of $name failed: its -calibrated model keeps the argmax" >>"$out/train.log"
        cp "$runs/$name.pt" "$out/$name.pt"
    }
    models+=(--model "$name=$runs/$name.pt" --model "$name-calibrated=$out/$name.pt")
done
"$python" -m node.cli evaluate "${models[@]}" --phantom-seeds "${TEST_SEEDS:-2000-2019}" \
    --device "$device" --threads "$threads" --runtime torch --json "$out/compare.json" \
    | tee "$out/compare.txt"
