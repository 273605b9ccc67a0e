#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, the 2:4 kernel benchmark and the cost benchmark (fp32 and bf16
# autocast, 4 x 128 and 8 x 512 tokens) on one CUDA GPU. Writes logs, JSON and Markdown under $1 (default runs/gpu).
#
#   bash benchmarks/gpu.sh runs/gpu
#   MODEL=<config folder> RANDOM_WEIGHTS=1 bash benchmarks/gpu.sh runs/gpu   # a machine without the checkpoint
#
# Each part runs even if an earlier one failed; the exit status is 1 if any did. CI never runs this.
set -uo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
model_args=()
[ -n "${MODEL:-}" ] && model_args+=(--model "$MODEL")
[ "${RANDOM_WEIGHTS:-0}" = 1 ] && model_args+=(--random-weights)
status=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -v -E ' step [0-9]+: |it/s\]|Warning|warn\(' "$out/$name.log" | tail -n 25
    if [ $rc != 0 ]; then
        echo "!! $name failed (exit status $rc)"
        status=1
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
part tests 100 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_export.py
part kernels 100 python benchmarks/sparse_kernels.py "${model_args[@]}" --shapes 4096x4096,11008x4096,4096x11008 \
    --json "$out/kernels-cuda-fp16.json"
cost=(python benchmarks/cost.py --device cuda "${model_args[@]}" --steps 10 --warmup 3 --per-weight-steps 5
      --gemm-repeats 5)
part cost-fp32-4x128 150 "${cost[@]}" --batch 4 --seq-len 128 \
    --methods full,lora,mask,mask-keep,mask-bf16,mask-distill,mask-distill-cached --json "$out/cost-cuda-4x128.json"
part cost-bf16-4x128 110 "${cost[@]}" --autocast bfloat16 --batch 4 --seq-len 128 \
    --methods full,lora,mask-keep,mask-bf16,mask-distill-cached --json "$out/cost-cuda-4x128-bf16.json"
part cost-bf16-8x512 130 "${cost[@]}" --autocast bfloat16 --batch 8 --seq-len 512 \
    --methods full,lora,mask-keep,mask-bf16,mask-distill,mask-distill-cached --json "$out/cost-cuda-8x512-bf16.json"
exit $status
