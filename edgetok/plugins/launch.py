"""Launch a plugin's kernel plan from AOT-compiled Triton cubins with the CUDA driver API (cuda-python).

No torch and no Triton at run time: the engine's process loads the cubin for its GPU from the bundle
(once per CUDA context), packs the arguments the way Triton's own launcher does (declared parameters, then
the two hidden scratch pointers every Triton >= 3.3 entry takes) and launches on TensorRT's stream.
The workspace TensorRT hands ``enqueue`` holds the plan's scratch, then the hidden global and profile
scratch (both sized per launched block, as Triton allocates them); ``workspace_size`` reserves all three.
Argument packing and the workspace layout are pure functions, checkable without a GPU.

Which image runs: the bundle's build whose cubins CUDA's binary compatibility rules let run on the GPU
(``runs_on``); its cubins when the driver (``cuDriverGetVersion``) is new enough for their assembler, else
their PTX, which ``cuModuleLoadData`` JIT-compiles, when the driver supports its ISA (``choose_image``). The
preflight refuses what neither can run, in one line naming the build or driver to get; the launcher also
falls back to the PTX when a driver that should load a cubin refuses it as an image it cannot use.
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


# Compute capabilities of Tegra GPUs (Jetson, DRIVE): TK1, TX1, TX2, Xavier, Orin, Thor (sm_101 until CUDA 13
# renamed it sm_110). CUDA supports cubin binary compatibility on desktop GPUs only: not among Tegra GPUs, and
# not between Tegra and desktop ones (CUDA C++ Programming Guide, "Binary Compatibility").
TEGRA = frozenset({32, 53, 62, 72, 87, 101, 110})


def _target(arch: str, targets: dict | None) -> str:
    """The PTX target of a build ('sm_90a'): from the manifest, else Triton's rule (arch-specific from sm90)."""
    cc = int(arch[2:])
    return (targets or {}).get(arch) or f"sm_{cc}{'a' if cc >= 90 else ''}"


def runs_on(arch: str, capability: int, target: str | None = None) -> bool:
    """Whether the cubins of build ``arch`` ('sm86', PTX target ``target``) run on a GPU of compute capability
    ``capability`` (89), by CUDA's rules: the same capability always; else a desktop build on a desktop GPU
    of the same major version and a higher-or-equal minor one, unless the build is architecture-specific
    (sm_90a and the like run on exactly that capability)."""
    cc = int(arch[2:])
    if cc == capability:
        return True
    if _target(arch, {arch: target} if target else None).endswith("a") or cc in TEGRA or capability in TEGRA:
        return False
    return cc // 10 == capability // 10 and cc < capability


def _why_not(arch: str, capability: int, target: str) -> str | None:
    """Why a build of the GPU's major version does not run on it, for the refusal; None for other majors."""
    cc = int(arch[2:])
    if cc // 10 != capability // 10:
        return None
    if (cc in TEGRA) != (capability in TEGRA):
        return f"{arch} is {'a Tegra' if cc in TEGRA else 'a desktop'} build and Tegra and desktop GPUs do not run each other's cubins"
    if cc in TEGRA:
        return "Tegra cubins run only on the exact GPU they were built for"
    if target.endswith("a"):
        return f"{arch} cubins ({target}) run only on sm{cc}"
    return f"{arch} cubins do not run on the older sm{capability}"


