"""Record reference numbers from the OFFICIAL Brownian-bridge (BBDM) and ResShift code.

Writes ``Testing/data/bbdm_reference.npz`` and ``Testing/data/resshift_reference.npz``, which
``Testing/test_diffusion.py`` compares ``MedTranslateLib.diffusion`` against. Not run in CI: it
needs exported copies of the two official repositories, e.g.::

    git --git-dir=<mirror of xuekt98/BBDM> archive HEAD | tar -x -C /tmp/bbdm
    git --git-dir=<mirror of zsyOAOA/ResShift> archive HEAD | tar -x -C /tmp/resshift
    .venv/bin/python benchmarks/make_scheduler_references.py /tmp/bbdm /tmp/resshift \
        [--out Testing/data] [--bbdm-commit SHA] [--resshift-commit SHA]

Only the official schedule / sampling code runs here. Their networks and autoencoders are never
built: the modules that would import them are replaced by empty stand-ins, the network is a
small deterministic function (the same one the tests use), and ``torch.randn_like`` is patched to
hand out fixed noise tensors so that sampling steps are reproducible.

Official entry points exercised:
- BBDM ``model/BrownianBridge/BrownianBridgeModel.py``: ``register_schedule`` (m_t, variance_t,
  skip-step list ``steps``), ``q_sample`` (x_t and the training objective), ``predict_x0_from_objective``,
  ``p_sample`` and ``p_sample_loop``.
- ResShift ``models/gaussian_diffusion.py``: ``get_named_eta_schedule``, ``GaussianDiffusion.q_sample``,
  ``q_posterior_mean_variance``, ``prior_sample``, ``_scale_input``, ``p_sample``; and
  ``models/script_util.create_gaussian_diffusion`` + ``p_sample_loop_progressive`` for a whole chain.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Shared deterministic "networks" (the tests define the same two functions).


def bbdm_toy_net(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.05 * torch.tanh(x_t) - 0.02 * y + 1e-4 * t.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))


def resshift_toy_net(x_in: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.6 * x_in + 0.3 * y - 0.05 * t.to(x_in.dtype).view(-1, *([1] * (x_in.dim() - 1)))


class NoiseFeed:
    """Stand-in for torch.randn_like that returns pre-drawn tensors in order."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.calls = 0

    def __call__(self, like, *args, **kwargs):
        out = self.tensors[self.calls]
        assert out.shape == like.shape, (out.shape, like.shape)
        self.calls += 1
        return out.clone()


@contextlib.contextmanager
def fixed_randn_like(tensors):
    feed = NoiseFeed(tensors)
    with mock.patch.object(torch, "randn_like", feed):
        yield feed


