"""Runners behind one interface: ONNX Runtime (CPU/CUDA/TensorRT/TensorRT-RTX providers), TensorRT and
TensorRT-RTX engines, and PyTorch eager. Each gets inputs once, then times one inference per call."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from edgetok import sidecar
from edgetok.errors import EdgetokError
from edgetok.runtime.cuda_timing import CudaTimedStep

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class Runner:
    name: str
    precision = "fp32"

    def input_specs(self) -> dict[str, tuple[list, str]]:
        """Input name -> (shape, numpy dtype name); dynamic dims as strings."""
        raise NotImplementedError

    def set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def infer(self) -> dict[str, float]:
        """Seconds for one inference: always ``latency``; GPU runners add h2d/compute/d2h/enqueue."""
        raise NotImplementedError

    def info(self) -> dict:
        return {"backend": self.name}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------- ONNX Runtime
EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
}
GPU_PROVIDER_HINT = "pip install onnxruntime-gpu (CUDA/TensorRT) or onnxruntime-trt-rtx (TensorRT-RTX)"


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: str, ep: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        provider = EXECUTION_PROVIDERS[ep]
        if provider not in ort.get_available_providers():
            raise EdgetokError(
                f"onnxruntime {ort.__version__} here has no {provider} (it has "
                f"{', '.join(ort.get_available_providers())}); {GPU_PROVIDER_HINT}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Sessions that wait would spin and steal cores from the one being timed (measured here).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        from edgetok.runtime.plugins import prepare_ort

        self.plugins = prepare_ort(options, path)
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:
            raise EdgetokError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())[:200]}") from None
        self.ep, self.threads, self.version = ep, threads, ort.__version__
        self.gpu = ep != "cpu"
        self.feed: dict = {}
        if self.gpu:
            self.binding = self.session.io_binding()

    def input_specs(self):
        return {i.name: (i.shape, _ort_dtype(i.type)) for i in self.session.get_inputs()}

    def set_inputs(self, feed):
        self.feed = feed

    def infer(self):
        import time

        if not self.gpu:
            start = time.perf_counter()
            self.session.run(None, self.feed)
            return {"latency": time.perf_counter() - start}
        import onnxruntime as ort

        # IO binding separates the copies from the compute (host clock; the calls are synchronous).
        t0 = time.perf_counter()
        for name, array in self.feed.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for out in self.session.get_outputs():
            self.binding.bind_output(out.name, "cuda")
        t1 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        t2 = time.perf_counter()
        self.binding.copy_outputs_to_cpu()
        t3 = time.perf_counter()
        return {"latency": t3 - t0, "h2d": t1 - t0, "compute": t2 - t1, "d2h": t3 - t2}

    def info(self):
        return {
            **({"plugins": "edgetok plugin nodes run as Python reference ops (onnxruntime-extensions): "
                           "not the fused kernels' speed"} if self.plugins else {}),
            "backend": self.name, "version": self.version, "execution_provider": EXECUTION_PROVIDERS[self.ep],
            "providers": self.session.get_providers(), "intra_op_threads": self.threads or "all cores",
            "allow_spinning": False,
        }


def _ort_dtype(type_str: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32", "tensor(bool)": "bool"}.get(type_str, "float32")


# ----------------------------------------------------------------------------------------- TensorRT engines
def _torch_cuda():
    import torch

    if not torch.cuda.is_available():
        raise EdgetokError("no CUDA GPU is visible to PyTorch here; engines and --device cuda need one")
    return torch


def torch_dtype(trt, torch, dtype):
    """The torch dtype of a TensorRT DataType (bfloat16 included, which numpy, and so trt.nptype, lacks)."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


