"""Localisation canvases built from scikit-learn's bundled ``load_digits`` (offline, real digits).

Each canvas is a ``size x size`` grey image (values in [0, 1]) holding one real handwritten digit
(8 x 8, the class label) at a random position, ``n_distractors`` *scrambled* digits (another real
digit whose pixels, or ``scramble_block`` x ``scramble_block`` blocks, are randomly permuted: the
same ink, no digit shape) at other random, non-overlapping positions, and uniform background noise in
``[0, noise]``. The ground-truth mask is the 8 x 8 square of the real digit.

The digit instances are split once (stratified, seeded) into a training pool and an evaluation
pool; training canvases use only the training pool, evaluation canvases only the evaluation pool.
The protocol's split A holds evaluation canvases whose digit is in ``CLASSES_A`` (0-4), split B
those in ``CLASSES_B`` (5-9).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["CanvasConfig", "CanvasSet", "CLASSES_A", "CLASSES_B", "digit_pools", "make_canvases"]

CLASSES_A = (0, 1, 2, 3, 4)
CLASSES_B = (5, 6, 7, 8, 9)
DIGIT = 8  # side of a load_digits image


@dataclass(frozen=True)
class CanvasConfig:
    """How canvases are drawn. ``size`` >= 8 * (1 + n_distractors) keeps placement feasible."""

    size: int = 32
    n_distractors: int = 2
    noise: float = 0.1
    eval_fraction: float = 0.4  # share of each class's digit instances kept for evaluation
    scramble_block: int = 1  # side of the blocks a distractor's pixels are permuted in (1, 2, 4)

    def __post_init__(self) -> None:
        if self.n_distractors < 0:
            raise ValueError(f"n_distractors must be >= 0, got {self.n_distractors}")
        if self.size < DIGIT * (1 + self.n_distractors):
            raise ValueError(f"size {self.size} is too small for a digit and {self.n_distractors} "
                             f"distractors of {DIGIT} x {DIGIT} (need >= {DIGIT * (1 + self.n_distractors)})")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must lie in [0, 1], got {self.noise}")
        if self.scramble_block not in (1, 2, 4):
            raise ValueError(f"scramble_block must be 1, 2 or 4, got {self.scramble_block}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CanvasSet:
    """A batch of canvases: ``images`` [N, 1, S, S] float32, ``labels`` [N] int64, ``masks``
    [N, S, S] bool (the real digit's square), ``boxes`` [N, 2] int64 (its top-left row, col)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray | list) -> "CanvasSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return CanvasSet(self.images[index], self.labels[index], self.masks[index], self.boxes[index])


def digit_pools(cfg: CanvasConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (digits, labels), "eval": (digits, labels)}``: the 1797 load_digits images scaled
    to [0, 1] ([n, 8, 8] float64), split per class with ``cfg.eval_fraction`` kept for evaluation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits benchmark reads scikit-learn's digits: pip install 'backplay[bench]' "
                          "(or scikit-learn)") from None

    data = load_digits()
    images = data.images.astype(np.float64) / 16.0
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng([seed, 7])
    train, evaluation = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * cfg.eval_fraction))
        evaluation.append(idx[:k])
        train.append(idx[k:])
    tr, ev = np.sort(np.concatenate(train)), np.sort(np.concatenate(evaluation))
    return {"train": (images[tr], labels[tr]), "eval": (images[ev], labels[ev])}


def _scramble(digit: np.ndarray, rng: np.random.Generator, block: int) -> np.ndarray:
    k = DIGIT // block
    blocks = digit.reshape(k, block, k, block).transpose(0, 2, 1, 3).reshape(k * k, block, block)
    blocks = blocks[rng.permutation(k * k)]
    return blocks.reshape(k, k, block, block).transpose(0, 2, 1, 3).reshape(DIGIT, DIGIT)


def _positions(n: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """n top-left corners of non-overlapping 8 x 8 squares (rejection sampling)."""
    while True:
        out: list[tuple[int, int]] = []
        for _ in range(200):
            r, c = (int(v) for v in rng.integers(0, size - DIGIT + 1, size=2))
            if all(abs(r - r2) >= DIGIT or abs(c - c2) >= DIGIT for r2, c2 in out):
                out.append((r, c))
                if len(out) == n:
                    return out


def make_canvases(cfg: CanvasConfig, digits: np.ndarray, labels: np.ndarray, n: int, seed: int,
                  classes: tuple[int, ...] | None = None) -> CanvasSet:
    """``n`` canvases drawn with a generator seeded by ``seed``. The real digit of each canvas is
    drawn uniformly from the pool entries whose label is in ``classes`` (all if None); the
    distractors are scrambled copies of any pool digit."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 11])
    allowed = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, classes))
    if allowed.size == 0:
        raise ValueError(f"no digit of classes {classes} in the pool")
    S = cfg.size
    images = np.zeros((n, 1, S, S))
    masks = np.zeros((n, S, S), dtype=bool)
    out_labels = np.zeros(n, dtype=np.int64)
    boxes = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        canvas = rng.uniform(0.0, cfg.noise, size=(S, S)) if cfg.noise > 0 else np.zeros((S, S))
        j = int(rng.choice(allowed))
        pos = _positions(1 + cfg.n_distractors, S, rng)
        r, c = pos[0]
        canvas[r:r + DIGIT, c:c + DIGIT] = np.maximum(canvas[r:r + DIGIT, c:c + DIGIT], digits[j])
        masks[i, r:r + DIGIT, c:c + DIGIT] = True
        for rd, cd in pos[1:]:
            d = _scramble(digits[int(rng.integers(len(labels)))], rng, cfg.scramble_block)
            canvas[rd:rd + DIGIT, cd:cd + DIGIT] = np.maximum(canvas[rd:rd + DIGIT, cd:cd + DIGIT], d)
        images[i, 0] = canvas
        out_labels[i] = labels[j]
        boxes[i] = (r, c)
    return CanvasSet(torch.from_numpy(images).float(), torch.from_numpy(out_labels),
                     torch.from_numpy(masks), torch.from_numpy(boxes))
