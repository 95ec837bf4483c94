"""Transformers and language models on the one reader (docs/theory.md sections 10 and 11).

Models are passed as users hold them (tests/_transformers.py): Hugging Face ``ViTForImageClassification``,
``BertForSequenceClassification`` and ``GPT2LMHeadModel`` objects (default attention implementation),
a torchvision-style ViT with ``nn.MultiheadAttention``, a DeiT-style model with a distillation token
(timm's packed qkv and ``permute(2, 0, 3, 1, 4)``), and backplay's own ViT.

* exact: tiny configurations unrolled to the exact graph; every graph rule's per-layer relevance,
  stopped mass and logit equal the exact law / recursions (float64, 1e-9; the cheap rules in every
  run, the whole rule list with --runslow), also over random tiny configurations (hypothesis);
* AttnLRP and CPLRP equal the independent explicit-recursion reference of tests/_transformers.py
  (written from the papers' formulas; eps -> 0);
* the HF ViT object and backplay's ViT loaded from its state dict (``bp.gpu.vit.load_state_dict_any``)
  give the same relevance for every rule (1e-9), as does the torchvision-style ViT and its conversion;
* language models: relevance per token [B, T] (per embedding dimension in the report), the padding
  mask honoured (padded tokens get nothing), the explained position, a batch equal to single runs;
* ViT-B/16 and a GPT-2-small-sized LM (random init): conservation, batch = singles, model unchanged.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import backplay as bp
from backplay.rules import (
    LRP0, RG, AlphaBeta, Anchor, AttnLRP, AttributionEquilibriumLaw, CPLRP, Gradient, GradientEquilibrium,
    GradientXInput, RGEq, RiskAverse, Rollout, SoftplusGame, TransformerAttribution,
)
from backplay.testing.graph_exact import torch_error

from _transformers import attnlrp_reference, deit, hf_bert, hf_gpt2, hf_vit, token_batch, tv_vit

D = torch.float64
CHEAP_RULES = [Gradient(), GradientXInput(), SoftplusGame(0.5), RG(tau=0.5, route_temp=0.7),
               Anchor(RG(), 0.3, anchor="token")]
SLOW_RULES = [LRP0(), AlphaBeta(2, 1), RGEq(0.3, 0.5), GradientEquilibrium(), RiskAverse(AlphaBeta(2, 1), 0.5),
              Anchor(AlphaBeta(1, 0), 0.2), AttributionEquilibriumLaw(2)]
CONSERVATIVE = [AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7), GradientEquilibrium(), Anchor(RG(), 0.3, anchor="token"),
                RiskAverse(AlphaBeta(2, 1), 0.5)]
VISION = {"hf_vit": hf_vit, "tv_vit": tv_vit, "deit": deit,
          "bp_vit": lambda seed=0, layers=1, dim=8: bp.gpu.vit.vit_tiny_test(3, seed=seed, dim=dim, depth=layers,
                                                                            heads=2).double()}
LANGUAGE = {"hf_gpt2": hf_gpt2, "hf_bert": hf_bert}


def _image(seed=1, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 8, 8) if batch is None else (batch, 3, 8, 8)
    return torch.randn(shape, generator=g, dtype=D)


def _vision(name, seed=0, layers=1, dim=8):
    return VISION[name](seed=seed, layers=layers, dim=dim)


def _language(name, seed=0, layers=1, dim=8):
    return LANGUAGE[name](seed=seed, layers=layers, dim=dim)


def _state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def _same_state(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1] == b[1] and a[2] == b[2])


# ----------------------------------------------------------------------------------------------
# exact: torch = the exact law on the unrolled graph, every reported layer
# ----------------------------------------------------------------------------------------------
def _exact_case(name):
    if name in VISION:
        return _vision(name), _image(), {}
    ids, mask = token_batch(3, batch=2, length=4, vocab=50)
    return _language(name), ids[1], {"attention_mask": mask[1]}


@pytest.mark.parametrize("name", list(VISION) + list(LANGUAGE))
@pytest.mark.parametrize("rule", CHEAP_RULES, ids=lambda r: r.name)
def test_tiny_transformer_torch_equals_the_exact_law(name, rule):
    model, x, kw = _exact_case(name)
    assert torch_error(model, x, 1, rule, field="mpmath", **kw) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VISION) + list(LANGUAGE))
@pytest.mark.parametrize("rule", SLOW_RULES, ids=lambda r: r.name)
def test_tiny_transformer_torch_equals_the_exact_law_every_rule(name, rule):
    model, x, kw = _exact_case(name)
    assert torch_error(model, x, 1, rule, field="mpmath", **kw) <= 1e-9


@settings(max_examples=6)
@given(family=st.sampled_from(sorted(VISION) + sorted(LANGUAGE)), seed=st.integers(0, 2**16),
       layers=st.integers(1, 2), dim=st.sampled_from([8, 12]), rule_i=st.integers(0, 3),
       length=st.integers(2, 5))
def test_random_tiny_transformers_are_exact(family, seed, layers, dim, rule_i, length):
    rule = [Gradient(), GradientXInput(), RG(tau=0.7, route_temp=1.3), Anchor(RG(), 0.5, anchor="token")][rule_i]
    if family in VISION:
        model, x, kw = _vision(family, seed, layers, dim), _image(seed + 1), {}
    else:
        ids, mask = token_batch(seed, batch=2, length=max(length, 3), vocab=50)
        model, x, kw = _language(family, seed, layers, dim), ids[1], {"attention_mask": mask[1]}
    assert torch_error(model, x, seed % 3, rule, field="mpmath", **kw) <= 1e-9


# ----------------------------------------------------------------------------------------------
# AttnLRP and CPLRP against the independent reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hf_vit", "tv_vit", "deit", "hf_gpt2", "hf_bert"])
@pytest.mark.parametrize("rule", [AttnLRP(1e-12), CPLRP(0.0)], ids=lambda r: r.name)
def test_attnlrp_and_cplrp_equal_the_explicit_recursion(name, rule):
    """eps -> 0: the reference also stabilises the residual adds and the matmuls by eps (LXT's explicit
    form), the rule only its dense maps, so the two agree in the limit (the AttnLRP paper's rules)."""
    target = torch.tensor([1, 2])
    if name in VISION:
        model, x, kw = _vision(name, layers=2, dim=16), _image(batch=2), {}
    else:
        x, mask = token_batch(4, batch=2, length=5)
        model, kw = _language(name, layers=2, dim=16), {"attention_mask": mask}
    R, rep = bp.explain(model, x, target, rule, return_report=True, **kw)
    ref, logit = attnlrp_reference(model, x, target, eps=rule.eps, cp=isinstance(rule, CPLRP), **kw)
    if name in LANGUAGE:  # the reference gives it per embedding dimension
        ref = ref.sum(-1)
    scale = ref.abs().max()
    assert (R - ref).abs().max() <= 1e-9 * scale
    assert (rep.logit - logit).abs().max() <= 1e-10 * logit.abs().max()


def test_cplrp_at_eps_zero_is_gradient_x_input_of_the_frozen_graph():
    model, x = _vision("hf_vit", layers=2, dim=16), _image(batch=2)
    a = bp.explain(model, x, 1, CPLRP())
    b = bp.explain(model, x, 1, GradientXInput())
    assert (a - b).abs().max() <= 1e-12 * b.abs().max()


# ----------------------------------------------------------------------------------------------
# the same weights as objects and as conversions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hf_vit", "tv_vit"])
@pytest.mark.parametrize("rule", [Gradient(), GradientXInput(), AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7),
                                  SoftplusGame(0.5), AttnLRP(1e-9), CPLRP(), Rollout(), TransformerAttribution(),
                                  Anchor(RG(), 0.3, anchor="token")], ids=lambda r: r.name)