class EngineIO:
    """One execution context's tensors bound, each binding checked: TensorRT answers a shape outside the
    engine's profile, or an address it cannot use, with False (and a log line nobody sees) and then runs on
    whatever was bound before. Outputs whose shape get_tensor_shape cannot know before the run (-1: a
    data-dependent output) get TensorRT's output allocator, which is asked for the bytes during the run and
    told the shape after; the others are allocated here. ``label`` names the engine and ``fix`` the remedy
    in the one-line refusals."""

    def __init__(self, trt, torch, engine, context, label: str, fix: str, device: str = "cuda"):
        self.trt, self.torch, self.engine, self.context = trt, torch, engine, context
        self.label, self.fix, self.device = label, fix, device
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.allocators: dict[str, object] = {}
        self.tensors: dict = {}

    def dtype(self, name: str):
        return torch_dtype(self.trt, self.torch, self.engine.get_tensor_dtype(name))

    def set_input(self, name: str, tensor, address: int | None = None) -> None:
        """Bind an input: its shape (refused in one line outside the profile's range) and its address."""
        shape = tuple(int(d) for d in tensor.shape)
        if not self.context.set_input_shape(name, shape):
            low, _, high = (list(d) for d in self.engine.get_tensor_profile_shape(name, 0))
            raise EdgetokError(f"{self.label}: input {name} of shape {list(shape)} is outside the engine's profile "
                               f"(from {low} to {high}); {self.fix}")
        self.address(name, tensor.data_ptr() if address is None else address)

    def address(self, name: str, pointer: int) -> None:
        if not self.context.set_tensor_address(name, pointer):
            raise EdgetokError(f"{self.label}: {self.trt.__name__} refused address {pointer:#x} for tensor {name} "
                               "(set_tensor_address returned False: not an I/O tensor of this engine, or misaligned)")

    def bind_outputs(self) -> None:
        """After every input is set: a tensor for each output of known shape, an allocator for the others."""
        self.tensors = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape, default=0) >= 0:
                self.tensors[name] = self.torch.empty(shape, dtype=self.dtype(name), device=self.device)
                self.address(name, self.tensors[name].data_ptr())
                continue
            if name not in self.allocators:
                self.allocators[name] = output_allocator(self.trt)(self.torch, self.device)
                if not self.context.set_output_allocator(name, self.allocators[name]):
                    raise EdgetokError(f"{self.label}: {self.trt.__name__} refused an output allocator for {name}, "
                                       f"whose shape {list(shape)} only the run knows")

    def output(self, name: str):
        """An output after the run (of a data-dependent one: the shape TensorRT reported)."""
        if name in self.tensors:
            return self.tensors[name]
        return self.allocators[name].tensor(self.dtype(name))


def output_allocator(trt):
    """TensorRT's IOutputAllocator (of ``trt``, tensorrt or tensorrt_rtx) over torch device memory, for one
    output: a buffer grown to what the run asks for (never shrunk, so a timing loop allocates once) and the
    shape the run reports."""
    if trt in _ALLOCATORS:
        return _ALLOCATORS[trt]

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self, torch, device: str = "cuda"):
            trt.IOutputAllocator.__init__(self)
            self.torch, self.device = torch, device
            self.buffer = torch.empty(0, dtype=torch.uint8, device=device)
            self.shape: tuple[int, ...] | None = None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            if size > self.buffer.numel():  # torch's device allocations are 512-byte aligned
                self.buffer = self.torch.empty(size, dtype=self.torch.uint8, device=self.device)
            return self.buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shape = tuple(shape)

        def tensor(self, dtype):
            if self.shape is None:
                raise EdgetokError("an engine output with a data-dependent shape was read before the engine ran")
            count = int(np.prod(self.shape))
            return self.buffer.view(dtype)[:count].view(self.shape)

    _ALLOCATORS[trt] = OutputAllocator
    return OutputAllocator


_ALLOCATORS: dict = {}


