"""A decoder engine (TensorRT or TensorRT-RTX, from `edgetok build-engine PAIR`) behind OrtDecoder's interface, its
KV cache kept on the GPU as torch tensors; generate and profile --pair take it with ``--backend tensorrt``.

Needs a CUDA GPU: on this project's CPU machines only the engine builds ever ran (docs/what-ran-where.md).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.llm.kv_decoder import Decoder
from edgetok.runtime.runners import EngineIO, torch_dtype


class TrtDecoder(Decoder):
    """One exported decoder's engine, with its KV cache on the GPU."""

    def __init__(self, path: Path, entry: dict, library: str):
        import torch

        if not torch.cuda.is_available():
            raise EdgetokError(f"{path.name} is a {library} engine and runs on a CUDA GPU; this machine has none "
                               "(use --backend onnxruntime here)")
        try:
            trt = importlib.import_module(library)
        except ImportError:
            raise EdgetokError(f"{path.name} was built with {library}, which is not installed here") from None
        self.torch, self.trt = torch, trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EdgetokError(f"{path.name} could not be deserialized by {library} {trt.__version__} on this GPU; "
                               "build it again here (edgetok build-engine PAIR)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.io = EngineIO(trt, torch, self.engine, self.context, path.name,
                           "the pair's engines cover prompt + generated tokens up to the max length they were built "
                           "for: shorten the prompt or generate fewer tokens")
        self.tree = len(self.engine.get_tensor_shape("attention_mask")) == 4
        self.layers, self.kv_heads, self.head = entry["num_hidden_layers"], entry["num_key_value_heads"], entry["head_size"]
        self.dummy = torch.zeros(16, dtype=torch.uint8, device="cuda")  # an address for empty tensors
        self.history: list[tuple[int, float]] = []
        self.reset()

    def _empty(self):
        return self.torch.zeros((1, self.kv_heads, 0, self.head), dtype=self.dtypes["past_key_values.0.key"],
                                device="cuda")

    def _run(self, tokens: list[int], mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch = self.torch
        feeds = {**self._tokens_in(tokens, positions), "attention_mask": mask, "position_ids": positions[None]}
        tensors = {name: torch.from_numpy(np.ascontiguousarray(v)).to("cuda", self.dtypes[name])
                   for name, v in feeds.items()}
        for i in range(self.layers):
            tensors[f"past_key_values.{i}.key"] = self.cache[2 * i]
            tensors[f"past_key_values.{i}.value"] = self.cache[2 * i + 1]
        for name, t in tensors.items():
            self.io.set_input(name, t, None if t.numel() else self.dummy.data_ptr())
        self.io.bind_outputs()
        start = time.perf_counter()
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EdgetokError("the engine failed to run (execute_async_v3 returned False)")
        self.stream.synchronize()
        self._record(len(tokens), time.perf_counter() - start)
        # the cache outlives this step's outputs: a data-dependent one's buffer is reused by the next run
        results = {name: self.io.output(name) if name in self.io.tensors else self.io.output(name).clone()
                   for name in self.io.outputs}
        self.cache = [results[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        return results["logits"][0].float().cpu().numpy()

    def crop(self, length: int) -> None:
        self.cache = [c[:, :, :length].contiguous() for c in self.cache]

    def keep(self, rows: list[int]) -> None:
        index = self.torch.tensor(rows, dtype=self.torch.int64, device="cuda")
        self.cache = [c.index_select(2, index).contiguous() for c in self.cache]