def test_checkpoint_conversion_gives_the_same_relevance(name, rule):
    """The HF / torchvision object and backplay's ViT loaded from its state dict (one more model for
    the reader): same relevance to 1e-9 for every rule. The graphs differ (packed vs separate qkv,
    sdpa vs explicit softmax) only where the rules agree."""
    model = _vision(name, layers=2, dim=16)
    conv = bp.gpu.vit.load_state_dict_any(model.state_dict(), config={"heads": 2}, dtype=D)
    x = _image(batch=2)
    assert torch.allclose(conv(x), model(x).logits if name == "hf_vit" else model(x), atol=1e-12, rtol=0)
    a = bp.explain(model, x, torch.tensor([0, 2]), rule)
    b = bp.explain(conv, x, torch.tensor([0, 2]), rule)
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()


# ----------------------------------------------------------------------------------------------
# language models
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LANGUAGE))
@pytest.mark.parametrize("rule", [GradientXInput(), AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7), AttnLRP(),
                                  Rollout()], ids=lambda r: r.name)
def test_language_model_relevance_per_token(name, rule):
    model = _language(name, layers=2, dim=16)
    ids, mask = token_batch(5, batch=3, length=6)
    R, rep = bp.explain(model, ids, 7 if name == "hf_gpt2" else 1, rule, return_report=True, attention_mask=mask)
    assert R.shape == ids.shape and R.dtype == D
    emb = rep.layers[0] if rep.layers is not None else None
    if emb is not None:  # per embedding dimension [B, T, D]
        assert emb.shape == ids.shape + (16,)
        assert torch.allclose(emb.sum(-1), R, atol=1e-14, rtol=0)
    assert bool((R[mask == 0] == 0).all())  # padded tokens get nothing
    if name == "hf_gpt2":
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1  # right padding: the last kept position
        assert torch.allclose(rep.logit, out[torch.arange(3), last, 7], atol=1e-12, rtol=0)
        for b in range(3):  # causal: no relevance after the explained position
            assert bool((R[b, last[b] + 1:] == 0).all())
    else:
        with torch.no_grad():
            assert torch.allclose(rep.logit, model(input_ids=ids, attention_mask=mask).logits[:, 1], atol=1e-12,
                                  rtol=0)
    if rule in CONSERVATIVE:
        assert torch.allclose(rep.relevance_sum + rep.stopped, rep.logit, atol=1e-10, rtol=0)
    singles = torch.stack([bp.explain(model, ids[b], 7 if name == "hf_gpt2" else 1, rule,
                                      attention_mask=mask[b]) for b in range(3)])
    assert (singles - R).abs().max() <= 1e-10 * R.abs().max()


