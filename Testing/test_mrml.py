"""MedTranslateLib.mrml against real MRML (the ``slicer-core`` package, no Slicer application).

Covers: Volume <-> volume node geometry (oblique, anisotropic, LPS/RAS), nodes read from real
files through MRML storage nodes, parent transforms, masks from segmentations (own and shared
labelmap layers, other grids) and labelmaps, modality/model/device/dependency helpers, input
validation, the whole translation flow with a tiny pix2pix bundle (result nodes, names, tags,
display, tables, subject hierarchy, inputs untouched), ROI-only slices, cancel (nothing added,
stops within one batch), rollback on failure, the result layout, and the user-facing errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Union

import numpy as np
import parameter_node_rules
import pytest
import slicer  # slicer-core (requirements-dev.txt): real MRML without the Slicer application
import slicer_app_doubles
import vtk
from conftest import rotation_direction
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode

from MedTranslateLib import app, mrml, phantom
from MedTranslateLib import io as mio
from MedTranslateLib.worker import JobState

LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def oblique(shape=(7, 9, 11), seed=0) -> mio.Volume:
    rng = np.random.default_rng(seed)
    return mio.Volume(np.rint(rng.normal(0, 300, shape)), spacing=(0.7, 1.3, 2.9), origin=(-12.3, 45.6, 7.8),
                      direction=rotation_direction(), source="oblique")


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def corners_and_centre(volume: mio.Volume) -> np.ndarray:
    """Physical (LPS) positions of the 8 voxel-corner points and the centre voxel."""
    z, y, x = volume.shape
    points = [(i, j, k) for i in (-0.5, x - 0.5) for j in (-0.5, y - 0.5) for k in (-0.5, z - 0.5)]
    points.append(((x - 1) / 2, (y - 1) / 2, (z - 1) / 2))
    return np.stack([volume.index_to_physical(p) for p in points])


def assert_same_volume(a: mio.Volume, b: mio.Volume, atol=1e-6):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)
    np.testing.assert_allclose(corners_and_centre(a), corners_and_centre(b), atol=atol)


def node_checksum(node) -> str:
    """Data, geometry, attributes, transform and display state of a node."""
    h = hashlib.sha256()
    h.update(node.GetName().encode())
    if node.IsA("vtkMRMLVolumeNode"):
        image = node.GetImageData()
        h.update(np.ascontiguousarray(mrml._image_array(image, "x")).tobytes())
        h.update(str(image.GetExtent()).encode())
        h.update(ijk_to_ras(node).tobytes())
        display = node.GetDisplayNode()
        if display is not None:
            h.update(f"{display.GetWindow()} {display.GetLevel()} {display.GetColorNodeID()}".encode())
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            h.update(f"{segmentation.GetNthSegmentID(i)} {segment.GetName()} {segment.GetLabelValue()}".encode())
            image = segment.GetRepresentation(mrml.BINARY_LABELMAP)
            h.update(np.ascontiguousarray(mrml._image_array(image, "s")).tobytes())
            matrix = vtk.vtkMatrix4x4()
            image.GetImageToWorldMatrix(matrix)
            h.update(f"{image.GetExtent()}".encode() + mrml._to_numpy(matrix).tobytes())
        h.update(str([segmentation.ContainsRepresentation(r) for r in (mrml.BINARY_LABELMAP, "Closed surface")]).encode())
    for name in sorted(node.GetAttributeNames() or []):
        h.update(f"{name}={node.GetAttribute(name)}".encode())
    h.update(str(node.GetTransformNodeID()).encode() if node.IsA("vtkMRMLTransformableNode") else b"")
    return h.hexdigest()


def node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def table_rows(table) -> dict[str, dict[str, float]]:
    t = table.GetTable()
    cols = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    rows = {}
    for r in range(t.GetNumberOfRows()):
        rows[table.GetCellText(r, 0)] = {cols[c]: float(table.GetCellText(r, c)) for c in range(1, len(cols))}
    return rows


# --------------------------------------------------------------------------- Volume <-> node


def test_volume_node_round_trip_oblique(scene):
    volume = oblique()
    node = mrml.add_volume_node(scene, volume, "oblique")
    # IJK -> RAS is the LPS geometry with x and y flipped.
    expected = np.eye(4)
    expected[:3, :3] = LPS @ volume.direction_matrix * np.asarray(volume.spacing)
    expected[:3, 3] = LPS @ np.asarray(volume.origin)
    np.testing.assert_allclose(ijk_to_ras(node), expected, atol=1e-12)
    # A voxel centre: MRML's IJK -> RAS equals the Volume's physical point in RAS.
    ijk = np.array([3.0, 5.0, 2.0, 1.0])
    np.testing.assert_allclose((ijk_to_ras(node) @ ijk)[:3], LPS @ volume.index_to_physical(ijk[:3]), atol=1e-12)
    assert node.GetImageData().GetDimensions() == (11, 9, 7)
    back = mrml.volume_from_node(node)
    assert_same_volume(back, volume, atol=1e-12)
    assert back.source == "oblique"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_node_read_through_storage_node_matches_io(scene, tmp_path, suffix):
    volume = oblique(seed=1)
    path = mio.write_volume(volume, tmp_path / f"case{suffix}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "from file")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1
    from_mrml = mrml.volume_from_node(node)
    from_io = mio.read_volume(path)
    # float32 NIfTI header precision: positions agree to 1e-4 mm
    assert_same_volume(from_mrml, from_io, atol=1e-4)


def test_integer_node_with_shifted_extent(scene):
    """Voxel type is converted to float32; an extent not starting at 0 moves the origin."""
    image = vtk.vtkImageData()
    image.SetExtent(2, 5, 1, 3, 0, 1)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    values = np.arange(4 * 3 * 2, dtype=np.int16).reshape(2, 3, 4)
    from vtk.util import numpy_support

    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "shifted")
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 3.0, 4.0)
    node.SetOrigin(10.0, 20.0, 30.0)
    volume = mrml.volume_from_node(node)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, values)
    ras_first = ijk_to_ras(node) @ np.array([2.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(LPS @ np.asarray(volume.origin), ras_first[:3])


def test_linear_parent_transform_is_applied_between_frames(scene):
    volume = oblique(seed=2)
    source = mrml.add_volume_node(scene, volume, "source")
    moved = mrml.add_volume_node(scene, volume, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(rotation_direction(0, 0, 20)).reshape(3, 3)
    matrix[:3, 3] = (5.0, -3.0, 2.0)
    transform.SetMatrixTransformToParent(mrml._to_vtk(matrix))
    moved.SetAndObserveTransformNodeID(transform.GetID())
    in_source_frame = mrml.volume_from_node(moved, frame_node=source)
    np.testing.assert_allclose(LPS @ corners_and_centre(in_source_frame).T,
                               (matrix[:3, :3] @ (LPS @ corners_and_centre(volume).T)) + matrix[:3, 3:4],
                               atol=1e-9)
    # Same transform on both: nothing applied.
    source.SetAndObserveTransformNodeID(transform.GetID())
    assert_same_volume(mrml.volume_from_node(moved, frame_node=source), volume, atol=1e-12)


def test_non_linear_transform_asks_to_harden(scene):
    volume = oblique()
    source = mrml.add_volume_node(scene, volume, "source")
    warped = mrml.add_volume_node(scene, volume, "warped")
    spline = vtk.vtkThinPlateSplineTransform()
    points = vtk.vtkPoints()
    for p in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
        points.InsertNextPoint(p)
    spline.SetSourceLandmarks(points)
    spline.SetTargetLandmarks(points)
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    node.SetAndObserveTransformToParent(spline)
    warped.SetAndObserveTransformNodeID(node.GetID())
    with pytest.raises(ValueError, match="harden"):
        mrml.volume_from_node(warped, frame_node=source)


# --------------------------------------------------------------------------- masks


def _segmentation(scene, masks: dict[str, np.ndarray], like: mio.Volume):
    mrml._ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    node.CreateDefaultDisplayNodes()
    for name, mask in masks.items():
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.AddRepresentation(mrml.BINARY_LABELMAP, mrml._oriented_image(mask, like))
        node.GetSegmentation().AddSegment(segment, f"id_{name}")
    return node


def test_segments_are_resampled_onto_the_source_grid(scene):
    source = oblique(shape=(8, 10, 12))
    source_node = mrml.add_volume_node(scene, source, "source")
    # Segments drawn on a finer, shifted grid of the same physical space.
    fine = mio.Volume(np.zeros((16, 20, 24)), spacing=np.asarray(source.spacing) / 2,
                      origin=source.index_to_physical((-0.25, -0.25, -0.25)), direction=source.direction)
    zz, yy, xx = np.mgrid[:16, :20, :24]
    ball = ((zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 12) ** 2) < 36
    box = (zz > 2) & (zz < 13) & (yy > 3) & (yy < 17) & (xx > 3) & (xx < 21)
    node = _segmentation(scene, {"Liver": box, "Tumour 1": ball}, fine)
    assert mrml.mask_choices(node) == [("Liver", "id_Liver"), ("Tumour 1", "id_Tumour 1")]
    assert mrml.default_mask_choice(node, "liver") == "id_Liver"
    assert mrml.default_mask_choice(node, "tumor") == "id_Tumour 1"
    for key, mask in (("id_Liver", box), ("id_Tumour 1", ball)):
        got = mrml.mask_from_node(node, key, source, frame_node=source_node)
        expected = mio.resample_mask_like(fine.with_array(mask), source).array > 0.5
        assert got.dtype == bool and got.shape == source.shape
        np.testing.assert_array_equal(got, expected)
        assert got.any()
    with pytest.raises(ValueError, match="no segment 'nope'.*Liver"):
        mrml.mask_from_node(node, "nope", source, frame_node=source_node)


def test_segments_sharing_one_labelmap_layer(scene):
    like = oblique(shape=(6, 8, 10))
    a = np.zeros(like.shape, bool)
    a[1:4, 2:6, 2:5] = True
    b = np.zeros(like.shape, bool)
    b[1:4, 2:6, 6:9] = True
    node = _segmentation(scene, {"liver": a, "tumor": b}, like)
    segmentation = node.GetSegmentation()
    segmentation.CollapseBinaryLabelmaps(False)  # non-overlapping: one layer, label values 1 and 2
    assert {segmentation.GetSegment("id_liver").GetLabelValue(), segmentation.GetSegment("id_tumor").GetLabelValue()} == {1, 2}
    assert segmentation.GetNumberOfLayers() == 1
    np.testing.assert_array_equal(mrml.mask_from_node(node, "id_liver", like), a)
    np.testing.assert_array_equal(mrml.mask_from_node(node, "id_tumor", like), b)


def test_empty_segment_gives_an_empty_mask(scene):
    like = oblique(shape=(4, 5, 6))
    node = _segmentation(scene, {"liver": np.zeros(like.shape, bool)}, like)
    mask = mrml.mask_from_node(node, "id_liver", like)
    assert mask.shape == like.shape and not mask.any()


def test_labelmap_regions(scene):
    like = oblique(shape=(5, 6, 7))
    labels = np.zeros(like.shape)
    labels[1:4, 1:5, 1:6] = 1
    labels[2, 2:4, 2:4] = 2
    node = mrml.add_volume_node(scene, like.with_array(labels), "lits", class_name="vtkMRMLLabelMapVolumeNode")
    assert mrml.mask_choices(node) == [("all labels (> 0)", "nonzero"), ("label 1", "label:1"), ("label 2", "label:2")]
    assert mrml.default_mask_choice(node, "liver") == "nonzero"
    assert mrml.default_mask_choice(node, "tumor") == "label:2"
    np.testing.assert_array_equal(mrml.mask_from_node(node, "nonzero", like), labels > 0)
    np.testing.assert_array_equal(mrml.mask_from_node(node, "label:2", like), labels == 2)
    with pytest.raises(ValueError, match="unknown region"):
        mrml.mask_from_node(node, "liver", like)


# --------------------------------------------------------------------------- helpers without torch


def test_source_modality_from_attributes_and_dicom(scene):
    node = mrml.add_volume_node(scene, oblique(), "v")
    assert mrml.source_modality(node) is None
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemAttribute(item, "DICOM.Modality", "MR")
    assert mrml.source_modality(node) == "mr"
    node.SetAttribute("DICOM.Modality", "CT")
    assert mrml.source_modality(node) == "ct"
    node.SetAttribute(mrml.MODALITY_ATTRIBUTE, "t1")
    assert mrml.source_modality(node) == "t1"


def test_modality_families_and_fit():
    assert mrml.modality_family("cta_arterial") == "ct"
    assert mrml.modality_family("T1_post") == "mr"
    assert mrml.modality_family("PT") == "pet"
    assert mrml.model_fits("ct", "ct") and mrml.model_fits("ct", None) and mrml.model_fits("mr", "t2")
    assert not mrml.model_fits("ct", "t1")
    assert mrml.modality_label("cta_arterial") == "CTA (arterial)"
    assert mrml.modality_label("xray") == "xray"


def test_model_choices_filter_by_source_modality():
    def info(name, source, target="cta_arterial", method="pix2pix", origin="bundled", error=None, **architecture):
        meta = None if error else SimpleNamespace(architecture=architecture)
        return SimpleNamespace(name=name, source=source, target=target, method=method, origin=origin,
                               path=f"/m/{name}", error=error, meta=meta)

    models = [info("ct_model", "ct"), info("mr_model", "t1", "t1_post", "bbdm", "user"),
              info("broken", "?", error="medtranslate.yaml: missing method")]
    ct = mrml.model_choices("ct", models)
    assert [c.name for c in ct] == ["ct_model", "broken"]
    assert ct[0].label == "ct_model — pix2pix, CT → CTA (arterial)"
    assert not ct[0].steps and ct[1].error
    mr = mrml.model_choices("mr", models)
    assert [c.name for c in mr] == ["mr_model", "broken"] and mr[0].steps and mr[0].label.endswith("(user)")
    assert [c.name for c in mrml.model_choices(None, models)] == ["ct_model", "mr_model", "broken"]
    # Monte-Carlo dropout makes samples meaningful for pix2pix too.
    assert mrml.model_choices("ct", [info("mc", "ct", test_time_dropout=True)])[0].steps


def test_missing_dependencies_uses_find_spec_only():
    present = {"torch", "yaml"}
    missing = mrml.missing_dependencies(lambda name: object() if name in present else None)
    assert missing == ["monai>=1.5", "safetensors>=0.4", "scipy>=1.11"]
    assert mrml.missing_dependencies() == []  # the test environment has them all


def test_install_plan_puts_torch_first_and_monai_without_dependencies():
    """MONAI's own torch requirement must not let pip replace the build PyTorchUtils installed."""
    every = [requirement for _, requirement in mrml.DEPENDENCIES]
    plan = mrml.install_plan(every)
    assert plan.torch == "torch>=2.4"
    assert plan.no_deps == ("monai>=1.5",)
    assert plan.others == ("safetensors>=0.4", "pyyaml>=6", "scipy>=1.11")
    assert mrml.install_plan(["scipy>=1.11"]) == mrml.InstallPlan(None, (), ("scipy>=1.11",))
    assert mrml.sample_dependencies_missing(every) == ["scipy>=1.11"]


