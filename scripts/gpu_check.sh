#!/usr/bin/env bash
# GPU checks for a CUDA machine (never run by CI): the CUDA tests (fp16 GradScaler, bf16 autocast, sync count),
# the engine benchmark on CUDA, and the FSDP2 Trainer check. Uses the machine's own python3 (with torch);
# wheels for missing pure-Python packages may be carried in .whl/. Results go to $OUT (or bench_results/gpu).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-bench_results/gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT_DIR/gpu.txt"
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sam_engine.py 2>&1 | tee "$OUT_DIR/tests.log" || status=1
"$PY" scripts/bench/sam_step.py --device cuda --repeats 20 --out "$OUT_DIR/sam_step.json" 2>&1 | grep -v Warning | tee "$OUT_DIR/sam_step.log" || status=1
if [ -f scripts/fsdp_check.py ]; then
    "$PY" scripts/fsdp_check.py --report "$OUT_DIR/fsdp_check.json" 2>&1 | tail -40 | tee "$OUT_DIR/fsdp_check.log" || status=1
fi
exit $status
