"""The transformer rules (declarations in backplay.rules, computed by bp.explain through
backplay.gpu.transformer on the attention nodes of the reader's graph) on backplay's ViT: CPLRP,
AttnLRP, Rollout, TransformerAttribution.

The reference below is independent of the implementation (which is a batched modified gradient of a
replay of the model's graph): it runs the tiny ViT in numpy float64, one sample at a time, and
propagates relevance by the explicit LRP formula of every operation (epsilon / LRP-0 sums over the
weights, the LayerNorm identity rule, the softmax and uniform bilinear rules of AttnLRP, attention
rollout as a product of matrices). Rollout and Transformer Attribution use its attention maps; the
attention gradients of Transformer Attribution come from autograd on the model's own
``forward_explain``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import backplay as bp
from backplay import rules
from backplay.gpu import vit as V
from backplay.gpu.vit import patch_relevance
from backplay.rules import CPLRP, AttnLRP, GradientXInput, Rollout, TransformerAttribution, TransformerRule

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# the independent reference: numpy float64, one sample, explicit per-operation relevance


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(F64).cpu().numpy()


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with x / 0 := 0 (the LRP convention)."""
    b = np.broadcast_to(b, np.broadcast(a, b).shape)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


_erf = np.vectorize(math.erf)


def _stab(z: np.ndarray, eps: float) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _lrp_linear(u, W, z, Rz, eps):
    """Epsilon rule (LRP-0 at eps=0) of z = u W^T + b, token by token:
    R_u[t, j] = sum_i u[t, j] W[i, j] Rz[t, i] / (z[t, i] + eps sign z[t, i])."""
    Ru = np.zeros_like(u)
    den = _stab(z, eps)
    for t in range(u.shape[0]):
        for i in range(W.shape[0]):
            Ru[t] += u[t] * W[i] * _div(Rz[t, i], den[t, i])
    return Ru


def _ln(x, w, b, eps):
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    std = np.sqrt((xc ** 2).mean(axis=1, keepdims=True) + eps)
    return dict(x=x, xc=xc, std=std, w=w, y=xc / std * w + b)


def _lrp_ln(ln, Ry):
    """Identity rule through the frozen std: LRP-0 of the elementwise affine map xc -> y (the
    LayerNorm bias absorbs its share), then LRP-0 of the centring xc = (I - 11^T / n) x."""
    x, xc = ln["x"], ln["xc"]
    n = x.shape[1]
    Rxc = xc * (ln["w"] / ln["std"]) * _div(Ry, ln["y"])
    Rx = np.zeros_like(x)
    for t in range(x.shape[0]):
        for i in range(n):
            for j in range(n):
                Rx[t, j] += x[t, j] * ((i == j) - 1.0 / n) * _div(Rxc[t, i], xc[t, i])
    return Rx


def _lrp_add(a, b, R):
    g = _div(R, a + b)
    return a * g, b * g


