#!/usr/bin/env bash
# Create .venv and install tipkernels with its test extras. On a machine without CUDA the CPU build of torch is
# pinned (an unpinned torch would pull a multi-GB CUDA build); with a CUDA torch already importable by
# $PYTHON, the venv inherits it (--system-site-packages) and nothing is pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
