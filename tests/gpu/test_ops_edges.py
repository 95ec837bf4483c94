"""Every linear map's edge list (``LinearOp.edges``: the K incoming edges of each output unit and
their coefficients) equals the map's matrix, on models written the way people write them: grouped,
strided, dilated and 'same'-padded convolutions in 1 and 2 dimensions, dense layers on tokens,
LayerNorm / GroupNorm, attention, residual sums, average pools and a standalone BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backplay.gpu.engine import prepare
from backplay.gpu.ops import dense_matrix
from backplay.gpu.trace import LayerTrace

D = torch.float64


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2)
        self.c = nn.Conv2d(4, 4, 3, groups=4, bias=False)  # depthwise
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(self.b(h)) + h
        h = self.gn(F.relu(self.bn(F.avg_pool2d(h, 2, stride=1))))
        h = F.relu(self.c(h))
        return self.fc(h.mean((2, 3)))


class Conv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 3, stride=2, padding=2)
        self.fc = nn.Linear(2 * 5, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class Block(nn.Module):
    """A pre-norm transformer block on tokens, nn.MultiheadAttention, with a head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


CASES = [
    ("convs", lambda: Convs(), (2, 2, 8, 8)),
    ("conv1d", lambda: Conv1d(), (2, 3, 8)),
    ("block", lambda: Block(), (2, 3, 4)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_edge_lists_equal_the_matrices(name, make, shape):
    torch.manual_seed(0)
    model = make().to(D).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d,)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(shape, dtype=D)
    trace = prepare(model, x).trace()
    kinds = set()
    for step in trace.steps:
        if not isinstance(step, LayerTrace):
            continue
        M, y = step.map, step.input
        W = dense_matrix(M, y)
        coef, idx = M.edges(y)
        rebuilt = torch.zeros_like(W)
        rebuilt.scatter_add_(2, idx.unsqueeze(0).expand(W.shape[0], -1, -1), coef.expand(W.shape[0], -1, -1))
        assert torch.equal(rebuilt, W), (step.kind, type(M).__name__)
        kinds.add(type(M).__name__)
    expected = {"convs": {"ConvOp", "ScaleOp", "NormOp", "AddOp", "DenseOp", "PoolOp"},
                "conv1d": {"ConvOp", "DenseOp"}, "block": {"NormOp", "AttentionOp", "DenseOp", "AddOp"}}[name]
    assert expected <= kinds, kinds
