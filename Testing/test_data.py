"""MedTranslateLib.data: case discovery, splits, slice geometry, paired/unpaired datasets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from MedTranslateLib.data import (
    PairedSliceDataset,
    SliceGeometry,
    SliceSpec,
    UnpairedSliceDataset,
    find_cases,
    find_volume_file,
    fit_slice_to_size,
    roi_slice_range,
    split_cases,
)
from MedTranslateLib.io import Volume, write_volume

Z, Y, X = 8, 32, 40
#: per-case tumour slice with the largest area
TUMOR_PEAK = {"case_00": 3, "case_01": 5, "case_02": 2}


def _write_case(folder: Path, seed: int, tumor_peak: int, ext: str = ".nii.gz") -> None:
    """A tiny abdomen: elliptic body (40 HU), liver (60 HU), tumour (growing to a peak slice),
    a contrast-filled vessel that is bright only in the CTA; body in x 6..33, y 8..23."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:Z, :Y, :X]
    body = ((yy - 15.5) / 8.0) ** 2 + ((xx - 19.5) / 14.0) ** 2 <= 1.0
    liver = body & (xx < 16) & (yy > 12)
    tumor = np.zeros_like(body)
    for z in range(Z):
        r = max(0, 3 - abs(z - tumor_peak))
        tumor[z] = liver[z] & ((yy[z] - 16) ** 2 + (xx[z] - 11) ** 2 < r ** 2)
    vessel = body & ((yy - 15) ** 2 + (xx - 24) ** 2 <= 4)
    ct = np.where(body, 40.0, -1000.0) + 20.0 * liver - 30.0 * tumor + rng.normal(0, 5, body.shape)
    cta = ct + 350.0 * vessel + 80.0 * liver * ~tumor
    labels = body.astype(np.float32) + liver
    geo = dict(spacing=(0.8, 0.8, 2.5), origin=(-16.0, -12.8, 100.0 + seed))
    folder.mkdir(parents=True)
    write_volume(Volume(ct, **geo), folder / f"ct{ext}")
    write_volume(Volume(cta, **geo), folder / f"cta_arterial{ext}")
    for name, arr in (("liver", liver), ("tumor", tumor), ("labels", labels)):
        write_volume(Volume(arr.astype(np.float32), **geo), folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def case_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for i, (name, peak) in enumerate(TUMOR_PEAK.items()):
        _write_case(root / name, seed=i, tumor_peak=peak, ext=".nrrd" if i == 1 else ".nii.gz")
    (root / "not_a_case").mkdir()
    (root / "not_a_case" / "notes.txt").write_text("no volumes here")
    return root


@pytest.fixture(scope="module")
def cases(case_root):
    return find_cases(case_root, required=("ct", "cta_arterial"))


# ---------------------------------------------------------------------------------------------
# discovery and splits
# ---------------------------------------------------------------------------------------------
def test_find_cases(case_root, cases):
    assert [c.name for c in cases] == ["case_00", "case_01", "case_02"]
    assert find_volume_file(cases[1], "ct").name == "ct.nrrd"
    assert find_volume_file(cases[0], "t2") is None
    with pytest.raises(ValueError, match="no case folders with ct, t2"):
        find_cases(case_root, required=("ct", "t2"))
    with pytest.raises(ValueError, match="not found"):
        find_cases(case_root / "missing")
    with pytest.raises(ValueError, match="no case folders"):
        find_cases(case_root / "not_a_case")


def test_find_cases_nested_and_ambiguous(tmp_path):
    v = Volume(np.zeros((2, 3, 4)))
    write_volume(v, tmp_path / "site_a" / "p1" / "t1.mha")
    write_volume(v, tmp_path / "site_b" / "p2" / "t1.nii")
    assert [c.name for c in find_cases(tmp_path, ["t1"])] == ["p1", "p2"]
    write_volume(v, tmp_path / "site_b" / "p2" / "t1.nrrd")
    with pytest.raises(ValueError, match="several files for 't1'"):
        find_cases(tmp_path, ["t1"])


def test_split_is_deterministic_disjoint_and_order_independent():
    cases = [Path(f"/data/case_{i:03d}") for i in range(23)]
    split = split_cases(cases, seed=3)
    assert sorted(sum(split.values(), []), key=str) == sorted(cases, key=str)
    assert [len(split[k]) for k in ("train", "val", "test")] == [16, 2, 5]
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    assert split_cases(shuffled, seed=3) == split
    # a different root for the same case names gives the same split (names decide)
    moved = split_cases([Path("/elsewhere") / c.name for c in cases], seed=3)
    assert {k: [p.name for p in v] for k, v in moved.items()} == {k: [p.name for p in v] for k, v in split.items()}
    assert split_cases(cases, seed=4) != split
    for key, members in split.items():
        for other in set(split) - {key}:
            assert not set(members) & set(split[other])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10])