def test_device_choices_on_this_machine():
    import torch

    choices = mrml.device_choices()
    assert choices[0][1] == "auto" and ("CPU", "cpu") in choices
    assert len(choices) == 2 + torch.cuda.device_count()


def test_check_inputs_says_what_is_missing(scene):
    source = mrml.add_volume_node(scene, oblique(), "CT")
    other = mrml.add_volume_node(scene, oblique(seed=3), "CTA")
    seg = _segmentation(scene, {"liver": np.ones(oblique().shape, bool)}, oblique())
    model = mrml.ModelChoice("demo", "demo", "pix2pix", "ct", "cta_arterial")
    ok, text = mrml.check_inputs(None, model=model)
    assert not ok and "source volume" in text
    ok, text = mrml.check_inputs(source, model=model, reference_node=source)
    assert not ok and "reference" in text
    ok, text = mrml.check_inputs(source, model=model, liver=(seg, None))
    assert not ok and "liver segment" in text
    ok, text = mrml.check_inputs(source, model=model, roi_only=True)
    assert not ok and "ROI" in text
    ok, text = mrml.check_inputs(source, model=None)
    assert not ok and "Add model" in text
    source.SetAttribute(mrml.MODALITY_ATTRIBUTE, "ct")
    assert "for CT sources" in mrml.check_inputs(source, model=None)[1]
    broken = mrml.ModelChoice("bad", "bad", error="model.safetensors: not a valid safetensors file")
    ok, text = mrml.check_inputs(source, model=broken)
    assert not ok and "not a valid safetensors" in text
    ok, text = mrml.check_inputs(source, model=None, dependencies_missing=["torch>=2.4", "monai>=1.4"])
    assert ok and "torch, monai" in text
    ok, text = mrml.check_inputs(source, model=model, liver=(seg, "id_liver"), reference_node=other, roi_only=True)
    assert ok and text.startswith("Ready: CT → synthetic CTA (arterial) with demo")


