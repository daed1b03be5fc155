"""c2fmit (paper 000): w/o DGB is bbdm bit for bit; an untrained C2FGAM leaves the bridge bbdm's;
each Table 3 switch changes what it names and nothing else; C2FGAM's equations 6-8 and shapes at
every level; eq. 5 and its options; training through the real loop (with the DGB warm-up stage),
engine sampling and the bundle round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from MedTranslateLib.methods import build_method, capabilities_of
from MedTranslateLib.methods.c2fmit import C2FGAM, ECA, C2FCondition, C2FGAMConfig, SpatialAttention

ROOT = Path(__file__).resolve().parents[1]
UNET = {"model_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_levels": [2],
        "num_head_channels": 8, "norm_groups": 4}
TL = {"model_channels": 4, "channel_mult": [1, 2, 4], "num_res_blocks": 1, "num_head_channels": 8,
      "norm_groups": 4}
AE = {"factor": 4, "channels": [4, 8], "num_res_layers": 1, "latent_channels": 2, "num_embeddings": 16}


def build(name: str = "c2fmit", seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = {"unet": UNET, "steps": 4, **kw}
    if name == "c2fmit":
        config["dgb"] = {"unet": TL, **kw.get("dgb", {})}
    return build_method(name, config).eval()


def pair(b: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    source = torch.rand(b, 1, size, size, generator=g) * 1.6 - 0.8
    return source, (source * 0.5 + 0.3).clamp(-1, 1)


def perturb(module: nn.Module, seed: int = 2, scale: float = 0.05) -> None:
    """Random weights everywhere (zero-initialised convs and gates included), BN statistics too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))


def gen(seed: int = 4):
    return torch.Generator().manual_seed(seed)


def loss(m, batch, seed=5, phase="main"):
    torch.manual_seed(seed)
    return m.training_losses(batch, nn.ModuleDict(), phase)


# ---- w/o DGB = bbdm; an untrained C2FGAM leaves the bridge bbdm's ----------------------------

SPACES = {"pixel": ({}, 16), "latent": ({"latent": {"autoencoder": AE, "normalize": True, "stats_batches": 2}}, 32)}


def with_space(m, space: str):
    """Latent space: statistics from two batches (the latents are really standardised)."""
    if space == "latent":
        source, target = pair(4, 32)
        m.prepare_training(iter([{"source": source, "target": target}, {"source": -source, "target": target * 0.5}]))
    return m


@pytest.mark.parametrize("space", SPACES)
def test_without_dgb_is_bbdm_bit_for_bit(space):
    extra, size = SPACES[space]
    bbdm = build("bbdm", **extra)
    m = build(dgb={"enabled": False}, **extra)
    assert m.state_dict().keys() == bbdm.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), bbdm.state_dict().values(), strict=True))
    perturb(bbdm.unet)
    with_space(bbdm, space)
    m.load_state_dict(bbdm.state_dict(), strict=True)
    source, target = pair(3, size)
    for kw in ({}, {"num_samples": 2}, {"shared_noise": True, "steps": 6}):
        a, b = m.translate(source, generator=gen(), **kw), bbdm.translate(source, generator=gen(), **kw)
        assert torch.equal(a.image, b.image), kw
        assert (a.uncertainty is None) == (b.uncertainty is None)
    batch = {"source": source, "target": target}
    la, lb = loss(m.train(), batch), loss(bbdm.train(), batch)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert m.capabilities == bbdm.capabilities


