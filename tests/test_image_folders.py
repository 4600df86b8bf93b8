"""Image folders are walked once by real location (edgetok.images): links back into the folder are not
counted again, loops end, links out of it are followed once, and an image PIL cannot decode is a one-line
error naming it, in every command that reads a folder (eval, profile --inputs, quantize and dtome
--calibrate)."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.images import ImageFolder, walk
from edgetok.vit.digits import write_heldout_folder
from edgetok.images import image_folder

ROOT = Path(__file__).resolve().parents[1]
DIGITS = 539  # images in the digits held-out split


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return Path(write_heldout_folder(tmp_path_factory.mktemp("digits") / "heldout")["path"])


@pytest.fixture
def copy(heldout, tmp_path):
    """A private copy of the held-out folder to put links into."""
    import shutil

    return Path(shutil.copytree(heldout, tmp_path / "heldout"))


def _eval(capsys, folder):
    code, out, err = run_cli(capsys, "eval", "edgetok_digits_vit", "--data", str(folder), "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_a_link_back_into_the_folder_counts_nothing_twice(capsys, heldout, copy):
    """`ln -s . heldout/3/again` made torchvision's walk read class 3 again under every name the loop gave
    it (eval: 99.45 % on 2379 images instead of 97.59 % on 539)."""
    os.symlink(".", copy / "3" / "again")
    clean, linked = _eval(capsys, heldout), _eval(capsys, copy)
    assert clean["samples"] == linked["samples"] == DIGITS
    assert linked["top1"] == clean["top1"] and linked["skipped"] == 1 and "skipped" not in clean
    # the same walk under every command's option name
    for option in ("--calibrate", "--inputs"):
        assert len(image_folder(str(copy), {"input_size": [1, 8, 8]}, option)) == DIGITS


@pytest.mark.slow
def test_a_link_to_a_parent_ends(copy):
    """`ln -s .. heldout/4/up` walked without end (every class again under up/, up/4/up/, ...): eval,
    quantize --calibrate, profile --inputs and dtome --calibrate hung. A FIFO named like an image would block
    the reader forever: it is passed over."""
    os.symlink("..", copy / "4" / "up")
    os.symlink("../..", copy / "5" / "upup")
    os.mkfifo(copy / "7" / "pipe.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "edgetok", "eval", "edgetok_digits_vit", "--data", str(copy),
                           "--json", "--no-sidecar"], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["samples"] == DIGITS and result["skipped"] == 3


def test_links_out_of_the_folder_are_followed_once(tmp_path, heldout):
    """A folder of links into an image store elsewhere is read through them, each file once, and a loop out
    there ends too."""
    store, folder = tmp_path / "store", tmp_path / "linked"
    for cls in ("0", "1"):
        (store / cls).mkdir(parents=True)
        for image in sorted((heldout / cls).iterdir())[:5]:
            (store / cls / image.name).write_bytes(image.read_bytes())
        (folder / cls).mkdir(parents=True)
    os.symlink(store / "0", folder / "0" / "all")  # a folder link out
    os.symlink(store / "0", store / "0" / "loop")  # a loop out there
    first = sorted((store / "1").iterdir())[0]
    os.symlink(first, folder / "1" / "one.png")  # a file link out
    os.symlink(first, folder / "1" / "same.png")  # the same file under another name
    found = walk(folder)
    assert found.classes == ["0", "1"]
    assert [label for _, label in found.samples] == [0] * 5 + [1]
    assert sorted(Path(p).name for p, _ in found.samples[:5]) == sorted(p.name for p in (store / "0").iterdir()
                                                                        if p.suffix == ".png")
    assert len(found.skipped) == 2  # the loop, and the second name of the same file


def test_a_class_folder_linked_inside_the_folder_is_refused(capsys, copy):
    """3b -> 3 would count class 3's images twice; dropping it would shift every later label: refused."""
    os.symlink("3", copy / "3b")
    code, _, err = run_cli(capsys, "eval", "edgetok_digits_vit", "--data", str(copy))
    assert_one_line_error(code, err, "class folder 3b is a link to 3 inside the same folder")


def test_the_walk_lists_what_torchvision_listed_for_a_plain_folder(heldout):
    from torchvision.datasets.folder import find_classes, make_dataset

    classes, index = find_classes(heldout)
    found = ImageFolder(heldout)
    assert found.classes == classes and found.samples == make_dataset(heldout, index, extensions=(".png",))
    image, label = found[0]
    assert image.mode == "RGB" and label == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: PIL refuses it on open when the size is
    over its decompression-bomb limit, without decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _broken(folder: Path, kind: str) -> Path:
    first = sorted((folder / "2").iterdir())[0]
    data = first.read_bytes()
    bad = folder / "2" / f"{kind}.png"
    bad.write_bytes({"truncated": data[:len(data) // 2], "not_an_image": b"GIF? no: plain text\n",
                     "bomb": _png_header(60000, 60000)}[kind])
    return bad


@pytest.mark.parametrize("kind", ["truncated", "not_an_image", "bomb"])
def test_a_broken_image_in_eval_is_one_line(capsys, copy, kind):
    _broken(copy, kind)
    code, _, err = run_cli(capsys, "eval", "edgetok_digits_vit", "--data", str(copy))
    assert_one_line_error(code, err, f"cannot read image {copy / '2' / kind}.png", "remove it")
    if kind == "bomb":
        assert "decompression-bomb limit" in err


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    out = tmp_path_factory.mktemp("dense") / "dense.onnx"
    export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(out)))
    return str(out)


@pytest.mark.parametrize("command", ["profile", "quantize", "dtome"])
def test_a_decompression_bomb_is_one_line_in_every_command(capsys, copy, dense, tmp_path, command):
    """profile --inputs and quantize --calibrate reported PIL's DecompressionBombError as an internal error."""
    for cls in filter(Path.is_dir, copy.iterdir()):  # the bomb among the first images every command reads
        for image in sorted(cls.iterdir())[1:]:
            image.unlink()
    bad = _broken(copy, "bomb")
    args = {"profile": ["profile", dense, "--inputs", str(copy), "--batch", "4", "--duration", "0.05",
                        "--warmup", "0", "-o", str(tmp_path / "prof")],
            "quantize": ["quantize", dense, "--calibrate", str(copy), "-o", str(tmp_path / "q.onnx")],
            "dtome": ["export", "vit", "edgetok_digits_vit", "--method", "dtome", "--r", "2", "--calibrate", str(copy),
                      "-o", str(tmp_path / "d.onnx")]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, f"cannot read image {bad}", "decompression-bomb limit")