def test_readable_errors():
    from MedTranslateLib.engine import TranslationCancelled

    assert mrml.readable_error(ValueError("case.nii: file not found\nmore")) == "case.nii: file not found"
    assert "nothing was added" in mrml.readable_error(TranslationCancelled("x"))
    assert "Out of GPU memory" in mrml.readable_error(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert "monai" in mrml.readable_error(ModuleNotFoundError("No module named 'monai'", name="monai"))
    assert mrml.readable_error(RuntimeError("boom")) == "Translation failed (RuntimeError): boom"


def test_color_tables_are_diverging_and_heat_and_shared(scene):
    diverging = mrml.difference_color_node(scene)
    assert mrml.difference_color_node(scene) is diverging  # one shared node
    lut = diverging.GetLookupTable()
    low, mid, high = (np.array(lut.GetTableValue(i)[:3]) for i in (0, 128, 255))
    assert low[2] > low[0] and high[0] > high[2]  # blue -> red
    assert np.ptp(mid) < 0.05 and mid.mean() > 0.8  # light grey centre (= 0 difference)
    heat = mrml.uncertainty_color_node(scene).GetLookupTable()
    values = np.array([heat.GetTableValue(i)[:3] for i in range(256)]).sum(axis=1)
    assert values[0] == 0 and values[-1] == pytest.approx(3.0) and np.all(np.diff(values) >= -1e-9)


def test_result_layout_xml_parses():
    xml = mrml.result_layout_xml([["MedTranslateSource", "MedTranslateSynthetic"], ["MedTranslateDifference"]])
    root = ET.fromstring(xml)
    rows = root.findall("./item/layout")
    assert root.get("type") == "vertical" and [r.get("type") for r in rows] == ["horizontal", "horizontal"]
    views = [[v.get("singletontag") for v in r.iter("view")] for r in rows]
    assert views == [["MedTranslateSource", "MedTranslateSynthetic"], ["MedTranslateDifference"]]
    assert {v.get("class") for v in root.iter("view")} == {"vtkMRMLSliceNode"}
    assert root.find(".//view/property[@name='orientation']").text == "Axial"


# --------------------------------------------------------------------------- the translation flow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    import torch

    from MedTranslateLib.bundle import BundleMeta, ModalitySpec, SliceSpec, save_bundle
    from MedTranslateLib.methods import build_method

    folder = tmp_path_factory.mktemp("bundles")
    meta = BundleMeta(source=ModalitySpec("ct", "ct_abdomen"), target=ModalitySpec("cta_arterial", "ct_angio"),
                      slice=SliceSpec(size=32, axis=0))
    torch.manual_seed(0)
    plain = save_bundle(build_method("pix2pix", {"generator": {"ngf": 4, "num_downs": 3}}).eval(), meta,
                        folder / "tiny_pix2pix")
    torch.manual_seed(1)  # Monte-Carlo dropout: dropout sits in num_downs - 5 decoder blocks
    dropout = build_method("pix2pix", {"generator": {"ngf": 2, "num_downs": 6}, "test_time_dropout": True}).eval()
    meta.slice = SliceSpec(size=64, axis=0)
    mc = save_bundle(dropout, meta, folder / "tiny_mc_dropout")
    return SimpleNamespace(plain=plain, mc=mc)


@pytest.fixture(scope="module")
def case():
    config = phantom.PhantomConfig(shape=(16, 32, 32), spacing=(8.0, 8.0, 10.0), tumor_count=(1, 2))
    return phantom.generate_case(0, config)


@pytest.fixture
def sample(scene, case):
    nodes = mrml.add_phantom_case(scene, case)
    assert case.masks["tumor"].array.any()
    return nodes


def test_phantom_sample_data_in_scene(scene, case, sample):
    assert sample.source.GetAttribute(mrml.MODALITY_ATTRIBUTE) == "ct"
    assert sample.reference.GetAttribute(mrml.MODALITY_ATTRIBUTE) == "cta_arterial"
    assert_same_volume(mrml.volume_from_node(sample.source), case.images["ct"], atol=1e-9)
    assert_same_volume(mrml.volume_from_node(sample.reference), case.images["cta_arterial"], atol=1e-9)
    source = case.images["ct"]
    for name in ("liver", "tumor"):
        np.testing.assert_array_equal(mrml.mask_from_node(sample.segmentation, name, source, frame_node=sample.source),
                                      case.masks[name].array > 0.5)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(sample.source))
    assert sh.GetItemLevel(study) == "Study"
    assert sh.GetItemParent(sh.GetItemByDataNode(sample.segmentation)) == study
    assert sample.source.GetDisplayNode().GetWindow() == 400.0


def options(bundle, **kw):
    return mrml.TranslationOptions(model=str(bundle), device="cpu", batch_size=kw.pop("batch_size", 4), seed=7, **kw)