@pytest.mark.parametrize("space", SPACES)
def test_untrained_full_model_denoises_and_samples_as_bbdm(space):
    """Zero gates: the first denoiser output and the whole sample equal bbdm's with the same
    bridge weights, though tl and the C2FGAM modules are random; opening a gate changes both."""
    extra, size = SPACES[space]
    bbdm = build("bbdm", **extra)
    perturb(bbdm.unet)
    with_space(bbdm, space)
    m = build(**extra)
    perturb(m.tl)
    for site in m.fusion_sites():
        module = m.unet.injections[site]
        built = module.gate.detach().clone()
        perturb(module)  # random C2FGAM weights and BN statistics ...
        with torch.no_grad():
            module.gate.copy_(built)  # ... with the gate as built
    missing, unexpected = m.load_state_dict(bbdm.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("tl.", "unet.injections.")) for k in missing)
    source, _ = pair(3, size)
    with torch.no_grad():
        y = m.to_space(source, "source")
        cond = m.prepare_condition(source, y)
        assert isinstance(cond, C2FCondition) and cond.dgb.abs().max() > 0
        assert all(g.abs().max() > 0 for g in cond.guidance.values())
        t = torch.full((3,), 999)
        first = m.denoise({"target": y}, t, cond)["target"]
        ref = bbdm.denoise({"target": y}, t, bbdm.prepare_condition(source, y))["target"]
    assert torch.equal(first, ref) and ref.abs().max() > 0
    assert torch.equal(m.translate(source, generator=gen()).image, bbdm.translate(source, generator=gen()).image)
    with torch.no_grad():
        m.unet.injections["enc1"].gate.fill_(0.5)
        opened = m.denoise({"target": y}, t, cond)["target"]
    assert (opened - ref).abs().max() > 1e-4


# ---- each Table 3 switch changes what it names -----------------------------------------------

def test_fusion_add_keeps_the_projection_and_drops_the_attentions():
    full, add = build(), build(fusion="add")
    attention_parts = (".eca.", ".spatial_p.", ".spatial_d.", ".fuse.")
    dropped = {k for k in full.state_dict() if any(p in k for p in attention_parts)}
    assert dropped and add.state_dict().keys() == full.state_dict().keys() - dropped
    perturb(full)
    add.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped}, strict=True)
    source, _ = pair()
    with torch.no_grad():
        y = full.to_space(source, "source")
        c_full, c_add = full.prepare_condition(source, y), add.prepare_condition(source, y)
        assert torch.equal(c_full.dgb, c_add.dgb)  # the DGB is untouched
        assert all(torch.equal(c_full.guidance[s], c_add.guidance[s]) for s in c_full.guidance)
        _, feats = full.tl(y, return_features=True)  # F_d: tl's decoder features at the site's level
        for site in ("enc0", "enc1", "enc2"):
            assert torch.equal(c_full.guidance[site], full.unet.injections[site].project(feats.dec[int(site[3:])]))
        # at a site: F_p + g ⊙ LeakyReLU(BN(W_d ∗ F_d)), no attention
        f_p = torch.randn(3, 8, 16, 16)
        site = add.unet.injections["enc0"]
        ctx = type("Ctx", (), {"extra": c_add.guidance, "site": "enc0"})()
        assert torch.equal(site(f_p, ctx), f_p + site.gate * c_add.guidance["enc0"])
        assert not torch.allclose(full.unet.injections["enc0"](f_p, ctx), site(f_p, ctx))
        t = torch.full((3,), 500)
        out_add = add.denoise({"target": y}, t, c_add)["target"]
        out_full = full.denoise({"target": y}, t, c_full)["target"]
    assert (out_add - out_full).abs().max() > 1e-5


def test_without_prb_is_the_decoded_translator_and_deterministic(tmp_path):
    full = build()
    m = build(prb={"enabled": False})
    assert m.unet is None and all(k.startswith("tl.") for k in m.state_dict())
    perturb(full.tl)
    m.tl.load_state_dict(full.tl.state_dict(), strict=True)
    source, target = pair()
    out = m.translate(source, generator=gen(1), steps=7, num_samples=3)
    with torch.no_grad():
        expected = full.from_space(full.tl(full.to_space(source, "source")), "target")
    assert torch.equal(out.image, expected) and out.uncertainty is None
    assert torch.equal(out.image, m.translate(source, generator=gen(2)).image)
    caps = capabilities_of("c2fmit", {"prb": {"enabled": False}})
    assert not caps.stochastic and not caps.steps and caps.uncertainty is None
    assert capabilities_of("c2fmit", {}).stochastic
    losses = loss(m.train(), {"source": source, "target": target})
    assert set(losses) == {"loss", "loss_dgb"}
    full_losses = loss(full.train(), {"source": source, "target": target})
    assert torch.equal(losses["loss"].detach(), full_losses["loss_dgb"])


