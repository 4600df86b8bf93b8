"""Run Triton kernels in the interpreter (CPU tensors) for the whole test session.

Triton reads TRITON_INTERPRET when functions are decorated with ``@triton.jit``, and triton.language's own
helpers are decorated when triton is first imported, so this must happen before any test module (or torch
feature) imports triton; pytest imports this file first. An explicit TRITON_INTERPRET=0 (a GPU run of the
kernel tests on CUDA tensors) is left alone. AOT compiles still work: edgetok.plugins.cubins compiles in a
child process without the variable.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
    raise RuntimeError("triton was imported before tests/conftest.py set TRITON_INTERPRET=1: the Triton kernel tests "
                       "could not run on CPU tensors; find what imports triton at pytest start-up")
