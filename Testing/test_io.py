"""MedTranslateLib.io: formats, geometry round trips, real DICOM, bad input."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from MedTranslateLib import io as mio
from MedTranslateLib.io import Volume, read_mask, read_volume, resample_like, write_volume


def _geometry_error(a: Volume, b: Volume) -> float:
    return max(float(np.abs(np.subtract(getattr(a, f), getattr(b, f))).max())
               for f in ("spacing", "origin", "direction"))


# ---------------------------------------------------------------------------------------------
# Volume
# ---------------------------------------------------------------------------------------------
def test_volume_converts_and_validates():
    v = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, :, ::-1], (1, 2, 3))
    assert v.array.dtype == np.float32 and v.array.flags.c_contiguous
    assert v.shape == (2, 3, 4)
    assert v.spacing == (1.0, 2.0, 3.0) and len(v.direction) == 9
    with pytest.raises(ValueError, match="3-D"):
        Volume(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="empty"):
        Volume(np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        Volume(np.full((2, 2, 2), np.inf), source="x.nii")
    with pytest.raises(ValueError, match="spacing must be positive"):
        Volume(np.zeros((2, 2, 2)), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="direction must be 9"):
        Volume(np.zeros((2, 2, 2)), direction=(1, 0, 0, 1))
    with pytest.raises(ValueError, match="myfile"):
        Volume(np.zeros((2, 2)), source="myfile")


def test_volume_helpers(oblique_volume):
    v = oblique_volume
    w = v.with_array(v.array * 2)
    assert w.same_geometry(v) and np.array_equal(w.array, v.array * 2)
    with pytest.raises(ValueError, match="shape"):
        v.with_array(np.zeros((1, 2, 3)))
    c = v.copy()
    c.array[0, 0, 0] += 5
    assert c.array[0, 0, 0] != v.array[0, 0, 0]
    moved = Volume(v.array, v.spacing, (0, 0, 0), v.direction)
    assert not moved.same_geometry(v)
    back = Volume.from_sitk(v.to_sitk())
    assert back.same_geometry(v, atol=0) and np.array_equal(back.array, v.array)
    # index_to_physical agrees with SimpleITK
    img = v.to_sitk()
    assert np.allclose(v.index_to_physical((1, 2, 3)),
                       img.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext, atol", [(".nrrd", 1e-12), (".nhdr", 1e-12), (".mha", 0.0), (".mhd", 0.0),
                                       # NIfTI stores geometry as float32
                                       (".nii", 1e-5), (".nii.gz", 1e-5)])
def test_file_round_trip_keeps_geometry(tmp_path, oblique_volume, ext, atol):
    path = write_volume(oblique_volume, tmp_path / "sub" / f"vol{ext}")
    assert path == tmp_path / "sub" / f"vol{ext}" and path.is_file()
    back = read_volume(path)
    assert back.shape == oblique_volume.shape
    assert np.array_equal(back.array, oblique_volume.array)
    assert _geometry_error(back, oblique_volume) <= atol
    assert back.source == str(path)
    # no temporary leftovers
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_float_values_round_trip_exactly(tmp_path, oblique_volume):
    v = oblique_volume.with_array(oblique_volume.array / 7.3)
    for ext in (".nii.gz", ".nrrd", ".mha"):
        assert np.array_equal(read_volume(write_volume(v, tmp_path / f"f{ext}")).array, v.array)


def test_dicom_series_round_trip(tmp_path, oblique_volume):
    folder = write_volume(oblique_volume, tmp_path / "series")
    files = sorted(folder.iterdir())
    assert len(files) == oblique_volume.shape[0] and all(f.suffix == ".dcm" for f in files)
    back = read_volume(folder)
    assert back.shape == oblique_volume.shape
    assert _geometry_error(back, oblique_volume) < 1e-3
    assert np.array_equal(back.array, oblique_volume.array)  # integer HU: exact
    # the files are standard int16 CT with rescale, and per-slice positions
    ds = [pydicom.dcmread(f) for f in files]
    assert ds[0].Modality == "CT" and ds[0].BitsAllocated == 16 and ds[0].PixelRepresentation == 1
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert len({d.SOPInstanceUID for d in ds}) == len(ds)
    positions = sorted((int(d.InstanceNumber), tuple(float(p) for p in d.ImagePositionPatient)) for d in ds)
    for k, (_, pos) in enumerate(positions):
        assert np.allclose(pos, oblique_volume.index_to_physical((0, 0, k)), atol=1e-3)
    hu = ds[0].pixel_array * float(ds[0].RescaleSlope) + float(ds[0].RescaleIntercept)
    k0 = int(ds[0].InstanceNumber) - 1
    assert np.array_equal(hu, oblique_volume.array[k0])


def test_dicom_float_values_use_rescale(tmp_path, oblique_volume):
    v = oblique_volume.with_array(oblique_volume.array / 1000.0)  # not integers: needs a slope
    back = read_volume(write_volume(v, tmp_path / "float_series", modality="MR"))
    span = float(v.array.max() - v.array.min())
    assert np.abs(back.array - v.array).max() <= span / 60000
    assert pydicom.dcmread(next((tmp_path / "float_series").iterdir())).Modality == "MR"


def test_dicom_left_handed_volume_reads_back_same_physical_image(tmp_path, oblique_volume):
    d = np.asarray(oblique_volume.direction).reshape(3, 3).copy()
    d[:, 2] *= -1
    v = Volume(oblique_volume.array, oblique_volume.spacing, oblique_volume.origin, d.ravel())
    back = read_volume(write_volume(v, tmp_path / "lh"))
    # same voxels at the same physical points
    same = resample_like(back, v, interpolation="nearest")
    assert np.array_equal(same.array, v.array)


def test_dicom_output_folder_replaced_but_foreign_folder_refused(tmp_path, oblique_volume):
    folder = write_volume(oblique_volume, tmp_path / "s")
    write_volume(oblique_volume.with_array(oblique_volume.array + 1), folder)
    assert read_volume(folder).array[0, 0, 0] == oblique_volume.array[0, 0, 0] + 1
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        write_volume(oblique_volume, tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# real DICOM (pydicom's test files)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_dicom_file_values_and_spacing(tmp_path, name):
    src = get_testdata_file(name)
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    ds = pydicom.dcmread(src)
    vol = read_volume(src)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    assert vol.shape == (1, *ds.pixel_array.shape)
    assert np.array_equal(vol.array[0], expected.astype(np.float32))
    row, col = (float(s) for s in ds.PixelSpacing)
    assert vol.spacing[0] == pytest.approx(col) and vol.spacing[1] == pytest.approx(row)
    assert vol.spacing[2] == pytest.approx(float(ds.get("SpacingBetweenSlices", ds.SliceThickness)))
    assert np.allclose(vol.origin, [float(p) for p in ds.ImagePositionPatient])
    # reading never modifies the file
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
    # a copy without extension is recognised by its DICOM preamble
    plain = tmp_path / "IM0001"
    shutil.copy(src, plain)
    assert np.array_equal(read_volume(plain).array, vol.array)


def test_ct_small_is_in_hounsfield_units():
    vol = read_volume(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024  # stored values are shifted: HU needs the intercept
    assert vol.array.min() < -500  # air / lung in HU


def _real_series(tmp_path, n=4):
    """A series folder made from CT_small.dcm: n slices 5 mm apart, one series."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "ct_series"
    folder.mkdir()
    z0 = float(src.ImagePositionPatient[2])
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [src.ImagePositionPatient[0], src.ImagePositionPatient[1], z0 + 5.0 * k]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = f"{src.SOPInstanceUID}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"{(n - k):03d}.dcm")  # file names in reverse order on purpose
    return folder, src