def test_both_branches_off_is_refused():
    with pytest.raises(ValueError, match="cannot both be false") as err:
        build(dgb={"enabled": False}, prb={"enabled": False})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="time_conditioning must be false"):
        build(dgb={"unet": {**TL, "time_conditioning": True}})
    with pytest.raises(ValueError, match="fusion levels must exist"):
        build(c2fgam={"levels": [3]})


# ---- eq. 5 and its options -------------------------------------------------------------------

def test_total_loss_is_prb_plus_lambda_dgb_with_either_reading_of_eq1():
    source, target = pair()
    batch = {"source": source, "target": target}
    for reading in ("target", "source"):
        m = build(dgb={"target": reading, "weight": 0.5})
        perturb(m.tl)
        losses = loss(m.train(), batch)
        with torch.no_grad():
            y = m.to_space(source, "source")
            ref = target if reading == "target" else y  # pixel space: E is the identity
            l_dgb = (m.tl(y) - ref).pow(2).mean()
        assert float(losses["loss_dgb"]) == pytest.approx(float(l_dgb), rel=1e-6)
        assert float(losses["loss"].detach()) == pytest.approx(float(losses["loss_prb"] + 0.5 * l_dgb), rel=1e-6)
        # the bridge's loss is bbdm's at the same t and noise (zero gates)
        bbdm = build("bbdm")
        bbdm.load_state_dict(m.state_dict(), strict=False)
        assert torch.equal(losses["loss_prb"], loss(bbdm.train(), batch)["loss"].detach())


@pytest.mark.parametrize("detach", [False, True])
def test_detach_guidance_keeps_the_bridge_loss_out_of_tl(detach):
    m = build(dgb={"detach_guidance": detach, "weight": 0.0})
    perturb(m.unet)  # open gates: the bridge reads F_d
    source, target = pair()
    loss(m.train(), {"source": source, "target": target})["loss"].backward()
    grads = [p.grad for p in m.tl.parameters() if p.grad is not None and p.grad.abs().max() > 0]
    assert bool(grads) != detach
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.unet.parameters())


def test_dgb_warmup_is_a_stage_that_trains_tl_alone():
    m = build(dgb={"warmup_steps": 3})
    assert m.optimization_phases() == ["dgb", "main"]
    assert [(s.name, s.start, s.phases) for s in m.training_stages()] == [("dgb warm-up", 0, ("dgb",)),
                                                                         ("joint", 3, ("main",))]
    assert {id(p) for p in m.phase_parameters("dgb", nn.ModuleDict())} == {id(p) for p in m.tl.parameters()}
    source, target = pair()
    losses = loss(m.train(), {"source": source, "target": target}, phase="dgb")
    assert set(losses) == {"loss", "loss_dgb"}
    losses["loss"].backward()
    assert all(p.grad is None for p in m.unet.parameters())
    assert build().optimization_phases() == ["main"] and build().training_stages() == []
    with pytest.raises(ValueError, match="unknown phase"):
        build().training_losses({"source": source, "target": target}, nn.ModuleDict(), "dgb")


# ---- C2FGAM: equations 6-8, fusion modes, shapes at every level ------------------------------

