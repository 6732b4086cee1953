#!/usr/bin/env bash
# Creates .venv if missing, installs torch (only if not importable) and arrcoc_sam[dev], runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not multiprocess" -x`. The code must be ruff-clean first.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
"$PY" -m ruff check --quiet arrcoc_sam tests scripts
exec "$PY" -m pytest -q "$@"
