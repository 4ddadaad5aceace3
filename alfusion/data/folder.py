"""A plain image folder: ``<root>/<split>/<class>/<image>`` (torchvision ImageFolder style).

Classes are the sorted union of the class folders of all split folders, so a class missing
from one split keeps its label in the other. Images are read in sorted order (class, then
file name), decoded with PIL.

The pseudo-split ``images`` (``PLAIN``) reads a folder without labels instead: every image
under ``<root>`` (sub-folders included, hidden ones left out) in sorted order of its path,
with label -1; task=predict uses it for new images.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from alfusion.data.images import to_rgb
from alfusion.data.wds import DatasetUnavailable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SPLITS = ("train", "test")
PLAIN = "images"  # every image under the root, unlabeled (task=predict)


def folder_classes(root: Path) -> list[str]:
    """Sorted class names: the sub-folders of root/train and root/test."""
    names = {d.name for s in SPLITS if (root / s).is_dir()
             for d in (root / s).iterdir() if d.is_dir()}
    return sorted(names)


def folder_images(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of one split, in sorted order; errors if unusable."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetUnavailable(f"image folder {root} has no {split}/ folder: the layout is "
                                 f"{root}/{{train,test}}/<class>/<image>")
    classes = folder_classes(root)
    if not classes:
        raise DatasetUnavailable(f"{folder} has no class folders (<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            files = sorted(p for p in class_dir.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise DatasetUnavailable(f"split {split!r} of image folder {root} is empty: no "
                                 f"{'/'.join(sorted(IMAGE_SUFFIXES))} files in {folder}/<class>/")
    return paths, labels, classes


def plain_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (sub-folders too, hidden ones not), sorted by path;
    errors if the folder is missing or holds no image."""
    if not root.is_dir():
        raise DatasetUnavailable(f"dataset.root={root}: no such folder (a folder of images)")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file() and not any(part.startswith(".")
                                               for part in p.relative_to(root).parts))
    if not paths:
        raise DatasetUnavailable(f"image folder {root} is empty: no "
                                 f"{'/'.join(sorted(IMAGE_SUFFIXES))} files in it")
    return paths


class ImageFolderSource(Dataset):
    """(transformed image, label) pairs of one split of an image folder; split ``PLAIN``:
    (image, -1) for every image under the root, no classes."""

    def __init__(self, root: str | Path, split: str, transform=None,
                 limit: int | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            layout = "PATH/<image>" if split == PLAIN else "PATH/{train,test}/<class>/<image>"
            raise DatasetUnavailable(f"dataset.root={root}: no such folder (the layout is "
                                     f"{layout}): check the path")
        if split == PLAIN:
            self.paths, self.classnames = plain_images(self.root), []
            self.labels = [-1] * len(self.paths)
        else:
            self.paths, self.labels, self.classnames = folder_images(self.root, split)
        if limit is not None:
            self.paths, self.labels = self.paths[:limit], self.labels[:limit]
        for path in self.paths:  # listed, so refused before any work; decoding comes later
            if path.stat().st_size == 0:
                raise DatasetUnavailable(f"image {path} is an empty file (0 bytes): remove or "
                                         "replace it")
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self) -> list[str]:
        """Each image's path relative to the root, in order."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image = to_rgb(image)
        except Exception as err:  # PIL raises many types for damaged files
            raise DatasetUnavailable(f"image {path} cannot be decoded ({err}): remove or "
                                     "replace it") from err
        return (self.transform(image) if self.transform else image), self.labels[i]
