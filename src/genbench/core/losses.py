"""VQ-GAN's losses beyond vector quantization: adversarial (with the adaptive weight) and perceptual.

As in taming-transformers' ``modules/losses``, the losses sit together here, apart from the
networks they train (genbench.nets.discriminator, genbench.nets.perceptual).

Losses (logits l = D(.) are patch maps, means run over batch and patches):
    hinge    L_D = mean(relu(1 - l_real)) + mean(relu(1 + l_fake)),   L_G = -mean(l_fake)
             (Lim & Ye 2017; Miyato et al. 2018; taming's default, there with a factor 1/2 on L_D)
    vanilla  L_D = mean(softplus(-l_real)) + mean(softplus(l_fake)),   L_G = mean(softplus(-l_fake))
             (Goodfellow et al. 2014; the non-saturating generator loss, -log sigmoid(l_fake))

Adaptive weight (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis",
eq. 7): lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), delta = 1e-4, the
gradients taken at the decoder's last layer G_L; clamped to [0, 1e4] and detached (as in taming),
then multiplied by disc_weight.

Perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", eq. 1: LPIPS's "lin" form). With f^l(x) the feature map (C_l, H_l, W_l) of
layer l of a frozen network:

    f^_l = f^l / sqrt(sum_c (f^l_c)^2 + eps)                  unit-normalise channels per position
    d(x, y) = sum_l  1/(H_l W_l) sum_{h,w} sum_c w_{l,c} (f^_l(x) - f^_l(y))^2

w_{l,c} = 1 unless layer weights are given (there are no human judgments here to fit them on).
eps = 1e-10 makes the normalisation differentiable at an all-zero (dead-ReLU) vector, where LPIPS's
x / (||x|| + eps) has an infinite derivative inside the square root (NaN gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genbench.errors import GenbenchError

GAN_LOSSES = ("hinge", "vanilla")
NORM_EPS = 1e-10


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """-mean(log sigmoid(D(x))) - mean(log(1 - sigmoid(D(x_hat)))) = mean(softplus(-l_r)) + mean(softplus(l_f))."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise GenbenchError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def generator_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """hinge: -mean(D(x_hat)); vanilla (non-saturating): -mean(log sigmoid(D(x_hat)))."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise GenbenchError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0,
                    delta: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """disc_weight * clamp(||grad_{G_L} rec_loss|| / (||grad_{G_L} g_loss|| + delta), 0, max_weight),
    detached (Esser et al. 2021 eq. 7). Both graphs are retained: the caller backpropagates later."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    ratio = rec_grad.float().norm() / (g_grad.float().norm() + delta)
    return ratio.clamp(0.0, max_weight).detach() * disc_weight


def normalize_channels(f: Tensor, eps: float = NORM_EPS) -> Tensor:
    """f / sqrt(sum_c f_c^2 + eps) at every position of f (B, C, H, W)."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + eps)


def lpips_distance(feats_x: list[Tensor], feats_y: list[Tensor], weights: list[Tensor] | None = None) -> Tensor:
    """sum_l mean_{h,w} sum_c w_{l,c} (f^_l(x) - f^_l(y))^2 per image: (B,). Uniform w when None."""
    total = 0.0
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
        sq = (normalize_channels(fx) - normalize_channels(fy)).pow(2)
        if weights is not None:
            sq = sq * weights[i].view(1, -1, 1, 1)
        total = total + sq.sum(1).mean((1, 2))
    return total
