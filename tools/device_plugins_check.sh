#!/usr/bin/env bash
# GPU check of the plugin kernels on a lent CUDA machine (no TensorRT there): every kernel against its
# reference for real, then bench/plugins_cuda.py (TokenMerge vs the standard-op step at batch 1/8/64, its
# fraction of copy bandwidth, the AOT cubins through cuda-python, DeiT-S ToMe r=13 end to end with and
# without the kernels; ATS and dtome on the reference model with the TokenPrune kernels; SizeBiasedAttention
# against SDPA), and the TokenMerge kernel tests JIT on CUDA (TRITON_INTERPRET=0). A GPU sums in another order
# than numpy: the benches and those tests compare through edgetok/plugins/agreement.py (decisions where the
# reference's margin exceeds float32 noise, values to a tolerance scaled to the magnitude summed).
# Where TensorRT imports, also the C++ plugin library's engines against the standard-op engines (DeiT-S ToMe
# r=13, batch 1/8/64, edgetok profile). Run from the repository root; writes the log under $OUT.
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
  # The C++ plugin library's engines against the standard-op engines, batch 1/8/64: TensorRT proper only (it
  # builds for the GPU it runs on; TensorRT-RTX has no Hopper target), with cmake and g++ to build the library
  # and TensorRT's headers (an installed TensorRT, $TENSORRT_INCLUDE_DIR, or tools/setup.sh's).
  if python3 -c "import tensorrt" 2>/dev/null && command -v cmake >/dev/null && command -v g++ >/dev/null; then
    lib="$out/lib" work="$out/engines"
    mkdir -p "$work"
    python3 -m edgetok plugins build --lib -o "$lib"
    python3 -m edgetok export vit deit_small_patch16_224 --method tome --r 13 --plugins -o "$work/tome_plugins.onnx"
    python3 -m edgetok export vit deit_small_patch16_224 --method tome --r 13 -o "$work/tome_ops.onnx"
    for b in 1 8 64; do
      for m in tome_plugins tome_ops; do
        python3 -m edgetok build-engine "$work/$m.onnx" --backend tensorrt --batch "1:$b:64" \
          --plugin-lib "$lib/libedgetok_plugins.so" -o "$work/$m.b$b.engine"
      done
      EDGETOK_PLUGIN_LIB="$lib/libedgetok_plugins.so" python3 -m edgetok profile "$work/tome_plugins.b$b.engine" \
        "$work/tome_ops.b$b.engine" --device cuda --batch "$b" --rounds 3
    done
  else
    echo "TensorRT (python3 -m pip install tensorrt), cmake or g++ is missing here: the C++ library's engines" \
         "were not compared with the standard-op engines"
  fi
} 2>&1 | tee "$out/plugins_check.log"
