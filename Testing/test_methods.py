"""Method interface, registry, shared nn blocks and pix2pix (tiny: 2x1x64x64, ngf 8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from MedTranslateLib.methods import (
    Translation,
    TranslationMethod,
    available_methods,
    build_method,
    get_method_class,
)
from MedTranslateLib.methods.pix2pix import Pix2Pix, Pix2PixConfig
from MedTranslateLib.nn import GANLoss, PatchGAN, Pix2PixUNet, frozen, patchgan_receptive_field


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on busy cores oversubscribed intra-op threads
    make them ~10x slower (20 training steps: 2 s on one thread, 24 s on two, with other jobs running)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = {"generator": {"ngf": 8, "num_downs": 6}, "discriminator": {"ndf": 8}}


def tiny(**overrides) -> Pix2Pix:
    torch.manual_seed(0)
    config = copy.deepcopy(TINY)
    config.update(overrides)
    return build_method("pix2pix", config)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    target = (0.5 * torch.tanh(2 * source) + 0.3 * (xx**2 + yy**2 < 0.3)).clamp(-1, 1)
    return {"source": source, "target": target, "liver": torch.zeros(2, 1, 64, 64), "case": ["a", "b"],
            "index": torch.tensor([0, 1])}


# ---- registry -------------------------------------------------------------------------------------

def test_registry():
    assert "pix2pix" in available_methods()
    assert get_method_class("pix2pix") is Pix2Pix
    assert Pix2Pix.name == "pix2pix" and Pix2Pix.Config is Pix2PixConfig
    assert issubclass(Pix2Pix, TranslationMethod)
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*pix2pix"):
        get_method_class("nope")


def test_build_from_dict_and_config_errors():
    m = tiny()
    assert m.config.generator.ngf == 8 and m.config.lambda_l1 == 100.0 and m.config.gan_mode == "vanilla"
    assert m.in_channels == 1 and m.out_channels == 1
    assert not m.uses_masks and m.paired and not m.stochastic
    same = build_method("pix2pix", m.config)
    assert same.config is m.config
    assert Pix2Pix({"generator": {"ngf": 4, "num_downs": 3}}).config.generator.num_downs == 3
    with pytest.raises(ValueError, match=r"unknown key 'model\.generator\.ngff' in train\.yaml"):
        build_method("pix2pix", {"generator": {"ngff": 8}}, where="train.yaml", prefix="model")
    with pytest.raises(ValueError, match=r"'model\.gan_mode' in t: expected one of 'vanilla', 'lsgan', got 'x'"):
        build_method("pix2pix", {"gan_mode": "x"}, where="t", prefix="model")
    with pytest.raises(ValueError, match=r"'model\.generator' in t: dropout must be in \[0, 1\)"):
        build_method("pix2pix", {"generator": {"dropout": 1.0}}, where="t", prefix="model")


# ---- inference ------------------------------------------------------------------------------------

def test_translate_shape_range_determinism():
    m = tiny().eval()
    src = batch()["source"]
    with torch.inference_mode():
        out = m.translate(src)
    assert isinstance(out, Translation)
    assert out.image.shape == (2, 1, 64, 64)
    assert out.image.min() >= -1 and out.image.max() <= 1
    assert out.uncertainty is None and out.confidence is None and out.samples is None
    again = m.translate(src, masks={"liver": torch.ones(2, 1, 64, 64)}, steps=3, num_samples=4)
    assert torch.equal(out.image, again.image)  # eval mode: deterministic; masks/steps ignored
    assert torch.equal(m.validation_output(batch()), out.image)


def test_translate_input_errors():
    m = tiny().eval()
    with pytest.raises(ValueError, match=r"expected source of shape \(B, 1, H, W\), got \(2, 2, 64, 64\)"):
        m.translate(torch.zeros(2, 2, 64, 64))
    with pytest.raises(ValueError, match=r"expected source of shape .* got \(1, 64, 64\)"):
        m.translate(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"slice size \(48, 64\) is not a multiple of 64"):
        m.translate(torch.zeros(1, 1, 48, 64))


def test_test_time_dropout_mc_samples():
    m = tiny(test_time_dropout=True).eval()
    assert m.stochastic and not Pix2Pix.stochastic
    src = batch()["source"]
    a = m.translate(src, num_samples=3, generator=torch.Generator().manual_seed(1))
    b = m.translate(src, num_samples=3, generator=torch.Generator().manual_seed(1))
    c = m.translate(src, num_samples=3, generator=torch.Generator().manual_seed(2))
    assert a.samples.shape == (3, 2, 1, 64, 64) and a.uncertainty.shape == (2, 1, 64, 64)
    assert torch.equal(a.image, b.image)       # seeded
    assert not torch.equal(a.samples, c.samples)
    assert torch.allclose(a.image, a.samples.mean(0))
    assert all(not mod.training for mod in m.modules())  # dropout switched back off


def test_test_time_dropout_masks_come_from_one_generator_per_slice():
    """generator=[one per slice]: a slice's Monte-Carlo dropout masks (every sample's) come from
    its own generator, so it gets the same samples alone or in a batch; the global RNG is not
    touched."""
    m = tiny(test_time_dropout=True).eval()
    with torch.no_grad():  # larger than the N(0, 0.02) init, so that dropout visibly matters
        for p in m.parameters():
            if p.ndim == 4:
                p.normal_(0.0, 0.15)
    src = torch.cat([batch(0)["source"], batch(1)["source"]])  # 4 slices
    gens = lambda idx: [torch.Generator().manual_seed(50 + i) for i in idx]  # noqa: E731
    state = torch.random.get_rng_state()
    whole = m.translate(src, num_samples=2, generator=gens(range(4))).samples  # (2, 4, 1, 64, 64)
    assert torch.equal(torch.random.get_rng_state(), state)
    split = [m.translate(src[a:b], num_samples=2, generator=gens(range(a, b))).samples for a, b in ((0, 1), (1, 4))]
    torch.testing.assert_close(whole, torch.cat(split, dim=1), rtol=0, atol=1e-5)  # kernel rounding only
    assert (whole[0] - whole[1]).abs().max() > 0.01  # the two samples differ
    alike = lambda: [torch.Generator().manual_seed(7) for _ in range(4)]  # noqa: E731
    same = m.translate(torch.cat([src[:1]] * 4), generator=alike()).image
    torch.testing.assert_close(same, same[:1].expand_as(same), rtol=0, atol=1e-5)  # same seed, same masks
    with pytest.raises(ValueError, match="one per batch element"):
        m.translate(src, generator=gens(range(3)))


# ---- training -------------------------------------------------------------------------------------

def grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_training_parts_are_not_in_state_dict():
    m = tiny()
    parts = m.build_training_parts()
    assert set(parts) == {"discriminator", "gan_loss"}
    assert all(k.startswith("generator.") for k in m.state_dict())
    assert not any(p is q for p in m.parameters() for q in parts.parameters())
    assert m.optimization_phases() == ["discriminator", "generator"]
    g, d = m.phase_parameters("generator", parts), m.phase_parameters("discriminator", parts)
    assert len(g) == len(list(m.parameters())) and len(d) == len(list(parts["discriminator"].parameters()))
    with pytest.raises(ValueError, match="unknown phase 'x'"):
        m.phase_parameters("x", parts)


@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan"])
def test_losses_finite_and_gradients_stay_in_their_phase(gan_mode):
    m = tiny(gan_mode=gan_mode)
    parts = m.build_training_parts()
    b = batch()
    g_params = m.phase_parameters("generator", parts)
    d_params = m.phase_parameters("discriminator", parts)

    losses = m.training_losses(b, parts, "discriminator")
    assert losses["loss"].ndim == 0 and math.isfinite(losses["loss"].item())
    assert {"d_real", "d_fake"} <= set(losses)
    losses["loss"].backward()
    assert all(grads(d_params)) and not any(grads(g_params))

    for p in [*g_params, *d_params]:
        p.grad = None
    losses = m.training_losses(b, parts, "generator")
    assert losses["loss"].ndim == 0 and math.isfinite(losses["loss"].item())
    expected = losses["g_gan"] + m.config.lambda_l1 * losses["g_l1"]
    assert torch.allclose(losses["loss"].detach(), expected)
    losses["loss"].backward()
    assert any(grads(g_params)) and not any(grads(d_params))
    assert all(p.requires_grad for p in d_params)  # D unfrozen again


def test_fake_is_shared_between_phases_of_one_batch():
    m = tiny()
    parts = m.build_training_parts()
    calls = []
    m.generator.register_forward_hook(lambda *_: calls.append(1))
    b = batch()
    m.training_losses(b, parts, "discriminator")
    m.training_losses(b, parts, "generator")["loss"].backward()
    assert len(calls) == 1  # one G(x) for both phases, as in the reference
    m.training_losses(b, parts, "discriminator")
    assert len(calls) == 2  # both phases served: next use recomputes
    with torch.no_grad():  # generator weights change -> cached fake is stale
        next(m.generator.parameters()).add_(0.01)
    m.training_losses(b, parts, "generator")
    assert len(calls) == 3
    m.training_losses(batch(1), parts, "discriminator")  # another batch
    assert len(calls) == 4
    copy.deepcopy(m)  # the cached graph is never copied


def test_fake_recomputed_when_cached_one_has_no_graph():
    m = tiny()
    parts = m.build_training_parts()
    b = batch()
    for p in m.generator.parameters():  # e.g. Lightning's toggle_optimizer during the D phase
        p.requires_grad_(False)
    m.training_losses(b, parts, "discriminator")
    for p in m.generator.parameters():
        p.requires_grad_(True)
    m.training_losses(b, parts, "generator")["loss"].backward()
    assert any(grads(m.generator.parameters()))


def test_overfits_a_fixed_batch():
    m = tiny()
    parts = m.build_training_parts()
    b = batch()
    opts = {ph: torch.optim.Adam(m.phase_parameters(ph, parts), lr=5e-3, betas=(0.5, 0.999))
            for ph in m.optimization_phases()}
    l1 = []
    for _ in range(20):
        for phase in m.optimization_phases():
            opts[phase].zero_grad()
            losses = m.training_losses(b, parts, phase)
            losses["loss"].backward()
            opts[phase].step()
            if phase == "generator":
                l1.append(losses["g_l1"].item())
    assert all(math.isfinite(v) for v in l1)
    assert l1[-1] < 0.7 * l1[0], l1


# ---- shared blocks --------------------------------------------------------------------------------

class _RefBlock(nn.Module):
    """The reference's pre-activation UnetSkipConnectionBlock (batch norm), rewritten for the test."""

    def __init__(self, outer, inner, input_nc=None, sub=None, outermost=False, innermost=False, drop=False):
        super().__init__()
        self.outermost, self.sub = outermost, sub
        down = nn.Conv2d(input_nc or outer, inner, 4, 2, 1, bias=False)
        up = nn.ConvTranspose2d(inner if innermost else 2 * inner, outer, 4, 2, 1, bias=outermost)
        if outermost:
            self.down, self.up = nn.Sequential(down), nn.Sequential(nn.ReLU(), up, nn.Tanh())
        elif innermost:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), down)
            self.up = nn.Sequential(nn.ReLU(), up, nn.BatchNorm2d(outer))
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), down, nn.BatchNorm2d(inner))
            self.up = nn.Sequential(nn.ReLU(), up, nn.BatchNorm2d(outer), *([nn.Dropout(0.5)] if drop else []))

    def forward(self, x):
        h = self.down(x)
        y = self.up(self.sub(h) if self.sub is not None else h)
        return y if self.outermost else torch.cat([x, y], 1)