def git_head(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stub_module(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module


# ------------------------------------------------------------------------------------------------
# BBDM


def load_bbdm(root: Path):
    sys.path.insert(0, str(root))
    # The UNet / conditioning encoders are not needed for the schedule and would pull in extra deps.
    stub_module("model.BrownianBridge.base.modules.diffusionmodules.openaimodel", UNetModel=object)
    stub_module("model.BrownianBridge.base.modules.encoders.modules", SpatialRescaler=object)
    from model.BrownianBridge.BrownianBridgeModel import BrownianBridgeModel  # noqa: PLC0415

    return BrownianBridgeModel


def make_bbdm(cls, *, mt_type="linear", max_var=1.0, eta=1.0, objective="grad", num_timesteps=1000,
              sample_step=200, skip_sample=True):
    """An official BrownianBridgeModel without its UNet: attributes set, then register_schedule()."""
    model = object.__new__(cls)
    torch.nn.Module.__init__(model)
    model.num_timesteps = num_timesteps
    model.mt_type = mt_type
    model.max_var = max_var
    model.eta = eta
    model.skip_sample = skip_sample
    model.sample_type = "linear"
    model.sample_step = sample_step
    model.steps = None
    model.objective = objective
    model.loss_type = "l1"
    model.condition_key = "SpatialRescaler"
    model.register_schedule()
    model.denoise_fn = lambda x, timesteps, context: bbdm_toy_net(x, timesteps, context)
    return model


def official_skip_steps(cls, num_timesteps, sample_step):
    return make_bbdm(cls, num_timesteps=num_timesteps, sample_step=sample_step).steps.numpy()


BBDM_CONFIGS = [("linear", 1.0), ("sin", 1.0), ("linear", 0.5)]  # (mt_type, max_var)
OBJECTIVES = ["grad", "noise", "ysubx"]


def record_bbdm(root: Path) -> dict[str, np.ndarray]:
    cls = load_bbdm(root)
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(20240601)

    def f32(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    # --- schedules (official buffers are float32 copies of float64 numpy arrays); rows follow CONFIGS
    configs = BBDM_CONFIGS
    models = [make_bbdm(cls, mt_type=mt, max_var=mv) for mt, mv in configs]
    out["configs/mt_type"] = np.asarray([mt for mt, _ in configs])
    out["configs/max_var"] = np.asarray([mv for _, mv in configs])
    out["configs/objectives"] = np.asarray(OBJECTIVES)
    out["schedule/m_t"] = np.stack([m.m_t.numpy() for m in models])
    out["schedule/variance_t"] = np.stack([m.variance_t.numpy() for m in models])

    # --- skip-step lists (official register_schedule with skip_sample=True, sample_type 'linear')
    for T, sizes in [(1000, [3, 4, 5, 10, 11, 20, 50, 100, 200, 250, 500, 501, 502, 600, 999, 1000, 1001, 1500]),
                     (100, [3, 10, 50, 99, 100])]:
        lists = [official_skip_steps(cls, T, S).astype(np.int16) for S in sizes]
        out[f"steps/T{T}/sizes"] = np.asarray(sizes, dtype=np.int64)
        out[f"steps/T{T}/lengths"] = np.asarray([len(s) for s in lists], dtype=np.int64)  # != S for S > T
        out[f"steps/T{T}/concat"] = np.concatenate(lists)
        out[f"steps/T{T}/no_skip"] = make_bbdm(cls, num_timesteps=T, skip_sample=False).steps.numpy().astype(np.int16)
    # compact digest for every S in 3..1200 (T = 1000): length, sum, position-weighted sum (1-based)
    digest = []
    for S in range(3, 1201):
        s = official_skip_steps(cls, 1000, S).astype(np.int64)
        digest.append([len(s), s.sum(), (s * np.arange(1, len(s) + 1)).sum()])
    out["steps/T1000/digest_S3_to_1200"] = np.asarray(digest, dtype=np.int64)

    # --- training: q_sample (x_t, objective) and predict_x0_from_objective, batched t.
    # Result arrays are indexed [config, objective, t-set, ...].
    shape = (4, 2, 4, 4)
    x0, y, noise, model_out, xt_free = (f32(*shape) for _ in range(5))
    out.update({"train/x0": x0.numpy(), "train/y": y.numpy(), "train/noise": noise.numpy(),
                "train/model_output": model_out.numpy(), "train/x_t_free": xt_free.numpy()})
    t_sets = [[0, 1, 500, 999], [137, 998, 2, 731]]
    out["train/t"] = np.asarray(t_sets, dtype=np.int64)
    res = {k: np.zeros((len(configs), len(OBJECTIVES), len(t_sets), *shape), np.float32)
           for k in ("x_t", "target", "x0_roundtrip", "x0_pred")}
    for ci, (mt, mv) in enumerate(configs):
        for oi, objective in enumerate(OBJECTIVES):
            m = make_bbdm(cls, mt_type=mt, max_var=mv, objective=objective)
            for ti, ts in enumerate(t_sets):
                t = torch.tensor(ts, dtype=torch.long)
                x_t, target = m.q_sample(x0, y, t, noise)
                res["x_t"][ci, oi, ti] = x_t.numpy()
                res["target"][ci, oi, ti] = target.numpy()
                # predict_x0 from the noised sample with the true target (round trip), and from a
                # free model output on a free x_t
                res["x0_roundtrip"][ci, oi, ti] = m.predict_x0_from_objective(x_t, y, t, target).numpy()
                res["x0_pred"][ci, oi, ti] = m.predict_x0_from_objective(xt_free, y, t, model_out).numpy()
    out.update({f"train/{k}": v for k, v in res.items()})

    # --- single reverse steps (p_sample) with the toy net and a fixed noise tensor.
    # step/cases rows: S, config row (0 linear, 1 sin), eta, objective index, clip, i, steps[i], steps[i+1] or -1
    sshape = (2, 1, 4, 4)
    s_xt, s_y, s_noise = f32(*sshape), f32(*sshape), f32(*sshape)
    out.update({"step/x_t": s_xt.numpy(), "step/y": s_y.numpy(), "step/noise": s_noise.numpy()})
    cases, prevs, x0s = [], [], []
    for S in (200, 10):
        n = len(official_skip_steps(cls, 1000, S))
        for ci in (0, 1):
            for eta in (0, 1):
                for oi, clip in [(0, 0), (1, 0), (2, 0), (0, 1)]:
                    m = make_bbdm(cls, mt_type=configs[ci][0], eta=float(eta), objective=OBJECTIVES[oi], sample_step=S)
                    for i in sorted({0, 1, n // 2, n - 2, n - 1}):
                        with fixed_randn_like([s_noise]):
                            prev, x0r = m.p_sample(s_xt, s_y, s_y, i, clip_denoised=bool(clip))
                        nxt = int(m.steps[i + 1]) if i + 1 < n else -1
                        cases.append([S, ci, eta, oi, clip, i, int(m.steps[i]), nxt])
                        prevs.append(prev.numpy())
                        x0s.append(x0r.numpy())
    out["step/cases"] = np.asarray(cases, dtype=np.int64)
    out["step/prev_sample"] = np.stack(prevs)
    out["step/pred_x0"] = np.stack(x0s)

    # --- whole official sampling loops (p_sample_loop) with the toy net
    loops = [
        ("S10_linear_eta1_grad", dict(mt_type="linear", eta=1.0, objective="grad", sample_step=10), False),
        ("S10_linear_eta1_grad_clip", dict(mt_type="linear", eta=1.0, objective="grad", sample_step=10), True),
        ("S20_sin_eta1_noise", dict(mt_type="sin", eta=1.0, objective="noise", sample_step=20), False),
        ("S20_sin_eta0_ysubx", dict(mt_type="sin", eta=0.0, objective="ysubx", sample_step=20), False),
        ("S600_linear_eta0_grad", dict(mt_type="linear", eta=0.0, objective="grad", sample_step=600), False),
        ("noskip_linear_eta0_grad", dict(mt_type="linear", eta=0.0, objective="grad", skip_sample=False), False),
    ]
    out["loop/y"] = s_y.numpy()
    for name, kwargs, clip in loops:
        m = make_bbdm(cls, **kwargs)
        n = len(m.steps)
        noises = [f32(*sshape) for _ in range(n)]
        with fixed_randn_like(noises):
            imgs, _ = m.p_sample_loop(s_y, s_y, clip_denoised=clip, sample_mid_step=True)
        if kwargs["eta"] != 0.0:  # the noise only matters when eta > 0
            out[f"loop/{name}/noises"] = torch.stack(noises).numpy()
            out[f"loop/{name}/samples"] = torch.stack(imgs[1:]).numpy()
        out[f"loop/{name}/final"] = imgs[-1].numpy()
    return out


# ------------------------------------------------------------------------------------------------
# ResShift


def load_resshift(root: Path):
    sys.path.insert(0, str(root))
    # gaussian_diffusion imports an autoencoder class it only needs for latent decoding.
    stub_module("ldm", __path__=[])
    stub_module("ldm.models", __path__=[])
    stub_module("ldm.models.autoencoder", AutoencoderKLTorch=object)
    import models.gaussian_diffusion as gd  # noqa: PLC0415
    import models.script_util as script_util  # noqa: PLC0415

    return gd, script_util


RESSHIFT_CONFIGS = {
    # realsr_swinunet_realesrgan256_journal.yaml (and the other 4-step configs)
    "c4": dict(steps=4, kappa=2.0, min_noise_level=0.2, etas_end=0.99, power=0.3),
    # realsr_swinunet_realesrgan256.yaml (15 steps, NeurIPS paper setting)
    "c15": dict(steps=15, kappa=2.0, min_noise_level=0.04, etas_end=0.99, power=0.3),
    # script_util defaults with 1000 steps (schedule only)
    "c1000": dict(steps=1000, kappa=1.0, min_noise_level=0.01, etas_end=0.99, power=0.3),
}


class _IdentityAE(torch.nn.Module):
    """First-stage model stand-in: p_sample_loop_progressive asks it for a parameter and encode()."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return x


class _ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, lq):
        return resshift_toy_net(x, t, lq)


def record_resshift(root: Path) -> dict[str, np.ndarray]:
    gd, script_util = load_resshift(root)
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(20240602)

    def f32(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    def diffusion(cfg, *, latent_flag=True, normalize_input=True):
        sqrt_etas = gd.get_named_eta_schedule("exponential", num_diffusion_timesteps=cfg["steps"],
                                              min_noise_level=cfg["min_noise_level"], etas_end=cfg["etas_end"],
                                              kappa=cfg["kappa"], kwargs={"power": cfg["power"]})
        return gd.GaussianDiffusion(sqrt_etas=sqrt_etas, kappa=cfg["kappa"], model_mean_type=gd.ModelMeanType.START_X,
                                    loss_type=gd.LossType.MSE, sf=1, scale_factor=1.0,
                                    normalize_input=normalize_input, latent_flag=latent_flag)

    for name, cfg in RESSHIFT_CONFIGS.items():
        d = diffusion(cfg)
        out[f"schedule/{name}/sqrt_etas"] = np.asarray(d.sqrt_etas, dtype=np.float64)
        out[f"schedule/{name}/etas"] = d.etas
        out[f"schedule/{name}/posterior_variance"] = d.posterior_variance
        out[f"schedule/{name}/posterior_log_variance_clipped"] = d.posterior_log_variance_clipped

    shape = (4, 2, 4, 4)
    for name, ts in (("c4", [0, 1, 2, 3]), ("c15", [0, 5, 9, 14])):
        cfg = RESSHIFT_CONFIGS[name]
        d = diffusion(cfg)
        x0, y, noise, x_t, pred = (f32(*shape) for _ in range(5))
        t = torch.tensor(ts, dtype=torch.long)
        p = f"{name}/"
        out.update({p + "x0": x0.numpy(), p + "y": y.numpy(), p + "noise": noise.numpy(), p + "x_t": x_t.numpy(),
                    p + "pred_x0": pred.numpy(), p + "t": t.numpy()})
        out[p + "q_sample"] = d.q_sample(x0, y, t, noise).numpy()
        mean, var, logvar = d.q_posterior_mean_variance(x0, x_t, t)
        out[p + "posterior_mean"] = mean.numpy()
        out[p + "posterior_variance"] = var.numpy()
        out[p + "posterior_log_variance"] = logvar.numpy()
        out[p + "prior_sample"] = d.prior_sample(y, noise).numpy()
        out[p + "scale_input/latent"] = d._scale_input(x_t, t).numpy()
        out[p + "scale_input/pixel"] = diffusion(cfg, latent_flag=False)._scale_input(x_t, t).numpy()
        out[p + "scale_input/none"] = diffusion(cfg, normalize_input=False)._scale_input(x_t, t).numpy()
        for clip in (False, True):
            with fixed_randn_like([noise]):
                res = d.p_sample(lambda x, tt, pred=pred: pred, x_t, y, t, clip_denoised=clip)
            key = p + f"p_sample/{'clip' if clip else 'noclip'}"
            out[key + "/sample"] = res["sample"].numpy()
            out[key + "/pred_xstart"] = res["pred_xstart"].numpy()
            out[key + "/mean"] = res["mean"].numpy()

    # whole chain with the official respaced diffusion object and the toy net
    cfg = RESSHIFT_CONFIGS["c4"]
    for clip in (False, True):
        d = script_util.create_gaussian_diffusion(
            normalize_input=True, schedule_name="exponential", sf=1, min_noise_level=cfg["min_noise_level"],
            steps=cfg["steps"], kappa=cfg["kappa"], etas_end=cfg["etas_end"], schedule_kwargs={"power": cfg["power"]},
            weighted_mse=False, predict_type="xstart", timestep_respacing=None, scale_factor=1.0, latent_flag=True)
        y = f32(2, 1, 4, 4)
        prior_noise = f32(2, 1, 4, 4)
        step_noises = [f32(2, 1, 4, 4) for _ in range(cfg["steps"])]
        with fixed_randn_like(step_noises):
            chain = list(d.p_sample_loop_progressive(y, _ToyNet(), first_stage_model=_IdentityAE(), noise=prior_noise,
                                                     clip_denoised=clip, model_kwargs={"lq": y}))
        key = f"loop/c4/{'clip' if clip else 'noclip'}"
        out[key + "/y"] = y.numpy()
        out[key + "/prior_noise"] = prior_noise.numpy()
        out[key + "/noises"] = torch.stack(step_noises).numpy()
        out[key + "/samples"] = torch.stack([c["sample"] for c in chain]).numpy()
        out[key + "/pred_xstart"] = torch.stack([c["pred_xstart"] for c in chain]).numpy()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bbdm", type=Path, help="exported xuekt98/BBDM repository")
    parser.add_argument("resshift", type=Path, help="exported zsyOAOA/ResShift repository")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "Testing" / "data")
    parser.add_argument("--bbdm-commit", default=None, help="commit the export came from (recorded in the npz)")
    parser.add_argument("--resshift-commit", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)

    for label, root, commit, record, fname in (
        ("BBDM", args.bbdm, args.bbdm_commit, record_bbdm, "bbdm_reference.npz"),
        ("ResShift", args.resshift, args.resshift_commit, record_resshift, "resshift_reference.npz"),
    ):
        data = record(root.resolve())
        data["meta/source"] = np.asarray(f"{label} official code, commit {commit or git_head(root)}")
        data["meta/torch"] = np.asarray(torch.__version__)
        data["meta/numpy"] = np.asarray(np.__version__)
        path = args.out / fname
        np.savez_compressed(path, **data)
        print(f"{path}: {len(data)} arrays, {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
