"""Small model factories shared by the gpu tests."""

import torch
import torch.nn as nn

F64 = torch.float64


def relu_net(widths, seed, bias=True, output_relu=False, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for l, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g))
            if bias:
                lin.bias.copy_(0.5 * torch.randn(b, generator=g))
        mods.append(lin)
        if l < len(widths) - 1 or output_relu:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(dtype=dtype, device=device).eval()


def two_sign_cnn(conv1x1_bias: float | None = None):
    """conv 3x3 - ReLU - conv 3x3 - ReLU - conv 1x1 - ReLU - Linear (float64, eval) and one input
    [1, 5, 5]; the head weighs channel 0 up and channel 1 down, so a rule starts with mass of both signs
    (Attribution Equilibrium). ``conv1x1_bias``: the 1x1 conv's bias filled with it (None: its seeded
    init)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5 * 5, 2)).double().eval()
    with torch.no_grad():
        m[2].bias.fill_(0.3)
        m[4].weight.copy_(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64).view(2, 2, 1, 1))
        if conv1x1_bias is not None:
            m[4].bias.fill_(conv1x1_bias)
        m[7].weight.zero_()
        m[7].weight[0, :25] = 1.0
        m[7].weight[0, 25:] = -2.0
    x = torch.rand((1, 5, 5), generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.3
    return m, x
