"""The backend interface without any TensorRT library: option mapping, refusals, auto selection."""

import pytest

from edgetok.engine import backend as backends
from edgetok.engine.backend import TensorRT, TensorRTRTX, select
from edgetok.engine.options import BuildOptions, parse_batch, parse_shapes, parse_targets
from edgetok.errors import EdgetokError


def opts(**kw):
    return BuildOptions(onnx="m.onnx", **kw)


def test_tensorrt_10_maps_precision_to_builder_flags_and_keeps_weak_typing():
    o = opts(precision="fp16", workspace=1024, opt_level=5, timing_cache="tc.cache", dla_core=1)
    TensorRT().check(o, "10.3.0")
    assert TensorRT().config(o, "10.3.0") == {
        "strongly_typed": False, "fp16": True, "memory_pool_limits": {"WORKSPACE": 1024 << 20},
        "builder_optimization_level": 5, "load_timing_cache": "tc.cache",
        "use_dla": True, "allow_gpu_fallback": True, "dla_core": 1,
    }
    assert TensorRT().notes(o) == {"timing_cache": "tc.cache", "dla_core": 1}


def test_tensorrt_11_is_strongly_typed_so_precision_comes_from_the_onnx():
    o = opts(precision="fp16")
    assert TensorRT().strongly_typed("11.4.1") and not TensorRT().strongly_typed("10.16.0")
    assert TensorRT().config(o, "11.4.1") == {"strongly_typed": True}
    TensorRT().check(opts(precision="bf16"), "10.3.0")  # a builder flag on 10.x
    with pytest.raises(EdgetokError, match="bf16"):
        TensorRT().check(opts(precision="bf16"), "11.4.1")


def test_tensorrt_refuses_rtx_only_options():
    with pytest.raises(EdgetokError, match="--target sm86.*TensorRT-RTX"):
        TensorRT().check(opts(targets=["sm86"]), "10.3.0")
    with pytest.raises(EdgetokError, match="--dla-core -1"):
        TensorRT().check(opts(dla_core=-1), "10.3.0")


def test_rtx_maps_targets_and_the_runtime_cache():
    o = opts(precision="fp16", targets=["sm86", "sm89", "sm120"], timing_cache="rt.cache", workspace=256)
    TensorRTRTX().check(o, "1.7.1.116")
    assert TensorRTRTX().config(o, "1.7.1.116") == {
        "strongly_typed": True, "memory_pool_limits": {"WORKSPACE": 256 << 20},
        "compute_capabilities": [(8, 6), (8, 9), (12, 0)],
    }
    assert TensorRTRTX().notes(o)["runtime_cache"] == "rt.cache"
    for bad, match in [(opts(targets=["sm87"]), "sm87"), (opts(dla_core=0), "DLA"),
                       (opts(precision="bf16"), "bf16")]:
        with pytest.raises(EdgetokError, match=match):
            TensorRTRTX().check(bad, "1.7.1.116")


def test_auto_prefers_tensorrt_then_rtx_and_says_which(monkeypatch):
    installed = {"tensorrt": True, "tensorrt_rtx": True}
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    chosen, why = select("auto")
    assert chosen.name == "tensorrt" and "tensorrt" in why
    installed["tensorrt"] = False
    assert select("auto")[0].name == "tensorrt-rtx"
    installed["tensorrt_rtx"] = False
    with pytest.raises(EdgetokError, match="pip install"):
        select("auto")
    with pytest.raises(EdgetokError, match="tensorrt-rtx is not installed.*pip install"):
        select("tensorrt-rtx")


def test_profile_parsing():
    assert parse_batch("1:8:32") == (1, 8, 32) and parse_batch("4") == (4, 4, 4)
    profile = parse_shapes("pixel_values:1x3x224x224:8x3x224x224:32x3x224x224")
    assert (profile.name, profile.min, profile.max) == ("pixel_values", [1, 3, 224, 224], [32, 3, 224, 224])
    assert parse_targets(["sm86,SM89", "sm120"]) == ["sm86", "sm89", "sm120"]
    for bad in ["8:1", "a:b:c", "0:1:1"]:
        with pytest.raises(EdgetokError):
            parse_batch(bad)
    with pytest.raises(EdgetokError, match="MIN <= OPT <= MAX"):
        parse_shapes("x:8x3:1x3:1x3")


