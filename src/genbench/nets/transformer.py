"""Causal transformer prior over sequences of discrete codes (GPT; after karpathy/nanoGPT).

Models a code sequence x_1..x_L (a raster-scanned VQ code grid) autoregressively,

    p(x) = prod_t p(x_t | x_<t),    NLL(x) = -sum_t log p(x_t | x_<t)   (nats)

as in the VQ-VAE prior (van den Oord et al. 2017 sec. 3.2, which used PixelCNN) and the VQ-GAN
transformer (Esser et al. 2021). The input is shifted right by one start-of-sequence token (index
`vocab_size`), so the first code is modelled too: position t reads [SOS, x_1..x_{t-1}] and
predicts x_t. Architecture: token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention (genbench.nets.attention) and a GELU MLP, final LayerNorm, output head tied
to the token embedding (Press & Wolf 2017). Sampling decodes incrementally with a key/value cache:
each new token costs one forward pass of length 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from genbench.errors import GenbenchError
from genbench.nets.attention import attention


@dataclass
class TransformerConfig:
    vocab_size: int  # number of codes K; token K is the start-of-sequence token
    block_size: int  # longest sequence modelled (e.g. 7*7 = 49 codes)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise GenbenchError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise GenbenchError(
                f"TransformerConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GenbenchError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of the tokens seen so far, per layer, preallocated to `max_len` positions."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # tokens stored; advanced by TransformerPrior after all layers ran

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (B, h, T, d) of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        t = q.shape[2]
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = attention(q, k, v, causal=True, dropout_p=dropout)
        else:
            # is_causal aligns the mask top-left, which is wrong once cached keys precede the
            # queries: query i (absolute position past + i) may see keys 0..past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = attention(q, k, v, mask=mask, dropout_p=dropout)
        return self.resid_dropout(self.c_proj(rearrange(y, "b h t d -> b t (h d)")))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class TransformerPrior(nn.Module):
    """GPT over code sequences (B, L) with values in [0, vocab_size).

    logits(indices) -> (B, L, vocab_size), logits[:, t] = log p(x_t | x_<t) + const;
    nll(indices) -> (B,) total nats; loss(indices) -> mean nats per token;
    generate(n, length) -> (n, length) sampled indices, one forward call per token;
    forward(tokens, cache) -> logits of input tokens (SOS first): one evaluation of the network.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.sos = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + start-of-sequence token
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ core

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits for input tokens (B, T) (SOS included) at absolute positions past..past+T-1, past being
        the tokens already in `cache` (which this call advances)."""
        past = cache.length if cache is not None else 0
        pos = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += tokens.shape[1]
        # tied head: the embedding rows of the K codes (SOS is never predicted)
        return F.linear(self.ln_f(x), self.wte.weight[: self.config.vocab_size])

    def _check_indices(self, indices: Tensor) -> None:
        cfg = self.config
        if indices.dim() != 2:
            raise GenbenchError(f"TransformerPrior: indices must be (B, L), got shape {tuple(indices.shape)}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise GenbenchError(f"TransformerPrior: indices must be integer, got dtype {indices.dtype}")
        if not 1 <= indices.shape[1] <= cfg.block_size:
            raise GenbenchError(
                f"TransformerPrior: sequence length must be in [1, block_size={cfg.block_size}], got {indices.shape[1]}"
            )
        if indices.min() < 0 or indices.max() >= cfg.vocab_size:
            raise GenbenchError(
                f"TransformerPrior: indices must lie in [0, vocab_size={cfg.vocab_size}), "
                f"got range [{int(indices.min())}, {int(indices.max())}]"
            )

    def logits(self, indices: Tensor) -> Tensor:
        """Logits (B, L, V) of a code sequence: position t conditions on [SOS, x_1..x_{t-1}] and scores x_t."""
        self._check_indices(indices)
        sos = indices.new_full((indices.shape[0], 1), self.sos)
        tokens = torch.cat([sos, indices[:, :-1]], dim=1).long()
        return self(tokens)

    def nll(self, indices: Tensor) -> Tensor:
        """-log p(x) = -sum_t log p(x_t | x_<t) per sequence, in nats: (B,)."""
        logits = self.logits(indices).float()
        per_token = F.cross_entropy(rearrange(logits, "b t v -> b v t"), indices.long(), reduction="none")
        return per_token.sum(1)

    def loss(self, indices: Tensor) -> Tensor:
        """Mean negative log-likelihood in nats per token (the training loss)."""
        logits = self.logits(indices).float()
        return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(indices.long(), "b t -> (b t)"))

    # ------------------------------------------------------------------ incremental decoding

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for `batch` sequences of up to `max_len` (default block_size) tokens."""
        cfg = self.config
        p = self.wte.weight
        return KVCache(
            cfg.n_layer, batch, cfg.n_head, max_len or cfg.block_size, cfg.n_embd // cfg.n_head, p.device, p.dtype
        )

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed input tokens (B, T) (first call: starting with SOS) after those already in `cache`;
        returns their logits (B, T, V) and advances the cache."""
        if cache.length + tokens.shape[1] > cache.max_len:
            raise GenbenchError(
                f"TransformerPrior.step: cache holds {cache.length} of {cache.max_len} positions, "
                f"cannot add {tokens.shape[1]} more"
            )
        return self(tokens.long(), cache)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        length: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample n sequences (n, length) from p(x), one token at a time with a KV cache.

        Logits are divided by `temperature` (0 means greedy argmax) and, with `top_k`, all but the
        k largest are masked before sampling. Runs in eval mode (no dropout); restores the mode.
        """
        cfg = self.config
        length = cfg.block_size if length is None else length
        if not 1 <= length <= cfg.block_size:
            raise GenbenchError(f"TransformerPrior.generate: length must be in [1, {cfg.block_size}], got {length}")
        if temperature < 0:
            raise GenbenchError(f"TransformerPrior.generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
            raise GenbenchError(f"TransformerPrior.generate: top_k must be in [1, {cfg.vocab_size}], got {top_k}")
        was_training = self.training
        self.eval()
        device = self.wte.weight.device
        cache = self.new_cache(n, length)
        token = torch.full((n, 1), self.sos, dtype=torch.long, device=device)
        out = torch.empty(n, length, dtype=torch.long, device=device)
        for t in range(length):
            logits = self.step(token, cache)[:, -1].float()
            token = sample_logits(logits, temperature, top_k, generator).unsqueeze(1)
            out[:, t] = token[:, 0]
        self.train(was_training)
        return out


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One draw per row from softmax(logits / temperature) restricted to the top_k logits: (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
