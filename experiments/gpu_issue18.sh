#!/usr/bin/env bash
# Issue 18, item 4, in one call on a lent GPU machine: (1) benchmarks/gpu_check.sh, the GPU
# speed table; (2) the Single Network and LoRA-Ensemble (M = 8) on the full SST-2 training set
# (60,614 sentences) with the paper's settings (appendix M: AdamW, batch 16, 3 epochs of linear
# decay, LoRA rank 64 with Xavier gain 10), at the rates the CPU paper grid chose, both at once
# on the one GPU, seed 0, tested on the same test part and AG News as the CPU grid. Each step is
# time-limited so that the whole script ends inside BUDGET_S (default 540 s): the SST-2 runs get
# what is left after step 1 minus RESERVE_S for testing (trainer.max_time), and say in
# epochs.json how far they trained. Results come back as at most 4 files in $OUT:
# issue18_gpu.log, env.txt, gpu_check.tar.gz, sst2_full_records.tar.gz.
#
#   python experiments/gpu_issue18.py pack --data /work/shared/data --output runs/gpu_bundle  # here
#   bash experiments/gpu_issue18.sh runs/gpu_bundle             # there (carry runs/gpu_bundle, .whl)
#   bash experiments/gpu_issue18.sh runs/gpu_bundle --cpu-tiny  # a smoke run of the same steps on
#                                                               # CPU (tiny bundle; step 1 skipped)
#
# jsonargparse is not on the GPU machine's image: put its wheels in .whl/ (experiments/README.md)
# and they are installed into /tmp/site when it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${1:?usage: gpu_issue18.sh BUNDLE [--cpu-tiny]}"
MODE="${2:-gpu}"
OUT="${OUT:-./gpu_out}"
WORK="${WORK:-/tmp/issue18_gpu}"
BUDGET_S="${BUDGET_S:-540}"
RESERVE_S="${RESERVE_S:-100}"
PY="${PYTHON:-python3}"
start=$SECONDS
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS where the configs ask for it
log="$OUT/issue18_gpu.log"
: >"$log"
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$log"; }

if ! "$PY" -c 'import jsonargparse' 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$log" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    say "jsonargparse is missing and .whl/ has no wheels (experiments/README.md)"; exit 2
  fi
fi
{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, lightning, transformers, jsonargparse as j; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("lightning", lightning.__version__, "transformers", transformers.__version__, "jsonargparse", j.__version__)'
} >"$OUT/env.txt" 2>&1
"$PY" experiments/gpu_issue18.py restore "$BUNDLE" >>"$log" 2>&1 || { say "restore failed"; exit 2; }

status=0
if [ "$MODE" = "--cpu-tiny" ]; then
  say "step 1 skipped (--cpu-tiny; gpu_check.sh --cpu-tiny has its own test)"
  device=(--precision 32-true --threads 1 --epochs 1)
  overrides=()
  epochs=1
else
  say "step 1: benchmarks/gpu_check.sh"
  OUT="$WORK/gpu_check" bash benchmarks/gpu_check.sh >>"$log" 2>&1 || status=$?
  tar -C "$WORK" -czf "$OUT/gpu_check.tar.gz" gpu_check
  say "step 1 done (exit $status)"
  device=(--precision "${PRECISION:-32-true}" --threads 4 --jobs 2)
  overrides=(trainer.deterministic=warn)  # a few CUDA kernels have no deterministic version
  epochs=3
fi

left=$((BUDGET_S - (SECONDS - start) - RESERVE_S))
if [ "$left" -lt 60 ]; then
  say "step 2 skipped: only ${left} s left for training"; exit 3
fi
max_time=$(printf "00:%02d:%02d:%02d" $((left / 3600)) $((left % 3600 / 60)) $((left % 60)))
say "step 2: SST-2, full training set, at most $max_time of training per run"
# shellcheck disable=SC2046  # the rates are separate METHOD=LR words
"$PY" experiments/sst2_grid.py --protocol paper --data "$BUNDLE" --output "$WORK/sst2_full" \
  --methods single_network lora_ensemble --seeds 0 --train-limit 1000000 \
  --method-lr $("$PY" experiments/gpu_issue18.py rates "$BUNDLE") \
  "${device[@]}" --override "${overrides[@]}" model.method.init_args.pretrained="$BUNDLE/minilm" \
  trainer.max_time="$max_time" >>"$log" 2>&1 || status=$?
say "step 2 done (exit $status)"
for f in "$WORK"/sst2_full/runs/*/seed*/lorae.log; do
  [ -f "$f" ] && { echo "== $f (tail)"; tail -n 15 "$f"; } >>"$log"
done
cp "$OUT/env.txt" "$WORK/sst2_full/env.txt" 2>/dev/null
"$PY" experiments/gpu_issue18.py summarize "$WORK/sst2_full" --bundle "$BUNDLE" --out "$OUT" \
  --epochs "$epochs" 2>&1 | tee -a "$log" || status=$?
say "finished (exit $status)"
exit "$status"
