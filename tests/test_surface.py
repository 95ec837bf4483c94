"""The user-facing surface: short reprs, one-line errors for a rule class and for meta tensors,
half-precision models explained in float32, train-mode models explained with a warning."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backplay as bp
from backplay.rules import LRP0, AlphaBeta, Gradient, GradientEquilibrium, GradientXInput

from _factories import relu_net

F64 = torch.float64


class SmallCNN(nn.Module):
    """A conv net as people write them: layers in __init__, F.relu and pooling in forward."""

    def __init__(self, bn: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def _cnn(seed: int = 0, **kw) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(**kw)
    if kw.get("bn"):
        with torch.no_grad():  # running statistics unlike any batch's: train and eval mode differ
            model.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
            model.bn.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    return model.eval()


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _short(obj) -> str:
    r = repr(obj)
    assert len(r) < 400, r
    assert "\n" not in r, r
    assert "array(" not in r and "tensor(" not in r, r
    return r


def _snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": {n: m.training for n, m in model.named_modules()}}


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]


def _messages(record, category=UserWarning) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, category)]


# -- reprs ------------------------------------------------------------------------------------------
def test_explain_report_hellinger_occupation_reprs():
    model = relu_net([3, 5, 2], 3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    _, rep = bp.explain(model, x, 1, rule=AlphaBeta(2, 1), return_report=True)
    r = _short(rep)
    assert "AlphaBeta" in r and "batch 4" in r and "layers: 3" in r
    assert f"{float(rep.logit.min()):.4g}" in r and f"{float(rep.logit.max()):.4g}" in r
    _, one = bp.explain(model, x[0], 1, rule=LRP0(), return_report=True)
    r = _short(one)
    assert "'LRP0'" in r and "one sample" in r and f"logit {float(one.logit):.4g}" in r

    hm = bp.hellinger_matrix(model, x, 1, [LRP0(), AlphaBeta(2, 1)])
    r = _short(hm)
    assert "'LRP0'" in r and "AlphaBeta" in r and "batch 4" in r and "(4, 2, 2)" in r
    assert f"max {float(hm.values.max()):.4g}" in r

    occ = bp.gpu.occupation(model, x, 1)
    r = _short(occ)
    assert "batch 4" in r and "x shape (3,)" in r and "2 outputs" in r and "2 layers" in r
    assert f"{float(occ.value.max()):.4g}" in r


def test_frozen_net_and_spec_reprs():
    model = _cnn().double()
    frozen = bp.gpu.unroll(model, _images(1)[0].double())
    r = _short(frozen)
    assert "FrozenNet(" in r and str(frozen.widths[0]) in r and str(frozen.widths[-1]) in r
    assert "in_shape=(3, 8, 8)" in r and "conv x2" in r and "bias=True" in r and "float64" in r
    spec = bp.gpu.mlp_spec(relu_net([3, 5, 2], 3))
    r = _short(spec)
    assert "widths=(3, 5, 2)" in r and "'relu'" in r and "bias=True" in r
    deep = bp.MLPSpec([np.eye(2)] * 40)  # a long widths tuple is cut
    r = _short(deep)
    assert "(2, 2, 2, ... 35 more ..., 2, 2, 2)" in r
    exact = bp.theory.routing.freeze(spec.exact(), [0.5, -0.25, 1.0])
    assert "exact" in _short(exact)


def test_law_reprs():
    spec = bp.gpu.mlp_spec(relu_net([3, 5, 2], 3))
    x = [0.5, -0.25, 1.0]
    law = bp.theory.routing_law(spec, x, 1, AlphaBeta(2, 1))
    r = _short(law)
    assert r.startswith("RoutingLaw(rule='AlphaBeta(") and "target=1" in r and "depth=2" in r
    assert "widths=(3, 5, 2)" in r and "field='rational'" in r
    k = law.kernel(1, 0)
    r = _short(k)
    assert "p=2/3" in r and "q=1/3" in r and "m=3" in r
    assert f"{len(k.routing[1])} on +" in r and f"{len(k.routing[-1])} on -" in r
    occ = law.occupation()
    r = _short(occ)
    assert "widths=(3, 5, 2)" in r and f"{len(occ.nu)} states" in r
    r = _short(bp.theory.gv_law(spec, x, 0))
    assert r.startswith("GVLaw(") and "target=0" in r and "depth=2" in r


def test_game_program_reprs():
    spec = bp.gpu.mlp_spec(relu_net([3, 4, 2], 5))
    x = [0.5, -0.25, 1.0]
    cert = bp.numerics.certify_equilibrium(spec, x, 1)
    r = _short(cert)
    assert f"value={cert.value:.6g}" in r and f"exploitability={cert.exploitability:.3g}" in r
    r = _short(cert.max_response)
    assert "player='max'" in r and f"value={cert.max_response.value:.6g}" in r
    assert f"{cert.max_response.n_states} states" in r
    occ = bp.numerics.occupation_measure(spec, x, 1)
    r = _short(occ)
    assert "3 inputs" in r and f"value={occ.value:.6g}" in r and f"stopped={occ.stopped:.6g}" in r


def test_rule_report_repr_is_short_and_str_stays_the_table():
    spec = bp.gpu.mlp_spec(relu_net([3, 4, 2], 5))
    rep = bp.validate_rule(LRP0(), spec, [0.5, -0.25, 1.0], 1)
    r = _short(rep)
    assert "rule='LRP0'" in r and "MLP [3, 4, 2]" in r and "Markov routing law" in r
    assert "GradientEquilibrium" in r and f"of {len(rep.findings)} properties hold" in r
    assert str(rep).count("\n") > len(rep.findings)  # print() still gives the table


# -- a rule class instead of an instance --------------------------------------------------------------
def test_rule_class_instead_of_instance():
    model = relu_net([3, 4, 2], 1)
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(TypeError) as e:
        bp.explain(model, x, 0, rule=LRP0)
    assert str(e.value) == "rule must be an instance, got the class LRP0: write rule=LRP0()"
    with pytest.raises(TypeError, match=r"^rule_b must be an instance, got the class AlphaBeta: "
                                        r"write rule_b=AlphaBeta\(\)$"):
        bp.hellinger(model, x, 0, LRP0(), AlphaBeta)
    with pytest.raises(TypeError, match=r"^rule_a must be an instance, got the class LRP0: write rule_a=LRP0\(\)$"):
        bp.hellinger(model, x, 0, LRP0, AlphaBeta(2, 1))
    with pytest.raises(TypeError, match=r"^rules\[1\] must be an instance, got the class GradientEquilibrium: "
                                        r"write GradientEquilibrium\(\)$"):
        bp.hellinger_matrix(model, x, 0, [LRP0(), GradientEquilibrium])
    with pytest.raises(TypeError, match=r"^rule must be an instance, got the class LRP0: write rule=LRP0\(\)$"):
        bp.validate_rule(LRP0, bp.gpu.mlp_spec(model), [0.5, -0.25, 1.0], 0)


# -- meta tensors ---------------------------------------------------------------------------------
def test_meta_model_and_meta_input():
    with torch.device("meta"):
        meta_model = SmallCNN()
    with pytest.raises(ValueError, match=r"the model has no data: its parameters are on the meta device "
                                         r"\(conv1.weight\); load the weights first"):
        bp.explain(meta_model.eval(), _images(), 0, rule=LRP0())
    with pytest.raises(ValueError, match="x is on the meta device and holds no data"):
        bp.explain(_cnn(), _images().to("meta"), 0, rule=LRP0())
    with pytest.raises(ValueError, match="meta device"):
        bp.hellinger(meta_model.eval(), _images(), 0, LRP0(), AlphaBeta(2, 1))
    with torch.device("meta"):
        meta_lm = TinyLM()
    with pytest.raises(ValueError, match=r"the model has no data: its parameters are on the meta device "
                                         r"\(emb.weight\)"):
        bp.explain(meta_lm.eval(), torch.tensor([[1, 2]]), 0)


# -- half precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", [AlphaBeta(2, 1), GradientXInput(), LRP0()], ids=lambda r: r.name[:9])
def test_half_model_explained_in_float32_and_cast_back(half, rule):
    model = _cnn(bn=True).to(half)
    snap = _snapshot(model)
    x = _images().to(half)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        R, rep = bp.explain(model, x, 2, rule=rule, return_report=True)
    (msg,) = _messages(record)
    name = str(half).removeprefix("torch.")
    assert f"the model's parameters are {name} and x is {name}" in msg
    assert "computes in float32 on a float32 copy of the model" in msg and "a few percent" in msg
    assert R.dtype == half and R.shape == x.shape
    assert rep.logit.dtype == half and rep.layers[0].dtype == half
    _assert_unchanged(model, snap)
    assert all(p.dtype == half for p in model.parameters())

    model32 = copy.deepcopy(model).float()
    R32, rep32 = bp.explain(model32, x.float(), 2, rule=rule, return_report=True)
    assert torch.equal(R32.to(half), R)  # the float32 explanation, cast back
    assert torch.equal(rep32.logit.to(half), rep.logit)
    assert torch.equal(rep32.stopped.to(half), rep.stopped)

    # a half model with a float32 input: computed on the float32 copy, returned in float32
    with pytest.warns(UserWarning, match=f"the model's parameters are {name}: backplay computes in float32"):
        R_mixed = bp.explain(model, x.float(), 2, rule=rule)
    assert R_mixed.dtype == torch.float32 and torch.equal(R_mixed, R32)
    _assert_unchanged(model, snap)


class TinyLM(nn.Module):
    """Token ids [B, T] -> logits [B, classes]: an embedding, a dense layer with F.relu, a sum over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.emb(ids))).sum(1)


