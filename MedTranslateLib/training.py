"""Training on PyTorch Lightning: one loop for every method, driven by a YAML config.

``training/train.py`` is a thin command line over :func:`load_train_config` and :func:`fit`.

What the loop does (Lightning, manual optimisation):

- Each batch runs the method's ``optimization_phases()`` in order; per phase: zero that phase's
  gradients, ``losses = method.training_losses(batch, parts, phase)``, backward ``losses["loss"]``,
  optionally clip, step the phase's Adam. Methods keep gradients out of other phases' parameters
  themselves (detach / frozen discriminator). ``step`` below means one batch (all phases), not
  Lightning's ``global_step``, which counts optimiser steps (phases x batches).
- EMA of the inference weights (``train.ema_decay``, else the method's ``ema_decay``): validation
  and the exported bundle use the averaged copy; it is saved in checkpoints.
- Validation every ``val_every`` steps on the validation split: MAE / PSNR / SSIM in normalised
  units ([-1, 1], PSNR and SSIM with data range 2), logged as ``val/mae`` ...
- Checkpoints: ``out_dir/checkpoints/last.ckpt`` every ``checkpoint_every`` steps and at the end,
  written atomically (temporary file in the same folder, fsync, ``os.replace``). Lightning's own
  ``ModelCheckpoint`` is not used: its manual-optimisation branch counts optimiser steps, and its
  writer (fsspec transaction) stages the file in the system temp folder, whose rename into place
  is a non-atomic copy when that is another file system.
- Exact resume: the training data order is a pure function of (seed, step) (:class:`StepSampler`),
  the data loaders draw no global random numbers, validation runs under a forked RNG, and the
  torch / numpy / Python RNG states are saved in the checkpoint and restored before the first
  resumed batch. Resuming therefore reproduces the uninterrupted run's losses (CPU; on GPU up to
  the non-determinism of cuDNN kernels).
- Checkpoints are read with ``torch.load(weights_only=True)`` only (tensors and plain Python
  values; RNG states are stored as tensors / lists for that reason).
- Logs: TensorBoard and CSV in ``out_dir/logs/version_N`` (a new version per start or resume;
  Lightning's ``step`` column is the number of batches done minus one); a progress bar on
  terminals. ``out_dir/config.yaml`` is the resolved config.
- Devices: ``train.devices`` / ``accelerator`` / ``strategy`` / ``num_nodes`` go to Lightning.
  Several devices use DDP (gloo on CPU, NCCL on GPU), launched by Lightning (it re-runs the
  command once per extra device) or by ``torchrun --nproc_per_node=N training/train.py ...``.
  DDP runs with ``find_unused_parameters=True`` because each phase's backward reaches only that
  phase's parameters. Every rank shards the batches itself (``use_distributed_sampler=False``).
- Precision ``auto``: ``bf16-mixed`` on GPUs that support it, else ``16-mixed`` on GPU, and
  ``32-true`` on CPU.
- At the end rank 0 writes the model bundle to ``out_dir/bundle`` (EMA weights when EMA is on).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from . import data as mdata
from .cases import model_split
from .config import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from .methods import TranslationMethod, build_method, get_method_class
from .regions import DEFAULT_ROIS
from .runtime import Precision, distributed_env

__all__ = [
    "DataConfig",
    "OptimConfig",
    "PhaseOptimConfig",
    "TrainSettings",
    "TrainConfig",
    "load_train_config",
    "case_splits",
    "build_datasets",
    "build_training_method",
    "StepSampler",
    "EMA",
    "TranslationModule",
    "TranslationDataModule",
    "PeriodicCheckpoint",
    "check_checkpoint",
    "AtomicCheckpointIO",
    "fit",
    "is_global_zero",
    "lightning_precision",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "last.ckpt"
_STATE_KEY = "medtranslate"


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where the cases are and how slices are taken (see ``data.SliceSpec``).

    ``root``: folder of case folders (relative paths are relative to the working directory).
    ``roi`` / ``roi_margin`` / ``min_foreground`` select training slices (e.g. around the liver).
    ``split``: train/val/test ratios of ``data.split_cases`` with ``split_seed``.
    ``paired``: None follows the method (``paired`` class attribute)."""

    root: str = ""
    source: str = "ct"
    target: str = "cta_arterial"
    source_preset: str | dict[str, Any] = "ct_abdomen"
    target_preset: str | dict[str, Any] = "ct_angio"
    size: int = 128
    axis: int = 0
    roi: str | None = None
    roi_margin: int = 4
    min_foreground: float = 0.0
    masks: list[str] = field(default_factory=lambda: list(DEFAULT_ROIS))
    split: tuple[float, float, float] = (7.0, 1.0, 2.0)
    split_seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    paired: bool | None = None

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("data.root is required (folder of case folders)")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")

    def slice_spec(self) -> mdata.SliceSpec:
        """The slicing spec of training; the bundle keeps it whole (``BundleMeta.slice``) and the
        volume engine slices with it (the in-plane box margin stays the default)."""
        return mdata.SliceSpec(size=self.size, axis=self.axis, roi=self.roi, roi_margin=self.roi_margin,
                               min_foreground=self.min_foreground)