def test_whole_flow_creates_tagged_results_and_leaves_inputs_alone(scene, case, sample, bundles):
    from MedTranslateLib.bundle import load_bundle
    from MedTranslateLib.engine import VolumeTranslator

    inputs = (sample.source, sample.reference, sample.segmentation)
    before = {n.GetID(): node_checksum(n) for n in inputs}
    progress = []
    nodes = mrml.translate_nodes(scene, sample.source, options(bundles.plain),
                                 liver=(sample.segmentation, "liver"), tumor=(sample.segmentation, "tumor"),
                                 reference_node=sample.reference, progress=lambda *a: progress.append(a[:2]))
    assert {n.GetID(): node_checksum(n) for n in inputs} == before
    assert progress[0] == (0, 16) and progress[-1] == (16, 16)

    synthetic = nodes.synthetic
    assert synthetic.GetName() == "Phantom 0 CT – synthetic CTA (arterial) (pix2pix)"
    assert synthetic.GetAttribute("MedTranslate.Synthetic") == "1"
    assert synthetic.GetAttribute("MedTranslate.Role") == "synthetic"
    assert synthetic.GetAttribute("MedTranslate.Method") == "pix2pix"
    assert synthetic.GetAttribute("MedTranslate.Model") == "tiny_pix2pix"
    assert synthetic.GetAttribute("MedTranslate.Seed") == "7"
    assert synthetic.GetAttribute("MedTranslate.Source") == sample.source.GetID()
    assert "NOT FOR DIAGNOSIS" in synthetic.GetDescription()
    np.testing.assert_allclose(ijk_to_ras(synthetic), ijk_to_ras(sample.source), atol=1e-12)
    display = synthetic.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (1000.0, 200.0)  # the ct_angio target preset

    # Same numbers as the engine run directly on the same inputs, with the app's backend
    direct = VolumeTranslator(load_bundle(bundles.plain), device="cpu", batch_size=4,
                              backend=app.TranslationOptions.backend).translate(
        case.images["ct"], masks={"liver": case.masks["liver"].array > 0.5, "tumor": case.masks["tumor"].array > 0.5},
        reference=case.images["cta_arterial"], seed=7)
    np.testing.assert_array_equal(mrml.volume_from_node(synthetic).array, direct.synthetic.array)
    np.testing.assert_array_equal(mrml.volume_from_node(nodes.difference).array, direct.difference.array)
    np.testing.assert_array_equal(mrml.volume_from_node(nodes.reference_difference).array,
                                  direct.reference_difference.array)

    for node, role in ((nodes.difference, "difference"), (nodes.reference_difference, "reference_difference")):
        assert node.GetAttribute("MedTranslate.Role") == role and node.GetAttribute("MedTranslate.Synthetic") == "1"
        shown = node.GetDisplayNode()
        assert shown.GetColorNodeID() == mrml.difference_color_node(scene).GetID()
        assert shown.GetLevel() == 0.0 and shown.GetWindow() > 0
        values = mrml.volume_from_node(node).array
        assert shown.GetWindow() / 2 <= np.abs(values).max() + 1e-3  # the window fits the data
    assert nodes.difference.GetName().endswith("difference vs. source")
    assert nodes.uncertainty is None and nodes.confidence_table is None

    rows = table_rows(nodes.metrics_table)
    assert list(rows) == ["whole", "body", "liver", "tumor"]
    t = nodes.metrics_table.GetTable()
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == ["Region", "MAE", "PSNR", "SSIM", "RMSE"]
    for region, values in rows.items():
        for column, key in (("MAE", "mae"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("RMSE", "rmse")):
            assert values[column] == pytest.approx(direct.metrics[region][key], rel=1e-5, abs=1e-6)
    assert nodes.metrics_table.GetColumnUnitLabel("MAE") == "HU"

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(sample.source))
    for node in nodes.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study, node.GetName()

    # A second run gets its own, unique names.
    again = mrml.translate_nodes(scene, sample.source, options(bundles.plain))
    assert again.synthetic.GetName() != synthetic.GetName() and again.metrics_table is None


def test_results_follow_the_source_parent_transform(scene, sample, bundles):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, 3] = (1.0, 2.0, 3.0)
    transform.SetMatrixTransformToParent(mrml._to_vtk(m))
    for node in (sample.source, sample.segmentation):
        node.SetAndObserveTransformNodeID(transform.GetID())
    nodes = mrml.translate_nodes(scene, sample.source, options(bundles.plain, slices=app.ALL_ROIS, extent_margin=1),
                                 tumor=(sample.segmentation, "tumor"))
    assert nodes.synthetic.GetTransformNodeID() == transform.GetID()
    assert nodes.difference.GetTransformNodeID() == transform.GetID()


def test_masks_take_the_model_roi_names(scene, sample, bundles):
    """The panel's two mask selectors are the model's first two ROIs (liver, tumor by default)."""
    assert mrml.roi_roles(None) == ("liver", "tumor")
    assert mrml.roi_roles(SimpleNamespace(rois=("lesion",))) == ("lesion", "liver")
    request = mrml.read_request(sample.source, options(bundles.plain), liver=(sample.segmentation, "liver"),
                                tumor=(sample.segmentation, "tumor"), model=SimpleNamespace(rois=("lesion", "organ")))
    assert set(request.masks) == {"lesion", "organ"}
    assert request.masks["organ"].sum() > 0 and request.masks["lesion"].sum() > 0


def test_roi_only_translates_the_roi_slices(scene, case, sample, bundles):
    progress = []
    nodes = mrml.translate_nodes(scene, sample.source, options(bundles.plain, slices=app.ALL_ROIS, extent_margin=1),
                                 tumor=(sample.segmentation, "tumor"), progress=lambda d, t, e: progress.append(t))
    z = np.flatnonzero(case.masks["tumor"].array.any(axis=(1, 2)))
    first, last = max(0, z[0] - 1), min(16, z[-1] + 2)
    assert nodes.synthetic.GetAttribute("MedTranslate.Slices") == f"{first}:{last}"
    assert set(progress) == {last - first}
    difference = mrml.volume_from_node(nodes.difference).array
    outside = np.ones(16, bool)
    outside[first:last] = False
    assert not difference[outside].any() and difference[~outside].any()


def test_uncertainty_and_confidence_nodes(scene, sample, bundles):
    nodes = mrml.translate_nodes(scene, sample.source, options(bundles.mc, num_samples=3))
    assert nodes.uncertainty is not None
    assert nodes.uncertainty.GetName().endswith("uncertainty (std)")
    assert nodes.uncertainty.GetAttribute("MedTranslate.Role") == "uncertainty"
    display = nodes.uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.uncertainty_color_node(scene).GetID()
    values = mrml.volume_from_node(nodes.uncertainty).array
    assert values.min() >= 0 and values.max() > 0
    # window = 99th percentile (floored at 1e-6 so that a near-zero map still displays)
    assert display.GetWindow() == pytest.approx(max(np.percentile(values, 99), 1e-6), rel=1e-5)
    assert nodes.uncertainty.GetAttribute("MedTranslate.Samples") == "3"

    # A method that reports per-slice confidence gets a table (only translated slices).
    from MedTranslateLib.engine import Result

    vol = mrml.volume_from_node(sample.source)
    confidence = np.full(16, np.nan)
    confidence[3:6] = (0.5, 0.75, 1.0)
    result = Result(synthetic=vol, difference=vol.with_array(np.zeros(vol.shape)), confidence=confidence,
                    slice_range=(3, 6), info={"seed": 1})
    added = mrml.add_result_nodes(scene, sample.source, result, method="m", model="x", target="ct")
    table = added.confidence_table
    assert table.GetAttribute("MedTranslate.Role") == "confidence"
    assert [(table.GetCellText(r, 0), float(table.GetCellText(r, 1))) for r in range(3)] == [
        ("3", 0.5), ("4", 0.75), ("5", 1.0)]


def test_heatmap_window_leaves_out_air_clipped_in_both(scene):
    """Air is -1000 HU in the reference but the target window's floor (-300 HU for ct_angio) in
    the synthetic: a constant +700 HU there says nothing, so it does not set the heatmap window."""
    from MedTranslateLib.engine import Result
    from MedTranslateLib.maps import symmetric_limit

    rng = np.random.default_rng(0)
    body = np.zeros((6, 20, 20), bool)
    body[:, 4:16, 4:16] = True
    reference = np.where(body, rng.normal(100, 60, body.shape), -1000.0).astype(np.float32)
    # the model's air is near, not exactly at, the floor; one hallucinated voxel in the air
    synthetic = np.where(body, reference + rng.normal(0, 20, body.shape), -295.0).astype(np.float32)
    synthetic[0, 0, 0] = 400.0
    like = mio.Volume(synthetic)
    source = mrml.add_volume_node(scene, like, "CT")
    result = Result(synthetic=like, difference=like.with_array(np.where(body, synthetic - 40.0, 0.0)),
                    reference_difference=like.with_array(synthetic - reference), slice_range=(0, 6),
                    info={"target_preset": {"kind": "ct_window", "level": 200.0, "width": 1000.0}})
    nodes = mrml.add_result_nodes(scene, source, result, method="m", model="x", target="cta_arterial")
    window = nodes.reference_difference.GetDisplayNode().GetWindow()
    assert window == pytest.approx(2 * symmetric_limit((synthetic - reference)[body]), rel=1e-6)
    assert window < 300  # the naive 99th percentile over all voxels would be 2 x 700
    assert nodes.synthetic.GetDisplayNode().GetWindow() == 1000.0


