#!/usr/bin/env bash
# The issue-6 GPU check: the speed harness on CUDA in bf16-mixed, sized to finish in under
# 5 minutes on an H100/H200 (torch/timm/lightning of the machine, this repository on
# PYTHONPATH: no install, no internet, random weights). Results land in $OUT (default
# ./gpu_out): gpu_bf16.json/.md (M = 16, B = 1 latency; B = 32 against the plain ViT at batch
# 512; training steps; the training floor at M x B = 4 x 8 and 16 x 32; peak memory), then gpu_bf16_compile.json/.md (torch.compile variants,
# run second and time-limited so they cannot cost the main results), env.txt, gpu_check.log.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-tiny  # the same steps on CPU with a tiny ViT (seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--cpu-tiny" ]; then
  size=(--device cpu --threads 1 --backbone vit_tiny_patch16_224
        --backbone-overrides '{"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}'
        --members 4 --batch 1 2 --train-members 2 --train-batch 2 --extra-train-sizes 3x2
        --fit-batch 2
        --repeats 2 --warmup 1)
  main_limit=300 compile_limit=120
  # torch.compile on a CPU takes minutes even for a tiny model: check only that the second
  # invocation works.
  compile_cases=(plain lorae train_lorae)
else
  size=(--device cuda --members 16 --batch 1 32 --train-members 4 --train-batch 8
        --extra-train-sizes 16x32 --fit-batch 32 --repeats 20 --slow-repeats 5 --slow-seconds 1 --warmup 3)
  main_limit=210 compile_limit=80
  compile_cases=(plain lorae lorae_compiled train_lorae train_lorae_compiled)
fi

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, timm; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("timm", timm.__version__)'
} > "$OUT/env.txt" 2>&1

status=0
timeout "$main_limit" "$PY" benchmarks/speed.py "${size[@]}" --dtype bf16 --profile \
  --output "$OUT/gpu_bf16.json" --markdown "$OUT/gpu_bf16.md" 2>&1 | tee "$OUT/gpu_check.log" \
  || status=$?
# torch.compile variants (skipped by the harness where LoRAEnsemble has no compile option).
timeout "$compile_limit" "$PY" benchmarks/speed.py "${size[@]}" --dtype bf16 --no-memory \
  --cases "${compile_cases[@]}" \
  --output "$OUT/gpu_bf16_compile.json" --markdown "$OUT/gpu_bf16_compile.md" 2>&1 \
  | tee -a "$OUT/gpu_check.log" || echo "compile variants failed or timed out (see log)" \
  | tee -a "$OUT/gpu_check.log"
exit "$status"