class TensorRTEngineRunner(Runner):
    """A serialized TensorRT or TensorRT-RTX engine; buffers and events come from PyTorch's CUDA."""

    def __init__(self, path: str, module: str, batch: int, cuda_graphs: bool | None, data_transfers: bool | None):
        from edgetok.plugins.token_counts import engine_count_outputs
        from edgetok.runtime.plugins import data_dependent_plugins

        self.data_dependent = data_dependent_plugins(path)  # token counts follow the input: no CUDA graph
        self.count_outputs = engine_count_outputs(path)  # block -> output: the tokens each image kept there
        self.kept_outputs = engine_count_outputs(path, "attention_kept_outputs")  # block-sparse attention's share
        if cuda_graphs and self.data_dependent:
            raise EdgetokError(f"{Path(path).name} has data-dependent shapes ({', '.join(self.data_dependent)}: the "
                               "token count follows the image), which a CUDA graph cannot capture; use --no-cuda-graphs")
        if importlib.util.find_spec(module) is None:
            raise EdgetokError(f"{path} needs {module}, which is not installed: pip install {module.replace('_', '-')}")
        self.torch = _torch_cuda()
        trt = importlib.import_module(module)
        self.trt, self.name = trt, module.replace("_", "-")
        major = int(trt.__version__.split(".")[0])
        # trtexec's defaults: TensorRT 11 turned CUDA graphs on and data transfers off.
        self.defaults = "trtexec 11.x" if module == "tensorrt" and major >= 11 else f"trtexec {major}.x"
        new_defaults = module == "tensorrt" and major >= 11
        self.cuda_graphs = (new_defaults and not self.data_dependent) if cuda_graphs is None else cuda_graphs
        self.graphs_asked = bool(cuda_graphs)
        self.data_transfers = (not new_defaults) if data_transfers is None else data_transfers
        self.logger = trt.Logger(trt.Logger.ERROR)
        from edgetok.runtime.plugins import prepare_engine

        self.plugins = prepare_engine(trt, path)  # before deserializing: the engine names their creators
        runtime = trt.Runtime(self.logger)
        from edgetok.runtime.plugins import engine_host_code

        if engine_host_code(path):  # edgetok's plugin library serialized into the engine
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EdgetokError(f"{module} could not load {path}: built for another GPU or {module} version? rebuild it here")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.batch = batch
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.io = EngineIO(trt, self.torch, engine, self.context, Path(path).name,
                           "give a --batch (or --inputs) within it, or rebuild the engine with build-engine --batch "
                           "MIN:OPT:MAX covering it")
        self.timer = CudaTimedStep(self.torch)
        self.graph = None

    def input_specs(self):
        specs = {}
        for name in self.inputs:
            shape = list(self.engine.get_tensor_profile_shape(name, 0)[1])  # the profile's opt shape
            shape[0] = self.batch
            specs[name] = (shape, np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).name)
        return specs

    def set_inputs(self, feed):
        torch = self.torch
        self.host_in, self.dev = {}, {}
        for name in self.inputs:
            self.host_in[name] = torch.from_numpy(np.ascontiguousarray(feed[name])).pin_memory()
            self.dev[name] = self.host_in[name].cuda()
            self.io.set_input(name, self.dev[name])
        self.io.bind_outputs()
        if self.io.allocators and self.cuda_graphs:
            if self.graphs_asked:
                raise EdgetokError(f"{self.io.label} has outputs whose shape only the run knows "
                                   f"({', '.join(self.io.allocators)}), which a CUDA graph cannot capture; use "
                                   "--no-cuda-graphs")
            self.cuda_graphs = False  # trtexec 11's default, not asked for
        if self.io.allocators:  # data-dependent outputs: one run tells their shapes, for the host copies
            self._enqueue()
            self.timer.stream.synchronize()
        self.host_out = {}
        for name in self.io.outputs:
            self.dev[name] = self.io.output(name)
            self.host_out[name] = torch.empty(self.dev[name].shape, dtype=self.dev[name].dtype).pin_memory()
        if self.cuda_graphs:
            self._enqueue()  # TensorRT must run once before capture
            self.timer.stream.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.timer.stream):
                self._enqueue()

    def _enqueue(self):
        if not self.context.execute_async_v3(self.timer.stream.cuda_stream):
            from edgetok.runtime.plugins import run_failure

            why = run_failure()
            raise EdgetokError(f"{self.name} could not run the engine: {why or 'execute_async_v3 failed (see its log)'}")

    def infer(self):
        h2d = d2h = None
        if self.data_transfers:
            def h2d():
                for name, host in self.host_in.items():
                    self.dev[name].copy_(host, non_blocking=True)

            def d2h():
                for name, host in self.host_out.items():
                    host.copy_(self.dev[name], non_blocking=True)

        return self.timer.run(h2d, self.graph.replay if self.graph else self._enqueue, d2h)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on new inputs, outputs copied back (for accuracy evaluation, not timing)."""
        self.set_inputs(feed)
        if not self.io.allocators:  # else set_inputs ran it already, to learn the output shapes
            self._enqueue()
            self.timer.stream.synchronize()
        return {name: self.io.output(name).cpu().numpy() for name in self.io.outputs}

    def info(self):
        return {"backend": self.name, "version": self.trt.__version__, "defaults": self.defaults,
                "cuda_graphs": self.cuda_graphs, "data_transfers": self.data_transfers,
                **({"data_dependent_shapes": self.data_dependent} if self.data_dependent else {}),
                "gpu": self.torch.cuda.get_device_name()}


# ----------------------------------------------------------------------------------------- PyTorch eager
class TorchRunner(Runner):
    """The patched PyTorch model, re-created from an export sidecar (or a timm name): eager baseline."""

    name = "torch"

    def __init__(self, model: str, device: str, batch: int, cuda_graphs: bool):
        import torch

        from edgetok.vit import methods
        from edgetok.vit.loading import load_vit
        from edgetok.vit.methods import make_method
        from edgetok.vit.reduction import reduce_vit

        name, checkpoint, img_size, method, kwargs, plugins = model, None, None, "none", {}, False
        if model.endswith(".onnx"):
            side = sidecar.read(model)
            red = dict(side["reduction"])
            name, checkpoint, img_size = side["model"]["name"], side["model"].get("checkpoint"), side["model"]["img_size"]
            method = red.pop("method")
            kwargs = methods.get(method).from_record(red)  # each method says how its sidecar rebuilds it
            # a --plugins export: on a GPU its merges run as the plugin's Triton kernels, on a CPU as standard ops
            plugins = bool((side.get("request") or {}).get("plugins"))
        vit = load_vit(name, checkpoint, img_size)
        attention, sparsity = "dense", None
        if model.endswith(".onnx"):
            from edgetok.vit.attention import Sparsity

            attention = red.get("attention", "dense")
            sparsity = Sparsity(**red["attention_sparsity"]) if red.get("attention_sparsity") else None
        reduce_vit(vit, make_method(method, vit.depth, **kwargs, tokens=vit.num_tokens), plugins=plugins,
                   attention=attention, sparsity=sparsity)
        self.plugins = plugins and device != "cpu"
        if cuda_graphs and device != "cpu" and getattr(vit.blocks[0], "_edgetok_state", None) is not None \
                and getattr(vit.blocks[0]._edgetok_state.method, "data_dependent", False):
            raise EdgetokError(f"{Path(model).name}: {method} keeps a data-dependent number of tokens, which a CUDA "
                               "graph cannot capture; use --no-cuda-graphs")
        self.torch, self.device, self.batch = torch, device, batch
        self.module = vit.module.to("cuda" if device != "cpu" else "cpu")
        self.weights = vit.weights
        self.shape = [batch, vit.in_chans, vit.img_size, vit.img_size]
        self.cuda_graphs = cuda_graphs and device != "cpu"
        if device != "cpu":
            _torch_cuda()
            self.timer = CudaTimedStep(torch)

    def input_specs(self):
        return {"pixel_values": (self.shape, "float32")}

    def set_inputs(self, feed):
        torch = self.torch
        (array,) = feed.values()
        self.host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device == "cpu":
            return
        self.host = self.host.pin_memory()
        self.dev_in = self.host.cuda()
        with torch.no_grad():
            self.dev_out = self.module(self.dev_in)
        self.host_out = torch.empty(self.dev_out.shape, dtype=self.dev_out.dtype).pin_memory()
        self.graph = None
        if self.cuda_graphs:
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph, stream=self.timer.stream):
                self.dev_out = self.module(self.dev_in)

    def _forward(self):
        with self.torch.no_grad():
            self.dev_out = self.module(self.dev_in)

    def infer(self):
        import time

        if self.device == "cpu":
            start = time.perf_counter()
            with self.torch.no_grad():
                self.module(self.host)
            return {"latency": time.perf_counter() - start}
        return self.timer.run(lambda: self.dev_in.copy_(self.host, non_blocking=True),
                              self.graph.replay if self.graph else self._forward,
                              lambda: self.host_out.copy_(self.dev_out, non_blocking=True))

    def info(self):
        info = {"backend": self.name, "version": self.torch.__version__, "weights": self.weights,
                "cuda_graphs": self.cuda_graphs, "threads": self.torch.get_num_threads()}
        if self.device != "cpu":
            info["gpu"] = self.torch.cuda.get_device_name()
        if self.plugins:
            info["plugins"] = "edgetok::TokenMerge as Triton kernels (JIT)"
        return info


# ----------------------------------------------------------------------------------------- selection
BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx", "torch")


def engine_backend(path: str) -> str:
    """Which library built an engine, from its build report (or the name edgetok gave it)."""
    report = Path(f"{path}.build.json")
    if report.is_file():
        return json.loads(report.read_text())["backend"]["name"]
    return "tensorrt-rtx" if ".tensorrt-rtx." in Path(path).name else "tensorrt"


def open_runner(model: str, backend: str, device: str, batch: int | None, threads: int, ep: str | None,
                cuda_graphs: bool | None, data_transfers: bool | None) -> tuple[Runner, int]:
    """The runner for ``model`` (and the batch it will run), refusing combinations that cannot work."""
    path = Path(model)
    is_engine, is_onnx = path.suffix in ENGINE_SUFFIXES, path.suffix == ".onnx"
    if (is_engine or is_onnx) and not path.is_file():
        raise EdgetokError(f"{model} does not exist")
    if not (is_engine or is_onnx or backend in ("torch", "auto")):
        raise EdgetokError(f"{model}: give an .onnx file, an engine (.engine/.plan) or, for --backend torch, a timm name")
    gpu = device in ("cuda", "jetson")
    if backend == "auto":
        backend = engine_backend(model) if is_engine else "onnxruntime" if is_onnx else "torch"
    if is_engine:
        built_by = engine_backend(model)
        if backend != built_by:
            raise EdgetokError(f"{path.name} is a {built_by} engine; --backend {backend} cannot run it: use --backend "
                               f"{built_by} (or auto)")
        if not gpu:
            raise EdgetokError(f"{path.name} is an engine, which runs on a GPU: use --device cuda (or jetson)")
        report = Path(f"{model}.build.json")
        default_batch = (json.loads(report.read_text())["profiles"][0][0]["opt"][0] if report.is_file() else 1)
        batch = batch or default_batch
        return TensorRTEngineRunner(model, built_by.replace("-", "_"), batch, cuda_graphs, data_transfers), batch
    batch = batch or 1
    if backend in ("tensorrt", "tensorrt-rtx"):
        raise EdgetokError(f"--backend {backend} runs engines, not {path.name}: build one with "
                           f"`edgetok build-engine {model} --backend {backend}`")
    if backend == "onnxruntime":
        if not is_onnx:
            raise EdgetokError(f"--backend onnxruntime needs an .onnx file, not {model}")
        return OnnxRuntimeRunner(model, ep or ("cuda" if gpu else "cpu"), threads), batch
    if is_onnx and not sidecar.sidecar_path(model).is_file():
        raise EdgetokError(f"--backend torch re-creates the model from {path.stem}.edgetok.json, which is missing")
    return TorchRunner(model, device, batch, bool(cuda_graphs)), batch


def random_inputs(specs: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for name, (shape, dtype) in specs.items():
        dims = [batch if i == 0 else d for i, d in enumerate(shape)]
        if any(not isinstance(d, int) for d in dims):
            raise EdgetokError(f"input {name} has dynamic dimensions {shape}; give --inputs file.npz")
        if np.issubdtype(np.dtype(dtype), np.floating):
            feed[name] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[name] = rng.integers(0, 2, dims).astype(dtype)
    return feed


def load_inputs(path: str, specs: dict) -> tuple[dict[str, np.ndarray], int]:
    if not os.path.isfile(path):
        raise EdgetokError(f"--inputs {path} does not exist; give an .npz with one array per input")
    try:
        data = dict(np.load(path))
    except Exception as exc:
        raise EdgetokError(f"--inputs {path} is not a readable .npz ({exc})") from None
    missing = [n for n in specs if n not in data]
    if missing:
        raise EdgetokError(f"--inputs {path} lacks input {missing[0]!r} (it has {', '.join(data) or 'nothing'})")
    feed = {n: data[n].astype(specs[n][1]) for n in specs}
    for name, (shape, _) in specs.items():
        got = feed[name].shape
        if len(got) != len(shape) or any(isinstance(s, int) and i > 0 and s != g for i, (s, g) in enumerate(zip(shape, got))):
            raise EdgetokError(f"--inputs {path}: {name} has shape {list(got)}, the model expects {shape}")
    return feed, next(iter(feed.values())).shape[0]