def test_split_small_counts(n):
    cases = [f"c{i}" for i in range(n)]
    split = split_cases(cases)
    assert sum(len(v) for v in split.values()) == n
    assert len(split["train"]) >= 1
    if n >= 3:
        assert split["val"] and split["test"]


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="ratios"):
        split_cases(["a", "b"], ratios=(1, 1))
    with pytest.raises(ValueError, match="duplicate"):
        split_cases(["a", "a"])


def test_split_of_real_folders_ignores_filesystem_order(cases):
    assert split_cases(cases) == split_cases(list(reversed(cases)))


# ---------------------------------------------------------------------------------------------
# slice geometry
# ---------------------------------------------------------------------------------------------
def test_slice_geometry_keeps_aspect_and_inverts():
    img = np.full((64, 96), -1.0, np.float32)
    img[20:40, 10:80] = 1.0  # a wide body
    mask = img > 0
    out, g = fit_slice_to_size(img, 32, mask=mask, margin=0.0)
    assert out.shape == (32, 32)
    r0, r1, c0, c1 = g.box
    assert (r1 - r0) == (c1 - c0) == 70  # square box around the 70-pixel-wide body
    assert c0 == 10 and r0 <= 20 and r1 >= 40
    # body keeps its aspect: 70 wide -> 32 px, 20 tall -> ~9 px
    rows = np.flatnonzero((out > 0).any(axis=1))
    assert 8 <= rows.size <= 11
    back = g.invert(out, fill=-1.0)
    assert back.shape == img.shape
    assert np.abs(back - img)[mask].mean() < 0.15  # blurred by the resize, but in place
    m_out = g.apply(mask.astype(np.float32), mode="nearest")
    assert set(np.unique(m_out)) <= {0.0, 1.0}
    m_back = g.invert(m_out, mode="nearest")
    assert (m_back == mask).mean() > 0.97


def test_slice_geometry_anisotropic_spacing_is_square_in_mm():
    g = SliceGeometry.from_mask(np.ones((10, 40), bool), 16, spacing=(4.0, 1.0), margin=0.0)
    nr, nc = g.box_shape
    assert nr * 4.0 == pytest.approx(nc * 1.0, abs=4.0)


