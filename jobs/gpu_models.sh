#!/usr/bin/env bash
# Train the colour models of docs/colour.md side by side on one GPU, inside a lease of fixed length.
#
#   jobs/gpu_models.sh DATA OUT MINUTES
#
# DATA holds photos/ (class folders of photos) and cifar10/train/ (CIFAR-10's class folders of
# JPEGs); `python -m jobs.gpu_data` packs both small enough to carry. OUT gets one folder per
# model (model.pt, metrics.json, holdout.png), its log NAME.log and a half-precision copy of
# each model (NAME-fp16.pt, small enough to fetch). Every model trains for MINUTES of
# wall-clock on the same GPU at once (small U-Nets at 64 px are unlikely to fill an H100 or
# H200 alone), so the whole script takes MINUTES plus loading and scoring, about a minute
# more, and the scoring. RUNS="a b" picks some of the runs below. Each scores its holdouts every
# SCORE_EVERY epochs (default 5; off the training clock), a learning curve in its metrics.json.
# HALF=0 skips the half-precision copies (jobs/gpu_lease.sh makes its own, in parts).
# `jobs/gpu_models.sh --names` prints the names of the runs RUNS picks (all by default).
# No Ray needed. docs/colour.md has what these runs gave on an H200.
set -euo pipefail
declare -A runs=(
  [w32-psnr]="--width 32 --loss psnr"
  [w32-huber]="--width 32 --loss huber"
  [w32-class]="--width 32 --head classification --loss ce"
  [w16-psnr-ft]="--init bundled --loss psnr --lr 5e-4"
  [w32-psnr-cf]="--width 32 --loss psnr --cf-weight 0.1"
  [w16-cf-ft]="--init bundled --loss psnr --cf-weight 0.1 --lr 5e-4"
  [w32-psnr-sem]="--width 32 --loss psnr --semantic"
  [w16-sem-ft]="--init bundled --semantic --loss psnr --cf-weight 0.1 --lr 5e-4"
  [w32-sem-cf]="--width 32 --loss psnr --semantic --cf-weight 0.1"
  [w48-sem-cf]="--width 48 --loss psnr --semantic --cf-weight 0.1"
  [w32-sem-cf-best]="--width 32 --loss psnr --semantic --cf-weight 0.1 --keep-best"
  [w32-psnr-sem-best]="--width 32 --loss psnr --semantic --keep-best"
  [w32-psnr-sem-shift-best]="--width 32 --loss psnr --semantic --shift 4 --keep-best"
  [w32-sem-cf-shift-best]="--width 32 --loss psnr --semantic --cf-weight 0.1 --shift 4 --keep-best"
  # CIFAR-10's own 32 px (rounds 15 and 17, the best CIFAR-10 scores so far), on both folders;
  # its --size and --depth come after common's, and the last of a flag wins
  [w32-at32-sem-shift-best]="--size 32 --depth 3 --width 32 --loss psnr --semantic --shift 2 --keep-best"
)
names=(${RUNS:-${!runs[@]}})  # RUNS="w32-psnr w16-cf-ft" trains a subset
for name in "${names[@]}"; do
  [[ -v runs[$name] ]] || { echo "gpu_models.sh: no run named $name; the runs: ${!runs[*]}" >&2; exit 2; }
done
if [[ ${1:-} == --names ]]; then
  echo "${names[*]}"
  exit 0
fi
data=${1:?data folder}
out=${2:?output folder}
minutes=${3:?minutes of training}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
common=(--data "$data/photos" --data "$data/cifar10/train" --size 64 --depth 4 --batch-size 256
        --minutes "$minutes" --device "$device" --threads "${THREADS:-4}" --score-every "${SCORE_EVERY:-5}")
pids=()
for name in "${names[@]}"; do
  # shellcheck disable=SC2086  # the run's flags are meant to split
  "$python" -m jobs.photo_model "${common[@]}" ${runs[$name]} --out "$out/$name" >"$out/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for name in "${names[@]}"; do
  tail -n 4 "$out/$name.log" | sed "s/^/$name: /"
  if [[ -f $out/$name/model.pt && ${HALF:-1} != 0 ]]; then
    # One run's copy failing must not cost the others their summaries and copies (set -e).
    "$python" -m jobs.gpu_collect half "$out/$name/model.pt" "$out/$name-fp16.pt" || status=1
  fi
done
exit $status