def test_real_dicom_series_folder(tmp_path):
    folder, src = _real_series(tmp_path)
    vol = read_volume(folder)
    assert vol.shape == (4, 128, 128)
    assert vol.spacing[2] == pytest.approx(5.0)
    hu0 = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    for k in range(4):  # sorted by position, not by file name
        assert np.array_equal(vol.array[k], (hu0 + 10 * k).astype(np.float32))


def test_several_series_reads_largest_with_warning(tmp_path):
    folder, src = _real_series(tmp_path, n=3)
    other = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    other.SeriesInstanceUID = src.SeriesInstanceUID + ".9"
    other.SOPInstanceUID = src.SOPInstanceUID + ".99"
    other.save_as(folder / "other.dcm")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        vol = read_volume(folder)
    assert vol.shape[0] == 3


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the file
# ---------------------------------------------------------------------------------------------
def _write_sitk(path, image):
    sitk.WriteImage(image, str(path))
    return path


def _bad_inputs(tmp_path):
    z = np.zeros((3, 4, 5), np.float32)
    nan = z.copy()
    nan[1, 1, 1] = np.nan
    inf = z.copy()
    inf[0, 0, 0] = np.inf
    ims3 = [sitk.GetImageFromArray(z) for _ in range(2)]
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip" * 20)
    (tmp_path / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\n")
    real = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (tmp_path / "corrupt.dcm").write_bytes(real[: len(real) // 2])  # truncated transfer
    (tmp_path / "empty_bytes.mha").write_bytes(b"")
    (tmp_path / "zero_size.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 0 4 4\n"
                                             "encoding: raw\n\n")
    (tmp_path / "not_dicom_folder").mkdir()
    (tmp_path / "not_dicom_folder" / "readme.txt").write_text("hello")
    return {
        "missing.nii.gz": "not found",
        "corrupt.nii.gz": "gzip stream is truncated or corrupt",
        "corrupt.nrrd": "cannot read",
        "corrupt.dcm": "cannot read",
        "empty_bytes.mha": "empty",
        "zero_size.nrrd": "cannot read|empty",
        "flat2d.nii.gz": (_write_sitk(tmp_path / "flat2d.nii.gz", sitk.GetImageFromArray(z[0])), "2-D")[1],
        "flat2d.png": (_write_sitk(tmp_path / "flat2d.png", sitk.GetImageFromArray(z[0].astype(np.uint8))),
                       "unsupported")[1],
        "time4d.nii.gz": (_write_sitk(tmp_path / "time4d.nii.gz", sitk.JoinSeries(ims3)), "4-D")[1],
        "rgb.nrrd": (_write_sitk(tmp_path / "rgb.nrrd", sitk.Compose(ims3 + ims3[:1])), "multi-component")[1],
        "nan.mha": (_write_sitk(tmp_path / "nan.mha", sitk.GetImageFromArray(nan)), "non-finite")[1],
        "inf.nrrd": (_write_sitk(tmp_path / "inf.nrrd", sitk.GetImageFromArray(inf)), "non-finite")[1],
        # ITK's NIfTI reader turns NaN into 0: io checks the raw voxels itself.
        "nan.nii.gz": (_write_sitk(tmp_path / "nan.nii.gz", sitk.GetImageFromArray(nan)), "1 NaN")[1],
        "inf64.nii": (_write_sitk(tmp_path / "inf64.nii", sitk.GetImageFromArray(inf.astype(np.float64))),
                      "1 Inf")[1],
        "not_dicom_folder": "no DICOM series",
    }


def test_bad_inputs_raise_value_error_naming_the_file(tmp_path):
    for name, problem in _bad_inputs(tmp_path).items():
        path = tmp_path / name
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ValueError, match=problem) as info:
            read_volume(path)
        assert name in str(info.value), (name, str(info.value))
        if before is not None:
            assert path.read_bytes() == before, f"reading modified {name}"


def test_4d_with_single_volume_is_accepted(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))])
    assert read_volume(_write_sitk(tmp_path / "one.nii.gz", img)).shape == (3, 4, 5)


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path, oblique_volume, monkeypatch):
    def boom(image, path, *args, **kwargs):
        with open(path, "wb") as fh:  # a partial file in the staging area
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mio.sitk, "WriteImage", boom)
    target = tmp_path / "out" / "vol.nii.gz"
    with pytest.raises(ValueError, match="disk full"):
        write_volume(oblique_volume, target)
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, oblique_volume, monkeypatch):
    target = write_volume(oblique_volume, tmp_path / "vol.mha")
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mio.sitk, "WriteImage", boom)
    with pytest.raises(ValueError):
        write_volume(oblique_volume.with_array(oblique_volume.array + 1), target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["vol.mha"]


def test_failed_dicom_write_leaves_nothing(tmp_path, oblique_volume, monkeypatch):
    calls = {"n": 0}
    real = sitk.ImageFileWriter.Execute

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(self, *args)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", flaky)
    with pytest.raises(ValueError, match="disk full"):
        write_volume(oblique_volume, tmp_path / "series")
    assert os.listdir(tmp_path) == []


def test_write_rejects_unknown_extension(tmp_path, oblique_volume):
    with pytest.raises(ValueError, match="unsupported output extension"):
        write_volume(oblique_volume, tmp_path / "vol.png")
    with pytest.raises(TypeError):
        write_volume(np.zeros((2, 2, 2)), tmp_path / "vol.nrrd")


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def test_read_mask_same_geometry_keeps_labels(tmp_path, oblique_volume):
    labels = oblique_volume.with_array(np.arange(oblique_volume.array.size).reshape(oblique_volume.shape) % 4)
    mask = read_mask(write_volume(labels, tmp_path / "labels.nrrd"), like=oblique_volume)
    assert np.array_equal(mask.array, labels.array) and mask.same_geometry(oblique_volume)


def test_read_mask_resamples_nearest_onto_other_grid(tmp_path):
    # fine grid: 20^3 at 1 mm, a labelled cube at voxels 5..14 (mm 5..14)
    fine = np.zeros((20, 20, 20), np.float32)
    fine[5:15, 5:15, 5:15] = 2
    fine[8:10, 8:10, 8:10] = 3
    path = write_volume(Volume(fine), tmp_path / "mask.nii.gz")
    # coarse grid: 2 mm voxels, origin shifted by 1 mm, partly outside the mask's extent
    like = Volume(np.zeros((12, 12, 12)), spacing=(2, 2, 2), origin=(1, 1, 1))
    mask = read_mask(path, like=like)
    assert mask.same_geometry(like)
    assert set(np.unique(mask.array)) <= {0.0, 2.0, 3.0}
    # coarse voxel k sits at 1 + 2k mm -> inside the cube for k = 2..6
    expected = np.zeros((12, 12, 12), np.float32)
    expected[2:7, 2:7, 2:7] = 2
    expected[4, 4, 4] = 3  # 9 mm
    assert np.array_equal(mask.array, expected)


def test_read_mask_without_overlap_raises(tmp_path):
    path = write_volume(Volume(np.ones((4, 4, 4))), tmp_path / "m.nrrd")
    far = Volume(np.zeros((4, 4, 4)), origin=(500, 0, 0))
    with pytest.raises(ValueError, match="m.nrrd.*overlap"):
        read_mask(path, like=far)


# ---------------------------------------------------------------------------------------------
# what ITK reads silently wrong: refused in one line naming the file (issue 13, classes 2-4)
# ---------------------------------------------------------------------------------------------
def _nifti(tmp_path, name="ok.nii", shape=(6, 8, 10), spacing=(1.5, 1.25, 3.0)):
    image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 97)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def _patched(path, out, **fields):
    """A copy of NIfTI-1 ``path`` with header fields replaced ({name: (offset, format, values)})."""
    import struct

    data = bytearray(path.read_bytes())
    for offset, fmt, values in fields.values():
        struct.pack_into("<" + fmt, data, offset, *values)
    out.write_bytes(bytes(data))
    return out