def test_slice_geometry_identity_and_torch_batches():
    g = SliceGeometry.full((16, 16), 16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(g.apply(x), x) and torch.equal(g.invert(x), x)
    g2 = SliceGeometry.from_dict(SliceGeometry.full((20, 12), 8).to_dict())
    assert g2 == SliceGeometry.full((20, 12), 8)
    assert g2.apply(torch.zeros(4, 1, 20, 12)).shape == (4, 1, 8, 8)
    assert g2.invert(torch.zeros(4, 1, 8, 8)).shape == (4, 1, 20, 12)
    with pytest.raises(ValueError, match="expected"):
        g2.apply(torch.zeros(1, 8, 8))


def test_roi_slice_range():
    roi = np.zeros((10, 4, 4), bool)
    roi[6, :2, :2] = True
    roi[7] = True  # largest at 7
    assert roi_slice_range(roi, 0, 2) == (5, 10)
    assert roi_slice_range(roi, 0, 0) == (7, 8)
    assert roi_slice_range(np.zeros((3, 3, 3)), 0, 1) is None


def test_slice_spec_validation():
    with pytest.raises(ValueError, match="axis"):
        SliceSpec(axis=3)
    with pytest.raises(ValueError, match="size"):
        SliceSpec(size=0)
    with pytest.raises(ValueError, match="min_foreground"):
        SliceSpec(min_foreground=2.0)


# ---------------------------------------------------------------------------------------------
# paired dataset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paired(cases):
    return PairedSliceDataset(cases, "ct", "cta_arterial", "ct_abdomen", "ct_angio", SliceSpec(size=24))


def test_paired_items(paired):
    assert len(paired) == 3 * Z and paired.cases == ["case_00", "case_01", "case_02"]
    item = paired[5]
    assert set(item) == {"source", "target", "liver", "tumor", "body", "case", "index"}
    assert item["case"] == "case_00" and item["index"] == 5
    for key in ("source", "target", "liver", "tumor", "body"):
        assert item[key].shape == (1, 24, 24) and item[key].dtype == torch.float32
    for key in ("source", "target"):
        assert item[key].min() >= -1 and item[key].max() <= 1
    for key in ("liver", "tumor", "body"):
        assert set(item[key].unique().tolist()) <= {0.0, 1.0}
    # the vessel is bright only in the target
    assert (item["target"] - item["source"]).max() > 0.3
    batch = next(iter(DataLoader(paired, batch_size=4)))
    assert batch["source"].shape == (4, 1, 24, 24) and len(batch["case"]) == 4


def test_masks_align_with_images_after_resize(paired):
    for i in range(len(paired)):
        item = paired[i]
        src, body, liver = item["source"][0], item["body"][0] > 0, item["liver"][0] > 0
        # CT abdomen window: air -> -1, body (>= 10 HU) well above; check away from the edges
        inner_body = torch.nn.functional.max_pool2d((~body)[None, None].float(), 3, 1, 1)[0, 0] == 0
        assert (src[inner_body] > -0.2).all()
        outer_air = torch.nn.functional.max_pool2d(body[None, None].float(), 3, 1, 1)[0, 0] == 0
        assert (src[outer_air] < -0.99).all()
        assert (liver <= body).all()


def test_paired_fills_the_frame_with_body(paired):
    body = paired[0]["body"][0]
    cols = torch.nonzero(body.any(dim=0)).flatten()
    assert cols.min() <= 2 and cols.max() >= 21  # the wide axis spans the output
    g = paired.geometry(0)
    assert g.in_shape == (Y, X) and g.size == 24
    back = g.invert(paired[0]["body"], mode="nearest")
    assert back.shape == (1, Y, X)


def test_paired_presets_are_fitted_per_case(cases):
    ds = PairedSliceDataset(cases[:2], "ct", "cta_arterial", "mr_percentile", {"kind": "mr_zscore"},
                            SliceSpec(size=16))
    s0, t0 = ds.presets("case_00")
    s1, _ = ds.presets("case_01")
    assert s0.fitted and t0.fitted and s0.lower != s1.lower
    assert ds.source_preset_config == {"kind": "mr_percentile", "name": "mr_percentile",
                                       "p_low": 0.5, "p_high": 99.5, "ignore_zeros": True}


def test_roi_selection_takes_largest_tumor_slice_plus_minus_k(cases):
    ds = PairedSliceDataset(cases, "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                            SliceSpec(size=16, roi="tumor", roi_margin=1))
    got: dict[str, list[int]] = {}
    for i in range(len(ds)):
        item = ds[i]
        got.setdefault(item["case"], []).append(item["index"])
    assert got == {c: [p - 1, p, p + 1] for c, p in TUMOR_PEAK.items()}
    # margin clipped at the volume edge
    ds = PairedSliceDataset(cases[2:], "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                            SliceSpec(size=16, roi="tumor", roi_margin=4))
    assert [ds[i]["index"] for i in range(len(ds))] == list(range(0, 7))


def test_min_foreground_skips_near_empty_slices(tmp_path):
    arr = np.full((6, 16, 16), -1000.0, np.float32)
    arr[2:4, 2:14, 2:14] = 50.0
    write_volume(Volume(arr), tmp_path / "c0" / "ct.nii.gz")
    write_volume(Volume(arr + 5), tmp_path / "c0" / "cta_arterial.nii.gz")
    with pytest.warns(UserWarning, match="no 'liver' mask"):
        ds = PairedSliceDataset([tmp_path / "c0"], "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                                SliceSpec(size=8, min_foreground=0.1), masks=("liver",))
    assert [ds[i]["index"] for i in range(len(ds))] == [2, 3]  # body from intensity (no labels)
    assert ds[0]["liver"].sum() == 0


def test_paired_resamples_misaligned_target(tmp_path):
    arr = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    write_volume(Volume(arr), tmp_path / "c" / "t1.nrrd")
    write_volume(Volume(arr[:, :, :6], origin=(0, 0, 0)), tmp_path / "c" / "t2.nrrd")
    with pytest.warns(UserWarning, match="resampling"):
        ds = PairedSliceDataset([tmp_path / "c"], "t1", "t2", "mr_percentile", "mr_percentile",
                                SliceSpec(size=8), masks=())
    assert ds[0]["target"].shape == ds[0]["source"].shape == (1, 8, 8)


def test_paired_errors(case_root, cases, tmp_path):
    with pytest.raises(ValueError, match="no volume for modality 't2'"):
        PairedSliceDataset(cases, "ct", "t2", "ct_abdomen", "mr_zscore")
    with pytest.raises(ValueError, match="not found"):
        PairedSliceDataset([tmp_path / "nope"], "ct", "cta_arterial", "ct_abdomen", "ct_angio")
    with pytest.raises(ValueError, match="list of case folders"):
        PairedSliceDataset(case_root, "ct", "cta_arterial", "ct_abdomen", "ct_angio")
    with pytest.raises(ValueError, match="unknown intensity preset"):
        PairedSliceDataset(cases, "ct", "cta_arterial", "ct_soft", "ct_angio")


@pytest.mark.parametrize("axis, shape", [(1, (1, 16, 16)), (2, (1, 16, 16))])
def test_other_axes(cases, axis, shape):
    ds = PairedSliceDataset(cases[:1], "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                            SliceSpec(size=16, axis=axis))
    assert len(ds) == (Y if axis == 1 else X)
    assert ds[10]["source"].shape == shape


# ---------------------------------------------------------------------------------------------
# unpaired dataset
# ---------------------------------------------------------------------------------------------
def test_unpaired_draws_target_from_another_case(cases):
    ds = UnpairedSliceDataset(cases, "ct", "cta_arterial", "ct_abdomen", "ct_angio", SliceSpec(size=16),
                              seed=7)
    assert len(ds) == 3 * Z
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["source_case"] != item["target_case"]
        assert item["case"] == item["source_case"]
        seen.add(item["target_case"])
        for key in ("source_liver", "target_liver", "source_tumor", "target_tumor", "source_body",
                    "target_body"):
            assert item[key].shape == (1, 16, 16)
    assert seen == {"case_00", "case_01", "case_02"}
    # deterministic given index and seed
    again = UnpairedSliceDataset(cases, "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                                 SliceSpec(size=16), seed=7)
    assert [ds.target_for(i) for i in range(len(ds))] == [again.target_for(i) for i in range(len(ds))]
    assert torch.equal(ds[3]["target"], again[3]["target"])
    other = UnpairedSliceDataset(cases, "ct", "cta_arterial", "ct_abdomen", "ct_angio",
                                 SliceSpec(size=16), seed=8)
    assert [ds.target_for(i) for i in range(len(ds))] != [other.target_for(i) for i in range(len(ds))]


def test_unpaired_accepts_single_modality_cases_and_needs_two(tmp_path):
    arr = np.zeros((3, 8, 8), np.float32)
    arr[:, 2:6, 2:6] = 100.0
    write_volume(Volume(arr), tmp_path / "a" / "t1.nii.gz")
    write_volume(Volume(arr * 2), tmp_path / "b" / "t2.nii.gz")
    ds = UnpairedSliceDataset([tmp_path / "a", tmp_path / "b"], "t1", "t2", "mr_percentile", "mr_zscore",
                              SliceSpec(size=8), masks=())
    assert len(ds) == 3 and all(ds[i]["target_case"] == "b" for i in range(3))
    write_volume(Volume(arr), tmp_path / "c" / "t1.nii.gz")
    write_volume(Volume(arr), tmp_path / "c" / "t2.nii.gz")
    with pytest.raises(ValueError, match="another case"):
        UnpairedSliceDataset([tmp_path / "c"], "t1", "t2", "mr_percentile", "mr_zscore",
                             SliceSpec(size=8), masks=())


@pytest.mark.parametrize("slab_bytes", [None, 1, 3000])
def test_body_mask_opening_is_ndimage_binary_opening(slab_bytes, monkeypatch):
    """The opening is written as shifted logical operations for speed, a few slices at a time
    (``slab_bytes``: one slice, or several with a shorter last slab): the same mask as
    ``ndimage.binary_opening`` with a 3x3 in-plane square, borders included."""
    from scipy import ndimage

    from MedTranslateLib import data
    from MedTranslateLib import io as mio
    from MedTranslateLib.data import body_mask

    if slab_bytes is not None:
        monkeypatch.setattr(data, "_OPEN_BYTES", slab_bytes)
    rng = np.random.default_rng(3)
    for trial in range(4):
        hu = np.where(rng.random((6, 24, 30)) > 0.35, 40.0, -1000.0).astype(np.float32)
        if trial % 2:  # air around it: the labelling runs inside the mask's box, placed back here
            hu = np.pad(hu, ((1 + trial, 2), (5, 3 + trial), (4, 7)), constant_values=-1000.0)
        expected = ndimage.binary_opening(hu > -500.0, structure=np.ones((1, 3, 3), bool))
        labels, n = ndimage.label(expected)
        if n > 1:
            sizes = ndimage.sum_labels(expected, labels, index=np.arange(1, n + 1))
            expected = labels == int(np.argmax(sizes)) + 1
        got = body_mask(mio.Volume(hu), fill_holes=False)
        assert np.array_equal(got, expected), trial
    for shape in ((2, 1, 5), (3, 2, 7), (2, 3, 3), (1, 4, 2)):  # thinner than the square, or just as wide
        hu = np.full(shape, 40.0, np.float32)
        expected = ndimage.binary_opening(hu > -500.0, structure=np.ones((1, 3, 3), bool))
        assert np.array_equal(body_mask(mio.Volume(hu), fill_holes=False), expected), shape


def test_body_mask_with_more_components_than_int16_labels():
    """Over 32767 components (more than int16 labels hold): the largest is still the one kept."""
    from MedTranslateLib import io as mio
    from MedTranslateLib.data import body_mask

    hu = np.full((1, 4 * 182 + 8, 4 * 182), -1000.0, np.float32)
    for r in range(182):  # 182 x 182 = 33124 blocks of 3x3, one voxel apart
        hu[0, 4 * r:4 * r + 3, :].reshape(-1, 182, 4)[:, :, :3] = 40.0
    hu[0, -6:, 10:20] = 40.0  # the largest: 6 x 10
    got = body_mask(mio.Volume(hu), fill_holes=False)
    expected = np.zeros(hu.shape, bool)
    expected[0, -6:, 10:20] = True
    assert np.array_equal(got, expected)


def test_body_mask_components_are_ndimage_label_s_and_ties_keep_the_first():
    """The labelling (ITK's run-length label map) counts and numbers components in ndimage.label's
    raster order, so the largest is the same one, and of two equally large the first in raster
    order is kept."""
    import SimpleITK as sitk
    from scipy import ndimage

    from MedTranslateLib import io as mio
    from MedTranslateLib.data import _largest_component, body_mask

    rng = np.random.default_rng(8)
    for trial in range(30):
        m = rng.random(tuple(rng.integers(3, 25, 3))) < rng.uniform(0.2, 0.7)
        labels, n = ndimage.label(m)
        mapping = sitk.BinaryImageToLabelMapFilter()
        mapping.SetFullyConnected(False)
        image = sitk.LabelMapToLabelImageFilter().Execute(mapping.Execute(sitk.GetImageFromArray(m.view(np.uint8))))
        assert mapping.GetNumberOfObjects() == n, trial
        assert np.array_equal(sitk.GetArrayFromImage(image), labels), trial
        sizes = np.bincount(labels.ravel())[1:]
        got = _largest_component(m)
        expected = None if n <= 1 else labels == int(np.argmax(sizes)) + 1
        assert (got is None) == (expected is None) and (got is None or np.array_equal(got, expected)), trial
    hu = np.full((4, 20, 20), -1000.0, np.float32)
    hu[:, 12:17, 2:7] = 40.0  # two 4 x 5 x 5 blocks: the lower-right one comes later in raster order
    hu[:, 2:7, 12:17] = 40.0
    expected = np.zeros(hu.shape, bool)
    expected[:, 2:7, 12:17] = True
    assert np.array_equal(body_mask(mio.Volume(hu), fill_holes=False), expected)


def test_body_mask_fills_holes_as_binary_fill_holes_per_slice():
    """Holes filled for every slice in one labelling: the same as ``ndimage.binary_fill_holes``
    slice by slice, with air around the body and with the body on the volume's edges."""
    from scipy import ndimage

    from MedTranslateLib import io as mio
    from MedTranslateLib.data import body_mask

    rng = np.random.default_rng(5)
    for trial in range(4):
        hu = np.full((5, 30, 34), 40.0, np.float32)  # tissue to the edges, with air holes and notches
        for z, r, c, h, w in zip(*(rng.integers(0, n, 40) for n in (5, 30, 34, 4, 4)), strict=True):
            hu[z, r:r + h + 1, c:c + w + 1] = -1000.0
        if trial % 2:
            hu = np.pad(hu, ((1, 1), (3, 2), (2, 4)), constant_values=-1000.0)
        unfilled = body_mask(mio.Volume(hu), fill_holes=False)
        expected = np.stack([ndimage.binary_fill_holes(s) for s in unfilled])
        assert (expected & ~unfilled).any(), trial  # there are holes to fill
        assert np.array_equal(body_mask(mio.Volume(hu)), expected), trial