class Ref:
    """The tiny ViT in numpy float64 for one image [C, H, W]: ``forward`` records every
    intermediate; ``lrp`` propagates the relevance of the target logit op by op."""

    def __init__(self, model: V.ViT):
        self.cfg = model.config
        self.P = {k: _np(v) for k, v in model.state_dict().items()}

    def _lin(self, u, name):
        return u @ self.P[name + ".weight"].T + self.P[name + ".bias"]

    def forward(self, img: np.ndarray) -> dict:
        c, P = self.cfg, self.P
        p, g, D, H, hd = c.patch_size, c.grid, c.dim, c.heads, c.head_dim
        U = np.array([img[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(-1)
                      for gy in range(g) for gx in range(g)])
        Wpe = P["patch_embed.weight"].reshape(D, -1)
        Z = U @ Wpe.T + P["patch_embed.bias"]
        E = np.vstack([P["cls_token"][0], Z])
        h = E + P["pos_embed"][0]
        fw = dict(U=U, Wpe=Wpe, Z=Z, E=E, h0=h, blocks=[])
        for i in range(c.depth):
            pre = f"blocks.{i}."
            b = dict(x=h)
            b["ln1"] = _ln(h, P[pre + "norm1.weight"], P[pre + "norm1.bias"], c.ln_eps)
            u = b["ln1"]["y"]
            b["q"], b["k"], b["v"] = (self._lin(u, pre + "attn." + n) for n in "qkv")
            T = u.shape[0]
            b["S"], b["A"] = np.zeros((H, T, T)), np.zeros((H, T, T))
            ctx = np.zeros((T, D))
            for hh in range(H):
                sl = slice(hh * hd, (hh + 1) * hd)
                for t in range(T):
                    for s in range(T):
                        b["S"][hh, t, s] = np.dot(b["q"][t, sl], b["k"][s, sl]) * hd ** -0.5
                    e = np.exp(b["S"][hh, t] - b["S"][hh, t].max())
                    b["A"][hh, t] = e / e.sum()
                ctx[:, sl] = b["A"][hh] @ b["v"][:, sl]
            b["ctx"] = ctx
            b["attn_out"] = self._lin(ctx, pre + "attn.proj")
            b["resid1"] = h + b["attn_out"]
            b["ln2"] = _ln(b["resid1"], P[pre + "norm2.weight"], P[pre + "norm2.bias"], c.ln_eps)
            b["z"] = self._lin(b["ln2"]["y"], pre + "mlp.fc1")
            b["gelu"] = b["z"] * 0.5 * (1.0 + _erf(b["z"] / math.sqrt(2.0)))
            b["mlp_out"] = self._lin(b["gelu"], pre + "mlp.fc2")
            h = b["resid1"] + b["mlp_out"]
            fw["blocks"].append(b)
        fw["ln"] = _ln(h, P["norm.weight"], P["norm.bias"], c.ln_eps)
        fw["logits"] = self._lin(fw["ln"]["y"][:1], "head")[0]
        return fw

    def lrp(self, fw: dict, target: int, eps: float, attnlrp: bool) -> dict:
        """Returns the pixel relevance [C, H, W], the relevance of every attention matrix (AttnLRP:
        A's half at A V) and the total softmax term sum R_A - sum R_S."""
        c, P = self.cfg, self.P
        H, hd, scale = c.heads, c.head_dim, c.head_dim ** -0.5
        Rlog = np.zeros((1, c.num_classes))
        Rlog[0, target] = fw["logits"][target]
        Ry = np.zeros_like(fw["ln"]["y"])
        Ry[:1] = _lrp_linear(fw["ln"]["y"][:1], P["head.weight"], fw["logits"][None], Rlog, eps)
        R = _lrp_ln(fw["ln"], Ry)
        R_attn, leak = [], 0.0
        for i in reversed(range(c.depth)):
            b, pre = fw["blocks"][i], f"blocks.{i}."
            R_res, R_mlp = _lrp_add(b["resid1"], b["mlp_out"], R)
            R_gelu = _lrp_linear(b["gelu"], P[pre + "mlp.fc2.weight"], b["mlp_out"], R_mlp, eps)
            R_fc1 = _lrp_linear(b["ln2"]["y"], P[pre + "mlp.fc1.weight"], b["z"], R_gelu, eps)
            R_res = R_res + _lrp_ln(b["ln2"], R_fc1)  # GELU: identity rule (R_z = R_gelu)
            R_x, R_ao = _lrp_add(b["x"], b["attn_out"], R_res)
            R_ctx = _lrp_linear(b["ctx"], P[pre + "attn.proj.weight"], b["attn_out"], R_ao, eps)
            T = R_ctx.shape[0]
            Rq, Rk, Rv = (np.zeros_like(b["q"]) for _ in range(3))
            RA, f = np.zeros((H, T, T)), 0.5 if attnlrp else 1.0
            for hh in range(H):
                sl = slice(hh * hd, (hh + 1) * hd)
                A, S, q, k, v = b["A"][hh], b["S"][hh], b["q"][:, sl], b["k"][:, sl], b["v"][:, sl]
                ctx, Rc = b["ctx"][:, sl], R_ctx[:, sl]
                RS = np.zeros((T, T))
                for t in range(T):          # query
                    for s in range(T):      # key
                        for d in range(hd):
                            share = A[t, s] * v[s, d] * _div(Rc[t, d], ctx[t, d])
                            Rv[s, hh * hd + d] += f * share
                            RA[hh, t, s] += 0.5 * share
                if attnlrp:
                    for t in range(T):
                        for s in range(T):
                            RS[t, s] = S[t, s] * (RA[hh, t, s] - A[t, s] * RA[hh, t].sum())
                    leak += RA[hh].sum() - RS.sum()
                    for t in range(T):
                        for s in range(T):
                            for d in range(hd):
                                share = scale * q[t, d] * k[s, d] * _div(RS[t, s], S[t, s])
                                Rq[t, hh * hd + d] += 0.5 * share
                                Rk[s, hh * hd + d] += 0.5 * share
            u = b["ln1"]["y"]
            R_u = sum(_lrp_linear(u, P[pre + f"attn.{n}.weight"], b[n], Rn, eps)
                      for n, Rn in (("q", Rq), ("k", Rk), ("v", Rv)))
            R = R_x + _lrp_ln(b["ln1"], R_u)
            R_attn.insert(0, RA)
        R_E, _ = _lrp_add(fw["E"], P["pos_embed"][0], R)  # the position embedding absorbs its part
        R_U = _lrp_linear(fw["U"], fw["Wpe"], fw["Z"], R_E[1:], eps)  # cls token: absorbed
        p, g = c.patch_size, c.grid
        img = np.zeros((c.in_channels, c.image_size, c.image_size))
        for n in range(g * g):
            gy, gx = divmod(n, g)
            img[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = R_U[n].reshape(-1, p, p)
        return dict(pixels=img, R_attn=R_attn, softmax_leak=leak)


def _spread_ref(cfg, patch_values: np.ndarray) -> np.ndarray:
    p, g = cfg.patch_size, cfg.grid
    img = np.zeros((cfg.in_channels, cfg.image_size, cfg.image_size))
    for n in range(g * g):
        gy, gx = divmod(n, g)
        img[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = patch_values[n] / (cfg.in_channels * p * p)
    return img


def ref_rollout(fw: dict, cfg) -> np.ndarray:
    T = cfg.n_tokens
    roll = np.eye(T)
    for b in fw["blocks"]:
        a = 0.5 * b["A"].mean(axis=0) + 0.5 * np.eye(T)
        a = a / a.sum(axis=1, keepdims=True)
        roll = a @ roll
    return _spread_ref(cfg, roll[0, 1:])


def ref_transformer_attribution(model, x1: torch.Tensor, t: int, R_A: list) -> np.ndarray:
    """Chefer's rollout from the attention gradients of the model's own (unfrozen)
    ``forward_explain`` and the given per-block relevances of A [H, T, T]."""
    tr = model.forward_explain(x1)
    grads = torch.autograd.grad(tr.logits[0, t], tr.attentions)
    cfg = model.config
    R = np.eye(cfg.n_tokens)
    for g, ra in zip(grads, R_A):
        cam = np.maximum(_np(g[0]) * ra, 0.0).mean(axis=0)
        R = R + cam @ R
    return _spread_ref(cfg, R[0, 1:])


# ----------------------------------------------------------------------------------------------
# helpers


def _close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-9) -> None:
    """|actual - expected| <= tol * (|expected| + max(1, max |expected|)) elementwise."""
    exp = torch.from_numpy(np.asarray(expected))
    scale = max(1.0, float(exp.abs().max()))
    torch.testing.assert_close(actual, exp, rtol=tol, atol=tol * scale)


def _data(seed: int, n: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=F64, generator=g)
    t = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t


tiny_configs = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "depth": st.integers(1, 2),
    "heads": st.sampled_from([1, 2]),
    "geometry": st.sampled_from([(8, 4, 3), (6, 3, 1), (4, 2, 2)]),
})