def test_unet_equals_reference_preactivation_unet():
    ngf, num_downs = 4, 6
    blocks = [_RefBlock(ngf * 8, ngf * 8, innermost=True)]
    for _ in range(num_downs - 5):
        blocks.append(_RefBlock(ngf * 8, ngf * 8, sub=blocks[-1], drop=True))
    for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
        blocks.append(_RefBlock(outer, inner, sub=blocks[-1]))
    blocks.append(_RefBlock(1, ngf, input_nc=1, sub=blocks[-1], outermost=True))
    ref = blocks[-1]
    ours = Pix2PixUNet(1, 1, ngf=ngf, num_downs=num_downs)
    for k, block in enumerate(reversed(blocks)):  # level k = 0 is the outermost
        ours.encoder[k].conv.load_state_dict(block.down[-1 if k == 0 else 1].state_dict())
        ours.decoder[k].conv.load_state_dict(block.up[1].state_dict())
        if 0 < k < num_downs - 1:
            ours.encoder[k].adn.N.load_state_dict(block.down[2].state_dict())
        if k > 0:
            ours.decoder[k].adn.N.load_state_dict(block.up[2].state_dict())
    assert_same_outputs(ours, ref, torch.randn(2, 1, 64, 64), seed=3, atol=1e-6)


def assert_same_outputs(ours, ref, x, *, seed, atol=0.0):
    """``ours(x)`` equals ``ref(x)`` (within ``atol``; 0: bit for bit) in train and in eval mode,
    each drawing its dropout masks from the same seed."""
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        torch.manual_seed(seed)
        expected = ref(x)
        torch.manual_seed(seed)
        got = ours(x)
        assert torch.equal(got, expected) if atol == 0.0 else torch.allclose(got, expected, atol=atol)


