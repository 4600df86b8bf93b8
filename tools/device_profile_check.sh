#!/usr/bin/env bash
# GPU check of `edgetok profile` on a lent CUDA machine (no TensorRT there): exports DeiT-S dense and
# ToMe r=13, then profiles them with the PyTorch runner on CUDA (H2D/compute/D2H/enqueue from CUDA
# events), eager and with CUDA graphs. Run from the repository root; writes reports under $OUT.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
out=${OUT:-/tmp/edgetok-device}
work=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for spec in "dense:--method none" "tome13:--method tome --r 13"; do
  name=${spec%%:*}
  python3 -m edgetok export vit deit_small_patch16_224 ${spec#*:} -o "$work/$name.onnx" | tail -2
done
for graphs in --no-cuda-graphs --cuda-graphs; do
  python3 -m edgetok profile "$work/dense.onnx" "$work/tome13.onnx" --backend torch --device cuda --batch 64 \
    --duration 3 --rounds 3 $graphs -o "$out/profile$graphs"
done
