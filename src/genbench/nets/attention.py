"""Scaled dot-product attention, softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1), for the
U-Net's and the transformer prior's self-attention.

torch's fused CPU kernel (flash attention) is the faster one in float32 and on CUDA, but in bf16 on
CPU (torch 2.13) it is 6-9x slower, forward + backward, than two matmuls and a softmax at genbench's
sizes: 64 images x 2 heads x 49 tokens x 32 dims took 27 ms against 4.6. That was a quarter of the
standard DDPM's bf16 training step and made the VQ-VAE's transformer prior slower in bf16 than in
float32 (240 against 222 ms a step; 132 with the explicit form). So bf16 on CPU takes the explicit
form; everything else the fused kernel (docs/benchmarks.md, "bf16 and channels-last, and what a
training step costs").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# False: the fused kernel in bf16 on CPU too (benchmarks/bench_step_cost.py times it so)
EXPLICIT_BF16_ON_CPU = True


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              dropout_p: float = 0.0) -> Tensor:
    """Attention of queries q (..., T, d) over keys k and values v (..., S, d). `mask` (T, S), True
    where a query may look; `causal`: query i sees keys 0..i (queries and keys aligned at the start).
    `dropout_p`: dropout on the attention weights (training only: the caller passes 0 otherwise)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not EXPLICIT_BF16_ON_CPU:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v
