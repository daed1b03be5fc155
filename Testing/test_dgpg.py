"""dgpg (paper 003) and its cyclegan baseline: networks, GGD loss, ROI discriminators, progressive
stages (also through the training loop), bundles, and uncertainty that tracks the error."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from MedTranslateLib.methods import available_methods, build_method, get_method_class
from MedTranslateLib.methods.cyclegan import CycleGAN
from MedTranslateLib.methods.dgpg import DGPG, ggd_loss, ggd_variance
from MedTranslateLib.nn import ResUNet

ROOT = Path(__file__).resolve().parents[1]
TINY = {"generator": {"ngf": 4, "depth": 2}, "discriminator": {"ndf": 4, "n_layers": 1}}
SIZE = 32


def tiny(name: str = "dgpg", **overrides):
    torch.manual_seed(0)
    return build_method(name, {**TINY, **overrides})


def unpaired_batch(b: int = 3, seed: int = 0) -> dict:
    """Random slices; liver/tumour boxes; sample 0 has no tumour on either side."""
    g = torch.Generator().manual_seed(seed)
    batch = {"source": torch.rand(b, 1, SIZE, SIZE, generator=g) * 2 - 1,
             "target": torch.rand(b, 1, SIZE, SIZE, generator=g) * 2 - 1}
    for side, shift in (("source", 0), ("target", 3)):
        liver = torch.zeros(b, 1, SIZE, SIZE)
        liver[..., 4 + shift:24 + shift, 6:26] = 1
        tumor = torch.zeros(b, 1, SIZE, SIZE)
        tumor[1:, :, 10 + shift:16 + shift, 12:18] = 1
        batch[f"{side}_liver"], batch[f"{side}_tumor"] = liver, tumor
    return batch


# ---- registry and contract ----------------------------------------------------------------------

def test_registered_with_the_contract_flags():
    assert {"dgpg", "cyclegan"} <= set(available_methods())
    assert get_method_class("dgpg") is DGPG and issubclass(DGPG, CycleGAN)
    assert not DGPG.paired and not CycleGAN.paired
    assert DGPG.uses_masks and not CycleGAN.uses_masks
    assert DGPG.uncertainty_kind == "variance" and CycleGAN.uncertainty_kind is None
    assert tiny().optimization_phases() == ["generator", "discriminator"]


def test_config_errors():
    with pytest.raises(ValueError, match="liver_start <= tumor_start"):
        tiny(progressive={"liver_start": 5, "tumor_start": 2})
    with pytest.raises(ValueError, match="in_channels must be 1"):
        tiny(in_channels=2)
    with pytest.raises(ValueError, match=r"unknown key 'roi\.inputs'"):
        tiny(roi={"inputs": "masked"})
    with pytest.raises(ValueError, match="expected one of"):
        tiny(roi={"input": "crop"})
    with pytest.raises(ValueError, match=r"unknown key 'lambda_ggd'"):
        tiny("cyclegan", lambda_ggd=1.0)


# ---- networks -----------------------------------------------------------------------------------

def test_resunet_has_the_reference_widths_and_checks_sizes():
    net = ResUNet(1, 1, ngf=64, depth=4)  # UncerGuidedI2I UNet: 64-128-256-512-512
    widths = [net.inc.skip.conv.out_channels] + [d.skip.conv.out_channels for d in net.down]
    assert widths == [64, 128, 256, 512, 512]
    assert [(u.skip.conv.in_channels, u.skip.conv.out_channels, u.body[0].conv.out_channels) for u in net.up] == \
        [(1024, 256, 512), (512, 128, 256), (256, 64, 128), (128, 64, 64)]
    small = ResUNet(1, 1, ngf=4, depth=3)
    y = small(torch.rand(2, 1, 24, 16))
    assert y.shape == (2, 1, 24, 16) and y.abs().max() == 0  # zero-initialised OutConv
    assert small.forward_features(torch.rand(1, 1, 16, 16)).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        small.check_input(torch.rand(1, 1, 20, 16))


def test_dgpg_generator_has_three_heads_and_only_they_enter_the_bundle_state():
    m, c = tiny(), tiny("cyclegan")
    keys = set(m.state_dict())
    assert all(k.startswith("generator.") for k in keys)
    assert {k.split(".")[1] for k in keys} == {"net", "alpha_head", "beta_head"}
    assert {k.split(".")[1] for k in c.state_dict()} == {"net"}
    out = m.generator(torch.rand(2, 1, SIZE, SIZE) * 2 - 1)
    assert out.inv_alpha.min() >= m.config.alpha_eps and out.beta.min() >= m.config.beta_eps
    parts = m.build_training_parts()
    assert {"generator_ts", "disc_target", "disc_source", "disc_target_liver_s0", "disc_target_liver_s1",
            "disc_target_tumor_s0", "disc_target_tumor_s1", "disc_target_tumor_s2"} == set(parts)
    both = tiny(roi={"domains": "both"}).build_training_parts()
    assert "disc_source_tumor_s2" in both and len(both) == 13
    assert set(tiny("cyclegan").build_training_parts()) == {"generator_ts", "disc_target", "disc_source"}


# ---- the generalised Gaussian -------------------------------------------------------------------

def test_ggd_power_form_is_the_negative_log_likelihood():
    rng = np.random.default_rng(0)
    r = rng.uniform(-0.8, 0.8, (1, 1, 4, 5))
    alpha, beta = rng.uniform(0.2, 1.5, r.shape), rng.uniform(0.6, 3.0, r.shape)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = ggd_loss(t(r), t(1 / alpha), t(beta), torch.zeros(r.shape, dtype=torch.float64), "power")
    nll = -stats.gennorm.logpdf(r, beta, scale=alpha) - math.log(2.0)  # eq. (1) drops the log 2
    assert float(got) == pytest.approx(nll.mean(), rel=1e-5)


def test_ggd_product_form_is_the_reference_code():
    mean, target = torch.tensor([0.5, -0.2, 0.0, 1.0]), torch.tensor([0.1, -0.2, 0.3, -1.0])
    inv_alpha, beta = torch.tensor([2.0, 3.0, 0.5, 40.0]), torch.tensor([1.5, 0.7, 2.0, 1.0])
    term = ((mean - target).abs() * inv_alpha * beta).clamp(1e-6, 50)
    expected = (term - inv_alpha.log() + torch.lgamma(1 / beta) - beta.log()).mean()
    assert float(ggd_loss(mean, inv_alpha, beta, target)) == pytest.approx(float(expected), rel=1e-6)
    # the product form is bounded at 50 per pixel (the last pixel: 2 * 40 * 1 = 80 -> 50)
    assert float(term[3]) == 50.0
    with pytest.raises(ValueError, match="ggd form"):
        ggd_loss(mean, inv_alpha, beta, target, "square")


def test_ggd_variance_matches_scipy():
    alpha = np.array([0.05, 0.3, 1.0, 2.0])
    beta = np.array([0.5, 1.0, 2.0, 7.0])
    got = ggd_variance(torch.tensor(1 / alpha), torch.tensor(beta)).numpy()
    np.testing.assert_allclose(got, stats.gennorm.var(beta, scale=alpha), rtol=1e-5)
    # a dead alpha head (inv_alpha = eps) gives a huge but finite variance
    assert torch.isfinite(ggd_variance(torch.tensor([1e-5]), torch.tensor([0.1]))).all()


# ---- translate and bundles ----------------------------------------------------------------------

def test_translate_gives_image_and_variance_and_survives_a_bundle(tmp_path):
    from MedTranslateLib.bundle import BundleMeta, ModalitySpec, load_bundle, save_bundle

    m = tiny().eval()
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    with torch.inference_mode():
        tr = m.translate(x)
    assert tr.image.shape == tr.uncertainty.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(tr.uncertainty).all() and (tr.uncertainty > 0).all()
    out = m.generator(x)
    torch.testing.assert_close(tr.uncertainty, ggd_variance(out.inv_alpha, out.beta))
    meta = BundleMeta(source=ModalitySpec("t1", {"kind": "mr_zscore"}), target=ModalitySpec("ct", "ct_abdomen"))
    loaded = load_bundle(save_bundle(m, meta, tmp_path / "b")).method
    assert isinstance(loaded, DGPG)
    again = loaded.translate(x)
    torch.testing.assert_close(again.image, tr.image)
    torch.testing.assert_close(again.uncertainty, tr.uncertainty)
    c = tiny("cyclegan").eval()
    assert c.translate(x).uncertainty is None
    with pytest.raises(ValueError, match="not a multiple of 4"):
        m.translate(torch.rand(1, 1, 30, 32))


# ---- ROI discriminators -------------------------------------------------------------------------

@pytest.mark.parametrize("roi", ["liver", "tumor"])
def test_roi_discriminators_see_only_their_roi(roi):
    m = tiny()
    parts = m.build_training_parts()
    batch = unpaired_batch()
    mask = batch[f"target_{roi}"]
    image = batch["target"].clone()
    outside = image + 0.7 * torch.randn(image.shape) * (1 - mask)  # changed outside the ROI only
    inside = image + 0.7 * torch.randn(image.shape) * mask
    masks = {roi: mask}
    advs = [a for a in m.all_adversaries() if a.roi == roi]
    assert [a.scale for a in advs] == ([0, 1] if roi == "liver" else [0, 1, 2])
    for adv in advs:
        d = parts[adv.key].eval()
        x = image.clone().requires_grad_(True)
        y = d(m.discriminator_input(adv, x, masks))
        assert m.discriminator_input(adv, x, masks).shape[-1] == SIZE // 2**adv.scale
        torch.testing.assert_close(d(m.discriminator_input(adv, outside, masks)), y)
        assert not torch.allclose(d(m.discriminator_input(adv, inside, masks)), y)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert grad[mask == 0].abs().max() == 0 and grad[mask == 1].abs().max() > 0
    # the alternative input: the mask as an extra channel only (the image is seen everywhere)
    alt = tiny(roi={"input": "channel"})
    adv = advs[0]
    d = alt.build_training_parts()[adv.key].eval()
    assert not torch.allclose(d(alt.discriminator_input(adv, outside, masks)),
                              d(alt.discriminator_input(adv, image, masks)))


def test_fakes_are_judged_with_the_source_mask_and_empty_rois_are_left_out():
    m = tiny(progressive={"liver_start": 0, "tumor_start": 0})
    parts = m.build_training_parts()
    batch = unpaired_batch()
    batch["source_tumor"] = torch.zeros_like(batch["source_tumor"])  # the fakes have no tumour
    losses = m.training_losses(batch, parts, "generator")
    assert all(float(losses[f"adv_target_tumor_s{k}"]) == 0 for k in range(3))
    assert all(float(losses[f"adv_target_liver_s{k}"]) > 0 for k in range(2))
    d = m.training_losses(batch, parts, "discriminator")
    assert all(float(d[f"target_tumor_s{k}"]) > 0 for k in range(3))  # reals still count
    with pytest.raises(ValueError, match="need the 'tumor' mask"):
        m.training_losses({k: v for k, v in batch.items() if not k.endswith("tumor")}, parts, "generator")


# ---- progressive stages -------------------------------------------------------------------------

def test_stages_switch_at_the_configured_steps():
    m = tiny(progressive={"liver_start": 2, "tumor_start": 4})
    parts = m.build_training_parts()
    opts = {p: torch.optim.Adam(m.phase_parameters(p, parts), 1e-3) for p in m.optimization_phases()}
    notes, stages = {}, {}
    for step in range(6):
        notes[step] = m.set_training_progress(step)
        for phase in m.optimization_phases():
            for p in [*m.parameters(), *parts.parameters()]:
                p.grad = None
            losses = m.training_losses(unpaired_batch(seed=step), parts, phase)
            losses["loss"].backward()
            opts[phase].step()
            stages[step, phase] = float(losses["stage"])
            active = {k for k, p in parts.items() if k.startswith("disc")
                      and any(q.grad is not None for q in p.parameters())}
            if phase == "discriminator":
                want = {"disc_target", "disc_source"}
                if step >= 2:
                    want |= {"disc_target_liver_s0", "disc_target_liver_s1"}
                if step >= 4:
                    want |= {f"disc_target_tumor_s{k}" for k in range(3)}
                assert active == want, step
                assert ("target_liver_s0" in losses) == (step >= 2)
                assert ("target_tumor_s2" in losses) == (step >= 4)
            else:
                assert not active  # discriminators are frozen in the generator phase
    assert [stages[s, "generator"] for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [s for s, n in notes.items() if n] == [0, 2, 4]
    assert "stage 3" in notes[4] and "tumor x3 scales" in notes[4]
    assert m.stage_at(10**6) == 3 and tiny().stage_at(0) == 1


def test_training_loop_reports_the_stage_switches(tmp_path, capfd):
    """train.py's loop calls set_training_progress: stage values in the CSV log and a log line."""
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset
    from MedTranslateLib.training import fit, load_train_config

    root = tmp_path / "phantom"
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 48, 48)))
    out = tmp_path / "run"
    cfg = load_train_config(ROOT / "training" / "configs" / "smoke" / "dgpg.yaml", [
        f"data.root={root}", f"train.out_dir={out}", "data.size=32", "data.roi=null", "train.max_steps=5",
        "train.val_every=0", "train.log_every=1", "train.progress_bar=false", "model.generator.ngf=4",
        "model.discriminator.n_layers=1", "model.progressive.liver_start=2", "model.progressive.tumor_start=4"])
    bundle = fit(cfg)
    (version,) = (out / "logs").glob("version_*")
    with open(version / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/generator/stage")]
    assert [float(r["train/generator/stage"]) for r in rows] == [1, 1, 2, 2, 3]
    assert all(r["train/generator/adv_target_tumor_s2"] == "" for r in rows[:4]) and rows[4]["train/generator/adv_target_tumor_s2"]
    err = capfd.readouterr().err
    assert "step 2: stage 2" in err and "step 4: stage 3" in err
    from MedTranslateLib.bundle import load_bundle

    b = load_bundle(bundle)
    assert b.meta.method == "dgpg" and (b.meta.source.modality, b.meta.target.modality) == ("t1", "ct")
    assert b.method.translate(torch.zeros(1, 1, 32, 32)).uncertainty is not None


# ---- uncertainty follows the error --------------------------------------------------------------

def _scenes(g: torch.Generator, n: int, size: int = 24, noise: float = 0.3):
    """Clean source: two bright disks on a dark background; target: the same plus noise inside
    the disks only (unpredictable from the source: that is where the error will be)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        for _ in range(2):
            cy, cx = torch.randint(4, size - 4, (2,), generator=g)
            r = 5 + int(torch.randint(0, 3, (1,), generator=g))
            disk[i, 0] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    source = torch.where(disk, 0.5, -0.8)
    target = (source + noise * torch.randn(source.shape, generator=g) * disk).clamp(-1, 1)
    return source, target, disk


def test_uncertainty_is_higher_where_the_error_is_higher():
    """The generator with its alpha/beta heads, trained a few dozen steps with the GGD loss
    (+ L1) on pairs, as the cycle term trains it on (reconstruction, real) pairs: on held-out
    slices the predicted variance ranks the pixels by their error (Spearman > 0)."""
    torch.manual_seed(0)
    m = build_method("dgpg", {"generator": {"ngf": 6, "depth": 2}})
    opt = torch.optim.Adam(m.generator.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        source, target, _ = _scenes(g, 4)
        out = m.generator(source)
        loss = ggd_loss(out.image, out.inv_alpha, out.beta, target) + 10 * (out.image - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    source, reference, disk = _scenes(torch.Generator().manual_seed(1000), 8)
    tr = m.translate(source)
    error = (tr.image - reference).abs().flatten().numpy()
    rho = stats.spearmanr(tr.uncertainty.flatten().numpy(), error).statistic
    assert rho > 0.3, rho
    assert tr.uncertainty[disk].mean() > 2 * tr.uncertainty[~disk].mean()
