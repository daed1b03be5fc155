"""The shared denoising U-Net: shapes, time conditioning, feature taps and injection sites, swin
attention (against a token-by-token reference), the time-free variant, and weight names that
shipped bundles depend on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from MedTranslateLib.config import from_dict
from MedTranslateLib.nn.diffusion_unet import (
    DenoisingUNet,
    DenoisingUNetConfig,
    InjectionContext,
    SwinAttention2d,
    SwinBlock,
    TimestepResBlock,
)

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "resshift_ct_cta_demo"

TINY = dict(model_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
            num_head_channels=8, norm_groups=4)


def tiny(**kw) -> DenoisingUNet:
    torch.manual_seed(0)
    net = DenoisingUNet(2, 1, DenoisingUNetConfig(**{**TINY, **kw}))
    nn.init.normal_(net.out[-1].weight, std=0.1)  # the zero-initialised output conv would hide everything
    for m in net.modules():  # zero-initialised residual branches too
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.1)
    return net


@pytest.mark.parametrize("kw", [{}, {"resblock_updown": False, "scale_shift_norm": False, "num_res_blocks": 2}])
def test_shapes_and_feature_taps(kw):
    net = tiny(**kw)
    x = torch.randn(3, 2, 16, 24)
    out, feats = net(x, torch.tensor([0, 10, 999]), return_features=True)
    assert out.shape == (3, 1, 16, 24)
    assert [f.shape for f in feats.enc] == [(3, 8, 16, 24), (3, 16, 8, 12), (3, 32, 4, 6)]
    assert [f.shape for f in feats.dec] == [(3, 8, 16, 24), (3, 16, 8, 12), (3, 32, 4, 6)]
    assert feats.mid.shape == (3, 32, 4, 6)
    # up[i]: the backbone entering decoder level i, upsampled from level i+1 (mid for the lowest)
    assert [f.shape for f in feats.up] == [(3, 16, 16, 24), (3, 32, 8, 12), (3, 32, 4, 6)]
    assert torch.equal(feats.up[2], feats.mid)
    assert net.sites == ["enc0", "enc1", "enc2", "mid", "up0", "up1", "up2", "dec0", "dec1", "dec2"]
    assert [net.site_channels(s) for s in net.sites] == [8, 16, 32, 32, 16, 32, 32, 8, 16, 32]


def test_fresh_network_outputs_zero_and_time_matters():
    net = DenoisingUNet(2, 1, DenoisingUNetConfig(**TINY))
    x = torch.randn(2, 2, 16, 16)
    assert not net(x, torch.tensor([5, 5])).any()  # zero-initialised output conv (ADM)
    net = tiny()
    a = net(x, torch.tensor([5, 5]))
    b = net(x, torch.tensor([500, 500]))
    assert (a - b).abs().mean() > 1e-4
    assert torch.equal(net(x, torch.tensor(5)), a)  # a scalar timestep is broadcast


def test_bad_input_is_one_line():
    net = tiny()
    with pytest.raises(ValueError, match=r"multiples of 4") as err:
        net(torch.randn(1, 2, 18, 16), torch.tensor([1]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown U-Net injection site 'enc7'"):
        net.set_injection("enc7", nn.Identity())
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        DenoisingUNetConfig(model_channels=6, norm_groups=4)
    with pytest.raises(ValueError, match="attention_levels"):
        DenoisingUNetConfig(channel_mult=(1, 2), attention_levels=(2,))


class Recorder(nn.Module):
    """Injection that records what it saw and scales the feature."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(scale))
        self.seen: list[tuple[InjectionContext, tuple[int, ...]]] = []

    def forward(self, h, ctx):
        self.seen.append((ctx, tuple(h.shape)))
        return h * self.gain


def level_of(site: str) -> int | None:
    return None if site == "mid" else int(site.lstrip("encdup"))


@pytest.mark.parametrize("site", ["enc0", "enc2", "mid", "up0", "up2", "dec1"])
def test_injection_sites_change_the_output_and_see_their_context(site):
    net = tiny()
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([3, 7])
    ref, ref_feats = net(x, t, return_features=True)
    rec = Recorder(1.0)
    net.set_injection(site, rec)
    same, feats = net(x, t, extra={"text": 1}, return_features=True)
    assert torch.allclose(same, ref, atol=1e-6)  # an identity injection changes nothing
    (ctx, shape), = rec.seen
    assert ctx.site == site and ctx.extra == {"text": 1} and torch.equal(ctx.timesteps, t)
    assert ctx.level == level_of(site)
    assert shape[1] == net.site_channels(site) and ctx.emb.shape == (2, 4 * 8)
    with torch.no_grad():
        rec.gain.fill_(0.0)
    changed, feats = net(x, t, return_features=True)
    assert (changed - ref).abs().max() > 1e-4
    tapped = feats.mid if site == "mid" else getattr(feats, site.rstrip("0123456789"))[level_of(site)]
    assert not tapped.any()  # the tap is the feature after its injection
    # injections are submodules: saved and trained with the U-Net, removable
    assert f"injections.{site}.gain" in net.state_dict()
    assert any(p is rec.gain for p in net.parameters())
    net.set_injection(site, None)
    assert torch.allclose(net(x, t), ref, atol=1e-6)