def _tiny(spec: dict) -> V.ViT:
    image, patch, ch = spec["geometry"]
    return V.vit_tiny_test(image_size=image, patch_size=patch, in_channels=ch,
                           depth=spec["depth"], heads=spec["heads"], seed=spec["seed"], dtype=F64)


def _zero_biases(model: V.ViT) -> V.ViT:
    """A copy with every bias-like parameter (Linear / Conv / LayerNorm biases, cls token,
    position embedding) set to zero."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    return m


ALL_RULES = [CPLRP(), CPLRP(eps=0.01), AttnLRP(), AttnLRP(eps=0.1), Rollout(),
             TransformerAttribution(), TransformerAttribution(relevance="attention")]


# ----------------------------------------------------------------------------------------------
# every rule against the reference


@given(spec=tiny_configs, eps=st.sampled_from([0.0, 1e-3, 0.1]))
def test_cplrp_matches_reference(spec, eps):
    m = _tiny(spec)
    x, t = _data(spec["seed"], 2, m.config)
    R = bp.explain(m, x, t, CPLRP(eps=eps))
    ref = Ref(m)
    for i in range(2):
        fw = ref.forward(_np(x[i]))
        np.testing.assert_allclose(fw["logits"], _np(m(x[i:i + 1])[0]), rtol=0, atol=1e-12)
        _close(R[i], ref.lrp(fw, int(t[i]), eps, attnlrp=False)["pixels"])


@given(spec=tiny_configs, eps=st.sampled_from([1e-6, 1e-2, 0.5]))
def test_attnlrp_matches_reference(spec, eps):
    m = _tiny(spec)
    x, t = _data(spec["seed"], 2, m.config)
    R = bp.explain(m, x, t, AttnLRP(eps=eps))
    ref = Ref(m)
    for i in range(2):
        _close(R[i], ref.lrp(ref.forward(_np(x[i])), int(t[i]), eps, attnlrp=True)["pixels"])


@given(spec=tiny_configs)
def test_rollout_matches_reference(spec):
    m = _tiny(spec)
    x, t = _data(spec["seed"], 2, m.config)
    R = bp.explain(m, x, t, Rollout())
    ref = Ref(m)
    for i in range(2):
        _close(R[i], ref_rollout(ref.forward(_np(x[i])), m.config), 1e-12)


@given(spec=tiny_configs, relevance=st.sampled_from(["attnlrp", "attention"]))
def test_transformer_attribution_matches_reference(spec, relevance):
    m = _tiny(spec)
    x, t = _data(spec["seed"], 2, m.config)
    eps = 1e-3
    R = bp.explain(m, x, t, TransformerAttribution(relevance=relevance, eps=eps))
    ref = Ref(m)
    for i in range(2):
        fw = ref.forward(_np(x[i]))
        if relevance == "attnlrp":
            R_A = ref.lrp(fw, int(t[i]), eps, attnlrp=True)["R_attn"]
        else:
            R_A = [b["A"] for b in fw["blocks"]]
        _close(R[i], ref_transformer_attribution(m, x[i:i + 1], int(t[i]), R_A))


def test_reference_attention_relevance_is_used_by_transformer_attribution():
    """The two R_A choices give different maps (so the test above distinguishes them)."""
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(3, 2, m.config)
    a = bp.explain(m, x, t, TransformerAttribution())
    b = bp.explain(m, x, t, TransformerAttribution(relevance="attention"))
    assert (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# identities and conservation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cplrp_is_gradient_x_input_of_the_frozen_pass(seed):
    m = V.vit_tiny_test(seed=seed, dtype=F64)
    x, t = _data(seed, 3, m.config)
    xg = x.clone().requires_grad_(True)
    tr = m.forward_explain(xg, freeze=True)
    (g,) = torch.autograd.grad(tr.logits.gather(1, t[:, None]).sum(), xg)
    torch.testing.assert_close(bp.explain(m, x, t, CPLRP()), x * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cplrp_conservation_identity(seed):
    """eps = 0: logit = sum R_pixels + sum_p <p, dlogit/dp> over the bias-like parameters p of the
    frozen pass (Euler: the frozen pass is 1-homogeneous in image and bias-like parameters)."""
    m = V.vit_tiny_test(seed=seed, dtype=F64)
    x, t = _data(seed, 3, m.config)
    R = bp.explain(m, x, t, CPLRP())
    named = [(n, p) for n, p in m.named_parameters()
             if n.endswith("bias") or n in ("cls_token", "pos_embed")]
    # patch-embed bias, cls, pos; per block 2 LayerNorm + 6 Linear biases; final norm and head
    assert len(named) == 1 + 2 + m.config.depth * 8 + 2
    for i in range(3):
        tr = m.forward_explain(x[i:i + 1], freeze=True)
        logit = tr.logits[0, t[i]]
        # q and k biases are not used by the frozen pass (attention detached): None, absorb 0
        grads = torch.autograd.grad(logit, [p for _, p in named], allow_unused=True)
        assert {n for (n, _), g in zip(named, grads) if g is None} == {
            f"blocks.{i}.attn.{w}.bias" for i in range(m.config.depth) for w in "qk"}
        absorbed = sum((p.detach() * g).sum() for (_, p), g in zip(named, grads) if g is not None)
        assert abs(float(absorbed)) > 1e-3  # the biases do absorb something here
        torch.testing.assert_close(R[i].sum() + absorbed, logit.detach(), rtol=0, atol=1e-12)
    # no bias-like parameter: exactly conservative
    z = _zero_biases(m)
    Rz = bp.explain(z, x, t, CPLRP())
    torch.testing.assert_close(Rz.sum((1, 2, 3)), z(x).gather(1, t[:, None])[:, 0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attnlrp_conservation(seed):
    """Zero biases, eps -> 0: every AttnLRP step except the softmax is conservative, so
    logit - sum R_pixels is exactly the softmax term sum(R_A) - sum(R_S) of the reference, which
    is not zero (AttnLRP is not conservative through the softmax: the softmax is shift-invariant,
    so the part of R_A along the row mean of S is absorbed)."""
    m = _zero_biases(V.vit_tiny_test(seed=seed, dtype=F64))
    x, t = _data(seed, 3, m.config)
    eps = 1e-13
    R = bp.explain(m, x, t, AttnLRP(eps=eps))
    logits = m(x).detach()
    ref = Ref(m)
    for i in range(3):
        leak = ref.lrp(ref.forward(_np(x[i])), int(t[i]), eps, attnlrp=True)["softmax_leak"]
        assert abs(leak) > 1e-3
        torch.testing.assert_close(R[i].sum() + leak, logits[i, t[i]], rtol=0, atol=1e-9)


def test_attnlrp_eps_limit():
    """The epsilon rule changes the relevance by O(eps)."""
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(5, 2, m.config)
    base = bp.explain(m, x, t, AttnLRP(eps=1e-12))
    d6 = (bp.explain(m, x, t, AttnLRP(eps=1e-6)) - base).abs().max()
    d3 = (bp.explain(m, x, t, AttnLRP(eps=1e-3)) - base).abs().max()
    assert d3 > 0 and 0 < d6 < 1e-2 * d3  # ratio about 1e-3, as eps


def test_rollout_is_target_independent_and_a_distribution():
    m = V.vit_tiny_test(dtype=F64)
    x, _ = _data(1, 3, m.config)
    r0 = bp.explain(m, x, torch.zeros(3, dtype=torch.long), Rollout())
    r2 = bp.explain(m, x, torch.full((3,), 2, dtype=torch.long), Rollout())
    assert torch.equal(r0, r2)
    pr = patch_relevance(r0, m.config.patch_size)
    assert (pr > 0).all() and (pr.sum((1, 2)) < 1).all()


# ----------------------------------------------------------------------------------------------
# patch <-> pixel


def test_patch_relevance_sum_pools():
    R = torch.arange(2 * 3 * 4 * 6, dtype=F64).reshape(2, 3, 4, 6)
    P = patch_relevance(R, 2)
    assert P.shape == (2, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert P[b, i, j] == R[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum()
    with pytest.raises(ValueError, match="patch_size"):
        patch_relevance(R, 0)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_relevance(R, 4)
    assert torch.equal(patch_relevance(R[0], 2), P[0])   # one image [C, H, W]
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        patch_relevance(R[0, 0], 2)


def _explicit_patch_scores(m: V.ViT, x: torch.Tensor, t: torch.Tensor, rule) -> torch.Tensor:
    """The cls row of the rollout over the patch tokens [B, grid, grid], batched in torch from the
    model's own unfused pass: Rollout from ``attention_maps`` (row-normalised 0.5 A + 0.5 I, product
    over the blocks); TransformerAttribution(relevance="attention") from the gradients of the target
    logit w.r.t. the attention matrices of ``forward_explain`` (R = I, R += mean_heads[(dA * A)^+] R)."""
    c = m.config
    eye = torch.eye(c.n_tokens, dtype=F64)
    roll = eye.expand(x.shape[0], c.n_tokens, c.n_tokens)
    if isinstance(rule, Rollout):
        for a in m.attention_maps(x):
            a_hat = 0.5 * a.mean(1) + 0.5 * eye
            roll = (a_hat / a_hat.sum(-1, keepdim=True)) @ roll
    else:
        assert rule.relevance == "attention"
        tr = m.forward_explain(x)
        grads = torch.autograd.grad(tr.logits.gather(1, t[:, None]).sum(), tr.attentions)
        for g, a in zip(grads, tr.attentions):
            roll = roll + (g * a.detach()).clamp(min=0).mean(1) @ roll
    return roll[:, 0, 1:].reshape(x.shape[0], c.grid, c.grid).detach()


@pytest.mark.parametrize("rule", [Rollout(), TransformerAttribution(relevance="attention")],
                         ids=lambda r: r.name)
def test_patch_rules_spread_evenly(rule):
    """The patch sums of the pixel relevance are the cls row of the rollout (the cls token is the token
    the logit reads), computed here from the model's attention maps; each patch value is spread evenly
    over its C * p * p pixels."""
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(2, 2, m.config)
    R = bp.explain(m, x, t, rule)
    p = m.config.patch_size
    P = patch_relevance(R, p)
    scores = _explicit_patch_scores(m, x, t, rule)
    assert scores.shape == P.shape == (2, 2, 2)
    torch.testing.assert_close(P, scores, rtol=1e-14, atol=0)
    back = P.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None] / (3 * p * p)
    torch.testing.assert_close(R, back.expand_as(R), rtol=1e-15, atol=0)


class _Padded(torch.nn.Module):
    """A ViT behind an ``F.pad`` of its image (as timm's dynamic padding writes it)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(torch.nn.functional.pad(x, (0, 1, 0, 1)))


@pytest.mark.parametrize("rule", [Rollout(), TransformerAttribution(relevance="attention")],
                         ids=lambda r: r.name)
def test_patch_rules_skip_the_zeros_a_pad_writes(rule):
    """The zeros an F.pad writes are constants, not pixels (docs/theory.md section 11): each patch value
    is spread evenly over its real pixels, so the patch sums are those of the model without the pad
    on the padded image."""
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(2, 2, m.config)
    crop = x[..., :-1, :-1]
    R = bp.explain(_Padded(m), crop, t, rule)
    ref = bp.explain(m, torch.nn.functional.pad(crop, (0, 1, 0, 1)), t, rule)
    p = m.config.patch_size
    P = patch_relevance(torch.nn.functional.pad(R, (0, 1, 0, 1)), p)
    torch.testing.assert_close(P, patch_relevance(ref, p), rtol=1e-12, atol=1e-15)


def test_transformer_attribution_spreads_evenly():
    """TransformerAttribution with the AttnLRP relevance of A (its scores are checked against the
    reference above): each patch value is spread evenly over its C * p * p pixels."""
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(2, 2, m.config)
    R = bp.explain(m, x, t, TransformerAttribution())
    p = m.config.patch_size
    P = patch_relevance(R, p)
    assert (P.abs() > 0).all()
    back = P.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None] / (3 * p * p)
    torch.testing.assert_close(R, back.expand_as(R), rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# batch, model untouched, errors


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_batch_equals_single_runs(rule):
    m = V.vit_tiny_test(seed=4, dtype=F64)
    x, _ = _data(4, 3, m.config)
    t = torch.tensor([0, 2, 1])
    batch = bp.explain(m, x, t, rule)
    assert batch.shape == x.shape and batch.dtype == F64
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], bp.explain(m, x[i:i + 1], t[i:i + 1], rule),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_model_is_left_unchanged(rule):
    m = V.vit_tiny_test(seed=5, dtype=F64)
    m.blocks[0].attn.q.weight.requires_grad_(False)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    x, t = _data(5, 2, m.config)
    with torch.no_grad():  # the rules enable grad themselves where they need it
        R = bp.explain(m, x, t, rule)
    assert torch.isfinite(R).all() and not R.requires_grad
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters())
    assert m.training
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks


def test_bad_input():
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            AttnLRP(eps=bad)
        with pytest.raises(ValueError, match="eps"):
            TransformerAttribution(eps=bad)
    for bad in (-1e-3, float("nan"), True):
        with pytest.raises(ValueError, match="eps"):
            CPLRP(eps=bad)
    with pytest.raises(ValueError, match="relevance"):
        TransformerAttribution(relevance="lrp")
    m = V.vit_tiny_test(dtype=F64)
    x, t = _data(0, 2, m.config)
    for rule in (CPLRP(), AttnLRP(), Rollout(), TransformerAttribution()):
        with pytest.raises(ValueError, match="expected images"):
            bp.explain(m, x[:, :, :4], t, rule)
        with pytest.raises(ValueError, match="target"):
            bp.explain(m, x, t[:1], rule)
        with pytest.raises(ValueError, match="out of range"):
            bp.explain(m, x, torch.tensor([0, 3]), rule)
        with pytest.raises(TypeError, match="target"):
            bp.explain(m, x, t.double(), rule)
        # any integer dtype is one class per sample
        torch.testing.assert_close(bp.explain(m, x, t.to(torch.int32), rule), bp.explain(m, x, t, rule),
                                   rtol=0, atol=0)
    # Rollout and TransformerAttribution combine attention weights: a model without attention is refused
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    xm = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for rule in (Rollout(), TransformerAttribution()):
        with pytest.raises(ValueError, match="has no attention"):
            bp.explain(mlp, xm, t, rule)
    # CPLRP and AttnLRP run on any model: without attention, norms or gates other than ReLU, CPLRP at
    # eps = 0 is Gradient x Input of the frozen graph
    torch.testing.assert_close(bp.explain(mlp, xm, t, CPLRP()), bp.explain(mlp, xm, t, GradientXInput()),
                               rtol=1e-12, atol=1e-14)
    assert torch.isfinite(bp.explain(mlp, xm, t, AttnLRP())).all()


