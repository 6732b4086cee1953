#!/usr/bin/env bash
# GPU checks for a CUDA machine (never run by CI): the CUDA tests (fp16 GradScaler, bf16 autocast, sync count),
# the engine, variants and robustness benchmarks on CUDA, and the FSDP2 Trainer check. Uses the machine's own
# python3 (with torch); wheels for missing pure-Python packages may be carried in .whl/. Each step has its own
# time limit so one slow step cannot eat the others. Results go to $OUT (or bench_results/gpu): gpu_check.log
# and one JSON per benchmark (10 files with every step on). FSDP=0, ROBUSTNESS=0, TOKEN_PRECISION=0,
# STEP_PROFILE=0, SAM_STEP_FUSED=0, SAM_STEP_GPU_BOUND=0 and VARIANTS_GPU_BOUND=0 leave out those steps. On an H200 (2026-11-28),
# FSDP=0 ROBUSTNESS=0 TOKEN_PRECISION=0 took 185 s before the GPU-bound SAM-step step was added; the FSDP2 check
# adds about two minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-bench_results/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
    '_foreach_clone', hasattr(torch, '_foreach_clone'))" | tee -a "$LOG"
step 150 cuda-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sam_engine.py \
    tests/test_multi_tensor.py tests/test_variants.py
step 100 bench-sam-step "$PY" scripts/bench/sam_step.py --device cuda --repeats 50 --profile-ops \
    --out "$OUT_DIR/sam_step.json"
# fused AdamW (transformers' default) checks the update on the device: (a) without the update check's host sync
[ "${SAM_STEP_FUSED:-1}" = 1 ] && step 70 bench-sam-step-fused "$PY" scripts/bench/sam_step.py --device cuda \
    --repeats 30 --fused --out "$OUT_DIR/sam_step_fused.json"
# the default batch leaves MiniLM host-bound on an H200 (a step's host time exceeds its kernels'); this one makes
# the kernels dominate, as in training at a realistic batch
[ "${SAM_STEP_GPU_BOUND:-1}" = 1 ] && step 100 bench-sam-step-gpu-bound "$PY" scripts/bench/sam_step.py --device cuda \
    --batch-size 64 --seq-len 256 --repeats 20 --out "$OUT_DIR/sam_step_gpu_bound.json"
[ "${STEP_PROFILE:-1}" = 1 ] && step 50 bench-step-profile "$PY" scripts/bench/step_profile.py --device cuda \
    --methods base sam msam looksam_k5 --out "$OUT_DIR/step_profile.json"
[ "${ROBUSTNESS:-1}" = 1 ] && step 35 bench-robustness "$PY" scripts/bench/robustness.py --device cuda \
    --out "$OUT_DIR/robustness.json"
# the looped reference is host-bound on a GPU (~3 s per hutchinson call at B=16): one batch size, one repeat
[ "${TOKEN_PRECISION:-1}" = 1 ] && step 60 bench-token-precision "$PY" scripts/bench/token_precision.py \
    --device cuda --batch-sizes 16 --repeats 1 --models ${TOKEN_PRECISION_MODELS:-arrcoc_g32_d384} \
    --out "$OUT_DIR/token_precision.json"
step 75 bench-variants "$PY" scripts/bench/variants.py --device cuda --parts throughput --out "$OUT_DIR/variants.json"
# the default variants model is host-bound on an H200 (15 of ~20 ms per base step are kernels); this batch makes
# the kernels dominate, so the ratios approach the passes each method costs
[ "${VARIANTS_GPU_BOUND:-1}" = 1 ] && step 110 bench-variants-gpu-bound "$PY" scripts/bench/variants.py \
    --device cuda --parts throughput --batch-size 64 --seq-len 256 --rounds 3 \
    --out "$OUT_DIR/variants_gpu_bound.json"
if [ "${FSDP:-1}" = 1 ]; then  # two single-GPU Trainer runs (plain and FSDP2); about two minutes
    step 180 fsdp2-check "$PY" scripts/fsdp_check.py --report "$OUT_DIR/fsdp_check.json"
fi
exit $status
