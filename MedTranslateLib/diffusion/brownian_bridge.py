"""Brownian-bridge diffusion scheduler (BBDM), number-for-number with the official code.

Reference: Li et al., "BBDM: Image-to-image Translation with Brownian Bridge Diffusion Models",
CVPR 2023 (arXiv 2205.07680), official code xuekt98/BBDM
``model/BrownianBridge/BrownianBridgeModel.py``. The two MedTranslate papers that build on it restate
the process: c2fmit (papers/000) eqs. (2)-(4) and rlbcd (papers/001) eqs. (1)-(3) / (4)-(6).

Process (index ``t`` = 0 … T-1 addresses the schedule arrays, exactly as in the official code):

- forward (BBDM §3.1 forward process; c2fmit eq. 2; rlbcd eqs. 1 and 4)::

      q(x_t | x0, y) = N((1 - m_t) x0 + m_t y, δ_t I),      δ_t = 2 s (m_t - m_t²)

  The papers write ``m_t = t/T``; the code uses ``m = linspace(0.001, 0.999, T)`` ('linear') or a
  normalised ``1.0075**linspace(0, T, T)`` ('sin'), so ``x_0`` is *not* exactly ``x0`` (m_0 = 0.001)
  and ``x_{T-1}`` is not exactly ``y`` (m_{T-1} = 0.999). ``s`` is ``max_var``.
- training objective (c2fmit eq. 4; rlbcd eqs. 3 and 6): the network regresses
  ``m_t (y - x0) + √δ_t ε`` ('grad', the papers' choice), ``ε`` ('noise') or ``y - x0`` ('ysubx').
- reverse (c2fmit eq. 3; rlbcd eqs. 2 and 5; BBDM §3.2 accelerated sampling) from ``t`` to the next
  sampled timestep ``n`` (DDIM-like skipping)::

      σ² = (δ_t - δ_n (1 - m_t)² / (1 - m_n)²) · δ_n / δ_t
      mean = (1 - m_n) x̂0 + m_n y + √((δ_n - σ²) / δ_t) · (x_t - (1 - m_t) x̂0 - m_t y)
      x_n = mean + η σ z

  η scales only the added noise, not σ² inside the mean (unlike DDIM). The step from the last
  timestep (0) returns x̂0 itself. For ``n = t - 1`` the mean is exactly the posterior mean
  μ̃_t(x_t, x0, y) of BBDM eq. 12 with x0 coefficient (1 - m_{t-1}) δ_{t|t-1} / δ_t. The printed
  eq. 12 has a different x0 coefficient (BBDM issue #29: a typo in the paper, the code is the
  correct posterior), so no "paper" variant is offered here.

Numerics: schedules are built in float64 with numpy exactly as the official ``register_schedule``
and kept as float64 tensors. At use they are cast to the compute dtype (float32, or float64 for
float64 samples; float16/bfloat16 samples are computed in float32 and cast back) and every formula is
evaluated in that dtype in the official order. For float32 inputs this reproduces the official
float32 buffers and arithmetic (bit-identical results in Testing/test_diffusion.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..nn.noise import Generators, randn

__all__ = ["BrownianBridgeScheduler"]

_OBJECTIVES = ("grad", "noise", "ysubx")
_MT_TYPES = ("linear", "sin")


# ----------------------------------------------------------------------------------------------
# helpers shared with resshift.py


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise (the official code works in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _timestep_index(t: int | Tensor, batch: int | None = None) -> Tensor:
    """``t`` as a CPU LongTensor: 0-d for a scalar, (B,) for a batch."""
    if isinstance(t, Tensor):
        if t.is_floating_point() or t.is_complex():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps must be integers, got {t}")
        t = t.detach().to("cpu", torch.long)
        if t.dim() > 1:
            raise ValueError(f"timesteps must be a scalar or a 1-D batch, got shape {tuple(t.shape)}")
        if t.dim() == 1 and batch is not None and t.numel() not in (1, batch):
            raise ValueError(f"{t.numel()} timesteps for a batch of {batch}")
        return t
    return torch.tensor(int(t), dtype=torch.long)


def _gather(schedule: Tensor, t: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``schedule[t]`` cast to ``dtype`` on ``like``'s device, shaped to broadcast over ``like``.

    A 0-d ``t`` gives a 0-d tensor; a (B,) ``t`` gives (B, 1, …, 1) matching ``like.dim()``.
    """
    n = schedule.numel()
    if bool((t < 0).any()) or bool((t >= n).any()):
        raise ValueError(f"timestep out of range [0, {n - 1}]: {t.tolist()}")
    values = schedule[t].to(dtype=dtype).to(like.device)
    if values.dim() == 1:
        values = values.reshape(-1, *([1] * (like.dim() - 1)))
    return values