def test_encoder_injection_reaches_the_skip_and_gradients_flow():
    net = tiny()
    net.set_injection("enc0", Recorder(0.5))
    x = torch.randn(2, 2, 16, 16)
    net(x, torch.tensor([1, 2])).square().mean().backward()
    assert net.injections["enc0"].gain.grad is not None and net.injections["enc0"].gain.grad.abs() > 0


def test_default_is_the_official_lbbdm_size():
    """The default config is the official LBBDM U-Net (concat conditioning: 3 + 3 -> 3 channels
    in BBDM's f4 setting); its authors quote 237M+ parameters (xuekt98/BBDM issue #27)."""
    with torch.device("meta"):
        net = DenoisingUNet(6, 3)
    n = sum(p.numel() for p in net.parameters())
    assert 237.0e6 < n < 237.2e6
    assert not net.down_stages[0].attns or all(isinstance(a, nn.Identity) for s in net.down_stages for a in s.attns)


def test_up_sites_are_the_backbone_just_before_the_first_skip_concatenation():
    """up{i} sees (B, C_{i+1}, H/2**i, W/2**i) once per forward, and what it returns is the first
    part of the concatenation fed to the first res block of decoder level i; an identity there
    changes nothing, bit for bit."""
    net = tiny(num_res_blocks=2)
    x, t = torch.randn(2, 2, 16, 24), torch.tensor([3, 7])
    ref = net(x, t)
    concat_inputs = {}
    for k, stage in enumerate(net.up_stages):
        lv = len(net.up_stages) - 1 - k
        stage.blocks[0].register_forward_pre_hook(lambda m, args, lv=lv: concat_inputs.__setitem__(lv, args[0]))
    recorders = {}
    for lv in range(3):
        recorders[lv] = Recorder(1.0)
        net.set_injection(f"up{lv}", recorders[lv])
    out = net(x, t)
    assert torch.equal(out, ref)
    for lv, rec in recorders.items():
        (ctx, shape), = rec.seen
        c = net.site_channels(f"up{lv}")
        assert shape == (2, c, 16 >> lv, 24 >> lv) and ctx.site == f"up{lv}" and ctx.level == lv
        assert concat_inputs[lv].shape[1] > c  # backbone + skip
    with torch.no_grad():
        recorders[1].gain.fill_(-2.0)
    _, feats = net(x, t, return_features=True)
    assert torch.equal(concat_inputs[1][:, :32], feats.up[1])  # the injected backbone is what is concatenated


# ---- swin attention ------------------------------------------------------------------------------

