"""Scaled dot-product attention: the explicit bf16 CPU form against torch's fused kernel in float64."""

import pytest
import torch
import torch.nn.functional as F

from genbench.nets.attention import attention


def _qkv(t=7, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, n, 16, generator=g, dtype=torch.float64) for n in (t, s, s)]


def _reference(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_bf16_on_cpu_is_the_attention_function_up_to_bf16_rounding(case):
    q, k, v = _qkv(t=5 if case == "mask" else 7, s=9 if case == "mask" else 7)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4) if case == "mask" else None
    kw = {"causal": case == "causal", "mask": mask}
    ref_kw = {"is_causal": case == "causal", "attn_mask": mask}
    ref = _reference(q, k, v, **ref_kw)
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.05)
    # the gradients too: the explicit form is differentiated by autograd, not by a fused backward
    weights = torch.randn_like(ref)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    (_reference(*ref_leaves, **ref_kw) * weights).sum().backward()
    (out.double() * weights).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=0.1)
    if case == "causal":  # query 0 sees key 0 only: its output is v[0]
        torch.testing.assert_close(out[..., 0, :].double(), v[..., 0, :], rtol=0, atol=0.02)


def test_float32_takes_the_fused_kernel_unchanged():
    q, k, v = (x.float() for x in _qkv())
    assert torch.equal(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_dropout_on_the_weights_keeps_the_mean():
    """E[dropout(w) @ v] = w @ v: averaged over many draws the output approaches the no-dropout one."""
    torch.manual_seed(0)
    q, k, v = (x.bfloat16() for x in _qkv())
    clean = attention(q, k, v).double()
    mean = torch.stack([attention(q, k, v, dropout_p=0.3).double() for _ in range(400)]).mean(0)
    assert not torch.equal(attention(q, k, v, dropout_p=0.3), attention(q, k, v, dropout_p=0.3))
    torch.testing.assert_close(mean, clean, rtol=0, atol=0.15)