def test_c2fgam_computes_equations_6_to_8():
    torch.manual_seed(0)
    cfg = C2FGAMConfig()
    module = C2FGAM(8, 12, cfg).eval()
    perturb(module, scale=0.3)
    f_p, f_d = torch.randn(2, 8, 6, 6), torch.randn(2, 12, 6, 6)
    with torch.no_grad():
        g = module.project(f_d)
        conv, bn = module.project[0], module.project[1]
        ref_g = nn.functional.leaky_relu(bn(conv(f_d)), 0.01)                     # LeakyReLU(BN(W_d ∗ F_d))
        # ECA: GAP -> 1-D conv (k=3, zero-padded) over channels -> σ
        w = module.eca.conv.weight.flatten()
        gap = nn.functional.pad(f_p.mean(dim=(2, 3)), (1, 1))
        eca = torch.sigmoid(w[0] * gap[:, :-2] + w[1] * gap[:, 1:-1] + w[2] * gap[:, 2:])[:, :, None, None]
        f_c1, f_c2 = eca * f_p, ref_g                                                # eq. 6

        def spatial(x, sa):
            return torch.sigmoid(nn.functional.conv2d(torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]],
                                                                1), sa.conv.weight, padding=3))

        f_s = torch.cat([f_c1 * spatial(f_c1, module.spatial_p), f_c2 * spatial(f_c2, module.spatial_d)], 1)  # eq. 7
        refined = nn.functional.leaky_relu(module.fuse(f_s), 0.01)                  # eq. 8
        torch.testing.assert_close(g, ref_g)
        torch.testing.assert_close(module.refine(f_p, g), refined)
        ctx = type("Ctx", (), {"extra": {"enc0": g}, "site": "enc0"})()
        torch.testing.assert_close(module(f_p, ctx), f_p + module.gate * refined)
    assert not torch.equal(module.spatial_p.conv.weight, module.spatial_d.conv.weight)  # separate weights
    literal = C2FGAM(8, 12, cfg, fusion_mode="replace").eval()
    literal.load_state_dict({k: v for k, v in module.state_dict().items() if k != "gate"}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(literal(f_p, ctx), refined)                      # eq. 8 replaces F_p
    assert ECA()(f_p).shape == (2, 8, 1, 1) and SpatialAttention()(f_p).shape == (2, 1, 6, 6)


@pytest.mark.parametrize("sites", ["encoder", "decoder", "both"])
def test_c2fgam_shapes_at_every_level(sites):
    m = build(c2fgam={"sites": sites})
    kinds = {"encoder": ["enc"], "decoder": ["dec"], "both": ["enc", "dec"]}[sites]
    assert sorted(m.unet.injections) == sorted(f"{k}{lv}" for k in kinds for lv in range(3))
    seen = {}

    def hook(module, args, output):
        f_p, ctx = args
        seen[ctx.site] = (tuple(f_p.shape), tuple(ctx.extra[ctx.site].shape), tuple(output.shape))

    for module in m.unet.injections.values():
        module.register_forward_hook(hook)
    m.translate(pair(2, 32)[0], steps=3, generator=gen())
    widths = [8, 16, 16]
    for site, (f_p, g, out) in seen.items():
        lv = int(site[3:])
        assert f_p == g == out == (2, widths[lv], 32 >> lv, 32 >> lv), site
    assert len(seen) == len(m.unet.injections)


# ---- configs: the "w/o DGB" row of each shipped c2fmit config is a shipped bbdm config ---------

@pytest.mark.parametrize(("c2fmit", "bbdm"), [("c2fmit.yaml", "bbdm_f8.yaml"), ("demo/c2fmit.yaml", "demo/bbdm_latent.yaml")])
def test_shipped_config_is_its_bbdm_config_plus_the_guidance(c2fmit, bbdm):
    """Same bridge, autoencoder, data, optimiser and schedule: Table 3's rows differ only in the
    c2fmit keys (the training loop then gives bbdm bit for bit with dgb.enabled: false)."""
    import yaml

    configs = ROOT / "training" / "configs"
    a, b = (yaml.safe_load((configs / name).read_text()) for name in (c2fmit, bbdm))
    assert a["method"] == "c2fmit" and b["method"] == "bbdm"
    own = {"dgb", "prb", "fusion", "fusion_mode", "c2fgam"}
    assert {k: v for k, v in a["model"].items() if k not in own} == b["model"]
    assert a["data"] == b["data"] and a["optim"] == b["optim"]
    assert {**a["train"], "out_dir": None} == {**b["train"], "out_dir": None}


# ---- latent space, the training loop, the engine, bundles ------------------------------------

@pytest.fixture(scope="module")
def ae_bundle(tmp_path_factory) -> Path:
    from MedTranslateLib.bundle import save_bundle

    torch.manual_seed(3)
    ae = build_method("autoencoder", {**AE, "discriminator": {"ndf": 4, "n_layers": 1}})
    perturb(ae, scale=0.01)
    return save_bundle(ae.eval(), {"method": "autoencoder"}, tmp_path_factory.mktemp("ae") / "bundle")


def test_latent_bundle_round_trip(ae_bundle, tmp_path):
    from MedTranslateLib.bundle import load_bundle, save_bundle

    meta = {"source": {"modality": "ct", "preset": "ct_abdomen"},
            "target": {"modality": "cta_arterial", "preset": "ct_angio"}, "slice": {"size": 32, "axis": 0}}
    source, target = pair(2, 32)
    for i, extra in enumerate(({}, {"prb": {"enabled": False}}, {"fusion": "add", "c2fgam": {"sites": "both"}})):
        torch.manual_seed(0)
        m = build_method("c2fmit", {"unet": UNET, "dgb": {"unet": TL}, "steps": 3,
                                    "latent": {"autoencoder_bundle": str(ae_bundle), "stats_batches": 1}, **extra},
                         pretrained={"autoencoder": load_bundle(ae_bundle).method})
        m.prepare_training(iter([{"source": source, "target": target}]))
        perturb(m.tl)
        if m.unet is not None:
            perturb(m.unet)
        m.eval()
        path = save_bundle(m, meta, tmp_path / f"bundle{i}")
        bundle = load_bundle(path)
        again = bundle.method
        assert bundle.meta.capabilities["stochastic"] == (m.unet is not None)
        assert again.state_dict().keys() == m.state_dict().keys()
        a = again.translate(source, generator=gen(), num_samples=2)
        b = m.translate(source, generator=gen(), num_samples=2)
        assert torch.equal(a.image, b.image) and a.image.shape == (2, 1, 32, 32)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 48, 48)))
    return root


