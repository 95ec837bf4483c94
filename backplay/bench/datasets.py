"""Loaders for real segmentation data a user has locally: ImageNet-S and PASCAL VOC.

Both iterate over the *single-class* images (exactly one object class in the mask besides background
and ignore) and yield ``(image, target, mask)``: ``image`` a float32 tensor [3, size, size] in [0, 1]
(RGB, bilinear resize), ``target`` the class index for the model, ``mask`` a bool tensor
[size, size] (nearest resize) of that class's pixels; ignore pixels count as outside the mask.
Images and masks are read with pillow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = ["ImageNetS", "VOCSegmentation", "VOC_CLASSES", "read_image", "read_wnids"]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """An RGB image file as a float32 tensor [3, H, W] in [0, 1] (resized to size x size if given)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def _resize_labels(labels: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return labels
    from PIL import Image

    im = Image.fromarray(labels.astype(np.int32), mode="I")
    return np.asarray(im.resize((size, size), Image.NEAREST), dtype=np.int64)


def read_wnids(path: str | os.PathLike) -> list[str]:
    """WordNet ids, one per line (the first whitespace-separated token), in the model's class order."""
    out = [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError(f"no class ids in {str(path)!r}")
    return out


class ImageNetS:
    """ImageNet-S (Gao et al. 2022): ``root/<split>/<wnid>/<name>.JPEG`` with masks
    ``root/<split>-segmentation/<wnid>/<name>.png``, class id = R + 256 G (0 background, 1000
    ignore), e.g. ``root = ImageNetS919``, ``split = "validation"``.

    ``target``: with ``wnids`` (the model's class order, a list or a file, e.g. the 1000 ImageNet-1k
    wnids in sorted order) the index of the image's folder wnid in it (images whose wnid is absent are
    skipped); without, the ImageNet-S class id from the mask.
    """

    def __init__(self, root: str | os.PathLike, split: str = "validation", size: int | None = 224,
                 wnids: Sequence[str] | str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.size = size
        img_dir, seg_dir = self.root / split, self.root / f"{split}-segmentation"
        for d in (img_dir, seg_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"ImageNet-S folder {str(d)!r} does not exist (expected "
                                        f"<root>/{split}/<wnid>/*.JPEG and <root>/{split}-segmentation/<wnid>/*.png)")
        if wnids is not None and not isinstance(wnids, (list, tuple)):
            wnids = read_wnids(wnids)
        self.class_index = None if wnids is None else {w: i for i, w in enumerate(wnids)}
        self.pairs: list[tuple[Path, Path, str]] = []
        for mask in sorted(seg_dir.glob("*/*.png")):
            wnid = mask.parent.name
            stem = img_dir / wnid / mask.stem
            image = next((stem.with_suffix(e) for e in (".JPEG", ".jpeg", ".jpg", ".JPG", ".png")
                          if stem.with_suffix(e).is_file()), None)
            if image is not None:
                self.pairs.append((image, mask, wnid))
        if not self.pairs:
            raise FileNotFoundError(f"no (image, mask) pairs under {str(self.root)!r} split {split!r}")

    @staticmethod
    def read_mask(path: str | os.PathLike) -> np.ndarray:
        """Class ids [H, W] (int64) of an ImageNet-S mask PNG: R + 256 G."""
        from PIL import Image

        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.int64)
        return a[..., 0] + 256 * a[..., 1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        for image, mask_path, wnid in self.pairs:
            ids = self.read_mask(mask_path)
            classes = np.setdiff1d(np.unique(ids), [0, 1000])
            if classes.size != 1:
                continue
            if self.class_index is not None:
                if wnid not in self.class_index:
                    continue
                target = self.class_index[wnid]
            else:
                target = int(classes[0])
            mask = _resize_labels(ids, self.size) == classes[0]
            yield read_image(image, self.size), target, torch.from_numpy(mask)


class VOCSegmentation:
    """PASCAL VOC segmentation: ``<base>/ImageSets/Segmentation/<image_set>.txt``,
    ``<base>/JPEGImages/<id>.jpg``, ``<base>/SegmentationClass/<id>.png`` (palette PNG: 0 background,
    1-20 the classes of :data:`VOC_CLASSES`, 255 ignore); ``base`` is ``root/VOCdevkit/VOC<year>``,
    ``root/VOC<year>`` or ``root`` itself, the first that exists.

    ``target``: ``target_map[voc_index]`` when given (e.g. to an ImageNet class), else
    ``voc_index - 1`` (0-19, the 20 object classes in VOC order).
    """

    def __init__(self, root: str | os.PathLike, year: str = "2012", image_set: str = "val",
                 size: int | None = 224, target_map: Mapping[int, int] | None = None) -> None:
        root = Path(root)
        cands = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
        base = next((c for c in cands if (c / "ImageSets" / "Segmentation").is_dir()), None)
        if base is None:
            raise FileNotFoundError(f"no VOC layout under {str(root)!r} (looked for ImageSets/Segmentation "
                                    f"in {', '.join(str(c) for c in cands)})")
        listing = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"image set file {str(listing)!r} does not exist")
        self.base, self.size, self.target_map = base, size, target_map
        self.ids = [s.strip() for s in listing.read_text().splitlines() if s.strip()]

    @staticmethod
    def read_mask(path: str | os.PathLike) -> np.ndarray:
        """Class indices [H, W] (int64) of a VOC palette PNG."""
        from PIL import Image

        with Image.open(path) as im:
            if im.mode != "P" and im.mode != "L":
                raise ValueError(f"{str(path)!r}: expected a palette (P) or grey (L) PNG, got mode {im.mode}")
            return np.asarray(im, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        for name in self.ids:
            labels = self.read_mask(self.base / "SegmentationClass" / f"{name}.png")
            classes = np.setdiff1d(np.unique(labels), [0, 255])
            if classes.size != 1:
                continue
            c = int(classes[0])
            if self.target_map is not None:
                if c not in self.target_map:
                    continue
                target = int(self.target_map[c])
            else:
                target = c - 1
            mask = _resize_labels(labels, self.size) == c
            yield read_image(self.base / "JPEGImages" / f"{name}.jpg", self.size), target, torch.from_numpy(mask)
