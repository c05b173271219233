"""Tests for genbench.core.quantizer against brute force, autograd and hand-computed EMA numbers."""

import numpy as np
import pytest
import torch
from torch import nn

from genbench.errors import GenbenchError
from genbench.core.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    codebook_stats,
    kmeans_plus_plus,
    lloyd,
    nearest_code,
    squared_distances,
)


def make_vq(**kw) -> VectorQuantizer:
    return VectorQuantizer(QuantizerConfig(**kw))


def gaussian_mixture(n_clusters: int, dim: int, n: int, spread: float, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * spread
    labels = torch.randint(n_clusters, (n,), generator=g)
    return centres[labels] + std * torch.randn(n, dim, generator=g), centres


# ----------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("chunk", [1 << 24, 100, 1])  # one block; 1 row per block (100 // K); 1 row
def test_lookup_equals_cdist_argmin(chunk):
    torch.manual_seed(0)
    z, e = torch.randn(1000, 16), torch.randn(64, 16)
    ref = torch.cdist(z.double(), e.double()).argmin(1)
    assert torch.equal(nearest_code(z, e, chunk_elements=chunk), ref)


def test_squared_distances_equal_cdist_squared():
    torch.manual_seed(1)
    z, e = torch.randn(300, 8), torch.randn(40, 8)
    ref = torch.cdist(z.double(), e.double()).pow(2)
    torch.testing.assert_close(squared_distances(z, e).double(), ref, atol=1e-4, rtol=1e-5)


def test_forward_shapes_and_values_channel_first():
    torch.manual_seed(2)
    vq = make_vq(codebook_size=32, code_dim=4, init="uniform", lookup_chunk_elements=64).eval()
    vq.codebook.normal_()
    z = torch.randn(3, 4, 5, 6)
    out = vq(z)
    assert out.indices.shape == (3, 5, 6) and out.quantized.shape == z.shape
    # reference: move channels last by hand, brute-force argmin over cdist
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    ref = torch.cdist(rows.double(), vq.codebook.double()).argmin(1).view(3, 5, 6)
    assert torch.equal(out.indices, ref)
    torch.testing.assert_close(out.quantized, vq.codebook[ref].permute(0, 3, 1, 2))
    torch.testing.assert_close(vq.indices_to_codes(out.indices), out.quantized)
    torch.testing.assert_close(out.commitment_loss, (z - out.quantized).pow(2).mean())


def test_lookup_under_bf16_autocast_uses_float32():
    torch.manual_seed(3)
    vq = make_vq(codebook_size=256, code_dim=32, init="uniform").eval()
    vq.codebook.normal_()
    z = torch.randn(8, 32, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = vq(z).indices
    assert torch.equal(idx, vq.lookup(z))


# ----------------------------------------------------------------------------- gradients


def test_straight_through_passes_decoder_gradient_to_encoder():
    torch.manual_seed(4)
    enc, dec = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
    vq = make_vq(codebook_size=16, code_dim=8, init="uniform")
    vq.codebook.normal_()
    x = torch.randn(2, 3, 4, 4)
    z = enc(x)
    z.retain_grad()
    q = vq(z).quantized
    q.retain_grad()
    recon = (dec(q) - x).pow(2).sum()
    recon.backward()
    assert q.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, q.grad)  # identity Jacobian of the straight-through estimator
    # and the encoder's weights get exactly the vector-Jacobian product of that gradient
    w_ref = torch.autograd.grad(enc(x), enc.weight, grad_outputs=q.grad)[0]
    torch.testing.assert_close(enc.weight.grad, w_ref)


def test_gradient_mode_codebook_gets_codebook_loss_only():
    """Closed forms, with M = N*D elements in the mean:
    d/de_k [mean (sg z - e)^2] = sum_{i->k} 2 (e_k - z_i) / M;
    d/dz_i [beta mean (z - sg e)^2] = 2 beta (z_i - e_i) / M.
    """
    torch.manual_seed(5)
    beta = 0.3
    vq = make_vq(codebook_size=8, code_dim=3, beta=beta, update="gradient", init="uniform", dead_code_steps=0)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(20, 3, requires_grad=True)
    out = vq(z)
    g_codebook, g_z = torch.autograd.grad(out.loss, [vq.codebook, z])
    idx, m = out.indices, z.numel()
    e = vq.codebook.detach()
    expected = torch.zeros_like(e).index_add_(0, idx, 2 * (e[idx] - z.detach()) / m)
    torch.testing.assert_close(g_codebook, expected)
    torch.testing.assert_close(g_z, 2 * beta * (z.detach() - e[idx]) / m)
    torch.testing.assert_close(out.loss, out.codebook_loss + beta * out.commitment_loss)


def test_ema_mode_codebook_is_buffer_and_loss_is_commitment_only():
    vq = make_vq(codebook_size=8, code_dim=3, beta=0.5, init="uniform")
    assert "codebook" not in dict(vq.named_parameters()) and "codebook" in dict(vq.named_buffers())
    z = torch.randn(10, 3)
    out = vq.eval()(z)
    torch.testing.assert_close(out.loss, 0.5 * out.commitment_loss)


# ----------------------------------------------------------------------------- EMA update


def test_ema_update_matches_hand_computed_case():
    vq = make_vq(codebook_size=2, code_dim=2, ema_decay=0.5, ema_eps=0.1, init="uniform", dead_code_steps=0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.embed_sum.copy_(vq.codebook)
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]])  # -> codes 0, 0, 1
    out = vq.train()(z)
    # the output uses the codebook before the update
    torch.testing.assert_close(out.quantized, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))
    # N = 0.5*[1,1] + 0.5*[2,1] = [1.5, 1.0];  m = 0.5*[[0,0],[10,10]] + 0.5*[[1,1],[9,10]]
    torch.testing.assert_close(vq.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(vq.embed_sum, torch.tensor([[0.5, 0.5], [9.5, 10.0]]))
    # smoothed N~ = (N + 0.1) / (2.5 + 0.2) * 2.5 = [1.6, 1.1] * 2.5 / 2.7;  e = m / N~
    expected = torch.tensor([[0.3375, 0.3375], [9.5 * 2.7 / 2.75, 10.0 * 2.7 / 2.75]])
    torch.testing.assert_close(vq.codebook, expected)
    assert int(vq.step) == 1 and vq.last_used.tolist() == [1, 1]


def test_eval_mode_changes_no_state():
    torch.manual_seed(6)
    vq = make_vq(codebook_size=8, code_dim=3, dead_code_steps=1)
    vq.init_from_data(torch.randn(100, 3))
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()(torch.randn(50, 3))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- initialisation


def test_kmeans_plus_plus_seeds_one_code_per_separated_cluster():
    x, centres = gaussian_mixture(8, 4, 2000, spread=20.0, std=0.1, seed=7)
    seeds = kmeans_plus_plus(x, 8, torch.Generator().manual_seed(0))
    nearest_centre = torch.cdist(seeds, centres).argmin(1)
    assert sorted(nearest_centre.tolist()) == list(range(8))
    again = kmeans_plus_plus(x, 8, torch.Generator().manual_seed(0))
    assert torch.equal(seeds, again)  # the generator makes it reproducible


def test_kmeans_plus_plus_draws_follow_the_d_squared_distribution():
    """Seeding 3 centres from 5 points, 3000 times: the frequencies of the ordered triples (60 cells)
    against the k-means++ probabilities computed in numpy, P(i, j, l) = 1/5 * D_i(j)^2 / sum D_i^2 *
    min(D_i(l), D_j(l))^2 / sum min(D_i, D_j)^2 (first centre uniform, each next one proportional to the
    squared distance to the nearest centre so far). Chi-square test, 59 degrees of freedom: sampling
    proportional to D instead of D^2 gives a statistic of ~460 (p ~ 1e-64), uniform sampling ~2400; the
    distance to the last centre only (no minimum) draws chosen points again."""
    import itertools
    from collections import Counter

    from scipy.stats import chisquare

    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.5, 1.5]])
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    expected = {}
    for i, j, l in itertools.permutations(range(5), 3):
        nearest = np.minimum(d2[i], d2[j])
        expected[(i, j, l)] = d2[i, j] / d2[i].sum() * nearest[l] / nearest.sum() / 5
    x = torch.tensor(pts)
    g = torch.Generator().manual_seed(0)
    n = 3000
    counts = Counter(tuple(int((x == c).all(1).nonzero()) for c in kmeans_plus_plus(x, 3, g)) for _ in range(n))
    cells = sorted(expected)
    assert sum(expected.values()) == pytest.approx(1.0) and min(expected.values()) * n > 5
    assert set(counts) <= set(cells)  # a point already chosen is never drawn again (D = 0)
    result = chisquare([counts[c] for c in cells], [expected[c] * n for c in cells])
    assert result.pvalue > 1e-3, result


