"""Training configuration: typed YAML sections (data, optim, train), their validation, and the
method built with its pretrained parts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import data as mdata
from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..methods import TranslationMethod, build_method, get_method_class
from ..regions import DEFAULT_ROIS


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


Schedule = Literal["constant", "cosine", "plateau"]


@dataclass
class PlateauConfig:
    """``ReduceLROnPlateau`` (mode min, relative threshold) of the ``plateau`` schedule; the
    defaults are BBDM's configs (``model.BB.lr_scheduler``). Counted in the steps the phase trains."""

    factor: float = 0.5
    patience: int = 3000
    cooldown: int = 3000
    threshold: float = 1.0e-4

    def __post_init__(self) -> None:
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"optim.plateau.factor must be in (0, 1), got {self.factor}")
        for name in ("patience", "cooldown", "threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.plateau.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class PhaseOptimConfig:
    """Per-phase overrides of the optimiser settings (None: the global value)."""

    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    schedule: Schedule | None = None
    lr_min: float | None = None
    warmup_steps: int | None = None


@dataclass
class OptimConfig:
    """Adam (AdamW when weight_decay > 0) per phase and its LR schedule; ``phases`` overrides by
    phase name. Schedules count the steps the phase trains (all steps unless the method has stages):

    - ``constant`` (default): the LR stays ``lr`` (no scheduler).
    - ``cosine``: cosine annealing from ``lr`` to ``lr_min`` over the phase's steps,
      ``CosineAnnealingLR`` stepped after every step (ResShift's trainer, per iteration).
    - ``plateau``: ``ReduceLROnPlateau`` down to ``lr_min``, stepped after every step with that
      step's training loss of the phase, as BBDM's runner does (BBDM: ``min_lr`` 5e-7). Under DDP
      the loss is averaged over the ranks first (BBDM steps each rank with its own loss, so its
      ranks' LRs can drift apart). See ``plateau``.

    ``warmup_steps`` (constant / cosine): the LR of the phase's step k < warmup_steps is
    lr * (k + 1) / warmup_steps (``LinearLR``), then the schedule starts (cosine over the phase's
    steps minus the warm-up). ResShift warms up 5000 iterations (its first iteration runs at the
    full lr, the ramp follows one iteration later)."""

    lr: float = 2.0e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    schedule: Schedule = "constant"
    lr_min: float = 0.0
    warmup_steps: int = 0
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    phases: dict[str, PhaseOptimConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        for phase in [None, *self.phases]:
            self.schedule_for(phase)  # validates every phase's resolved schedule

    def _pick(self, phase: str | None, name: str) -> Any:
        over = getattr(self.phases.get(phase) if phase else None, name, None)
        return over if over is not None else getattr(self, name)

    def for_phase(self, phase: str) -> dict[str, Any]:
        """Keyword arguments of the phase's Adam."""
        return {"lr": self._pick(phase, "lr"), "betas": tuple(self._pick(phase, "betas")),
                "weight_decay": self._pick(phase, "weight_decay")}

    def schedule_for(self, phase: str | None) -> dict[str, Any]:
        """The phase's ``schedule``, ``lr_min`` and ``warmup_steps`` (None: the global ones)."""
        key = f"optim.phases.{phase}" if phase else "optim"
        lr, out = self._pick(phase, "lr"), {n: self._pick(phase, n) for n in ("schedule", "lr_min", "warmup_steps")}
        if not 0.0 <= out["lr_min"] <= lr:
            raise ValueError(f"{key}.lr_min must be in [0, lr = {lr}], got {out['lr_min']}")
        if out["warmup_steps"] < 0:
            raise ValueError(f"{key}.warmup_steps must be >= 0, got {out['warmup_steps']}")
        if out["warmup_steps"] and out["schedule"] == "plateau":
            raise ValueError(f"{key}: warmup_steps works with the constant and cosine schedules, not plateau")
        return out


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
    check_presets = getattr(cls, "check_presets", None)  # rlbcd: one preset for an image residual
    if check_presets is not None:
        try:
            check_presets(model_cfg, cfg.data.source_preset, cfg.data.target_preset)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    phases = build_training_method(cfg).optimization_phases() if cfg.optim.phases else []
    for name in cfg.optim.phases:
        if name not in phases:
            raise ValueError(f"unknown phase 'optim.phases.{name}' in {where}; {cfg.method} phases: "
                             f"{', '.join(phases)}")
    return cfg


def _paired(cfg: TrainConfig) -> bool:
    """Does this run train on paired slices? ``data.paired``, else the method's default."""
    return cfg.data.paired if cfg.data.paired is not None else get_method_class(cfg.method).paired


def build_training_method(cfg: TrainConfig) -> TranslationMethod:
    """The method of ``cfg`` with its pretrained parts: every bundle its config names
    (``pretrained_bundles``, e.g. a latent method's autoencoder) is loaded here and handed to the
    constructor, so methods never read files."""
    from ..bundle import load_bundle

    cls = get_method_class(cfg.method)
    config = from_dict(cls.Config, cfg.model, where="config", prefix="model")
    pretrained = {name: load_bundle(Path(path)).method for name, path in cls.pretrained_bundles(config).items()}
    method = build_method(cfg.method, config, pretrained=pretrained or None)
    kg = getattr(config, "kg", None)  # dfbk: the prompts' text embedding (training/embed_text.py)
    if kg is not None and kg.enabled and kg.text != "random" and kg.embedding_file:
        from safetensors.torch import load_file  # a tensor file: never unpickled

        method.set_text_embedding(load_file(kg.embedding_file)["embedding"])
    return method