def _standard_normal(like: Tensor, generator: Generators) -> Tensor:
    """N(0, I) noise shaped like ``like``: from the global RNG (None), one generator, or one
    generator per batch element (``nn.noise``); drawn on the generators' device, then moved."""
    if generator is None:
        return torch.randn_like(like)
    return randn(like.shape, generator, device=like.device, dtype=like.dtype)


def _scalar_timestep(timestep: int | Tensor) -> int:
    """A sampling step works on one timestep: int, 0-d tensor, or a batch holding one value."""
    t = _timestep_index(timestep)
    if t.dim() == 1:
        if t.numel() == 0 or not bool((t == t[0]).all()):
            raise ValueError(f"step() needs one timestep for the whole batch, got {t.tolist()}")
        t = t[0]
    return int(t)


# ----------------------------------------------------------------------------------------------


def bbdm_m_schedule(num_train_timesteps: int, mt_type: str) -> np.ndarray:
    """The official m_t (float64, index 0 … T-1)."""
    T = num_train_timesteps
    if mt_type == "linear":
        return np.linspace(0.001, 0.999, T)
    if mt_type == "sin":
        m = np.power(1.0075, np.linspace(0, T, T))
        m = m / m[-1]
        m[-1] = 0.999
        return m
    raise ValueError(f"mt_type must be one of {_MT_TYPES}, got {mt_type!r}")