def naive_swin_block(blk: SwinBlock, x: torch.Tensor, side: int, shift: int) -> torch.Tensor:
    """Swin block (Liu et al. 2021, eqs. 3-4) written out window by window and token by token:
    the image cyclically shifted by -shift is cut into side x side windows; inside a window,
    token p attends to token q with score q_p.k_q/sqrt(d) + B[offset(p, q)] (bias table of the
    block's configured window), minus 100 when exactly one of them wrapped around an image edge
    in the shift (they are not neighbours in the image); outputs go back to their own pixels."""
    b, c, height, width = x.shape
    heads, w = blk.heads, blk.window
    dh = c // heads
    table = blk.relative_position_bias_table
    y = blk.norm1(x)
    attended = torch.zeros_like(y)
    for n in range(b):
        for wy in range(height // side):
            for wx in range(width // side):
                coords = [(a, e) for a in range(side) for e in range(side)]  # inside the window
                rows = [wy * side + a + shift for a, _ in coords]
                cols = [wx * side + e + shift for _, e in coords]
                wrapped = [(r >= height, col >= width) for r, col in zip(rows, cols, strict=True)]
                pixels = [(r % height, col % width) for r, col in zip(rows, cols, strict=True)]
                tokens = torch.stack([y[n, :, i, j] for i, j in pixels])
                q, k, v = blk.qkv(tokens).split(c, dim=-1)
                mixed = torch.zeros(len(coords), c, dtype=x.dtype)
                for h in range(heads):
                    cs = slice(h * dh, (h + 1) * dh)
                    for p, (py, px) in enumerate(coords):
                        scores = []
                        for qi, (qy, qx) in enumerate(coords):
                            score = q[p, cs] @ k[qi, cs] / dh ** 0.5
                            score = score + table[(py - qy + w - 1) * (2 * w - 1) + (px - qx + w - 1), h]
                            if wrapped[p] != wrapped[qi]:
                                score = score - 100.0
                            scores.append(score)
                        mixed[p, cs] = torch.softmax(torch.stack(scores), 0) @ v[:, cs]
                out = blk.proj(mixed)
                for p, (i, j) in enumerate(pixels):
                    attended[n, :, i, j] = out[p]
    x = x + attended
    return x + blk.mlp(blk.norm2(x))


def random_swin_block(window: int, shifted: bool, dim: int = 8, heads: int = 2) -> SwinBlock:
    torch.manual_seed(int(shifted) + 10 * window)
    blk = SwinBlock(dim, heads, window, shifted, groups=2).double()
    with torch.no_grad():  # a bias that matters: a wrong offset index would show
        blk.relative_position_bias_table.normal_(0.0, 1.0)
        blk.qkv.weight.mul_(3.0)
    return blk


@pytest.mark.parametrize("shifted", [False, True])
def test_swin_block_equals_the_window_by_window_reference(shifted):
    blk = random_swin_block(window=4, shifted=shifted)
    x = torch.randn(1, 8, 8, 12, dtype=torch.float64)  # 2 x 3 windows, not square
    expected = naive_swin_block(blk, x, side=4, shift=2 if shifted else 0)
    torch.testing.assert_close(blk(x), expected, rtol=0, atol=1e-10)
    if shifted:  # the shift and its mask are real: without them the result differs
        assert (expected - naive_swin_block(blk, x, side=4, shift=0)).abs().max() > 1e-3


def test_swin_window_clamps_to_a_small_feature():
    """A feature side <= window (equal included): one window of that side, no shift (Swin's
    rule), the bias read from the centre of the configured window's table."""
    for window, size in [(8, (4, 4)), (8, (4, 8)), (4, (4, 8))]:
        blk = random_swin_block(window=window, shifted=True)
        x = torch.randn(1, 8, *size, dtype=torch.float64)
        torch.testing.assert_close(blk(x), naive_swin_block(blk, x, side=4, shift=0), rtol=0, atol=1e-10)


def test_swin_layer_is_embed_blocks_unembed():
    torch.manual_seed(0)
    layer = SwinAttention2d(6, embed_dim=8, head_channels=4, depth=2, window=4, groups=2).double()
    assert [b.shifted for b in layer.blocks] == [False, True] and layer.blocks[0].heads == 2
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    z = layer.embed(x)
    z = naive_swin_block(layer.blocks[1], naive_swin_block(layer.blocks[0], z, 4, 0), 4, 2)
    torch.testing.assert_close(layer(x), layer.unembed(z), rtol=0, atol=1e-10)


def test_swin_unet_places_layers_as_resshift():
    """ResShift UNetModelSwin: one swin layer after the first res block of an attention level's
    encoder and decoder stages, one in the middle block, none elsewhere; the network trains."""
    net = tiny(attention="swin", num_res_blocks=2, swin_embed_dim=16, swin_window=4, swin_depth=2)
    for stage in [*net.down_stages, *net.up_stages]:
        kinds = [type(a) for a in stage.attns]
        assert kinds[0] in (SwinAttention2d, nn.Identity) and all(k is nn.Identity for k in kinds[1:])
    assert [type(s.attns[0]) for s in net.down_stages] == [nn.Identity, SwinAttention2d, SwinAttention2d]
    assert [type(s.attns[0]) for s in net.up_stages] == [SwinAttention2d, SwinAttention2d, nn.Identity]
    assert isinstance(net.mid_attn, SwinAttention2d) and net.mid_attn.blocks[0].heads == 2
    x = torch.randn(2, 2, 16, 16)  # level 1: 8x8 (shifted 4x4 windows); level 2: 4x4 (one window)
    out, feats = net(x, torch.tensor([1, 3]), return_features=True)
    assert out.shape == (2, 1, 16, 16) and feats.enc[1].shape == (2, 16, 8, 8)
    out.square().mean().backward()
    assert net.down_stages[1].attns[0].blocks[1].relative_position_bias_table.grad.abs().max() > 0


def test_swin_window_that_does_not_divide_a_feature_is_a_clear_error():
    net = tiny(attention="swin", attention_levels=(0,), swin_embed_dim=16, swin_window=16)
    with pytest.raises(ValueError, match=r"level 0: the 16x24 feature is not made of whole 16x16 windows") as err:
        net(torch.randn(1, 2, 16, 24), torch.tensor([1]))
    assert "\n" not in str(err.value) and "swin_window=16" in str(err.value)
    net = tiny(attention="swin", attention_levels=(), swin_embed_dim=16, swin_window=4)
    with pytest.raises(ValueError, match=r"the middle block: the 6x6 feature .* 4x4 windows"):
        net(torch.randn(1, 2, 24, 24), torch.tensor([1]))
    assert net(torch.randn(1, 2, 16, 16), torch.tensor([1])).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="swin_embed_dim=12 must be a multiple of num_head_channels=8"):
        DenoisingUNetConfig(**{**TINY, "attention": "swin", "swin_embed_dim": 12})


def test_dfbk_paper_size_swin_unet():
    """dfbk A.2: 160 channels, 32-channel heads, 2 res blocks, swin depth 2, embed 256; at 224
    with mult (1, 1, 2, 2, 4) and window 14 every level is whole windows (the 14x14 one clamps);
    at 192 a window of 8 meets a 12x12 feature, which Swin cannot partition."""
    cfg = DenoisingUNetConfig(model_channels=160, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                              attention_levels=(0, 1, 2, 3, 4), num_head_channels=32, attention="swin",
                              swin_depth=2, swin_embed_dim=256, swin_window=14, resblock_updown=False)
    with torch.device("meta"):
        net = DenoisingUNet(2, 1, cfg)
        net.check_input(torch.empty(1, 2, 224, 224))
        assert net.mid_attn.blocks[0].heads == 8
        net8 = DenoisingUNet(2, 1, DenoisingUNetConfig(**{**vars(cfg), "channel_mult": (1, 1, 2, 2, 4, 4),
                                                           "attention_levels": (0, 1, 2, 3, 4, 5), "swin_window": 8}))
        with pytest.raises(ValueError, match="level 4: the 12x12 feature"):
            net8.check_input(torch.empty(1, 2, 192, 192))


# ---- time-free U-Net -----------------------------------------------------------------------------

def test_time_free_unet_needs_no_timesteps():
    net = tiny(time_conditioning=False, resblock_updown=True)
    assert net.time_embed is None and not any(".emb." in k or k.startswith("time_embed") for k in net.state_dict())
    x = torch.randn(2, 2, 16, 16)
    rec = Recorder(1.0)
    net.set_injection("up1", rec)
    out = net(x)
    assert out.shape == (2, 1, 16, 16) and out.abs().max() > 0
    (ctx, _), = rec.seen
    assert ctx.emb is None and ctx.timesteps is None
    # each slice on its own: nothing ties the batch together
    torch.testing.assert_close(net(x[1:]), out[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no time conditioning"):
        net(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timesteps are required"):
        tiny()(x)


def test_time_free_res_block_is_the_plain_residual_block():
    torch.manual_seed(0)
    blk = TimestepResBlock(4, 8, None, groups=2)
    nn.init.normal_(blk.conv2.weight, std=0.1)
    x = torch.randn(2, 4, 6, 6)
    f = nn.functional
    expected = blk.skip(x) + blk.conv2(f.silu(blk.norm2(blk.conv1(f.silu(blk.norm1(x))))))
    torch.testing.assert_close(blk(x, None), expected, rtol=0, atol=0)


# ---- compatibility -------------------------------------------------------------------------------

def test_default_weight_names_still_load_the_shipped_bundle():
    """Bundles on disk depend on parameter names: the shipped resshift demo's U-Net weights (saved
    before the swin/up/time-free options existed) load strictly into a U-Net built from its saved
    architecture, every new option at its default."""
    arch = yaml.safe_load((DEMO_BUNDLE / "medtranslate.yaml").read_text())["architecture"]["unet"]
    assert not {"attention", "swin_depth", "swin_embed_dim", "swin_window", "time_conditioning"} & set(arch)
    weights = {k.removeprefix("unet."): v for k, v in load_file(DEMO_BUNDLE / "model.safetensors").items()
               if k.startswith("unet.")}
    net = DenoisingUNet(weights["conv_in.weight"].shape[1], weights["out.2.weight"].shape[0],
                        from_dict(DenoisingUNetConfig, arch))
    net.load_state_dict(weights, strict=True)
    assert len(weights) == len(net.state_dict()) > 50
