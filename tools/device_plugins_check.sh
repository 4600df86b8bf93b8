#!/usr/bin/env bash
# GPU check of the plugin kernels on a lent CUDA machine (no TensorRT there): every kernel against its
# reference for real, then bench/plugins_cuda.py (TokenMerge vs the standard-op step at batch 1/8/64, its
# fraction of copy bandwidth, the AOT cubins through cuda-python, DeiT-S ToMe r=13 end to end with and
# without the kernels; ATS and dtome on the reference model with the TokenPrune kernels; SizeBiasedAttention
# against SDPA), and the TokenMerge kernel tests JIT on CUDA (TRITON_INTERPRET=0). A GPU sums in another order
# than numpy: the benches and those tests compare through edgetok/plugins/agreement.py (decisions where the
# reference's margin exceeds float32 noise, values to a tolerance scaled to the magnitude summed).
# Run from the repository root; writes the log under $OUT.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
out=${OUT:-/tmp/edgetok-device}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m edgetok plugins check --device cuda
  python3 bench/plugins_cuda.py --batch 1 8 64
  python3 bench/dynamic.py --torch cuda  # ATS/dtome with the TokenPrune kernels vs dense and ToMe, batch 1
  python3 bench/attention_cuda.py  # SizeBiasedAttention vs SDPA with and without the float mask
  if python3 -c "import pytest" 2>/dev/null; then
    TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_plugin_kernels.py \
      -k "not build_all and not reuses_cache and not bundle_round_trip"
  else
    echo "pytest is not installed here: the TokenMerge kernel tests on CUDA were not run"
  fi
} 2>&1 | tee "$out/plugins_check.log"
