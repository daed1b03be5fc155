"""ResShift residual-shifting diffusion scheduler, number-for-number with the official code.

Reference: Yue, Wang & Loy, "ResShift: Efficient Diffusion Model for Image Super-resolution by
Residual Shifting", NeurIPS 2023 (arXiv 2307.12348), official code zsyOAOA/ResShift
``models/gaussian_diffusion.py`` (``get_named_eta_schedule('exponential')``, ``GaussianDiffusion``).
The dfbk paper (papers/002) restates the process in its eqs. (2)-(4).

Process (index ``t`` = 0 … T-1 addresses the schedule arrays, as in the official code; the papers'
t = 1 … T is our t + 1):

- transition (dfbk eq. 2): q(x_t | x_{t-1}, y) = N(x_{t-1} + α_t (y - x0), κ² α_t I), α_t = η_t - η_{t-1}.
- marginal (ResShift §2, "model design"): q(x_t | x0, y) = N(x0 + η_t (y - x0), κ² η_t I); the
  prior is x_T ~ N(y, κ² η_T I).
- posterior / reverse (dfbk eq. 3): mean = (η_{t-1}/η_t) x_t + (α_t/η_t) x̂0,
  variance κ² η_{t-1} α_t / η_t; no noise is added at the last step (t = 0). The network predicts
  x0 (dfbk eq. 4 objective; the official configs train with plain MSE on x0) from the input scaled
  by 1/√(κ² η_t + 1) (latent_flag=True in every official config).
- schedule (ResShift §2, "noise schedule"): √η_t geometric in ``linspace(0, 1, T)**p · (T-1)``.

Schedule conventions (``eta_schedule_convention``):

- ``"code"`` (default, the official ``get_named_eta_schedule``): √η_1 = min(min_noise_level/κ,
  min_noise_level), √η_T = etas_end, so η_T = 0.99² = 0.9801 with the official etas_end.
- ``"paper"``: the NeurIPS paper's formula, η_1 = min((min_noise_level/κ)², 0.001) and η_T = etas_end
  (b_0 = exp(log(η_T/η_1) / (2(T-1)))). ResShift issue #137 reports the mismatch. For the 15-step
  setting (min_noise_level 0.04, κ 2) both give η_1 = 4e-4 and differ only at η_T; for the 4-step
  setting they also differ at η_1 (0.01 code, 0.001 paper).

Numerics: the schedule and every derived coefficient (posterior coefficients, clipped log-variance,
κ√η) are float64 numpy arrays computed as in the official ``GaussianDiffusion.__init__``; at use they
are cast to the compute dtype (float32, or float64 for float64 samples, as the official
``_extract_into_tensor(...).float()`` does for float32) and combined in the official order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..nn.noise import Generators
from .brownian_bridge import _compute_dtype, _gather, _standard_normal, _timestep_index

__all__ = ["ResShiftScheduler"]

_CONVENTIONS = ("code", "paper")
_INPUT_SCALINGS = ("latent", "pixel", "none")


def resshift_sqrt_etas(num_train_timesteps: int, kappa: float, min_noise_level: float, etas_end: float,
                       power: float, convention: str = "code") -> np.ndarray:
    """√η_t for t = 0 … T-1 (float64), the official 'exponential' schedule or the paper's variant."""
    T = int(num_train_timesteps)
    if convention == "code":
        start, end = min(min_noise_level / kappa, min_noise_level), etas_end
    elif convention == "paper":
        start, end = math.sqrt(min((min_noise_level / kappa) ** 2, 0.001)), math.sqrt(etas_end)
    else:
        raise ValueError(f"eta_schedule_convention must be one of {_CONVENTIONS}, got {convention!r}")
    growth = math.exp(1 / (T - 1) * math.log(end / start))  # b_0 on the √η scale
    exponents = np.linspace(0, 1, T, endpoint=True) ** power * (T - 1)
    return np.power(np.full(T, growth), exponents) * start


