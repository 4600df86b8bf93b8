"""Cubin bundles are verified before they are shipped beside an engine (build-engine) or launched (the
run-time preflight): every member against the manifest's SHA-256 and nothing unlisted, kernel parameter
layouts against our own kernel specs, provenance recorded, and members read under size limits (a zip bomb is
refused from the zip's directory, without inflating it)."""

import hashlib
import json
import zipfile

import pytest

from edgetok import __version__
from edgetok.engine import build
from edgetok.plugins import cubins, launch
from edgetok.plugins.spec import PluginError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real bundle of every kernel for sm86 (compiled once per Triton version and kernel source)."""
    path = tmp_path_factory.mktemp("cubins") / "sm86.cubins.zip"
    cubins.write_bundle(path, ["sm86"], say=lambda s: None)
    return path


def _members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def _write(path, members: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _rehashed(members: dict) -> dict:
    """The members with the manifest's SHA-256s recomputed: a consistent bundle, whatever it holds."""
    manifest = json.loads(members[cubins.MANIFEST])
    for name, kernel in manifest["kernels"].items():
        for entry in kernel["archs"].values():
            entry["sha256"] = hashlib.sha256(members[entry["cubin"]]).hexdigest()
            entry["ptx_sha256"] = hashlib.sha256(members[entry["ptx"]]).hexdigest()
    return {**members, cubins.MANIFEST: json.dumps(manifest).encode()}


def test_a_bundle_from_our_build_verifies_and_records_its_provenance(bundle):
    opened = cubins.Bundle.open(bundle)
    assert opened.manifest["edgetok"] == __version__
    assert launch.preflight(opened, 86, 12020) == launch.Image("sm86", "cubin")
    assert build._bundle_summary(bundle)["edgetok"] == __version__  # into the build report


def _tampered_ptx(members):
    members["sm86/tome_merge.ptx"] += b"// one more line\n"
    return members


def _extra(members):
    return {**members, "sm86/helper.cubin": members["sm86/tome_merge.cubin"]}


def _forged_manifest(members):
    """A consistent foreign bundle: tome_merge's scalar parameters claimed as pointers, the manifest's
    recorded PTX types to match, every hash recomputed."""
    manifest = json.loads(members[cubins.MANIFEST])
    kernel = manifest["kernels"]["tome_merge"]
    for p in kernel["params"]:
        p["type"] = "*fp32" if not p["type"].startswith("*") else p["type"]
    kernel["archs"]["sm86"]["ptx_param_types"] = ["u64"] * len(kernel["params"])
    return _rehashed({**members, cubins.MANIFEST: json.dumps(manifest).encode()})


def _forged_ptx(members):
    """The PTX entry takes one parameter fewer than our kernel declares; manifest rehashed."""
    ptx = members["sm86/tome_merge.ptx"].decode()
    start = ptx.index(".entry tome_merge")
    cut = ptx.index(".param", start)
    members["sm86/tome_merge.ptx"] = (ptx[:cut] + ptx[ptx.index(",", cut) + 1:]).encode()
    return _rehashed(members)


def _no_provenance(members):
    manifest = json.loads(members[cubins.MANIFEST])
    del manifest["edgetok"]
    return {**members, cubins.MANIFEST: json.dumps(manifest).encode()}


CASES = {
    "tampered": (_tampered_ptx, "member sm86/tome_merge.ptx fails its manifest's SHA-256"),
    "extra": (_extra, "member sm86/helper.cubin is not in its manifest"),
    "forged_manifest": (_forged_manifest, "kernel tome_merge's params in its manifest"),
    "forged_ptx": (_forged_ptx, "kernel tome_merge on sm86 takes ("),
    "no_provenance": (_no_provenance, "does not record which edgetok built it"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_unverifiable_bundle_is_refused_in_one_line_at_run_time(bundle, tmp_path, case):
    """Before, the preflight checked the source key and the one image it would load: a tampered PTX, an
    extra member or a forged layout passed, and the forged layout would be launched with our arguments."""
    change, needle = CASES[case]
    bad = tmp_path / f"{case}.cubins.zip"
    _write(bad, change(_members(bundle)))
    with pytest.raises(PluginError) as e:
        launch.preflight(cubins.Bundle.open(bad), 86, 12020)
    message = str(e.value)
    assert needle in message and "\n" not in message and "rebuild it" in message and str(bad) in message


@pytest.mark.parametrize("case", CASES)
def test_build_engine_never_ships_an_unverifiable_bundle(bundle, tmp_path, monkeypatch, case):
    """build-engine copied the export's bundle beside the engine unverified; now it says why and compiles
    the kernels from our own sources instead."""
    change, needle = CASES[case]
    source = tmp_path / "m.onnx"
    _write(cubins.bundle_path(source), change(_members(bundle)))
    target, said, compiled = tmp_path / "stage" / "m.engine.cubins.zip", [], []
    target.parent.mkdir()
    monkeypatch.setattr(cubins, "write_bundle", lambda path, archs, say: compiled.append(list(archs)))
    build._stage_bundle({"archs": ["sm86"]}, source, target, said.append)
    assert compiled == [["sm86"]] and not target.exists()
    assert needle in said[0] and said[0].endswith("; compiling the plugin kernels instead")


def test_build_engine_ships_a_verified_bundle(bundle, tmp_path, monkeypatch):
    source = tmp_path / "m.onnx"
    cubins.bundle_path(source).write_bytes(bundle.read_bytes())
    target, said = tmp_path / "m.engine.cubins.zip", []
    monkeypatch.setattr(cubins, "write_bundle", lambda *a, **k: pytest.fail("compiled a verified bundle"))
    build._stage_bundle({"archs": ["sm86"]}, source, target, said.append)
    assert target.read_bytes() == bundle.read_bytes() and said == ["using the plugin cubins in m.onnx.cubins.zip (verified)"]


def _bomb(path, bundle, size: int, member: str = "sm86/tome_merge.cubin") -> None:
    """``bundle`` with ``member`` replaced by ``size`` zero bytes, deflated: written streaming, a few MB."""
    members = _members(bundle)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            if name != member:
                z.writestr(name, data)
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as out:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                out.write(chunk)


@pytest.mark.parametrize("size, needle", [(1 << 30, "declares 1073741824 bytes, over the 67108864 a member may hold"),
                                          (32 << 20, "x (over 100x: a zip bomb; not inflated)")])
def test_a_zip_bomb_is_refused_without_inflating_it(bundle, tmp_path, monkeypatch, size, needle):
    """A 1.4 MB bundle with a 1 GiB member took build-engine to 2.6 GB and was shipped; a member within the
    size limit but deflated far beyond what cubins and PTX do is refused too. Nothing is inflated first."""
    bomb = tmp_path / "bomb.cubins.zip"
    _bomb(bomb, bundle, size)
    assert bomb.stat().st_size < 4 << 20
    real_open = zipfile.ZipFile.open

    def open_member(self, name, *args, **kwargs):
        if "tome_merge.cubin" in str(getattr(name, "filename", name)):
            pytest.fail(f"inflated {name} before refusing the bundle")
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_member)
    with pytest.raises(PluginError) as e:
        cubins.Bundle.open(bomb)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(bomb) in str(e.value)
