"""Real photos that ship with installed packages (no download), with the ImageNet class each shows.

Sources (all offline):

* scikit-image ``skimage.data``: the colour photos bundled with the wheel (``astronaut``, ``chelsea``,
  ``coffee``, ``rocket``, ``stereo_motorcycle``; ``cat`` is ``chelsea`` again). Its other colour
  images show nothing of ImageNet's 1000 classes and are left out: ``hubble_deep_field`` (galaxies),
  ``immunohistochemistry`` (stained tissue), ``retina`` (a fundus photograph), ``logo`` (a drawing);
  ``eagle``, ``lily``, ``skin``, ... need a download (pooch), the rest are grey.
* scikit-learn ``load_sample_image``: ``china.jpg`` and ``flower.jpg``.
* matplotlib ``mpl-data/sample_data/grace_hopper.jpg`` (``matplotlib.cbook.get_sample_data``).
* imgaug's quokka is left out: imgaug 0.4.0 (the last release) reads ``np.sctypes``, removed in
  NumPy 2, so it does not import beside this environment's NumPy 2.x (and it pulls opencv / shapely).

:data:`PHOTOS` states, per photo, the expected ImageNet class id(s) and why (what the photo shows,
from its package's documentation, and the ImageNet class name). :func:`top1` classifies them with
EfficientNet-Lite0 (:mod:`backplay.bench.efficientnet`) and prints ``top-1 on the bundled photos: k/n``.
The photos classified correctly with probability >= :data:`CONFIDENT` are the benchmark's
(:func:`confident`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CONFIDENT", "PHOTOS", "Photo", "Prediction", "confident", "load", "load_all", "top1"]

CONFIDENT = 0.3  # top-1 probability above which a correctly classified photo counts as confident


@dataclass(frozen=True)
class Photo:
    """A bundled photo: ``loader()`` gives an H x W x 3 uint8 array; ``expected`` the ImageNet class
    ids that count as correct (empty: the photo shows no ImageNet class, reported, not scored);
    ``source`` what the photo shows (its package's words) and why these classes."""

    name: str
    loader: Callable[[], np.ndarray]
    expected: tuple
    source: str


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError:
            raise ImportError("the bundled photos need scikit-image: pip install 'backplay[bench]'") from None
        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            raise ImportError("the bundled photos need scikit-learn: pip install 'backplay[bench]'") from None
        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f).convert("RGB"))

    return load


# ImageNet class names as in backplay.bench.efficientnet.IMAGENET_CLASSES (ILSVRC-2012 index order)
PHOTOS = (
    Photo("china", _sklearn("china.jpg"), (698,),
          "scikit-learn china.jpg (flickr danielbuechele/6061409035): the Tower of Buddhist Incense of "
          "the Summer Palace, Beijing, a tiered palace building above Kunming Lake -> 698 'palace'"),
    Photo("flower", _sklearn("flower.jpg"), (985,),
          "scikit-learn flower.jpg (flickr vultilion/6056698931): one orange dahlia-like flower head, "
          "rayed petals around a centre; ImageNet has no dahlia, its composite-flower class is 985 "
          "'daisy'"),
    Photo("grace_hopper", _matplotlib("grace_hopper.jpg"), (652,),
          "matplotlib sample_data/grace_hopper.jpg: portrait of Rear Admiral Grace Hopper in US Navy "
          "dress uniform -> 652 'military uniform'"),
    Photo("chelsea", _skimage("chelsea"), (281, 282, 285),
          "skimage.data.chelsea: 'Chelsea the cat', a tabby house cat; ImageNet splits tabby-like "
          "domestic cats over 281 'tabby', 282 'tiger cat' and 285 'Egyptian cat' (any one counts)"),
    Photo("coffee", _skimage("coffee"), (967, 968, 504),
          "skimage.data.coffee: 'Coffee cup', courtesy of Pikolo Espresso Bar: an espresso-bar coffee "
          "in a porcelain cup on a saucer -> 967 'espresso', 968 'cup' or 504 'coffee mug'"),
    Photo("rocket", _skimage("rocket"), (657, 744),
          "skimage.data.rocket: 'Launch photo of DSCOVR on Falcon 9 by SpaceX'; ImageNet has no rocket "
          "class, its rocket-shaped classes are 657 'missile' and 744 'projectile, missile'"),
    Photo("stereo_motorcycle", _skimage("stereo_motorcycle"), (665, 670),
          "skimage.data.stereo_motorcycle (left image): a motorcycle, Middlebury 2014 stereo set; "
          "ImageNet's motorbike classes are 665 'moped' and 670 'motor scooter'"),
    Photo("astronaut", _skimage("astronaut"), (),
          "skimage.data.astronaut: portrait of astronaut Eileen Collins; no ImageNet class shows a "
          "person or an astronaut's suit: reported, not scored"),
)


def load(name: str) -> np.ndarray:
    """The H x W x 3 uint8 array of the photo ``name`` of :data:`PHOTOS`."""
    for p in PHOTOS:
        if p.name == name:
            return p.loader()
    raise KeyError(f"no bundled photo {name!r}; known: {[p.name for p in PHOTOS]}")


def load_all(names: Any = None, size: int = 224) -> tuple[list, torch.Tensor]:
    """(names, preprocessed batch [N, 3, size, size] float32) of ``names`` (default: every photo)."""
    from .efficientnet import preprocess

    names = [p.name for p in PHOTOS] if names is None else list(names)
    return names, torch.stack([preprocess(load(n), size) for n in names])


@dataclass(frozen=True)
class Prediction:
    name: str
    expected: tuple
    predicted: int
    label: str
    probability: float

    @property
    def correct(self) -> bool | None:
        """True / False when the photo has an expected class, None when it is not scored."""
        return (self.predicted in self.expected) if self.expected else None


def top1(model: Any = None, names: Any = None, verbose: bool = True) -> list:
    """Classify the bundled photos (default model: pretrained EfficientNet-Lite0, float32), print
    ``top-1 on the bundled photos: k/n`` (n: the photos with an expected class) and one line per
    photo (name, expected, predicted id and name, probability); returns the :class:`Prediction` list."""
    from .efficientnet import class_name, efficientnet_lite0

    model = efficientnet_lite0() if model is None else model
    names, x = load_all(names)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        prob = torch.softmax(model(x.to(dtype)).double(), dim=1)
    conf, idx = prob.max(dim=1)
    expected = {p.name: p.expected for p in PHOTOS}
    preds = [Prediction(n, expected[n], int(k), class_name(int(k)), float(c)) for n, k, c in zip(names, idx, conf)]
    if verbose:
        scored = [p for p in preds if p.correct is not None]
        print(f"top-1 on the bundled photos: {sum(p.correct for p in scored)}/{len(scored)}")
        for p in preds:
            exp = ", ".join(str(e) for e in p.expected) or "none (not scored)"
            mark = {True: "ok", False: "WRONG", None: "-"}[p.correct]
            print(f"  {p.name:18s} expected {exp:18s} predicted {p.predicted:4d} {p.label:18s} "
                  f"p={p.probability:.3f} {mark}")
    return preds


def confident(preds: Any = None, threshold: float = CONFIDENT) -> list:
    """The names of the photos classified correctly with top-1 probability >= ``threshold``
    (``preds``: :func:`top1`'s result; computed when None): the benchmark's photos."""
    preds = top1(verbose=False) if preds is None else preds
    return [p.name for p in preds if p.correct and p.probability >= threshold]