class ResShiftScheduler:
    """ResShift noise schedule, forward noising, posterior and reverse sampling step.

    Args:
        num_train_timesteps: T (4 in the official journal / 4-step configs).
        kappa: κ, the noise scale.
        min_noise_level, etas_end, power: schedule parameters (official names).
        eta_schedule_convention: 'code' (official, default) or 'paper' (see module docstring).
        input_scaling: how :meth:`scale_model_input` normalises the network input: 'latent'
            (x / √(κ²η_t + 1), the official ``latent_flag=True``), 'pixel' (x / (3κ√η_t + 1),
            ``latent_flag=False``) or 'none' (``normalize_input=False``).
        clip_sample: clamp x̂0 to [-1, 1] in :meth:`step` (the official sampler does this when it
            works without an autoencoder).

    Sampling loop::

        x = scheduler.prior_sample(y, generator=g)
        for t in scheduler.timesteps:
            x0_hat = net(scheduler.scale_model_input(x, t), t, y)
            x, x0_hat = scheduler.step(x0_hat, t, x, generator=g)
    """

    order = 1

    def __init__(self, num_train_timesteps: int = 4, kappa: float = 2.0, min_noise_level: float = 0.2,
                 etas_end: float = 0.99, power: float = 0.3, eta_schedule_convention: str = "code",
                 input_scaling: str = "latent", clip_sample: bool = False):
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")
        if not kappa > 0 or not min_noise_level > 0 or not 0 < etas_end <= 1 or not power > 0:
            raise ValueError("need kappa > 0, min_noise_level > 0, 0 < etas_end <= 1 and power > 0; got "
                             f"kappa={kappa}, min_noise_level={min_noise_level}, etas_end={etas_end}, power={power}")
        if eta_schedule_convention not in _CONVENTIONS:
            raise ValueError(f"eta_schedule_convention must be one of {_CONVENTIONS}, got {eta_schedule_convention!r}")
        if input_scaling not in _INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {_INPUT_SCALINGS}, got {input_scaling!r}")
        self.num_train_timesteps = T = int(num_train_timesteps)
        self.kappa = float(kappa)
        self.min_noise_level = float(min_noise_level)
        self.etas_end = float(etas_end)
        self.power = float(power)
        self.eta_schedule_convention = eta_schedule_convention
        self.input_scaling = input_scaling
        self.clip_sample = bool(clip_sample)

        sqrt_etas = resshift_sqrt_etas(T, self.kappa, self.min_noise_level, self.etas_end, self.power,
                                       eta_schedule_convention)
        etas = sqrt_etas**2
        if not ((etas > 0).all() and (etas <= 1).all() and (np.diff(etas) > 0).all()):
            raise ValueError(f"the η schedule must increase within (0, 1]; got {etas.tolist()}")
        etas_prev = np.append(0.0, etas[:-1])
        alpha = etas - etas_prev
        posterior_variance = self.kappa**2 * etas_prev / etas * alpha
        # the variance is 0 at t = 0; its log is clipped to the t = 1 value (never used for noise)
        log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))

        as_tensor = torch.from_numpy
        #: √η_t and η_t, float64, index 0 … T-1
        self.sqrt_etas = as_tensor(sqrt_etas)
        self.etas = as_tensor(etas)
        self.etas_prev = as_tensor(etas_prev)
        self.alpha = as_tensor(alpha)
        self.posterior_variance = as_tensor(posterior_variance)
        self.posterior_log_variance_clipped = as_tensor(log_variance_clipped)
        self.posterior_mean_coef1 = as_tensor(etas_prev / etas)
        self.posterior_mean_coef2 = as_tensor(alpha / etas)
        self._noise_std = as_tensor(sqrt_etas * self.kappa)  # κ√η_t

        self.num_inference_steps = T
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"ResShiftScheduler(num_train_timesteps={self.num_train_timesteps}, kappa={self.kappa}, "
                f"min_noise_level={self.min_noise_level}, etas_end={self.etas_end}, power={self.power}, "
                f"eta_schedule_convention={self.eta_schedule_convention!r}, input_scaling={self.input_scaling!r}, "
                f"clip_sample={self.clip_sample})")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """ResShift samples every training timestep: ``timesteps`` is T-1 … 0.

        Only ``None`` or T is accepted (the official few-step models are trained for their T).
        """
        T = self.num_train_timesteps
        if num_inference_steps is not None and int(num_inference_steps) != T:
            raise ValueError(f"ResShift samples all {T} trained timesteps; got num_inference_steps={num_inference_steps}")
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ forward process

    def add_noise(self, original_samples: Tensor, y: Tensor, noise: Tensor, timesteps: int | Tensor) -> Tensor:
        """x_t = x0 + η_t (y - x0) + κ√η_t ε (official ``q_sample``).

        Shapes: x0, y, noise (B, C, H, W); timesteps int or LongTensor (B,).
        """
        x0 = original_samples
        cdt = _compute_dtype(x0)
        t = _timestep_index(timesteps, x0.shape[0])
        x0c, yc, nc = x0.to(cdt), y.to(cdt), noise.to(cdt)
        out = _gather(self.etas, t, x0, cdt) * (yc - x0c) + x0c + _gather(self._noise_std, t, x0, cdt) * nc
        return out.to(x0.dtype)

    def prior_sample(self, y: Tensor, noise: Tensor | None = None, generator: Generators = None) -> Tensor:
        """x_T = y + κ√η_T ε, the start of sampling (official ``prior_sample``). y: (B, C, H, W);
        ε is ``noise`` or drawn with ``generator`` (one, or one per batch element)."""
        cdt = _compute_dtype(y)
        if noise is None:
            noise = _standard_normal(y, generator)
        t = torch.tensor(self.num_train_timesteps - 1)
        out = y.to(cdt) + _gather(self._noise_std, t, y, cdt) * noise.to(cdt)
        return out.to(y.dtype)

    def posterior(self, original_samples: Tensor, x_t: Tensor, timesteps: int | Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (official ``q_posterior_mean_variance``; dfbk eq. 3).

        mean = (η_{t-1}/η_t) x_t + (α_t/η_t) x0 with the shape of x_t; variance = κ² η_{t-1} α_t / η_t,
        shaped (B, 1, 1, 1) for batched t (0-d for a scalar t); it is 0 at t = 0.
        """
        cdt = _compute_dtype(x_t)
        t = _timestep_index(timesteps, x_t.shape[0])
        mean = (_gather(self.posterior_mean_coef1, t, x_t, cdt) * x_t.to(cdt)
                + _gather(self.posterior_mean_coef2, t, x_t, cdt) * original_samples.to(cdt))
        variance = _gather(self.posterior_variance, t, x_t, cdt)
        return mean.to(x_t.dtype), variance.to(x_t.dtype)

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor) -> Tensor:
        """The network input for x_t (official ``_scale_input``; see ``input_scaling``)."""
        if self.input_scaling == "none":
            return sample
        cdt = _compute_dtype(sample)
        t = _timestep_index(timestep, sample.shape[0])
        if self.input_scaling == "latent":
            scale = torch.sqrt(_gather(self.etas, t, sample, cdt) * self.kappa**2 + 1)
        else:
            scale = _gather(self.sqrt_etas, t, sample, cdt) * self.kappa * 3 + 1
        return (sample.to(cdt) / scale).to(sample.dtype)

    # ------------------------------------------------------------------ sampling

    def step(self, pred_x0: Tensor, timestep: int | Tensor, sample: Tensor, noise: Tensor | None = None,
             generator: Generators = None) -> tuple[Tensor, Tensor]:
        """x_{t-1} from x_t and the network's x̂0 (official ``p_sample`` with START_X prediction).

        Args:
            pred_x0: the network output x̂0, (B, C, H, W); clamped to [-1, 1] when ``clip_sample``.
            timestep: t, an int, 0-d tensor or (B,) LongTensor.
            sample: x_t, (B, C, H, W).
            noise: standard normal noise (drawn with ``generator`` when None and t > 0: one
                generator, or one per batch element).
        Returns:
            (prev_sample, pred_x0). At t = 0 prev_sample is the posterior mean (no noise), which
            equals x̂0 because η_{-1} = 0.
        """
        cdt = _compute_dtype(sample)
        t = _timestep_index(timestep, sample.shape[0])
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = (_gather(self.posterior_mean_coef1, t, sample, cdt) * sample.to(cdt)
                + _gather(self.posterior_mean_coef2, t, sample, cdt) * pred_x0.to(cdt))
        if not bool((t != 0).any()):
            return mean.to(sample.dtype), pred_x0
        if noise is None:
            noise = _standard_normal(sample, generator)
        nonzero = (t != 0).to(cdt).to(sample.device)
        if nonzero.dim() == 1:
            nonzero = nonzero.reshape(-1, *([1] * (sample.dim() - 1)))
        std = torch.exp(0.5 * _gather(self.posterior_log_variance_clipped, t, sample, cdt))
        prev = mean + nonzero * std * noise.to(cdt)
        return prev.to(sample.dtype), pred_x0
