"""U-Net: shapes for any size/channel count, padding, time conditioning, gradients, bf16, parameter count."""

import math

import pytest
import torch
import torch.nn.functional as F

from genbench.errors import GenbenchError
from genbench.nets.unet import UNet, UNetConfig, num_groups, timestep_embedding
from genbench.utils import count_parameters

TINY = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), num_heads=2, dropout=0.0)


def randomize_(net: UNet, std: float = 0.05) -> UNet:
    """Re-draw every parameter: the zero-initialised output layers make a fresh U-Net output 0."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, std)
    return net


def test_fresh_unet_outputs_zero():
    """Every residual branch and the output conv start at zero (improved-DDPM init): blocks are identities."""
    net = UNet(UNetConfig(**TINY), 3)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "side,channels,mult",
    [(7, 4, (1, 2, 2)), (8, 1, (1, 2)), (28, 1, (1, 2, 2)), (28, 3, (1, 2, 2, 2)), (32, 3, (1, 2, 2, 2)), (7, 4, (1, 2))],
)
def test_output_shape_equals_input(side, channels, mult):
    net = randomize_(UNet(UNetConfig(**{**TINY, "channel_mult": mult, "attention_levels": (len(mult) - 1,)}), channels))
    x = torch.randn(2, channels, side, side)
    out = net(x, torch.tensor([3, 500]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_out_channels_may_differ():
    net = UNet(UNetConfig(**TINY), in_channels=4, out_channels=8)
    assert net(torch.randn(1, 4, 7, 7), torch.tensor([1])).shape == (1, 8, 7, 7)


def test_pad_and_crop_is_reflect_padding_of_the_input():
    """A 7x7 input to a 3-level net (multiple of 4) runs as the reflect-padded 8x8 image, cropped back:
    padding 1 goes right/bottom (left = pad // 2 = 0)."""
    net = randomize_(UNet(UNetConfig(**TINY), 2))
    x, t = torch.randn(3, 2, 7, 7), torch.tensor([0, 10, 900])
    padded = F.pad(x, (0, 1, 0, 1), mode="reflect")
    torch.testing.assert_close(net(x, t), net(padded, t)[..., :7, :7])
    # 28 with 4 levels -> 32: 2 on each side
    net4 = randomize_(UNet(UNetConfig(**{**TINY, "channel_mult": (1, 1, 1, 1), "attention_levels": ()}), 1))
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(net4(x, t[:1]), net4(F.pad(x, (2, 2, 2, 2), mode="reflect"), t[:1])[..., 2:30, 2:30])


def test_too_small_input_is_refused():
    net = UNet(UNetConfig(**TINY), 1)
    with pytest.raises(GenbenchError, match="1x1 input is too small for 3 levels"):
        net(torch.randn(1, 1, 1, 1), torch.tensor([0]))
    with pytest.raises(GenbenchError, match=r"expected input of shape \(B, C, H, W\)"):
        net(torch.randn(1, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize("conditioning", ["scale_shift", "additive"])
def test_time_conditioning_changes_the_output(conditioning):
    net = randomize_(UNet(UNetConfig(**{**TINY, "time_conditioning": conditioning}), 1))
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    out = net(x, torch.tensor([0, 1, 700]))
    assert not torch.allclose(out[0], out[1], atol=1e-5) and not torch.allclose(out[1], out[2], atol=1e-5)
    torch.testing.assert_close(net(x, torch.tensor([5, 5, 5]))[0], net(x, torch.tensor([5, 5, 5]))[2])


def test_gradients_reach_every_parameter():
    net = randomize_(UNet(UNetConfig(**TINY), 3))
    net(torch.randn(2, 3, 7, 7), torch.tensor([2, 600])).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_bf16_autocast_and_channels_last_match_fp32():
    net = randomize_(UNet(UNetConfig(**TINY), 3)).eval()
    x, t = torch.randn(4, 3, 28, 28), torch.tensor([0, 50, 500, 999])
    ref = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"
    cl_net = randomize_(UNet(UNetConfig(**TINY), 3)).eval().to(memory_format=torch.channels_last)
    out = cl_net(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 6)
    w = torch.tensor([10_000 ** (-k / 3) for k in range(3)])
    ref = torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], 1)
    torch.testing.assert_close(emb, ref)
    assert timestep_embedding(t, 7).shape == (4, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


def test_num_groups_divides():
    assert [num_groups(c) for c in (1, 4, 8, 32, 48, 64, 96, 100)] == [1, 4, 8, 32, 24, 32, 32, 25]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("base_channels", 0, "base_channels must be >= 1"),
        ("channel_mult", (), "channel_mult must be a non-empty list"),
        ("num_res_blocks", 0, "num_res_blocks must be >= 1"),
        ("attention_levels", (3,), r"attention_levels \[3\] out of range"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("num_heads", 3, "num_heads=3 must divide the 16 channels of attention level 2"),
        ("time_conditioning", "film", "time_conditioning must be"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(GenbenchError, match=match):
        UNet(UNetConfig(**{**TINY, field: value}), 1)


def test_parameter_count_matches_the_architecture():
    """Count for base 8, mult (1, 2), 1 block/level, attention at level 1 and mid, 3 -> 3 channels, from
    the layer formulas: conv k x k (k^2 i o + o), GroupNorm (2c), Linear (i o + o)."""
    conv = lambda i, o, k=3: k * k * i * o + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    emb = 32

    def res(i, o):
        return 2 * i + conv(i, o) + lin(emb, 2 * o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    def attn(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    expected = (
        lin(8, emb) + lin(emb, emb) + conv(3, 8)                       # time MLP, input conv
        + res(8, 8) + conv(8, 8) + res(8, 16) + attn(16)               # down: level 0, downsample, level 1
        + res(16, 16) + attn(16) + res(16, 16)                         # middle
        + res(32, 16) + attn(16) + res(24, 16) + attn(16) + conv(16, 16)  # up level 1 (+ upsample conv)
        + res(24, 8) + res(16, 8)                                      # up level 0
        + 2 * 8 + conv(8, 3)                                           # out norm + conv
    )
    cfg = UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1)
    assert count_parameters(UNet(cfg, 3)) == expected
    print(f"\nU-Net parameters: tiny {expected:,}, default (64, (1,2,2), 2 blocks) "
          f"{count_parameters(UNet(UNetConfig(), 1)):,}")
    assert math.isclose(count_parameters(UNet(UNetConfig(), 1)), 6.95e6, rel_tol=0.01)