def test_cancel_stops_within_one_batch_and_adds_nothing(scene, sample, bundles):
    from MedTranslateLib.engine import TranslationCancelled

    inputs = (sample.source, sample.reference, sample.segmentation)
    before_ids, before = node_ids(scene), {n.GetID(): node_checksum(n) for n in inputs}
    seen = []
    with pytest.raises(TranslationCancelled):
        mrml.translate_nodes(scene, sample.source, options(bundles.plain, batch_size=2),
                             reference_node=sample.reference, progress=lambda d, t, e: seen.append(d),
                             cancel=lambda: len(seen) > 1)  # cancel once the first batch is done
    assert seen == [0, 2]  # no batch ran after the cancel
    assert node_ids(scene) == before_ids
    assert {n.GetID(): node_checksum(n) for n in inputs} == before

    # Through the background job: a cancelled job hands back nothing, so nothing is added.
    run = mrml.TranslationRun(scene, sample.source, options(bundles.plain, batch_size=2),
                              reference_node=sample.reference)
    job = run.job()
    job.cancel()
    assert job.start().wait(60) is JobState.CANCELLED
    with pytest.raises(RuntimeError):
        _ = job.result
    assert node_ids(scene) == before_ids


def test_background_job_then_finish(scene, sample, bundles):
    run = mrml.TranslationRun(scene, sample.source, options(bundles.plain), tumor=(sample.segmentation, "tumor"))
    job = run.job().start()
    assert job.wait(120) is JobState.DONE, job.error_details
    assert job.progress.done == job.progress.total == 16
    assert job.progress.text() == "Translating: 16/16 slices"
    nodes = run.finish(job.result)
    assert nodes.synthetic.GetScene() is scene and nodes.metrics_table is None


def test_translation_process_then_finish_and_cancel(scene, sample, bundles):
    """The same run in its own process: the same voxels as on a thread; a cancel adds nothing."""
    run = mrml.TranslationRun(scene, sample.source, options(bundles.plain), reference_node=sample.reference)
    job = run.job(process=True).start()
    assert job.wait(180) is JobState.DONE, (job.error, job.error_details)
    assert job.progress.text() == "Translating: 16/16 slices"
    nodes = run.finish(job.result)
    assert nodes.synthetic.GetAttribute("MedTranslate.Model") == "tiny_pix2pix" and nodes.metrics_table is not None
    direct = mrml.translate_nodes(scene, sample.source, options(bundles.plain), reference_node=sample.reference)
    np.testing.assert_array_equal(mrml.volume_from_node(nodes.synthetic).array,
                                  mrml.volume_from_node(direct.synthetic).array)
    before = node_ids(scene)
    cancelled = run.job(process=True).start()
    cancelled.cancel()
    assert cancelled.wait(30) is JobState.CANCELLED
    assert node_ids(scene) == before


def test_failure_while_adding_results_rolls_back(scene, sample, bundles, monkeypatch):
    run = mrml.TranslationRun(scene, sample.source, options(bundles.plain), reference_node=sample.reference)
    result = run.work()
    before = node_ids(scene)

    def broken(*args, **kwargs):
        raise RuntimeError("table failed")

    monkeypatch.setattr(mrml.results, "_metrics_table", broken)
    with pytest.raises(RuntimeError, match="table failed"):
        run.finish(result)
    assert node_ids(scene) == before  # synthetic, difference maps and colour table removed again


def test_bad_inputs_raise_one_line_errors(scene, sample, bundles):
    with pytest.raises(ValueError, match="ROI"):
        mrml.TranslationRun(scene, sample.source, options(bundles.plain, slices=app.ALL_ROIS))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="empty: the volume node has no image data"):
        mrml.TranslationRun(scene, empty, options(bundles.plain))
    far = mrml.add_volume_node(scene, mio.Volume(np.ones((4, 4, 4)), origin=(1e4, 1e4, 1e4)), "far",
                               class_name="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="does not overlap"):
        mrml.TranslationRun(scene, sample.source, options(bundles.plain), liver=(far, "nonzero"))


def test_show_results_fills_linked_views(scene, sample, bundles):
    nodes = mrml.translate_nodes(scene, sample.source, options(bundles.plain), reference_node=sample.reference)
    assert mrml.show_results(scene, nodes, sample.source, sample.reference) == []  # no layout node: no-op
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)  # creates the layout node and the views, as in Slicer
    # In Slicer the layout manager creates one slice composite node per view; do that here.
    for view in mrml.RESULT_VIEWS:
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
    filled = mrml.show_results(scene, nodes, sample.source, sample.reference)
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == mrml.RESULT_LAYOUT_ID
    assert ET.fromstring(layout.GetLayoutDescription(mrml.RESULT_LAYOUT_ID)) is not None
    assert filled == ["MedTranslateSource", "MedTranslateSynthetic", "MedTranslateReference",
                      "MedTranslateDifference", "MedTranslateReferenceDifference"]
    slice_views = scene.GetNodesByClass("vtkMRMLSliceNode")
    names = {slice_views.GetItemAsObject(i).GetLayoutName() for i in range(slice_views.GetNumberOfItems())}
    assert set(filled) <= names  # the layout logic made the slice views of the description
    composites = {c.GetLayoutName(): c for c in (scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(i)
                                                  for i in range(len(mrml.RESULT_VIEWS)))}
    assert composites["MedTranslateSource"].GetBackgroundVolumeID() == sample.source.GetID()
    assert composites["MedTranslateReference"].GetBackgroundVolumeID() == sample.reference.GetID()
    synthetic_view = composites["MedTranslateSynthetic"]
    assert synthetic_view.GetBackgroundVolumeID() == nodes.synthetic.GetID()
    assert synthetic_view.GetForegroundVolumeID() == nodes.difference.GetID()  # overlay, opacity 0
    assert composites["MedTranslateReferenceDifference"].GetBackgroundVolumeID() == nodes.reference_difference.GetID()
    assert all(composites[name].GetLinkedControl() for name in filled)
    assert composites["MedTranslateUncertainty"].GetBackgroundVolumeID() is None  # not in this layout
    # Showing again without the reference view re-registers the description.
    assert mrml.show_results(scene, nodes, sample.source) == filled[:2] + filled[3:]
    assert "MedTranslateReference\"" not in layout.GetLayoutDescription(mrml.RESULT_LAYOUT_ID)


def test_metrics_summary_lines():
    text = mrml.metrics_summary({"body": {"mae": 41.24, "psnr": 29.81, "ssim": 0.9123, "rmse": 60.3},
                                 "whole": {"mae": 1.0, "psnr": math.nan, "ssim": 0.5, "rmse": 2.0}}, "HU")
    assert text.splitlines() == ["whole: MAE 1.0 HU, PSNR nan dB, SSIM 0.500, RMSE 2.0 HU",
                                 "body: MAE 41.2 HU, PSNR 29.8 dB, SSIM 0.912, RMSE 60.3 HU"]
    assert mrml.metrics_summary(None) == ""


