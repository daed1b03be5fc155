"""Intensity presets: physical units <-> model range [-1, 1].

A preset maps a volume's physical values (HU for CT, arbitrary MR units, SUV for PET) to
[-1, 1] with ``forward`` and back with ``inverse``. Presets that depend on the data (MR) must be
``fit()`` to a volume first; the fitted statistics are part of ``to_config()`` so that the
inverse can put a synthetic image back into the units of the volume it came from.

Kinds (``preset_from_config`` names in brackets):

- ``ct_window`` (``ct_abdomen`` 40/400, ``ct_angio`` 200/1000, ``ct_lung`` -600/1500,
  ``ct_bone`` 400/1800, ``ct_brain`` 40/80, ``ct_full`` -1024..3000 = the SynthRAD range,
  ``ct_wide`` -1024..1024, the narrowest that holds air and bone, ``HU_LANDMARKS``):
  clip to [level - width/2, level + width/2], then linear to [-1, 1].
- ``mr_percentile``: [p_low, p_high] percentiles (default 0.5 / 99.5) of the foreground -> [-1, 1].
- ``mr_zscore``: (x - mean) / std over the foreground, clipped to +-k (default 3), divided by k.
- ``pet_suv``: SUV (``x * scale``) clipped to [0, max_suv] -> [-1, 1].

All mappings clip: values outside the window come back from ``inverse`` as the window edge, so
``inverse(forward(x)) == x`` only inside the window. ``forward``/``inverse`` accept numpy arrays
and torch tensors and return the same type (float32 for integer input, dtype kept otherwise).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "IntensityPreset",
    "CTWindow",
    "MRPercentile",
    "MRZScore",
    "PETSUV",
    "NAMED_PRESETS",
    "HU_LANDMARKS",
    "PRESET_KINDS",
    "preset_from_config",
]


# ---------------------------------------------------------------------------------------------
# array helpers (numpy or torch, without importing torch)
# ---------------------------------------------------------------------------------------------
def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_float(x):
    """Float array/tensor; integer/bool input becomes float32; numpy scalars/lists become arrays."""
    if _is_torch(x):
        return x if x.is_floating_point() else x.float()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _clip(x, lo: float, hi: float):
    if _is_torch(x):
        return x.clamp(lo, hi)
    return np.clip(x, lo, hi)


def _to_numpy(x) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _foreground_values(array, mask, ignore_zeros: bool, what: str) -> np.ndarray:
    """The voxel values statistics are computed from (a 1-D float64 copy; input untouched)."""
    arr = _to_numpy(array)
    if arr.size == 0:
        raise ValueError(f"{what}: cannot fit to an empty array")
    if mask is not None:
        m = _to_numpy(mask)
        if m.shape != arr.shape:
            raise ValueError(f"{what}: mask shape {m.shape} does not match array shape {arr.shape}")
        values = arr[m > 0]
        if values.size == 0:
            raise ValueError(f"{what}: the mask is empty; cannot compute intensity statistics")
    else:
        values = arr.ravel()
        if ignore_zeros:
            nz = values[values != 0]
            if nz.size:
                values = nz
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: array has non-finite values; cannot compute intensity statistics")
    return values


def _check_number(name: str, value, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{kind}: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{kind}: {name} must be finite, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
#: Tissues a CT window must represent so that whole-volume results mean something: air (-1000 HU,
#: the scale's anchor) and bone (+1000 HU, the textbook value of dense bone; the phantom's
#: cortical shell is 1100 HU, its mixed posterior elements 450 HU).
HU_LANDMARKS: dict[str, float] = {"air": -1000.0, "bone": 1000.0}

@dataclass
class IntensityPreset:
    """Base class: maps physical units to [-1, 1] (``forward``) and back (``inverse``)."""

    KIND: ClassVar[str] = ""
    #: fields filled by ``fit`` (None until then); empty for data-independent presets.
    STAT_FIELDS: ClassVar[tuple[str, ...]] = ()
    #: physical units of the mapped images, for tables and colour bars.
    UNITS: ClassVar[str] = "a.u."
    #: DICOM Modality (0008,0060) of images in these units.
    DICOM_MODALITY: ClassVar[str] = "OT"
    #: True when the units are Hounsfield units (metrics then use the SynthRAD2023 HU range).
    HOUNSFIELD: ClassVar[bool] = False

    name: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "name":
                if self.name is not None and not isinstance(self.name, str):
                    raise ValueError(f"{self.KIND}: name must be a string, got {self.name!r}")
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.STAT_FIELDS:
                continue
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{self.KIND}: {f.name} must be true/false, got {value!r}")
                continue
            setattr(self, f.name, _check_number(f.name, value, self.KIND))
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    # -- public API ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def fitted(self) -> bool:
        """True when ``forward``/``inverse`` can be used (statistics known or none needed)."""
        return all(getattr(self, f) is not None for f in self.STAT_FIELDS)

    def fit(self, array, mask=None) -> IntensityPreset:
        """A new preset with statistics from ``array`` (numpy or torch; never modified).
        ``mask`` (same shape, >0 = use) restricts the statistics to a region."""
        return dataclasses.replace(self)

    def forward(self, x):
        """Physical units -> [-1, 1] (clipped). Same type as ``x`` (numpy or torch)."""
        lo, hi = self._window()
        x = _as_float(x)
        if not _is_torch(x):  # the same operations in place: one new array instead of five
            y = np.clip(x, lo, hi)
            y -= lo
            y *= 2.0 / (hi - lo)
            y -= 1.0
            return np.clip(y, -1.0, 1.0, out=y)
        # the final clip only removes float rounding (e.g. 1.0000001) at the window edges
        return _clip((_clip(x, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)

    def inverse(self, x):
        """[-1, 1] -> physical units; input is clipped to [-1, 1] first."""
        lo, hi = self._window()
        x = _as_float(x)
        if not _is_torch(x):  # in place, as ``forward``
            y = np.clip(x, -1.0, 1.0)
            y += 1.0
            y *= (hi - lo) / 2.0
            y += lo
            return y
        return (_clip(x, -1.0, 1.0) + 1.0) * ((hi - lo) / 2.0) + lo

    @property
    def physical_range(self) -> tuple[float, float]:
        """The physical values mapped to -1 and +1."""
        return self._window()

    def same_units(self, other: IntensityPreset) -> bool:
        """True when ``other`` maps images in the same physical units (HU and HU): an image in
        one can be compared with an image in the other without any mapping."""
        return self.HOUNSFIELD and other.HOUNSFIELD

    def clipped_landmarks(self) -> list[str]:
        """Landmark tissues of these units (``HU_LANDMARKS`` for CT) that the window cannot
        represent, e.g. ``["bone (1000 HU)"]`` for the abdomen window; empty when none."""
        return []

    def to_config(self) -> dict[str, Any]:
        """YAML-serialisable dict (plain floats/str/bool); includes fitted statistics if any."""
        cfg: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            cfg[f.name] = value if isinstance(value, (str, bool)) else float(value)
        return cfg

    # -- helpers ------------------------------------------------------------------------------
    def _describe(self) -> str:
        return f"preset {self.name or self.KIND!r} ({self.KIND})"

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(f"{self._describe()} must be fit() to a volume first "
                             f"(its statistics {', '.join(self.STAT_FIELDS)} are not set)")

    def _window(self) -> tuple[float, float]:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class CTWindow(IntensityPreset):
    """CT window: [level - width/2, level + width/2] HU -> [-1, 1]."""

    KIND: ClassVar[str] = "ct_window"
    UNITS: ClassVar[str] = "HU"
    DICOM_MODALITY: ClassVar[str] = "CT"
    HOUNSFIELD: ClassVar[bool] = True

    level: float = 40.0
    width: float = 400.0

    def _validate(self) -> None:
        if self.width <= 0:
            raise ValueError(f"{self.KIND}: width must be positive, got {self.width}")

    def clipped_landmarks(self) -> list[str]:
        lo, hi = self._window()
        return [f"{name} ({value:g} HU)" for name, value in HU_LANDMARKS.items() if not lo <= value <= hi]

    def _window(self) -> tuple[float, float]:
        return self.level - self.width / 2.0, self.level + self.width / 2.0


@dataclass
class MRPercentile(IntensityPreset):
    """MR robust percentile scaling: [p_low, p_high] percentiles of the foreground -> [-1, 1].

    Foreground: ``mask`` > 0 when given to ``fit``, else the non-zero voxels (all voxels when
    ``ignore_zeros`` is false or every voxel is zero)."""

    KIND: ClassVar[str] = "mr_percentile"
    DICOM_MODALITY: ClassVar[str] = "MR"
    STAT_FIELDS: ClassVar[tuple[str, ...]] = ("lower", "upper")

    p_low: float = 0.5
    p_high: float = 99.5
    ignore_zeros: bool = True
    lower: float | None = None
    upper: float | None = None

    def _validate(self) -> None:
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise ValueError(f"{self.KIND}: need 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}")
        if (self.lower is None) != (self.upper is None):
            raise ValueError(f"{self.KIND}: lower and upper must be given together")
        if self.lower is not None and not self.upper > self.lower:
            raise ValueError(f"{self.KIND}: upper must be > lower, got {self.lower}, {self.upper}")

    def fit(self, array, mask=None) -> MRPercentile:
        values = _foreground_values(array, mask, self.ignore_zeros, self._describe())
        lo, hi = (float(v) for v in np.percentile(values, [self.p_low, self.p_high]))
        if not hi > lo:  # constant foreground: any positive scale keeps the inverse exact
            hi = lo + 1.0
        return dataclasses.replace(self, lower=lo, upper=hi)

    def _window(self) -> tuple[float, float]:
        self._require_fitted()
        return float(self.lower), float(self.upper)  # type: ignore[arg-type]


@dataclass
class MRZScore(IntensityPreset):
    """MR z-score: (x - mean) / std of the foreground, clipped to +-k, divided by k -> [-1, 1]."""

    KIND: ClassVar[str] = "mr_zscore"
    DICOM_MODALITY: ClassVar[str] = "MR"
    STAT_FIELDS: ClassVar[tuple[str, ...]] = ("mean", "std")

    k: float = 3.0
    ignore_zeros: bool = True
    mean: float | None = None
    std: float | None = None

    def _validate(self) -> None:
        if self.k <= 0:
            raise ValueError(f"{self.KIND}: k must be positive, got {self.k}")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.KIND}: mean and std must be given together")
        if self.std is not None and self.std <= 0:
            raise ValueError(f"{self.KIND}: std must be positive, got {self.std}")

    def fit(self, array, mask=None) -> MRZScore:
        values = _foreground_values(array, mask, self.ignore_zeros, self._describe())
        mean = float(values.mean())
        std = float(values.std())
        if not std > 0:
            std = 1.0
        return dataclasses.replace(self, mean=mean, std=std)

    def _window(self) -> tuple[float, float]:
        self._require_fitted()
        return self.mean - self.k * self.std, self.mean + self.k * self.std  # type: ignore[operator]


@dataclass
class PETSUV(IntensityPreset):
    """PET: SUV = ``x * scale`` clipped to [0, max_suv] -> [-1, 1]; inverse returns ``x`` units."""

    KIND: ClassVar[str] = "pet_suv"
    UNITS: ClassVar[str] = "SUV"
    DICOM_MODALITY: ClassVar[str] = "PT"

    max_suv: float = 20.0
    scale: float = 1.0

    def _validate(self) -> None:
        if self.max_suv <= 0:
            raise ValueError(f"{self.KIND}: max_suv must be positive, got {self.max_suv}")
        if self.scale <= 0:
            raise ValueError(f"{self.KIND}: scale must be positive, got {self.scale}")

    def _window(self) -> tuple[float, float]:
        return 0.0, self.max_suv / self.scale


PRESET_KINDS: dict[str, type[IntensityPreset]] = {
    cls.KIND: cls for cls in (CTWindow, MRPercentile, MRZScore, PETSUV)
}

#: Named presets: name -> config. ``ct_angio`` is wide (-300..700 HU) so contrast-filled
#: arteries (300-600 HU) stay unclipped while fat and soft tissue keep their contrast.
NAMED_PRESETS: dict[str, dict[str, Any]] = {
    "ct_abdomen": {"kind": "ct_window", "level": 40.0, "width": 400.0},
    "ct_angio": {"kind": "ct_window", "level": 200.0, "width": 1000.0},
    "ct_lung": {"kind": "ct_window", "level": -600.0, "width": 1500.0},
    "ct_bone": {"kind": "ct_window", "level": 400.0, "width": 1800.0},
    "ct_brain": {"kind": "ct_window", "level": 40.0, "width": 80.0},
    "ct_full": {"kind": "ct_window", "level": 988.0, "width": 4024.0},  # -1024 .. 3000 HU
    "ct_wide": {"kind": "ct_window", "level": 0.0, "width": 2048.0},  # -1024 .. 1024 HU: air and bone
    "mr_percentile": {"kind": "mr_percentile"},
    "mr_zscore": {"kind": "mr_zscore"},
    "pet_suv": {"kind": "pet_suv"},
}


def preset_from_config(cfg: str | dict[str, Any] | IntensityPreset) -> IntensityPreset:
    """Build a preset from a name (``"ct_abdomen"``, see ``NAMED_PRESETS``) or a dict.

    Dict form: ``{"kind": <kind or preset name>, **parameters}``, e.g.
    ``{"kind": "ct_window", "level": 40, "width": 400}`` or ``{"kind": "ct_angio", "width": 800}``.
    A fitted preset's ``to_config()`` round-trips. Unknown names/kinds/keys raise ValueError.
    """
    if isinstance(cfg, IntensityPreset):
        return dataclasses.replace(cfg)
    valid = sorted(set(NAMED_PRESETS) | set(PRESET_KINDS))
    if isinstance(cfg, str):
        if cfg not in NAMED_PRESETS:
            raise ValueError(f"unknown intensity preset {cfg!r}; valid names: {', '.join(sorted(NAMED_PRESETS))}")
        cfg = {"kind": cfg}
    if not isinstance(cfg, dict):
        raise ValueError(f"intensity preset config must be a name or a dict, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "kind" not in cfg:
        raise ValueError(f"intensity preset config {cfg!r} has no 'kind'; valid kinds: {', '.join(valid)}")
    kind = cfg.pop("kind")
    if not isinstance(kind, str) or kind not in valid:
        raise ValueError(f"unknown intensity preset kind {kind!r}; valid kinds: {', '.join(valid)}")
    if kind in NAMED_PRESETS:
        base = dict(NAMED_PRESETS[kind])
        real_kind = base.pop("kind")
        params = {**base, "name": kind, **cfg}
    else:
        real_kind, params = kind, cfg
    cls = PRESET_KINDS[real_kind]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"intensity preset {kind!r}: unknown key(s) {', '.join(unknown)}; "
                         f"valid keys: kind, {', '.join(sorted(allowed))}")
    return cls(**params)

