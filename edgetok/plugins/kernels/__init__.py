"""Triton kernels of the plugins: one module per plugin (named by its spec's ``kernels``), the same source
run three ways: under ``TRITON_INTERPRET=1`` on CPU tensors (tests, ``plugins check``), JIT on CUDA tensors
(``plugins check --device cuda``, the GPU bench), and compiled ahead of time to cubins that the TensorRT
plugins launch through cuda-python (no Triton, no torch at run time).

A plugin has two modules here: ``<name>.py``, its ``@triton.jit`` kernels, and ``<name>_plan.py`` (no Triton),
defining ``KERNELS`` (every kernel, with the parameter types and block sizes it is compiled with) and
``plan(shapes, fields)``: the launches one plugin call makes (kernel, grid, arguments) and the scratch it
needs. The plan is plain data, so the Triton launcher here and the cubin launcher (edgetok/plugins/launch.py,
which runs where Triton is absent) make the very same launches.
"""

from __future__ import annotations

import importlib

from edgetok.plugins.kernels.launches import Buffer, Kernel, KernelPlan, Launch  # noqa: F401  (the plans' parts, read here)


def module(spec):
    """The launch-plan module of a plugin spec (``KERNELS``, ``plan``); it does not import Triton."""
    return importlib.import_module(f"{__name__}.{spec.kernels}_plan")



def interpreting() -> bool:
    """Whether Triton was imported in interpreter mode in this process. TRITON_INTERPRET is read when a
    function is decorated with ``@triton.jit``, and triton.language's own helpers (tl.zeros, tl.sum, ...) are
    decorated when triton is first imported: the variable must be set before anything imports triton, and
    setting or clearing it later changes nothing. (Importing triton here fixes the mode if it was not yet.)"""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


INTERPRET_HINT = ("set TRITON_INTERPRET=1 before anything imports triton (tests: tests/conftest.py does), "
                  "or pass CUDA tensors")


def _scalars(kernel: Kernel) -> list[str]:
    return [name for name, ty in kernel.params if not ty.startswith("*")]


def python_fn(kernel: Kernel):
    """The undecorated Python function of a kernel (JITFunction and InterpretedFunction both keep it in .fn)."""
    fn = kernel.fn
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


_WRAPPED: dict = {}


def jit_fn(kernel: Kernel):
    """A compiling JITFunction of ``kernel`` (AOT compiles and CUDA runs need one; not in interpreter mode).
    Scalars are not specialised (no value-1 / divisible-by-16 variants), as in the cubins; pointer alignment
    still may be, so a JIT run checks the kernels' source, and bench/plugins_cuda.py checks the cubins
    against it."""
    from triton.runtime.jit import JITFunction

    key = (kernel.name, "jit")
    if key not in _WRAPPED:
        _WRAPPED[key] = JITFunction(python_fn(kernel), do_not_specialize=_scalars(kernel))
    return _WRAPPED[key]


def interpreted_fn(kernel: Kernel):
    """The kernel as an interpreter function (each program run in numpy on host copies of the tensors); also
    right when the kernels module was imported before TRITON_INTERPRET was set but triton after."""
    from triton.runtime.interpreter import InterpretedFunction

    key = (kernel.name, "interpret")
    if key not in _WRAPPED:
        _WRAPPED[key] = kernel.fn if isinstance(kernel.fn, InterpretedFunction) else InterpretedFunction(python_fn(kernel))
    return _WRAPPED[key]


def run_torch(spec, inputs: list, fields: dict, scratch_regions: bool = False):
    """Run a plugin's kernel plan on torch tensors and return its outputs (in the spec's dtypes). In interpreter
    mode every tensor goes through the interpreter (CUDA ones copied to the host and back: right, slow);
    otherwise CUDA tensors run JIT-compiled, with the same launches, grids and block sizes as the cubins, and
    CPU tensors are an error (the interpreter cannot be switched on once triton is imported).

    Data-dependent outputs are handled as TensorRT does: each is allocated flat at its upper bound, the kernels
    write it packed at the size they count, and only then (reading the size tensors back, a sync) is it cut
    to that size and shaped: a view of the leading elements, not a narrow, because a packed [B, K, C] at the
    computed K is not the first K rows of a [B, N, C]."""
    import math

    import torch

    from edgetok.plugins.spec import PluginError

    devices = {t.device for t in inputs}
    if len(devices) != 1:
        raise PluginError(f"{spec.name}: inputs are on different devices ({', '.join(sorted(map(str, devices)))})")
    device = devices.pop()
    interpret = interpreting()
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        raise PluginError(f"{spec.name}: Triton kernels on {device.type} tensors need the Triton interpreter: "
                          + INTERPRET_HINT)
    inputs = [t.contiguous() for t in inputs]
    shapes = [tuple(t.shape) for t in inputs]
    fields = spec.validate(shapes, fields, [str(t.dtype).removeprefix("torch.") for t in inputs])
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    upper = spec.concrete_shapes(shapes, fields)
    outputs = [torch.empty(math.prod(dims), dtype=dtypes[t.dtypes[0]], device=device).view(dims if t.size_tensor else -1)
               for t, dims in zip(spec.outputs, upper)]
    kernel_plan = module(spec).plan(shapes, fields)
    scratch = torch.empty(max(kernel_plan.scratch_bytes, 256), dtype=torch.uint8, device=device)

    def arg(value):
        if not isinstance(value, Buffer):
            return value
        if value.kind == "input":
            return inputs[value.index]
        if value.kind == "output":
            return outputs[value.index]
        return scratch[value.index:value.index + 4 * value.count].view(dtypes[value.dtype])

    for launch in kernel_plan.launches:
        fn = interpreted_fn(launch.kernel) if interpret else jit_fn(launch.kernel)
        fn[launch.grid](*(arg(a) for a in launch.args), **launch.kernel.constexprs, num_warps=launch.kernel.num_warps)
    sizes = {i: int(outputs[i].item()) for i in spec.size_outputs()}
    for i, dims in enumerate(spec.concrete_shapes(shapes, fields, sizes)):
        if min(dims, default=0) < 0 or math.prod(dims) > outputs[i].numel():
            raise PluginError(f"{spec.name}: the kernels counted output {spec.outputs[i].name} as {dims}, beyond "
                              f"its declared upper bound {upper[i]}: a kernel bug")
        outputs[i] = outputs[i].reshape(-1)[:math.prod(dims)].view(dims)
    if scratch_regions:  # the intermediate results, for checking each kernel on its own
        return outputs, {name: arg(buffer) for name, buffer in kernel_plan.regions.items()}
    return outputs
