#!/usr/bin/env bash
# Download the wheels of the peers benchmarks/gpu_plan.sh compares against (TRL's ChunkedDivergenceFunction,
# Liger-Kernel's LigerFusedLinearJSD) and what `import trl` needs that the GPU image lacks (datasets, dill,
# multiprocess), for the GPU machine's Python 3.12 on x86-64, into .whl/ (git-ignored). The GPU plan installs them
# with --no-deps --no-index into a temporary folder; carry ".whl" with the device run. Versions: this venv's.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py="${PYTHON:-python3}"
mkdir -p "$here/.whl"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$here/.whl" trl==1.16.0 liger_kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la "$here/.whl"
