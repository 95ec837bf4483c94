"""MLPSpec: the one network description; conversions and clear errors on bad input."""

import math

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn as nn

import backplay as bp


def test_round_trip_torch():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    spec = bp.gpu.mlp_spec(model)
    assert spec.widths == (3, 4, 2) and spec.output == "linear" and spec.activation == "relu"
    back = spec.to_torch()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(back(x), model(x))
    assert np.allclose(spec(x[0].numpy()), model(x[:1]).detach().numpy()[0], atol=1e-14)


def test_softplus_and_relu_output():
    model = nn.Sequential(nn.Linear(2, 3), nn.Softplus(beta=2.0), nn.Linear(3, 1), nn.Softplus(beta=2.0))
    spec = bp.gpu.mlp_spec(model)
    assert spec.activation == "softplus" and spec.eps == 0.5 and spec.output == "softplus"
    x = torch.randn(4, 2)
    assert torch.allclose(spec.to_torch(dtype=torch.float32)(x), model(x), atol=1e-6)


def test_to_torch_keeps_float64_weights():
    assert bp.MLPSpec([[[0.1]]]).to_torch()[0].weight.item() == 0.1


def test_exact_copy_and_back():
    spec = bp.MLPSpec([[[0.1, -2]]], [[0.3]])
    ex = spec.exact()
    assert ex.is_exact and ex.weights[0][0, 0] == sp.Rational(0.1)
    assert ex.numeric().weights[0][0, 0] == 0.1
    mixed = bp.MLPSpec([[[1, 2]]], [[sp.Rational(1, 3)]])  # any exact entry makes all exact
    assert mixed.is_exact and mixed.bias(1)[0] == sp.Rational(1, 3)


@pytest.mark.parametrize("weights,biases,msg", [
    ([[[1.0, math.nan]]], None, "non-finite"),
    ([[[1.0, math.inf]]], None, "non-finite"),
    ([[[1.0]]], [[math.nan]], "non-finite"),
    ([[[1.0, 2.0]], [[1.0], [2.0]], [[1.0, 2.0, 3.0]]], None, "shape mismatch"),
    ([[[1.0, 2.0]]], [[1.0, 2.0]], "shape mismatch"),
    ([[1.0, 2.0]], None, "2-d"),
    ([], None, "at least one"),
    ([[[1.0]]], [None, None], "biases"),
])
def test_bad_values_and_shapes(weights, biases, msg):
    with pytest.raises(ValueError, match=msg):
        bp.MLPSpec(weights, biases)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf, None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        bp.MLPSpec([[[1.0]]], activation="softplus", eps=eps)


def test_symbolic_eps_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        bp.MLPSpec([[[1.0]]], activation="softplus", eps=sp.Symbol("e"))
    assert bp.MLPSpec([[[1.0]]], activation="softplus", eps=sp.Symbol("e", positive=True))


def test_bad_options():
    with pytest.raises(ValueError, match="activation"):
        bp.MLPSpec([[[1.0]]], activation="tanh")
    with pytest.raises(ValueError, match="output"):
        bp.MLPSpec([[[1.0]]], output="relu", activation="softplus", eps=1.0)
    with pytest.raises(ValueError, match="eps is only"):
        bp.MLPSpec([[[1.0]]], eps=1.0)


def test_unsupported_module_is_named():
    with pytest.raises(TypeError, match="Tanh"):
        bp.gpu.mlp_spec(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)))
    with pytest.raises(TypeError, match="Conv2d"):
        bp.gpu.mlp_spec(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(ValueError, match="followed by ReLU"):
        bp.gpu.mlp_spec(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)))
    with pytest.raises(ValueError, match="mixed"):
        bp.gpu.mlp_spec(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Softplus()))


def test_input_and_target_errors():
    spec = bp.MLPSpec([[[1.0, 2.0]]])
    game = bp.theory.ReLUNetGame(spec)
    with pytest.raises(ValueError, match="expects 2"):
        game.solve([1.0], 0)
    with pytest.raises(ValueError, match="non-finite"):
        game.solve([1.0, math.nan], 0)
    with pytest.raises(ValueError, match="out of range"):
        game.solve([1.0, 2.0], 1)
    with pytest.raises(TypeError, match="int"):
        game.solve([1.0, 2.0], 0.5)


def test_from_torch_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bp.gpu.mlp_spec(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
