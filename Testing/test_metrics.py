"""MedTranslateLib.metrics against the official SynthRAD2023 code, scikit-image and known cases."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from skimage.util import crop

from MedTranslateLib import metrics
from MedTranslateLib.metrics import image_metrics, roi_metrics

DATA = Path(__file__).parent / "data"
CT_RANGE = (-1024.0, 3000.0)


# --- helpers -----------------------------------------------------------------------------------

def smooth_pair(shape=(20, 32, 28), seed=0, scale=400.0, offset=0.0, noise=30.0):
    """A smooth random field and a noisy, slightly biased copy of it (float64)."""
    rng = np.random.default_rng(seed)
    ref = offset + scale * gaussian_filter(rng.standard_normal(shape), 2.0) / 0.05
    syn = ref + 5.0 + noise * rng.standard_normal(shape)
    return ref, syn


def box_mask(shape, lo, hi):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def skimage_synthrad_ssim(ref, syn, mask, value_range):
    """The SynthRAD2023 SSIM recipe written with scikit-image (the independent reference)."""
    lo, hi = value_range
    ref, syn = np.clip(ref, lo, hi), np.clip(syn, lo, hi)
    if mask is not None:
        ref, syn = np.where(mask, ref, lo), np.where(mask, syn, lo)
    shift = min(lo, 0.0)
    full, ssim_map = structural_similarity(ref - shift, syn - shift, data_range=hi - lo,
                                           win_size=7, use_sample_covariance=True, full=True)
    if mask is None:
        return full
    return crop(ssim_map, 3)[crop(mask, 3)].mean()


class FakeVolume:
    def __init__(self, array):
        self.array = array


# --- (a) the official SynthRAD2023 code --------------------------------------------------------

@pytest.fixture(scope="module")
def synthrad():
    reference = json.loads((DATA / "synthrad_reference.json").read_text())
    with np.load(DATA / reference["inputs"]["file"]) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return reference, arrays


def test_synthrad_fixture_is_the_one_the_reference_was_made_from(synthrad):
    reference, arrays = synthrad
    digests = reference["inputs"]["sha256"]
    assert set(digests) == set(arrays)
    for name, array in arrays.items():
        h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
        assert h.hexdigest() == digests[name], name
    assert reference["value_range"] == list(CT_RANGE)
    masks = {case["mask"] for case in reference["cases"]}
    assert None in masks and len(masks) > 1  # with and without a mask


def test_reproduces_official_synthrad2023_numbers(synthrad):
    reference, arrays = synthrad
    for case in reference["cases"]:
        mask = None if case["mask"] is None else arrays[case["mask"]]
        ours = image_metrics(arrays["reference"], arrays[case["synthetic"]], mask,
                             value_range=tuple(reference["value_range"]))
        for key in ("mae", "psnr", "ssim"):
            assert ours[key] == pytest.approx(case[key], abs=1e-3), (case["synthetic"],
                                                                     case["mask"], key)


# --- (b) SSIM against scikit-image -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(20, 32, 28), (7, 9, 11), (40, 33)])
def test_ssim_matches_skimage_without_value_range(shape):
    ref, syn = smooth_pair(shape, seed=1)
    expected = structural_similarity(ref, syn, data_range=ref.max() - ref.min(), win_size=7,
                                     use_sample_covariance=True)
    assert image_metrics(ref, syn)["ssim"] == pytest.approx(expected, abs=1e-6)


def test_masked_ssim_matches_skimage_map_mean_without_value_range():
    ref, syn = smooth_pair(seed=2)
    mask = box_mask(ref.shape, (1, 5, 4), (12, 30, 20))  # crosses the 3-voxel border
    _, ssim_map = structural_similarity(ref, syn, data_range=ref.max() - ref.min(), full=True)
    expected = crop(ssim_map, 3)[crop(mask, 3)].mean()
    assert image_metrics(ref, syn, mask)["ssim"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("value_range", [CT_RANGE, (0.0, 800.0), (-200.0, 300.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_ssim_matches_skimage_synthrad_recipe(value_range, masked):
    ref, syn = smooth_pair(seed=3, scale=900.0, offset=100.0, noise=60.0)  # clipping at both ends
    assert ref.min() < value_range[0] and ref.max() > value_range[1]
    mask = box_mask(ref.shape, (2, 6, 3), (15, 25, 26)) if masked else None
    expected = skimage_synthrad_ssim(ref, syn, mask, value_range)
    got = image_metrics(ref, syn, mask, value_range=value_range)["ssim"]
    assert got == pytest.approx(expected, abs=1e-6)


def test_slabs_and_bounding_boxes_do_not_change_results(monkeypatch):
    ref, syn = smooth_pair(seed=4, noise=80.0)
    mask = np.zeros(ref.shape, bool)
    mask[3, 4, 5] = mask[16, 27, 20] = mask[10, 10:20, 8] = True
    cases = [(None, None), (mask, None), (None, CT_RANGE), (mask, CT_RANGE)]
    whole = [image_metrics(ref, syn, m, value_range=v) for m, v in cases]
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 50)  # one row per slab
    sliced = [image_metrics(ref, syn, m, value_range=v) for m, v in cases]
    for a, b in zip(whole, sliced, strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_several_images_share_the_reference_and_get_their_own_metrics(monkeypatch):
    ref, syn = smooth_pair(seed=6, noise=80.0)
    _, other = smooth_pair(seed=7, noise=30.0)
    mask = box_mask(ref.shape, (2, 6, 3), (15, 25, 26))
    masks = {"whole": None, "box": mask, "empty": np.zeros(ref.shape, bool)}
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 2000)  # several tiles along both first axes
    both = metrics.roi_metrics_many(ref, {"a": syn, "b": other}, masks, value_range=CT_RANGE)
    assert list(both) == ["a", "b"] and list(both["a"]) == ["whole", "box"]
    for name, image in (("a", syn), ("b", other)):
        assert both[name] == metrics.roi_metrics(ref, image, masks, value_range=CT_RANGE)
    assert both["a"]["box"]["ssim"] != both["b"]["box"]["ssim"]


def test_tiles_inside_a_region_share_the_unmasked_map_and_match_skimage(monkeypatch):
    """With a value range a region's SSIM inputs are set to ``lo`` outside it; a tile whose
    source lies wholly inside the region reuses the unmasked map. The result must still be the
    SynthRAD recipe of scikit-image, for the whole volume and the region alike."""
    ref, syn = smooth_pair((30, 40, 36), seed=11, scale=900.0, offset=100.0, noise=60.0)
    mask = box_mask(ref.shape, (1, 2, 2), (29, 38, 34))
    mask[20:, 30:, 25:] = False  # a notch: some tiles straddle its border
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 2000)  # tiles of 7^3, sources of 13^3
    calls = []
    real_map = metrics._ssim_map
    monkeypatch.setattr(metrics, "_ssim_map", lambda *a, **k: calls.append(1) or real_map(*a, **k))
    got = metrics.roi_metrics_many(ref, {"syn": syn}, {"whole": None, "body": mask}, value_range=CT_RANGE)["syn"]
    for name, m in (("whole", None), ("body", mask)):
        assert got[name]["ssim"] == pytest.approx(skimage_synthrad_ssim(ref, syn, m, CT_RANGE), abs=1e-6), name
    tiles = len(list(metrics._tiles(tuple(slice(3, n - 3) for n in ref.shape))))
    assert tiles < len(calls) < 2 * tiles  # the region computed its own map only where it had to


# --- (c) MAE, RMSE, PSNR against numpy and scikit-image ----------------------------------------

def test_errors_match_numpy_and_skimage_without_value_range():
    ref, syn = smooth_pair(seed=5)
    got = image_metrics(ref, syn)
    data_range = ref.max() - ref.min()
    assert got["mae"] == pytest.approx(np.abs(ref - syn).mean(), rel=1e-12)
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(ref, syn)), rel=1e-12)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, syn, data_range=data_range),
                                        rel=1e-12)


def test_masked_errors_use_the_whole_reference_range_without_value_range():
    ref, syn = smooth_pair(seed=6)
    mask = box_mask(ref.shape, (4, 4, 4), (10, 20, 12))
    got = image_metrics(ref, syn, mask)
    r, s = ref[mask], syn[mask]
    assert got["mae"] == pytest.approx(np.abs(r - s).mean(), rel=1e-12)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((r - s) ** 2)), rel=1e-12)
    expected = peak_signal_noise_ratio(r, s, data_range=ref.max() - ref.min())
    assert got["psnr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_errors_with_value_range_clip_only_psnr(masked):
    ref, syn = smooth_pair(seed=7, scale=1500.0, noise=200.0)
    assert ref.min() < -1024 and ref.max() > 3000
    mask = box_mask(ref.shape, (0, 3, 3), (20, 29, 25)) if masked else np.ones(ref.shape, bool)
    got = image_metrics(ref, syn, mask if masked else None, value_range=CT_RANGE)
    r, s = ref[mask], syn[mask]
    assert got["mae"] == pytest.approx(np.abs(r - s).mean(), rel=1e-12)  # unclipped
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((r - s) ** 2)), rel=1e-12)  # unclipped
    expected = peak_signal_noise_ratio(np.clip(r, *CT_RANGE), np.clip(s, *CT_RANGE),
                                       data_range=4024.0)
    assert got["psnr"] == pytest.approx(expected, rel=1e-12)


# --- (d, e) known cases ------------------------------------------------------------------------

@pytest.mark.parametrize("value_range", [None, CT_RANGE])
def test_identical_volumes(value_range):
    ref, _ = smooth_pair(seed=8)
    mask = box_mask(ref.shape, (2, 2, 2), (12, 20, 20))
    for m in (None, mask):
        got = image_metrics(ref, ref.copy(), m, value_range=value_range)
        assert got["mae"] == 0.0 and got["rmse"] == 0.0
        assert got["psnr"] == math.inf  # no error at all: infinite PSNR, as in scikit-image
        assert got["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_of_10_hu():
    ref, _ = smooth_pair(seed=9, scale=200.0)
    assert -1024 < ref.min() and ref.max() + 10 < 3000  # no clipping
    got = image_metrics(ref, ref + 10.0, value_range=CT_RANGE)
    assert got["mae"] == pytest.approx(10.0, rel=1e-12)
    assert got["rmse"] == pytest.approx(10.0, rel=1e-12)
    assert got["psnr"] == pytest.approx(20 * math.log10(4024 / 10), rel=1e-12)
    generic = image_metrics(ref, ref + 10.0)
    assert generic["psnr"] == pytest.approx(20 * math.log10((ref.max() - ref.min()) / 10))


def test_returns_python_floats_in_the_documented_keys():
    ref, syn = smooth_pair(seed=10)
    got = image_metrics(FakeVolume(ref.astype(np.float32)), FakeVolume(syn), value_range=CT_RANGE)
    assert list(got) == ["mae", "psnr", "ssim", "rmse"]
    assert all(type(v) is float for v in got.values())
    json.dumps(got)


def test_integer_inputs_and_label_masks():
    ref, syn = smooth_pair(seed=11)
    ref16, syn16 = np.rint(ref).astype(np.int16), np.rint(syn).astype(np.int16)
    labels = np.zeros(ref.shape, np.uint8)
    labels[3:15, 5:25, 5:20] = 2  # any value > 0 is inside, as in SynthRAD2023
    got = image_metrics(ref16, syn16, labels, value_range=CT_RANGE)
    expected = image_metrics(ref16.astype(np.float64), syn16.astype(np.float64), labels > 0,
                             value_range=CT_RANGE)
    assert got == pytest.approx(expected, rel=1e-12)


def test_ssim_is_nan_when_the_mask_lies_only_in_the_border():
    ref, syn = smooth_pair(seed=12)
    mask = box_mask(ref.shape, (0, 0, 0), (3, 32, 28))
    got = image_metrics(ref, syn, mask, value_range=CT_RANGE)
    assert math.isnan(got["ssim"]) and math.isfinite(got["mae"]) and math.isfinite(got["psnr"])


# --- (f) masks restrict the computation --------------------------------------------------------

def test_changes_outside_the_mask_do_not_matter():
    ref, syn = smooth_pair(seed=13)
    mask = box_mask(ref.shape, (5, 8, 8), (12, 20, 18))
    near = ~mask  # every voxel outside the mask, including its direct neighbours
    far = ~box_mask(ref.shape, (2, 5, 5), (15, 23, 21))  # beyond SSIM's 3-voxel reach
    changed = syn.copy()
    changed[near] += 500.0 * np.random.default_rng(0).standard_normal(near.sum())
    changed_far = np.where(far, syn - 700.0, syn)
    for value_range in (None, CT_RANGE):
        base = image_metrics(ref, syn, mask, value_range=value_range)
        near_result = image_metrics(ref, changed, mask, value_range=value_range)
        for key in ("mae", "psnr", "rmse"):
            assert near_result[key] == base[key]
        far_result = image_metrics(ref, changed_far, mask, value_range=value_range)
        assert far_result == pytest.approx(base, rel=1e-12)
    # SynthRAD2023 fills everything outside the mask, so even neighbours leave SSIM alone.
    assert (image_metrics(ref, changed, mask, value_range=CT_RANGE)["ssim"]
            == pytest.approx(image_metrics(ref, syn, mask, value_range=CT_RANGE)["ssim"],
                             rel=1e-12))
    assert image_metrics(ref, changed)["mae"] != image_metrics(ref, syn)["mae"]


def test_roi_metrics_skips_empty_masks_and_keeps_order():
    ref, syn = smooth_pair(seed=14)
    liver = box_mask(ref.shape, (4, 4, 4), (14, 20, 18))
    tumor = np.zeros(ref.shape, bool)
    rows = roi_metrics(ref, syn, {"whole": None, "tumor": tumor, "liver": FakeVolume(liver)},
                       value_range=CT_RANGE)
    assert list(rows) == ["whole", "liver"]
    assert rows["whole"] == image_metrics(ref, syn, value_range=CT_RANGE)
    assert rows["liver"] == image_metrics(ref, syn, liver, value_range=CT_RANGE)
    generic = roi_metrics(ref, syn, {"liver": liver})
    assert generic["liver"] == image_metrics(ref, syn, liver)


# --- (g) bad inputs ----------------------------------------------------------------------------

def bad_cases():
    ref, syn = smooth_pair(shape=(10, 12, 12), seed=15)
    nan = syn.copy()
    nan[1, 2, 3] = np.nan
    inf = ref.copy()
    inf[0, 0, 0] = np.inf
    return [
        ("differ in shape", (ref, syn[:-1]), {}),
        ("mask has shape", (ref, syn, np.ones((10, 12, 11), bool)), {}),
        ("mask is empty", (ref, syn, np.zeros(ref.shape, bool)), {}),
        ("non-finite", (ref, nan), {}),
        ("non-finite", (inf, syn), {}),
        ("value_range", (ref, syn), {"value_range": (3000, -1024)}),
        ("value_range", (ref, syn), {"value_range": (0, math.nan)}),
        ("value_range", (ref, syn), {"value_range": (1, 2, 3)}),
        ("value_range", (ref, syn), {"value_range": "ct"}),
        ("constant", (np.full(ref.shape, 40.0), syn), {}),
        ("at least 7", (ref[:, :6], syn[:, :6]), {}),
        ("volume", (ref[0, 0], syn[0, 0]), {}),
        ("volume", (ref[None], syn[None]), {}),
        ("real numbers", (ref.astype(complex), syn), {}),
        ("boolean or numeric", (ref, syn, np.full(ref.shape, "x")), {}),
    ]


@pytest.mark.parametrize(("message", "args", "kwargs"), bad_cases())
def test_bad_inputs_raise_one_line_value_errors(message, args, kwargs):
    with pytest.raises(ValueError, match=message) as raised:
        image_metrics(*args, **kwargs)
    assert "\n" not in str(raised.value)


def test_roi_metrics_checks_every_mask():
    ref, syn = smooth_pair(seed=16)
    with pytest.raises(ValueError, match="mask 'liver' has shape"):
        roi_metrics(ref, syn, {"whole": None, "liver": np.ones((3, 3, 3), bool)})