def test_truncated_and_inconsistent_files_are_refused(tmp_path):
    import gzip
    import struct

    ok = _nifti(tmp_path)
    data = ok.read_bytes()
    offset = int(struct.unpack("<f", data[108:112])[0])
    (tmp_path / "header_only.nii").write_bytes(data[:offset])
    (tmp_path / "cut_on_voxel.nii").write_bytes(data[: offset + 4 * 100])
    (tmp_path / "cut_mid_voxel.nii").write_bytes(data[: offset + 4 * 100 + 2])
    _patched(ok, tmp_path / "offset_past_end.nii", vox=(108, "f", (1e6,)))
    gz = gzip.compress(data)
    (tmp_path / "truncated.nii.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "short_stream.nii.gz").write_bytes(gzip.compress(data[: offset + 40]))
    int16 = tmp_path / "int16.nii.gz"  # integer voxels: the gzip trailer is checked, no second inflate
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(480, dtype=np.int16).reshape(6, 8, 10)), str(int16))
    packed = int16.read_bytes()
    (tmp_path / "truncated_int16.nii.gz").write_bytes(packed[: len(packed) * 2 // 3])
    image = sitk.GetImageFromArray(np.ones((6, 8, 10), np.float32))
    for name in ("raw.mha", "raw.nrrd"):
        sitk.WriteImage(image, str(tmp_path / name), useCompression=False)
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(whole[:-100])
    expected = {"header_only.nii": "truncated", "cut_on_voxel.nii": "truncated", "cut_mid_voxel.nii": "truncated",
                "offset_past_end.nii": "truncated", "truncated.nii.gz": "gzip stream is truncated",
                "short_stream.nii.gz": "truncated", "truncated_int16.nii.gz": "truncated",
                "cut_raw.mha": "truncated", "cut_raw.nrrd": "cannot read"}
    for name, problem in expected.items():
        with pytest.raises(ValueError, match=problem) as info:
            read_volume(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message, message
    assert read_volume(ok).shape == (6, 8, 10)  # the intact files still read
    assert np.array_equal(read_volume(int16).array.ravel(), np.arange(480))


def test_geometry_is_never_changed_silently(tmp_path):
    ok = _nifti(tmp_path)
    cases = {
        "zero_spacing.nii": _patched(ok, tmp_path / "zero_spacing.nii", pixdim=(80, "3f", (0.0, 1.25, 3.0))),
        "nan_spacing.nii": _patched(ok, tmp_path / "nan_spacing.nii", pixdim=(80, "3f", (1.5, float("nan"), 3.0))),
        "negative_spacing.nii": _patched(ok, tmp_path / "negative_spacing.nii", pixdim=(88, "f", (-3.0,))),
        "sheared.nii": _patched(ok, tmp_path / "sheared.nii", code=(254, "h", (2,)),
                                srow=(280, "12f", (1.5, 0.4, 0, 0, 0, 1.25, 0, 0, 0, 0, 3.0, 0))),
        "scaled.nii": _patched(ok, tmp_path / "scaled.nii", code=(254, "h", (2,)),
                               srow=(280, "12f", (3.0, 0, 0, 0, 0, 1.25, 0, 0, 0, 0, 3.0, 0))),
    }
    (tmp_path / "sheared.mha").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0.5 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 1 1 1\nDimSize = 4 4 4\n"
        "ElementType = MET_FLOAT\nElementDataFile = sheared.raw\n")
    (tmp_path / "sheared.raw").write_bytes(np.zeros(64, np.float32).tobytes())
    cases["sheared.mha"] = tmp_path / "sheared.mha"
    big = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    big.SetSpacing((1.0, 1.0, 1e12))
    sitk.WriteImage(big, str(tmp_path / "absurd_spacing.nrrd"))
    cases["absurd_spacing.nrrd"] = tmp_path / "absurd_spacing.nrrd"
    problems = {"zero_spacing.nii": "pixdim.1. = 0.0", "nan_spacing.nii": "pixdim.2. = nan",
                "negative_spacing.nii": "pixdim.3. = -3.0", "sheared.nii": "not orthonormal",
                "scaled.nii": "disagree with the pixel spacing", "sheared.mha": "not orthonormal",
                "absurd_spacing.nrrd": "outside"}
    for name, path in cases.items():
        with pytest.raises(ValueError, match=problems[name]) as info:
            read_volume(path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not orthonormal"):
        Volume(np.zeros((2, 2, 2)), direction=(1, 0.2, 0, 0, 1, 0, 0, 0, 1))


def _series(tmp_path, name, positions, orientations=None):
    folder = tmp_path / name
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, z in enumerate(positions):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [src.ImagePositionPatient[0], src.ImagePositionPatient[1], z]
        if orientations and k in orientations:
            ds.ImageOrientationPatient = orientations[k]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = f"{src.SOPInstanceUID}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{k:03d}.dcm")
    return folder


def test_dicom_series_that_itk_would_stack_wrongly_are_refused(tmp_path):
    tilted = [1, 0, 0, 0, 0.9848078, 0.1736482]  # 10 degrees about x
    cases = {
        "missing": (_series(tmp_path, "missing", [0, 5, 10, 20, 25]), "1 missing slice"),
        "uneven": (_series(tmp_path, "uneven", [0, 5, 10, 13, 20]), "non-uniform spacing"),
        "duplicated": (_series(tmp_path, "duplicated", [0, 5, 5, 10]), "share the position"),
        "tilted": (_series(tmp_path, "tilted", [0, 5, 10, 15], {2: tilted}), "another orientation"),
    }
    for name, (folder, problem) in cases.items():
        with pytest.raises(ValueError, match=problem) as info:
            read_volume(folder)
        assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value), name
    assert read_volume(_series(tmp_path, "even", [0, 5, 10, 15])).spacing[2] == pytest.approx(5.0)


def test_headers_that_cannot_fit_in_memory_are_refused_before_reading(tmp_path, monkeypatch):
    import gzip
    import struct

    ok = _nifti(tmp_path)
    bomb = bytearray(ok.read_bytes()[:352])
    struct.pack_into("<8h", bomb, 40, 3, 2048, 2048, 2048, 1, 1, 1, 1)  # 32 GiB of float32, in a small gzip
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(bytes(bomb) + bytes(1 << 20)))
    (tmp_path / "huge.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4096 4096 4096\n"
                                        "encoding: raw\nendian: little\ndata file: huge.raw\n\n")
    (tmp_path / "huge.raw").write_bytes(bytes(64))
    from MedTranslateLib import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 8 * 2**30)
    for name in ("bomb.nii.gz", "huge.nhdr"):
        with pytest.raises(ValueError, match="GiB of memory is available") as info:
            read_volume(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))


