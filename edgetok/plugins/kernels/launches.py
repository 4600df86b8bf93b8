"""What a plugin's launch plan is made of: the kernels (``Kernel``), the buffers their pointers point at
(``Buffer``), one launch (``Launch``) and a call's launches with its scratch (``KernelPlan``). Plain data: the
Triton launcher (``edgetok.plugins.kernels``) and the cubin launcher (``edgetok.plugins.launch``) read the same.

Why apart from ``edgetok.plugins.kernels``: that package finds a plugin's ``<name>_plan`` module by name, and
every plan module builds these; in one module the package and its plans would import each other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kernel:
    name: str  # the @triton.jit function of this name in ``source``; the compiled entry point has it too
    source: str  # module holding the Triton source, imported only to run or compile the kernel
    params: tuple[tuple[str, str], ...]  # declared (name, Triton type: "*fp32", "*i32", "i32", "fp32"), in order
    constexprs: dict = field(default_factory=dict)  # block sizes, fixed so that one cubin serves every shape
    num_warps: int = 4
    writes: tuple[str, ...] = ()  # scratch regions / outputs it computes: what `plugins check` compares per kernel

    @property
    def fn(self):
        return getattr(importlib.import_module(self.source), self.name)


@dataclass(frozen=True)
class Buffer:
    """What a pointer argument points at: an input, an output, or a region of the scratch (byte offset)."""
    kind: str  # "input" | "output" | "scratch"
    index: int  # input/output position, or the byte offset into the scratch
    dtype: str = "float32"  # scratch element type: "float32" | "int32"
    count: int = 0  # scratch elements


@dataclass(frozen=True)
class Launch:
    kernel: Kernel
    grid: tuple[int, int, int]
    args: tuple  # one per declared parameter: a Buffer for a pointer, an int or float for a scalar


@dataclass(frozen=True)
class KernelPlan:
    launches: tuple[Launch, ...]
    scratch_bytes: int
    regions: dict = field(default_factory=dict)  # scratch region name -> Buffer