def test_lloyd_matches_sklearn_kmeans_from_same_seeds():
    from sklearn.cluster import KMeans

    x, _ = gaussian_mixture(6, 3, 600, spread=2.0, std=0.8, seed=12)  # overlapping: Lloyd has work to do
    seeds = kmeans_plus_plus(x, 6, torch.Generator().manual_seed(1))
    ours = lloyd(x.double(), seeds.double(), iters=5)
    ref = KMeans(6, init=seeds.double().numpy(), n_init=1, max_iter=5, tol=0.0, algorithm="lloyd")
    ref.fit(x.double().numpy())
    torch.testing.assert_close(ours, torch.from_numpy(ref.cluster_centers_), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_first_training_batch_initialises_once_and_survives_state_dict(init):
    torch.manual_seed(8)
    cfg = dict(codebook_size=16, code_dim=4, init=init, dead_code_steps=0)
    vq = make_vq(**cfg)
    assert not bool(vq.initialised)
    data = torch.randn(256, 4) + 50.0  # far from the U(-1/K, 1/K) initial codebook
    vq.train()(data)
    assert bool(vq.initialised)
    assert torch.cdist(vq.codebook, data).min(1).values.max() < 10.0  # every code sits among the data
    fresh = make_vq(**cfg)
    fresh.load_state_dict(vq.state_dict())
    codebook = fresh.codebook.clone()
    out = fresh.train()(data)  # a resumed run must not initialise again
    torch.testing.assert_close(out.quantized, codebook[out.indices])


def test_uniform_init_needs_no_data():
    vq = make_vq(codebook_size=10, code_dim=3, init="uniform")
    assert bool(vq.initialised) and vq.codebook.abs().max() <= 0.1


# ----------------------------------------------------------------------------- codebook health


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_dead_code_restart_revives_stranded_codes(update):
    torch.manual_seed(9)
    vq = make_vq(codebook_size=16, code_dim=4, init="uniform", update=update, dead_code_steps=2)
    with torch.no_grad():
        vq.codebook.copy_(100.0 + torch.randn(16, 4))  # all codes far away: one code wins every vector
        if update == "ema":
            vq.embed_sum.copy_(vq.codebook)
    data = torch.randn(4096, 4)
    assert float(vq.eval()(data).usage) == 1 / 16
    vq.train()
    for _ in range(6):
        vq(data[torch.randint(4096, (512,))])
    out = vq.eval()(data)
    assert float(out.usage) == 1.0 and float(out.perplexity) > 8
    assert float(vq.window_usage()) == 1.0


def test_without_restart_stranded_codes_stay_dead():
    torch.manual_seed(9)
    vq = make_vq(codebook_size=16, code_dim=4, init="uniform", dead_code_steps=0)
    vq.codebook.copy_(100.0 + torch.randn(16, 4))
    vq.embed_sum.copy_(vq.codebook)
    data = torch.randn(4096, 4)
    vq.train()
    for _ in range(6):
        vq(data[torch.randint(4096, (512,))])
    assert float(vq.eval()(data).usage) == 1 / 16


def train_on_mixture(**kw) -> tuple[VectorQuantizer, torch.Tensor]:
    """32 well-separated Gaussian clusters in 8-D, identity encoder, EMA codebook of 32."""
    torch.manual_seed(10)
    data, _ = gaussian_mixture(32, 8, 8192, spread=5.0, std=0.3, seed=11)
    vq = make_vq(codebook_size=32, code_dim=8, **kw).train()
    for _ in range(100):
        vq(data[torch.randint(len(data), (512,))])
    return vq.eval(), data


@pytest.fixture(scope="module")
def healthy_mixture_run():
    return train_on_mixture(init="kmeans++", kmeans_iters=0, dead_code_steps=20)


def test_kmeans_ema_restart_uses_codebook_on_cluster_mixture(healthy_mixture_run):
    vq, data = healthy_mixture_run
    out = vq(data)
    assert float(out.usage) > 0.9
    assert float(out.perplexity) > 0.8 * 32
    assert float(vq.window_usage()) > 0.9


def test_mixture_negative_control_uniform_init_without_restarts_collapses(healthy_mixture_run):
    healthy, data = healthy_mixture_run
    vq, _ = train_on_mixture(init="uniform", dead_code_steps=0)
    out, ref = vq(data), healthy(data)
    # why the healthy defaults exist: codes stuck near the origin, clusters merged
    assert float(out.usage) <= 0.6 and float(out.commitment_loss) > 10 * float(ref.commitment_loss)


def test_codebook_stats_closed_form():
    stats = codebook_stats(torch.tensor([[0, 0], [1, 1]]), codebook_size=4)  # p = (1/2, 1/2, 0, 0)
    assert stats["perplexity"] == pytest.approx(2.0) and stats["usage"] == 0.5
    assert stats["log2_perplexity"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"update": "sgd"}, "update must be one of"),
        ({"init": "zeros"}, "init must be one of"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"codebook_size": 0}, "codebook_size must be >= 1"),
        ({"dead_code_steps": -1}, "dead_code_steps must be >= 0"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(GenbenchError, match=match):
        make_vq(**kw)


def test_bad_input_raises():
    vq = make_vq(codebook_size=8, code_dim=4)
    with pytest.raises(GenbenchError, match=r"expected input \(B, 4, \*spatial\)"):
        vq(torch.randn(2, 3, 5, 5))
    with pytest.raises(GenbenchError, match=r"indices must lie in \[0, 8\)"):
        vq.indices_to_codes(torch.tensor([[8]]))
    with pytest.raises(GenbenchError, match="only available with update='ema'"):
        make_vq(update="gradient").ema_update(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))


