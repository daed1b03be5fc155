"""MedTranslateLib.diffusion against numbers recorded by running the OFFICIAL code.

Testing/data/bbdm_reference.npz and resshift_reference.npz were written by
benchmarks/make_scheduler_references.py from xuekt98/BBDM (commit 02c3b13) and zsyOAOA/ResShift
(commit 3ce1d81), not from our code. Agreement is required to 1e-6 (absolute, relative for the few
values larger than 1). Set MEDTRANSLATE_DIFF_LOG=<file> to append the max difference of every
comparison to that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from MedTranslateLib.diffusion import BrownianBridgeScheduler, ResShiftScheduler
from MedTranslateLib.diffusion.brownian_bridge import bbdm_skip_timesteps

DATA = Path(__file__).parent / "data"
TOL = 1e-6
#: Tolerance of the float64 schedules (absolute; relative above 1). They go through exp, log and
#: pow, which each libm may round differently in the last bit (<= 1 ulp, 2.2e-16 relative, per
#: call); over a dozen chained operations that adds up to ~1e-15 (a fresh machine measured
#: 1.11e-15). 1e-12 is ~4500 ulps: far above rounding, far below any difference that matters.
#: Bit-identical agreement is only promised where the same operations run in the same order.
SCHEDULE_TOL = 1e-12


@pytest.fixture(scope="module")
def bbdm():
    return np.load(DATA / "bbdm_reference.npz")


@pytest.fixture(scope="module")
def rs():
    return np.load(DATA / "resshift_reference.npz")


def _close(name: str, actual, expected, tol: float = TOL) -> None:
    a = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = np.asarray(expected, dtype=np.float64)
    a = np.broadcast_to(a, e.shape)
    diff = np.abs(a - e)
    scaled = diff / np.maximum(1.0, np.abs(e))
    worst = float(scaled.max()) if scaled.size else 0.0
    log = os.environ.get("MEDTRANSLATE_DIFF_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{name}\t{float(diff.max()) if diff.size else 0.0:.3e}\t{worst:.3e}\n")
    assert worst <= tol, f"{name}: max difference {worst:.3e} > {tol:g}"


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


# The deterministic stand-in networks used when the references were recorded.
def bbdm_toy_net(x_t, t, y):
    return 0.05 * torch.tanh(x_t) - 0.02 * y + 1e-4 * t.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))


def resshift_toy_net(x_in, t, y):
    return 0.6 * x_in + 0.3 * y - 0.05 * t.to(x_in.dtype).view(-1, *([1] * (x_in.dim() - 1)))


def _batch_t(t: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), int(t), dtype=torch.long)


# ================================================================================================
# Brownian bridge (BBDM)

OBJECTIVES = ("grad", "noise", "ysubx")


def _configs(bbdm):
    return [(str(mt), float(mv)) for mt, mv in zip(bbdm["configs/mt_type"], bbdm["configs/max_var"], strict=True)]


def test_bbdm_schedules_match_official(bbdm):
    for row, (mt, mv) in enumerate(_configs(bbdm)):
        s = BrownianBridgeScheduler(mt_type=mt, max_var=mv)
        # official buffers are float32 copies of float64 numpy arrays: ours cast the same way
        _close(f"bbdm/m_t/{mt}", s.m_t.float(), bbdm["schedule/m_t"][row], tol=0)
        _close(f"bbdm/variance_t/{mt}/{mv}", s.variance_t.float(), bbdm["schedule/variance_t"][row], tol=0)


def _official_lists(bbdm, T):
    sizes, lengths, concat = bbdm[f"steps/T{T}/sizes"], bbdm[f"steps/T{T}/lengths"], bbdm[f"steps/T{T}/concat"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return {int(S): concat[offsets[k]:offsets[k + 1]].astype(int).tolist() for k, S in enumerate(sizes)}


@pytest.mark.parametrize("T", [1000, 100])
def test_bbdm_skip_schedule_matches_official(bbdm, T):
    no_skip = bbdm[f"steps/T{T}/no_skip"].astype(int).tolist()
    for S, official in _official_lists(bbdm, T).items():
        assert bbdm_skip_timesteps(T, S) == official, S
        s = BrownianBridgeScheduler(num_train_timesteps=T)
        s.set_timesteps(S)
        ours = s.timesteps.tolist()
        if S >= T:
            assert ours == no_skip, S  # the official skip_sample=False schedule
        else:
            deduped = [v for k, v in enumerate(official) if k == 0 or v != official[k - 1]]
            assert ours == deduped, S
            assert len(ours) == S - (len(official) - len(deduped))
    assert BrownianBridgeScheduler(num_train_timesteps=T).timesteps.tolist() == no_skip


def test_bbdm_skip_schedule_digest_every_size(bbdm):
    digest = bbdm["steps/T1000/digest_S3_to_1200"]
    for S, (length, total, weighted) in zip(range(3, 1201), digest, strict=True):
        ours = np.asarray(bbdm_skip_timesteps(1000, S), dtype=np.int64)
        assert (len(ours), ours.sum(), (ours * np.arange(1, len(ours) + 1)).sum()) == (length, total, weighted), S


def test_bbdm_skip_schedule_named_sizes(bbdm):
    lists = _official_lists(bbdm, 1000)
    assert lists[200][:4] == [999, 993, 988, 983] and lists[200][-4:] == [10, 5, 1, 0]
    for S in (200, 50, 10):
        s = BrownianBridgeScheduler()
        s.set_timesteps(S)
        assert s.timesteps.tolist() == lists[S] and len(s.timesteps) == S


@pytest.mark.parametrize("S", [3, 4, 10, 50, 200, 501, 502, 600, 999, 1000, 1500, None])
def test_bbdm_timesteps_properties(S):
    s = BrownianBridgeScheduler()
    s.set_timesteps(S)
    steps = s.timesteps.tolist()
    assert steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    assert s.timesteps.dtype == torch.long
    assert [s.next_timestep(t) for t in steps] == steps[1:] + [None]


def test_bbdm_training_quantities_match_official(bbdm):
    x0, y, noise = _t(bbdm["train/x0"]), _t(bbdm["train/y"]), _t(bbdm["train/noise"])
    out, x_free = _t(bbdm["train/model_output"]), _t(bbdm["train/x_t_free"])
    for ci, (mt, mv) in enumerate(_configs(bbdm)):
        for oi, objective in enumerate(OBJECTIVES):
            s = BrownianBridgeScheduler(mt_type=mt, max_var=mv, objective=objective)
            for ti, ts in enumerate(bbdm["train/t"]):
                t = torch.as_tensor(ts)
                key = f"bbdm/{mt}/{mv}/{objective}/t{ti}"
                x_t = s.add_noise(x0, y, noise, t)
                _close(f"{key}/add_noise", x_t, bbdm["train/x_t"][ci, oi, ti])
                target = s.training_target(x0, y, noise, t)
                _close(f"{key}/training_target", target, bbdm["train/target"][ci, oi, ti])
                # 'noise' divides the float32 x_t by (1 - m_t): its rounding (one float32 step,
                # which differs between CPUs' vector code) grows by kappa = 1 / (1 - m_t), up to
                # 134 at t = 998 (sin) and 1000 at t = 999; a fresh machine measured 6.0e-6 there.
                kappa = float((1.0 / (1.0 - s.m_t[t])).max()) if objective == "noise" else 1.0
                _close(f"{key}/predict_x0_roundtrip", s.predict_x0(target, x_t, y, t),
                       bbdm["train/x0_roundtrip"][ci, oi, ti], tol=TOL * kappa)
                _close(f"{key}/predict_x0", s.predict_x0(out, x_free, y, t), bbdm["train/x0_pred"][ci, oi, ti],
                       tol=TOL * kappa)


def test_bbdm_single_steps_match_official(bbdm):
    x_t, y, noise = _t(bbdm["step/x_t"]), _t(bbdm["step/y"]), _t(bbdm["step/noise"])
    cases = bbdm["step/cases"]
    assert len(cases) == 160
    seen = set()
    for row, (S, ci, eta, oi, clip, i, t, n) in enumerate(cases):
        mt = _configs(bbdm)[ci][0]
        s = BrownianBridgeScheduler(mt_type=mt, eta=float(eta), objective=OBJECTIVES[oi], clip_sample=bool(clip))
        s.set_timesteps(int(S))
        assert int(s.timesteps[i]) == t
        assert s.next_timestep(int(t)) == (None if n < 0 else int(n))
        out = bbdm_toy_net(x_t, _batch_t(t, x_t.shape[0]), y)
        prev, pred_x0 = s.step(out, int(t), x_t, y, noise=noise)
        key = f"bbdm/step/{mt}/eta{eta}/{OBJECTIVES[oi]}{'_clip' if clip else ''}"
        _close(f"{key}/prev_sample", prev, bbdm["step/prev_sample"][row])
        _close(f"{key}/pred_x0", pred_x0, bbdm["step/pred_x0"][row])
        seen.add((mt, eta, OBJECTIVES[oi], n < 0))
    assert len(seen) == 2 * 2 * 3 * 2  # both m_t, both eta, all objectives, last and non-last steps


_LOOPS = {
    "S10_linear_eta1_grad": dict(mt_type="linear", eta=1.0, objective="grad", S=10),
    "S10_linear_eta1_grad_clip": dict(mt_type="linear", eta=1.0, objective="grad", S=10, clip_sample=True),
    "S20_sin_eta1_noise": dict(mt_type="sin", eta=1.0, objective="noise", S=20),
    "S20_sin_eta0_ysubx": dict(mt_type="sin", eta=0.0, objective="ysubx", S=20),
    "S600_linear_eta0_grad": dict(mt_type="linear", eta=0.0, objective="grad", S=600),  # official repeats t=1
    "noskip_linear_eta0_grad": dict(mt_type="linear", eta=0.0, objective="grad", S=None),
}


@pytest.mark.parametrize("name", list(_LOOPS))
def test_bbdm_sampling_loop_matches_official(bbdm, name):
    cfg = dict(_LOOPS[name])
    S = cfg.pop("S")
    s = BrownianBridgeScheduler(**cfg)
    s.set_timesteps(S)
    y = _t(bbdm["loop/y"])
    noises = _t(bbdm[f"loop/{name}/noises"]) if f"loop/{name}/noises" in bbdm else None
    x, samples = y, []
    for k, t in enumerate(s.timesteps):
        out = bbdm_toy_net(x, _batch_t(t, y.shape[0]), y)
        x, _ = s.step(out, t, x, y, noise=None if noises is None else noises[k])
        samples.append(x)
    if noises is not None:
        _close(f"bbdm/loop/{name}/samples", torch.stack(samples), bbdm[f"loop/{name}/samples"])
    _close(f"bbdm/loop/{name}/final", x, bbdm[f"loop/{name}/final"])


def test_bbdm_add_noise_ends():
    """Official m_0 = 0.001 and m_{T-1} = 0.999: the ends are close to, not equal to, x0 and y."""
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    zero = torch.zeros_like(x0)
    for mt in ("linear", "sin"):
        s = BrownianBridgeScheduler(mt_type=mt)
        m0 = 0.001 if mt == "linear" else 1.0075**-1000  # ≈ 5.7e-4 for 'sin'
        assert float(s.m_t[0]) == pytest.approx(m0, rel=1e-12) and float(s.m_t[-1]) == 0.999
        start, end = s.add_noise(x0, y, zero, 0), s.add_noise(x0, y, zero, 999)
        torch.testing.assert_close(start, (1 - m0) * x0 + m0 * y)
        torch.testing.assert_close(end, 0.001 * x0 + 0.999 * y)
        # the bridge's noise is small but not zero at both ends: δ = 2(m - m²)
        assert float(s.variance_t[-1]) == pytest.approx(2 * (0.999 - 0.999**2))
        assert (start - x0).abs().max() <= 0.0011 * (y - x0).abs().max()


def test_bbdm_targets_definitions():
    g = torch.Generator().manual_seed(1)
    x0, y, eps = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([5, 400, 990])
    for objective in OBJECTIVES:
        s = BrownianBridgeScheduler(objective=objective)
        x_t = s.add_noise(x0, y, eps, t)
        target = s.training_target(x0, y, eps, t)
        torch.testing.assert_close(s.predict_x0(target, x_t, y, t), x0, atol=2e-4, rtol=0)
    s = BrownianBridgeScheduler(objective="grad")
    torch.testing.assert_close(s.training_target(x0, y, eps, t), s.add_noise(x0, y, eps, t) - x0)


def test_bbdm_last_step_returns_pred_x0():
    g = torch.Generator().manual_seed(2)
    x, y, out = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    for objective in OBJECTIVES:
        s = BrownianBridgeScheduler(objective=objective)
        s.set_timesteps(10)
        prev, pred = s.step(out, 0, x, y)
        torch.testing.assert_close(prev, pred, rtol=0, atol=0)
        torch.testing.assert_close(pred, s.predict_x0(out, x, y, 0))
    s = BrownianBridgeScheduler(clip_sample=True)
    s.set_timesteps(10)
    prev, pred = s.step(out * 10, 0, x, y)
    assert pred.abs().max() <= 1 and torch.equal(prev, pred)


def test_bbdm_step_is_posterior_for_unit_steps():
    """For n = t - 1 the step mean is q(x_{t-1} | x_t, x0, y) with the corrected eq. 12 coefficients."""
    s = BrownianBridgeScheduler(eta=0.0, objective="ysubx")
    g = torch.Generator().manual_seed(3)
    x_t, y, x0 = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m, d = s.m_t, s.variance_t
    for t in (1, 2, 300, 998, 999):
        mean, _ = s.step(y - x0, t, x_t, y)  # 'ysubx': x̂0 = y - out = x0
        d_cond = d[t] - d[t - 1] * ((1 - m[t]) / (1 - m[t - 1])) ** 2  # δ_{t|t-1}
        expected = (d[t - 1] / d[t] * (1 - m[t]) / (1 - m[t - 1]) * x_t
                    + (1 - m[t - 1]) * d_cond / d[t] * x0
                    + (m[t - 1] - m[t] * (1 - m[t]) / (1 - m[t - 1]) * d[t - 1] / d[t]) * y)
        torch.testing.assert_close(mean, expected, rtol=1e-9, atol=1e-9)


def test_bbdm_generator_determinism_and_eta():
    y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def run(seed, eta):
        s = BrownianBridgeScheduler(eta=eta)
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(seed)
        x = y
        for t in s.timesteps:
            x, _ = s.step(bbdm_toy_net(x, _batch_t(t, 2), y), t, x, y, generator=g)
        return x

    assert torch.equal(run(0, 1.0), run(0, 1.0))
    assert not torch.equal(run(0, 1.0), run(1, 1.0))
    assert torch.equal(run(0, 0.0), run(1, 0.0))  # η = 0: deterministic, no noise drawn


def test_bbdm_shapes_dtypes_and_batched_t():
    s = BrownianBridgeScheduler()
    x0 = torch.randn(4, 3, 8, 8)
    y, eps = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    out = s.add_noise(x0, y, eps, t)
    assert out.shape == x0.shape and out.dtype == torch.float32
    for k in range(4):  # batched t equals per-sample scalar t
        torch.testing.assert_close(out[k:k + 1], s.add_noise(x0[k:k + 1], y[k:k + 1], eps[k:k + 1], int(t[k])),
                                   rtol=0, atol=0)
    assert s.training_target(x0, y, eps, t).shape == x0.shape
    assert s.add_noise(x0.double(), y.double(), eps.double(), t).dtype == torch.float64
    half = s.add_noise(x0.half(), y.half(), eps.half(), t)
    assert half.dtype == torch.float16
    s.set_timesteps(20)
    prev, pred = s.step(torch.zeros_like(x0), torch.full((4,), 999), x0, y, generator=torch.Generator().manual_seed(0))
    assert prev.shape == pred.shape == x0.shape
    with pytest.raises(ValueError):
        s.step(torch.zeros_like(x0), torch.tensor([999, 998, 999, 999]), x0, y)
    with pytest.raises(ValueError):
        s.step(torch.zeros_like(x0), 998, x0, y)  # not in the 20-step schedule
    with pytest.raises(ValueError):
        s.add_noise(x0, y, eps, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        s.add_noise(x0, y, eps, 1000)


def test_bbdm_rejects_bad_settings():
    for kwargs in (dict(mt_type="cosine"), dict(objective="eps"), dict(max_var=0.0), dict(eta=-1.0),
                   dict(num_train_timesteps=2)):
        with pytest.raises(ValueError):
            BrownianBridgeScheduler(**kwargs)
    with pytest.raises(ValueError):
        BrownianBridgeScheduler().set_timesteps(2)


# ================================================================================================
# ResShift

_RS_CONFIGS = {
    "c4": dict(num_train_timesteps=4, kappa=2.0, min_noise_level=0.2, etas_end=0.99, power=0.3),
    "c15": dict(num_train_timesteps=15, kappa=2.0, min_noise_level=0.04, etas_end=0.99, power=0.3),
    "c1000": dict(num_train_timesteps=1000, kappa=1.0, min_noise_level=0.01, etas_end=0.99, power=0.3),
}


@pytest.mark.parametrize("name", list(_RS_CONFIGS))
def test_resshift_schedule_matches_official(rs, name):
    s = ResShiftScheduler(**_RS_CONFIGS[name])
    _close(f"resshift/{name}/sqrt_etas", s.sqrt_etas, rs[f"schedule/{name}/sqrt_etas"], tol=SCHEDULE_TOL)
    _close(f"resshift/{name}/etas", s.etas, rs[f"schedule/{name}/etas"], tol=SCHEDULE_TOL)
    _close(f"resshift/{name}/posterior_variance", s.posterior_variance, rs[f"schedule/{name}/posterior_variance"],
           tol=SCHEDULE_TOL)
    _close(f"resshift/{name}/posterior_log_variance_clipped", s.posterior_log_variance_clipped,
           rs[f"schedule/{name}/posterior_log_variance_clipped"], tol=SCHEDULE_TOL)


def test_resshift_default_is_the_official_4_step_setting(rs):
    s = ResShiftScheduler()
    assert (s.num_train_timesteps, s.kappa, s.min_noise_level, s.etas_end, s.power) == (4, 2.0, 0.2, 0.99, 0.3)
    assert float(s.sqrt_etas[0]) == pytest.approx(0.1) and float(s.etas[-1]) == pytest.approx(0.99**2)
    assert s.timesteps.tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("name", ["c4", "c15"])
def test_resshift_quantities_match_official(rs, name):
    s = ResShiftScheduler(**_RS_CONFIGS[name])
    p = f"{name}/"
    x0, y, noise, x_t, pred = (_t(rs[p + k]) for k in ("x0", "y", "noise", "x_t", "pred_x0"))
    t = _t(rs[p + "t"])
    _close(f"resshift/{name}/add_noise", s.add_noise(x0, y, noise, t), rs[p + "q_sample"])
    mean, var = s.posterior(x0, x_t, t)
    _close(f"resshift/{name}/posterior_mean", mean, rs[p + "posterior_mean"])
    _close(f"resshift/{name}/posterior_variance", var, rs[p + "posterior_variance"])
    _close(f"resshift/{name}/prior_sample", s.prior_sample(y, noise), rs[p + "prior_sample"])
    for scaling in ("latent", "pixel", "none"):
        sc = ResShiftScheduler(**_RS_CONFIGS[name], input_scaling=scaling)
        _close(f"resshift/{name}/scale_model_input/{scaling}", sc.scale_model_input(x_t, t),
               rs[p + f"scale_input/{scaling}"])
    for clip in (False, True):
        sc = ResShiftScheduler(**_RS_CONFIGS[name], clip_sample=clip)
        key = p + f"p_sample/{'clip' if clip else 'noclip'}"
        prev, pred_x0 = sc.step(pred, t, x_t, noise=noise)
        _close(f"resshift/{name}/step/{'clip' if clip else 'noclip'}/prev_sample", prev, rs[key + "/sample"])
        _close(f"resshift/{name}/step/{'clip' if clip else 'noclip'}/pred_x0", pred_x0, rs[key + "/pred_xstart"])
        # the per-timestep (scalar t) path agrees with the batched one
        for k, tk in enumerate(t.tolist()):
            prev_k, _ = sc.step(pred[k:k + 1], tk, x_t[k:k + 1], noise=noise[k:k + 1])
            _close(f"resshift/{name}/step_scalar_t", prev_k, rs[key + "/sample"][k:k + 1])
        # official p_sample's mean: the posterior at the (clipped) x̂0
        mean, _ = sc.posterior(pred_x0, x_t, t)
        _close(f"resshift/{name}/step/{'clip' if clip else 'noclip'}/mean", mean, rs[key + "/mean"])


@pytest.mark.parametrize("clip", [False, True])
def test_resshift_sampling_loop_matches_official(rs, clip):
    key = f"loop/c4/{'clip' if clip else 'noclip'}"
    s = ResShiftScheduler(**_RS_CONFIGS["c4"], clip_sample=clip)
    y, noises = _t(rs[key + "/y"]), _t(rs[key + "/noises"])
    x = s.prior_sample(y, _t(rs[key + "/prior_noise"]))
    samples, preds = [], []
    for k, t in enumerate(s.timesteps):
        tb = _batch_t(t, y.shape[0])
        x, pred = s.step(resshift_toy_net(s.scale_model_input(x, tb), tb, y), tb, x, noise=noises[k])
        samples.append(x)
        preds.append(pred)
    _close(f"resshift/loop/{key}/samples", torch.stack(samples), rs[key + "/samples"])
    _close(f"resshift/loop/{key}/pred_x0", torch.stack(preds), rs[key + "/pred_xstart"])


def test_resshift_properties():
    s = ResShiftScheduler()
    y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.prior_sample(y, torch.zeros_like(y)), y)  # prior mean = y
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([s.prior_sample(y, generator=g) for _ in range(2000)])
    assert (draws.mean(0) - y).abs().mean() < 0.1
    assert draws.std(0).mean().item() == pytest.approx(2.0 * 0.99, rel=0.05)  # κ√η_T
    x0 = torch.randn_like(y)
    zero = torch.zeros_like(y)
    torch.testing.assert_close(s.add_noise(x0, y, zero, 3), x0 + 0.99**2 * (y - x0))
    # last step: no noise, returns x̂0 (posterior at t = 0 is x̂0 since η_{-1} = 0)
    prev, pred = s.step(x0, 0, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prev, x0, rtol=0, atol=0)
    assert torch.equal(pred, x0)
    clipped = ResShiftScheduler(clip_sample=True).step(3 * x0, 0, y)
    assert clipped[0].abs().max() <= 1 and torch.equal(clipped[0], clipped[1])
    # mixed batched t: no noise where t == 0
    big = torch.full((2, 1, 8, 8), 100.0)
    prev, _ = s.step(zero, torch.tensor([0, 2]), y, noise=big)
    torch.testing.assert_close(prev[0], zero[0], rtol=0, atol=0)
    assert prev[1].abs().min() > 1
    _, var = s.posterior(x0.repeat(2, 1, 1, 1), y.repeat(2, 1, 1, 1), torch.tensor([0, 1, 2, 3]))
    assert var.shape == (4, 1, 1, 1) and float(var[0]) == 0.0


def test_resshift_generator_determinism():
    s = ResShiftScheduler()
    y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = s.prior_sample(y, generator=g)
        for t in s.timesteps:
            x, _ = s.step(resshift_toy_net(s.scale_model_input(x, t), _batch_t(t, 2), y), t, x, generator=g)
        return x

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_resshift_paper_convention():
    code, paper = ResShiftScheduler(), ResShiftScheduler(eta_schedule_convention="paper")
    assert float(code.etas[-1]) == pytest.approx(0.9801) and float(paper.etas[-1]) == pytest.approx(0.99)
    assert float(code.etas[0]) == pytest.approx(0.01) and float(paper.etas[0]) == pytest.approx(0.001)
    c15 = _RS_CONFIGS["c15"]
    a, b = ResShiftScheduler(**c15), ResShiftScheduler(**c15, eta_schedule_convention="paper")
    assert float(a.etas[0]) == pytest.approx(4e-4) and float(b.etas[0]) == pytest.approx(4e-4)
    assert torch.all(paper.etas[1:] > paper.etas[:-1])


def test_resshift_shapes_and_errors():
    s = ResShiftScheduler()
    x0 = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 3])
    assert s.add_noise(x0, x0, x0, t).shape == x0.shape
    assert s.scale_model_input(x0.double(), t).dtype == torch.float64
    assert s.add_noise(x0.half(), x0.half(), x0.half(), 2).dtype == torch.float16
    s.set_timesteps(4)
    with pytest.raises(ValueError):
        s.set_timesteps(2)
    with pytest.raises(ValueError):
        s.add_noise(x0, x0, x0, 4)
    for kwargs in (dict(eta_schedule_convention="ddpm"), dict(input_scaling="max"), dict(num_train_timesteps=1),
                   dict(kappa=0.0)):
        with pytest.raises(ValueError):
            ResShiftScheduler(**kwargs)


# ================================================================================================
# Several branches through one scheduler (rlbcd's residual and target bridges)

def test_one_scheduler_steps_several_branches_independently():
    """A method with several branches (methods/diffusion_common.py) calls ``step`` once per
    branch at every timestep: a step keeps no state about the sample it moved, so interleaving
    two branches gives each exactly what it gets alone."""
    y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = {"target": 0.1 * y, "residual": -0.2 * y + 0.05}

    def alone(scheduler, branch, start):
        x = start
        for k, t in enumerate(scheduler.timesteps):
            noise = torch.full_like(y, 0.01 * (k + 1))
            if isinstance(scheduler, BrownianBridgeScheduler):
                x, _ = scheduler.step(outs[branch] * (k + 1), t, x, y, noise=noise)
            else:
                x, _ = scheduler.step(outs[branch] * (k + 1), t, x, noise=noise)
        return x

    bb, rs = BrownianBridgeScheduler(), ResShiftScheduler()
    bb.set_timesteps(6)
    for s in (bb, rs):
        start = y if s is bb else s.prior_sample(y, noise=torch.zeros_like(y))
        x = dict.fromkeys(outs, start)
        for k, t in enumerate(s.timesteps):
            noise = torch.full_like(y, 0.01 * (k + 1))
            for b in outs:
                args = (x[b], y) if s is bb else (x[b],)
                x[b], _ = s.step(outs[b] * (k + 1), t, *args, noise=noise)
        for b in outs:
            assert torch.equal(x[b], alone(s, b, start)), (type(s).__name__, b)
        assert not torch.equal(x["target"], x["residual"])