# --------------------------------------------------------------------------- the module's Logic on real MRML


@pytest.fixture
def medtranslate_module(monkeypatch, scene):
    """MedTranslate.py loaded with real MRML (slicer-core) as ``slicer``; only the application-only
    modules (qt, ScriptedLoadableModule, parameterNodeWrapper, i18n) are stand-ins
    (``slicer_app_doubles``)."""
    return slicer_app_doubles.load_module(monkeypatch.setitem, scene)


def test_parameter_node_rules_are_those_of_slicers_serializers():
    """The double refuses what Slicer's parameterNodeWrapper refuses (see parameter_node_rules)."""
    rules = parameter_node_rules

    class NoNone:  # the module's annotation before: the real wrapper raises on None
        mask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # noqa: UP007

    class WithNone:
        mask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
        steps: Annotated[int, parameter_node_rules.WithinRange(0, 10)] = 3
        name: str = ""

    class Pep604:
        mask: vtkMRMLSegmentationNode | None

    class OutOfRange:
        steps: Annotated[int, parameter_node_rules.WithinRange(1, 10)] = 0

    class NoneString:
        name: str = None

    assert "Unable to write value 'None'" in rules.check_parameter_class(NoNone)[0]
    assert rules.check_parameter_class(WithNone) == []
    assert "PEP 604" in rules.check_parameter_class(Pep604)[0]
    assert "not within" in rules.check_parameter_class(OutOfRange)[0]
    assert rules.check_parameter_class(NoneString)
    with pytest.raises(TypeError, match="mask"):
        rules.parameterNodeWrapper(NoNone)


def test_the_module_parameter_node_satisfies_the_wrapper(medtranslate_module):
    assert parameter_node_rules.check_parameter_class(medtranslate_module.MedTranslateParameterNode) == []


@pytest.fixture
def module_logic(medtranslate_module):
    return medtranslate_module.MedTranslateLogic()


def test_module_logic_runs_the_flow_on_real_mrml(scene, module_logic, bundles):
    logic = module_logic
    assert logic.missingDependencies() == []
    sample = logic.loadSampleData(seed=0, shape=(16, 32, 32), spacing=(8.0, 8.0, 10.0))
    assert sample.source.GetScene() is scene and sample.source.GetName() == "Phantom 0 CT"
    before = node_checksum(sample.source)
    nodes = logic.process(sample.source, str(bundles.plain), referenceVolume=sample.reference,
                          liverMask=sample.segmentation, tumorMask=sample.segmentation, device="cpu", seed=-1,
                          roiOnly=True, roiMargin=0)
    assert node_checksum(sample.source) == before
    assert nodes.synthetic.GetAttribute("MedTranslate.Synthetic") == "1"
    assert nodes.synthetic.GetAttribute("MedTranslate.Seed") not in ("", "-1")  # -1 = random, recorded
    assert list(table_rows(nodes.metrics_table)) == ["whole", "body", "liver", "tumor"]  # regions defaulted
    with pytest.raises(ValueError, match="Source volume"):
        logic.process(None)

    # The GUI path: parameter node -> run -> background job -> finish.
    parameters = SimpleNamespace(sourceVolume=sample.source, referenceVolume=None, liverMask=sample.segmentation,
                                 liverRegion="liver", tumorMask=None, tumorRegion="", model=str(bundles.plain),
                                 device="cpu", steps=0, numSamples=1, roiOnly=False, roiMargin=4, seed=5,
                                 select="per_slice")
    run = logic.createRun(parameters)
    assert run.options.steps is None and run.options.seed == 5 and set(run.request.masks) == {"liver"}
    job = run.job().start()
    assert job.wait(120) is JobState.DONE, job.error_details
    added = run.finish(job.result)
    assert added.synthetic.GetAttribute("MedTranslate.Seed") == "5" and added.metrics_table is None


def test_module_widget_flow_with_fake_qt(scene, medtranslate_module, bundles, monkeypatch, tmp_path):
    """The widget's own code (combo filling, validation line, Apply -> Cancel, polling, results,
    cancel) driven with stand-in widgets on real MRML; only Qt itself is missing."""
    module = medtranslate_module
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    from MedTranslateLib import model_store

    monkeypatch.setattr(model_store, "bundled_models_dir", lambda: bundles.plain.parent)
    monkeypatch.setattr(module.MedTranslateLogic, "translationPython", staticmethod(lambda: None))  # thread path
    errors = slicer_app_doubles.quiet_application(monkeypatch.setattr)
    widget = slicer_app_doubles.make_widget(module)
    pn = widget._parameterNode

    widget._onParameterNodeModified()
    assert not widget.ui.applyButton.enabled and "source volume" in widget.ui.statusLabel.text
    assert ("CPU", "cpu") in widget.ui.deviceComboBox.items

    widget.onSampleDataButton()  # phantom into the scene, selected as the inputs
    assert pn.sourceVolume is not None and pn.liverRegion == "liver" and pn.tumorRegion == "tumor"
    assert [d for _, d in widget.ui.liverRegionComboBox.items] == ["liver", "tumor"]
    assert pn.model in ("tiny_pix2pix", "tiny_mc_dropout")
    assert (widget.ui.liverMaskLabel.text, widget.ui.tumorMaskLabel.text) == ("Liver mask:", "Tumor mask:")
    pn.model = "tiny_pix2pix"
    pn.device = "cpu"
    assert widget.ui.applyButton.enabled, widget.ui.statusLabel.text
    assert widget.ui.statusLabel.text.startswith("Ready: Phantom 0 CT → synthetic CTA (arterial) with tiny_pix2pix")
    assert not widget.ui.stepsSpinBox.enabled  # pix2pix without MC dropout: no sampling options

    before = node_ids(scene)
    widget.onApplyButton()
    assert widget.ui.applyButton.text == "Cancel" and not widget.ui.inputsCollapsibleButton.enabled
    widget._job.wait(120)
    widget._onPoll()
    assert errors == [] and widget._job is None and widget.ui.applyButton.text == "Apply"
    nodes = widget._lastResults[0]
    assert nodes.synthetic.GetID() not in before and nodes.metrics_table is not None
    assert "liver: MAE" in widget.ui.resultsLabel.text and widget.ui.showResultsButton.enabled

    # Cancel right after Apply: the job ends cancelled and the scene keeps its nodes.
    before = node_ids(scene)
    widget.onApplyButton()
    widget.onApplyButton()  # the button reads Cancel now
    assert widget._job.cancel_requested and not widget.ui.applyButton.enabled
    widget._job.wait(120)
    widget._onPoll()
    assert widget.ui.statusLabel.text == "Cancelled: nothing was added to the scene."
    assert node_ids(scene) == before and errors == []

    # What is missing is said on the status line, and Apply is off.
    pn.liverMask = pn.tumorMask = None
    pn.roiOnly = True
    assert not widget.ui.applyButton.enabled and "needs a liver or tumor mask" in widget.ui.statusLabel.text
    pn.roiOnly = False
    assert widget.ui.applyButton.enabled

    # A failure in the background: one readable message (details go to the log).
    def broken_work(*args, **kwargs):
        raise ValueError("model.safetensors: not a valid safetensors file")

    monkeypatch.setattr(mrml.TranslationRun, "work", broken_work)
    widget.onApplyButton()
    widget._job.wait(60)
    widget._onPoll()
    assert errors == ["model.safetensors: not a valid safetensors file"]
    assert widget.ui.statusLabel.text == errors[0] and widget.ui.applyButton.text == "Apply"


# --------------------------------------------------------------------------- the module meets the application (#12)


