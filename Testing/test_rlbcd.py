"""rlbcd (papers/001): without its novelty it is bbdm bit for bit; SAM (eqs. 7-8) and CMA (eqs.
9-10) compute what the paper writes, CMA starts as the identity; the residual U-Net runs first and
feeds the enhanced one; H_E is pretrained alone then frozen while eq. 11's gradient reaches the
U-Nets; best-of-N picks the sample with the highest LCS, confidence in [0, 1]; presets; the
ablation rows; smoke training, the engine and bundles."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from MedTranslateLib.methods import build_method
from MedTranslateLib.methods import rlbcd as rlbcd_module  # registers "rlbcd"
from MedTranslateLib.methods.diffusion_common import SampleResult
from MedTranslateLib.nn.diffusion_unet import InjectionContext, UNetFeatures

RLBCD = rlbcd_module.RLBCD
ROOT = Path(__file__).resolve().parents[1]
UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "num_head_channels": 8, "norm_groups": 4}
FULL = {"unet": UNET, "steps": 4, "sam": {"levels": [0, 1]}, "cma": {"levels": [0, 1], "num_head_channels": 4},
        "lcs": {"pretrain_steps": 2, "channels": 8}}
#: every novelty off: the residual branch, SAM, CMA and H_E
AS_BBDM = {"branches": "enhanced", "sam": {"mode": "none"}, "cma": {"mode": "none"}, "lcs": {"enabled": False},
           "select": "mean"}
TINY_AE = {"factor": 4, "channels": [4, 8], "num_res_layers": 1, "latent_channels": 2, "num_embeddings": 16}
TINY_AE_RES = {**TINY_AE, "domains": ["source", "target", "residual"]}


def merged(base: dict, **kw) -> dict:
    out = copy.deepcopy(base)
    for k, v in kw.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def rl(**kw) -> RLBCD:
    torch.manual_seed(0)
    return build_method("rlbcd", merged(FULL, **kw)).eval()


def pair(b: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    source = torch.rand(b, 1, size, size, generator=g) * 1.6 - 0.8
    return source, (source * 0.5 + 0.3).clamp(-1, 1)


def gens(n: int, seed: int = 10):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def perturb_outputs(m: RLBCD, std: float = 0.05) -> None:
    """Zero-initialised output convs make every sample x_T; perturbed, the noise matters."""
    torch.manual_seed(1)
    for unet in (m.unet, m.residual_unet):
        if unet is not None:
            nn.init.normal_(unet.out[-1].weight, std=std)


# ---- ablation: without the residual branch, SAM, CMA and LCS rlbcd is bbdm ----------------------

@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_without_its_novelty_rlbcd_is_bbdm_bit_for_bit(space):
    base = {"unet": UNET, "steps": 4}
    size = 16
    if space == "latent":
        base["latent"] = {"autoencoder": TINY_AE_RES, "normalize": True, "stats_batches": 2}
        size = 32
    torch.manual_seed(0)
    bbdm = build_method("bbdm", base).eval()
    nn.init.normal_(bbdm.unet.out[-1].weight, std=0.05)
    source, target = pair(2, size)
    if space == "latent":
        bbdm.prepare_training(iter([{"source": source, "target": target}, {"source": -source, "target": target}]))
    torch.manual_seed(7)  # other initial weights: everything must come from bbdm's state
    m = build_method("rlbcd", {**base, **AS_BBDM}).eval()
    assert sorted(m.state_dict()) == sorted(bbdm.state_dict())
    m.load_state_dict(bbdm.state_dict(), strict=True)
    for n in (1, 3):
        a = bbdm.translate(source, generator=gens(2), num_samples=n)
        b = m.translate(source, generator=gens(2), num_samples=n)
        assert torch.equal(a.image, b.image)
        assert b.confidence is None
        if n > 1:
            assert torch.equal(a.uncertainty, b.uncertainty) and torch.equal(a.samples, b.samples)
    assert (a.samples[0] - a.samples[1]).abs().max() > 1e-4  # the noise matters: a real check
    bbdm.train(), m.train()
    batch = {"source": source, "target": target}
    torch.manual_seed(5)
    la = bbdm.training_losses(batch, nn.ModuleDict(), "main")
    torch.manual_seed(5)
    lb = m.training_losses(batch, nn.ModuleDict(), "main")
    assert set(la) == set(lb) and all(torch.equal(la[k], lb[k]) for k in la)
    assert m.optimization_phases() == ["main"] and m.training_stages() == []
    assert not m.capabilities.confidence and m.capabilities == bbdm.capabilities


def test_ablation_configs_are_refused_when_inconsistent():
    for cfg, match in [({"branches": "enhanced"}, "set sam.mode: none"),
                       ({"lcs": {"enabled": False}}, "select: lcs needs lcs.enabled"),
                       ({"residual_space": "latent_difference"}, "needs a latent space"),
                       ({"sam": {"levels": [0, 2]}}, r"sam.levels \[2\] out of range"),
                       ({"lcs": {"pretrain_steps": 0}}, "pretrain_steps must be >= 1")]:
        with pytest.raises(ValueError, match=match) as err:
            rl(**cfg)
        assert "\n" not in str(err.value)


TABLE_2 = {"w/o SAM": {"sam": {"mode": "add"}}, "w/o CMA": {"cma": {"mode": "add"}},
           "w/o HGF": {"sam": {"mode": "add"}, "cma": {"mode": "add"}}, "w/o LCS": {"lcs": {"weight": 0.0}},
           "w/o RDB": AS_BBDM, "w/o EDB": {**AS_BBDM, "branches": "residual"},
           "CMA literal": {"cma": {"output": "literal"}}, "H_E without L_Res": {"lcs": {"zero_residual": True}}}


@pytest.mark.parametrize("row", list(TABLE_2))
def test_every_ablation_row_trains_and_translates(row):
    m = rl(**TABLE_2[row]).train()
    perturb_outputs(m)
    source, target = pair(2)
    for phase in m.optimization_phases():
        loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), phase)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    out = m.eval().translate(source, num_samples=2, generator=gens(2))
    assert out.image.shape == source.shape and torch.isfinite(out.image).all()
    assert (out.confidence is not None) == (m.fusion is not None)


# ---- SAM and CMA --------------------------------------------------------------------------------

def ctx(level: int, **feats) -> InjectionContext:
    return InjectionContext(emb=None, timesteps=None, site="", level=level, extra=UNetFeatures(**feats))


def test_sam_is_eqs_7_and_8():
    torch.manual_seed(0)
    sam = rlbcd_module.SemanticAlignment(4)
    f_e, f_re = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    out = sam(f_e, ctx(1, enc=[torch.zeros(1), f_re]))
    z = sam.c3.weight[:, :, 0, 0] @ (sam.c1.weight[:, :, 0, 0] @ f_re.flatten(2) + sam.c1.bias[:, None]
                                     + sam.c2.weight[:, :, 0, 0] @ f_e.flatten(2) + sam.c2.bias[:, None])
    a = torch.sigmoid((z + sam.c3.bias[:, None]).mean(-1))[..., None, None]  # eq. 7, P = global average
    torch.testing.assert_close(out, f_e * a + f_re * (1 - a))                 # eq. 8
    assert sam.alignment(f_e, f_re).shape == (2, 4, 1, 1)
    lo, hi = torch.minimum(f_e, f_re), torch.maximum(f_e, f_re)
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()  # a per-channel convex combination
    per_pixel = rlbcd_module.SemanticAlignment(4, pool="none")
    assert per_pixel.alignment(f_e, f_re).shape == (2, 4, 6, 6)
    add = rlbcd_module.SemanticAlignment(4, mode="add")
    assert torch.equal(add(f_e, ctx(0, enc=[f_re])), f_e + f_re) and not list(add.parameters())  # w/o SAM


def test_cma_starts_as_the_identity_and_is_cross_attention():
    torch.manual_seed(0)
    cma = rlbcd_module.ComplementaryAttention(8, head_channels=4, groups=4)
    f_d, f_rd = torch.randn(2, 8, 4, 6), torch.randn(2, 8, 4, 6)
    assert torch.equal(cma(f_d, ctx(0, dec=[f_rd])), f_d)  # zero-initialised output projection
    nn.init.normal_(cma.proj.weight, std=0.3)
    out = cma(f_d, ctx(0, dec=[f_rd]))
    assert out.shape == f_d.shape and not torch.allclose(out, f_d)
    assert not torch.allclose(cma(f_d, ctx(0, dec=[f_rd + 1.0 * torch.randn_like(f_rd)])), out)  # reads F_rd
    # eqs. 9-10 by hand: 2 heads of d = 4 channels, queries from F_d, keys and values from F_rd
    lit = rlbcd_module.ComplementaryAttention(8, head_channels=4, groups=4, output="literal")
    q = lit.q(f_d).reshape(2, 2, 4, 24).transpose(-1, -2)
    k = lit.k(f_rd).reshape(2, 2, 4, 24).transpose(-1, -2)
    v = lit.v(f_rd).reshape(2, 2, 4, 24).transpose(-1, -2)
    av = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v
    torch.testing.assert_close(lit(f_d, ctx(0, dec=[f_rd])), av.transpose(-1, -2).reshape(2, 8, 4, 6))
    add = rlbcd_module.ComplementaryAttention(8, 4, 4, mode="add")
    assert torch.equal(add(f_d, ctx(0, dec=[f_rd])), f_d + f_rd)  # w/o CMA


def test_sam_and_cma_sit_in_the_enhanced_unet_and_read_the_residual_unet():
    m = rl()
    assert set(m.unet.injections) == {"enc0", "enc1", "dec0", "dec1"} and not m.residual_unet.injections
    assert isinstance(m.unet.injections["enc1"], rlbcd_module.SemanticAlignment)
    assert isinstance(m.unet.injections["dec0"], rlbcd_module.ComplementaryAttention)
    assert m.unet.injections["dec1"].heads == 4  # 16 channels / 4 per head
    calls = []
    m.residual_unet.register_forward_hook(lambda mod, args, out: calls.append(("residual", args[1], out[1])))
    for site, inj in m.unet.injections.items():
        inj.register_forward_hook(lambda mod, args, out, site=site: calls.append((site, args[1].timesteps,
                                                                                   args[1].extra)))
    source = pair(2)[0]
    x = {"target": source + 0.1, "residual": source - 0.1}
    t = torch.tensor([500, 500])
    out = m.denoise(x, t, m.prepare_condition(source, source))
    assert [c[0] for c in calls] == ["residual", "enc0", "enc1", "dec1", "dec0"]  # residual U-Net first
    feats = calls[0][2]
    assert all(c[2] is feats and torch.equal(c[1], t) for c in calls[1:])  # same t, its features
    # the enhanced output depends on the residual branch's x_t (through SAM), the residual's not on x_target
    perturb_outputs(m)
    out = m.denoise(x, t, m.prepare_condition(source, source))
    again = m.denoise({"target": x["target"], "residual": x["residual"] + 0.5}, t, m.prepare_condition(source, source))
    assert not torch.allclose(out["target"], again["target"])
    other = m.denoise({"target": x["target"] + 0.5, "residual": x["residual"]}, t, m.prepare_condition(source, source))
    assert torch.equal(other["residual"], out["residual"])


# ---- training: H_E pretrained alone, then frozen; eq. 11 reaches the U-Nets ----------------------

def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_stages_pretrain_h_e_alone_then_freeze_it():
    from MedTranslateLib.training.module import StagePlan

    m = rl().train()
    perturb_outputs(m)
    plan = StagePlan(m)
    assert m.optimization_phases() == ["fusion", "main"]
    assert [plan.phases_at(s) for s in range(4)] == [["fusion"], ["fusion"], ["main"], ["main"]]
    params = {p: m.phase_parameters(p, nn.ModuleDict()) for p in m.optimization_phases()}
    ids = {p: {id(q) for q in v} for p, v in params.items()}
    assert ids["fusion"] == {id(q) for q in m.fusion.parameters()} and not ids["fusion"] & ids["main"]
    assert {id(q) for q in m.residual_unet.parameters()} <= ids["main"]
    assert {id(q) for q in m.unet.injections.parameters()} <= ids["main"]
    opts = {p: torch.optim.Adam(v, lr=1e-3) for p, v in params.items()}
    source, target = pair(4)
    batch = {"source": source, "target": target}
    unets = {"unet": snapshot(m.unet), "residual": snapshot(m.residual_unet)}
    fusion0 = snapshot(m.fusion)
    torch.manual_seed(2)
    for step in range(4):
        if step == 2:  # stage 1 done: only H_E moved
            assert changed(fusion0, m.fusion) and not changed(unets["unet"], m.unet)
            assert not changed(unets["residual"], m.residual_unet) and int(m.lcs_ref_batches) == 0
            fusion1 = snapshot(m.fusion)
            opts["fusion"].zero_grad(set_to_none=True)
        for phase in plan.phases_at(step):
            losses = m.training_losses(batch, nn.ModuleDict(), phase)
            opts[phase].zero_grad()
            losses["loss"].backward()
            opts[phase].step()
    assert set(losses) >= {"loss", "loss_residual", "loss_lcs", "lcs_mse_ref"}
    assert not changed(fusion1, m.fusion)  # frozen in stage 2 ...
    assert all(p.grad is None for p in m.fusion.parameters())  # ... and out of the graph
    assert changed(unets["unet"], m.unet) and changed(unets["residual"], m.residual_unet)
    # MSE_ref: the running mean of H_E's error on the clean latents of the two main steps
    assert int(m.lcs_ref_batches) == 2 and 0 < float(m.lcs_mse_ref) != 1.0


def test_pretraining_fits_h_e_on_clean_latents():
    m = rl(lcs={"channels": 16}).train()
    source, target = pair(4)
    opt = torch.optim.Adam(m.phase_parameters("fusion", nn.ModuleDict()), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "fusion")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3])
    # the target is L_A: with L_B and L_Res exact, target - 2 residual = source (here in pixel space)
    residual = (target - source) / 2
    assert float(m.consistency_mse(target, residual, source).mean().detach()) == pytest.approx(np.mean(losses[-1:]), rel=0.5)


def test_eq_11_gradient_reaches_the_unets_with_its_weight():
    def grads(weight: float):
        m = rl(lcs={"weight": weight}).train()
        perturb_outputs(m)
        torch.manual_seed(3)
        losses = m.training_losses(dict(zip(("source", "target"), pair(2), strict=True)), nn.ModuleDict(), "main")
        losses["loss"].backward()
        return losses, m.residual_unet.out[-1].weight.grad.clone()

    (l1, g1), (l0, g0) = grads(1.0), grads(0.0)
    assert float(l1["loss"] - l0["loss"]) == pytest.approx(float(l1["loss_lcs"]), rel=1e-5)
    assert float(l1["loss_lcs"]) > 0 and not torch.allclose(g1, g0)  # w/o LCS trains without eq. 11


def test_zero_residual_control_ignores_the_residual():
    m = rl(lcs={"zero_residual": True})
    a, b = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    assert torch.equal(m.fuse(a, b), m.fuse(a, torch.zeros_like(b)))
    assert not torch.equal(rl().fuse(a, b), rl().fuse(a, torch.zeros_like(b)))


# ---- inference: best of N by LCS, confidence, uncertainty ----------------------------------------

def capture(m: RLBCD) -> list:
    seen = []
    combine = m.combine_samples

    def spy(results, y, cond):
        seen.append((results, y))
        return combine(results, y, cond)

    m.combine_samples = spy
    return seen


def scored_translate():
    """A perturbed rlbcd translating 3 slices with 4 samples: (method, source, translation, the
    samples ``combine_samples`` saw, its y)."""
    m = rl()
    perturb_outputs(m, std=0.3)
    m.lcs_mse_ref.fill_(0.05)
    seen = capture(m)
    source = pair(3)[0]
    out = m.translate(source, generator=gens(3), num_samples=4)
    (results, y), = seen
    return m, source, out, results, y


def test_best_of_n_is_the_sample_with_the_highest_lcs():
    m, source, out, results, y = scored_translate()
    mse = m.sample_consistency(results, y)                              # (N, B) = -LCS
    assert mse.shape == (4, 3) and (mse.max(0).values - mse.min(0).values).min() > 1e-6
    best = mse.argmin(0)
    for b in range(3):
        assert torch.equal(out.image[b], out.samples[best[b], b])
    torch.testing.assert_close(out.confidence, torch.exp(-mse.min(0).values / 0.05))
    assert out.confidence.shape == (3,) and ((out.confidence >= 0) & (out.confidence <= 1)).all()
    assert torch.allclose(out.uncertainty, out.samples.std(0)) and out.uncertainty.mean() > 0
    # the scores follow the samples: a sample's LCS is H_E on its own two branch end points
    r = results[int(best[0])]
    assert torch.equal(mse[best[0], 0], m.consistency_mse(r.sample, r.aux["residual"], y)[0])
    m.config.select = "first"
    first = m.translate(source, generator=gens(3), num_samples=4)
    assert torch.equal(first.image, out.samples[0]) and torch.equal(first.samples, out.samples)
    torch.testing.assert_close(first.confidence, torch.exp(-mse[0] / 0.05))
    m.config.select = "mean"
    mean = m.translate(source, generator=gens(3), num_samples=4)
    torch.testing.assert_close(mean.image, out.samples.mean(0))
    torch.testing.assert_close(mean.confidence, torch.exp(-mse / 0.05).mean(0))
    one = m.translate(source, generator=gens(3))  # one sample: its confidence still
    assert one.confidence.shape == (3,) and one.uncertainty is None
    assert m.capabilities.confidence and m.capabilities.uncertainty == "std"


def test_a_slices_choice_and_confidence_do_not_depend_on_its_batch():
    """One generator per slice (the engine's form): the samples, the LCS choice and the
    confidence of a slice are what it gets alone (up to CPU kernel rounding)."""
    m = rl()
    perturb_outputs(m, std=0.3)
    source = pair(4)[0]
    whole = m.translate(source, generator=gens(4), num_samples=3)
    split = [m.translate(source[a:b], generator=gens(b - a, 10 + a), num_samples=3) for a, b in ((0, 1), (1, 4))]
    torch.testing.assert_close(whole.image, torch.cat([s.image for s in split]), rtol=0, atol=1e-5)
    torch.testing.assert_close(whole.confidence, torch.cat([s.confidence for s in split]), rtol=0, atol=1e-5)


def test_without_the_enhanced_branch_the_output_is_source_plus_twice_the_residual():
    m = rl(branches="residual", sam={"mode": "none"}, cma={"mode": "none"}, lcs={"enabled": False}, select="mean")
    assert m.residual_unet is None and m.fusion is None and m.branches == ("residual",)
    source, target = pair()
    residual = (target - source) / 2
    m.denoise = lambda x, t, cond: {"residual": x["residual"] - residual}  # a perfect 'grad' denoiser
    out = m.translate(source, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.image, target, rtol=0, atol=1e-5)  # I_A + 2 D(L_Res)


def test_residual_branch_lands_on_the_residual_with_perfect_denoisers():
    m = rl()
    source, target = pair()
    residual = (target - source) / 2
    m.denoise = lambda x, t, cond: {"target": x["target"] - target, "residual": x["residual"] - residual}
    res = m.sample(source, m.prepare_condition(source, source), 6, torch.randn_like)
    assert isinstance(res, SampleResult)
    torch.testing.assert_close(res.sample, target, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.aux["residual"], residual, rtol=0, atol=1e-5)


# ---- presets and the residual space -------------------------------------------------------------

def test_different_presets_are_refused_unless_the_residual_is_a_latent_difference():
    RLBCD.check_presets({}, "ct_angio", "ct_angio")
    RLBCD.check_presets({}, "ct_angio", {"kind": "ct_window", "level": 200, "width": 1000})  # the same window
    with pytest.raises(ValueError, match="needs one intensity preset") as err:
        RLBCD.check_presets({}, "ct_abdomen", "ct_angio")
    assert "\n" not in str(err.value)
    latent = {"autoencoder": TINY_AE}
    RLBCD.check_presets({"latent": latent, "residual_space": "latent_difference"}, "ct_abdomen", "ct_angio")
    RLBCD.check_presets(AS_BBDM, "ct_abdomen", "ct_angio")  # no residual: bbdm


def test_the_residual_latent_needs_an_autoencoder_trained_on_residuals():
    with pytest.raises(ValueError, match=r"not trained on the residual domain.*residual_space: latent_difference"):
        rl(latent={"autoencoder": TINY_AE})
    rl(latent={"autoencoder": TINY_AE_RES})


def test_latent_difference_diffuses_e_b_minus_e_a():
    m = rl(latent={"autoencoder": TINY_AE, "stats_batches": 2}, residual_space="latent_difference")
    source, target = pair(4, 32)
    batches = [{"source": source[:2], "target": target[:2]}, {"source": source[2:], "target": target[2:]}]
    m.prepare_training(iter(batches))
    diff = m.autoencoder.encode(target) - m.autoencoder.encode(source)
    torch.testing.assert_close(m.residual_mean.flatten(), diff.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(m.residual_std.flatten(), diff.std(dim=(0, 2, 3), correction=0))
    z = m.branch_latent({"source": source, "target": target}, "residual")
    torch.testing.assert_close(z, (diff - m.residual_mean) / m.residual_std)
    out = m.translate(source, num_samples=2, generator=gens(4))
    assert out.image.shape == (4, 1, 32, 32) and out.confidence.shape == (4,)


# ---- end to end: smoke config, the engine, bundles -----------------------------------------------

META = {"source": {"modality": "ct", "preset": "ct_angio"}, "target": {"modality": "cta_arterial", "preset": "ct_angio"},
        "slice": {"size": 16, "axis": 0}}


def test_bundle_round_trip_keeps_every_part_and_the_confidence_scale(tmp_path):
    from MedTranslateLib.bundle import load_bundle, save_bundle

    m = rl()
    perturb_outputs(m, std=0.3)
    nn.init.normal_(m.unet.injections["dec0"].proj.weight, std=0.1)
    m.lcs_mse_ref.fill_(0.25)
    path = save_bundle(m, META, tmp_path / "b")
    again = load_bundle(path).method
    assert isinstance(again, RLBCD) and again.lcs_mse_ref == 0.25
    keys = set(again.state_dict())
    assert {"lcs_mse_ref", "fusion.0.weight", "residual_unet.out.2.weight", "unet.injections.enc0.c1.weight",
            "unet.injections.dec0.proj.weight"} <= keys
    source = pair(2)[0]
    a = m.translate(source, generator=gens(2), num_samples=3)
    b = again.translate(source, generator=gens(2), num_samples=3)
    assert torch.equal(a.image, b.image) and torch.equal(a.confidence, b.confidence)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 48, 48)))
    return root


def test_smoke_config_trains_both_stages_and_the_engine_gives_confidence(phantom_root, tmp_path):
    from MedTranslateLib import engine
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.io import read_volume
    from MedTranslateLib.training import fit, load_train_config

    cfg = load_train_config(ROOT / "training" / "configs" / "smoke" / "rlbcd.yaml", [
        f"data.root={phantom_root}", f"train.out_dir={tmp_path / 'run'}", "data.size=32", "train.max_steps=4",
        "model.lcs.pretrain_steps=2", "train.val_every=4", "train.val_batches=1", "train.log_every=1",
        "train.progress_bar=false", "model.unet.model_channels=8", "model.unet.norm_groups=4",
        "model.cma.num_head_channels=8", "model.lcs.channels=8"])
    RLBCD.check_presets(cfg.model, cfg.data.source_preset, cfg.data.target_preset)
    bundle = load_bundle(fit(cfg))
    m = bundle.method
    assert bundle.meta.method == "rlbcd" and isinstance(m, RLBCD)
    assert int(m.lcs_ref_batches) == 2 and float(m.lcs_mse_ref) != 1.0  # measured in the 2 main steps
    log = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text()
    assert "train/fusion/loss" in log and "train/main/loss_lcs" in log
    vol = read_volume(phantom_root / "case_000" / "ct.nii.gz")
    tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=4)
    res = tr.translate(vol, seed=2, steps=3, num_samples=2, slice_range=(3, 6))
    conf = res.confidence
    assert conf.shape == (vol.array.shape[0],) and np.isfinite(conf[3:6]).all()
    assert ((conf[3:6] >= 0) & (conf[3:6] <= 1)).all() and np.isnan(conf[:3]).all()
    assert res.uncertainty is not None and np.isfinite(res.synthetic.array).all()


def test_every_sample_is_scored_for_per_volume_selection():
    m, source, out, results, y = scored_translate()
    conf_k = torch.exp(-m.sample_consistency(results, y) / 0.05)       # (N, B)
    torch.testing.assert_close(out.sample_confidence, conf_k)
    best = out.sample_confidence.argmax(0)
    assert torch.equal(out.confidence, out.sample_confidence[best, torch.arange(3)])
    one = m.translate(source, generator=gens(3))
    assert one.sample_confidence.shape == (1, 3) and torch.equal(one.sample_confidence[0], one.confidence)
    without = rl(branches="enhanced", sam={"mode": "none"}, cma={"mode": "none"}, lcs={"enabled": False},
                 select="mean").translate(source, generator=gens(3), num_samples=2)
    assert without.sample_confidence is None and without.confidence is None


def test_only_rlbcd_with_its_lcs_declares_that_it_scores_every_sample():
    """``Capabilities.sample_confidence`` (what the engine's per-volume choice and the Slicer
    panel's sample choice ask): rlbcd with H_E (its LCS) has it, without H_E and every other
    method not; a method's confidence alone is not enough."""
    from MedTranslateLib.methods import available_methods, capabilities_of, get_method_class

    assert capabilities_of("rlbcd", merged(FULL)).sample_confidence
    assert rl().capabilities.sample_confidence and rl().capabilities.to_dict()["sample_confidence"] is True
    without = capabilities_of("rlbcd", merged(FULL, **AS_BBDM))
    assert not without.sample_confidence and not without.confidence
    others = [n for n in available_methods() if n != "rlbcd"]
    assert others
    for name in others:
        cls = get_method_class(name)
        caps = cls.capabilities_for(cls.Config())
        assert not caps.sample_confidence and caps.to_dict()["sample_confidence"] is False, name