def test_patchgan_and_gan_loss():
    assert patchgan_receptive_field(3) == 70 and patchgan_receptive_field(1) == 16
    d = PatchGAN(2, ndf=8, n_layers=3)
    assert d.receptive_field == 70
    assert d(torch.zeros(2, 2, 64, 64)).shape == (2, 1, 6, 6)
    zeros = torch.zeros(2, 1, 4, 4)
    assert GANLoss("vanilla")(zeros, True).item() == pytest.approx(math.log(2))
    assert GANLoss("lsgan")(zeros, True).item() == pytest.approx(1.0)
    assert GANLoss("lsgan")(zeros, False).item() == pytest.approx(0.0)
    assert GANLoss("hinge")(zeros, False).item() == pytest.approx(1.0)
    assert GANLoss("lsgan")([zeros, torch.ones(2, 1, 2, 2)], True).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown GAN mode"):
        GANLoss("wgan")


def test_frozen_context():
    lin = nn.Linear(2, 1)
    x = torch.ones(1, 2, requires_grad=True)
    with frozen(lin):
        y = lin(x).sum()
    assert all(p.requires_grad for p in lin.parameters())
    y.backward()
    assert lin.weight.grad is None and x.grad is not None


# ---- MONAI's Convolution layout without importing MONAI at inference (issue 14) ---------------
@pytest.mark.parametrize("kwargs, monai_kwargs", [
    (dict(kernel_size=4, stride=2, padding=1, act="leaky_relu", bias=False),
     dict(kernel_size=4, strides=2, padding=1, act=("LEAKYRELU", {"negative_slope": 0.2}), norm=None, bias=False)),
    (dict(kernel_size=4, stride=2, padding=1, act="leaky_relu", norm="batch", bias=False),
     dict(kernel_size=4, strides=2, padding=1, act=("LEAKYRELU", {"negative_slope": 0.2}), norm="BATCH", bias=False)),
    (dict(kernel_size=4, stride=2, padding=1),
     dict(kernel_size=4, strides=2, padding=1, conv_only=True)),
    (dict(kernel_size=4, stride=2, padding=1, transposed=True, norm="instance", dropout=0.5, bias=True),
     dict(kernel_size=4, strides=2, padding=1, is_transposed=True, output_padding=0, act=None, norm="INSTANCE",
          dropout=0.5, bias=True)),
    (dict(kernel_size=3, padding=1, norm="batch", act="relu"),
     dict(kernel_size=3, padding=1, act="RELU", norm="BATCH")),
])
def test_conv_norm_act_is_monais_convolution(kwargs, monai_kwargs):
    from monai.networks.blocks import Convolution

    from MedTranslateLib.nn.unet import ConvNormAct

    ours = ConvNormAct(6, 8, **kwargs)
    ref = Convolution(spatial_dims=2, in_channels=6, out_channels=8, **monai_kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    def leaves(module):  # names and layer types (MONAI's ADN container is an nn.Sequential)
        return [(n, type(m)) for n, m in module.named_modules() if not list(m.children())]

    assert leaves(ours) == leaves(ref)
    torch.manual_seed(1)
    for p in ref.parameters():
        p.data.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_outputs(ours, ref, torch.randn(2, 6, 16, 16), seed=2)


def test_init_normal_draws_what_monais_normal_init_draws():
    from monai.networks.utils import normal_init

    from MedTranslateLib.nn import init_normal

    torch.manual_seed(3)
    ours = nn.Sequential(Pix2PixUNet(ngf=4, num_downs=4), nn.BatchNorm2d(4), nn.Linear(4, 2))
    ref = copy.deepcopy(ours)
    torch.manual_seed(4)
    init_normal(ours, std=0.05)
    torch.manual_seed(4)
    ref.apply(lambda m: normal_init(m, std=0.05))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pix2pix_inference_does_not_import_monai():
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from MedTranslateLib import app, io\n"
            "from MedTranslateLib.cases import Case\n"
            "opts = app.TranslationOptions(model='pix2pix_ct_cta_demo', device='cpu', seed=0)\n"
            "vol = io.Volume(np.full((4, 40, 40), -1000.0, np.float32))\n"
            "vol.array[:, 10:30, 10:30] = 40.0\n"
            "out = app.run_translation(app.TranslationRequest(Case('t', vol, {}, None), opts))\n"
            "assert out.result.synthetic.shape == (4, 40, 40)\n"
            "print(sorted(m for m in sys.modules if m == 'monai' or m.startswith('monai.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
