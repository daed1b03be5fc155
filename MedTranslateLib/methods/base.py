"""The method interface every translation method implements, and the method registry.

A method is an ``nn.Module`` that holds only what inference needs (what a bundle saves), built from
a typed config dataclass (``Config``). Training-only modules (discriminators, loss networks) come
from ``build_training_parts()`` as a separate ``nn.ModuleDict`` that the trainer owns; they never
appear in ``method.state_dict()``.

Shapes: ``source`` (B, C, H, W) in [-1, 1]; ``Translation.image`` (B, 1, H, W) in [-1, 1];
masks map a name ("liver", "tumor", "body") to (B, 1, H, W) in {0, 1}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..nn.noise import Generators

__all__ = ["Translation", "TranslationMethod", "Capabilities", "TrainingStage", "register", "available_methods",
           "get_method_class", "capabilities_of", "build_method"]


@dataclass(frozen=True)
class Capabilities:
    """What a method (with its config) offers; front ends ask this instead of keeping lists.

    stochastic:  ``num_samples`` / ``generator`` (seed) change the output.
    steps:       ``steps`` (sampling steps) can be chosen.
    uncertainty: "std" | "variance" | None: the kind of ``Translation.uncertainty``.
    uncertainty_needs_samples: uncertainty only with ``num_samples > 1``.
    confidence:  ``Translation.confidence`` (B,) is set.
    sample_confidence: ``Translation.sample_confidence`` (N, B) is set: the method scores every
                 sample, which the engine's ``select="per_volume"`` needs (rlbcd with its LCS).
    uses_masks:  ``translate`` (or training) reads ROI masks.
    shared_noise: ``translate`` accepts ``shared_noise=True`` (one noise map for every slice).
    """

    stochastic: bool = False
    steps: bool = False
    uncertainty: str | None = None
    uncertainty_needs_samples: bool = False
    confidence: bool = False
    sample_confidence: bool = False
    uses_masks: bool = False
    shared_noise: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Translation:
    """What ``translate`` returns.

    image:       (B, 1, H, W) in [-1, 1] — the synthetic target (for several samples, their mean
                 or the best one: the method documents which).
    uncertainty: (B, 1, H, W) or None, in normalised target units; the method's
                 ``uncertainty_kind`` ("std" or "variance") says which.
    confidence:  (B,) or None, higher = more trustworthy.
    samples:     (N, B, 1, H, W) or None, when ``num_samples > 1`` gave several samples.
    sample_confidence: (N, B) or None, the confidence of every sample (sample k of slice b on the
                 scale of ``confidence``), for methods that score each sample (rlbcd's LCS); with
                 ``samples`` (or ``image`` when N = 1) it lets the engine choose one sample index
                 for a whole volume.
    """

    image: Tensor
    uncertainty: Tensor | None = None
    confidence: Tensor | None = None
    samples: Tensor | None = None
    sample_confidence: Tensor | None = None


@dataclass(frozen=True)
class TrainingStage:
    """A range of training steps in which only some optimisation phases train
    (``TranslationMethod.training_stages``).

    name:   shown in the training log.
    start:  the first training step (batch) of the stage; it lasts until the next stage starts
            (the last one until the end of training).
    phases: the names of ``optimization_phases()`` that run in it (they run in that order).
    """

    name: str
    start: int
    phases: tuple[str, ...]


class TransientState:
    """Per-batch scratch state of a method (e.g. G(source) shared by the phases of one batch).
    Never copied, pickled or saved: a copy starts empty. Subclasses define ``clear()``."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> TransientState:
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


class TranslationMethod(nn.Module):
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``translate`` and the
    training hooks; register them with ``@register("name")``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    paired: ClassVar[bool] = True          # False: trains on unpaired data (cyclegan, dgpg)
    uses_masks: ClassVar[bool] = False     # True: translate()/training consume liver/tumor masks
    stochastic: ClassVar[bool] = False     # True: steps / num_samples / generator matter
    uncertainty_kind: ClassVar[str | None] = None  # "std" | "variance" | None
    uncertainty_needs_samples: ClassVar[bool] = False  # uncertainty only with num_samples > 1
    gives_confidence: ClassVar[bool] = False  # Translation.confidence is set
    gives_sample_confidence: ClassVar[bool] = False  # Translation.sample_confidence (N, B) is set
    selectable_steps: ClassVar[bool] = False  # translate(steps=...) may change the step count
    supports_shared_noise: ClassVar[bool] = False  # translate(..., shared_noise=True) is accepted

    def __init__(self, config: Any = None, *, pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            from ..config import from_dict

            config = from_dict(self.Config, config, where=f"{self.name} config")
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        if pretrained and not type(self).pretrained_bundles(config):
            raise ValueError(f"{self.name}: takes no pretrained parts, got {', '.join(pretrained)}")

    # ---- what it offers ----------------------------------------------------------------------
    @classmethod
    def capabilities_for(cls, config: Any) -> Capabilities:
        """The capabilities of this method class with ``config`` (no weights needed). Methods
        whose capabilities depend on the config (pix2pix's test-time dropout) override this."""
        return Capabilities(stochastic=cls.stochastic, steps=cls.selectable_steps,
                            uncertainty=cls.uncertainty_kind,
                            uncertainty_needs_samples=cls.uncertainty_needs_samples,
                            confidence=cls.gives_confidence, sample_confidence=cls.gives_sample_confidence,
                            uses_masks=cls.uses_masks, shared_noise=cls.supports_shared_noise)

    @property
    def capabilities(self) -> Capabilities:
        return type(self).capabilities_for(self.config)

    @classmethod
    def pretrained_bundles(cls, config: Any) -> dict[str, str]:
        """Pretrained parts the config names: {part name: bundle path}. The training loop loads
        them (a method never reads files) and passes the loaded methods to ``cls(config,
        pretrained=...)``. Default: none."""
        return {}

    # ---- shapes ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Source channels C of (B, C, H, W)."""
        return int(getattr(self.config, "in_channels", 1))

    @property
    def out_channels(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # ---- inference ---------------------------------------------------------------------------
    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: Generators = None) -> Translation:
        """source (B, C, H, W) in [-1, 1] -> ``Translation``. ``generator``: where a stochastic
        method's randomness comes from (``nn.noise.Generators``): None (the global RNG), one
        ``torch.Generator`` for the whole batch, or a sequence of them, one per slice of the batch
        (the engine's form), drawn through ``nn.noise`` so that a slice's noise depends on its own
        generator only, not on the batch it is in."""
        raise NotImplementedError

    def check_source(self, source: Tensor) -> None:
        """One-line ValueError unless ``source`` is a (B, in_channels, H, W) floating tensor."""
        if not isinstance(source, Tensor) or source.ndim != 4 or source.shape[1] != self.in_channels:
            shape = tuple(source.shape) if isinstance(source, Tensor) else type(source).__name__
            raise ValueError(f"{self.name}: expected source of shape (B, {self.in_channels}, H, W), got {shape}")
        if not source.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point source in [-1, 1], got {source.dtype}")

    def inference_networks(self) -> dict[str, nn.Module]:
        """The networks ``translate`` calls that another runtime may run in their place
        (``onnx_backend.maybe_accelerate``: ONNX Runtime on CPU): {submodule path: module}, each
        called with positional tensors whose first dimension is the batch, returning one tensor,
        deterministic in eval mode; replaced through ``nn.Module.set_submodule``. Default: none."""
        return {}

    # ---- training side (never saved in bundles) ----------------------------------------------
    def build_training_parts(self) -> nn.ModuleDict:
        """Discriminators, loss networks, ... (not part of ``self``: bundles never hold them)."""
        return nn.ModuleDict()

    def optimization_phases(self) -> list[str]:
        """Names of the optimisation phases run, in this order, on every batch."""
        return ["main"]

    def training_stages(self) -> list[TrainingStage]:
        """Step-ranged stages, each training a subset of the phases (e.g. a part pretrained alone,
        then frozen while the rest trains). A phase outside the current stage does not run at all:
        no loss, no backward, no optimiser or LR-scheduler step, so its parameters, its Adam state
        and its LR stay as they are. Where a running phase reads a part it does not train, the
        method keeps that part out of the graph (``no_grad`` / detach) and, if the part has
        batch-norm statistics, in eval mode. The first stage starts at step 0. Default: none
        (every phase on every step)."""
        return []

    def set_training_progress(self, step: int) -> str | None:
        """Called by the training loop before every training step with the number of steps
        (batches) done so far, also right after a resume. Methods whose losses follow a schedule
        (dgpg's progressive stages) read it here; a returned line goes into the training log.
        Default: nothing."""
        return None

    def prepare_training(self, batches: Iterable[dict]) -> str | None:
        """Called once by the training loop before the optimisers and the EMA copy are built (also
        on a resume, before the checkpoint's weights are restored), with an iterator over the
        first training batches (collated, in order, no augmentation). Methods that need data
        statistics (a latent method's latent mean/std) compute them here; pretrained parts came
        with the constructor. A returned line goes into the training log. Default: nothing."""
        return None

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        """Parameters the optimiser of ``phase`` updates."""
        if phase != "main":
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")
        return [p for p in self.parameters() if p.requires_grad]

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        """Losses of ``phase`` on a collated batch. ``"loss"`` is the scalar to backpropagate;
        other entries are logged."""
        raise NotImplementedError

    def validation_output(self, batch: dict) -> Tensor:
        """(B, 1, H, W) prediction for validation metrics."""
        masks = None
        if self.uses_masks:
            # paired batches hold one (B, 1, H, W) tensor per mask name (data.PairedSliceDataset)
            masks = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.ndim == 4
                     and k not in ("source", "target") and not k.startswith(("source_", "target_"))}
        return self.translate(batch["source"], masks=masks).image

    @property
    def ema_decay(self) -> float | None:
        """EMA decay of the inference weights, from the config's ``ema_decay`` (None: no EMA)."""
        return getattr(self.config, "ema_decay", None)


# ---- registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[TranslationMethod]] = {}
M = TypeVar("M", bound=type[TranslationMethod])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: ``@register("pix2pix") class Pix2Pix(TranslationMethod): ...``"""

    def wrap(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, TranslationMethod)):
            raise TypeError(f"@register({name!r}) needs a TranslationMethod subclass")
        if not dataclasses.is_dataclass(cls.__dict__.get("Config", None)):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[TranslationMethod]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods()) or '(none)'}") \
            from None


def capabilities_of(name: str, architecture: dict | None) -> Capabilities:
    """Capabilities of method ``name`` with a bundle's ``architecture`` (no weights, no network
    built). One-line ValueError for an unknown method or architecture."""
    from ..config import from_dict

    cls = get_method_class(name)
    config = from_dict(cls.Config, dict(architecture or {}), where="medtranslate.yaml", prefix="architecture")
    return cls.capabilities_for(config)


def build_method(name: str, config: dict | Any | None = None, *, where: str = "config",
                 prefix: str = "", pretrained: dict[str, nn.Module] | None = None) -> TranslationMethod:
    """Build method ``name`` from a config mapping (validated with ``config.from_dict``; messages
    name ``where`` and the dotted key under ``prefix``, e.g. ``prefix="model"``) or a ready
    ``Config`` instance."""
    from ..config import from_dict

    cls = get_method_class(name)
    if not isinstance(config, cls.Config):
        config = from_dict(cls.Config, config or {}, where=where, prefix=prefix)
    return cls(config, pretrained=pretrained) if pretrained else cls(config)
