#!/usr/bin/env bash
# Run every `gpu`-marked test on a CUDA machine, inside 10 minutes.
#
#   bash tools/fetch_gpu_wheels.sh      # here, with network: wheels the GPU machine lacks -> .gpu_wheels/
#   bash tools/gpu_check.sh             # there (carry .gpu_wheels), or on any CUDA node with the `gpu` extra
#
# The lent GPU machine has Python 3.12 with its own CUDA torch, pytest and hypothesis, and no network: the
# wheels in .gpu_wheels/ (megatron-core 0.16.1 cp312, math-verify, latex2sympy2_extended) are installed into a
# private target directory with --no-deps so its torch is left alone. On a cluster node with
# `pip install -e .[gpu,test]` the wheel step is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
SITE=${GPU_SITE:-/tmp/megatron-pgpo-site}

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo ">> installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "tools/gpu_check.sh needs a CUDA device"
print(f">> torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 540 s for the tests leaves room inside the 10-minute budget for start-up and the wheel install.
exec timeout 540 "$PY" -m pytest tests -m gpu -rs --durations=10 -p no:cacheprovider -o timeout=300 "$@"
