#!/usr/bin/env bash
# Install dit-sparse (and optional extras) into the active Python environment.
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # + test dependencies (pytest, hypothesis, triton for TRITON_INTERPRET)
# A machine that already has torch (e.g. a CUDA build) keeps it; otherwise the CPU build torch==2.13.0 is installed
# first, so pip never pulls a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
python -c "import torch, dit_sparse; print(f'dit-sparse {dit_sparse.__version__} with torch {torch.__version__}')"
