"""Will a batch fit? An estimate of the memory one inference needs, checked before anything is allocated,
so `profile --batch 4096` is refused in one line instead of being OOM-killed minutes later.

The estimate is deliberately simple and on the safe side: inputs and outputs, plus, for a ViT export
(from its sidecar), the largest block's live activations — attention scores (heads × N²), q/k/v, the
residual stream and the MLP's hidden layer (8 × N × C) — counted twice for the runtime's buffers.
"""

from __future__ import annotations

import os

import numpy as np

from edgetok.errors import EdgetokError

ACTIVATION_FACTOR = 2.0


def per_item_bytes(specs: dict, side: dict | None) -> tuple[int, str]:
    """Bytes one batch item needs, and what the figure is based on."""
    inputs = sum(int(np.prod([d for d in shape[1:] if isinstance(d, int)])) * np.dtype(dtype).itemsize
                 for shape, dtype in specs.values())
    model = (side or {}).get("model") or {}
    tokens = [n for pair in ((side or {}).get("reduction") or {}).get("tokens_per_layer", []) for n in pair]
    if not (tokens and model.get("embed_dim") and model.get("num_heads")):
        return inputs, "inputs only (no export sidecar)"
    n, c, h = max(tokens), model["embed_dim"], model["num_heads"]
    activations = int(ACTIVATION_FACTOR * 4 * (h * n * n + 8 * n * c))
    return inputs + activations, f"inputs + {model.get('name', 'the model')}'s activations at {n} tokens"


def available_bytes(device: str) -> int | None:
    """Memory a run can still take: free GPU memory on CUDA, available RAM otherwise (Jetson shares it)."""
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_batch_fits(model: str, batch: int, specs: dict, side: dict | None, device: str,
                     available: int | None = None) -> None:
    item, basis = per_item_bytes(specs, side)
    available = available_bytes(device) if available is None else available
    if not available or batch * item <= available:
        return
    most = max(1, available // max(item, 1))
    where = "free on the GPU" if device == "cuda" else "of memory available"
    raise EdgetokError(
        f"--batch {batch} needs about {batch * item / 2**30:.1f} GiB for {os.path.basename(model)} ({basis}), but this "
        f"machine has {available / 2**30:.1f} GiB {where}; use --batch {most} or less"
    )
