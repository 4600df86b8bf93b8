"""The Triton kernels of the plugins equal their numpy references, and compile ahead of time for every GPU.

Kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).
Decisions are checked exactly: with one-hot tokens (C = N) each output row's non-zero channels are the very
tokens merged into it, so a different match, rank or row order shows as a different set, not a small error.
Ties are made exact on purpose: metric rows with four entries of 1 among 8 (times an integer scale) have unit
vectors of 0.5s, so every cosine score is a multiple of 0.25 computed without rounding in any order.
With TRITON_INTERPRET=0 on a GPU (another summation order than numpy's) random inputs are compared where the
reference's decisions are clear of float32 noise (edgetok.plugins.agreement); exact ties everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from edgetok.plugins import agreement, cubins
from edgetok.plugins import spec as specs
from edgetok.plugins import token_merge as tm
from edgetok.plugins.kernels import Buffer, interpreting, run_torch
from edgetok.plugins.kernels import token_merge_plan as kernels
from edgetok.plugins.spec import PluginError

SPEC = specs.get("TokenMerge")
ATOL = 1e-5
# CPU tensors through the interpreter; with TRITON_INTERPRET=0 on a GPU machine, the same checks JIT on CUDA
DEVICE = "cpu" if interpreting() else "cuda" if torch.cuda.is_available() else None
needs_device = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 before triton is imported, or CUDA")


def _inputs(rng, batch, tokens, channels, dim, onehot=False, metric=None):
    x = np.eye(tokens, channels, dtype=np.float32)[None].repeat(batch, 0) if onehot else \
        rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    if metric is None:
        metric = rng.standard_normal((batch, tokens, dim)).astype(np.float32)
    size = rng.integers(1, 5, (batch, tokens, 1)).astype(np.float32)
    return [x, metric, size]


def _compared(inputs, r, prefix, class_token, exact_ties):
    """The samples to compare. Under the interpreter, all: it sums in numpy's order, as the reference. On a
    GPU, which sums in another, those whose decisions the reference takes by more than float32 noise
    (edgetok.plugins.agreement); exact ties (exact_ties: scores computed without rounding in any order) are
    compared everywhere, their tie-breaking included."""
    if DEVICE != "cuda" or exact_ties:
        return np.ones(len(inputs[0]), bool)
    return tm.token_merge_margin(inputs[1], r, prefix, class_token) > agreement.noise(1.0)


def _run(inputs, r, prefix, class_token, exact_ties=False):
    fields = dict(r=r, prefix=prefix, class_token=class_token)
    want = specs.run_reference("TokenMerge", inputs, fields)
    got = [t.cpu().numpy() for t in run_torch(SPEC, [torch.from_numpy(a).to(DEVICE) for a in inputs], fields)]
    clear = _compared(inputs, r, prefix, class_token, exact_ties)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g[clear], w[clear], rtol=0, atol=ATOL)
    return got, want, clear


def _sources(merged):
    """Per sample, per output row: the tokens it stands for (one-hot inputs)."""
    return [[tuple(np.flatnonzero(row)) for row in sample] for sample in merged]


def _check_decisions(inputs, r, prefix, class_token, exact_ties=False):
    got, want, clear = _run(inputs, r, prefix, class_token, exact_ties)
    assert _sources(got[0][clear]) == _sources(want[0][clear])
    return got


def _tied_metric(rng, batch, tokens, patterns=5):
    """Rows drawn from a few 4-of-8 patterns times 1..3: exact, heavily tied cosine scores."""
    base = np.zeros((patterns, 8), np.float32)
    for p in range(patterns):
        base[p, rng.choice(8, 4, replace=False)] = 1.0
    pick = rng.integers(0, patterns, (batch, tokens))
    return (base[pick] * rng.integers(1, 4, (batch, tokens, 1))).astype(np.float32)


@pytest.mark.parametrize("batch,tokens,channels,dim,r,prefix,class_token", [
    (1, 17, 8, 5, 4, 1, 1),
    (2, 30, 300, 40, 9, 1, 0),  # C over one channel tile, D over one D tile
    (1, 70, 16, 140, 20, 2, 1),  # N over one B tile, D > 128
])
@needs_device
def test_random_inputs(batch, tokens, channels, dim, r, prefix, class_token):
    _run(_inputs(np.random.default_rng(tokens), batch, tokens, channels, dim), r, prefix, class_token)


@needs_device
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("class_token", [0, 1])
def test_decisions_by_prefix(prefix, class_token):
    rng = np.random.default_rng(10 * prefix + class_token)
    tokens = 25
    for r in (1, tm.max_r(tokens, prefix) // 2 + 1, tm.max_r(tokens, prefix)):
        _check_decisions(_inputs(rng, 2, tokens, tokens, 6, onehot=True), r, prefix, class_token)


@needs_device
@pytest.mark.parametrize("batch,tokens,class_token", [(2, 41, 0), (2, 41, 1), (1, 141, 0)])  # 141: ties across B tiles
def test_exact_ties(batch, tokens, class_token):
    rng = np.random.default_rng(7)
    prefix = 1
    metric = _tied_metric(rng, batch, tokens)
    for b in range(batch):  # the case is really tied: equal best scores and several best matches per A token
        a_pos, b_pos = tm.split(tokens, prefix)
        unit = metric[b] / np.linalg.norm(metric[b], axis=-1, keepdims=True)
        scores = unit[a_pos] @ unit[b_pos].T
        best = scores.max(-1)
        assert len(set(best.tolist())) < len(best) / 2
        assert ((scores == best[:, None]).sum(-1) > 1).mean() > 0.5
    for r in (1, 7, tm.max_r(tokens, prefix)):
        _check_decisions(_inputs(rng, batch, tokens, tokens, 8, onehot=True, metric=metric), r, prefix, class_token,
                         exact_ties=True)


@needs_device
def test_duplicate_tokens():
    """Whole tokens repeated (metric and x): the first of equal matches and the lower of equal ranks win."""
    rng = np.random.default_rng(3)
    tokens = 30
    x, metric, size = _inputs(rng, 1, tokens, tokens, 8, onehot=True, metric=_tied_metric(rng, 1, tokens, 3))
    metric[0, 10:20] = metric[0, 0:10]  # shifted by an even number: A stays A, B stays B
    _check_decisions([x, metric, size], 8, 0, 0, exact_ties=True)
    _check_decisions([x, metric, size], 14, 1, 1, exact_ties=True)


@needs_device
@pytest.mark.parametrize("class_token", [0, 1])
def test_r_zero_copies(class_token):
    rng = np.random.default_rng(1)
    for tokens, prefix in ((17, 1), (3, 5)):  # prefix beyond N is valid with r = 0
        inputs = _inputs(rng, 2, tokens, 12, 4)
        got, _, _ = _run(inputs, 0, prefix, class_token)
        assert np.array_equal(got[0], inputs[0]) and np.array_equal(got[1], inputs[2])
    assert [launch.kernel.name for launch in kernels.plan([(2, 17, 12), (2, 17, 4), (2, 17, 1)],
                                                           dict(r=0, prefix=1, class_token=1)).launches] == ["tome_merge"]


@needs_device
@pytest.mark.parametrize("tokens,prefix", [(24, 1), (25, 1), (24, 2), (9, 0)])
def test_r_max(tokens, prefix):
    rng = np.random.default_rng(tokens + prefix)
    for class_token in (0, 1):
        _check_decisions(_inputs(rng, 1, tokens, tokens, 7, onehot=True), tm.max_r(tokens, prefix), prefix, class_token)


@needs_device
def test_batch_samples_decide_independently():
    rng = np.random.default_rng(5)
    inputs = _inputs(rng, 4, 33, 33, 6, onehot=True)
    got = _check_decisions(inputs, 10, 1, 0)
    assert len({tuple(s) for s in _sources(got[0])}) == 4  # the samples really differ


@needs_device
def test_deit_small_shape():
    """DeiT-S: 197 tokens, C = 384, head-averaged keys of D = 64, r = 16 (one sample: the interpreter is slow)."""
    _run(_inputs(np.random.default_rng(197), 1, 197, 384, 64), 16, 1, 1)


def test_plan_is_plain_data():
    shapes = [(3, 197, 384), (3, 197, 64), (3, 197, 1)]
    plan = kernels.plan(shapes, dict(r=16, prefix=1, class_token=0))
    assert [launch.kernel.name for launch in plan.launches] == [k.name for k in kernels.KERNELS]
    regions = set()
    for launch in plan.launches:
        assert len(launch.args) == len(launch.kernel.params) and all(g > 0 for g in launch.grid)
        for (name, ty), value in zip(launch.kernel.params, launch.args):
            assert isinstance(value, Buffer) == ty.startswith("*"), name
            if isinstance(value, Buffer) and value.kind == "scratch":
                assert value.index % 256 == 0 and value.index + 4 * value.count <= plan.scratch_bytes
                assert {"float32": "*fp32", "int32": "*i32"}[value.dtype] == ty
                regions.add((value.index, value.count))
    spans = sorted(regions)
    assert all(a + 4 * n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no overlap


@needs_device
def test_rejects_what_the_spec_rejects():
    x, metric, size = (torch.zeros(1, 9, 4, dtype=torch.float64, device=DEVICE), torch.zeros(1, 9, 3, device=DEVICE),
                       torch.ones(1, 9, 1, device=DEVICE))
    with pytest.raises(PluginError, match="float32"):
        run_torch(SPEC, [x, metric, size], dict(r=1))
    with pytest.raises(PluginError, match="too large"):
        run_torch(SPEC, [x.float(), metric, size], dict(r=5))


def test_cpu_tensors_without_interpreter_fail_clearly():
    code = ("import torch; from edgetok.plugins import spec; from edgetok.plugins.kernels import run_torch\n"
            "try:\n run_torch(spec.get('TokenMerge'), [torch.zeros(1, 5, 4), torch.ones(1, 5, 3), torch.ones(1, 5, 1)], {})\n"
            "except spec.PluginError as e:\n print(e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "TRITON_INTERPRET=1 before anything imports triton" in out


# ---- ahead-of-time cubins -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETOK_CACHE", str(tmp_path_factory.mktemp("edgetok-cache")))
        said = []
        start = time.perf_counter()
        folder = cubins.build(cubins.ARCHS, said.append)
        yield folder, said, time.perf_counter() - start


def test_parse_archs():
    assert cubins.parse_archs("sm87,sm90") == ["sm87", "sm90"]
    assert cubins.parse_archs("87") == ["sm87"]
    assert cubins.parse_archs("sm_110, SM120 sm87") == ["sm110", "sm120", "sm87"]
    assert cubins.parse_archs("all") == list(cubins.ARCHS)
    for bad in ("sm75", "orin", ""):
        with pytest.raises(PluginError) as e:
            cubins.parse_archs(bad)
        assert "\n" not in str(e.value) and "sm86, sm87, sm89, sm90, sm110, sm120" in str(e.value)
        assert not bad or repr(bad) in str(e.value)


def test_build_all_archs(cache):
    folder, said, seconds = cache
    manifest = json.loads((folder / cubins.MANIFEST).read_text())
    assert folder.parent.name == "cubins" and folder.name.startswith(manifest["triton"] + "-")
    assert manifest["format"] == cubins.FORMAT and set(manifest["archs"]) == set(cubins.ARCHS)
    assert all(v.count(".") == 1 for v in [manifest["ptx_version"], *(a["ptx_version"] for a in manifest["archs"].values())])
    every = cubins._kernels()  # (plugin, kernel) of every plugin: TokenMerge's, TokenPrune's, SizeBiasedAttention's
    assert {k.name for k in kernels.KERNELS} | {"prune_scan", "prune_count", "prune_gather", "sba_attend_d64",
                                                "sba_attend_d128", "sba_class_row", "bsa_pool", "bsa_select",
                                                "bsa_kept", "bsa_sparse_d64", "bsa_sparse_d128"} == \
        set(manifest["kernels"]) == {k.name for _, k in every}
    for plugin, kernel in every:
        entry = manifest["kernels"][kernel.name]
        declared = [{"name": n, "type": t} for n, t in kernel.params]
        assert entry["params"][:len(declared)] == declared
        assert [(p["name"], p["type"], p["hidden"]) for p in entry["params"][len(declared):]] == \
            [(n, t, True) for n, t in cubins.HIDDEN_PARAMS]
        assert entry["plugin"] == plugin and entry["num_warps"] == kernel.num_warps and entry["threads"] == 128
        for arch in cubins.ARCHS:
            built = entry["archs"][arch]
            # read from the compiled PTX, not from KERNELS: declared types in order, then the two hidden pointers
            ptx = {"*": "u64", "i32": "u32", "fp32": "f32"}
            assert built["ptx_param_types"] == [ptx["*" if t.startswith("*") else t] for _, t in kernel.params] + ["u64"] * 2
            assert built["entry"] == kernel.name and built["num_warps"] == kernel.num_warps
            assert 0 <= built["shared"] <= 48 * 1024  # no opt-in for large dynamic shared memory needed
            assert (folder / built["cubin"]).read_bytes()[:4] == b"\x7fELF"
    assert sum("compiled" in line for line in said) == len(cubins.ARCHS), said
    summary = cubins.describe(folder / cubins.MANIFEST)
    assert "sm87 (sm_87" in summary and "tome_merge" in summary and "2 hidden" in summary
    assert "prune_gather TokenPrune: 9 params + 2 hidden" in summary
    print(f"\ncubins for {len(cubins.ARCHS)} archs in {seconds:.1f} s: " + "; ".join(said))


def test_build_reuses_cache(cache, monkeypatch):
    folder, _, _ = cache
    monkeypatch.setenv("EDGETOK_CACHE", str(folder.parents[1]))
    said = []
    assert cubins.build(["sm87", "sm90"], said.append) == folder
    assert len(said) == 2 and all("cached" in line for line in said)
    assert cubins.cached_archs() == list(cubins.ARCHS)


def test_bundle_round_trip(cache, tmp_path, monkeypatch):
    folder, _, _ = cache
    monkeypatch.setenv("EDGETOK_CACHE", str(folder.parents[1]))
    path = cubins.bundle_path(tmp_path / "vit.engine")
    assert path.name == "vit.engine.cubins.zip"
    manifest = cubins.write_bundle(path, ["sm87", "sm90"], say=lambda _: None)
    assert set(manifest["archs"]) == {"sm87", "sm90"} and not list(tmp_path.glob(".*.tmp"))
    first = path.read_bytes()
    cubins.write_bundle(path, ["sm87", "sm90"], say=lambda _: None)
    assert path.read_bytes() == first  # reproducible
    bundle = cubins.Bundle.open(path)
    assert bundle.manifest == manifest and bundle.archs == ["sm87", "sm90"]
    meta = bundle.kernel("tome_match")
    assert bundle.cubin("tome_match", "sm_87") == (folder / meta["archs"]["sm87"]["cubin"]).read_bytes()
    assert bundle.cubin("tome_match", 90) == bundle.cubin("tome_match", "sm90")
    with pytest.raises(PluginError) as e:
        bundle.cubin("tome_match", "sm110")
    message = str(e.value)
    assert "\n" not in message and "sm_110" in message and "--arch sm110" in message and str(path) in message
    with pytest.raises(PluginError, match="sm86, sm87"):
        bundle.cubin("tome_match", "sm72")
    with pytest.raises(PluginError, match="no kernel"):
        bundle.kernel("nope")
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == sorted([cubins.MANIFEST] + [f"{a}/{k.name}.{ext}" for a in ("sm87", "sm90")
                                                                  for _, k in cubins._kernels()
                                                                  for ext in ("cubin", "ptx")])
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(PluginError, match="not a cubin bundle"):
        cubins.Bundle.open(tmp_path / "bad.zip")