@dataclass
class PhaseOptimConfig:
    """Per-phase overrides of the optimiser settings (None: the global value)."""

    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    """Adam (AdamW when weight_decay > 0) per phase; ``phases`` overrides by phase name."""

    lr: float = 2.0e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    phases: dict[str, PhaseOptimConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")

    def for_phase(self, phase: str) -> dict[str, Any]:
        over = self.phases.get(phase, PhaseOptimConfig())
        return {
            "lr": over.lr if over.lr is not None else self.lr,
            "betas": tuple(over.betas if over.betas is not None else self.betas),
            "weight_decay": over.weight_decay if over.weight_decay is not None else self.weight_decay,
        }


@dataclass
class TrainSettings:
    """Loop, devices and outputs. Steps are batches (every phase once per batch).

    ``val_every``: 0 = no validation; ``val_batches``: cap on validation batches per rank.
    ``progress_bar``: None = when stderr is a terminal."""

    max_steps: int = 200
    val_every: int = 50
    val_batches: int | None = None
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"
    devices: int | list[int] | str = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    ema_decay: float | None = None
    out_dir: str = "runs/run"
    progress_bar: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "checkpoint_every", "log_every", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise ValueError(f"train.val_every must be >= 0, got {self.val_every}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"train.val_batches must be >= 1 or null, got {self.val_batches}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")


@dataclass
class TrainConfig:
    """A training run: ``method`` name, its ``model`` config, data, optimiser, loop."""

    method: str
    data: DataConfig
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSettings = field(default_factory=TrainSettings)


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML, apply ``key.path=value`` overrides, validate everything (unknown
    keys, types, the method name, its ``model`` section, phase names). ValueError, one line
    naming the file, on any problem."""
    path = Path(path)
    where = str(path)
    raw = apply_overrides(load_yaml(path), list(overrides))
    cfg = from_dict(TrainConfig, raw, where=where)
    try:
        cls = get_method_class(cfg.method)
    except ValueError as exc:
        raise ValueError(f"'method' in {where}: {exc}") from None
    model_cfg = from_dict(cls.Config, cfg.model, where=where, prefix="model")
    cfg.model = to_dict(model_cfg)
    phases = build_training_method(cfg).optimization_phases() if cfg.optim.phases else []
    for name in cfg.optim.phases:
        if name not in phases:
            raise ValueError(f"unknown phase 'optim.phases.{name}' in {where}; {cfg.method} phases: "
                             f"{', '.join(phases)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def case_splits(cfg: DataConfig, paired: bool) -> dict[str, list[Path]]:
    """Case folders under ``cfg.root`` split into train / val / test: ``cases.model_split``
    (the split evaluation uses too) with ``cfg.split`` and ``cfg.split_seed``."""
    splits = model_split(cfg.root, cfg.source, cfg.target, paired=paired, ratios=cfg.split, seed=cfg.split_seed)
    if not splits["train"]:
        n = sum(len(v) for v in splits.values())
        raise ValueError(f"{cfg.root}: no training cases ({n} cases, split {list(cfg.split)})")
    return splits


def _paired(cfg: TrainConfig) -> bool:
    """Does this run train on paired slices? ``data.paired``, else the method's default."""
    return cfg.data.paired if cfg.data.paired is not None else get_method_class(cfg.method).paired


def build_training_method(cfg: TrainConfig) -> TranslationMethod:
    """The method of ``cfg`` with its pretrained parts: every bundle its config names
    (``pretrained_bundles``, e.g. a latent method's autoencoder) is loaded here and handed to the
    constructor, so methods never read files."""
    from .bundle import load_bundle

    cls = get_method_class(cfg.method)
    config = from_dict(cls.Config, cfg.model, where="config", prefix="model")
    pretrained = {name: load_bundle(Path(path)).method for name, path in cls.pretrained_bundles(config).items()}
    return build_method(cfg.method, config, pretrained=pretrained or None)


def build_datasets(cfg: DataConfig, paired: bool, splits: Mapping[str, Sequence[Path]],
                   names: Sequence[str] = ("train", "val")) -> dict[str, Dataset]:
    """Slice datasets of the named splits. Training is paired or unpaired as asked; validation
    and test are always paired (metrics need the reference). Empty splits are left out."""
    common = {"source": cfg.source, "target": cfg.target, "source_preset": cfg.source_preset,
              "target_preset": cfg.target_preset, "spec": cfg.slice_spec(), "masks": tuple(cfg.masks)}
    out: dict[str, Dataset] = {}
    for name in names:
        if not splits.get(name):
            warnings.warn(f"{cfg.root}: the {name} split has no cases", stacklevel=2)
        elif name == "train" and not paired:
            out[name] = mdata.UnpairedSliceDataset(splits[name], seed=cfg.split_seed, **common)
        else:
            out[name] = mdata.PairedSliceDataset(splits[name], **common)
    return out


class StepSampler(Sampler[int]):
    """Dataset indices for training steps ``start() .. total_steps - 1``, resumable at any step.

    The global sample stream is a fresh permutation of the dataset per pass, drawn from
    ``(seed, pass)``; step ``s`` on rank ``r`` of ``world`` takes positions
    ``(s * world + r) * batch_size ...`` of that stream. So the indices of a step depend on
    (seed, step, rank) only, and a resumed run sees exactly the batches of the uninterrupted one.
    ``start`` (an int or a callable giving the steps already done) is read at every ``iter()``.
    ``len()`` is always ``total_steps * batch_size``: Lightning's batch counters already hold the
    consumed part when it resumes mid-stream."""

    def __init__(self, n: int, batch_size: int, total_steps: int, seed: int, *, rank: int = 0,
                 world: int = 1, start: int | Callable[[], int] = 0) -> None:
        if n < 1:
            raise ValueError("StepSampler: empty dataset")
        self.n, self.batch_size, self.total_steps = n, batch_size, total_steps
        self.seed, self.rank, self.world, self.start = seed, rank, world, start
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total_steps * self.batch_size

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return int(self._perm[1][k])

    def __iter__(self) -> Iterator[int]:
        start = self.start() if callable(self.start) else self.start
        for step in range(start, self.total_steps):
            first = (step * self.world + self.rank) * self.batch_size
            for position in range(first, first + self.batch_size):
                yield self._index(position)


# ---------------------------------------------------------------------------------------------
# EMA, RNG state, checkpoint I/O
# ---------------------------------------------------------------------------------------------
class EMA(nn.Module):
    """Exponential moving average of a method's weights (buffers are copied).

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs
    are not dominated by the initial weights. ``module`` is the averaged copy (no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(cur.detach().to(avg.dtype), 1.0 - decay)
        for avg, cur in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(cur)
        self.num_updates += 1


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary file beside the target, fsync,
    ``os.replace``) and read with ``torch.load(weights_only=True)`` only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / foreign / pickled-object files
            detail = " ".join(str(exc).split())[:160]
            raise ValueError(f"{path}: not a readable training checkpoint ({detail})") from None


# ---------------------------------------------------------------------------------------------
# the Lightning pieces
# ---------------------------------------------------------------------------------------------
class TranslationModule(pl.LightningModule):
    """Method + training parts + optional EMA, trained with manual optimisation (one Adam per
    phase of ``method.optimization_phases()``)."""

    def __init__(self, method: TranslationMethod, parts: nn.ModuleDict, cfg: TrainConfig) -> None:
        super().__init__()
        self.method = method
        self.parts = parts
        self.cfg = cfg
        self.automatic_optimization = False
        self.phases = list(method.optimization_phases())
        decay = cfg.train.ema_decay if cfg.train.ema_decay is not None else method.ema_decay
        self.ema = EMA(method, decay) if decay else None
        self._rng_to_restore: dict[str, Any] | None = None
        self._val_sums: Tensor | None = None

    @property
    def step(self) -> int:
        """Training steps (batches) done; Lightning's global_step counts optimiser steps."""
        return self.trainer.global_step // len(self.phases)

    @property
    def inference_model(self) -> TranslationMethod:
        """What validation uses and the bundle holds: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.method

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = []
        for phase in self.phases:
            params = list(self.method.phase_parameters(phase, self.parts))
            if not params:
                raise ValueError(f"{self.method.name}: phase {phase!r} has no parameters")
            settings = self.cfg.optim.for_phase(phase)
            cls = torch.optim.AdamW if settings["weight_decay"] > 0 else torch.optim.Adam
            optimizers.append(cls(params, **settings))
        return optimizers

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        note = self.method.set_training_progress(self.step)  # schedules (dgpg stages) follow the step
        if note and self.trainer.is_global_zero:
            print(note, file=sys.stderr, flush=True)  # the current stderr (Lightning's log handler may hold an old one)
        logs: dict[str, Tensor] = {}
        for phase, opt in zip(self.phases, optimizers, strict=True):
            losses = self.method.training_losses(batch, self.parts, phase)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            if self.cfg.optim.grad_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip,
                                    gradient_clip_algorithm="norm")
            opt.step()
            logs.update({f"train/{phase}/{k}": v.detach().float() for k, v in losses.items()})
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
        from . import metrics

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
                                  "model": to_dict(self.cfg.model), "library_version": __version__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = check_checkpoint(checkpoint, self.cfg)["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # after every setup step that might draw numbers
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def check_checkpoint(checkpoint: Mapping[str, Any], cfg: TrainConfig, where: str = "checkpoint") -> dict[str, Any]:
    """The MedTranslate state of a training checkpoint; ValueError unless it was written by this
    training for the same method and model config."""
    state = checkpoint.get(_STATE_KEY)
    if not isinstance(state, Mapping) or "rng" not in state:
        raise ValueError(f"{where}: not written by MedTranslate training")
    if state.get("method") != cfg.method or state.get("model") != to_dict(cfg.model):
        raise ValueError(f"{where}: holds a {state.get('method')} model with another model config than the one "
                         f"given; resume with the config the run was started with")
    return dict(state)


class PeriodicCheckpoint(pl.Callback):
    """``trainer.save_checkpoint(path)`` every ``every`` steps and at the last step."""

    def __init__(self, path: Path, every: int, max_steps: int, phases: int) -> None:
        self.path, self.every, self.max_steps, self.phases = path, every, max_steps, phases

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step // self.phases
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


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
def _on_gpu(train: TrainSettings) -> bool:
    return train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def lightning_precision(train: TrainSettings) -> str:
    """``train.precision`` as Lightning spells it, ``auto`` resolved (bf16-mixed / 16-mixed on
    GPU, 32-true on CPU): ``runtime.Precision``."""
    return Precision.parse(train.precision).lightning(_on_gpu(train), given=train.precision)


def _device_count(train: TrainSettings) -> int:
    d = train.devices
    if isinstance(d, list):
        return len(d)
    if d in ("auto", -1, "-1"):
        return torch.cuda.device_count() if _on_gpu(train) else 1
    try:
        return int(d)
    except ValueError:
        raise ValueError(f"train.devices must be 'auto', a count or a list of ids, got {d!r}") from None


def _strategy(train: TrainSettings) -> Any:
    """DDP (with unused-parameter detection: each phase reaches only its own parameters) when
    several processes train; otherwise ``train.strategy`` as given."""
    world = _device_count(train) * train.num_nodes
    if train.strategy == "ddp" or (train.strategy == "auto" and (world > 1 or _env_world() > 1)):
        return DDPStrategy(find_unused_parameters=True)
    return train.strategy


def _env_world() -> int:
    return distributed_env()[1]


def _env_rank() -> int:
    """This process's rank as the launcher (Lightning's or torchrun) set it; 0 when alone."""
    return distributed_env()[0]


def _bundle_meta(cfg: TrainConfig, module: TranslationModule, splits: Mapping[str, Sequence[Path]],
                 datasets: dict[str, Dataset], command: str | None, metrics: dict[str, float]) -> Any:
    from .bundle import BundleMeta, ModalitySpec
    from .intensity import preset_from_config

    d = cfg.data
    training = {
        "steps": module.step,
        "command": command or "",
        "data": {"root": str(d.root),
                 "cases": {name: [p.name for p in cases] for name, cases in splits.items()},
                 "train_slices": len(datasets["train"]),
                 "slice_spec": to_dict(d.slice_spec()), "split": list(d.split), "split_seed": d.split_seed,
                 "paired": _paired(cfg), "masks": list(d.masks)},
        "ema": module.ema is not None,
        "precision": lightning_precision(cfg.train),
        "config": to_dict(cfg),
    }
    return BundleMeta(
        source=ModalitySpec(modality=d.source, preset=preset_from_config(d.source_preset).to_config()),
        target=ModalitySpec(modality=d.target, preset=preset_from_config(d.target_preset).to_config()),
        slice=d.slice_spec(),
        rois=list(d.masks),
        training=training,
        metrics={"validation": metrics} if metrics else {},
    )


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} for the loggers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _preparation_batches(ds: Dataset, batch_size: int) -> Iterator[dict]:
    """Collated batches over the training set in a fixed shuffled order (its own seeded RNG, not
    the global one), made lazily: ``prepare_training`` takes as many as it needs."""
    from torch.utils.data import default_collate

    n = len(ds)
    order = np.random.default_rng(0).permutation(n).tolist()
    for k in range(0, n, batch_size):
        yield default_collate([ds[i] for i in order[k:k + batch_size]])


def fit(cfg: TrainConfig, *, resume: bool = False, command: str | None = None) -> Path:
    """Train ``cfg`` and write the bundle ``out_dir/bundle`` (on rank 0); returns its path.

    ``resume`` continues from ``out_dir/checkpoints/last.ckpt`` (which must exist); without it
    that file must not exist (a run is never silently overwritten). ``command`` is recorded in
    the bundle. Raises ValueError (one line) for unusable configs, data folders or checkpoints."""
    out_dir = Path(cfg.train.out_dir)
    ckpt = out_dir / "checkpoints" / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        raise ValueError(f"{ckpt}: no checkpoint to resume from (train.out_dir={out_dir})")
    if not resume and ckpt.exists():
        raise ValueError(f"{ckpt} exists: pass --resume to continue that run, or choose another train.out_dir")
    if resume:  # fail before any setup on an unreadable or foreign checkpoint
        check_checkpoint(AtomicCheckpointIO().load_checkpoint(ckpt), cfg, where=str(ckpt))
    paired = _paired(cfg)
    tr = cfg.train

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Mid-epoch resume is exact here (StepSampler restarts at the restored step).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # frozen pretrained parts (a latent method's autoencoder) stay in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    pl.seed_everything(tr.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    splits = case_splits(cfg.data, paired)
    datasets = build_datasets(cfg.data, paired, splits, ("train", "val") if tr.val_every else ("train",))
    method = build_training_method(cfg)
    with torch.random.fork_rng(devices=[]):  # preparation never moves the training RNG
        note = method.prepare_training(_preparation_batches(datasets["train"], cfg.data.batch_size))
    if note and _env_rank() == 0:
        print(f"{cfg.method}: {note}", file=sys.stderr)
    module = TranslationModule(method, method.build_training_parts(), cfg)

    if _env_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    tb = TensorBoardLogger(save_dir=str(out_dir), name="logs", default_hp_metric=False)
    csv = CSVLogger(save_dir=str(out_dir), name="logs", version=tb.version)
    phases = len(module.phases)
    has_val = "val" in datasets
    trainer = pl.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=_strategy(tr),
        precision=lightning_precision(tr),
        # global_step counts optimiser steps. One Lightning "epoch" is the rest of the StepSampler
        # stream; a run extended past a finished one (--resume with a larger max_steps) goes on in
        # a second epoch from the step reached.
        max_steps=tr.max_steps * phases, max_epochs=-1,
        val_check_interval=min(tr.val_every, tr.max_steps) if has_val else 1.0,
        check_val_every_n_epoch=None if has_val else 1,
        limit_val_batches=(tr.val_batches or 1.0) if has_val else 0,
        num_sanity_val_steps=0, log_every_n_steps=tr.log_every, use_distributed_sampler=False,
        logger=[tb, csv], enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=tr.progress_bar if tr.progress_bar is not None else sys.stderr.isatty(),
        callbacks=[PeriodicCheckpoint(ckpt, tr.checkpoint_every, tr.max_steps, phases)],
        plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(_flat(to_dict(cfg)))
    trainer.fit(module, datamodule=TranslationDataModule(cfg, datasets),
                ckpt_path=str(ckpt) if resume else None)

    bundle_path = out_dir / "bundle"
    if trainer.is_global_zero:
        from .bundle import save_bundle

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        export = module.inference_model.to("cpu").eval()
        save_bundle(export, _bundle_meta(cfg, module, splits, datasets, command, metrics), bundle_path)
    return bundle_path


def is_global_zero() -> bool:
    """True on the process that writes outputs (rank 0), also after ``fit`` under DDP."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
