#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (scripts/setup.sh), then run the embedded OPD demo.
# Extra arguments go to `tipkernels demo` (e.g. --quick, or --compare all,entropy_sample,soft_or,q3 --ratio 0.2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tipkernels demo "$@"
