"""Tests for genbench.nets.transformer: causality, likelihood bookkeeping, KV-cache decoding, sampling."""

import math

import pytest
import torch

from genbench.errors import GenbenchError
from genbench.nets.transformer import TransformerConfig, TransformerPrior, sample_logits


def make_prior(seed: int = 0, **kw) -> TransformerPrior:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return TransformerPrior(TransformerConfig(**cfg)).eval()


def perturb_(model: TransformerPrior, scale: float = 0.5) -> TransformerPrior:
    """Larger weights than GPT init, so that logits depend visibly on the context."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_causality_with_sos_shift():
    model = perturb_(make_prior())
    x = torch.randint(11, (3, 12))
    for j in [0, 5, 11]:
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 11
        lx, ly = model.logits(x), model.logits(y)
        # x_j is read at input position j + 1: logits at positions <= j may not change
        torch.testing.assert_close(lx[:, : j + 1], ly[:, : j + 1])
        if j + 1 < 12:
            assert (lx[:, j + 1] - ly[:, j + 1]).abs().max() > 1e-4


def test_nll_is_sum_of_conditional_log_probs():
    model = perturb_(make_prior(1))
    x = torch.randint(11, (4, 7))
    logp = torch.log_softmax(model.logits(x).double(), -1)
    ref = -torch.stack([sum(logp[b, t, x[b, t]] for t in range(7)) for b in range(4)])
    torch.testing.assert_close(model.nll(x).double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.loss(x).double(), ref.sum() / x.numel(), atol=1e-5, rtol=1e-5)


def test_first_code_is_modelled_by_a_probability_distribution():
    """Summing p(x_1, x_2) over all 11*11 pairs gives 1: nothing is left unmodelled."""
    model = perturb_(make_prior(2))
    grid = torch.cartesian_prod(torch.arange(11), torch.arange(11))
    assert torch.logsumexp(-model.nll(grid).double(), 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_initial_loss_is_near_log_vocab():
    model = make_prior(3, vocab_size=512, block_size=49, n_layer=4, n_head=4, n_embd=128)
    x = torch.randint(512, (16, 49))
    assert model.loss(x).item() == pytest.approx(math.log(512), abs=0.1)


def test_kv_cache_decoding_equals_full_forward():
    model = perturb_(make_prior(4))
    x = torch.randint(11, (3, 12))
    full = model.logits(x)
    # token by token
    cache = model.new_cache(3)
    tokens = torch.cat([torch.full((3, 1), model.sos), x[:, :-1]], 1)
    steps = torch.cat([model.step(tokens[:, t : t + 1], cache) for t in range(12)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # a prefix of 5 then chunks of 4 and 3 (the explicit-mask path)
    cache = model.new_cache(3)
    chunks = [model.step(tokens[:, a:b], cache) for a, b in [(0, 5), (5, 9), (9, 12)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(GenbenchError, match="cache holds 12 of 12 positions"):
        model.step(tokens[:, :1], cache)


def greedy_reference(model: TransformerPrior, n: int, length: int) -> torch.Tensor:
    """Greedy decoding with full forward passes (no cache)."""
    seq = torch.zeros(n, 0, dtype=torch.long)
    for _ in range(length):
        padded = torch.cat([seq, torch.zeros(n, 1, dtype=torch.long)], 1)  # last token is not read
        seq = torch.cat([seq, model.logits(padded)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_tiny_temperature_equals_greedy_argmax():
    model = perturb_(make_prior(5))
    ref = greedy_reference(model, 6, 10)
    assert torch.equal(model.generate(6, 10, temperature=0.0), ref)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(6, 10, temperature=1e-6, generator=g), ref)


def test_generate_is_reproducible_with_generator_and_restores_mode():
    model = perturb_(make_prior(6)).train()
    a = model.generate(4, generator=torch.Generator().manual_seed(1))
    b = model.generate(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 12) and model.training
    assert a.min() >= 0 and a.max() < 11


def test_top_k_restricts_support():
    torch.manual_seed(7)
    logits = torch.randn(5, 50)
    allowed = torch.topk(logits, 3, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, 2.0, top_k=3, generator=g) for _ in range(400)], 1)
    for row in range(5):
        seen = set(draws[row].tolist())
        assert seen == set(allowed[row].tolist())  # inside the top 3, and all 3 reached at temperature 2


def test_sampling_frequencies_match_softmax():
    """Monte Carlo check of the sampled distribution against softmax(logits / T)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_logits(logits.expand(2000, 4), 0.7, generator=g) for _ in range(5)])
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / 0.7, 0)
    assert (freq - expected).abs().max() < 0.015  # ~4 standard errors at n = 10000


def test_tiny_model_overfits_fixed_sequences_to_entropy_bound():
    """8 distinct random sequences: the best possible NLL is log(8) nats per sequence
    (only the first tokens are uncertain), i.e. log(8)/16 nats per token."""
    torch.manual_seed(8)
    model = TransformerPrior(TransformerConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=64)).train()
    data = torch.randint(16, (8, 16))
    data[:, 0] = torch.arange(8)  # distinct first tokens, so the entropy is exactly log 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        model.loss(data).backward()
        opt.step()
    bound = math.log(8) / 16
    assert bound <= model.eval().loss(data).item() < bound + 0.02


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(2, 13, dtype=torch.long), r"sequence length must be in \[1, block_size=12\]"),
        (torch.full((2, 3), 11), r"indices must lie in \[0, vocab_size=11\)"),
        (torch.zeros(2, 3), "indices must be integer"),
        (torch.zeros(6, dtype=torch.long), r"indices must be \(B, L\)"),
    ],
)
def test_bad_indices_raise(x, match):
    with pytest.raises(GenbenchError, match=match):
        make_prior().loss(x)


def test_bad_config_and_generate_arguments_raise():
    with pytest.raises(GenbenchError, match="n_embd .* divisible by n_head"):
        TransformerPrior(TransformerConfig(vocab_size=4, block_size=4, n_head=3, n_embd=32))
    model = make_prior()
    with pytest.raises(GenbenchError, match="top_k must be in"):
        model.generate(2, top_k=0)
    with pytest.raises(GenbenchError, match="temperature must be >= 0"):
        model.generate(2, temperature=-1.0)
    with pytest.raises(GenbenchError, match=r"length must be in \[1, 12\]"):
        model.generate(2, length=13)
