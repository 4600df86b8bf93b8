"""Launch a plugin's kernel plan from AOT-compiled Triton cubins with the CUDA driver API (cuda-python).

No torch and no Triton at run time: the engine's process loads the cubin for its GPU from the bundle
(once per CUDA context), packs the arguments the way Triton's own launcher does (declared parameters, then
the two hidden scratch pointers every Triton >= 3.3 entry takes) and launches on TensorRT's stream.
The workspace TensorRT hands ``enqueue`` holds the plan's scratch, then the hidden global and profile
scratch (both sized per launched block, as Triton allocates them); ``workspace_size`` reserves all three.
Argument packing and the workspace layout are pure functions, checkable without a GPU.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from edgetok.plugins.kernels import Buffer, KernelPlan, Launch
from edgetok.plugins.spec import PluginError

ALIGN = 256  # cudaMalloc's alignment: every region of the workspace starts on it
HIDDEN = 2  # global scratch, profile scratch
_DEFAULT_SHARED = 48 * 1024  # above this a kernel must opt in to dynamic shared memory

_SCALARS = {
    "i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
    "u1": ctypes.c_uint8, "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
    "fp32": ctypes.c_float, "f32": ctypes.c_float, "fp64": ctypes.c_double, "f64": ctypes.c_double,
}


def align(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


def ctype(type_: str):
    """The C type a kernel parameter is passed as: pointers as void*, scalars by their width."""
    if type_.startswith("*"):
        return ctypes.c_void_p
    if type_ not in _SCALARS:
        raise PluginError(f"kernel parameter type {type_!r} cannot be passed from Python; use pointers, i32 or fp32")
    return _SCALARS[type_]


def pack_args(params: list[dict], values: list) -> list:
    """One C object per manifest parameter ({"name", "type"}; hidden ones included), in order; a pointer
    value of None or 0 is NULL."""
    if len(params) != len(values):
        raise PluginError(f"the kernel takes {len(params)} parameters (hidden scratch pointers included), "
                          f"got {len(values)} values: the cubin bundle does not match this edgetok")
    packed = []
    for param, value in zip(params, values):
        kind = ctype(param["type"])
        if kind is ctypes.c_void_p:
            packed.append(ctypes.c_void_p(int(value) if value else None))
        elif kind in (ctypes.c_float, ctypes.c_double):
            packed.append(kind(float(value)))
        else:
            packed.append(kind(int(value)))
    return packed


def pointer_array(packed: list):
    """The ``void**`` cuLaunchKernel reads (the objects in ``packed`` must outlive the call)."""
    return (ctypes.c_void_p * len(packed))(*[ctypes.addressof(p) for p in packed])


def blocks(grid) -> int:
    x, y, z = (tuple(grid) + (1, 1))[:3]
    return int(x) * int(y) * int(z)


@dataclass(frozen=True)
class Layout:
    """Byte offsets into the workspace: the plan's scratch at 0, then the hidden scratch regions."""
    global_offset: int
    profile_offset: int
    total: int


def layout(plan: KernelPlan, hidden_sizes) -> Layout:
    """``hidden_sizes(kernel_name) -> (global_scratch_size, profile_scratch_size)`` per block. Launches run one
    after another on one stream, so they share the hidden regions: each is sized for the largest launch."""
    glob = prof = 0
    for launch in plan.launches:
        g, p = hidden_sizes(launch.kernel.name)
        glob = max(glob, blocks(launch.grid) * int(g))
        prof = max(prof, blocks(launch.grid) * int(p))
    start = align(plan.scratch_bytes)
    return Layout(start, start + align(glob), start + align(glob) + align(prof))


def hidden_sizes_any_arch(bundle):
    """Hidden scratch per block, the most any architecture of the bundle needs: an engine is built before
    the GPU it will run on is known."""
    def sizes(name: str) -> tuple[int, int]:
        infos = list(bundle.kernel(name)["archs"].values()) or [{}]
        return (max(int(i.get("global_scratch_size", 0)) for i in infos),
                max(int(i.get("profile_scratch_size", 0)) for i in infos))
    return sizes


