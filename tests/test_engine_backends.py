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
