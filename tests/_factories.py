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