def workspace_size(plan: KernelPlan, bundle) -> int:
    """Workspace bytes for ``plan`` (computed at the profile's max dims) on any GPU the bundle serves."""
    return layout(plan, hidden_sizes_any_arch(bundle)).total


def resolve(launch: Launch, inputs, outputs, workspace: int) -> list:
    """Device addresses and scalars for the declared parameters of one launch."""
    values = []
    for arg in launch.args:
        if isinstance(arg, Buffer):
            if arg.kind == "input":
                values.append(int(inputs[arg.index]))
            elif arg.kind == "output":
                values.append(int(outputs[arg.index]))
            elif arg.kind == "scratch":
                values.append(int(workspace) + arg.index)
            else:
                raise PluginError(f"kernel {launch.kernel.name}: unknown buffer kind {arg.kind!r}")
        else:
            values.append(arg)
    return values


def launch_values(launch: Launch, inputs, outputs, workspace: int, where: Layout, info: dict) -> list:
    """All parameter values of one launch: declared, then the hidden scratch pointers (NULL when unused)."""
    hidden = [workspace + where.global_offset if int(info.get("global_scratch_size", 0)) else None,
              workspace + where.profile_offset if int(info.get("profile_scratch_size", 0)) else None]
    return resolve(launch, inputs, outputs, workspace) + hidden


