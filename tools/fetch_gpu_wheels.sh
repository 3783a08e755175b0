#!/usr/bin/env bash
# Download (here, where the package index is reachable) the pure or cp312 wheels that the GPU check machine lacks
# into .gpu_wheels/ (git-ignored); carry that folder to the GPU machine and run tools/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  pillow==13.0.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
du -sh "$DEST"; ls "$DEST"