def test_rtx_prepare_adds_the_parser_symlink(tmp_path, monkeypatch):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"")

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: Spec())
    TensorRTRTX().prepare()
    link = tmp_path / "libtensorrt_rtx.so"
    assert link.is_symlink() and str(link.readlink()) == "libtensorrt_rtx.so.1"
    TensorRTRTX().prepare()  # idempotent


# ---- binding an engine's tensors (edgetok.runtime.runners.EngineIO), against a stand-in of TensorRT's Python API
class _Allocator:
    """tensorrt.IOutputAllocator's Python base: subclasses call its __init__ and override the callbacks."""

    def __init__(self):
        pass


def _stand_in_tensorrt():
    import types

    trt = types.ModuleType("tensorrt")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64", BOOL="BOOL")
    trt.IOutputAllocator = _Allocator
    return trt


class _Engine:
    """pixel_values [1..8, 3, 4, 4] -> logits [B, 10] and, data-dependent (-1 until the run), the tokens each
    image kept as int32 [K]."""

    tensors = {"pixel_values": ("INPUT", "FLOAT"), "logits": ("OUTPUT", "FLOAT"), "kept": ("OUTPUT", "INT32")}
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4)]


class _Context:
    """What TensorRT's IExecutionContext does with bindings: False for a shape outside the profile or a name
    it does not know; -1 in get_tensor_shape for a data-dependent output, whose memory the run asks its output
    allocator for (reallocate_output_async), then reports the shape (notify_shape)."""

    def __init__(self, engine, kept):
        self.engine, self.kept, self.shapes, self.addresses, self.allocators = engine, kept, {}, {}, {}

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return {"logits": (self.shapes["pixel_values"][0], 10), "kept": (-1,)}[name]

    def set_tensor_address(self, name, pointer):
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = pointer
        return True

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

    def execute_async_v3(self, stream):
        import ctypes

        for name, allocator in self.allocators.items():
            pointer = allocator.reallocate_output_async(name, 0, self.kept.nbytes, 256, stream)
            ctypes.memmove(pointer, self.kept.ctypes.data, self.kept.nbytes)
            allocator.notify_shape(name, self.kept.shape)
        return True


def _io(kept=None):
    import numpy as np
    import torch

    from edgetok.runtime.runners import EngineIO

    engine = _Engine()
    context = _Context(engine, np.array([65, 40, 33] if kept is None else kept, np.int32))
    return EngineIO(_stand_in_tensorrt(), torch, engine, context, "vit.engine", "give a --batch within it",
                    device="cpu"), context


def test_an_input_outside_the_profile_is_refused_in_one_line_naming_shape_and_range():
    import torch

    io, _ = _io()
    with pytest.raises(EdgetokError) as err:
        io.set_input("pixel_values", torch.zeros(9, 3, 4, 4))
    assert str(err.value) == ("vit.engine: input pixel_values of shape [9, 3, 4, 4] is outside the engine's profile "
                              "(from [1, 3, 4, 4] to [8, 3, 4, 4]); give a --batch within it")
    with pytest.raises(EdgetokError, match=r"refused address 0x\w+ for tensor pixel_value \(set_tensor_address "
                                           r"returned False"):
        io.address("pixel_value", 256)


def test_data_dependent_outputs_go_through_the_output_allocator():
    import numpy as np
    import torch

    io, context = _io()
    pixels = torch.zeros(3, 3, 4, 4)
    io.set_input("pixel_values", pixels)
    io.bind_outputs()
    assert context.addresses == {"pixel_values": pixels.data_ptr(), "logits": io.tensors["logits"].data_ptr()}
    assert io.tensors["logits"].shape == (3, 10) and list(context.allocators) == ["kept"]
    assert context.allocators["kept"] is io.allocators["kept"]  # an IOutputAllocator of this library
    assert isinstance(io.allocators["kept"], _Allocator)
    with pytest.raises(EdgetokError, match="read before the engine ran"):
        io.output("kept")
    context.execute_async_v3(0)
    assert io.output("kept").dtype == torch.int32 and io.output("kept").tolist() == [65, 40, 33]
    buffer = io.allocators["kept"].buffer.data_ptr()
    context.kept = np.array([12, 7], np.int32)  # another batch keeps fewer: the buffer is reused, the shape follows
    io.bind_outputs()
    context.execute_async_v3(0)
    assert io.output("kept").tolist() == [12, 7] and io.allocators["kept"].buffer.data_ptr() == buffer