def select_arch(capability: int, available: list[str], where: str = "the cubin bundle",
                targets: dict | None = None) -> str:
    """The bundle's build ('sm86') for a GPU of compute capability ``capability`` (86): the exact one, else
    the newest that ``runs_on`` it (an sm86 desktop build runs on an sm89 GPU; nothing but sm87 runs on an
    Orin). ``targets``: each build's PTX target from the manifest ('sm_90a'). The refusal is one line naming
    the ``plugins build --arch`` to run, or, for a GPU no edgetok build can serve, the export to make."""
    from edgetok.plugins.cubins import ARCHS

    runnable = [a for a in available if runs_on(a, capability, _target(a, targets))]
    if runnable:
        return max(runnable, key=lambda a: int(a[2:]))
    have = ", ".join(available) or "none"
    reasons = [r for a in available if (r := _why_not(a, capability, _target(a, targets)))]
    why = f"; {reasons[0]}" if reasons else ""
    buildable = [a for a in ARCHS if runs_on(a, capability)]
    if capability == 101:  # Thor under a CUDA 12 driver: edgetok's Thor build is CUDA 13's sm110
        raise PluginError(f"this GPU reports sm101: a Thor under a CUDA 12 driver; edgetok's Thor kernels are sm110 "
                          "cubins, which need a CUDA 13 driver: update to JetPack 7")
    if not buildable:
        raise PluginError(f"{where} has no kernels for this GPU (sm{capability}; it has {have}{why}), and edgetok compiles "
                          f"its plugin kernels for {', '.join(ARCHS)} only; export without --plugins for this GPU")
    arch = max(buildable, key=lambda a: int(a[2:]))
    raise PluginError(f"{where} has no kernels that run on this GPU (sm{capability}; it has {have}{why}): run "
                      f"`edgetok plugins build --arch {arch} -o {where}` on a machine with Triton (x86 with torch)")


# Oldest desktop driver branch per CUDA version, for refusals (CUDA Toolkit release notes, Linux)
_BRANCHES = {12000: 525, 12010: 530, 12020: 535, 12030: 545, 12040: 550, 12050: 555, 12060: 560, 12080: 570,
             12090: 575, 13000: 580}


def _driver_hint(version: int) -> str:
    from edgetok.plugins.cubins import cuda_text

    branch = max((b for v, b in _BRANCHES.items() if v <= version), default=None) if version <= 13000 else None
    desktop = f"R{branch}+ on a desktop GPU, " if branch else ""
    return f"update the NVIDIA driver to one for CUDA {cuda_text(version)} or newer ({desktop}a JetPack that brings it on a Jetson)"


@dataclass(frozen=True)
class Image:
    """What the launcher loads for one GPU: build ``arch``'s cubins, or (``kind`` 'ptx') their PTX for the
    driver to JIT-compile, with the reason (``why``)."""
    arch: str
    kind: str = "cubin"
    why: str = ""


def choose_image(bundle, capability: int, driver_version: int, where: str | None = None) -> Image:
    """The build for this GPU (``select_arch``) and whether its cubins or its PTX load under a driver of
    ``driver_version`` (cuDriverGetVersion: 12080 for CUDA 12.8), from what the manifest says each needs;
    one line naming the driver to install when neither does."""
    from edgetok.plugins.cubins import cuda_text

    where = where or str(bundle.path)
    archs = bundle.manifest.get("archs", {})
    arch = select_arch(capability, bundle.archs, where, {a: v.get("target") for a, v in archs.items()})
    info = archs.get(arch, {})
    cubin_needs, ptx_needs = info.get("cubin_driver"), info.get("ptx_driver")
    if cubin_needs is None or driver_version >= cubin_needs:
        return Image(arch)
    have = cuda_text(driver_version)
    cubins = f"the {arch} cubins in {where} come from ptxas {info.get('assembler')} and need a CUDA {cuda_text(cubin_needs)} driver"
    if ptx_needs is not None and driver_version >= ptx_needs:
        return Image(arch, "ptx", f"{cubins}, this one is CUDA {have}: the driver JIT-compiles their PTX "
                                  f"{info.get('ptx_version')} instead (once; it caches the result)")
    needs = min(cubin_needs, ptx_needs) if ptx_needs is not None else cubin_needs
    raise PluginError(f"this GPU's driver is CUDA {have}, but {cubins} (their PTX {info.get('ptx_version')} needs "
                      f"CUDA {cuda_text(ptx_needs or cubin_needs)}): {_driver_hint(needs)}")


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


def driver_version() -> int:
    """The CUDA version the installed driver supports (12060 for 12.6), through the driver API (no torch)."""
    driver = _driver()
    return int(_call("cuDriverGetVersion", driver.cuDriverGetVersion))