def test_library_messages_never_reach_stderr(tmp_path, capfd):
    ok = _nifti(tmp_path)
    _patched(ok, tmp_path / "zero.nii", pixdim=(80, "3f", (0.0, 1.0, 1.0)))
    image = sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32))
    sitk.WriteImage(image, str(tmp_path / "raw.mha"), useCompression=False)
    (tmp_path / "cut.mha").write_bytes((tmp_path / "raw.mha").read_bytes()[:-50])
    (tmp_path / "empty_dir").mkdir()
    for name in ("zero.nii", "cut.mha", "empty_dir"):
        with pytest.raises(ValueError):
            read_volume(tmp_path / name)
    out, err = capfd.readouterr()
    assert err == "" and out == ""


# ---------------------------------------------------------------------------------------------
# outputs: never an input, all or nothing, no temporaries left (issue 13, classes 1 and 7)
# ---------------------------------------------------------------------------------------------
def test_files_read_and_written_cover_header_data_files(tmp_path, oblique_volume):
    header = write_volume(oblique_volume, tmp_path / "in.mhd")
    assert mio.files_read(header) == {header.resolve(), (tmp_path / "in.zraw").resolve()}
    assert mio.files_written(tmp_path / "in.mhd") == {header.resolve(), (tmp_path / "in.zraw").resolve()}
    nhdr = write_volume(oblique_volume, tmp_path / "b.nhdr")
    assert (tmp_path / "b.raw.gz").resolve() in mio.files_read(nhdr)
    series = write_volume(oblique_volume, tmp_path / "series")
    inputs = mio.files_read(series)
    assert series.resolve() in inputs and len(inputs) == 1 + oblique_volume.shape[0]
    clashes = {"the series folder": tmp_path / "series", "a file in it": tmp_path / "series" / "x.nii.gz",
               "one of its slices": next(series.iterdir()), "the data file": tmp_path / "in.mhd",
               "a header sharing the data file": tmp_path / "in.nii"}
    inputs |= mio.files_read(header)
    for what, out in clashes.items():
        if what == "a header sharing the data file":
            continue  # in.nii writes in.nii only
        with pytest.raises(ValueError, match="would overwrite or change the input"):
            mio.check_outputs_spare_inputs({what: out}, inputs)
    mio.check_outputs_spare_inputs({"--output": tmp_path / "in.nii", "--difference": tmp_path / "d.mhd"}, inputs)