def test_smoke_config_trains_with_the_warmup_stage_and_the_engine_samples_it(ae_bundle, phantom_root, tmp_path):
    from MedTranslateLib import engine
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.io import read_volume
    from MedTranslateLib.training import fit, load_train_config

    flow = lambda d: str(d).replace("'", "")  # noqa: E731  (a YAML flow mapping)
    cfg = load_train_config(ROOT / "training" / "configs" / "smoke" / "c2fmit.yaml", [
        f"data.root={phantom_root}", f"train.out_dir={tmp_path / 'run'}", "data.size=32", "train.max_steps=4",
        "train.val_every=4", "train.val_batches=1", "train.log_every=1", "train.progress_bar=false",
        f"model.latent.autoencoder_bundle={ae_bundle}", "model.latent.stats_batches=1",
        f"model.unet={flow(UNET)}", f"model.dgb.unet={flow(TL)}", "model.dgb.warmup_steps=2"])
    bundle = load_bundle(fit(cfg))
    m = bundle.method
    assert bundle.meta.method == "c2fmit" and m.tl is not None and m.config.dgb.warmup_steps == 2
    assert bundle.meta.metrics["validation"]["val/mae"] > 0
    assert any(float(mod.gate.abs().max()) > 0 for mod in m.unet.injections.values())  # the joint stage ran
    with open(next((tmp_path / "run" / "logs").glob("version_*")) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ran = lambda key: sorted(int(r["step"]) for r in rows if r.get(key) and np.isfinite(float(r[key])))  # noqa: E731
    dgb_steps, joint_steps = ran("train/dgb/loss_dgb"), ran("train/main/loss_prb")
    assert dgb_steps and joint_steps and max(dgb_steps) < min(joint_steps)  # warm-up first, then joint
    vol = read_volume(phantom_root / "case_000" / "ct.nii.gz")
    tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=4, shared_noise=True)
    res = tr.translate(vol, seed=2, steps=3, num_samples=2, slice_range=(3, 6))
    again = tr.translate(vol, seed=2, steps=3, num_samples=2, slice_range=(3, 6))
    assert res.synthetic.same_geometry(vol, atol=0) and res.uncertainty is not None
    assert np.array_equal(res.synthetic.array, again.synthetic.array) and np.isfinite(res.synthetic.array).all()
