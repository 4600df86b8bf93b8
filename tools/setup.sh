#!/usr/bin/env bash
# Create ./.venv and install edgetok (editable, with test tools, TensorRT-RTX, which builds
# engines on a CPU-only machine, and NVIDIA Model Optimizer for FP8) at the versions CI pins.
# torch/torchvision are pinned to the builds this environment has on local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q -c .ci/constraints.txt torch==2.14.1 torchvision==0.29.1
pip install -q -c .ci/constraints.txt -e '.[test,tensorrt-rtx,fp8]'
echo "edgetok installed in .venv ($(.venv/bin/edgetok --version))"