def bbdm_skip_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """The official 'linear' skip schedule (BBDM ``register_schedule``, ``skip_sample=True``).

    ``arange(T-1, 1, -(T-1)/(S-2))`` truncated to integers, then ``1, 0`` appended; e.g. T = 1000,
    S = 200 gives 999, 993, 988, …, 5, 1, 0. Needs S >= 3.

    The official arange is a float32 ``torch.arange`` on the CPU, and its values near integers
    depend on how that kernel rounds: elements in whole pairs of 8-lane blocks are
    ``float32(float32(start + step·j) + k·step)`` (j the block start, k the lane, AVX2), the rest
    ``float32(start + step·i)``. For 22 of the S in 3 … 1200 at T = 1000 (83, 119, 155, …) a
    different rounding (exact arithmetic, or 16-lane AVX512 blocks) truncates one entry
    differently. This function reproduces the AVX2 result on every machine (the reference
    numbers in Testing/data were recorded on an AVX2 CPU).
    """
    T, S = int(num_train_timesteps), int(num_inference_steps)
    if S < 3:
        raise ValueError(f"the skip schedule needs at least 3 steps, got {S}")
    step = -((T - 1) / (S - 2))
    start = float(T - 1)
    count = int(np.ceil((1.0 - start) / step))
    idx = np.arange(count)
    lanes = 8
    vectorised = (count // (2 * lanes)) * 2 * lanes
    block = (idx // lanes) * lanes
    base = (start + step * block).astype(np.float32).astype(np.float64)
    values = np.where(idx < vectorised, base + (idx - block) * step, start + step * idx).astype(np.float32)
    return [int(v) for v in values.astype(np.int64)] + [1, 0]


class BrownianBridgeScheduler:
    """Brownian-bridge (BBDM) noise schedule, training targets and reverse sampling steps.

    Args:
        num_train_timesteps: T (official default 1000). Timesteps are indices 0 … T-1.
        mt_type: 'linear' or 'sin' m_t schedule (see module docstring).
        max_var: s in δ_t = 2 s (m_t - m_t²).
        eta: scales the noise added by ``step`` (0 = deterministic); does not change the mean.
        objective: what the network predicts: 'grad' (m_t (y - x0) + √δ_t ε), 'noise' (ε) or
            'ysubx' (y - x0).
        clip_sample: clamp x̂0 to [-1, 1] inside ``step`` (official ``clip_denoised``: True in the
            pixel-space BBDM config, False in the latent LBBDM configs).

    Sampling loop (x_T is the source itself, no noise is added)::

        scheduler.set_timesteps(200)
        x = y
        for t in scheduler.timesteps:
            out = net(x, t, y)
            x, x0 = scheduler.step(out, t, x, y, generator=g)
        # after the last timestep (0), x == x0 == x̂0
    """

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, mt_type: str = "linear", max_var: float = 1.0,
                 eta: float = 1.0, objective: str = "grad", clip_sample: bool = False):
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 3:
            raise ValueError(f"num_train_timesteps must be an integer >= 3, got {num_train_timesteps}")
        if mt_type not in _MT_TYPES:
            raise ValueError(f"mt_type must be one of {_MT_TYPES}, got {mt_type!r}")
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
        if not max_var > 0:
            raise ValueError(f"max_var must be > 0, got {max_var}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.mt_type = mt_type
        self.max_var = float(max_var)
        self.eta = float(eta)
        self.objective = objective
        self.clip_sample = bool(clip_sample)

        m = bbdm_m_schedule(self.num_train_timesteps, mt_type)
        variance = 2.0 * (m - m**2) * self.max_var
        #: m_t and δ_t, float64, index 0 … T-1
        self.m_t = torch.from_numpy(m)
        self.variance_t = torch.from_numpy(variance)

        self.num_inference_steps = self.num_train_timesteps
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._next: dict[int, int | None] = {}
        self._index_next()

    def __repr__(self) -> str:
        return (f"BrownianBridgeScheduler(num_train_timesteps={self.num_train_timesteps}, mt_type={self.mt_type!r}, "
                f"max_var={self.max_var}, eta={self.eta}, objective={self.objective!r}, "
                f"clip_sample={self.clip_sample}, num_inference_steps={self.num_inference_steps})")

    # ------------------------------------------------------------------ timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Choose the sampling timesteps (``self.timesteps``: T-1 first, 0 last).

        - ``3 <= n < T``: the official skip schedule (:func:`bbdm_skip_timesteps`). For n ≥ 502 at
          T = 1000 (in general when the last skipped value truncates to 1) the official list holds
          the timestep 1 twice; the official loop then runs an identity step 1 → 1 (σ = 0, mean =
          x_t). That repeat is dropped here, so ``len(timesteps)`` is n - 1 in those cases and the
          samples agree with the official ones to float32 rounding.
        - ``n >= T`` or ``None``: every timestep T-1 … 0 (the official ``skip_sample=False`` path;
          the skip formula itself would repeat timesteps there).
        """
        T = self.num_train_timesteps
        n = T if num_inference_steps is None else int(num_inference_steps)
        if n < 3:
            raise ValueError(f"the Brownian-bridge skip schedule needs at least 3 steps, got {num_inference_steps}")
        if n >= T:
            steps = list(range(T - 1, -1, -1))
        else:
            steps = []
            for s in bbdm_skip_timesteps(T, n):
                if not steps or s != steps[-1]:
                    steps.append(s)
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)
        self._index_next()

    def _index_next(self) -> None:
        steps = [int(s) for s in self.timesteps.tolist()]
        self._next = {s: (steps[k + 1] if k + 1 < len(steps) else None) for k, s in enumerate(steps)}

    def next_timestep(self, timestep: int | Tensor) -> int | None:
        """The timestep that ``step`` moves to from ``timestep`` (None after the last one)."""
        t = _scalar_timestep(timestep)
        if t not in self._next:
            raise ValueError(f"timestep {t} is not in the current schedule (set_timesteps; "
                             f"{self.num_inference_steps} steps from {int(self.timesteps[0])})")
        return self._next[t]

    # ------------------------------------------------------------------ training

    def add_noise(self, original_samples: Tensor, y: Tensor, noise: Tensor, timesteps: int | Tensor) -> Tensor:
        """x_t = (1 - m_t) x0 + m_t y + √δ_t ε (official ``q_sample``; c2fmit eq. 2, rlbcd eq. 4).

        Shapes: x0, y, noise (B, C, H, W); timesteps int or LongTensor (B,).
        """
        x0 = original_samples
        cdt = _compute_dtype(x0)
        t = _timestep_index(timesteps, x0.shape[0])
        m = _gather(self.m_t, t, x0, cdt)
        sigma = torch.sqrt(_gather(self.variance_t, t, x0, cdt))
        x0c, yc, nc = x0.to(cdt), y.to(cdt), noise.to(cdt)
        return ((1.0 - m) * x0c + m * yc + sigma * nc).to(x0.dtype)

    def training_target(self, original_samples: Tensor, y: Tensor, noise: Tensor, timesteps: int | Tensor) -> Tensor:
        """What the network regresses at (x_t, t) for ``self.objective`` (c2fmit eq. 4, rlbcd eq. 6).

        'grad': m_t (y - x0) + √δ_t ε; 'noise': ε; 'ysubx': y - x0. Shapes as in :meth:`add_noise`.
        """
        x0 = original_samples
        cdt = _compute_dtype(x0)
        x0c, yc, nc = x0.to(cdt), y.to(cdt), noise.to(cdt)
        if self.objective == "noise":
            target = nc
        elif self.objective == "ysubx":
            target = yc - x0c
        else:
            t = _timestep_index(timesteps, x0.shape[0])
            m = _gather(self.m_t, t, x0, cdt)
            sigma = torch.sqrt(_gather(self.variance_t, t, x0, cdt))
            target = m * (yc - x0c) + sigma * nc
        return target.to(x0.dtype)

    def predict_x0(self, model_output: Tensor, x_t: Tensor, y: Tensor, timesteps: int | Tensor) -> Tensor:
        """x̂0 from the network output (official ``predict_x0_from_objective``), no clipping.

        'grad': x_t - out; 'noise': (x_t - m_t y - √δ_t out) / (1 - m_t); 'ysubx': y - out.
        """
        cdt = _compute_dtype(x_t)
        out, xc, yc = model_output.to(cdt), x_t.to(cdt), y.to(cdt)
        if self.objective == "grad":
            x0 = xc - out
        elif self.objective == "ysubx":
            x0 = yc - out
        else:
            t = _timestep_index(timesteps, x_t.shape[0])
            m = _gather(self.m_t, t, x_t, cdt)
            sigma = torch.sqrt(_gather(self.variance_t, t, x_t, cdt))
            x0 = (xc - m * yc - sigma * out) / (1.0 - m)
        return x0.to(x_t.dtype)

    # ------------------------------------------------------------------ sampling

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, y: Tensor,
             noise: Tensor | None = None, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """One reverse step from ``timestep`` to :meth:`next_timestep` (official ``p_sample``).

        Args:
            model_output: network output at (sample, timestep), (B, C, H, W).
            timestep: the current timestep (an entry of ``self.timesteps``): int, 0-d tensor or a
                (B,) tensor holding one value.
            sample: x_t, (B, C, H, W).
            y: the bridge's other end (the source, or its latent), (B, C, H, W).
            noise: the standard normal z to add (drawn with ``generator`` when None: one
                generator, or one per batch element; not drawn at all when eta = 0 or at the last
                step).
        Returns:
            (prev_sample, pred_x0): x at the next timestep and x̂0 (clamped when ``clip_sample``).
            At the last timestep (0) both are x̂0.
        """
        t = _scalar_timestep(timestep)
        n = self.next_timestep(t)
        pred_x0 = self.predict_x0(model_output, sample, y, t)
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if n is None:
            return pred_x0, pred_x0

        cdt = _compute_dtype(sample)
        ti, ni = torch.tensor(t), torch.tensor(n)
        m_t = _gather(self.m_t, ti, sample, cdt)
        m_n = _gather(self.m_t, ni, sample, cdt)
        var_t = _gather(self.variance_t, ti, sample, cdt)
        var_n = _gather(self.variance_t, ni, sample, cdt)
        # σ² of the skip step t -> n (equals δ̃_t of the posterior when n = t - 1)
        sigma2 = (var_t - var_n * (1.0 - m_t) ** 2 / (1.0 - m_n) ** 2) * var_n / var_t
        x0c, xc, yc = pred_x0.to(cdt), sample.to(cdt), y.to(cdt)
        mean = (1.0 - m_n) * x0c + m_n * yc + torch.sqrt((var_n - sigma2) / var_t) * (xc - (1.0 - m_t) * x0c - m_t * yc)
        if self.eta == 0.0:
            return mean.to(sample.dtype), pred_x0
        if noise is None:
            noise = _standard_normal(sample, generator)
        prev = mean + torch.sqrt(sigma2) * self.eta * noise.to(cdt)
        return prev.to(sample.dtype), pred_x0