def preflight(bundle, capability: int, driver: int) -> Image:
    """Before an engine is deserialized: the bundle matches this edgetok's kernels, has a build that runs
    on this GPU (compute capability ``capability``) under this driver (``driver``, cuDriverGetVersion's
    value), and holds that build's images of every kernel intact, so that enqueue cannot fail on them
    (TensorRT would only log it). Returns what will be loaded. The whole bundle is verified first (every
    member's SHA-256, nothing unlisted, our kernels' parameter layouts: ``cubins.verify``)."""
    bundle.verify()
    image = choose_image(bundle, capability, driver)
    for name in bundle.manifest.get("kernels", {}):
        bundle.image(name, image.arch, image.kind)
    return image


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise PluginError("edgetok plugins launch kernels with cuda-python: pip install cuda-python") from None
    return driver


def _try(what: str, fn, *args) -> tuple:
    """Call a cuda-python driver function: (CUresult, value) with its values unpacked; raises one line only
    when the call itself raises (a missing driver library does so before any CUresult exists)."""
    try:
        result = fn(*args)
    except Exception as exc:
        raise PluginError(f"{what} failed: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    err, *rest = result if isinstance(result, tuple) else (result,)
    return err, rest[0] if len(rest) == 1 else (tuple(rest) or None)


def _error_name(err) -> str:
    driver = _driver()
    name = driver.cuGetErrorName(err)
    return name[1].decode() if name[0] == driver.CUresult.CUDA_SUCCESS else str(err)


def _call(what: str, fn, *args):
    """``_try``, raising one line naming the error on any CUresult but success."""
    err, value = _try(what, fn, *args)
    if err != _driver().CUresult.CUDA_SUCCESS:
        raise PluginError(f"{what} failed: {_error_name(err)}")
    return value


# What cuModuleLoadData answers for an image this driver cannot use (a newer cubin ABI, an unknown target):
# the PTX may still JIT-compile. Any other error is not the image's fault.
_IMAGE_ERRORS = ("CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                 "CUDA_ERROR_INVALID_SOURCE")


class Launcher:
    """Runs kernel plans with one bundle; cubins are loaded once per CUDA context."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._lock = threading.Lock()
        self._initialised = False
        self._contexts: dict[int, dict] = {}  # context -> {"capability", "optin", "image", "functions": {name: ...}}
        self.driver_version = 0

    def _context(self) -> dict:
        driver = _driver()
        if not self._initialised:
            _call("cuInit", driver.cuInit, 0)  # idempotent; TensorRT's runtime has normally done it already
            self.driver_version = int(_call("cuDriverGetVersion", driver.cuDriverGetVersion))
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
                     "optin": get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
                     "image": choose_image(self.bundle, capability, self.driver_version)}
            self._contexts[key] = state
        return state

    def _load(self, state: dict, name: str):
        """The module of kernel ``name``: the cubin, or the PTX for the driver to JIT-compile when the image
        choice says so, or when this driver refuses the cubin as an image it cannot use and takes the PTX."""
        driver = _driver()
        image = state["image"]
        if image.kind == "cubin":
            err, module = _try(f"loading the {name} cubin ({image.arch})", driver.cuModuleLoadData,
                               self.bundle.cubin(name, image.arch))
            if err == driver.CUresult.CUDA_SUCCESS:
                return module
            info = self.bundle.manifest.get("archs", {}).get(image.arch, {})
            fallback = _error_name(err) in _IMAGE_ERRORS and "ptx" in self.bundle.kernel(name)["archs"][image.arch] \
                and self.driver_version >= int(info.get("ptx_driver", 0))
            if not fallback:
                raise PluginError(f"loading the {name} cubin ({image.arch}) failed: {_error_name(err)}")
            state["image"] = image = Image(image.arch, "ptx", f"this driver refused the {image.arch} cubin of {name} "
                                                               f"({_error_name(err)}): JIT-compiling the PTX instead")
        return _call(f"JIT-compiling the {name} PTX ({image.arch})", driver.cuModuleLoadData,
                     self.bundle.ptx(name, image.arch))

    def _function(self, state: dict, name: str) -> tuple:
        """(module, function, launch facts) of kernel ``name`` in this context, loading its cubin once."""
        if name in state["functions"]:
            return state["functions"][name]
        driver = _driver()
        meta = self.bundle.kernel(name)
        info = meta["archs"][state["image"].arch]
        module = self._load(state, name)
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