def test_output_set_is_all_or_nothing(tmp_path, oblique_volume, monkeypatch):
    first = tmp_path / "syn.nii.gz"
    second = tmp_path / "diff.mhd"
    write_volume(oblique_volume, first)
    write_volume(oblique_volume, second)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = oblique_volume.with_array(oblique_volume.array + 7)

    # a failing second write: the first (already staged) is not committed, nothing changes
    real = mio.sitk.WriteImage
    calls = {"n": 0}

    def second_fails(image, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(mio.sitk, "WriteImage", second_fails)
    with pytest.raises(ValueError, match="disk full"), mio.OutputSet() as outputs:
        outputs.add_volume(changed, first)
        outputs.add_volume(changed, second)
        outputs.commit()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(mio.sitk, "WriteImage", real)

    # a move that fails half-way through the commit: every previous output comes back
    real_replace = os.replace
    moves = {"n": 0}

    def third_move_fails(src, dst):
        moves["n"] += 1
        if moves["n"] == 5:
            raise OSError("no space left")
        return real_replace(src, dst)

    monkeypatch.setattr(mio.os, "replace", third_move_fails)
    with pytest.raises(OSError), mio.OutputSet() as outputs:
        outputs.add_volume(changed, first)
        outputs.add_volume(changed, second)
        outputs.commit()
    monkeypatch.setattr(mio.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_temporaries_of_a_killed_run_are_cleaned_and_its_output_restored(tmp_path, oblique_volume):
    import subprocess
    import sys

    target = write_volume(oblique_volume, tmp_path / "syn.nrrd")
    before = target.read_bytes()
    # a run killed (SIGKILL) in the middle of its commit: its previous output moved aside
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".syn.nrrd.medtranslate-{dead.stdout.strip()}-abc.tmp"
    stale.mkdir()
    os.replace(target, stale / ".old-syn.nrrd")
    (stale / "syn.nrrd").write_bytes(b"partial")
    write_volume(oblique_volume, tmp_path / "other.nrrd")  # the next run in that folder
    assert sorted(os.listdir(tmp_path)) == ["other.nrrd", "syn.nrrd"]
    assert target.read_bytes() == before
    # a live process's temporaries are left alone
    mine = tmp_path / f".x.medtranslate-{os.getpid()}-abc.tmp"
    mine.mkdir()
    write_volume(oblique_volume, tmp_path / "third.nrrd")
    assert mine.is_dir()


def test_sigterm_during_a_write_leaves_no_temporary(tmp_path):
    """The CLI turns SIGTERM into an exception: the write's ``finally`` removes its staging."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time, numpy as np\n"
            "from MedTranslateLib import cli, io\n"
            "real = io._write_dicom_series\n"
            "def slow(*a, **k):\n"
            "    print('writing', flush=True); time.sleep(30)\n"
            "io._write_dicom_series = slow\n"
            "cli.build_parser = lambda prog: type('P', (), {'parse_args': lambda self, argv: type('A', (), {'func': "
            "staticmethod(lambda a: io.write_volume(io.Volume(np.zeros((2, 3, 4))), sys.argv[1]))})()})()\n"
            "sys.exit(cli.main([]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "series")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.strip() == "medtranslate: terminated; nothing was written"
    assert os.listdir(tmp_path) == []


def test_dicom_io_leaves_the_process_locale_alone(tmp_path, oblique_volume):
    """GDCM sets the C locale to "C": Python's default text encoding then turns ASCII for the
    whole process (a later ``Path.read_text()`` of a '±' failed in another test)."""
    import locale

    before = (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False))
    read_volume(write_volume(oblique_volume, tmp_path / "series"))
    assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before
