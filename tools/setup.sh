#!/usr/bin/env bash
# Create ./.venv and install edgetok (editable, with test tools, TensorRT-RTX, which builds
# engines on a CPU-only machine, and NVIDIA Model Optimizer for FP8) at the versions CI pins.
# torch/torchvision are pinned to the builds this environment has on local disk.
# It takes minutes: each step says what it installs, and pip's lines naming each package it collects
# and what it installed are passed through (the rest of pip's output is left out).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$SECONDS
step() { echo "[setup $((SECONDS - start)) s] $*"; }
if [ -x .venv/bin/python ]; then
    step "1/3 reusing .venv ($(.venv/bin/python --version))"
else
    step "1/3 creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
pip() {
    .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2) |
        awk '/^(Collecting|Obtaining|Installing collected packages|Successfully installed)/ { print "    " $0; fflush() }'
}
step "2/3 installing torch 2.14.1 and torchvision 0.29.1"
pip install -c .ci/constraints.txt torch==2.14.1 torchvision==0.29.1
step "3/3 installing edgetok (editable) and its dependencies (timm, transformers, onnx, onnxruntime, ...) with" \
     "[test,tensorrt-rtx,fp8,tune]: pytest, TensorRT-RTX, Polygraphy, NVIDIA Model Optimizer, Ray and Optuna"
pip install -c .ci/constraints.txt -e '.[test,tensorrt-rtx,fp8,tune]'
step "unpacking NVIDIA's TensorRT 10.14 headers for the C++ plugin library (PyPI wheel kernel-lens 2.0.1," \
     "SHA-256 pinned in edgetok/plugins/library.py) into .venv/share/edgetok/tensorrt-include"
.venv/bin/python -m edgetok.plugins.library install-headers
step "done"
echo "edgetok installed in .venv ($(.venv/bin/edgetok --version))"