def test_exported_from_rules():
    for cls in (CPLRP, AttnLRP, Rollout, TransformerAttribution, TransformerRule):
        assert getattr(rules, cls.__name__) is cls and cls.__name__ in rules.__all__
        assert issubclass(cls, rules.Rule)
    for cls in (CPLRP, AttnLRP, Rollout, TransformerAttribution):
        assert issubclass(cls, TransformerRule)
    assert AttnLRP().name == "AttnLRP(eps=1e-06)"


# ----------------------------------------------------------------------------------------------
# ViT-B/16


def _vit_b_smoke_checks(m: V.ViT, rules_: list, x: torch.Tensor, t: torch.Tensor) -> None:
    for rule in rules_:
        R = bp.explain(m, x, t, rule)
        assert R.shape == x.shape and torch.isfinite(R).all(), rule.name
        assert R.abs().sum() > 0, rule.name


def test_vit_b_16_smoke():
    """ViT-B/16 dimensions at 224 px (4 of 12 blocks to keep it short), one sample, float32:
    CPLRP equals Gradient x Input of the frozen pass, Rollout's cls row is a sub-distribution."""
    torch.manual_seed(0)
    cfg = V.ViTConfig(depth=4, num_classes=10)
    m = V.ViT(cfg).reset_parameters(torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 224, 224)
    t = torch.tensor([3])
    R = bp.explain(m, x, t, CPLRP())
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.forward_explain(xg, freeze=True).logits[0, 3], xg)
    torch.testing.assert_close(R, x * g, rtol=1e-4, atol=1e-6 * float((x * g).abs().max()))
    P = patch_relevance(bp.explain(m, x, t, Rollout()), 16)
    assert P.shape == (1, 14, 14) and (P > 0).all() and P.sum() < 1
    _vit_b_smoke_checks(m, [AttnLRP()], x, t)


@pytest.mark.slow
def test_vit_b_16_all_rules_float64():
    m = V.vit_b_16(num_classes=10, seed=0, dtype=F64)
    x, t = _data(0, 2, m.config)
    _vit_b_smoke_checks(m, ALL_RULES, x, t)
    xg = x.clone().requires_grad_(True)
    tr = m.forward_explain(xg, freeze=True)
    (g,) = torch.autograd.grad(tr.logits.gather(1, t[:, None]).sum(), xg)
    torch.testing.assert_close(bp.explain(m, x, t, CPLRP()), x * g, rtol=1e-10, atol=1e-12)
    for rule in (AttnLRP(), TransformerAttribution()):
        single = bp.explain(m, x[1:], t[1:], rule)
        torch.testing.assert_close(bp.explain(m, x, t, rule)[1:], single, rtol=1e-9, atol=1e-12)