def select_arch(capability: int, available: list[str], where: str = "the cubin bundle") -> str:
    """The bundle's build ('sm86') for a GPU of compute capability ``capability`` (86): the exact one, else,
    below sm90 (whose Triton cubins are architecture-specific, sm_90a), the newest of the same major that is
    not newer (an sm86 cubin runs on sm89)."""
    from edgetok.plugins.cubins import ARCHS

    numbers = {int(a[2:]): a for a in available}
    if capability in numbers:
        return numbers[capability]
    same = [n for n in numbers if n // 10 == capability // 10 and n <= capability < 90]
    if same:
        return numbers[max(same)]
    have = ", ".join(available) or "none"
    if f"sm{capability}" not in ARCHS:
        raise PluginError(f"{where} has no kernels for this GPU (sm{capability}; it has {have}), and edgetok compiles "
                          f"its plugin kernels for {', '.join(ARCHS)} only; export without --plugins for this GPU")
    raise PluginError(f"{where} has no kernels for this GPU (sm{capability}; it has {have}): run `edgetok plugins "
                      f"build --arch sm{capability} -o {where}` on a machine with Triton (x86 with torch)")


def device_capability(ordinal: int = 0) -> int:
    """Compute capability (87 for sm87) of CUDA device ``ordinal``, through the driver API (no torch)."""
    driver = _driver()
    _call("cuInit", driver.cuInit, 0)
    device = _call("cuDeviceGet", driver.cuDeviceGet, ordinal)
    attr = driver.CUdevice_attribute
    major = _call("cuDeviceGetAttribute", driver.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    minor = _call("cuDeviceGetAttribute", driver.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    return 10 * int(major) + int(minor)


def preflight(bundle, capability: int) -> str:
    """Before an engine is deserialized: the bundle matches this edgetok's kernels and holds intact cubins of
    every kernel for this GPU, so that enqueue cannot fail on them (TensorRT would only log it). Returns
    the architecture whose cubins will run."""
    bundle.check_current()
    arch = select_arch(capability, bundle.archs, str(bundle.path))
    for name in bundle.manifest.get("kernels", {}):
        bundle.cubin(name, arch)
    return arch


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise PluginError("edgetok plugins launch kernels with cuda-python: pip install cuda-python") from None
    return driver


def _call(what: str, fn, *args):
    """Call a cuda-python driver function and unpack its (CUresult, *values), raising one line on failure
    (a missing driver library raises before any CUresult exists)."""
    driver = _driver()
    try:
        result = fn(*args)
    except Exception as exc:
        raise PluginError(f"{what} failed: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)
        name = name[1].decode() if name[0] == driver.CUresult.CUDA_SUCCESS else str(err)
        raise PluginError(f"{what} failed: {name}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


class Launcher:
    """Runs kernel plans with one bundle; cubins are loaded once per CUDA context."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._lock = threading.Lock()
        self._initialised = False
        self._contexts: dict[int, dict] = {}  # context -> {"capability", "optin", "functions": {name: ...}}

    def _context(self) -> dict:
        driver = _driver()
        if not self._initialised:
            _call("cuInit", driver.cuInit, 0)  # idempotent; TensorRT's runtime has normally done it already
            self._initialised = True
        key = int(_call("cuCtxGetCurrent", driver.cuCtxGetCurrent) or 0)
        if not key:
            raise PluginError("no current CUDA context in enqueue; run the engine with TensorRT's runtime")
        state = self._contexts.get(key)
        if state is None:
            device = _call("cuCtxGetDevice", driver.cuCtxGetDevice)
            attr = driver.CUdevice_attribute

            def get(which):
                return int(_call("cuDeviceGetAttribute", driver.cuDeviceGetAttribute, which, device))

            capability = 10 * get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) + \
                get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            state = {"capability": capability, "functions": {},
                     "optin": get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)}
            self._contexts[key] = state
        return state

    def _function(self, state: dict, name: str) -> tuple:
        """(module, function, launch facts) of kernel ``name`` in this context, loading its cubin once."""
        if name in state["functions"]:
            return state["functions"][name]
        driver = _driver()
        meta = self.bundle.kernel(name)
        arch = select_arch(state["capability"], list(meta["archs"]))
        info = meta["archs"][arch]
        module = _call(f"loading the {name} cubin ({arch})", driver.cuModuleLoadData, self.bundle.cubin(name, arch))
        entry = info.get("entry") or name
        fn = _call(f"cuModuleGetFunction {entry}", driver.cuModuleGetFunction, module, entry.encode())
        shared = int(info.get("shared", 0))
        if shared > _DEFAULT_SHARED:  # as Triton's launcher: opt in to all the shared memory the GPU allows
            if shared > state["optin"]:
                raise PluginError(f"kernel {name} needs {shared} bytes of shared memory; this GPU allows {state['optin']}")
            attr = driver.CUfunction_attribute
            static = int(_call("cuFuncGetAttribute", driver.cuFuncGetAttribute, attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn))
            _call(f"cuFuncSetAttribute {name}", driver.cuFuncSetAttribute, fn,
                  attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, state["optin"] - static)
        facts = {"params": meta["params"], "threads": 32 * int(info.get("num_warps", meta.get("num_warps", 4))),
                 "shared": shared, "global_scratch_size": int(info.get("global_scratch_size", 0)),
                 "profile_scratch_size": int(info.get("profile_scratch_size", 0))}
        state["functions"][name] = (module, fn, facts)
        return state["functions"][name]

    def run(self, plan: KernelPlan, inputs, outputs, workspace: int, stream: int) -> None:
        """Launch every kernel of ``plan`` on ``stream`` (TensorRT's), in order."""
        driver = _driver()
        with self._lock:
            state = self._context()
            loaded = {launch.kernel.name: self._function(state, launch.kernel.name) for launch in plan.launches}
        where = layout(plan, lambda name: (loaded[name][2]["global_scratch_size"], loaded[name][2]["profile_scratch_size"]))
        handle = driver.CUstream(int(stream))
        for launch in plan.launches:
            if blocks(launch.grid) == 0:
                continue
            _, fn, facts = loaded[launch.kernel.name]
            packed = pack_args(facts["params"], launch_values(launch, inputs, outputs, workspace, where, facts))
            array = pointer_array(packed)
            gx, gy, gz = (tuple(launch.grid) + (1, 1))[:3]
            _call(f"launching {launch.kernel.name}", driver.cuLaunchKernel, fn, gx, gy, gz, facts["threads"], 1, 1,
                  facts["shared"], handle, ctypes.addressof(array), 0)
