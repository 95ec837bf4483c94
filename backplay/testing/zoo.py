"""A zoo of plain-torch models written the way people write them, to check that any model is read.

Nothing here is made for backplay: each class has its own ``forward`` with the idioms of torchvision
and research code (``F.relu``, ``nn.ReLU(inplace=True)``, ``out += identity``, ``torch.cat``,
``torch.flatten``, projection shortcuts, functional pooling), so a reader that handles the zoo handles
models it has never seen. Every model is in eval mode, with non-trivial BatchNorm statistics and a
deterministic, seeded, variance-preserving initialisation (logits of a random input neither vanish nor
explode). ``ZOO[name](size, seed, dtype)`` gives a :class:`ZooCase`; ``size="tiny"`` is small enough for
exact (rational) solvers on the unrolled graph, ``size="small"`` for fast batched tests.

- ``resnet18`` / ``resnet50``: torchvision ResNet with :class:`BasicBlock` / :class:`Bottleneck`
  (``out += identity``, conv1x1+BN projection shortcuts, 7x7 or 3x3 stem, overlapping MaxPool2d).
- ``vgg11_bn``: torchvision VGG (features from a cfg list, AdaptiveAvgPool2d, Linear-ReLU-Dropout head).
- ``mobilenet_v2``: :class:`InvertedResidual` blocks (1x1 expand, depthwise 3x3, linear bottleneck,
  ReLU6, ``x + self.conv(x)``), ``adaptive_avg_pool2d`` + ``torch.flatten``.
- ``densenet``: :class:`DenseLayer` (BN-ReLU-conv1x1-BN-ReLU-conv3x3 on ``torch.cat`` of all earlier
  features), :class:`DenseBlock`, :class:`Transition` (AvgPool2d), ``F.relu`` then global pooling.
- ``mlp_norm``: MLP with LayerNorm, GELU, SiLU, LeakyReLU(0.1), Dropout and a pre-norm residual.
- ``conv1d``: Conv1d with padding, stride and dilation, BatchNorm1d, MaxPool1d, AdaptiveAvgPool1d.
- ``unet``: U-Net encoder/decoder (MaxPool2d down, ``F.interpolate`` nearest up, ``torch.cat`` skips)
  with a global-mean classification head.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ZOO", "ZooCase", "zoo_input",
    "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50",
    "VGG", "make_vgg_layers", "vgg11_bn",
    "ConvBNReLU", "InvertedResidual", "MobileNetV2Small",
    "DenseLayer", "DenseBlock", "Transition", "DenseNetSmall",
    "MLPNorm", "Conv1dNet", "UNetSmall",
    "init_weights",
]


# ----------------------------------------------------------------------------------------- ResNet


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """torchvision's ResNet with a base ``width`` (64 there) and 1-4 stages (``len(layers)``); missing
    stages are ``nn.Identity``. ``small_stem``: 3x3 stride-1 stem conv instead of 7x7 stride 2 (the
    overlapping 3x3/2 max pool is kept either way)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], width: int = 64,
                 num_classes: int = 1000, in_channels: int = 3, small_stem: bool = False) -> None:
        super().__init__()
        if not 1 <= len(layers) <= 4:
            raise ValueError(f"ResNet takes 1-4 stages, got layers={tuple(layers)}")
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i in range(4):
            if i < len(layers):
                stage = self._make_layer(block, width * 2 ** i, layers[i], stride=1 if i == 0 else 2)
            else:
                stage = nn.Identity()
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))

        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def resnet18(width: int = 4, num_classes: int = 3, layers: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3,
             small_stem: bool = False) -> ResNet:
    return ResNet(BasicBlock, layers, width, num_classes, in_channels, small_stem)


def resnet50(width: int = 4, num_classes: int = 3, layers: Sequence[int] = (3, 4, 6, 3), in_channels: int = 3,
             small_stem: bool = False) -> ResNet:
    return ResNet(Bottleneck, layers, width, num_classes, in_channels, small_stem)