def test_the_panel_never_imports_torch(bundles, tmp_path):
    """Open the panel, load the sample, add a model, list models and GPUs, Apply, add the results:
    in a fresh interpreter, with the model check, the translation and the GPU list in processes of
    their own, the panel's thread never imports torch (PythonQt keeps the GIL; torch on that thread
    also costs seconds)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    testing = Path(__file__).resolve().parent
    bundle = shutil.copytree(bundles.plain, tmp_path / "downloads" / "liver_cta")  # added with Add model
    code = ("import json, sys, slicer_app_doubles as d; "
            "print('RESULT ' + json.dumps(d.panel_flow(sys.argv[1])))")
    env = dict(os.environ, MEDTRANSLATE_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(testing), str(testing.parent)]))
    out = subprocess.run([sys.executable, "-c", code, str(bundle / "medtranslate.yaml")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert seen["ready"] and seen["errors"] == [], seen
    assert seen["added"] == "liver_cta" and (tmp_path / "home" / "models" / "liver_cta" / "model.safetensors").is_file()
    assert seen["job"] == "TranslationProcess"
    assert seen["synthetic"] == "Phantom 0 CT – synthetic CTA (arterial) (pix2pix)", seen
    assert ["CPU", "cpu"] in seen["devices"] and seen["devices"][0][0].startswith("Auto (")  # from the process
    assert seen["torch_imported"] is False


def test_device_query_asks_a_process_and_falls_back(tmp_path):
    import sys

    query = mrml.DeviceQuery(sys.executable).start()
    choices = query.wait(120)
    assert query.error is None and choices[0][1] == "auto" and ("CPU", "cpu") in choices
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 3\n")
    broken.chmod(0o755)
    failed = mrml.DeviceQuery(str(broken)).start()
    assert failed.wait(30) == list(mrml.DEFAULT_DEVICE_CHOICES)
    assert failed.error == "cannot list the GPUs: no torch here"
    missing = mrml.DeviceQuery(str(tmp_path / "no-such-python")).start()
    assert missing.poll() == list(mrml.DEFAULT_DEVICE_CHOICES) and "cannot start" in missing.error


def test_closing_the_scene_while_a_job_runs(scene, medtranslate_module, bundles, monkeypatch, tmp_path):
    """The module not entered, the scene closed during a run: no exception, no node, one line."""
    module = medtranslate_module
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    from MedTranslateLib import model_store

    monkeypatch.setattr(model_store, "bundled_models_dir", lambda: bundles.plain.parent)
    monkeypatch.setattr(module.MedTranslateLogic, "translationPython", staticmethod(lambda: None))
    errors = slicer_app_doubles.quiet_application(monkeypatch.setattr)
    widget = slicer_app_doubles.make_widget(module)
    widget._onParameterNodeModified()
    widget.onSampleDataButton()
    widget._parameterNode.model, widget._parameterNode.device = "tiny_pix2pix", "cpu"

    widget.onApplyButton()
    job = widget._job
    widget.onSceneStartClose(None, None)  # cancels the job, drops the parameter node
    scene.Clear(0)
    job.wait(120)
    widget._onPoll()
    assert errors == [] and widget._job is None and scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0

    # a run that finished just before the close: its result is discarded, not added to the new scene
    widget.setParameterNode(slicer_app_doubles.make_widget(module)._parameterNode)  # a new scene's node
    widget.onSampleDataButton()
    widget._parameterNode.model, widget._parameterNode.device = "tiny_pix2pix", "cpu"
    widget.onApplyButton()
    widget._job.wait(120)
    widget.onSceneStartClose(None, None)
    scene.Clear(0)
    widget._onPoll()
    assert errors == [] and "result was discarded" in widget.ui.statusLabel.text
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0


def test_an_older_slicer_is_refused_with_one_message(medtranslate_module, monkeypatch):
    module = medtranslate_module
    assert module.unsupportedReason((5, 10), (3, 12)) == ""
    assert module.unsupportedReason((5, 12), (3, 12)) == ""
    old = module.unsupportedReason((5, 8), (3, 9))
    assert old == ("MedTranslate needs 3D Slicer 5.10 or newer; this is Slicer 5.8. Please install a newer Slicer "
                   "(and the MedTranslate extension for it).")
    assert "Python 3.11 or newer" in module.unsupportedReason((5, 10), (3, 9))
    assert module.unsupportedReason() == ""  # slicer-core: no application, Python >= 3.11

    monkeypatch.setattr(module, "slicerVersion", lambda: (5, 8))
    with pytest.raises(RuntimeError, match="needs 3D Slicer 5.10"):
        module.MedTranslateLogic()
    widget = module.MedTranslateWidget(None)
    added = []
    monkeypatch.setattr(module.ScriptedLoadableModuleWidget, "setup",
                        lambda self: setattr(self, "layout", SimpleNamespace(addWidget=added.append,
                                                                             addStretch=lambda n: None)),
                        raising=False)
    monkeypatch.setattr(module.qt, "QLabel", lambda text: SimpleNamespace(text=text, wordWrap=False), raising=False)
    widget.setup()
    widget.enter()
    widget.exit()
    widget.cleanup()
    assert [w.text for w in added] == [old.replace("5.8", "5.8")] and added[0].wordWrap
    assert not hasattr(widget, "ui")  # no panel: nothing else can fail later
    parent = SimpleNamespace()
    module.MedTranslate.__init__(SimpleNamespace(parent=parent, moduleName="MedTranslate"), parent)
    assert parent.helpText.startswith("<p><b>MedTranslate needs 3D Slicer 5.10")


class _SlicerPackaging:
    """``slicer.util.pip_install`` (5.10) and ``slicer.packaging.pip_ensure`` (5.12) with their
    real signatures (Base/Python/slicer/util.py, packaging.py): a wrong keyword is a TypeError."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def pip_install(self, requirements):
        if self.fail:
            import subprocess

            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"])
        self.calls.append(("pip_install", list(requirements)))

    def pip_ensure(self, requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        self.calls.append(("pip_ensure", list(requirements), dict(prompt_install=prompt_install,
                                                                  skip_in_testing=skip_in_testing)))


class _PyTorchUtilsLogic:
    """PyTorchUtils.PyTorchUtilsLogic (fepegar/SlicerPyTorch) with its real signatures."""

    calls: list = []

    @staticmethod
    def torchInstalled():  # noqa: N802 (its API)
        return False

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,  # noqa: N802, N803
                     torchvisionVersionRequirement=None):
        self.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        return object()


@pytest.mark.parametrize("slicer_version", ["5.10", "5.12"])
def test_dependencies_install_in_order_with_one_consent(medtranslate_module, monkeypatch, slicer_version):
    import sys
    import types

    module = medtranslate_module
    fake = _SlicerPackaging()
    monkeypatch.setattr(slicer.util, "pip_install", fake.pip_install, raising=False)
    packaging = types.ModuleType("slicer.packaging")
    if slicer_version == "5.12":
        packaging.pip_ensure = fake.pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    _PyTorchUtilsLogic.calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=_PyTorchUtilsLogic))
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True,
                        raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(mrml, "missing_dependencies", lambda: [])  # after the installation
    every = [requirement for _, requirement in mrml.DEPENDENCIES]

    assert module.MedTranslateLogic().installDependencies(every) is True
    assert len(asked) == 1 and all(r in asked[0] for r in every)  # one consent, ours, naming everything
    assert _PyTorchUtilsLogic.calls == [("installTorch", False, ">=2.4")]  # torch first, PyTorchUtils' build
    rest = ["safetensors>=0.4", "pyyaml>=6", "scipy>=1.11"]
    expected_rest = (("pip_ensure", rest, {"prompt_install": False, "skip_in_testing": False})
                     if slicer_version == "5.12" else ("pip_install", rest))
    assert fake.calls == [("pip_install", ["--no-deps", "monai>=1.5"]), expected_rest]

    # declined: nothing installed, no exception
    fake.calls.clear()
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: False, raising=False)
    assert module.MedTranslateLogic().installDependencies(every) is False and fake.calls == []

    # offline: one line that says so
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", _SlicerPackaging(fail=True).pip_install, raising=False)
    with pytest.raises(ValueError, match="could not be installed .*offline") as info:
        module.MedTranslateLogic().installDependencies(["monai>=1.5"])
    assert "\n" not in str(info.value)