def test_language_model_position_and_errors():
    model = _language("hf_gpt2", layers=1, dim=8)
    ids, mask = token_batch(6, batch=2, length=5)
    R = bp.explain(model, ids, 3, GradientXInput(), position=2)
    assert bool((R[:, 3:] == 0).all()) and bool((R[:, :3] != 0).any())
    R_neg = bp.explain(model, ids, 3, GradientXInput(), position=-3)
    assert torch.equal(R, R_neg)
    R_each = bp.explain(model, ids, torch.tensor([3, 4]), GradientXInput(), position=torch.tensor([2, 4]))
    assert torch.equal(R_each[0], R[0])
    with pytest.raises(ValueError, match="position out of range"):
        bp.explain(model, ids, 3, position=5)
    with pytest.raises(ValueError, match="attention_mask must have"):
        bp.explain(model, ids, 3, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        bp.explain(model, ids + 100, 3)
    with pytest.raises(ValueError, match="target 50 out of range"):
        bp.explain(model, ids, 50)
    with pytest.raises(ValueError, match="for language models"):
        bp.explain(_vision("hf_vit"), _image(batch=1), 0, position=1)
    bert = _language("hf_bert", layers=1, dim=8)
    with pytest.raises(ValueError, match="position= picks a position"):
        bp.explain(bert, ids, 1, position=1)


def test_rules_that_need_attention_say_so():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(144, 3)).double()
    x = _image(batch=1)
    with pytest.raises(ValueError, match="has no attention"):
        bp.explain(cnn, x, 0, Rollout())
    with pytest.raises(ValueError, match="this model has none"):
        bp.explain(cnn, x, 0, Anchor(RG(), 0.3, anchor="token"))
    # AttnLRP / CPLRP are defined on any model (LRP-epsilon where there is no attention)
    a = bp.explain(cnn, x, 0, CPLRP())
    assert torch.allclose(a, bp.explain(cnn, x, 0, GradientXInput()), atol=1e-14, rtol=0)


def test_attention_weights_returned_by_multihead_attention_are_refused_with_the_reason():
    class Returns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            y, w = self.attn(x, x, x)  # need_weights=True: torch's own (sequence-first) path
            return self.head((x + y)[:, 0])

    model = Returns().double().eval()
    before = _state(model)
    with pytest.raises(TypeError, match="first dimension is not the batch"):
        bp.explain(model, torch.randn(2, 4, 8, dtype=D), 0)
    assert _same_state(before, _state(model)) and "forward" not in vars(model.attn)


# ----------------------------------------------------------------------------------------------
# batches, conservation, the model unchanged; ViT-B/16 and GPT-2-small sizes
# ----------------------------------------------------------------------------------------------
def _vit_b16(layers):
    import transformers

    cfg = transformers.ViTConfig(num_hidden_layers=layers, num_labels=10)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).double().eval()


def _check_large(model, x, target, rules, kw=None, tol=1e-9):
    kw = kw or {}
    before = _state(model)
    for rule in rules:
        R, rep = bp.explain(model, x, target, rule, return_report=True, **kw)
        assert bool(torch.isfinite(R).all())
        if rule in CONSERVATIVE:
            scale = rep.logit.abs() + rep.relevance_sum.abs() + rep.stopped.abs()
            assert bool(((rep.relevance_sum + rep.stopped - rep.logit).abs() <= tol * scale).all())
        single = [bp.explain(model, x[b], target, rule, **{k: v[b] for k, v in kw.items()})
                  for b in range(x.shape[0])]
        assert (torch.stack(single) - R).abs().max() <= tol * R.abs().max()
    assert _same_state(before, _state(model))


LARGE_RULES = [GradientXInput(), AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7),
               Anchor(RG(), 0.3, anchor="token"), AttnLRP(), CPLRP()]


def test_vit_b16_reduced():
    """ViT-B/16 (the HF object, random init, float64) with 1 of its 12 layers, batch 4 (every layer
    kind of the full model is in it: patch conv, cls token, position embedding, LayerNorm, attention,
    GELU MLP, residual sums, the head; the 12 layers run with --runslow)."""
    model = _vit_b16(1)
    x = torch.randn(4, 3, 224, 224, dtype=D)
    _check_large(model, x, 3, [GradientXInput(), RG(tau=0.5, route_temp=0.7), AttnLRP()])


@pytest.mark.slow
def test_vit_b16_full():
    model = _vit_b16(12)
    x = torch.randn(4, 3, 224, 224, dtype=D)
    _check_large(model, x, 3, LARGE_RULES)


@pytest.mark.slow
def test_gpt2_small_sized_language_model():
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).double().eval()  # 124M parameters, random
    ids = torch.randint(0, 50257, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    _check_large(model, ids, 318, LARGE_RULES, {"attention_mask": mask})
