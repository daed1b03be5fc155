"""MedTranslateLib.intensity: presets map physical units <-> [-1, 1] and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from MedTranslateLib.intensity import (
    NAMED_PRESETS,
    CTWindow,
    IntensityPreset,
    MRPercentile,
    MRZScore,
    preset_from_config,
)


@pytest.fixture
def mr_volume():
    rng = np.random.default_rng(1)
    arr = np.zeros((6, 20, 20), np.float32)  # background 0
    arr[:, 4:16, 4:16] = rng.gamma(4.0, 100.0, (6, 12, 12))
    return arr


def _fitted(name, mr_volume):
    ct = np.linspace(-1200, 3200, 6 * 20 * 20, dtype=np.float32).reshape(6, 20, 20)
    return preset_from_config(name).fit(mr_volume if name.startswith("mr") else ct)


def _inside(preset, n=257):
    lo, hi = preset.physical_range
    return np.linspace(lo, hi, n, dtype=np.float64)


@pytest.mark.parametrize("name", sorted(NAMED_PRESETS))
def test_inverse_of_forward_is_identity_inside_window(name, mr_volume):
    p = _fitted(name, mr_volume)
    x = _inside(p)
    y = p.forward(x)
    assert y.min() >= -1 and y.max() <= 1
    assert y[0] == pytest.approx(-1) and y[-1] == pytest.approx(1)
    np.testing.assert_allclose(p.inverse(y), x, rtol=1e-9, atol=1e-9 * (abs(x).max() + 1))
    # torch tensors, float32: same values, same type
    xt = torch.tensor(x, dtype=torch.float32)
    yt = p.forward(xt)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)
    back = p.inverse(yt)
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), x, rtol=1e-5, atol=1e-4 * (abs(x).max() + 1))


@pytest.mark.parametrize("name", sorted(NAMED_PRESETS))
def test_outputs_always_in_range_and_dtype_kept(name, mr_volume):
    p = _fitted(name, mr_volume)
    x = np.random.default_rng(0).normal(0, 5000, (4, 5, 6)).astype(np.float32)
    y = p.forward(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() >= -1.0 and y.max() <= 1.0
    lo, hi = p.physical_range
    back = p.inverse(y)
    assert back.min() >= lo - 1e-3 * abs(lo) - 1e-3 and back.max() <= hi + 1e-3 * abs(hi) + 1e-3
    # integer input is promoted to float32
    assert p.forward(np.array([0, 1, 2], np.int16)).dtype == np.float32
    assert p.forward(torch.tensor([0, 1, 2])).dtype == torch.float32


def test_ct_windows_have_standard_values():
    assert preset_from_config("ct_abdomen").physical_range == (-160.0, 240.0)
    assert preset_from_config("ct_full").physical_range == (-1024.0, 3000.0)
    assert preset_from_config("ct_lung").physical_range == (-1350.0, 150.0)
    assert preset_from_config("ct_brain").physical_range == (0.0, 80.0)
    lo, hi = preset_from_config("ct_angio").physical_range
    assert lo <= -100 and hi >= 600  # fat and contrast-filled arteries unclipped
    w = preset_from_config({"kind": "ct_window", "level": 40, "width": 400})
    assert w.forward(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])).tolist() == [-1, -1, 0, 1, 1]


def test_clipped_values_come_back_at_window_edge():
    p = preset_from_config("ct_abdomen")
    assert p.inverse(p.forward(np.array([-1000.0, 1000.0]))).tolist() == [-160.0, 240.0]


def test_mr_percentile_fit(mr_volume):
    p = preset_from_config("mr_percentile").fit(mr_volume)
    fg = mr_volume[mr_volume != 0]
    assert p.lower == pytest.approx(np.percentile(fg, 0.5))
    assert p.upper == pytest.approx(np.percentile(fg, 99.5))
    mask = np.zeros(mr_volume.shape, bool)
    mask[:, 4:10] = True
    pm = p.fit(mr_volume, mask)
    assert pm.upper == pytest.approx(np.percentile(mr_volume[mask], 99.5))
    y = pm.forward(mr_volume)
    assert y.min() == -1.0 and y.max() == 1.0


def test_mr_zscore_fit(mr_volume):
    p = preset_from_config({"kind": "mr_zscore", "k": 2.5}).fit(mr_volume)
    fg = mr_volume[mr_volume != 0].astype(np.float64)
    assert p.mean == pytest.approx(fg.mean()) and p.std == pytest.approx(fg.std())
    z = (mr_volume - p.mean) / p.std
    np.testing.assert_allclose(p.forward(mr_volume), np.clip(z, -2.5, 2.5) / 2.5, atol=1e-6)


def test_mr_fit_on_torch_and_with_torch_mask(mr_volume):
    p = preset_from_config("mr_zscore")
    a = p.fit(mr_volume)
    b = p.fit(torch.from_numpy(mr_volume), torch.from_numpy(mr_volume != 0))
    assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)


def test_pet_suv():
    p = preset_from_config({"kind": "pet_suv", "max_suv": 10})
    assert p.forward(np.array([-1.0, 0.0, 5.0, 10.0, 30.0])).tolist() == [-1, -1, 0, 1, 1]
    scaled = preset_from_config({"kind": "pet_suv", "max_suv": 10, "scale": 0.01})  # Bq/ml -> SUV
    assert scaled.forward(np.array([500.0])).tolist() == [0.0]
    assert scaled.inverse(np.array([0.0])).tolist() == [500.0]


def test_unfitted_mr_preset_refuses():
    for name in ("mr_percentile", "mr_zscore"):
        p = preset_from_config(name)
        assert not p.fitted
        with pytest.raises(ValueError, match="must be fit\\(\\) to a volume first"):
            p.forward(np.zeros(3))
        with pytest.raises(ValueError, match="must be fit"):
            p.inverse(np.zeros(3))
    assert preset_from_config("ct_abdomen").fitted


@pytest.mark.parametrize("name", sorted(NAMED_PRESETS))
def test_config_round_trip_keeps_mapping_and_stats(name, mr_volume):
    p = _fitted(name, mr_volume)
    cfg = yaml.safe_load(yaml.safe_dump(p.to_config()))
    q = preset_from_config(cfg)
    assert type(q) is type(p) and q == p and q.kind == p.kind
    x = np.linspace(-2000, 4000, 101)
    assert np.array_equal(q.forward(x), p.forward(x))
    assert np.array_equal(q.inverse(p.forward(x)), p.inverse(p.forward(x)))


def test_fit_does_not_modify_input_or_preset(mr_volume):
    before = mr_volume.copy()
    mask = mr_volume > 0
    p = preset_from_config("mr_percentile")
    fitted = p.fit(mr_volume, mask)
    fitted.forward(mr_volume)
    assert np.array_equal(mr_volume, before)
    assert p.lower is None and fitted is not p
    ct = preset_from_config("ct_abdomen")
    assert ct.fit(mr_volume) == ct and ct.fit(mr_volume) is not ct


def test_named_preset_overrides_and_instances():
    p = preset_from_config({"kind": "ct_angio", "width": 800})
    assert isinstance(p, CTWindow) and p.level == 200 and p.width == 800 and p.name == "ct_angio"
    assert preset_from_config(p) == p
    assert isinstance(preset_from_config("mr_percentile"), MRPercentile)
    assert isinstance(preset_from_config({"kind": "mr_zscore"}), MRZScore)
    assert isinstance(p, IntensityPreset)


@pytest.mark.parametrize("cfg, match", [
    ("ct_liver", "valid names: .*ct_abdomen"),
    ({"kind": "ct_windw"}, "valid kinds: .*ct_window"),
    ({"level": 40}, "no 'kind'"),
    ({"kind": "ct_window", "levle": 40}, "unknown key.*levle.*valid keys.*level"),
    ({"kind": "ct_window", "width": -5}, "width must be positive"),
    ({"kind": "ct_window", "width": "wide"}, "width must be a number"),
    ({"kind": "mr_percentile", "p_low": 90, "p_high": 10}, "p_low < p_high"),
    ({"kind": "mr_zscore", "k": 0}, "k must be positive"),
    ({"kind": "mr_zscore", "mean": 3.0}, "together"),
    (42, "name or a dict"),
])
def test_bad_configs_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        preset_from_config(cfg)


def test_constant_volume_fits_without_division_by_zero():
    flat = np.full((2, 3, 3), 7.0, np.float32)
    for name in ("mr_percentile", "mr_zscore"):
        p = preset_from_config(name).fit(flat)
        y = p.forward(flat)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(p.inverse(y), flat)


def test_empty_mask_rejected(mr_volume):
    with pytest.raises(ValueError, match="mask is empty"):
        preset_from_config("mr_zscore").fit(mr_volume, np.zeros(mr_volume.shape, bool))