def test_the_phantom_is_offered_in_sample_data(scene, medtranslate_module, monkeypatch):
    """Registered as Slicer's SampleData registers custom sources (Modules/Scripted/SampleData):
    every list of a source has one entry per node; the custom downloader is called with the source."""
    import sys

    module = medtranslate_module
    registered = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,  # noqa: N802, N803
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={},  # noqa: B006
                                           checksums=None, loadFileType=None):
            if isinstance(uris, str):
                uris, fileNames, nodeNames = [uris], [fileNames], [nodeNames]
            assert isinstance(uris, list | tuple) and len(uris) == len(fileNames) == len(nodeNames)
            registered.append(SimpleNamespace(category=category, sampleName=sampleName, uris=uris, nodeNames=nodeNames,
                                              thumbnailFileName=thumbnailFileName, customDownloader=customDownloader))

    monkeypatch.setitem(sys.modules, "SampleData", SimpleNamespace(SampleDataLogic=SampleDataLogic))
    slicer_app_doubles.quiet_application(monkeypatch.setattr)
    module.registerSampleData()
    (source,) = registered
    assert (source.category, source.sampleName) == ("MedTranslate", "MedTranslatePhantom")
    assert Path(source.thumbnailFileName).is_file()
    nodes = source.customDownloader(source)
    assert [n.GetName() for n in nodes] == source.nodeNames
    assert all(n.GetScene() is scene for n in nodes)


def test_confidence_table_and_summary_name_the_lowest_slices(scene, sample, tmp_path):
    from test_engine import make_rlbcd_bundle

    from MedTranslateLib import maps

    opts = options(make_rlbcd_bundle(tmp_path / "rl"), num_samples=2, slices=(5, 11), select="per_volume")
    nodes = mrml.translate_nodes(scene, sample.source, opts)
    assert nodes.synthetic.GetAttribute("MedTranslate.SelectedSample") == str(nodes.info["selected_sample"])
    conf = nodes.confidence
    assert conf.shape == (16,) and np.isfinite(conf[5:11]).all() and np.isnan(conf[:5]).all()
    table = nodes.confidence_table
    rows = [(int(table.GetCellText(r, 0)), float(table.GetCellText(r, 1))) for r in range(table.GetNumberOfRows())]
    assert [i for i, _ in rows] == list(range(5, 11))
    assert [c for _, c in rows] == pytest.approx(conf[5:11].tolist(), rel=1e-5)
    worst = 5 + int(np.argmin(conf[5:11]))
    line = maps.confidence_line(maps.confidence_summary(conf))
    assert f"lowest: slice {worst} (" in line and table.GetDescription() == line
    text = mrml.metrics_summary(nodes.metrics, nodes.units, confidence=nodes.confidence)
    assert text.splitlines()[0] == line
    assert mrml.metrics_summary(None, confidence=np.full(3, np.nan)) == ""


# --------------------------------------------------------------------------- the sample choice (#17)


@pytest.fixture
def scored_models(bundles, tmp_path, monkeypatch):
    """A model folder with a tiny rlbcd (scores every sample) and the tiny pix2pix (does not),
    as the bundled models, and an empty user folder."""
    import shutil

    from test_engine import make_rlbcd_bundle

    from MedTranslateLib import model_store

    models = tmp_path / "models"
    make_rlbcd_bundle(models / "tiny_rlbcd")
    shutil.copytree(bundles.plain, models / "tiny_pix2pix")
    monkeypatch.setenv("MEDTRANSLATE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(model_store, "bundled_models_dir", lambda: models)
    return models


def test_the_sample_choice_reaches_the_translation_options(scene, module_logic, scored_models):
    """The parameter node's ``select`` reaches ``TranslationOptions.select`` through the Logic for
    a model that scores every sample; for another model (the choice is disabled) it is per slice."""
    logic = module_logic
    sample = logic.loadSampleData(seed=0, shape=(16, 32, 32), spacing=(8.0, 8.0, 10.0))
    choices = {c.name: c for c in logic.modelChoices(sample.source)}
    assert choices["tiny_rlbcd"].scores_samples and not choices["tiny_pix2pix"].scores_samples
    parameters = SimpleNamespace(sourceVolume=sample.source, referenceVolume=None, liverMask=None, liverRegion="",
                                 tumorMask=None, tumorRegion="", model="tiny_rlbcd", device="cpu", steps=0,
                                 numSamples=2, roiOnly=False, roiMargin=4, seed=5, select="per_volume")
    options = logic.createRun(parameters).options
    assert isinstance(options, app.TranslationOptions) and options.select == "per_volume" and options.num_samples == 2
    parameters.select = "per_slice"
    assert logic.createRun(parameters).options.select == "per_slice"
    parameters.model, parameters.select = "tiny_pix2pix", "per_volume"  # kept from the other model
    assert logic.createRun(parameters).options.select == "per_slice"
    assert module_logic.options("m").select == "per_slice"

    # the console path takes the choice as given: one sample index for the volume, or one line
    nodes = logic.process(sample.source, "tiny_rlbcd", device="cpu", numSamples=2, seed=3, select="per_volume")
    assert nodes.info["select"] == "per_volume"
    assert nodes.synthetic.GetAttribute("MedTranslate.SelectedSample") == str(nodes.info["selected_sample"])
    with pytest.raises(ValueError, match="scores its samples") as refused:
        logic.process(sample.source, "tiny_pix2pix", device="cpu", select="per_volume")
    assert "\n" not in str(refused.value)


def test_the_panel_offers_the_sample_choice_for_models_that_score_samples(scene, medtranslate_module,
                                                                        scored_models, monkeypatch):
    """The widget's combo box: the modes of ``SELECT_MODES``, enabled only for a model whose
    capabilities have ``sample_confidence``; the choice is stored in the parameter node and reaches
    the run's options."""
    module = medtranslate_module
    monkeypatch.setattr(module.MedTranslateLogic, "translationPython", staticmethod(lambda: None))
    errors = slicer_app_doubles.quiet_application(monkeypatch.setattr)
    widget = slicer_app_doubles.make_widget(module)
    pn = widget._parameterNode
    widget._onParameterNodeModified()
    widget.onSampleDataButton()
    combo = widget.ui.selectComboBox
    assert [mode for _, mode in combo.items] == list(mrml.SELECT_MODES) and pn.select == "per_slice"
    assert [text for text, _ in combo.items] == ["per slice", "per volume"] and combo.currentIndex == 0

    pn.model = "tiny_pix2pix"
    assert not combo.enabled and not widget.ui.selectLabel.enabled
    pn.model = "tiny_rlbcd"
    assert combo.enabled and widget.ui.selectLabel.enabled and widget.ui.numSamplesSpinBox.enabled
    combo.setCurrentIndex(1)  # the user picks "per volume"
    assert pn.select == "per_volume" and combo.currentIndex == 1
    assert widget.logic.createRun(pn).options.select == "per_volume"
    pn.model = "tiny_pix2pix"
    assert not combo.enabled and pn.select == "per_volume"  # kept for the next scoring model
    assert widget.logic.createRun(pn).options.select == "per_slice"
    pn.select = "best"  # not a mode (e.g. a scene saved by another version): the first one
    assert pn.select == "per_slice" and combo.currentIndex == 0
    assert errors == []