def test_half_language_model_explained_in_float32():
    torch.manual_seed(0)
    model = TinyLM().half().eval()
    snap = _snapshot(model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.warns(UserWarning, match="the model's parameters are float16: backplay computes in float32 on a "
                                         "float32 copy of the model"):
        R = bp.explain(model, ids, 1, rule=GradientXInput())
    assert R.dtype == torch.float16 and R.shape == ids.shape
    R32 = bp.explain(copy.deepcopy(model).float(), ids, 1, rule=GradientXInput())
    assert torch.equal(R32.half(), R)
    _assert_unchanged(model, snap)


def test_half_input_on_float32_model():
    model = _cnn()
    x = _images().half()
    with pytest.warns(UserWarning, match="x is float16: backplay computes in float32, since") as record:
        R = bp.explain(model, x, 0, rule=AlphaBeta(2, 1))
    assert not any("copy" in m for m in _messages(record))  # a float32 model is not copied
    assert R.dtype == torch.float16
    assert torch.equal(R, bp.explain(model, x.float(), 0, rule=AlphaBeta(2, 1)).half())


def test_float32_model_and_input_warn_nothing():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bp.explain(_cnn(bn=True, dropout=0.3), _images(), 0, rule=Gradient())
    assert _messages(record) == []


def test_float64_input_on_float32_conv_model():
    """A float64 input on a float32 model is computed in float64 (on a float64 copy): a CNN too, and
    unroll (which reads in float64) works on a float32 CNN."""
    model = _cnn()
    snap = _snapshot(model)
    x = _images().double()
    R = bp.explain(model, x, 1, rule=AlphaBeta(2, 1))
    assert R.dtype == F64
    torch.testing.assert_close(R, bp.explain(copy.deepcopy(model).double(), x, 1, rule=AlphaBeta(2, 1)),
                               rtol=0, atol=0)
    frozen = bp.gpu.unroll(model, x[0])
    ref = bp.gpu.unroll(copy.deepcopy(model).double(), x[0])
    assert frozen.widths == ref.widths
    assert all(np.array_equal(a, b) for a, b in zip(frozen.weights, ref.weights))
    _assert_unchanged(model, snap)


# -- train mode -----------------------------------------------------------------------------------
def test_train_mode_warns_and_is_left_alone():
    model = _cnn(bn=True, dropout=0.5).train()
    snap = _snapshot(model)
    x = _images()
    with pytest.warns(UserWarning) as record:
        R = bp.explain(model, x, 3, rule=AlphaBeta(2, 1))
    (msg,) = [m for m in _messages(record) if "train mode" in m]
    assert msg.startswith("the model is in train mode")
    assert "dropout" in msg and "batch statistics" in msg and "model.eval()" in msg
    assert "reads and explains the eval-mode function" in msg
    assert model.training and model.bn.training and model.drop.training
    _assert_unchanged(model, snap)
    # what the warning says: the explained function is the eval-mode net
    R_eval = bp.explain(copy.deepcopy(model).eval(), x, 3, rule=AlphaBeta(2, 1))
    assert torch.equal(R, R_eval)


def test_train_mode_of_one_submodule_is_named():
    model = _cnn(bn=True)
    model.bn.train()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match=r"^the model is in train mode \(bn\), where dropout is active and "
                                         r"BatchNorm uses batch statistics"):
        bp.explain(model, _images(), 0, rule=LRP0())
    assert not model.training and model.bn.training and not model.conv1.training
    _assert_unchanged(model, snap)