def _ema_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(7))
        vq = make_vq(codebook_size=8, code_dim=3, init="random", dead_code_steps=0, ema_decay=0.9)
        vq.init_from_data(z, generator=torch.Generator().manual_seed(1))
        vq.train()
        for _ in range(3):  # each rank sees its own slice of the global batch
            vq(z[rank * 12 // world:(rank + 1) * 12 // world])
        torch.save({k: v.clone() for k, v in vq.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ema_statistics_are_summed_over_data_parallel_processes(tmp_path):
    """Two processes, each on half the batch, end with the codebook one process computes on the whole
    batch: the EMA's counts and sums are all-reduced before the update (as SyncBatchNorm's statistics)."""
    import torch.multiprocessing as mp

    mp.spawn(_ema_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    z = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    vq = make_vq(codebook_size=8, code_dim=3, init="random", dead_code_steps=0, ema_decay=0.9)
    vq.init_from_data(z, generator=torch.Generator().manual_seed(1))
    vq.train()
    for _ in range(3):
        vq(z)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("codebook", "cluster_size", "embed_sum", "last_used"):
            torch.testing.assert_close(state[key], vq.state_dict()[key], rtol=1e-6, atol=1e-6, msg=key)
    # the statistics of half the batch alone give another codebook: the check has teeth
    half = make_vq(codebook_size=8, code_dim=3, init="random", dead_code_steps=0, ema_decay=0.9)
    half.init_from_data(z, generator=torch.Generator().manual_seed(1))
    half.train()
    for _ in range(3):
        half(z[:6])
    assert not torch.allclose(half.codebook, vq.codebook, atol=1e-4)
