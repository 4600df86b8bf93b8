"""The engine-builder backends behind one interface, chosen by name or by what is installed.

A backend turns the shared BuildOptions into the library's settings. It is used on both sides of
the process boundary: in the parent it checks options and says what it will do (no TensorRT
import needed, so the mapping is testable anywhere); in the child it builds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgetok.engine.options import BuildOptions
from edgetok.errors import EdgetokError


class Backend:
    name: str
    module: str  # the Python module of the library
    install_hint: str
    polygraphy_rtx: bool  # polygraphy's POLYGRAPHY_USE_TENSORRT_RTX switch

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str | None:
        from importlib import metadata

        for dist in (self.module.replace("_", "-"), f"{self.module.replace('_', '-')}-cu13", f"{self.module}-cu12"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    def require(self) -> None:
        if not self.available():
            raise EdgetokError(f"backend {self.name} is not installed: {self.install_hint}")

    def prepare(self) -> None:
        """Fix what the installed library needs before a build (parent side)."""

    def strongly_typed(self, version: str | None) -> bool:
        """Strongly typed networks take precision from the ONNX, so fp16 means converting it first."""
        return True

    def check(self, opts: BuildOptions, version: str | None) -> None:
        """Refuse options this backend cannot honour, before any build starts."""
        if opts.workspace is not None and opts.workspace < 1:
            raise EdgetokError(f"--workspace {opts.workspace} must be a positive number of MiB")
        if opts.precision == "bf16" and self.strongly_typed(version):
            raise EdgetokError(
                f"--precision bf16 with {self.name} {version or ''} needs a bf16 ONNX (strongly typed network), "
                "which edgetok cannot convert to yet; use fp16 or fp32"
            )

    def config(self, opts: BuildOptions, version: str | None) -> dict:
        """Library-neutral builder settings; the child maps names to the library's enums."""
        settings: dict = {"strongly_typed": self.strongly_typed(version)}
        if opts.workspace is not None:
            settings["memory_pool_limits"] = {"WORKSPACE": opts.workspace << 20}
        if opts.opt_level is not None:
            settings["builder_optimization_level"] = opts.opt_level
        return settings

    def notes(self, opts: BuildOptions) -> dict:
        """What the report records about caches and targets."""
        return {}


class TensorRT(Backend):
    """TensorRT >= 10 (Jetson, datacenter): builds for the GPU it runs on; timing cache; DLA."""

    name = "tensorrt"
    module = "tensorrt"
    install_hint = "pip install 'edgetok[tensorrt]' (x86_64 with CUDA) or use JetPack's TensorRT on Jetson"
    polygraphy_rtx = False

    def strongly_typed(self, version: str | None) -> bool:
        return version is not None and int(version.split(".")[0]) >= 11  # 11.x removed BuilderFlag.FP16

    def check(self, opts: BuildOptions, version: str | None) -> None:
        super().check(opts, version)
        if opts.targets:
            raise EdgetokError(
                f"--target {','.join(opts.targets)}: TensorRT builds for the GPU it runs on; "
                "compute-capability targets are a TensorRT-RTX option (--backend tensorrt-rtx)"
            )
        if opts.dla_core is not None and opts.dla_core < 0:
            raise EdgetokError(f"--dla-core {opts.dla_core} must be >= 0 (Orin has DLA cores 0 and 1)")

    def config(self, opts: BuildOptions, version: str | None) -> dict:
        settings = super().config(opts, version)
        if opts.precision in ("fp16", "bf16") and not self.strongly_typed(version):
            settings[opts.precision] = True
        if opts.timing_cache:
            settings["load_timing_cache"] = opts.timing_cache
        if opts.dla_core is not None:
            settings.update(use_dla=True, allow_gpu_fallback=True, dla_core=opts.dla_core)
        return settings

    def notes(self, opts: BuildOptions) -> dict:
        return {"timing_cache": opts.timing_cache, "dla_core": opts.dla_core}


# TensorRT-RTX compute capabilities, as named by its ComputeCapability enum.
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


class TensorRTRTX(Backend):
    """TensorRT-RTX (desktop RTX): AOT build anywhere, JIT on the user's GPU; strongly typed networks
    (precision comes from the ONNX); compute-capability targets; a runtime cache instead of a
    timing cache; no DLA."""

    name = "tensorrt-rtx"
    module = "tensorrt_rtx"
    install_hint = "pip install 'edgetok[tensorrt-rtx]' (or: pip install tensorrt-rtx)"
    polygraphy_rtx = True

    def prepare(self) -> None:
        """The wheel ships only libtensorrt_rtx.so.1, but the ONNX parser dlopens libtensorrt_rtx.so
        when it meets a plugin node and aborts the process if it is missing: add the link."""
        spec = importlib.util.find_spec("tensorrt_rtx_libs")
        if spec is None or not spec.submodule_search_locations:
            return
        folder = Path(list(spec.submodule_search_locations)[0])
        link, target = folder / "libtensorrt_rtx.so", folder / "libtensorrt_rtx.so.1"
        if target.exists() and not link.exists():
            try:
                link.symlink_to(target.name)
            except OSError as exc:
                raise EdgetokError(
                    f"cannot create {link} ({exc.strerror}); run: ln -s {target.name} {link}"
                ) from None

    def check(self, opts: BuildOptions, version: str | None) -> None:
        super().check(opts, version)
        unknown = [t for t in opts.targets if t not in RTX_TARGETS]
        if unknown:
            raise EdgetokError(
                f"--target {unknown[0]} is not a TensorRT-RTX compute capability; choose from {', '.join(RTX_TARGETS)}"
            )
        if opts.dla_core is not None:
            raise EdgetokError(f"--dla-core {opts.dla_core}: DLA exists only on Jetson; use --backend tensorrt there")

    def config(self, opts: BuildOptions, version: str | None) -> dict:
        settings = super().config(opts, version)
        if opts.targets:
            settings["compute_capabilities"] = [(int(t[2:-1]), int(t[-1])) for t in opts.targets]
        return settings

    def notes(self, opts: BuildOptions) -> dict:
        return {"runtime_cache": opts.timing_cache, "targets": opts.targets or "default (SM 8.0, 8.6, 8.9, 12.0)"}


BACKENDS = {b.name: b for b in (TensorRT(), TensorRTRTX())}


def select(name: str) -> tuple[Backend, str | None]:
    """The backend for ``name``; for ``auto``, TensorRT where it imports, else TensorRT-RTX, and why."""
    if name == "auto":
        for candidate in BACKENDS.values():
            if candidate.available():
                return candidate, f"--backend auto chose {candidate.name} ({candidate.module} is installed)"
        raise EdgetokError(
            "no engine builder is installed: pip install 'edgetok[tensorrt-rtx]' (any machine) or "
            "'edgetok[tensorrt]' (NVIDIA GPU / Jetson)"
        )
    if name not in BACKENDS:
        raise EdgetokError(f"--backend {name!r} is unknown; choose auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    backend.require()
    return backend, None
