#!/usr/bin/env bash
# README command one: sets up .venv when missing, then trains the ARR-COC vision relevance model with AdamW
# and with SAM on the embedded procedural scenes and writes runs/quickstart/report.md (+ PNG figures).
# Extra arguments go to `arrcoc-sam quickstart`, e.g. `bash scripts/quickstart.sh --steps 100`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m arrcoc_sam.cli quickstart "$@"
