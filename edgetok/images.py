"""Image folders (``<root>/<class>/<image>``): the one walk every command that reads images uses (eval's
``--data``, quantize's and dtome's ``--calibrate``, profile's ``--inputs``).

Why not torchvision's ImageFolder: it walks with ``os.walk(followlinks=True)``, so a link back into the tree
(``ln -s . heldout/3/again``) counts the same images again and again (eval reported 99.45 % on 2379 images
for a 539-image folder) and a link to a parent (``ln -s .. x``) walks without end. Here every folder and file
is read at most once, by its real location:

- a link that resolves inside the folder is skipped (what it points at is walked by its real path, under its
  real class, so labels do not depend on which name is met first), and counted in ``skipped``;
- a link out of the folder (a folder of links into a central image store) is followed, with a visited set of
  (device, inode) so that loops out there end too, and a file met twice counts once;
- a class folder that is a link to another place inside the folder is refused: dropping it would shift every
  later class index, keeping it would count its images twice.

Reading an image that PIL cannot decode (truncated, not an image, over PIL's decompression-bomb limit) is a
one-line ``EdgetokError`` naming the file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetok.errors import EdgetokError

# torchvision's IMG_EXTENSIONS: the same folder lists the same images as it did through ImageFolder
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageList:
    """What a walk found: class names (sorted, their index is the label), (path, label) samples, and the
    entries passed over (path, why): links to places already in the folder, special files."""
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk(root, option: str = "--data") -> ImageList:
    """The classes and images of the image folder ``root``; errors name ``option``."""
    top = Path(root)
    if not top.is_dir():
        raise EdgetokError(f"{option} {root} is not a folder; give an ImageFolder (one subfolder per class)")
    real_root = os.path.realpath(top)
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        raise EdgetokError(f"{option} {root} cannot be read ({exc.strerror}); check its permissions") from None
    classes = []
    for entry in entries:
        try:
            if not entry.is_dir():
                continue
        except OSError:
            continue
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if _inside(target, real_root):
                raise EdgetokError(f"{option} {root}: class folder {entry.name} is a link to "
                                   f"{os.path.relpath(target, real_root)} inside the same folder, so its images "
                                   "would count twice; remove the link or copy the images")
        classes.append(entry)
    if not classes:
        what = "is empty" if not entries else "has no class subfolders"
        raise EdgetokError(f"{option} {root} {what}; give an ImageFolder: {root}/<class>/<image>.png")

    found = ImageList([c.name for c in classes], [])
    seen_dirs, seen_files = {_key(os.stat(real_root)): "."}, set()
    for entry in classes:  # each class folder is walked under its own label, never through another one's link
        key = _key(os.stat(entry.path))
        if key in seen_dirs:
            raise EdgetokError(f"{option} {root}: class folders {seen_dirs[key]} and {entry.name} are the same "
                               "folder, so its images would count twice; remove one")
        seen_dirs[key] = entry.name

    def listing(folder: str) -> list[os.DirEntry]:
        try:
            return sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise EdgetokError(f"{option} {root}: {folder} cannot be read ({exc.strerror}); check its "
                               "permissions") from None

    for label, entry in enumerate(classes):
        pending = [entry.path]  # depth first, a folder's files before its subfolders', in name order
        while pending:
            subfolders = []
            for item in listing(pending.pop()):
                if item.is_symlink() and _inside(os.path.realpath(item.path), real_root):
                    found.skipped.append((item.path, "a link to a place already in the folder"))
                    continue
                try:
                    info = os.stat(item.path)  # follows a link out of the folder
                except OSError as exc:
                    why = "is a broken link" if item.is_symlink() else f"cannot be read ({exc.strerror})"
                    raise EdgetokError(f"{option} {root}: {item.path} {why}; remove it or fix it") from None
                if stat.S_ISDIR(info.st_mode):
                    if _key(info) in seen_dirs:
                        found.skipped.append((item.path, "a folder already read"))
                    else:
                        seen_dirs[_key(info)] = item.path
                        subfolders.append(item.path)
                elif not item.name.lower().endswith(EXTENSIONS):
                    continue
                elif not stat.S_ISREG(info.st_mode):  # a FIFO named x.png would block the reader forever
                    found.skipped.append((item.path, "not a regular file"))
                elif _key(info) in seen_files:
                    found.skipped.append((item.path, "a file already read"))
                else:
                    seen_files.add(_key(info))
                    found.samples.append((item.path, label))
            pending += reversed(subfolders)
    empty = sorted(set(found.classes) - {found.classes[label] for _, label in found.samples})
    if empty:
        raise EdgetokError(f"{option} {root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} "
                           f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(EXTENSIONS)}); add images or "
                           "remove the folder")
    return found


def _key(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def read_image(path: str):
    """The image at ``path`` as RGB, decoded now (PIL decodes lazily: a truncated file fails on first use);
    a file PIL cannot decode is a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        why = f"over PIL's decompression-bomb limit ({' '.join(str(exc).split())})"
    except UnidentifiedImageError:
        why = "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or damaged data, an unreadable file
        why = " ".join(str(exc).split()) or type(exc).__name__
    raise EdgetokError(f"cannot read image {path}: {why}; remove it from the folder or replace it")


class ImageFolder:
    """An image folder as a dataset: ``dataset[i]`` is (transformed image, label); ``classes``, ``samples``,
    ``skipped`` as ``walk`` found them. Indexable like torchvision's ImageFolder, which it replaces."""

    def __init__(self, root, transform: Callable | None = None, option: str = "--data"):
        self.root, self.transform = str(root), transform
        found = walk(root, option)
        self.classes, self.samples, self.skipped = found.classes, found.samples, found.skipped
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform is not None else image), label


def image_folder(root: str, data_config: dict, option: str = "--data") -> ImageFolder:
    """The image folder with timm's eval transform for ``data_config`` (a timm data config, or a Hugging Face
    processor's ``image_mean``/``image_std``): the model's own preprocessing, so eval's ``--data``,
    quantize's and dtome's ``--calibrate`` and profile's ``--inputs`` see the same tensors. Here, below the
    methods and the workflows, so that dtome's calibration reads images without importing eval."""
    from timm.data import create_transform

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
           if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    if "image_mean" in data_config:  # Hugging Face processor naming
        cfg.update(mean=tuple(data_config["image_mean"]), std=tuple(data_config["image_std"]))
    return ImageFolder(root, create_transform(**cfg, is_training=False), option)
