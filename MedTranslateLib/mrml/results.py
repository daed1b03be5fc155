"""The engine's ``Result`` -> new MRML nodes: synthetic volume, difference heatmaps, uncertainty,
metrics and confidence tables, colour tables, tags, placement beside the source."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from .. import io as mio
from ..app import (
    TranslationOptions,
)
from ..maps import confidence_line, confidence_summary, symmetric_limit
from ..modality import modality_label
from ..regions import ordered_regions
from .nodes import ATTRIBUTE_PREFIX, ROLE_ATTRIBUTE, SYNTHETIC_ATTRIBUTE, _name, add_volume_node

_METRIC_COLUMNS = (("MAE", "mae"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("RMSE", "rmse"))


# ---------------------------------------------------------------------------------------------
# results -> nodes
# ---------------------------------------------------------------------------------------------
@dataclass
class ResultNodes:
    """The nodes one run added (None where the method / inputs give no such result)."""

    synthetic: Any
    difference: Any
    reference_difference: Any = None
    uncertainty: Any = None
    metrics_table: Any = None
    confidence_table: Any = None
    metrics: dict[str, dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: (n,) per slice along the axis, NaN where not translated; None when the method gives none
    confidence: np.ndarray | None = None

    @property
    def units(self) -> str:
        """Units of the synthetic image and the metrics (HU for CT)."""
        return _unit(self.info)

    def nodes(self) -> list[Any]:
        return [n for n in (self.synthetic, self.difference, self.reference_difference, self.uncertainty,
                            self.metrics_table, self.confidence_table) if n is not None]


def result_name(source_name: str, target: str, method: str) -> str:
    """``"<source> – synthetic <target> (<method>)"``."""
    return f"{source_name} – synthetic {modality_label(target)} ({method})"


def _ramp(stops: Sequence[tuple[float, tuple[float, float, float]]], n: int = 256) -> np.ndarray:
    """(n, 3) RGB by linear interpolation between ``(position in [0, 1], rgb)`` stops."""
    pos = np.array([p for p, _ in stops])
    rgb = np.array([c for _, c in stops])
    x = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(x, pos, rgb[:, k]) for k in range(3)], axis=1)


_DIVERGING = ((0.0, (0.23, 0.30, 0.75)), (0.25, (0.55, 0.69, 0.99)), (0.5, (0.87, 0.87, 0.87)),
              (0.75, (0.96, 0.60, 0.48)), (1.0, (0.71, 0.02, 0.15)))  # cool-warm (blue, grey, red)
_HEAT = ((0.0, (0.0, 0.0, 0.0)), (0.35, (0.7, 0.0, 0.0)), (0.65, (1.0, 0.5, 0.0)), (0.85, (1.0, 0.9, 0.1)),
         (1.0, (1.0, 1.0, 1.0)))  # black, red, orange, yellow, white


def _color_node(scene: Any, tag: str, name: str, stops: Sequence, created: list) -> Any:
    node_id = f"vtkMRMLColorTableNode{tag}"
    node = scene.GetNodeByID(node_id)
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetSingletonTag(tag)
    node.SetName(name)
    colors = _ramp(stops)
    node.SetNumberOfColors(len(colors))
    node.GetLookupTable().SetTableRange(0, len(colors) - 1)
    for i, (r, g, b) in enumerate(colors):
        node.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "MedTranslate")
    node = scene.AddNode(node)
    created.append(node)
    return node


def difference_color_node(scene: Any, created: list | None = None) -> Any:
    """The diverging blue-grey-red colour table (shared by all difference maps)."""
    return _color_node(scene, "MedTranslateDifference", "MedTranslate difference (blue-red)", _DIVERGING,
                       created if created is not None else [])


def uncertainty_color_node(scene: Any, created: list | None = None) -> Any:
    """The heat (black-red-yellow-white) colour table of uncertainty maps."""
    return _color_node(scene, "MedTranslateUncertainty", "MedTranslate uncertainty (heat)", _HEAT,
                       created if created is not None else [])


def _display(node: Any, window: float, level: float, color_node: Any | None = None) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(float(max(window, 1e-6)), float(level))
    if color_node is not None:
        display.SetAndObserveColorNodeID(color_node.GetID())


def _tag(node: Any, role: str, attributes: dict[str, str]) -> None:
    node.SetAttribute(SYNTHETIC_ATTRIBUTE, "1")
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    for key, value in attributes.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, value)


def _target_window(info: dict[str, Any]) -> tuple[float, float] | None:
    """(window, level) of the synthetic image from the target preset the engine used."""
    cfg = info.get("target_preset")
    if not cfg:
        return None
    from ..intensity import preset_from_config

    try:
        lo, hi = preset_from_config(cfg).physical_range
    except (ValueError, TypeError):
        return None
    return hi - lo, (hi + lo) / 2.0


def _slab_values(volume: mio.Volume, axis: int, slice_range: tuple[int, int]) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(*slice_range)
    return volume.array[tuple(index)]


def _unit(info: dict[str, Any]) -> str:
    """Units of the synthetic image, from the target preset the engine used (HU for CT)."""
    from ..intensity import preset_from_config

    try:
        return preset_from_config(info["target_preset"]).UNITS
    except (KeyError, ValueError, TypeError):
        return ""


def _metrics_table(scene: Any, name: str, metrics: dict[str, dict[str, float]], unit: str) -> Any:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    regions = ordered_regions(metrics)
    column = vtk.vtkStringArray()
    column.SetName("Region")
    for region in regions:
        column.InsertNextValue(region)
    table.AddColumn(column)
    for title, key in _METRIC_COLUMNS:
        values = vtk.vtkDoubleArray()
        values.SetName(title)
        for region in regions:
            values.InsertNextValue(float(metrics[region].get(key, math.nan)))
        table.AddColumn(values)
    units = {"MAE": unit, "RMSE": unit, "PSNR": "dB", "SSIM": ""}
    descriptions = {"MAE": "mean absolute error", "PSNR": "peak signal-to-noise ratio",
                    "SSIM": "structural similarity", "RMSE": "root mean square error"}
    for title, _ in _METRIC_COLUMNS:
        table.SetColumnUnitLabel(title, units[title])
        table.SetColumnDescription(title, descriptions[title] + " of synthetic vs. reference")
    table.SetColumnDescription("Region", "whole volume, body, liver and tumor masks (translated slices)")
    return table


def _confidence_table(scene: Any, name: str, confidence: np.ndarray) -> Any | None:
    rows = [(i, float(c)) for i, c in enumerate(np.asarray(confidence, dtype=np.float64)) if np.isfinite(c)]
    if not rows:
        return None
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    index, value = vtk.vtkIntArray(), vtk.vtkDoubleArray()
    index.SetName("Slice")
    value.SetName("Confidence")
    for i, c in rows:
        index.InsertNextValue(i)
        value.InsertNextValue(c)
    table.AddColumn(index)
    table.AddColumn(value)
    table.SetColumnDescription("Confidence", "per-slice confidence reported by the method")
    table.SetColumnDescription("Slice", "slice index along the model's slicing axis")
    table.SetDescription(confidence_line(confidence_summary(confidence)))
    return table


def _place_like_source(scene: Any, source_node: Any, nodes: Sequence[Any]) -> None:
    """Same parent transform as the source; same subject-hierarchy parent (its study) when the
    scene has a subject hierarchy (always in Slicer)."""
    transform_id = source_node.GetTransformNodeID()
    for node in nodes:
        if transform_id and node.IsA("vtkMRMLTransformableNode"):
            node.SetAndObserveTransformNodeID(transform_id)
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if sh is None:
        return
    source_item = sh.GetItemByDataNode(source_node)
    parent = sh.GetItemParent(source_item) if source_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


def _added_nodes(scene: Any, before: set[str]) -> list[Any]:
    nodes = scene.GetNodes()
    found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [n for n in found if n.GetID() not in before]


def _remove_nodes(scene: Any, nodes: Sequence[Any]) -> None:
    for node in reversed(list(nodes)):
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)


def add_result_nodes(scene: Any, source_node: Any, result: Any, *, method: str, model: str, target: str,
                     reference_node: Any | None = None, options: TranslationOptions | None = None) -> ResultNodes:
    """Add the engine's ``Result`` to ``scene`` as new nodes (see the module docstring).

    All or nothing: if anything fails, every node added here is removed again and the error is
    raised. Input nodes are only read."""
    before = {scene.GetNodes().GetItemAsObject(i).GetID() for i in range(scene.GetNumberOfNodes())}
    created: list[Any] = []
    try:
        return _add_result_nodes(scene, source_node, result, method, model, target, reference_node, options,
                                 created)
    except BaseException:
        _remove_nodes(scene, _added_nodes(scene, before))
        raise


def _add_result_nodes(scene, source_node, result, method, model, target, reference_node, options, created):
    info = dict(result.info or {})
    base = result_name(_name(source_node), target, method)
    attributes = {"Method": method, "Model": model, "Target": target, "Source": source_node.GetID(),
                  "Seed": str(info.get("seed", "")), "Device": str(info.get("device", "")),
                  "Slices": f"{result.slice_range[0]}:{result.slice_range[1]}", "Axis": str(result.axis)}
    if options is not None:
        attributes["Steps"] = "" if options.steps is None else str(options.steps)
        attributes["Samples"] = str(options.num_samples)
    if "selected_sample" in info:  # select="per_volume": the one sample every slice comes from
        attributes["SelectedSample"] = str(info["selected_sample"])
    if reference_node is not None:
        attributes["Reference"] = reference_node.GetID()
    note = (f"Synthetic image generated by MedTranslate ({method}, model {model}). NOT FOR DIAGNOSIS: it can "
            f"look plausible and still be wrong.")

    def volume_node(volume: mio.Volume, name: str, role: str) -> Any:
        node = add_volume_node(scene, volume, scene.GenerateUniqueName(name))
        _tag(node, role, attributes)
        node.SetDescription(note)
        return node

    synthetic = volume_node(result.synthetic, base, "synthetic")
    window = _target_window(info)
    if window is not None:
        _display(synthetic, *window)

    diverging = difference_color_node(scene, created)
    slab = (result.axis, result.slice_range)

    synthetic_values = _slab_values(result.synthetic, *slab)
    floor = None if window is None else window[1] - window[0] / 2.0  # lowest value of the target window

    def difference_node(volume: mio.Volume, name: str, role: str) -> Any:
        """Centred on 0; +-limit = 99th percentile of |difference| where the image the synthetic
        is compared with (reference, or the source mapped to target units) is above the target
        window's floor. Air is left out: the synthetic cannot go below the floor (e.g. -300 HU for
        a CTA window), so air vs. a -1000 HU reference would set the scale to the window edge."""
        node = volume_node(volume, name, role)
        values = _slab_values(volume, *slab)
        shown = values != 0
        if floor is not None:
            shown &= (synthetic_values - values) > floor + 1e-3 * window[0]
        limit = symmetric_limit(values[shown]) if np.any(shown) else 1.0
        _display(node, 2.0 * limit, 0.0, diverging)
        return node

    nodes = ResultNodes(synthetic=synthetic,
                        difference=difference_node(result.difference, f"{base} – difference vs. source",
                                                   "difference"),
                        metrics=result.metrics, info=info, confidence=result.confidence)
    if result.reference_difference is not None:
        nodes.reference_difference = difference_node(result.reference_difference,
                                                     f"{base} – difference vs. reference", "reference_difference")
    if result.uncertainty is not None:
        kind = result.uncertainty_kind or "std"
        nodes.uncertainty = volume_node(result.uncertainty, f"{base} – uncertainty ({kind})", "uncertainty")
        values = _slab_values(result.uncertainty, *slab)
        top = float(np.percentile(values, 99.0)) if values.size else 1.0
        top = top if top > 0 else 1.0
        _display(nodes.uncertainty, top, top / 2.0, uncertainty_color_node(scene, created))
    if result.metrics:
        nodes.metrics_table = _metrics_table(scene, scene.GenerateUniqueName(f"{base} – metrics"), result.metrics,
                                             _unit(info))
        _tag(nodes.metrics_table, "metrics", attributes)
    if result.confidence is not None:
        nodes.confidence_table = _confidence_table(scene, scene.GenerateUniqueName(f"{base} – confidence"),
                                                   result.confidence)
        if nodes.confidence_table is not None:
            _tag(nodes.confidence_table, "confidence", attributes)
    _place_like_source(scene, source_node, nodes.nodes())
    return nodes


def metrics_summary(metrics: dict[str, dict[str, float]] | None, unit: str = "", *,
                    confidence: np.ndarray | None = None) -> str:
    """One line per region: ``body: MAE 41.2 HU, PSNR 29.8 dB, SSIM 0.912, RMSE 60.3 HU``; with a
    per-slice ``confidence`` (``ResultNodes.confidence``) first the line naming its mean, min and
    lowest-confidence slices (``maps.confidence_line``)."""
    lines = [line] if (line := confidence_line(confidence_summary(confidence))) else []
    if not metrics:
        return "\n".join(lines)
    suffix = f" {unit}" if unit else ""
    for region in ordered_regions(metrics):
        m = metrics[region]
        lines.append(f"{region}: MAE {m.get('mae', math.nan):.1f}{suffix}, PSNR {m.get('psnr', math.nan):.1f} dB, "
                     f"SSIM {m.get('ssim', math.nan):.3f}, RMSE {m.get('rmse', math.nan):.1f}{suffix}")
    return "\n".join(lines)
