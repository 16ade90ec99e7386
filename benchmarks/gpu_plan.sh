#!/usr/bin/env bash
# The GPU plan (benchmarks/gpu_plan.py: rates, compiled correctness of every triton strategy, the goal-shape step
# and scoring per strategy with the roofline beside, TRL and Liger, the TIP loss at rho 1.0 / 0.2, a targeted
# compiled pytest, then benchmarks/gpu_suite.py in the time left), all inside `timeout`, results rewritten after
# every cell under --out (default $OUT, else benchmarks/results/plan).
#
#   bash benchmarks/gpu_plan.sh [--out DIR] [--dry-run-cpu] [--budget-s S]
#
# --dry-run-cpu: the same sequence at small shapes on the CPU, kernels in Triton's interpreter (~1-2 minutes).
# Peers: wheels in $TK_WHEELS (default .whl/ in the repository, from benchmarks/fetch_peer_wheels.sh, carried to the GPU
# machine) are installed with --no-deps --no-index into a temporary folder first; without them the TRL / Liger
# cells say so. PYTHON (default python3) is the interpreter.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out="${OUT:-}"
dry=0
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run-cpu) dry=1; pass+=("$1"); shift ;;
    *) pass+=("$1"); shift ;;
  esac
done
[ -n "$out" ] || out="$here/benchmarks/results/plan"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1
  limit=170
else
  limit=420  # 7 minutes, the wheel install included
fi
wheels="${TK_WHEELS:-$here/.whl}"
if [ "$dry" = 0 ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d /tmp/tk-peers.XXXX)
  if timeout 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$site"
  else
    echo "[plan] installing the wheels in $wheels failed: the TRL / Liger cells will say what is missing"
  fi
else
  echo "[plan] no wheels installed (dry run, or none in $wheels): TRL / Liger run only where already importable"
fi
timeout -k 10 "$limit" "$py" "$here/benchmarks/gpu_plan.py" --out "$out" "${pass[@]}" 2>&1 | tee "$out/plan.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "[plan] stopped by timeout after $limit s (results so far are in $out)"
exit "$rc"
