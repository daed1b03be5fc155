"""bbdm and resshift: training losses wired to the schedulers, sampling loops checked with oracle
denoisers, noise control (seed, shared noise, samples), steps, training end to end, the engine;
the shared machinery of later methods (several networks and branches, combine_samples,
prepare_condition, learned source features, per-domain latent statistics) and the defaults
reproducing the outputs from before it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_engine
import torch
from torch import nn

from MedTranslateLib.diffusion import BrownianBridgeScheduler, ResShiftScheduler
from MedTranslateLib.methods import Translation, build_method
from MedTranslateLib.methods.bbdm import BBDM
from MedTranslateLib.methods.diffusion_common import SampleResult
from MedTranslateLib.methods.resshift import ResShift
from MedTranslateLib.nn.diffusion_unet import DenoisingUNet

ROOT = Path(__file__).resolve().parents[1]
UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
        "num_head_channels": 8, "norm_groups": 4}


def method(name: str, **kw):
    torch.manual_seed(0)
    return build_method(name, {"unet": UNET, **kw}).eval()


def pair(b: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    source = torch.rand(b, 1, size, size, generator=g) * 1.6 - 0.8
    return source, (source * 0.5 + 0.3).clamp(-1, 1)


class Oracle(nn.Module):
    """Stands in for the U-Net: answers what a perfect denoiser would for a known x0, and records
    its inputs."""

    def __init__(self, unet: nn.Module, answer) -> None:
        super().__init__()
        self.config = unet.config
        self.answer = answer
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.answer(x, t)


# ---- training losses --------------------------------------------------------------------------

def test_bbdm_loss_is_l1_to_the_scheduler_target():
    """A fresh U-Net outputs exactly 0, so the loss is mean|target| for the drawn t and noise."""
    m = method("bbdm")
    source, target = pair()
    torch.manual_seed(5)
    loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"]
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(target)
    ref = BrownianBridgeScheduler().training_target(target, source, noise, t).abs().mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)
    assert float(loss.detach()) > 0.05
    m2 = method("bbdm", loss="l2", bridge={"objective": "noise"})
    torch.manual_seed(5)
    loss2 = m2.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"]
    assert float(loss2.detach()) == pytest.approx(float(noise.pow(2).mean()), rel=1e-6)


def test_resshift_loss_is_mse_on_x0_from_scaled_input():
    m = method("resshift")
    source, target = pair()
    oracle = Oracle(m.unet, lambda x, t: torch.zeros_like(x[:, :1]))
    m.unet = oracle
    torch.manual_seed(5)
    loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"]
    assert float(loss.detach()) == pytest.approx(float(target.pow(2).mean()), rel=1e-6)
    torch.manual_seed(5)
    t = torch.randint(0, 4, (3,))
    s = ResShiftScheduler()
    x_t = s.add_noise(target, source, torch.randn_like(target), t)
    (x_in, t_in), = oracle.calls
    assert torch.equal(t_in, t)
    assert torch.allclose(x_in[:, :1], s.scale_model_input(x_t, t), atol=1e-6)  # x_t / sqrt(k^2 eta_t + 1)
    assert torch.equal(x_in[:, 1:], source)  # the source concatenated


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_a_few_steps_reduce_the_loss(name):
    m = method(name).train()
    source, target = pair(4)
    opt = torch.optim.Adam(m.phase_parameters("main", nn.ModuleDict()), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:4])


# ---- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("condition", ["source", "none"])
def test_bbdm_sampling_with_a_perfect_denoiser_lands_on_x0(condition):
    m = method("bbdm", condition=condition)
    source, target = pair()
    # 'grad' objective: the network's answer at x_t is x_t - x0
    m.unet = oracle = Oracle(m.unet, lambda x, t: x[:, :1] - target)
    out = m.translate(source, steps=12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.image, target, atol=1e-5)
    ts = [int(t[0]) for _, t in oracle.calls]
    assert ts == m.scheduler.timesteps.tolist() and ts[0] == 999 and ts[-1] == 0 and len(ts) == 12
    x_first = oracle.calls[0][0]
    assert torch.equal(x_first[:, :1], source)  # x_T = y, no noise added
    assert x_first.shape[1] == (2 if condition == "source" else 1)


def test_resshift_sampling_with_a_perfect_denoiser_lands_on_x0():
    m = method("resshift")
    source, target = pair()
    m.unet = oracle = Oracle(m.unet, lambda x, t: target)
    out = m.translate(source, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.image, target, atol=1e-6)
    assert [int(t[0]) for _, t in oracle.calls] == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="samples all 4 trained timesteps") as err:
        m.translate(source, steps=10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_noise_control(name):
    m = method(name, **({"steps": 6} if name == "bbdm" else {}))
    nn.init.normal_(m.unet.out[-1].weight, std=0.05)
    source = pair(1)[0].expand(4, 1, 16, 16).contiguous()  # four identical slices
    run = lambda seed, **kw: m.translate(source, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = run(3).image, run(3).image, run(4).image
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert (a[0] - a[1]).abs().max() > 1e-3  # independent noise per slice
    shared = run(3, shared_noise=True).image
    assert torch.allclose(shared[0], shared[3], atol=1e-6)  # one noise map for the whole batch
    many = run(3, num_samples=3)
    assert many.samples.shape == (3, 4, 1, 16, 16)
    assert torch.allclose(many.image, many.samples.mean(0), atol=1e-6)
    assert torch.allclose(many.uncertainty, many.samples.std(0), atol=1e-6)
    assert many.uncertainty.mean() > 0


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_bad_inputs_are_one_line(name):
    m = method(name)
    for bad, match in [(torch.zeros(2, 2, 16, 16), "expected source of shape"),
                       (torch.zeros(2, 1, 17, 16), "must be a multiple of 2"),
                       (torch.zeros(2, 1, 16, 16, dtype=torch.int64), "floating-point")]:
        with pytest.raises(ValueError, match=match) as err:
            m.translate(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown key"):
        build_method(name, {"unet": {**UNET, "channels": 3}})


# ---- end to end: training script and engine --------------------------------------------------

@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from MedTranslateLib.phantom import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, seed=0, config=PhantomConfig(shape=(16, 48, 48)))
    return root


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_smoke_config_trains_and_the_engine_samples_it(name, phantom_root, tmp_path):
    from MedTranslateLib import engine
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.io import read_volume
    from MedTranslateLib.training import fit, load_train_config

    out = tmp_path / "run"
    cfg = load_train_config(ROOT / "training" / "configs" / "smoke" / f"{name}.yaml", [
        f"data.root={phantom_root}", f"train.out_dir={out}", "data.size=32", "train.max_steps=6",
        "train.val_every=3", "train.val_batches=1", "train.log_every=1", "train.progress_bar=false",
        "model.unet.model_channels=8", "model.unet.norm_groups=4"])
    bundle = load_bundle(fit(cfg))
    assert bundle.meta.method == name and bundle.method.stochastic
    assert bundle.meta.metrics["validation"]["val/mae"] > 0
    vol = read_volume(phantom_root / "case_000" / "ct.nii.gz")
    tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=4, shared_noise=True)
    steps = 5 if name == "bbdm" else None
    res = tr.translate(vol, seed=2, steps=steps, num_samples=2, slice_range=(3, 6))
    again = tr.translate(vol, seed=2, steps=steps, num_samples=2, slice_range=(3, 6))
    assert res.synthetic.same_geometry(vol, atol=0) and res.uncertainty is not None
    assert np.array_equal(res.synthetic.array, again.synthetic.array)
    assert np.isfinite(res.synthetic.array).all()


# ---- latent space -----------------------------------------------------------------------------

AE = {"factor": 4, "channels": [4, 8], "num_res_layers": 1, "latent_channels": 2, "num_embeddings": 16,
      "discriminator": {"ndf": 4, "n_layers": 1}}


@pytest.fixture(scope="module")
def ae_bundle(tmp_path_factory) -> Path:
    """A (random-weight) autoencoder bundle, as training/train.py writes one."""
    from MedTranslateLib.bundle import save_bundle

    torch.manual_seed(3)
    ae = build_method("autoencoder", AE)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_bundle(ae.eval(), {"method": "autoencoder"}, tmp_path_factory.mktemp("ae") / "bundle")


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
@pytest.mark.parametrize("condition", ["source", "latent"])
def test_latent_method_runs_in_the_frozen_autoencoder_latent(name, condition, ae_bundle, tmp_path):
    from MedTranslateLib.bundle import load_bundle, save_bundle

    # the training loop loads the bundle and hands it in (a method never reads files)
    m = build_method(name, {"unet": UNET, "condition": condition,
                            "latent": {"autoencoder_bundle": str(ae_bundle), "normalize": True, "stats_batches": 2}},
                     pretrained={"autoencoder": load_bundle(ae_bundle).method})
    assert m.config.latent.autoencoder["channels"] == [4, 8]  # architecture taken from the pretrained part
    source, target = pair(4, 32)
    batches = [{"source": source[:2], "target": target[:2]}, {"source": source[2:], "target": target[2:]},
               {"source": source * 0, "target": target * 0}]  # the third is past stats_batches
    note = m.prepare_training(iter(batches))
    assert "autoencoder weights from" in note
    ae = load_bundle(ae_bundle).method
    assert all(torch.equal(a, b) for a, b in zip(m.autoencoder.state_dict().values(), ae.state_dict().values(),
                                                 strict=True))
    z_t = ae.encode(target)
    assert torch.allclose(m.target_mean.flatten(), z_t.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(m.to_space(target, "target").std(dim=(0, 2, 3)), torch.ones(2), atol=0.05)
    # the autoencoder is frozen: no optimiser sees it, train() keeps it in eval mode
    params = {id(p) for p in m.phase_parameters("main", nn.ModuleDict())}
    assert params and not params & {id(p) for p in m.autoencoder.parameters()}
    m.train()
    assert not m.autoencoder.training and m.unet.training
    loss = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"]
    loss.backward()
    assert all(p.grad is None for p in m.autoencoder.parameters())
    # sampling: latent (B, 2, 8, 8) -> decoded (B, 1, 32, 32); the U-Net input is x_t + condition
    m.eval()
    real_unet = m.unet
    m.unet = oracle = Oracle(m.unet, lambda x, t: torch.zeros_like(x[:, :2]))
    out = m.translate(source, steps=4 if name == "bbdm" else None, generator=torch.Generator().manual_seed(0))
    assert out.image.shape == (4, 1, 32, 32)
    x_in = oracle.calls[0][0]
    assert x_in.shape == (4, 4 if condition == "latent" else 3, 8, 8)
    # a saved bundle is self-contained: autoencoder weights and latent statistics inside
    m.unet = real_unet
    path = save_bundle(m, {"method": name}, tmp_path / "b")
    again = load_bundle(path).method
    assert again.config.latent.autoencoder == m.config.latent.autoencoder
    for k in ("target_mean", "target_std", "source_mean", "source_std"):
        assert torch.equal(getattr(again, k), getattr(m, k))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    kw = {"steps": 4} if name == "bbdm" else {}
    assert torch.equal(again.translate(source, generator=g(), **kw).image, m.translate(source, generator=g(), **kw).image)


def test_latent_config_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="latent.autoencoder_bundle"):
        build_method("bbdm", {"unet": UNET, "latent": {}})
    latent = {"autoencoder_bundle": str(tmp_path / "missing")}
    with pytest.raises(ValueError, match="was not loaded") as err:  # no file is read by the method
        build_method("bbdm", {"unet": UNET, "latent": latent})
    assert "\n" not in str(err.value)
    from MedTranslateLib.training import DataConfig, TrainConfig, build_training_method

    cfg = TrainConfig(method="bbdm", data=DataConfig(root=str(tmp_path)), model={"unet": UNET, "latent": latent})
    with pytest.raises(ValueError, match="not a bundle|not found|no such") as err:
        build_training_method(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="takes no pretrained parts"):
        build_method("bbdm", {"unet": UNET}, pretrained={"autoencoder": nn.Identity()})


def test_latent_training_run_loads_the_autoencoder_and_writes_a_self_contained_bundle(ae_bundle, phantom_root,
                                                                                       tmp_path):
    """train.py's loop calls prepare_training: the run starts from the autoencoder bundle's
    weights, computes latent statistics from training batches, and the written bundle carries
    both (it loads with the autoencoder bundle gone)."""
    import shutil

    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.training import fit, load_train_config

    ae_copy = tmp_path / "ae"
    shutil.copytree(ae_bundle, ae_copy)
    cfg = load_train_config(ROOT / "training" / "configs" / "demo" / "bbdm_latent.yaml", [
        f"data.root={phantom_root}", f"train.out_dir={tmp_path / 'run'}", "data.size=32", "data.batch_size=4",
        "train.max_steps=3", "train.val_every=0", "train.log_every=1", "train.progress_bar=false",
        "train.ema_decay=null", f"model.latent.autoencoder_bundle={ae_copy}", "model.latent.stats_batches=2",
        f"model.unet={UNET}".replace("'", "")])
    path = fit(cfg)
    shutil.rmtree(ae_copy)
    bundle = load_bundle(path)
    m = bundle.method
    assert m.config.latent.autoencoder["channels"] == [4, 8] and m.config.latent.normalize
    ae = load_bundle(ae_bundle).method
    assert torch.equal(m.autoencoder.state_dict()["vqvae.encoder.blocks.0.conv.weight"],
                       ae.state_dict()["vqvae.encoder.blocks.0.conv.weight"])
    assert not torch.equal(m.target_std, torch.ones_like(m.target_std))  # statistics were computed
    out = m.translate(torch.zeros(2, 1, 32, 32), steps=3, generator=torch.Generator().manual_seed(0))
    assert out.image.shape == (2, 1, 32, 32) and torch.isfinite(out.image).all()


# ---- per-slice noise: a slice's noise does not depend on its batch -----------------------------

#: Same noise, another batch: what is left is the rounding of CPU kernels that compute a slice
#: differently at another batch size (oneDNN takes other convolution kernels for a batch of one):
#: ~1e-7 in [-1, 1] units, ~1e-3 HU at most, where different noise moves voxels by tens of HU.
ROUNDING = 1e-5
ROUNDING_HU = test_engine.ROUNDING_HU

def test_schedulers_draw_each_element_from_its_own_generator():
    """``generator`` may be one generator per batch element: element b's noise is what it would
    draw alone, so a batch gives the same result as its elements one by one."""
    y = pair(3)[0]
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    rs = ResShiftScheduler()
    whole = rs.prior_sample(y, generator=gens())
    assert torch.equal(whole, torch.cat([rs.prior_sample(y[i:i + 1], generator=[g]) for i, g in enumerate(gens())]))
    assert (whole[0] - whole[1]).abs().max() > 0.1
    bb = BrownianBridgeScheduler()
    bb.set_timesteps(10)
    t, out = int(bb.timesteps[1]), torch.zeros_like(y)
    whole, _ = bb.step(out, t, y, y, generator=gens())
    alone = [bb.step(out[i:i + 1], t, y[i:i + 1], y[i:i + 1], generator=[g])[0] for i, g in enumerate(gens())]
    assert torch.equal(whole, torch.cat(alone))
    with pytest.raises(ValueError, match="one per batch element"):
        rs.prior_sample(y, generator=gens()[:2])


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_per_slice_generators_make_a_slice_independent_of_its_batch(name, space, ae_bundle):
    """translate(generator=[one per slice]): the prior, every step's noise and every one of
    num_samples samples of a slice come from its own generator, so splitting the batch changes
    nothing; generators seeded alike give every slice the same noise (= shared_noise)."""
    from MedTranslateLib.bundle import load_bundle

    if space == "pixel":
        m, size = method(name), 16
    else:
        torch.manual_seed(0)
        m = build_method(name, {"unet": UNET, "latent": {"autoencoder_bundle": str(ae_bundle)}},
                         pretrained={"autoencoder": load_bundle(ae_bundle).method}).eval()
        size = 32
    nn.init.normal_(m.unet.out[-1].weight, std=0.05)  # the output depends on the noise
    source = pair(4, size)[0]
    kw = {"steps": 4} if name == "bbdm" else {}
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = m.translate(source, generator=gens(range(4)), num_samples=2, **kw).samples  # (2, 4, 1, H, W)
    split = [m.translate(source[a:b], generator=gens(range(a, b)), num_samples=2, **kw).samples
             for a, b in ((0, 1), (1, 3), (3, 4))]
    torch.testing.assert_close(whole, torch.cat(split, dim=1), rtol=0, atol=ROUNDING)
    assert (whole[0] - whole[1]).abs().max() > 0.01  # the two samples differ
    alike = lambda: [torch.Generator().manual_seed(7) for _ in range(4)]  # noqa: E731
    shared = m.translate(source, generator=alike(), shared_noise=True, **kw).image
    assert torch.equal(shared, m.translate(source, generator=alike(), **kw).image)
    with pytest.raises(ValueError, match="one per batch element"):
        m.translate(source, generator=gens(range(3)), **kw)


ENGINE_META = {"source": {"modality": "ct", "preset": "ct_abdomen"},
               "target": {"modality": "cta_arterial", "preset": "ct_angio"}, "slice": {"size": 16, "axis": 0}}


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    """Random-weight bbdm (4 steps) and resshift bundles on 16x16 slices; the output conv is not
    zero, so the synthetic depends on the noise."""
    from MedTranslateLib.bundle import save_bundle

    out = {}
    for name in ("bbdm", "resshift"):
        m = method(name, **({"steps": 4} if name == "bbdm" else {}))
        nn.init.normal_(m.unet.out[-1].weight, std=0.05)
        out[name] = save_bundle(m, ENGINE_META, tmp_path_factory.mktemp(name) / "bundle")
    return out


def small_ct(n: int = 9, *, identical_slices: bool = False):
    """(n, 24, 28) CT: an off-centre body ellipse (~0..200 HU) in air, varying along z."""
    from MedTranslateLib.io import Volume

    z, y, x = np.meshgrid(*(np.arange(k, dtype=np.float32) for k in (n, 24, 28)), indexing="ij")
    if identical_slices:
        z = z * 0
    body = ((y - 12) / 9) ** 2 + ((x - 13) / 11) ** 2 < 1
    arr = np.where(body, 60 + 80 * np.sin(x / 4) * np.cos(y / 5) + 8 * z, -1000).astype(np.float32)
    return Volume(arr, spacing=(1.5, 1.5, 3.0))


def _translator(bundle, batch_size, *, oom_above=None, **kw):
    from test_engine import _simulate_oom_above

    from MedTranslateLib import engine

    tr = engine.VolumeTranslator(bundle, device="cpu", batch_size=batch_size, **kw)
    if oom_above is not None:
        _simulate_oom_above(tr, oom_above)
    return tr


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_engine_same_seed_same_volume_whatever_the_batching(name, num_samples, tiny_bundles):
    """Batch size 1, 3 or 8, a slice range or an out-of-memory back-off: same seed, same volume
    (before per-slice seeds, batches were seeded from their first slice: tens of HU apart)."""
    from MedTranslateLib.bundle import load_bundle

    bundle = load_bundle(tiny_bundles[name])
    vol = small_ct()

    def run(batch_size, oom_above=None, seed=3, **kw):
        res = _translator(bundle, batch_size, oom_above=oom_above).translate(vol, seed=seed, num_samples=num_samples,
                                                                             **kw)
        return res.synthetic.array, (None if res.uncertainty is None else res.uncertainty.array), res.info

    from test_engine import assert_same_volume_whatever_the_batching

    assert (run(8)[1] is not None) == (num_samples > 1)
    assert run(8, oom_above=2)[2]["batch_size"] == 2
    assert_same_volume_whatever_the_batching(run, (2, 7), other_seed=4)


@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_engine_shared_noise_is_one_noise_map_for_every_slice(name, tiny_bundles):
    """shared_noise: identical source slices give identical synthetic slices wherever they sit in
    their batches (batches of 3 over 7 slices); independent noise makes them differ."""
    from MedTranslateLib.bundle import load_bundle

    bundle = load_bundle(tiny_bundles[name])
    vol = small_ct(7, identical_slices=True)
    syn = _translator(bundle, 3, shared_noise=True).translate(vol, seed=5).synthetic.array
    np.testing.assert_allclose(syn, np.broadcast_to(syn[:1], syn.shape), rtol=0, atol=ROUNDING_HU)
    again = _translator(bundle, 1, shared_noise=True).translate(vol, seed=5).synthetic.array
    np.testing.assert_allclose(again, syn, rtol=0, atol=ROUNDING_HU)
    independent = _translator(bundle, 3).translate(vol, seed=5).synthetic.array
    assert np.abs(independent[1:] - independent[:1]).max(axis=(1, 2)).min() > 1.0  # HU


# ---- defaults: the same outputs as before branches, SampleResult and per-domain statistics ----

#: Written by ``write_reference()`` run against the library of commit 98180c6 (before branches,
#: ``SampleResult``, ``combine_samples`` and per-domain latent statistics):
#:   cd /tmp && PYTHONPATH=<98180c6 checkout>:<this Testing folder> python -c \
#:       "import test_diffusion_methods as t; t.write_reference()"
#: The new code reproduced every value bit for bit on the machine that wrote it; other CPUs may
#: take other convolution kernels, hence the rounding-level tolerance.
REFERENCE = Path(__file__).parent / "data" / "diffusion_defaults_reference.npz"
TINY_AE = {"factor": 4, "channels": [4, 8], "num_res_layers": 1, "latent_channels": 2, "num_embeddings": 16}
DEFAULT_CASES = [("pixel", "source"), ("pixel", "none"), ("latent", "source"), ("latent", "latent"),
                 ("latent_normalized", "source")]


def default_outputs() -> dict[str, np.ndarray]:
    """bbdm and resshift built with explicit settings that exist before and after the change
    (every new option at its default): translate (two samples, one generator per slice; one
    sample) and one training loss from fixed weights and seeds; the shipped resshift demo bundle."""
    from MedTranslateLib.bundle import load_bundle

    out: dict[str, np.ndarray] = {}
    source, target = pair(2, 16)
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(2)]  # noqa: E731
    for name in ("bbdm", "resshift"):
        for space, condition in DEFAULT_CASES:
            config = {"unet": UNET, "condition": condition}
            if space != "pixel":
                config["latent"] = {"autoencoder": TINY_AE, "normalize": space == "latent_normalized",
                                    "stats_batches": 2}
            if name == "bbdm":
                config["steps"] = 4
            m = method(name, **config)
            torch.manual_seed(1)
            nn.init.normal_(m.unet.out[-1].weight, std=0.05)
            if space != "pixel":
                with torch.random.fork_rng():
                    m.prepare_training(iter([{"source": source, "target": target},
                                             {"source": -source, "target": target * 0.5}]))
            key = f"{name}/{space}/{condition}"
            many = m.translate(source, generator=gens(), num_samples=2)
            out[f"{key}/image"], out[f"{key}/uncertainty"] = many.image.numpy(), many.uncertainty.numpy()
            out[f"{key}/samples"] = many.samples.numpy()
            out[f"{key}/one"] = m.translate(source, generator=gens(), shared_noise=True).image.numpy()
            torch.manual_seed(5)
            losses = m.train().training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")
            out[f"{key}/loss"] = np.array([float(losses["loss"].detach()), float(losses["x0_l1"])])
    demo = load_bundle(ROOT / "Resources" / "Models" / "resshift_ct_cta_demo").method
    x = pair(1, 32)[0]
    res = demo.translate(x, generator=[torch.Generator().manual_seed(7)], num_samples=2)
    out["demo/image"], out["demo/uncertainty"] = res.image.numpy(), res.uncertainty.numpy()
    return out


def write_reference() -> None:
    np.savez_compressed(REFERENCE, **default_outputs())


def test_defaults_reproduce_the_outputs_from_before_branches():
    """bbdm and resshift (pixel and latent, every condition, latents normalised or not), with
    every new option at its default, give the samples, means, stds and losses they gave before,
    and so does the shipped resshift demo bundle."""
    ref = np.load(REFERENCE)
    now = default_outputs()
    assert sorted(now) == sorted(ref.files)
    for key, value in now.items():
        np.testing.assert_allclose(value, ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert np.abs(ref["demo/uncertainty"]).max() > 1e-3  # the noise matters: a real check of the draws


# ---- several networks, combine_samples, work done once per translate ---------------------------

class TwoNetBridge(BBDM):
    """rlbcd-shaped toy (not registered): a residual U-Net on the residual branch whose output the
    target U-Net also sees; both bridges start at x_T = y and share t."""

    branches = ("target", "residual")

    def __init__(self, config=None, **kw) -> None:
        super().__init__(config, **kw)
        self.residual_unet = DenoisingUNet(super().unet_in_channels(), self.space_channels, self.config.unet)

    def unet_in_channels(self) -> int:
        return super().unet_in_channels() + self.space_channels  # + the residual U-Net's output

    def denoise(self, x, t, cond):
        r = self.residual_unet(self.denoiser_input(x["residual"], cond), t)
        return {"target": self.unet(self.denoiser_input(torch.cat([x["target"], r], 1), cond), t), "residual": r}


def two_net(**kw) -> TwoNetBridge:
    torch.manual_seed(0)
    return TwoNetBridge({"unet": UNET, "steps": 4, **kw}).eval()


def test_two_networks_train_a_step_and_their_state_saves_and_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    m = two_net().train()
    for unet in (m.unet, m.residual_unet):
        nn.init.normal_(unet.out[-1].weight, std=0.05)
    source, target = pair(4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.phase_parameters("main", nn.ModuleDict()), lr=1e-3)
    torch.manual_seed(3)
    losses = m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")
    assert set(losses) == {"loss", "x0_l1", "x0_l1_residual", "loss_residual"}
    # the total is the target branch's L1 plus the residual branch's, for one t and two noises
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (4,))
    noise = {b: torch.randn_like(target) for b in ("target", "residual")}
    s = m.scheduler
    x0 = {"target": target, "residual": (target - source) / 2}
    with torch.no_grad():
        x_t = {b: s.add_noise(x0[b], source, noise[b], t) for b in x0}
        r = m.residual_unet(torch.cat([x_t["residual"], source], 1), t)
        out = m.unet(torch.cat([x_t["target"], r, source], 1), t)
    expected = {"target": (out - s.training_target(x0["target"], source, noise["target"], t)).abs().mean(),
                "residual": (r - s.training_target(x0["residual"], source, noise["residual"], t)).abs().mean()}
    assert float(losses["loss_residual"]) == pytest.approx(float(expected["residual"]), rel=1e-5)
    assert float(losses["loss"].detach()) == pytest.approx(float(expected["target"] + expected["residual"]), rel=1e-5)
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    after = m.state_dict()
    for prefix in ("unet.", "residual_unet."):
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix
    # state: both networks, saved and loaded into a fresh instance, sample alike
    m.eval()
    save_file(m.state_dict(), str(tmp_path / "two.safetensors"))
    again = TwoNetBridge(m.config)
    again.load_state_dict(load_file(str(tmp_path / "two.safetensors")), strict=True)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(again.eval().translate(source, generator=g()).image, m.translate(source, generator=g()).image)


def test_every_branch_lands_on_its_own_x0_with_perfect_denoisers():
    """Oracle networks ('grad': x_t - x0 of their branch): the target branch ends on the target,
    the residual branch on the residual, which comes back in SampleResult.aux."""
    m = two_net()
    source, target = pair()
    residual = (target - source) / 2
    seen = []

    def oracle(x, t, cond):
        seen.append(t.clone())
        return {"target": x["target"] - target, "residual": x["residual"] - residual}

    m.denoise = oracle
    res = m.sample(source, m.prepare_condition(source, source), 6, lambda like: torch.randn_like(like))
    assert isinstance(res, SampleResult) and set(res.aux) == {"residual"}
    assert torch.allclose(res.sample, target, atol=1e-5) and torch.allclose(res.aux["residual"], residual, atol=1e-5)
    assert [int(t[0]) for t in seen] == m.scheduler.timesteps.tolist()


@pytest.mark.parametrize("cls", [BBDM, ResShift])
def test_branches_share_x_t_and_t(cls):
    """The scheduler loops give every branch the same start and timestep (ResShift: one prior
    draw), and each its own step noise."""
    torch.manual_seed(0)
    m = type("Two", (cls,), {"branches": ("target", "residual")})({"unet": UNET}).eval()
    source = pair()[0]
    calls = []

    def record(x, t, cond):
        calls.append({b: v.clone() for b, v in x.items()})
        return {b: torch.zeros_like(v) for b, v in x.items()}

    m.denoise = record
    kw = {"steps": 4} if cls is BBDM else {}
    res = m.translate(source, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(calls[0]["target"], calls[0]["residual"])  # the same x_T
    assert not torch.equal(calls[1]["target"], calls[1]["residual"])  # their own noise afterwards
    assert res.image.shape == source.shape


class BestOfN(BBDM):
    """A custom combine_samples: per slice, the sample closest to the source (a stand-in for
    rlbcd's latent consistency score), with that closeness as the confidence."""

    gives_confidence = True
    uncertainty_kind = None

    def combine_samples(self, results, y, cond):
        samples = torch.stack([self.from_space(r.sample) for r in results])  # (N, B, 1, H, W)
        distance = (samples - y).abs().mean(dim=(2, 3, 4))                   # (N, B)
        best = distance.argmin(0)
        image = samples[best, torch.arange(samples.shape[1])]
        return Translation(image=image, confidence=-distance.min(0).values, samples=samples)


def test_a_custom_combine_selects_a_sample_per_slice_and_sets_confidence():
    torch.manual_seed(0)
    m = BestOfN({"unet": UNET, "steps": 4}).eval()
    nn.init.normal_(m.unet.out[-1].weight, std=0.3)
    source = pair(3)[0]
    out = m.translate(source, generator=[torch.Generator().manual_seed(i) for i in range(3)], num_samples=4)
    distance = (out.samples - source).abs().mean(dim=(2, 3, 4))
    best = distance.argmin(0)
    assert (distance.max(0).values - distance.min(0).values).min() > 1e-4  # the choice matters for every slice
    for b in range(3):
        assert torch.equal(out.image[b], out.samples[best[b], b])
    assert torch.equal(out.confidence, -distance.min(0).values) and out.uncertainty is None
    assert m.capabilities.confidence


def test_the_engine_carries_a_methods_confidence_per_slice():
    from MedTranslateLib import engine
    from MedTranslateLib.bundle import Bundle, BundleMeta
    from MedTranslateLib.config import from_dict

    torch.manual_seed(0)
    m = BestOfN({"unet": UNET, "steps": 4}).eval()
    nn.init.normal_(m.unet.out[-1].weight, std=0.3)
    bundle = Bundle(method=m, meta=from_dict(BundleMeta, {"method": "bbdm", **ENGINE_META}), path=Path("best_of_n"))
    res = engine.VolumeTranslator(bundle, device="cpu", batch_size=3).translate(small_ct(), seed=1, num_samples=3,
                                                                              slice_range=(2, 7))
    conf = res.confidence
    assert conf.shape == (9,) and np.isnan(conf[:2]).all() and np.isnan(conf[7:]).all()
    assert np.isfinite(conf[2:7]).all() and (conf[2:7] <= 0).all() and np.ptp(conf[2:7]) > 0
    # a confidence per slice is not a score per sample: select="per_volume" is refused up front, in one line
    assert m.capabilities.confidence and not m.capabilities.sample_confidence
    with pytest.raises(ValueError, match="scores its samples") as refused:
        engine.VolumeTranslator(bundle, device="cpu", batch_size=3).translate(small_ct(), seed=1, num_samples=3,
                                                                             slice_range=(2, 7), select="per_volume")
    assert "\n" not in str(refused.value) and "no confidence per sample" in str(refused.value)


class CountingCondition(BBDM):
    """Counts prepare_condition calls (the once-per-translate work)."""

    def prepare_condition(self, source, y):
        self.prepared = getattr(self, "prepared", 0) + 1
        return super().prepare_condition(source, y)


def test_t_independent_work_runs_once_per_translate(ae_bundle):
    """prepare_condition (here: the learned source features) runs once per translate, whatever
    the number of steps and samples; the U-Net runs steps x samples times."""
    from MedTranslateLib.bundle import load_bundle

    torch.manual_seed(0)
    m = CountingCondition({"unet": UNET, "steps": 5,
                           "latent": {"autoencoder_bundle": str(ae_bundle), "source_features": "learned"}},
                          pretrained={"autoencoder": load_bundle(ae_bundle).method}).eval()
    features, unet = [], []
    m.source_features.register_forward_hook(lambda *a: features.append(1))
    m.unet.register_forward_hook(lambda *a: unet.append(1))
    m.translate(pair(2, 32)[0], num_samples=3, generator=torch.Generator().manual_seed(0))
    assert (m.prepared, len(features), len(unet)) == (1, 1, 5 * 3)
    m.translate(pair(2, 32)[0], steps=3, generator=torch.Generator().manual_seed(0))
    assert (m.prepared, len(features), len(unet)) == (2, 2, 15 + 3)


# ---- latent options: learned source features, per-domain statistics, normalize ---------------

@pytest.mark.parametrize("name", ["bbdm", "resshift"])
def test_learned_source_features_condition_the_latent_denoiser(name, ae_bundle):
    """latent.source_features: learned -> ResShift's feature extractor (conv-SiLU-stride-2 conv
    per factor 2, 16 -> 64 channels for f4) replaces the bilinear resize; it trains with the U-Net
    and is saved with it. The default (bilinear) adds no parameters."""
    from MedTranslateLib.bundle import load_bundle

    ae = lambda: {"autoencoder": load_bundle(ae_bundle).method}  # noqa: E731
    latent = {"autoencoder_bundle": str(ae_bundle)}
    plain = build_method(name, {"unet": UNET, "latent": latent}, pretrained=ae())
    assert plain.source_features is None and not any(k.startswith("source_features") for k in plain.state_dict())
    m = build_method(name, {"unet": UNET, "latent": {**latent, "source_features": "learned"}}, pretrained=ae())
    convs = [c for c in m.source_features if isinstance(c, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 16, 1), (16, 32, 2),
                                                                             (32, 32, 1), (32, 64, 2)]
    source, target = pair(2, 32)
    assert m.prepare_condition(source, m.to_space(source, "source")).shape == (2, 64, 8, 8)
    assert m.unet.in_channels == 2 + 64
    nn.init.normal_(m.unet.out[-1].weight, std=0.05)  # (zero-initialised: no gradient reaches the input)
    m.train()
    m.training_losses({"source": source, "target": target}, nn.ModuleDict(), "main")["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.source_features.parameters())
    assert {id(p) for p in m.source_features.parameters()} <= {id(p) for p in m.phase_parameters("main", None)}
    with pytest.raises(ValueError, match="source_features: learned needs condition: source") as err:
        build_method(name, {"unet": UNET, "condition": "latent", "latent": {**latent, "source_features": "learned"}},
                     pretrained=ae())
    assert "\n" not in str(err.value)


def test_latent_statistics_per_domain(ae_bundle):
    """Every latent domain (the branches' and the source) gets its own mean/std over the first
    batches; the per-channel std goes into the log line even without normalize."""
    from MedTranslateLib.bundle import load_bundle

    ae = load_bundle(ae_bundle).method
    torch.manual_seed(0)
    m = TwoNetBridge({"unet": UNET, "latent": {"autoencoder_bundle": str(ae_bundle), "stats_batches": 1}},
                     pretrained={"autoencoder": ae})
    assert m.config.latent.normalize  # the default for latent methods
    source, target = pair(4, 32)
    note = m.prepare_training(iter([{"source": source, "target": target}]))
    assert "latent std per channel" in note and all(f"{d} [" in note for d in ("target", "residual", "source"))
    for domain, image in (("target", target), ("source", source), ("residual", (target - source) / 2)):
        z = ae.encode(image)
        torch.testing.assert_close(getattr(m, f"{domain}_mean").flatten(), z.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(getattr(m, f"{domain}_std").flatten(), z.std(dim=(0, 2, 3), correction=0))
        assert torch.allclose(m.to_space(image, domain).std(dim=(0, 2, 3), correction=0), torch.ones(2), atol=1e-4)
    assert not torch.allclose(m.residual_std, m.target_std)
    # without normalize the statistics are only logged: the latents stay as they are
    off = TwoNetBridge({"unet": UNET, "latent": {"autoencoder_bundle": str(ae_bundle), "normalize": False}},
                       pretrained={"autoencoder": ae})
    note = off.prepare_training(iter([{"source": source, "target": target}]))
    assert "latent std per channel" in note and "standardised" not in note
    assert torch.equal(off.residual_std, torch.ones(1, 2, 1, 1)) and torch.equal(off.to_space(target, "target"),
                                                                                 ae.encode(target))
    # bbdm and resshift keep exactly their two domains (and so their bundles' tensor names)
    plain = build_method("bbdm", {"unet": UNET, "latent": {"autoencoder_bundle": str(ae_bundle)}},
                         pretrained={"autoencoder": ae})
    assert sorted(k for k in plain.state_dict() if k.endswith(("_mean", "_std"))) == [
        "source_mean", "source_std", "target_mean", "target_std"]


def test_a_latent_bundle_without_normalize_in_its_yaml_loads_as_trained(ae_bundle, tmp_path):
    """Every saved bundle records latent.normalize. One whose architecture leaves it out gets
    the new default (true); a model trained without normalisation holds mean 0 / std 1, with
    which standardising changes no bit: the same synthetic images."""
    from MedTranslateLib.bundle import load_bundle, save_bundle

    torch.manual_seed(0)
    m = build_method("bbdm", {"unet": UNET, "steps": 4,
                              "latent": {"autoencoder_bundle": str(ae_bundle), "normalize": False}},
                     pretrained={"autoencoder": load_bundle(ae_bundle).method}).eval()
    nn.init.normal_(m.unet.out[-1].weight, std=0.05)
    source, target = pair(2, 32)
    m.prepare_training(iter([{"source": source, "target": target}]))
    path = save_bundle(m, ENGINE_META, tmp_path / "old")
    meta = path / "medtranslate.yaml"
    text = meta.read_text()
    assert "normalize: false" in text
    meta.write_text(text.replace("    normalize: false\n", ""))
    loaded = load_bundle(path).method
    assert loaded.config.latent.normalize
    g = lambda: [torch.Generator().manual_seed(9 + i) for i in range(2)]  # noqa: E731
    torch.testing.assert_close(loaded.translate(source, generator=g(), num_samples=2).samples,
                               m.translate(source, generator=g(), num_samples=2).samples, rtol=0, atol=0)
