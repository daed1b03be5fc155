"""The Lightning pieces: the module running a method's phases (with their stages and LR
schedules), the periodic checkpoint, the data module."""

from __future__ import annotations

import bisect
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..config import to_dict
from ..methods import TranslationMethod
from ..methods.base import TrainingStage
from .config import OptimConfig, TrainConfig
from .data import StepSampler
from .state import (
    _STATE_KEY,
    EMA,
    _rng_state,
    _set_rng_state,
    check_checkpoint,
    check_schedules,
    schedule_record,
)


class StagePlan:
    """Which phases train at each step: the method's ``training_stages()`` (one stage of every
    phase when it declares none). Lightning's ``global_step`` counts optimiser steps, one per
    phase that runs, so steps (batches) and optimiser steps convert through the plan."""

    def __init__(self, method: TranslationMethod) -> None:
        self.phases = list(method.optimization_phases())
        self.declared = list(method.training_stages())
        self.stages = self.declared or [TrainingStage("all", 0, tuple(self.phases))]
        starts = [s.start for s in self.stages]
        where = f"{method.name}.training_stages()"
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"{where}: stages must start at step 0 and in increasing steps, got {starts}")
        for s in self.stages:
            unknown = [p for p in s.phases if p not in self.phases]
            if not s.phases or unknown or len(set(s.phases)) != len(s.phases):
                raise ValueError(f"{where}: stage {s.name!r} must name distinct phases of {self.phases}, "
                                 f"got {list(s.phases)}")

    def _spans(self) -> list[tuple[TrainingStage, int, float]]:
        """(stage, first step, end step) in order; the last stage ends at infinity."""
        ends = [s.start for s in self.stages[1:]] + [float("inf")]
        return [(s, s.start, end) for s, end in zip(self.stages, ends, strict=True)]

    def stage_at(self, step: int) -> int:
        """Index of the stage of training step ``step``."""
        return bisect.bisect_right([s.start for s in self.stages], step) - 1

    def phases_at(self, step: int) -> list[str]:
        """The phases that run at ``step``, in ``optimization_phases()`` order."""
        stage = self.stages[self.stage_at(step)]
        return [p for p in self.phases if p in stage.phases]

    def optimizer_steps(self, steps: int) -> int:
        """Optimiser steps taken by the first ``steps`` steps."""
        return sum(len(s.phases) * max(0, min(end, steps) - start) for s, start, end in self._spans())

    def steps_done(self, optimizer_steps: int) -> int:
        """Steps completed after ``optimizer_steps`` optimiser steps (the inverse of ``optimizer_steps``)."""
        for s, start, end in self._spans():
            span = (end - start) * len(s.phases)
            if optimizer_steps < span:
                return start + optimizer_steps // len(s.phases)
            optimizer_steps -= span
        raise AssertionError("unreachable: the last stage never ends")

    def phase_steps(self, phase: str, steps: int) -> int:
        """How many of the first ``steps`` steps train ``phase``."""
        return sum(max(0, min(end, steps) - start) for s, start, end in self._spans() if phase in s.phases)

    def describe(self, step: int) -> str:
        """The log line of the stage of ``step``."""
        i = self.stage_at(step)
        s = self.stages[i]
        return f"step {step}: stage {i + 1}/{len(self.stages)} '{s.name}' — training phases: {', '.join(s.phases)}"


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, phase: str, steps: int) -> Any:
    """The LR scheduler of ``phase`` (None for a constant LR without warm-up), stepped once after
    every one of the phase's ``steps`` training steps (see ``OptimConfig``)."""
    from torch.optim import lr_scheduler as sched

    s = optim.schedule_for(phase)
    if s["schedule"] == "plateau":
        p = optim.plateau
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=p.factor, patience=p.patience,
                                       threshold=p.threshold, threshold_mode="rel", cooldown=p.cooldown,
                                       min_lr=s["lr_min"])
    warmup = s["warmup_steps"]
    main = None
    if s["schedule"] == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=s["lr_min"])
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return ramp if main is None else sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class TranslationModule(pl.LightningModule):
    """Method + training parts + optional EMA, trained with manual optimisation (one Adam and
    LR scheduler per phase of ``method.optimization_phases()``; the phases of the current stage
    run on each step, see ``StagePlan``).

    Logged per step: ``train/<phase>/<loss>`` of the phases that ran (NaN for a phase that ran
    before but not in this stage: Lightning would repeat its last values), ``train/<phase>/lr``
    of every phase (the LR the step used or, for a phase that did not run, its LR now) and, for a
    method with stages, ``train/stage`` (1-based); a line on stderr when the stage changes."""

    def __init__(self, method: TranslationMethod, parts: nn.ModuleDict, cfg: TrainConfig) -> None:
        super().__init__()
        self.method = method
        self.parts = parts
        self.cfg = cfg
        self.automatic_optimization = False
        self.phases = list(method.optimization_phases())
        self.plan = StagePlan(method)
        self._scheduled: list[str] = []  # phases with an LR scheduler, in lr_schedulers() order
        self._stage: int | None = None  # the stage of the last step run (for the log line)
        self._loss_keys: dict[str, list[str]] = {}  # what each phase logged last
        for phase in self.phases:
            s, steps = cfg.optim.schedule_for(phase), self.plan.phase_steps(phase, cfg.train.max_steps)
            if s["schedule"] == "cosine" and 0 < steps <= s["warmup_steps"]:
                raise ValueError(f"optim: phase {phase!r} trains {steps} steps, not more than its warmup_steps "
                                 f"({s['warmup_steps']}): nothing is left for the cosine schedule")
        decay = cfg.train.ema_decay if cfg.train.ema_decay is not None else method.ema_decay
        self.ema = EMA(method, decay) if decay else None
        self._rng_to_restore: dict[str, Any] | None = None
        self._val_sums: Tensor | None = None

    @property
    def step(self) -> int:
        """Training steps (batches) done; Lightning's global_step counts optimiser steps."""
        return self.plan.steps_done(self.trainer.global_step)

    @property
    def inference_model(self) -> TranslationMethod:
        """What validation uses and the bundle holds: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.method

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers, schedulers = [], []
        for phase in self.phases:
            params = list(self.method.phase_parameters(phase, self.parts))
            if not params:
                raise ValueError(f"{self.method.name}: phase {phase!r} has no parameters")
            settings = self.cfg.optim.for_phase(phase)
            cls = torch.optim.AdamW if settings["weight_decay"] > 0 else torch.optim.Adam
            optimizers.append(cls(params, **settings))
            steps = self.plan.phase_steps(phase, self.cfg.train.max_steps)
            scheduler = build_lr_scheduler(optimizers[-1], self.cfg.optim, phase, steps)
            if scheduler is not None:
                schedulers.append(scheduler)
                self._scheduled.append(phase)
        return (optimizers, schedulers) if schedulers else optimizers

    def _stage_note(self, step: int) -> str | None:
        """The stage line of the log when the stage changes (and on the first step run)."""
        stage = self.plan.stage_at(step)
        if not self.plan.declared or stage == self._stage:
            return None
        self._stage = stage
        return f"{self.method.name}: {self.plan.describe(step)}"

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        schedulers = self.lr_schedulers() or []
        schedulers = dict(zip(self._scheduled, schedulers if isinstance(schedulers, list) else [schedulers],
                              strict=True))
        step = self.step
        notes = [self._stage_note(step), self.method.set_training_progress(step)]  # dgpg stages follow the step
        for note in filter(None, notes):
            if self.trainer.is_global_zero:
                print(note, file=sys.stderr, flush=True)  # the current stderr (Lightning's log handler may hold an old one)
        logs: dict[str, Tensor | float] = {}
        active = self.plan.phases_at(step)
        for phase, opt in zip(self.phases, optimizers, strict=True):
            logs[f"train/{phase}/lr"] = float(opt.param_groups[0]["lr"])  # the LR of this step
            if phase not in active:  # not trained in this stage: its parameters and LR stay
                # Lightning repeats a metric's last value on steps that do not log it: log "none"
                logs.update(dict.fromkeys(self._loss_keys.get(phase, ()), float("nan")))
                continue
            losses = self.method.training_losses(batch, self.parts, phase)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            if self.cfg.optim.grad_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip,
                                    gradient_clip_algorithm="norm")
            opt.step()
            scheduler = schedulers.get(phase)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # BBDM steps it with each batch's loss; the mean over ranks keeps their LRs equal
                scheduler.step(float(self.trainer.strategy.reduce(losses["loss"].detach(), reduce_op="mean")))
            elif scheduler is not None:
                scheduler.step()
            self._loss_keys[phase] = [f"train/{phase}/{k}" for k in losses]
            logs.update({f"train/{phase}/{k}": v.detach().float() for k, v in losses.items()})
        if self.plan.declared:
            logs["train/stage"] = float(self.plan.stage_at(step) + 1)
        if self.ema is not None:
            self.ema.update(self.method)
        bs = int(batch["source"].shape[0])
        main = {f"train/{p}/loss" for p in self.phases}
        self.log_dict({k: v for k, v in logs.items() if k in main}, prog_bar=True, batch_size=bs)
        self.log_dict({k: v for k, v in logs.items() if k not in main}, batch_size=bs)

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from .. import metrics

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation never moves the training RNG
            torch.manual_seed(self.cfg.train.seed + batch_idx)
            pred = self.inference_model.validation_output(batch)
        pred_np = pred.detach().float().clamp(-1, 1).cpu().numpy()[:, 0]
        ref_np = batch["target"].detach().float().cpu().numpy()[:, 0]
        sums = np.zeros(4)
        for p, r in zip(pred_np, ref_np, strict=True):  # (H, W) slices, normalised units
            m = metrics.image_metrics(r, p, value_range=(-1.0, 1.0))
            sums += (m["mae"], min(m["psnr"], 100.0), m["ssim"], 1.0)
        assert self._val_sums is not None
        self._val_sums += torch.as_tensor(sums, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is None:
            return
        totals = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        count = float(totals[3])
        if count > 0:
            names = ("val/mae", "val/psnr", "val/ssim")
            # already summed over ranks; sync_dist averages equal values (and keeps Lightning quiet)
            self.log_dict({n: float(totals[i]) / count for i, n in enumerate(names)}, prog_bar=True,
                          sync_dist=True)
        self._val_sums = None

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_STATE_KEY] = {"step": self.step, "rng": _rng_state(), "method": self.cfg.method,
                                  "model": to_dict(self.cfg.model), "library_version": __version__,
                                  "schedules": {p: schedule_record(self.cfg, p) for p in self.phases}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = check_checkpoint(checkpoint, self.cfg)
        check_schedules(state, self.cfg, self.phases)
        self._rng_to_restore = state["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # after every setup step that might draw numbers
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


class PeriodicCheckpoint(pl.Callback):
    """``trainer.save_checkpoint(path)`` every ``every`` steps and at the last step."""

    def __init__(self, path: Path, every: int, max_steps: int) -> None:
        self.path, self.every, self.max_steps = path, every, max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.step
        if step % self.every == 0 or step >= self.max_steps:
            trainer.save_checkpoint(self.path, weights_only=False)


class TranslationDataModule(pl.LightningDataModule):
    """Loaders over ready datasets; built once the trainer knows rank and world size. Each rank
    takes its own share (``StepSampler`` for training, a strided subset for validation)."""

    def __init__(self, cfg: TrainConfig, datasets: dict[str, Dataset]) -> None:
        super().__init__()
        self.cfg, self.datasets = cfg, datasets

    def _kwargs(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"batch_size": d.batch_size, "num_workers": d.num_workers,
                # the worker base seed comes from this generator, not from the global RNG
                "generator": torch.Generator().manual_seed(self.cfg.train.seed)}

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        t = self.trainer
        sampler = StepSampler(len(ds), self.cfg.data.batch_size, self.cfg.train.max_steps, self.cfg.train.seed,
                              rank=t.global_rank, world=t.world_size, start=lambda: t.lightning_module.step)
        return DataLoader(ds, sampler=sampler, persistent_workers=self.cfg.data.num_workers > 0,
                          **self._kwargs())

    def val_dataloader(self) -> DataLoader | list:
        ds = self.datasets.get("val")
        if ds is None:
            return []
        t = self.trainer
        shard = torch.utils.data.Subset(ds, list(range(t.global_rank, len(ds), t.world_size)))
        return DataLoader(shard, shuffle=False, **self._kwargs())