# -------------------------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, hidden: int = 4096, feature_channels: int = 512,
                 avgpool_size: int = 7, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((avgpool_size, avgpool_size))
        self.classifier = nn.Sequential(
            nn.Linear(feature_channels * avgpool_size * avgpool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_vgg_layers(cfg: Sequence[int | str], batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = int(v)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def vgg11_bn(width: int = 4, num_classes: int = 3, hidden: int = 16, in_channels: int = 3,
             cfg: Sequence[int | str] | None = None, avgpool_size: int = 2) -> VGG:
    """VGG-11 with BatchNorm; ``cfg`` defaults to torchvision's "A" scaled by ``width`` / 64. With a 32x32
    input the features end at 1x1 and the (2, 2) adaptive pool replicates them, as torchvision's (7, 7)
    pool does on small inputs."""
    if cfg is None:
        w = width
        cfg = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w, "M"]
    channels = [int(v) for v in cfg if v != "M"][-1]
    return VGG(make_vgg_layers(cfg, batch_norm=True, in_channels=in_channels), num_classes=num_classes,
               hidden=hidden, feature_channels=channels, avgpool_size=avgpool_size)


# ------------------------------------------------------------------------------------ MobileNetV2


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        assert stride in [1, 2]

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # pw
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([
            # dw
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            # pw-linear
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2Small(nn.Module):
    """MobileNetV2 with a stem of ``width`` channels and a short block ``setting`` of (t, c, n, s) rows
    (expansion, channels, repeats, first stride); the default is torchvision's scaled down."""

    def __init__(self, width: int = 8, num_classes: int = 3, setting: Sequence[tuple[int, int, int, int]] | None = None,
                 last_channel: int | None = None, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        if setting is None:
            setting = [(1, max(1, w // 2), 1, 1), (6, max(1, 3 * w // 4), 2, 2), (6, w, 2, 2),
                       (6, 2 * w, 2, 2), (6, 3 * w, 1, 1)]
        if last_channel is None:
            last_channel = 8 * w
        features: list[nn.Module] = [ConvBNReLU(in_channels, w, stride=2)]
        input_channel = w
        for t, c, n, s in setting:
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, c, stride, expand_ratio=t))
                input_channel = c
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        # Cannot use "squeeze" as batch-size can be 1
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# --------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input

        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                               drop_rate=drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetSmall(nn.Module):
    """torchvision's DenseNet with a small ``growth`` rate and ``block_config``; ``small_stem``: 3x3
    stride-1 stem conv instead of 7x7 stride 2 (the 3x3/2 max pool is kept)."""

    def __init__(self, growth: int = 4, num_classes: int = 3, block_config: Sequence[int] = (2, 2, 2),
                 num_init_features: int | None = None, bn_size: int = 2, in_channels: int = 3,
                 small_stem: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        if num_init_features is None:
            num_init_features = 2 * growth
        if small_stem:
            conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
        self.features = nn.Sequential(OrderedDict([
            ("conv0", conv0),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                               growth_rate=growth, drop_rate=drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth
            if i != len(block_config) - 1:
                trans = Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


# ------------------------------------------------------------------------------- MLP, 1-d, U-Net


class MLPNorm(nn.Module):
    """fc-LayerNorm-GELU, fc-SiLU-Dropout, then a pre-norm residual x + Dropout(LeakyReLU(fc(LN(x)))),
    then a linear head."""

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.SiLU()
        self.drop = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.act3 = nn.LeakyReLU(0.1)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.fc1(x)))
        x = self.drop(self.act2(self.fc2(x)))
        x = x + self.drop(self.act3(self.fc3(self.norm3(x))))
        return self.head(x)


class Conv1dNet(nn.Module):
    """Input [B, in_channels, L]: conv(k5, pad 2)-BN-ReLU-MaxPool1d(2), conv(k3, stride 2, pad 2,
    dilation 2)-BN-ReLU, conv(k3, pad 1)-BN-ReLU, AdaptiveAvgPool1d(3) (overlapping bins on short
    sequences), flatten, Linear."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 3, pool_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, width, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm1d(width)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(width, 2 * width, kernel_size=3, stride=2, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm1d(2 * width)
        self.conv3 = nn.Conv1d(2 * width, 2 * width, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm1d(2 * width)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool1d(pool_size)
        self.fc = nn.Linear(2 * width * pool_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def conv_block(in_channels: int, out_channels: int, n_convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNetSmall(nn.Module):
    """U-Net with ``depth`` levels of (conv-ReLU) x ``n_convs`` blocks: MaxPool2d down, a bottleneck,
    nearest ``F.interpolate`` up, ``torch.cat([up, skip], 1)``, conv block; head: mean over H, W and a
    Linear to the classes."""

    def __init__(self, in_channels: int = 3, width: int = 4, num_classes: int = 3, depth: int = 2,
                 n_convs: int = 2) -> None:
        super().__init__()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        ch = in_channels
        skips = []
        for level in range(depth):
            out = width * 2 ** level
            self.downs.append(conv_block(ch, out, n_convs))
            skips.append(out)
            ch = out
        self.bottleneck = conv_block(ch, 2 * ch, n_convs)
        ch = 2 * ch
        for skip in reversed(skips):
            self.ups.append(conv_block(ch + skip, skip, n_convs))
            ch = skip
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, skip], dim=1)
            x = up(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


# ------------------------------------------------------------------------- initialisation, registry


_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic, seeded re-initialisation of every Conv/Linear/norm layer (in ``named_modules``
    order) from a ``torch.Generator``: weights N(0, 2 / fan_in) (the last Linear N(0, 1 / fan_in)),
    biases U(+-0.5 / sqrt(fan_in)); norm scales +-U(0.5, 1.5) (one in five negative), shifts N(0, 0.2^2);
    BatchNorm running means N(0, 0.3^2), running variances U(0.5, 2). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(int(seed))
    layers = [m for _, m in model.named_modules() if isinstance(m, _CONV_LINEAR + _NORMS)]
    last_linear = [m for m in layers if isinstance(m, nn.Linear)][-1:]
    for m in layers:
        if isinstance(m, _CONV_LINEAR):
            w = m.weight
            fan_in = w[0].numel()
            gain = 1.0 if m in last_linear else 2.0
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype) * math.sqrt(gain / fan_in))
            if m.bias is not None:
                b = 0.5 / math.sqrt(fan_in)
                m.bias.copy_(((torch.rand(m.bias.shape, generator=g, dtype=torch.float64) * 2 - 1) * b).to(m.bias.dtype))
        else:
            if getattr(m, "weight", None) is not None:
                n = m.weight.shape
                scale = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
                sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.2, -1.0, 1.0)
                m.weight.copy_((scale * sign).to(m.weight.dtype))
                m.bias.copy_((0.2 * torch.randn(n, generator=g, dtype=torch.float64)).to(m.bias.dtype))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.running_mean.shape
                m.running_mean.copy_((0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(m.running_mean.dtype))
                m.running_var.copy_((0.5 + 1.5 * torch.rand(c, generator=g, dtype=torch.float64)).to(m.running_var.dtype))
    return model.eval()


@dataclass(frozen=True, eq=False)
class ZooCase:
    """One zoo model: ``model`` in eval mode, ``input_shape`` of one sample (no batch dimension)."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int


SIZES = ("tiny", "small")


def _build(name: str, size: str, seed: int, dtype: torch.dtype, build: Callable[[], nn.Module],
           input_shape: tuple[int, ...], num_classes: int) -> ZooCase:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG: leave it as it was
        model = build()
    init_weights(model, seed)
    model = model.to(dtype).eval()
    return ZooCase(name, model, tuple(input_shape), num_classes)


NUM_CLASSES = 3


def make_resnet18(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, width 2, stages (1, 1) (identity and stride-2 projection shortcuts), 3x3 stem;
    small: 3x32x32, width 4, stages (2, 2, 2, 2), torchvision's 7x7/2 stem."""
    if size == "tiny":
        return _build("resnet18", size, seed, dtype,
                      lambda: resnet18(width=2, num_classes=NUM_CLASSES, layers=(1, 1), small_stem=True),
                      (3, 8, 8), NUM_CLASSES)
    return _build("resnet18", size, seed, dtype, lambda: resnet18(width=4, num_classes=NUM_CLASSES),
                  (3, 32, 32), NUM_CLASSES)


def make_resnet50(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, width 2 (bottleneck outputs 8), stages (2, 1) (stride-1 and stride-2 projections, one
    identity shortcut), 3x3 stem; small: 3x32x32, width 4, stages (3, 4, 6, 3), 7x7/2 stem."""
    if size == "tiny":
        return _build("resnet50", size, seed, dtype,
                      lambda: resnet50(width=2, num_classes=NUM_CLASSES, layers=(2, 1), small_stem=True),
                      (3, 8, 8), NUM_CLASSES)
    return _build("resnet50", size, seed, dtype, lambda: resnet50(width=4, num_classes=NUM_CLASSES),
                  (3, 32, 32), NUM_CLASSES)


def make_vgg11_bn(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, cfg [2, M, 4, M], (1, 1) pool, hidden 8; small: 3x32x32, VGG-11 cfg at width 4,
    (2, 2) pool over 1x1 features, hidden 16."""
    if size == "tiny":
        return _build("vgg11_bn", size, seed, dtype,
                      lambda: vgg11_bn(width=2, num_classes=NUM_CLASSES, hidden=8, cfg=[2, "M", 4, "M"], avgpool_size=1),
                      (3, 8, 8), NUM_CLASSES)
    return _build("vgg11_bn", size, seed, dtype, lambda: vgg11_bn(width=4, num_classes=NUM_CLASSES, hidden=16),
                  (3, 32, 32), NUM_CLASSES)


def make_mobilenet_v2(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, stem 4, blocks (t=1, 2), (t=2, 2, residual), (t=2, 4, stride 2), last 8;
    small: 3x32x32, stem 8, five stages, last 64."""
    if size == "tiny":
        return _build("mobilenet_v2", size, seed, dtype,
                      lambda: MobileNetV2Small(width=4, num_classes=NUM_CLASSES,
                                               setting=[(1, 2, 1, 1), (2, 2, 1, 1), (2, 4, 1, 2)], last_channel=8),
                      (3, 8, 8), NUM_CLASSES)
    return _build("mobilenet_v2", size, seed, dtype, lambda: MobileNetV2Small(width=8, num_classes=NUM_CLASSES),
                  (3, 32, 32), NUM_CLASSES)


def make_densenet(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, growth 2, blocks (2, 1) with one transition, 2 init features, 3x3 stem;
    small: 3x32x32, growth 4, blocks (2, 2, 2), 7x7/2 stem."""
    if size == "tiny":
        return _build("densenet", size, seed, dtype,
                      lambda: DenseNetSmall(growth=2, num_classes=NUM_CLASSES, block_config=(2, 1),
                                            num_init_features=2, bn_size=2, small_stem=True),
                      (3, 8, 8), NUM_CLASSES)
    return _build("densenet", size, seed, dtype, lambda: DenseNetSmall(growth=4, num_classes=NUM_CLASSES),
                  (3, 32, 32), NUM_CLASSES)


def make_mlp_norm(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 12 features, hidden 8; small: 32 features, hidden 64."""
    if size == "tiny":
        return _build("mlp_norm", size, seed, dtype, lambda: MLPNorm(12, 8, NUM_CLASSES), (12,), NUM_CLASSES)
    return _build("mlp_norm", size, seed, dtype, lambda: MLPNorm(32, 64, NUM_CLASSES), (32,), NUM_CLASSES)


def make_conv1d(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 2 channels x length 16, width 2; small: 3 x 64, width 8."""
    if size == "tiny":
        return _build("conv1d", size, seed, dtype, lambda: Conv1dNet(2, 2, NUM_CLASSES), (2, 16), NUM_CLASSES)
    return _build("conv1d", size, seed, dtype, lambda: Conv1dNet(3, 8, NUM_CLASSES), (3, 64), NUM_CLASSES)


def make_unet(size: str = "small", seed: int = 0, dtype: torch.dtype = torch.float32) -> ZooCase:
    """tiny: 3x8x8, width 2, one level; small: 3x32x32, width 4, two levels; two convs per block."""
    if size == "tiny":
        return _build("unet", size, seed, dtype, lambda: UNetSmall(3, 2, NUM_CLASSES, depth=1, n_convs=2),
                      (3, 8, 8), NUM_CLASSES)
    return _build("unet", size, seed, dtype, lambda: UNetSmall(3, 4, NUM_CLASSES, depth=2, n_convs=2),
                  (3, 32, 32), NUM_CLASSES)


ZOO: dict[str, Callable[..., ZooCase]] = {
    "resnet18": make_resnet18,
    "resnet50": make_resnet50,
    "vgg11_bn": make_vgg11_bn,
    "mobilenet_v2": make_mobilenet_v2,
    "densenet": make_densenet,
    "mlp_norm": make_mlp_norm,
    "conv1d": make_conv1d,
    "unet": make_unet,
}


def zoo_input(case: ZooCase, batch: int | None = None, seed: int = 0) -> Tensor:
    """A deterministic N(0, 1) input of the model's dtype: one sample of ``case.input_shape`` when
    ``batch`` is None, else ``[batch, *input_shape]``."""
    dtype = next(case.model.parameters()).dtype
    g = torch.Generator().manual_seed(int(seed))
    shape = case.input_shape if batch is None else (int(batch), *case.input_shape)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
