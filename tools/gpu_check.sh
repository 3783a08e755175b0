#!/usr/bin/env bash
# Every GPU check in one command, inside 10 minutes: PASS / FAIL / SKIP per check and a summary
# (tools/gpu_check.py says what each check does).
#
#   bash tools/fetch_gpu_wheels.sh          # here, with the package index: wheels the GPU machine lacks -> .gpu_wheels/
#   bash tools/gpu_check.sh                 # there (carry .gpu_wheels), or on any CUDA node with the `gpu` extra
#   bash tools/gpu_check.sh --device cpu    # the same steps on the CPU at tiny sizes (the test suite runs this)
#
# The lent GPU machine has Python 3.12 with its own CUDA torch and transformers, and no network: the wheels in
# .gpu_wheels/ (megatron-core 0.16.1 cp312, math-verify and its parsers, pillow, rich) are installed into a private
# target directory with --no-deps, so its torch is left alone. On a cluster node with `pip install -e .[gpu,test]`
# there are no wheels to install and the step is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
SITE=${GPU_SITE:-/tmp/megatron-pgpo-site}

# The carried wheels are cp312 (the GPU check machine's Python); another interpreter keeps its own packages.
if compgen -G "$WHEELS/*.whl" >/dev/null && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo ">> installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 540 s for the checks leaves room inside the 10-minute budget for start-up and the wheel install.
exec timeout 540 "$PY" tools/gpu_check.py "$@"
