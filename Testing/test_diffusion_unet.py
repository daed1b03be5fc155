"""The shared denoising U-Net: shapes, time conditioning, feature taps and injection sites."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from MedTranslateLib.nn.diffusion_unet import DenoisingUNet, DenoisingUNetConfig, InjectionContext

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
    assert net.sites == ["enc0", "enc1", "enc2", "mid", "dec0", "dec1", "dec2"]
    assert [net.site_channels(s) for s in net.sites] == [8, 16, 32, 32, 8, 16, 32]


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


@pytest.mark.parametrize("site", ["enc0", "enc2", "mid", "dec1"])
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
    assert ctx.level == (None if site == "mid" else int(site[3:]))
    assert shape[1] == net.site_channels(site) and ctx.emb.shape == (2, 4 * 8)
    with torch.no_grad():
        rec.gain.fill_(0.0)
    changed, feats = net(x, t, return_features=True)
    assert (changed - ref).abs().max() > 1e-4
    tapped = feats.mid if site == "mid" else getattr(feats, site[:3])[int(site[3:])]
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
