#!/usr/bin/env bash
# One GPU lease, end to end: unpack the archives of `python -m jobs.gpu_data` in .gpu/ (or
# ARCHIVES=DIR; a cifar10-test.tar.gz beside them adds the test split), train jobs/gpu_models.sh's
# runs for MINUTES side by side, then score every model and the bundled one on CIFAR-10's test
# split on the GPU, each at its own working size (test.json).
#
#   RUNS="w16-sem-ft w32-sem-cf-best" [FETCH="w32-sem-cf-best"] [LIMIT=SECONDS] jobs/gpu_lease.sh MINUTES OUT
#
# A lease returns only what is in OUT when its command ends or is killed at its time limit, at
# most 8 files of 16 MiB. So while the runs train, every COLLECT_EVERY s (default 10) each run's
# model.pt that changed (a --keep-best run writes its best so far) goes to OUT as half-precision
# parts with a checked manifest (jobs.gpu_collect; FETCH names the runs whose models come back,
# default all, as many as fit), and logs.tar.gz (logs, metrics.json, holdout.png, test.json,
# nvidia-smi samples) is refreshed. A FETCH name that is not among the runs is refused before
# anything starts. After the lease: `python -m jobs.gpu_collect join FILES_AT DEST`.
# LIMIT, the command's own time limit in seconds, stops the test scoring 30 s before it; the
# runs' models are scored first, the bundled one (whose score is known) last.
# Wall time: MINUTES, plus about 40 s to load the data, plus the held-out scoring of
# --score-every (off the training clock), plus the final scoring.
set -uo pipefail
minutes=${1:?minutes of training}
out=${2:?output folder}
data=${DATA_DIR:-/tmp/gpu-data}
runs=${RUNS_DIR:-/tmp/gpu-runs}
python=${PYTHON:-python3}
names=$(jobs/gpu_models.sh --names) || exit 2
for name in ${FETCH:-}; do
  [[ " $names " == *" $name "* ]] || { echo "gpu_lease.sh: FETCH names $name, which is not among the runs: $names" >&2; exit 2; }
done
# A warm machine keeps the last call's runs: they would be scored and collected as this call's.
[[ -z ${RUNS_DIR:-} ]] && rm -rf "$runs"
mkdir -p "$data" "$runs" "$out"
rm -f "$runs/.stop"  # an earlier call's: the copier below would quit at once
for archive in "${ARCHIVES:-.gpu}"/*.tar.gz; do tar xzf "$archive" -C "$data"; done

collect() {
  # shellcheck disable=SC2086  # FETCH is a list of names
  "$python" -m jobs.gpu_collect collect "$runs" "$out" ${FETCH:-}
  tar czf "$out/.logs.tar.gz" -C "$runs" --exclude='*.pt' --exclude='.tmp-*' --exclude='.stop' . &&
    mv "$out/.logs.tar.gz" "$out/logs.tar.gz"
}

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$runs/gpu.txt"
fi
(while sleep "${COLLECT_EVERY:-10}"; do
   [[ -e $runs/.stop ]] && break
   collect
   if command -v nvidia-smi >/dev/null; then
     nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >>"$runs/gpu.txt"
   fi
 done) &
collector=$!

HALF=0 jobs/gpu_models.sh "$data" "$runs" "$minutes"  # its float16 copies: collect makes them
status=$?
touch "$runs/.stop"
wait "$collector"
collect

if [[ -d $data/cifar10/test ]]; then
  left=$((${LIMIT:-0} > 0 ? LIMIT - SECONDS - 30 : 86400))
  timeout "$((left > 1 ? left : 1))" "$python" - "$data/cifar10/test" "$runs" <<'EOF' | tee "$runs/test.json"
import json, os, sys
from pathlib import Path
import torch
from colorize import colorizer, evaluate, imagesets
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 scoring
tests = {}  # the test split at each model's working size, as `colorize evaluate` scores it (resized bicubically here)
for path in [*sorted(Path(sys.argv[2]).glob("*/model.pt")), None]:  # the bundled model's score is known: last
    model, weights_id = colorizer.load_weights(path and str(path))
    size = model.config.image_size
    if size not in tests:
        tests[size] = imagesets.load_folder(sys.argv[1], size=size)
    test = tests[size]
    result, gray, _ = evaluate.score(model.to(os.environ.get("DEVICE", "cuda")), evaluate.in_batches(test.rgb))
    print(json.dumps({"model": str(path or "bundled"), "weights_id": weights_id, "images": len(test.rgb), "size": size,
                      **{k: round(v, 5) for k, v in result.items()}, "gray_psnr": round(gray["psnr"], 5)}), flush=True)
EOF
  collect
fi
ls -l "$out"
exit $status