def test_train_mode_that_changes_nothing_is_not_warned_about():
    """A model in train mode with no dropout, no batch norm and no module reading self.training
    computes the same in both modes (every new nn.Module starts in train mode): no warning. A custom
    module that reads self.training is warned about."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bp.explain(model, torch.randn(2, 4), 0, rule=LRP0())

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x + 0.1 * torch.randn_like(x) if self.training else x)

    with pytest.warns(UserWarning, match=r"train mode \(Noisy\)"):
        bp.explain(Noisy(), torch.randn(2, 4), 0, rule=LRP0())


def test_result_objects_print_short():
    """The results of the exact solver, the unroll, the law program and the flow program print a line,
    never their arrays."""
    import numpy as np

    from backplay.gpu.unroll import unroll_graph
    from backplay.nets import MLPSpec

    rng = np.random.default_rng(0)
    spec = MLPSpec([rng.normal(size=(30, 20)), rng.normal(size=(3, 30))], [rng.normal(size=30), None])
    x = rng.normal(size=20)
    shown = [bp.theory.ReLUNetGame(spec.exact()).solve(x, 0),
             unroll_graph(spec.to_torch(dtype=torch.float64), torch.as_tensor(x)),
             bp.validate_rule(AlphaBeta(2, 1), spec, x, 0).law]
    for obj in shown:
        r = repr(obj)
        assert len(r) < 400 and "array(" not in r and "\n" not in r, r
    assert "widths=(20, 30, 3)" in repr(shown[0]) and "FrozenNet(widths=(20, 30, 3)" in repr(shown[1])
